"""The token map of a prefill: the instruction (text after the last image) stays the same tokens however many
visual tokens are pruned, prompt_length cuts it, and compaction keeps identities."""

import torch

from tokprune.core.compaction import Compaction
from tokprune.core.selection import text_after_images
from tokprune.core.state import TokenMap


def _map(prompt_length=None) -> TokenMap:
    # row 0: t v v t v v t t (two images, markers between them); row 1: padding, t v v v t t
    visual = torch.tensor([[0, 1, 1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[1] * 8, [0, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    return TokenMap.initial(visual, [2, 2, 3], valid, prompt_length)


def _origins(tokens: TokenMap) -> list[list[int]]:
    return [tokens.origin[row, p].tolist() for row, p in enumerate(text_after_images(tokens))]


def test_instruction_is_the_text_after_the_last_image():
    tokens = _map()
    assert _origins(tokens) == [[6, 7], [5, 6, 7]]
    assert tokens.instruction_start.tolist() == [6, 5]
    assert _origins(_map(prompt_length=7)) == [[6], [5, 6]]  # tokens after the prompt are not its text


def test_pruning_the_last_image_does_not_move_the_instruction():
    tokens = _map()
    keep = tokens.valid.clone()
    keep[0, 4:6] = False  # row 0 loses its whole second image: the marker at 3 is not instruction
    keep[1, 3:5] = False
    later = tokens.take(Compaction.from_keep(keep))
    assert _origins(later) == [[6, 7], [5, 6, 7]]
    assert torch.equal(later.instruction_start, tokens.instruction_start)


def test_a_row_without_images_is_all_instruction():
    visual = torch.tensor([[0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    tokens = TokenMap.initial(visual, [1], torch.ones(2, 3, dtype=torch.bool))
    assert _origins(tokens) == [[2], [0, 1, 2]]
