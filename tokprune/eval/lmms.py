"""lmms-eval model classes for `--model tokprune`: any supported HF VLM, pruned by any tokprune method.

    lmms-eval --model tokprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,device_map=auto,dtype=bfloat16,method=divprune,keep_ratio=0.25 \\
        --tasks tokprune_toyvqa

`TokpruneChat` (what `--model tokprune` resolves to) takes lmms-eval's chat requests; `TokpruneSimple`
(`--force_simple`) takes plain-context requests and is the one that can run loglikelihood and
multiple-choice tasks. Both accept an already built model: `TokpruneSimple(model=m, processor=p, ...)`
for `lmms_eval.evaluator.simple_evaluate(model=<instance>)`. What the model_args mean:
`tokprune.eval.args`; what the throughput numbers mean: `tokprune.eval.measure`.

Built from a model_args string (the CLI, `simple_evaluate(model="tokprune", model_args=...)`), a model
that cannot be built raises `ModelSetupExit`, a SystemExit: lmms-eval's CLI catches every Exception of
an evaluation, logs it and exits 0, so an ordinary exception would let a run with a typo in its
model_args "succeed". The CLI then exits with status 1 and the message.
"""

from __future__ import annotations

import gc
import traceback
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.utils import simple_parse_args_string
from torch import nn
from tqdm import tqdm

from tokprune.errors import TokpruneError
from tokprune.eval.args import ModelArgsError, RunArgs, run_args
from tokprune.eval.loading import configure, load_model, prepare, resolve_device
from tokprune.eval.measure import RowReport
from tokprune.eval.prompting import Turn, turns_from_context, turns_from_messages
from tokprune.eval.session import Answer, EvalSession, GenSettings

MAX_ROUNDS = 100


class ModelSetupExit(SystemExit):
    """The tokprune model could not be built from its model_args string (the cause is chained). A
    SystemExit, so that lmms-eval's CLI, which catches every Exception, exits non-zero."""


def setup_exit(error: Exception) -> ModelSetupExit:
    """The SystemExit for a construction error; tokprune's own errors are a message, others keep their
    traceback (printed to stderr)."""
    if not isinstance(error, TokpruneError):
        traceback.print_exception(error)
    return ModelSetupExit(f"tokprune: cannot build the model from --model_args: {error}")


def log_report(report: RowReport) -> None:
    """Record one request in lmms-eval's throughput history (summarised into results["throughput"]):
    its latency as lmms-eval's elapsed time, the rest as additional metrics (`tokprune.eval.measure`)."""
    speed = report.output_tokens / report.latency_s if report.latency_s > 0 else 0.0
    log_metrics(report.latency_s, report.output_tokens, speed, additional_metrics=report.throughput_entry())


def token_counts(reports: list[RowReport]) -> TokenCounts:
    """lmms-eval's per-request token counts (summarised into results["efficiency"])."""
    return TokenCounts(
        input_tokens=sum(r.llm_input_tokens for r in reports),
        output_tokens=sum(r.output_tokens for r in reports),
    )


class TokpruneSimple(lmms):
    """lmms-eval model `tokprune` (simple requests): a HF VLM, pruned by a tokprune method.

    Keyword arguments are the `--model_args` (`tokprune.eval.args`): loading keys (pretrained, revision,
    device, device_map, dtype / torch_dtype, attn_implementation, trust_remote_code, min_pixels,
    max_pixels), run keys (batch_size, max_new_tokens), pruning keys (method, budget, keep_ratio,
    video_budget, order, positions); any other key is a method option (`<method>.<option>` for one
    method of a composition). All are checked before the checkpoint is loaded.
    model / processor: an already built model (then `pretrained` and the checkpoint-only keys must be
    omitted). It stays on its device, dtype and attention backend unless `device`, `dtype` or
    `attn_implementation` is given: those are applied to it in place.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model: nn.Module | None = None,
        processor: Any = None,
        **model_args: Any,
    ) -> None:
        super().__init__()
        self.run_args: RunArgs = run_args(pretrained=pretrained, **model_args)
        self._owns_model = model is None
        model, processor, device = self._model_and_processor(model, processor)
        model = prepare(model, processor, device)
        self.session: EvalSession | None = EvalSession(model, processor, self.run_args)
        self.session.validate()

    def _model_and_processor(
        self, model: nn.Module | None, processor: Any
    ) -> tuple[nn.Module, Any, torch.device | None]:
        """(model, processor, the device to move it to or None) from the loading arguments."""
        load = self.run_args.load
        if model is None:
            device = None if load.device_map is not None else resolve_device(load.device)
            return (*load_model(load), device)
        if load.pretrained is not None:
            raise ModelArgsError("give either pretrained= or a built model=, not both")
        if processor is None:
            raise ModelArgsError("a built model= needs its processor= as well")
        refused = load.checkpoint_only()
        if refused:
            raise ModelArgsError(
                f"{', '.join(refused)} apply when loading a checkpoint (pretrained=); a built model= is used as "
                "it is (device, dtype and attn_implementation, when given, are applied to it)"
            )
        device = resolve_device(load.device) if load.device is not None else None
        return configure(model, load.dtype, load.attn_implementation), processor, device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> TokpruneSimple:
        """Build from `--model_args`; the CLI's own --batch_size/--device apply only where model_args
        do not set them (lmms-eval's default would pass both and fail on the duplicate). Any error is
        raised as `ModelSetupExit` (see the module docstring)."""
        args = simple_parse_args_string(arg_string)
        for key, value in (additional_config or {}).items():
            if value is not None and key not in args:
                args[key] = value
        try:
            return cls(**args)
        except Exception as error:
            raise setup_exit(error) from error

    # ------------------------------------------------------------------ helpers
    @property
    def batch_size(self) -> int:
        return self.run_args.batch_size

    def _session(self) -> EvalSession:
        if self.session is None:
            raise RuntimeError("this tokprune model was released by lmms-eval's clean(); build a new one")
        return self.session

    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _turns(self, request: Instance) -> list[Turn]:
        """The conversation of a simple generate_until request (its images loaded now)."""
        context, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else None
        return turns_from_context(context, visuals)

    @staticmethod
    def _gen_kwargs(request: Instance) -> dict:
        return request.args[1]

    def _batches(self, requests: list[Instance]) -> list[list[int]]:
        """Indices of consecutive requests with equal generation_kwargs, at most batch_size at a time."""
        batches: list[list[int]] = []
        for index, request in enumerate(requests):
            last = batches[-1] if batches else None
            if (
                last is None
                or len(last) >= self.batch_size
                or self._gen_kwargs(requests[last[0]]) != self._gen_kwargs(request)
            ):
                batches.append([])
            batches[-1].append(index)
        return batches

    def _answer(self, conversations: list[list[Turn]], gen_kwargs: dict, pruner) -> list[Answer]:
        settings = GenSettings.from_kwargs(gen_kwargs, self.run_args.max_new_tokens)
        answers = self._session().generate(conversations, settings, pruner)
        for answer in answers:
            log_report(answer.report)
        return answers

    # ------------------------------------------------------------------ lmms-eval interface
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """One answer per request, batched by `batch_size`, with the token counts of each."""
        results: list[GenerationResult | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="tokprune generate")
        with self._session().pruning() as pruner:
            for batch in self._batches(requests):
                conversations = [self._turns(requests[i]) for i in batch]
                answers = self._answer(conversations, self._gen_kwargs(requests[batch[0]]), pruner)
                for index, answer in zip(batch, answers):
                    results[index] = GenerationResult(answer.text, token_counts([answer.report]))
                progress.update(len(batch))
        progress.close()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request GenerationResult(text=(loss, is_greedy)): loss = the continuation's summed negative
        log-likelihood (lmms-eval's multiple choice takes the argmin). The tuple is wrapped because
        lmms-eval stringifies bare tuples."""
        session, results = self._session(), []
        with session.pruning() as pruner:
            for request in tqdm(requests, disable=self.rank != 0, desc="tokprune loglikelihood"):
                context, target, doc_to_visual, doc_id, task, split = request.args
                doc = self._doc(task, split, doc_id)
                continuation = target if isinstance(target, str) else target(doc)
                visuals = doc_to_visual(doc) if doc_to_visual is not None else None
                score = session.score(turns_from_context(context, visuals), str(continuation), pruner)
                log_report(score.report)
                results.append(GenerationResult((score.loss, score.is_greedy), token_counts([score.report])))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request the list of round answers; each round is a fresh (pruned) prefill of the
        conversation the task's doc_to_text returns for it."""
        results = []
        with self._session().pruning() as pruner:
            for request in tqdm(requests, disable=self.rank != 0, desc="tokprune multi-round"):
                results.append(self._rounds(request, pruner))
        return results

    def _rounds(self, request: Instance, pruner) -> GenerationResult:
        context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
        doc = self._doc(task, split, doc_id)
        turns = turns_from_context(context, doc_to_visual(doc) if doc_to_visual is not None else None)
        outputs: list[str] = []
        reports: list[RowReport] = []
        info = None
        for round_idx in range(MAX_ROUNDS + 1):
            if round_idx:
                visuals, text, terminal, updated, info = doc_to_text(
                    doc, previous_output=list(outputs), round_idx=round_idx, previous_round_info=info
                )
                outputs = list(updated) if updated is not None else outputs
                if terminal:
                    return GenerationResult(outputs, token_counts(reports))
                turns = turns_from_context(text, visuals)
            answer = self._answer([turns], gen_kwargs, pruner)[0]
            outputs.append(answer.text)
            reports.append(answer.report)
        raise RuntimeError(
            f"task {task!r} did not end its multi-round conversation after {MAX_ROUNDS} rounds"
        )

    def clean(self) -> None:
        """Called by lmms-eval after the requests: release a model this object loaded itself; a model
        passed in by the caller stays usable (and unpatched)."""
        if self._owns_model:
            self.session = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class TokpruneChat(TokpruneSimple):
    """lmms-eval model `tokprune` (chat requests: the task's doc_to_messages); generation tasks only."""

    is_simple = False

    def _turns(self, request: Instance) -> list[Turn]:
        """The conversation of a chat generate_until request (the task's doc_to_messages)."""
        _, doc_to_messages, _, doc_id, task, split = request.args
        return turns_from_messages(doc_to_messages(self._doc(task, split, doc_id)))

    @staticmethod
    def _gen_kwargs(request: Instance) -> dict:
        return request.args[2]

    def _rounds(self, request: Instance, pruner) -> GenerationResult:
        _, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
        doc = self._doc(task, split, doc_id)
        messages, outputs, reports, info = doc_to_messages(doc), [], [], None
        for round_idx in range(MAX_ROUNDS + 1):
            if round_idx:
                payload = doc_to_messages(
                    doc, round_idx=round_idx, previous_output=list(outputs), previous_round_info=info
                )
                if not (isinstance(payload, tuple) and len(payload) == 4) or payload[1]:
                    return GenerationResult(outputs, token_counts(reports))
                messages, _, _, info = payload
            answer = self._answer([turns_from_messages(messages)], gen_kwargs, pruner)[0]
            outputs.append(answer.text)
            reports.append(answer.report)
        raise RuntimeError(
            f"task {task!r} did not end its multi-round conversation after {MAX_ROUNDS} rounds"
        )
