"""lmms-eval loads this file by path (`!function utils.<name>`); the task logic lives in tokprune.eval.toyvqa."""

from tokprune.eval.toyvqa import doc_to_choice, doc_to_target, doc_to_text, doc_to_visual, process_results

__all__ = ["doc_to_choice", "doc_to_target", "doc_to_text", "doc_to_visual", "process_results"]
