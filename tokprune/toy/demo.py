"""`tokprune demo`: accuracy against kept tokens for every method, on held-out questions of the toy task.

For each setting (the unpruned model, then every method at every budget) the demo answers the same
held-out questions and records accuracy, the visual tokens entering the LLM and their layer average, the
analytic prefill FLOPs and the measured prefill time. It prints a table and writes it (markdown, JSON),
a plot of accuracy against kept tokens (one line per method) and a picture of which tokens each method
kept over a few questions' images.

On the toy model a question is answered by the argmax of the next-token logits after "ASSISTANT:" (one
prefill, the answers are single words). On a real model (`--model <HF id or path>`) the question goes
through the processor's chat template and the first word of a short greedy answer is compared.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import tokprune
from tokprune.toy.task import Sample

KEEP_RATIOS = (0.5, 0.25, 0.125)
N_PICTURES = 4  # questions shown in the kept-token picture


@dataclass
class DemoRow:
    """One setting's results over all questions."""

    method: str
    budget: str
    correct: int = 0
    total: int = 0
    visual_in: float = 0.0  # mean visual tokens per question before pruning
    visual_to_llm: float = 0.0  # mean visual tokens entering the LLM
    visual_layer_avg: float = 0.0  # mean layer-averaged visual tokens
    flops: float = 0.0  # mean analytic prefill FLOPs per question (scoring included)
    seconds: float = 0.0  # measured prefill time, all questions
    kept: list[list[int]] = field(default_factory=list)  # kept visual indices of the pictured questions

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


class ToyAnswerer:
    """Answers toy questions with one batched prefill (argmax over the vocabulary after 'ASSISTANT:')."""

    def __init__(self, model, processor) -> None:
        self.model, self.processor = model, processor

    def inputs(self, samples: list[Sample]) -> dict:
        from tokprune.toy.train import encode

        return encode(self.processor, samples, self.model.device)

    def answer(self, inputs: dict) -> list[str]:
        logits = self.model(**inputs, logits_to_keep=1).logits[:, -1]
        return self.processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())


class ChatAnswerer:
    """Answers with a real model: chat template, a short greedy answer, its first word."""

    def __init__(self, model, processor, max_new_tokens: int = 4) -> None:
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens

    def inputs(self, samples: list[Sample]) -> dict:
        from PIL import Image

        from tokprune.eval.prompting import Turn, render

        texts, images = [], []
        for s in samples:
            turn = Turn(
                role="user", text=f"{s.question} Answer with one word.", images=[Image.fromarray(s.image)]
            )
            text, imgs = render(self.processor, [turn])
            texts.append(text)
            images += imgs
        batch = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        return {k: v.to(self.model.device) for k, v in batch.items()}

    def answer(self, inputs: dict) -> list[str]:
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        texts = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [(t.strip().split() or [""])[0].strip(".,!?").lower() for t in texts]


def run_settings(
    answerer,
    samples: list[Sample],
    settings: list[tuple[str | None, dict]],
    batch_size: int = 50,
    progress=None,
) -> list[DemoRow]:
    """Run every (method or None, budget kwargs) setting over the samples; the unpruned row first."""
    from tokprune.flops import prefill_flops, scoring_signals

    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    prepared = [answerer.inputs(batch) for batch in batches]
    with torch.no_grad():
        answerer.answer(prepared[0])  # warm-up: the first forward pays one-off allocation costs
    rows = []
    for method, budget in settings:
        row = DemoRow(method=method or "unpruned", budget=_budget_label(budget))
        pruner = tokprune.apply(answerer.model, method, **budget) if method else None
        try:
            for batch, inputs in zip(batches, prepared):
                _answer_batch(answerer, pruner, batch, inputs, row, prefill_flops, scoring_signals)
        finally:
            if pruner is not None:
                pruner.remove()
        _average(row)
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


def _answer_batch(answerer, pruner, batch, inputs, row: DemoRow, prefill_flops, scoring_signals) -> None:
    start = time.perf_counter()
    with torch.no_grad():
        answers = answerer.answer(inputs)
    row.seconds += time.perf_counter() - start
    row.correct += sum(a == s.answer for a, s in zip(answers, batch))
    row.total += len(batch)
    stats = pruner.stats if pruner is not None else None
    visual = (inputs["input_ids"] == answerer.model.config.image_token_id).sum(1).tolist()
    row.visual_in += sum(visual)
    if stats is not None:
        row.visual_to_llm += sum(stats.layer_tokens[b][0] - stats.text_tokens[b] for b in range(len(batch)))
        row.visual_layer_avg += sum(stats.layer_averaged_visual(b) for b in range(len(batch)))
    else:
        row.visual_to_llm += sum(visual)
        row.visual_layer_avg += sum(visual)
    if _is_toy(answerer):
        signals = scoring_signals(pruner) if pruner is not None else ()
        row.flops += prefill_flops(answerer.model, inputs, stats, logits_to_keep=1, signals=signals).total
    if not row.kept:
        kept = stats.kept if stats is not None else [torch.arange(v) for v in visual]
        row.kept = [k.tolist() for k in kept[:N_PICTURES]]


def _average(row: DemoRow) -> None:
    for name in ("visual_in", "visual_to_llm", "visual_layer_avg", "flops"):
        setattr(row, name, getattr(row, name) / max(1, row.total))


def _is_toy(answerer) -> bool:
    return isinstance(answerer, ToyAnswerer)


def _budget_label(budget: dict) -> str:
    if "keep_ratio" in budget:
        return f"keep {budget['keep_ratio']:g}"
    if "budget" in budget:
        return f"{budget['budget']} tokens"
    return "all"


# --------------------------------------------------------------------------------------------- report
def table(rows: list[DemoRow]) -> str:
    """Markdown table: accuracy, % of unpruned, visual tokens, FLOPs, measured prefill speed-up."""
    base = rows[0]
    lines = [
        "| method | budget | accuracy | % of unpruned | vis→LLM | vis avg/layer | GFLOPs/question | prefill speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        share = 100 * row.accuracy / base.accuracy if base.accuracy else float("nan")
        gflops = f"{row.flops / 1e9:.3f}" if row.flops else "—"
        speed = base.seconds / row.seconds if row.seconds else float("nan")
        lines.append(
            f"| {row.method} | {row.budget} | {100 * row.accuracy:.1f}% | {share:.1f}% | "
            f"{row.visual_to_llm:.1f} | {row.visual_layer_avg:.1f} | {gflops} | {speed:.2f}× |"
        )
    return "\n".join(lines)


def write_report(rows: list[DemoRow], samples: list[Sample], meta: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "demo.md", "json": out / "demo.json"}
    paths["markdown"].write_text(f"# tokprune demo\n\n{json.dumps(meta)}\n\n{table(rows)}\n")
    records = [{**asdict(r), "accuracy": r.accuracy} for r in rows]
    paths["json"].write_text(json.dumps({"meta": meta, "rows": records}, indent=1))
    paths["plot"] = plot_accuracy(rows, out / "accuracy_vs_tokens.png")
    paths["picture"] = picture_kept(rows, samples[:N_PICTURES], out / "kept_tokens.png")
    return paths


def plot_accuracy(rows: list[DemoRow], path: Path) -> Path:
    """Accuracy against layer-averaged visual tokens, one line per method, the unpruned model as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    base = rows[0]
    ax.axhline(100 * base.accuracy, color="black", linestyle="--", label="unpruned")
    methods = list(dict.fromkeys(r.method for r in rows[1:]))
    cmap = plt.get_cmap("tab20")
    for i, method in enumerate(methods):
        mine = sorted((r for r in rows if r.method == method), key=lambda r: r.visual_layer_avg)
        ax.plot(
            [r.visual_layer_avg for r in mine], [100 * r.accuracy for r in mine], marker="o", color=cmap(i % 20),
            label=method,
        )  # fmt: skip
    ax.set_xlabel("visual tokens per question (average over LLM layers)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("toy VQA: accuracy against kept visual tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def picture_kept(
    rows: list[DemoRow], samples: list[Sample], path: Path, ratio_label: str = "keep 0.25"
) -> Path:
    """Rows = methods at one budget, columns = questions: the image with dropped patches dimmed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [rows[0]] + [r for r in rows[1:] if r.budget == ratio_label] or rows
    fig, axes = plt.subplots(
        len(shown), len(samples), figsize=(1.9 * len(samples), 1.9 * len(shown)), squeeze=False
    )
    for i, row in enumerate(shown):
        for j, sample in enumerate(samples):
            ax = axes[i][j]
            ax.imshow(dimmed(sample.image, row.kept[j] if j < len(row.kept) else []))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{sample.question}\n→ {sample.answer}", fontsize=6)
            if j == 0:
                ax.set_ylabel(f"{row.method}\n{row.budget}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dimmed(image: np.ndarray, kept: list[int], patch: int = 8) -> np.ndarray:
    """(H, W, 3) uint8 with every patch not in `kept` (raster indices on the patch grid) darkened."""
    side = image.shape[0] // patch
    mask = np.zeros(side * side, dtype=bool)
    mask[[k for k in kept if k < side * side]] = True
    mask = mask.reshape(side, side).repeat(patch, 0).repeat(patch, 1)
    out = image.astype(np.float32)
    out[~mask] *= 0.2
    return out.astype(np.uint8)
