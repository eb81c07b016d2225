#!/usr/bin/env bash
# The GPU checks of issues 3 and 7 in one run, for a session that is lent a GPU (at most 9 minutes):
#   1. the Triton score kernels against the chunked PyTorch path, on CUDA tensors (tests/test_kernels.py,
#      tests/test_signals.py; bf16 inputs take the tensor-core branch the CPU interpreter never runs);
#   2. flash_attention_2 with flash-attn's own kernel on pruned batches, CUDA + bf16, against sdpa
#      (tests/test_flash_varlen.py); skipped, with the reason printed, where flash-attn is not installed;
#   3. signal memory and time for N = 1k .. 32k visual tokens, Triton vs chunked vs eager maps (bf16);
#   4. prefill overhead of every pre-LLM method against the ideal pruned prefill, LLaVA-1.5-7B at full depth;
#   5. the standard settings (time to first token, decode, memory, FLOPs) of LLaVA-1.5-7B, LLaVA-NeXT-7B
#      and Qwen2.5-VL-7B at full depth, bf16, under $GPU_CHECKS_ATTN (default sdpa; flash_attention_2 needs
#      flash-attn installed there).
# Every step has its own time limit; a failing step (or a failed install) is logged and the run goes on.
# Everything lands in one archive, $OUT/gpu_checks.tar.gz, plus the log $OUT/gpu_checks.log.
#
# tokprune is installed (not editable) into a --target folder under /tmp, as the device's python
# environment may be read-only; PYTHONSAFEPATH=1 keeps the source tree in the working directory (where
# `tokprune.patches` lives at patches/, mapped by pyproject.toml) from shadowing the installed package.
#
# On the device machine (its python3 has CUDA torch; transformers there may be older than tokprune needs,
# so carry a wheel, see benchmarks/README.md):
#   bash benchmarks/gpu_checks.sh "$OUT"
# Here, to check the script itself on the CPU at toy sizes (about 6 minutes):
#   GPU_CHECKS_DRY=1 PYTHON=.venv/bin/python bash benchmarks/gpu_checks.sh /tmp/gpu-dry
set -uo pipefail
OUT=${1:-gpu-results}
PY=${PYTHON:-python3}
DRY=${GPU_CHECKS_DRY:-}
mkdir -p "$OUT"
LOG="$OUT/gpu_checks.log"
RESULTS=$(mktemp -d)  # the standard settings' result folders; archived at the end
SITE=$(mktemp -d /tmp/tokprune-site.XXXXXX)  # tokprune (and carried wheels), installed with --target
exec 3>&1 4>&2
exec > >(tee "$LOG") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1

step() {  # step <seconds> <name> <command...>: run with a time limit; a failure is logged, never fatal
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
    timeout "$limit" "$@"
    echo "=== $name: exit $?"
}

install_tokprune() {  # a non-editable install of this tree into $SITE, built from a copy (no build/ here)
    local src
    src=$(mktemp -d)
    cp -r pyproject.toml README.md tokprune patches "$src"/ &&
        $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" "$src"
    local status=$?
    rm -rf "$src"
    return $status
}

if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (e.g. transformers >= 5.20)
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl ||
        echo "=== install of the carried wheels failed (continuing with the installed packages)"
fi
if install_tokprune; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
else
    echo "=== install of tokprune into $SITE failed: the steps below use whatever tokprune python finds"
fi
[ -n "$DRY" ] || nvidia-smi -L
$PY -c "import torch, transformers, tokprune, tokprune.patches; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available(), 'tokprune from', tokprune.__file__)"
ATTN=${GPU_CHECKS_ATTN:-sdpa}  # a second run with GPU_CHECKS_ATTN=flash_attention_2 where flash-attn is installed
if $PY -c "from transformers.utils import is_flash_attn_2_available as a; raise SystemExit(0 if a() else 1)"; then
    FLASH=1
    echo "flash-attn installed: yes"
else
    FLASH=
    echo "flash-attn installed: no"
fi

if [ -z "$DRY" ]; then  # the limits add up to 540 s, inside the device tool's 600 s per command
    step 80 kernels $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_signals.py
    if [ -n "$FLASH" ]; then
        step 60 flash $PY -m pytest -q -p no:cacheprovider tests/test_flash_varlen.py
    else
        echo "=== flash: skipped: flash-attn is not installed here (transformers' is_flash_attn_2_available()" \
            "is False), so its kernel cannot be checked; the CPU stand-in is tested without a GPU"
    fi
    step 80 signal-memory $PY benchmarks/signal_memory.py --device cuda --dtype bfloat16 --image-max-n 32768 --eager-max-gb 32
    step 50 prefill-overhead $PY benchmarks/prefill_overhead.py --device cuda --layers 32 --dtype bfloat16 --repeats 10
    common=(--results "$RESULTS" --device cuda --dtype bfloat16 --attn "$ATTN" --repeats 3 --max-new-tokens 16)
    step 110 "llava-1.5-7b $ATTN" $PY benchmarks/standard_settings.py llava-1.5-7b "${common[@]}" \
        --methods visionzip divprune fastervlm cdpruner holov fastv pdrop sparsevlm dart
    step 80 "llava-next-7b $ATTN" $PY benchmarks/standard_settings.py llava-next-7b "${common[@]}" \
        --methods visionzip divprune hired globalcom2 fastv pdrop
    step 80 "qwen2.5-vl-7b $ATTN" $PY benchmarks/standard_settings.py qwen2.5-vl-7b "${common[@]}" \
        --methods visionzip divprune fastv pdrop
else
    step 300 kernels $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "received"
    # no flash-attn on the CPU: the step runs a few of its tests on the PyTorch stand-in instead
    step 120 flash $PY -m pytest -q -p no:cacheprovider tests/test_flash_varlen.py -k "one_row and llava-"
    step 120 signal-memory $PY benchmarks/signal_memory.py --sizes 1024 --image-max-n 1024 --repeats 1
    step 300 "llava-1.5-7b sdpa" $PY benchmarks/standard_settings.py llava-1.5-7b --results "$RESULTS" --layers 1 --repeats 1 \
        --max-new-tokens 2 --methods divprune
fi

exec 1>&3 2>&4 3>&- 4>&-  # close tee's pipe and let it write the last lines before the log is copied
wait "$TEE_PID" 2>/dev/null || sleep 1
cp "$LOG" "$RESULTS/"
tar czf "$OUT/gpu_checks.tar.gz" -C "$RESULTS" . && echo "wrote $OUT/gpu_checks.tar.gz"
rm -rf "$SITE"
