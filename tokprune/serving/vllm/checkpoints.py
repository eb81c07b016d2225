"""Model folders saved by transformers 5 in the layout vLLM 0.32 loads.

transformers 5 flattens LLaVA's CLIP / SigLIP tower (`vision_tower.embeddings...`), while vLLM's loader maps
the hub layout (`vision_tower.vision_model.embeddings...`, what the published LLaVA checkpoints hold). Hub
checkpoints load as they are; a model built and saved with transformers 5 (a tiny test model, a fine-tune)
needs its tower's weights renamed once:

    python -m tokprune.serving.vllm.checkpoints SRC DST
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

TOWER, NESTED = "vision_tower.", "vision_tower.vision_model."


def hub_name(key: str) -> str:
    """A weight's name in the hub layout (`vision_tower.X` -> `vision_tower.vision_model.X`)."""
    if key.startswith(TOWER) and not key.startswith(NESTED):
        return NESTED + key[len(TOWER) :]
    return key


def copy_in_hub_layout(source: str | Path, target: str | Path) -> Path:
    """Copy a model folder to `target` with every safetensors file's tower weights renamed (`hub_name`)."""
    from safetensors.torch import load_file, save_file

    source, target = Path(source), Path(target)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a model folder (no config.json)")
    shutil.copytree(source, target, dirs_exist_ok=True)
    for path in target.glob("*.safetensors"):
        weights = load_file(path)
        save_file({hub_name(k): v for k, v in weights.items()}, path, metadata={"format": "pt"})
    return target


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m tokprune.serving.vllm.checkpoints SRC DST")
    print(copy_in_hub_layout(sys.argv[1], sys.argv[2]))
