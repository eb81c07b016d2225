#!/usr/bin/env bash
# The GPU checks of issues 3 and 7 in one run, for a session that is lent a GPU (at most 9 minutes):
#   1. the Triton score kernels against the chunked PyTorch path, on CUDA tensors (tests/test_kernels.py,
#      tests/test_signals.py);
#   2. signal memory and time for N = 1k .. 32k visual tokens, Triton vs chunked vs eager maps (bf16);
#   3. prefill overhead of every pre-LLM method against the ideal pruned prefill, LLaVA-1.5-7B at full depth;
#   4. the standard settings (time to first token, decode, memory, FLOPs) of LLaVA-1.5-7B, LLaVA-NeXT-7B
#      and Qwen2.5-VL-7B at full depth, bf16, under $GPU_CHECKS_ATTN (default sdpa; flash_attention_2 needs
#      flash-attn installed there).
# Everything lands in one archive, $OUT/gpu_checks.tar.gz, plus the log $OUT/gpu_checks.log.
#
# On the device machine (its python3 has CUDA torch; transformers there may be older than tokprune needs,
# so carry a wheel, see benchmarks/README.md):
#   bash benchmarks/gpu_checks.sh "$OUT"
# Here, to check the script itself on the CPU at toy sizes (a minute or two):
#   GPU_CHECKS_DRY=1 PYTHON=.venv/bin/python bash benchmarks/gpu_checks.sh /tmp/gpu-dry
set -uo pipefail
OUT=${1:-gpu-results}
PY=${PYTHON:-python3}
DRY=${GPU_CHECKS_DRY:-}
mkdir -p "$OUT"
LOG="$OUT/gpu_checks.log"
RESULTS=$(mktemp -d)  # the standard settings' result folders; archived at the end
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1

step() {  # step <seconds> <name> <command...>: run with a time limit; a failure is logged, never fatal
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
    timeout "$limit" "$@"
    echo "=== $name: exit $?"
}

if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (e.g. transformers >= 5.20)
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if [ -z "$DRY" ]; then
    $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
    nvidia-smi -L
fi
$PY -c "import torch, transformers, tokprune; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
ATTN=${GPU_CHECKS_ATTN:-sdpa}  # a second run with GPU_CHECKS_ATTN=flash_attention_2 where flash-attn is installed
$PY -c "from transformers.utils import is_flash_attn_2_available as a; print('flash-attn installed:', a())"

if [ -z "$DRY" ]; then  # the limits add up to 540 s, inside the device tool's 600 s per command
    step 90 kernels $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_signals.py
    step 90 signal-memory $PY benchmarks/signal_memory.py --device cuda --dtype bfloat16 --image-max-n 32768 --eager-max-gb 32
    step 60 prefill-overhead $PY benchmarks/prefill_overhead.py --device cuda --layers 32 --dtype bfloat16 --repeats 10
    common=(--results "$RESULTS" --device cuda --dtype bfloat16 --attn "$ATTN" --repeats 3 --max-new-tokens 16)
    step 120 "llava-1.5-7b $ATTN" $PY benchmarks/standard_settings.py llava-1.5-7b "${common[@]}" \
        --methods visionzip divprune fastervlm cdpruner holov fastv pdrop sparsevlm dart
    step 90 "llava-next-7b $ATTN" $PY benchmarks/standard_settings.py llava-next-7b "${common[@]}" \
        --methods visionzip divprune hired globalcom2 fastv pdrop
    step 90 "qwen2.5-vl-7b $ATTN" $PY benchmarks/standard_settings.py qwen2.5-vl-7b "${common[@]}" \
        --methods visionzip divprune fastv pdrop
else
    step 300 kernels $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "received"
    step 120 signal-memory $PY benchmarks/signal_memory.py --sizes 1024 --image-max-n 1024 --repeats 1
    step 300 "llava-1.5-7b sdpa" $PY benchmarks/standard_settings.py llava-1.5-7b --results "$RESULTS" --layers 1 --repeats 1 \
        --max-new-tokens 2 --methods divprune
fi

cp "$LOG" "$RESULTS/"
tar czf "$OUT/gpu_checks.tar.gz" -C "$RESULTS" . && echo "wrote $OUT/gpu_checks.tar.gz"
