"""A user's own method: one that follows the documented contract runs; one that returns bare indices from
`select` (what an old doc said) is refused with a message naming `Selection`."""

from dataclasses import dataclass

import pytest
import torch
from tiny_models import BUILDERS, batch_inputs

import tokprune
from tokprune.core.budget import Budget
from tokprune.methods import ImageTokens, Method, Selection
from tokprune.methods.base import topk_sorted


@dataclass
class NormPrune(Method):
    """Keeps the k tokens of largest embedding norm."""

    name = "norm_prune_test"
    family = "test"
    default_budget = Budget(tokens=4)
    paper = "-"

    def select(self, image: ImageTokens, k: int) -> Selection:
        return Selection(keep=topk_sorted(image.embeds.norm(dim=-1), k))


@dataclass
class BareIndices(NormPrune):
    name = "bare_indices_test"

    def select(self, image: ImageTokens, k: int):
        return topk_sorted(image.embeds.norm(dim=-1), k)


@pytest.fixture(scope="module")
def llava():
    model, proc = BUILDERS["llava"]("sdpa")
    return model, batch_inputs("llava", proc)


def test_a_custom_method_object_runs(llava):
    model, inputs = llava
    with tokprune.apply(model, NormPrune(), budget=4) as pruner, torch.no_grad():
        model(**inputs)
    assert pruner.stats.visual_kept == [4, 4]


def test_select_returning_bare_indices_is_refused_naming_selection(llava):
    model, inputs = llava
    with (
        tokprune.apply(model, BareIndices(), budget=4),
        torch.no_grad(),
        pytest.raises(
            TypeError, match=r"select\(\) returned Tensor; it must return a tokprune.methods.Selection"
        ),
    ):
        model(**inputs)
