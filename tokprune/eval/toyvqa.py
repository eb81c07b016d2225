"""The `tokprune_toyvqa` lmms-eval tasks: the toy VLM's held-out questions.

The docs are exactly `tokprune.toy.task.generate(N_DOCS, HELD_OUT_SEED)`: the shipped JSON
(`tasks/tokprune_toyvqa/toyvqa_heldout.json`) holds each one's index, question, answer and kind, and
`doc_to_visual` redraws the image from the same seed (the generator is one random stream, so the
samples are regenerated in order and cached). Rebuild the JSON after changing the task generator:

    python -m tokprune.eval.toyvqa

Metric of the generation task: exact match of the answer's first word, case and punctuation ignored.
The multiple-choice variant scores the answer words of the question's kind by loglikelihood.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

N_DOCS = 500
DATA = Path(__file__).parent / "tasks" / "tokprune_toyvqa" / "toyvqa_heldout.json"

_IMAGES: list[np.ndarray] = []
_QUESTIONS: list[str] = []
_LOCK = threading.Lock()


def held_out_seed() -> int:
    from tokprune.toy.train import HELD_OUT_SEED

    return HELD_OUT_SEED


def build_docs(n: int = N_DOCS) -> list[dict[str, Any]]:
    """The first n held-out docs: {"index", "question", "answer", "kind"}."""
    from tokprune.toy.task import generate

    samples = generate(n, held_out_seed())
    return [
        {"index": i, "question": s.question, "answer": s.answer, "kind": s.kind}
        for i, s in enumerate(samples)
    ]


def write_docs(path: Path = DATA, n: int = N_DOCS) -> None:
    """Write the held-out docs as a JSON list, one doc a line (the task's `dataset_kwargs.data_files`)."""
    rows = ",\n".join(json.dumps(doc) for doc in build_docs(n))
    path.write_text(f"[\n{rows}\n]\n")


def _ensure(count: int) -> None:
    """Cache at least `count` held-out images (regenerating the prefix, doubling to amortise)."""
    from tokprune.toy.task import generate

    with _LOCK:
        if count <= len(_IMAGES):
            return
        samples = generate(max(count, 2 * len(_IMAGES), 16), held_out_seed())
        _IMAGES[:] = [s.image for s in samples]
        _QUESTIONS[:] = [s.question for s in samples]


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The doc's scene as one PIL image, redrawn from the held-out seed."""
    index = int(doc["index"])
    _ensure(index + 1)
    if _QUESTIONS[index] != doc["question"]:
        raise ValueError(
            f"toyvqa doc {index} does not match tokprune.toy.task.generate (question {doc['question']!r} vs "
            f"{_QUESTIONS[index]!r}); the task generator changed: rebuild the docs with python -m tokprune.eval.toyvqa"
        )
    return [Image.fromarray(_IMAGES[index])]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question, with the optional pre/post prompt of lmms_eval_specific_kwargs (empty by default:
    the toy's word-level tokenizer knows only the task's words)."""
    kwargs = lmms_eval_specific_kwargs or {}
    parts = [kwargs.get("pre_prompt", ""), doc["question"], kwargs.get("post_prompt", "")]
    return " ".join(p for p in parts if p)


def doc_to_target(doc: dict) -> str:
    return doc["answer"]


def doc_to_choice(doc: dict) -> list[str]:
    """Every answer a question of the doc's kind can have."""
    from tokprune.toy.task import COLORS, SHAPES

    choices = {"color": list(COLORS), "shape": list(SHAPES)}
    return choices.get(doc["kind"], ["yes", "no"])


def normalize(text: str) -> str:
    """The first word of an answer, lower case, without punctuation ("Green." -> "green")."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return words[0] if words else ""


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """{"exact_match": 1.0 or 0.0} for the model's answer."""
    answer = results[0] if results else ""
    return {"exact_match": float(normalize(answer) == normalize(doc["answer"]))}


if __name__ == "__main__":
    write_docs()
    print(f"wrote {N_DOCS} docs to {DATA}")
