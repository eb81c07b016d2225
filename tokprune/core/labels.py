"""`labels=` on a pruned forward: the loss over the tokens that are left.

A pruned forward returns logits for the kept tokens only (B, L'), re-packed with left padding, while the
caller's labels cover the prompt (B, L). The top model's forward would compare the two and fail, so the
labels are taken out of its call and the loss is computed afterwards, with the model's own
`loss_function`, on the labels of the kept tokens in their new slots (-100 in padding slots). Each logit
then predicts the label of the next *kept* token: text after an image is predicted from the image's last
kept token, which is what the pruned model does. Labels at dropped positions (visual tokens, usually
-100) drop out. A forward that prunes nothing gets its labels back unchanged, so its loss is
bit-identical to the unpatched model's. `shift_labels` (already shifted targets) cannot follow a
compaction and is refused when one happened.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from tokprune.errors import UnsupportedInputError

IGNORE = -100  # transformers' ignore_index


def compact_labels(labels: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """labels (B, L) of the forward's input -> (B, L') labels of the compacted sequence.

    origin: (B, L') input position of every slot, -1 for padding slots (they get -100)."""
    gathered = labels.gather(1, origin.clamp(min=0).to(labels.device))
    return gathered.masked_fill(origin.to(labels.device) < 0, IGNORE)


class LabelHooks:
    """Hooks on the top model (the one with the LM head) that move the loss after the pruning.

    `origin()` returns the token origins (B, L') of the forward that just ran, or None when it compacted
    nothing (the engine's view of the last prefill).
    """

    def __init__(self, model: nn.Module, origin) -> None:
        self.model, self.origin = model, origin
        self._labels: torch.Tensor | None = None
        self._own_parameters = set(inspect.signature(type(model).forward).parameters)
        self.handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True),
        ]

    def _before(self, module, args, kwargs):
        self._labels = kwargs.get("labels")
        if self._labels is None:
            return None
        kwargs["labels"] = None
        return args, kwargs

    def _after(self, module, args, kwargs, output):
        labels, self._labels = self._labels, None
        if labels is None:
            return None
        origin = self.origin()
        if origin is not None:
            if kwargs.get("shift_labels") is not None:
                raise UnsupportedInputError(
                    "shift_labels cannot follow the pruning of the sequence; pass labels (unshifted) instead"
                )
            labels = compact_labels(labels, origin)
        logits = output["logits"] if not isinstance(output, tuple) else output[0]
        extra = {k: v for k, v in kwargs.items() if k not in self._own_parameters}
        vocab = self.model.config.get_text_config().vocab_size
        loss = self.model.loss_function(logits=logits, labels=labels, vocab_size=vocab, **extra)
        if isinstance(output, tuple):
            return (loss, *output)
        return type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
