"""What the `lmms_eval.models` entry point does besides returning the model's manifest.

lmms-eval 0.7.3 calls the entry point when `lmms_eval.models` is imported (its model registry loads the
group `lmms_eval.models`), which the evaluation CLI and `lmms_eval.evaluator` do before they build a
`TaskManager`. It has no such hook for tasks or for `lmms-eval models`:

* tasks: `TaskManager` indexes `lmms_eval/tasks/` plus `--include_path`; no entry-point group, and the
  deprecated `LMMS_EVAL_PLUGINS` variable adds `<plugin>.tasks` to the include path only after the CLI has
  built its TaskManager. `register_tasks` makes every TaskManager that indexes the default tasks
  (`include_defaults=True`, the CLI's and simple_evaluate's) index the packaged `tokprune_*` tasks too,
  so `--tasks tokprune_toyvqa` needs no `--include_path`. `lmms-eval tasks list` imports no model
  registry, so it lists them only with `--include-path` (`tokprune.eval.task_dir()`);
  `lmms-eval --tasks list` lists them.
* `lmms-eval models` prints the built-in tables `AVAILABLE_SIMPLE_MODELS` / `AVAILABLE_CHAT_TEMPLATE_MODELS`
  only, not the registry; `register_listing` adds `tokprune` there (full class paths, as lmms-eval
  itself does for `LMMS_EVAL_PLUGINS` models).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

_MARK = "_tokprune_tasks"


def register_tasks(task_dir: Path) -> None:
    """Wrap `TaskManager.initialize_tasks` so that indexing the default tasks indexes `task_dir` too
    (a task of the same name from lmms-eval or `--include_path` wins). Idempotent."""
    from lmms_eval.tasks import TaskManager

    original = TaskManager.initialize_tasks
    if getattr(original, _MARK, None) is not None:
        return

    @functools.wraps(original)
    def initialize_tasks(self, include_path=None, include_defaults: bool = True) -> dict:
        if include_defaults:  # indexed last: lmms-eval's tasks and the include paths win on a name clash
            given = [include_path] if isinstance(include_path, str) else list(include_path or [])
            include_path = [*given, str(task_dir)]
        return original(self, include_path=include_path, include_defaults=include_defaults)

    setattr(initialize_tasks, _MARK, task_dir)
    TaskManager.initialize_tasks = initialize_tasks


def register_listing(model_id: str, simple_class_path: str, chat_class_path: str) -> None:
    """Add the model to the tables `lmms-eval models` prints (while `lmms_eval.models` initialises, the
    module is in sys.modules with its tables already defined)."""
    models = sys.modules.get("lmms_eval.models")
    if models is None:
        import lmms_eval.models as models
    models.AVAILABLE_SIMPLE_MODELS.setdefault(model_id, simple_class_path)
    models.AVAILABLE_CHAT_TEMPLATE_MODELS.setdefault(model_id, chat_class_path)
