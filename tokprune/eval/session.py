"""The model side of the lmms-eval plugin, free of lmms-eval types: one model + processor + pruning
configuration that generates answers and scores continuations, and measures each request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import tokprune
from tokprune.core.compat import CACHE_KWARG, output_cache
from tokprune.eval.args import RunArgs
from tokprune.eval.measure import FirstTokenClock, RowReport, row_reports, synchronize
from tokprune.eval.prompting import Turn, render

DEFAULT_MAX_NEW_TOKENS = 32


@dataclass
class GenSettings:
    """Decoding settings of one generate() call, from a task's generation_kwargs.

    until: stop strings; the text is cut at the first one (after decoding).
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1
    until: list[str] = field(default_factory=list)

    @classmethod
    def from_kwargs(cls, gen_kwargs: dict | None, max_new_tokens: int | None = None) -> GenSettings:
        """Settings from lmms-eval generation_kwargs; `max_new_tokens` (the model arg) overrides the task's."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.get("until") or []
        return cls(
            max_new_tokens=int(max_new_tokens or kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
            temperature=float(kwargs.get("temperature") or 0.0),
            top_p=kwargs.get("top_p"),
            num_beams=int(kwargs.get("num_beams") or 1),
            until=[until] if isinstance(until, str) else list(until),
        )

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate` (greedy unless temperature > 0)."""
        out: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}
        if self.temperature > 0:
            out.update(do_sample=True, temperature=self.temperature)
            if self.top_p is not None:
                out["top_p"] = float(self.top_p)
        else:
            out["do_sample"] = False
        return out

    def cut(self, text: str) -> str:
        """`text` up to the first stop string."""
        for stop in self.until:
            if stop and stop in text:
                text = text[: text.index(stop)]
        return text.strip()


@dataclass
class Answer:
    """One generated answer and its measurements."""

    text: str
    report: RowReport


@dataclass
class Score:
    """A continuation's loss (negative log-likelihood, summed over its tokens), whether greedy decoding
    would produce it, and the prefill's measurements."""

    loss: float
    is_greedy: bool
    report: RowReport


class EvalSession:
    """A model, its processor and a pruning configuration (`RunArgs`), ready to answer requests.

    The pruner is installed only while a batch of requests runs (`pruning()`), so the model is left
    unpatched in between; `validate()` applies and removes it once to surface bad arguments early.
    """

    def __init__(self, model: nn.Module, processor: Any, args: RunArgs) -> None:
        self.model = model
        self.processor = processor
        self.args = args
        self.tokenizer = getattr(processor, "tokenizer", processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def validate(self) -> None:
        """Raise tokprune's error now for an unknown method, a bad option, budget or model class."""
        with self.pruning():
            pass

    @contextmanager
    def pruning(self) -> Iterator[tokprune.Pruner | None]:
        """The configured pruner installed on the model for the duration of the block (None = unpruned)."""
        prune = self.args.prune
        if not prune.pruned:
            yield None
            return
        pruner = tokprune.apply(self.model, prune.method_arg(), **prune.apply_kwargs())
        try:
            yield pruner
        finally:
            pruner.remove()

    def encode(self, conversations: list[list[Turn]]) -> dict[str, torch.Tensor]:
        """Processor outputs for a batch of conversations (left padded, on the model's device)."""
        prompts, images = [], []
        for turns in conversations:
            prompt, row_images = render(self.processor, turns)
            prompts.append(prompt)
            images += row_images
        inputs = self.processor(text=prompts, images=images or None, return_tensors="pt", padding=True)
        inputs = {key: value.to(self.device) for key, value in inputs.items() if torch.is_tensor(value)}
        dtype = next(self.model.parameters()).dtype
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return inputs

    def eos_ids(self) -> set[int]:
        """Token ids that end a generation."""
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos = self.tokenizer.eos_token_id if eos is None else eos
        return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}

    def generated_length(self, ids: torch.Tensor) -> int:
        """New tokens of one row up to and including the first end-of-sequence token."""
        eos = self.eos_ids()
        for i, token in enumerate(ids.tolist()):
            if token in eos:
                return i + 1
        return int(ids.numel())

    @torch.no_grad()
    def generate(self, conversations: list[list[Turn]], settings: GenSettings, pruner) -> list[Answer]:
        """Answers for one batch of conversations, generated with `pruner` (from `pruning()`) active."""
        inputs = self.encode(conversations)
        clock = FirstTokenClock()
        before = pruner.stats if pruner is not None else None
        synchronize(self.device)
        start = time.perf_counter()
        out = self.model.generate(
            **inputs,
            **settings.generate_kwargs(),
            logits_processor=[clock],
            pad_token_id=self.tokenizer.pad_token_id,
        )
        synchronize(self.device)
        elapsed = time.perf_counter() - start
        new = out[:, inputs["input_ids"].shape[1] :]
        lengths = [self.generated_length(row) for row in new]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        fresh = pruner if pruner is not None and pruner.stats is not before else None
        reports = row_reports(
            self.model, inputs, fresh, ttft_s=clock.ttft(start), elapsed_s=elapsed, output_tokens=lengths
        )
        return [Answer(settings.cut(text), report) for text, report in zip(texts, reports)]

    @torch.no_grad()
    def score(self, turns: list[Turn], continuation: str, pruner) -> Score:
        """Loss of `continuation` after the prompt: the prompt is prefilled (and pruned) alone, then the
        continuation's tokens are fed one decode step at a time, as generation would see them."""
        context = self.encode([turns])
        prompt_text, images = render(self.processor, turns)
        full = self.processor(text=[prompt_text + continuation], images=images or None, return_tensors="pt")
        n_cont = full["input_ids"].shape[1] - context["input_ids"].shape[1]
        if n_cont <= 0:
            raise ValueError(f"the continuation {continuation!r} adds no token to the prompt")
        cont = full["input_ids"][0, -n_cont:].to(self.device)
        context["input_ids"] = full["input_ids"][:, :-n_cont].to(self.device)
        before = pruner.stats if pruner is not None else None
        start = time.perf_counter()
        logits, ttft = self._continuation_logits(context, cont)
        synchronize(self.device)
        elapsed = time.perf_counter() - start
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        loss = -float(logprobs.gather(1, cont[:, None]).sum())
        greedy = bool((logits.argmax(-1) == cont).all())
        fresh = pruner if pruner is not None and pruner.stats is not before else None
        report = row_reports(self.model, context, fresh, ttft_s=ttft, elapsed_s=elapsed, output_tokens=[0])[0]
        return Score(loss, greedy, report)

    def _continuation_logits(self, context: dict, cont: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(logits predicting each continuation token (n, V), prefill seconds)."""
        synchronize(self.device)
        start = time.perf_counter()
        out = self.model(**context, use_cache=True, logits_to_keep=1)
        synchronize(self.device)
        ttft = time.perf_counter() - start
        logits, past, mask = [out.logits[0, -1]], output_cache(out), context["attention_mask"]
        for token in cont[:-1]:
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            out = self.model(
                input_ids=token.view(1, 1), attention_mask=mask, use_cache=True, **{CACHE_KWARG: past}
            )
            logits.append(out.logits[0, -1])
            past = output_cache(out)
        return torch.stack(logits), ttft
