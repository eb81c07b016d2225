"""tokprune in lmms-eval: the `tokprune` model (entry point) and the packaged tasks.

    pip install 'tokprune[eval]'
    lmms-eval --model tokprune --model_args pretrained=toy,method=divprune,keep_ratio=0.25,device=cpu \\
        --tasks tokprune_toyvqa

Installing the package registers `manifest` in the entry-point group `lmms_eval.models`; lmms-eval calls
it when it imports its model registry, and it then also makes lmms-eval's default task index include
the `tokprune_*` tasks and lists `tokprune` in `lmms-eval models` (`tokprune.eval.registration` says
why and how). The model classes live in `tokprune.eval.lmms` (importing it needs lmms-eval); this module
does not import lmms-eval until `manifest()` is called.
"""

from __future__ import annotations

from pathlib import Path

MODEL_ID = "tokprune"
SIMPLE_CLASS = "tokprune.eval.lmms.TokpruneSimple"
CHAT_CLASS = "tokprune.eval.lmms.TokpruneChat"
TASKS = Path(__file__).parent / "tasks"


def task_dir() -> Path:
    """The folder of the `tokprune_*` tasks (`tokprune_toyvqa`, `tokprune_toyvqa_mc`): indexed by every
    TaskManager with the default tasks once `manifest()` ran; pass it as `--include_path` (or
    `TaskManager(include_path=...)`) where the defaults are left out or the registry is not imported
    (`lmms-eval tasks list --include-path ...`)."""
    return TASKS


def manifest():
    """The `lmms_eval.models` entry point: registers model id `tokprune` (chat and simple classes), its
    tasks in lmms-eval's default task index, and its row in `lmms-eval models`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    from tokprune.eval.registration import register_listing, register_tasks

    register_tasks(TASKS)
    register_listing(MODEL_ID, SIMPLE_CLASS, CHAT_CLASS)
    return ModelManifest(model_id=MODEL_ID, simple_class_path=SIMPLE_CLASS, chat_class_path=CHAT_CLASS)
