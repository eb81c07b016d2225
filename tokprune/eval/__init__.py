"""tokprune in lmms-eval: the `tokprune` model (entry point) and the packaged tasks.

    pip install 'tokprune[eval]'
    lmms-eval --model tokprune --model_args pretrained=toy,method=divprune,keep_ratio=0.25 \\
        --tasks tokprune_toyvqa --include_path "$(python -c 'import tokprune.eval as e; print(e.task_dir())')"

The model classes live in `tokprune.eval.lmms` (importing it needs lmms-eval); this module does not
import lmms-eval until `manifest()` is called.
"""

from __future__ import annotations

from pathlib import Path

MODEL_ID = "tokprune"
TASKS = Path(__file__).parent / "tasks"


def task_dir() -> Path:
    """The folder to pass to lmms-eval's `--include_path` (or `TaskManager(include_path=...)`): it
    holds the `tokprune_*` tasks (`tokprune_toyvqa`, `tokprune_toyvqa_mc`)."""
    return TASKS


def manifest():
    """The `lmms_eval.models` entry point: registers model id `tokprune` (chat and simple classes)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_ID,
        simple_class_path="tokprune.eval.lmms.TokpruneSimple",
        chat_class_path="tokprune.eval.lmms.TokpruneChat",
    )
