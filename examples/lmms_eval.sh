#!/usr/bin/env bash
# Accuracy through lmms-eval, the harness the papers use: the `tokprune` model (an lmms-eval plugin,
# registered when the package is installed) on the toy VQA task shipped in the package, offline on a CPU.
#
# Needs the `eval` extra, installed so that pip keeps your torch (without the constraints it swaps a CPU
# torch for a CUDA one), and on a CPU machine without the CUDA torchvision lmms-eval pulls in:
#   pip install -c constraints.txt ".[eval]" && pip uninstall -y torchvision
#
#   bash examples/lmms_eval.sh                          # divprune at keep 1/4, 50 held-out questions
#   METHOD=visionzip BUDGET=64 bash examples/lmms_eval.sh
#   METHOD=none bash examples/lmms_eval.sh              # the unpruned model, for comparison
#   METHOD=visionzip+fastv EXTRA=fastv.layer=2,visionzip.budget=98 BUDGET=32 bash examples/lmms_eval.sh
#   LIMIT=2 bash examples/lmms_eval.sh --log_samples --output_path results/   # extra args go to lmms-eval
#   DRY_RUN=1 bash examples/lmms_eval.sh                # print the command instead of running it
#
# --model_args is a list of key=value pairs (README "Accuracy: tokprune demo and lmms-eval"):
#   loading: pretrained (an HF id, a local folder or "toy"), revision, device, device_map, dtype,
#            attn_implementation, trust_remote_code, min_pixels, max_pixels;
#   running: batch_size, max_new_tokens;
#   pruning: method (a registered name; "a+b" composes), budget or keep_ratio, video_budget, order, positions;
#   any other key is an option of the method: layer=3 (one method), fastv.layer=3 (one stage of a
#   composition).
# Every key is checked before the model is loaded. A real checkpoint and standard tasks, on a GPU machine
# and online:
#
#   HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 PRETRAINED=llava-hf/llava-1.5-7b-hf METHOD=visionzip BUDGET=64 \
#       DEVICE=cuda EXTRA=dtype=bfloat16 TASKS=mme,pope LIMIT=100 bash examples/lmms_eval.sh --batch_size 8
#
# lmms-eval's CLI exits 0 even when the evaluation fails, unless --verbosity DEBUG is given: hence DEBUG.
set -euo pipefail

PRETRAINED=${PRETRAINED:-toy}     # the trained toy VLM shipped in the package
METHOD=${METHOD:-divprune}        # "none": the unpruned model
BUDGET=${BUDGET:-}                # tokens kept per image; if empty, KEEP_RATIO is used
KEEP_RATIO=${KEEP_RATIO:-0.25}
DEVICE=${DEVICE:-cpu}
EXTRA=${EXTRA:-}                  # more model_args, e.g. dtype=bfloat16,max_new_tokens=8
TASKS=${TASKS:-tokprune_toyvqa}   # packaged: tokprune_toyvqa, tokprune_toyvqa_mc (needs --force_simple)
LIMIT=${LIMIT:-50}                # questions per task
# the toy task is stored in the package: nothing to download
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}

if [[ -n "$BUDGET" ]]; then count="budget=$BUDGET"; else count="keep_ratio=$KEEP_RATIO"; fi
if [[ "$METHOD" == none ]]; then pruning="method=none"; else pruning="method=$METHOD,$count"; fi

command=(
    lmms-eval --model tokprune
    --model_args "pretrained=$PRETRAINED,$pruning,device=$DEVICE${EXTRA:+,$EXTRA}"
    --tasks "$TASKS" --limit "$LIMIT" --verbosity DEBUG
    "$@"
)
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
"${command[@]}"
