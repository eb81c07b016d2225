"""`tokprune demo`: accuracy against kept tokens for every method, on held-out questions of the toy task.

For each setting (the unpruned model, then every method at every budget) the demo answers the same
held-out questions and records accuracy, the visual tokens entering the LLM and their layer average, the
analytic prefill FLOPs (`tokprune.flops`, for every model family it supports) and the measured prefill
time. `tokprune.toy.report` prints the table and writes it (markdown, JSON), a plot of accuracy against
kept tokens (one line per method) and a picture of which tokens each method kept over a few questions'
images.

On the toy model a question is answered by the argmax of the next-token logits after "ASSISTANT:" (one
prefill, the answers are single words). On a real model (`--model <HF id or path>`) the question goes
through the processor's chat template and the first word of a short greedy answer is compared; its
prefill time is the time to the first token (`eval.measure.FirstTokenClock`), not the whole generate().
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

import tokprune
from tokprune.eval.measure import FirstTokenClock, synchronize, visual_counts
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
    flops: float = 0.0  # mean analytic prefill FLOPs per question (scoring included); 0 = no FLOPs model
    seconds: float = 0.0  # measured prefill time, all questions
    # kept visual indices (the row's visual-token order) of the first N_PICTURES questions
    kept: list[list[int]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


class ToyAnswerer:
    """Answers toy questions with one batched prefill (argmax over the vocabulary after 'ASSISTANT:')."""

    def __init__(self, model, processor) -> None:
        self.model, self.processor = model, processor

    def inputs(self, samples: list[Sample]) -> dict:
        """The processor's outputs for the samples (left padded), pixel values in the model's dtype."""
        from tokprune.toy.train import encode

        batch = encode(self.processor, samples, self.model.device)
        batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        return batch

    def logits(self, inputs: dict) -> torch.Tensor:
        """(B, V) float32 next-token logits after each prompt's 'ASSISTANT:' (one prefill)."""
        return self.model(**inputs, logits_to_keep=1).logits[:, -1].float()

    def answer(self, inputs: dict) -> tuple[list[str], float]:
        """(one vocabulary word per row, prefill seconds)."""
        synchronize(self.model.device)
        start = time.perf_counter()
        logits = self.logits(inputs)
        synchronize(self.model.device)
        seconds = time.perf_counter() - start
        return self.processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist()), seconds


class ChatAnswerer:
    """Answers with a real model: chat template, a short greedy answer, its first word."""

    def __init__(self, model, processor, max_new_tokens: int = 4) -> None:
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens

    def inputs(self, samples: list[Sample]) -> dict:
        """The processor's outputs for the samples' chat prompts (left padded), floats in the model's dtype."""
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
        dtype = self.model.dtype
        return {
            k: v.to(self.model.device, dtype) if v.is_floating_point() else v.to(self.model.device)
            for k, v in batch.items()
            if torch.is_tensor(v)
        }

    def answer(self, inputs: dict) -> tuple[list[str], float]:
        """(first word of each row's greedy answer, lower case; prefill seconds = time to first token)."""
        clock = FirstTokenClock()
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        synchronize(self.model.device)
        start = time.perf_counter()
        out = self.model.generate(
            **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, logits_processor=[clock],
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        prefill = clock.ttft(start)
        texts = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [(t.strip().split() or [""])[0].strip(".,!?").lower() for t in texts], prefill


def run_settings(
    answerer,
    samples: list[Sample],
    settings: list[tuple[str | None, dict]],
    batch_size: int = 50,
    progress=None,
) -> list[DemoRow]:
    """Run every (method or None, budget kwargs) setting over the samples; the unpruned row first."""
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    prepared = [answerer.inputs(batch) for batch in batches]
    with torch.no_grad():
        answerer.answer(prepared[0])  # warm-up: the first forward pays one-off allocation costs
    rows = []
    for method, budget in settings:
        row = DemoRow(method=method or "unpruned", budget=budget_label(budget))
        pruner = tokprune.apply(answerer.model, method, **budget) if method else None
        try:
            for batch, inputs in zip(batches, prepared):
                _answer_batch(answerer, pruner, batch, inputs, row)
        finally:
            if pruner is not None:
                pruner.remove()
        _average(row)
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


def check_settings(model, settings: list[tuple[str | None, dict]]) -> None:
    """Install and remove every setting once: a bad budget, option or a method the model refuses
    raises tokprune's error now, before any question is answered."""
    for method, budget in settings:
        if method:
            tokprune.apply(model, method, **budget).remove()


def _answer_batch(answerer, pruner, batch: list[Sample], inputs: dict, row: DemoRow) -> None:
    from tokprune import flops

    with torch.no_grad():
        answers, seconds = answerer.answer(inputs)
    row.seconds += seconds
    row.correct += sum(a == s.answer for a, s in zip(answers, batch))
    row.total += len(batch)
    stats = pruner.stats if pruner is not None else None
    visual = visual_counts(answerer.model, inputs)
    row.visual_in += sum(visual)
    if stats is not None:
        row.visual_to_llm += sum(stats.layer_tokens[b][0] - stats.text_tokens[b] for b in range(len(batch)))
        row.visual_layer_avg += sum(stats.layer_averaged_visual(b) for b in range(len(batch)))
    else:
        row.visual_to_llm += sum(visual)
        row.visual_layer_avg += sum(visual)
    if flops.supports(answerer.model):
        signals = flops.scoring_signals(pruner) if pruner is not None else ()
        row.flops += flops.prefill_flops(
            answerer.model, inputs, stats, logits_to_keep=1, signals=signals
        ).total
    missing = N_PICTURES - len(row.kept)
    if missing > 0:  # the pictured questions may span several batches
        kept = stats.kept if stats is not None else [torch.arange(v) for v in visual]
        row.kept += [k.tolist() for k in kept[:missing]]


def _average(row: DemoRow) -> None:
    for name in ("visual_in", "visual_to_llm", "visual_layer_avg", "flops"):
        setattr(row, name, getattr(row, name) / max(1, row.total))


def budget_label(budget: dict) -> str:
    if "keep_ratio" in budget:
        return f"keep {budget['keep_ratio']:g}"
    if "budget" in budget:
        return f"{budget['budget']} tokens"
    return "all"


def token_grids(answerer, samples: list[Sample]) -> list[tuple[int, int] | None]:
    """Per sample (one image each), the (rows, cols) grid its visual tokens form in the LLM, in raster
    order, or None where they are not one plain grid (AnyRes tiles, separators, frames, other counts).
    Read from the model adapter's `ImageLayout` of the processor's outputs."""
    from tokprune.patches import adapter_for

    layout = adapter_for(answerer.model).image_layout(answerer.inputs(samples))
    if layout is None or len(layout.counts) != len(samples):
        return [None] * len(samples)
    grids = []
    for i, (count, grid) in enumerate(zip(layout.counts, layout.grids)):
        plain = layout.units_of(i) is None and layout.separators_of(i) is None
        grids.append(grid if plain and grid is not None and grid[0] * grid[1] == count else None)
    return grids
