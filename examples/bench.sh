#!/usr/bin/env bash
# A small `tokprune bench` run: three methods against the unpruned model on the toy LLaVA shipped in the
# package (196 visual tokens per image, one 112 px image per prompt), keeping 49 tokens (1/4) per image.
# Offline, CPU, about 15 s. Every setting runs next to the unpruned baseline, interleaved after warm-up;
# the table shows medians of time to first token, decode speed, memory, KV-cache size, scoring time and
# analytic FLOPs; $OUT gets results.json / .csv / .md and two plots.
#
#   bash examples/bench.sh                        # the toy, into bench-results/
#   OUT=/tmp/bench bash examples/bench.sh --no-progress   # extra arguments go to `tokprune bench`
#   DRY_RUN=1 bash examples/bench.sh              # print the command instead of running it
#
# Larger runs (see README "Measuring: tokprune bench"): random weights with the published shapes, built
# offline, the LLM truncated for a CPU; or real weights from a local folder or an HF id:
#
#   MODEL=llava-1.5-7b bash examples/bench.sh --layers 4          # budgets 49 -> try --budgets 192 128 64
#   MODEL=/path/to/llava-1.5-7b-hf bash examples/bench.sh --device cuda --dtype bfloat16
set -euo pipefail

MODEL=${MODEL:-toy}          # a preset (tokprune models), "toy", a local folder or an HF id
OUT=${OUT:-bench-results}    # output folder

command=(
    tokprune bench --model "$MODEL"
    --methods visionzip divprune fastv    # a [CLS]-attention merge, a diversity method, an in-LLM method
    --budgets 49                          # tokens per image (64), keep ratios (0.25) or percentages (33.3%)
    --repeats 2 --warmup 1                # medians over 2 interleaved repeats after 1 warm-up run
    --max-new-tokens 4                    # the end-to-end time covers 4 generated tokens
    --out "$OUT"
    "$@"
)
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
"${command[@]}"
