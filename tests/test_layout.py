"""The order of a forward's visual items (images and videos) in the sequence, on hand-made masks."""

from __future__ import annotations

import pytest
import torch

from tokprune.core.layout import sequence_order
from tokprune.errors import UnsupportedInputError

# I = image placeholder, V = video placeholder, . = text
ROWS = ["..VVVV.II.", "III.VV...."]


def _masks(rows: list[str]) -> dict[str, torch.Tensor]:
    codes = torch.tensor([[ord(c) for c in row] for row in rows])
    return {"image": codes == ord("I"), "video": codes == ord("V")}


def test_items_follow_the_sequence_row_by_row():
    # images scatter as [2 (row 0), 3 (row 1)], videos as [4 (row 0), 2 (row 1)]
    items = sequence_order(_masks(ROWS), {"image": [2, 3], "video": [4, 2]})
    assert items == [("video", 0), ("image", 0), ("image", 1), ("video", 1)]


def test_text_may_separate_the_tokens_of_one_item():
    # Qwen3-VL puts a timestamp between the frames of a clip
    items = sequence_order(_masks(["VV..VV.II"]), {"image": [2], "video": [4]})
    assert items == [("video", 0), ("image", 0)]


def test_kinds_without_items_are_ignored():
    assert sequence_order(_masks(["..II.VV"]), {"image": [2], "video": []}) == [("image", 0)]
    assert sequence_order(_masks(["...."]), {"image": []}) == []


@pytest.mark.parametrize(
    "rows, counts, message",
    [
        (["IIVI"], {"image": [3], "video": [1]}, "interleaved"),  # a video inside an image
        (["..II", "II.."], {"image": [4]}, "one row"),  # an image cut by the row end
        (["IIII"], {"image": [2]}, "more image tokens"),
        (["II.."], {"image": [2, 2]}, "fewer image tokens"),
    ],
)
def test_inconsistent_prompts_are_refused(rows, counts, message):
    with pytest.raises(UnsupportedInputError, match=message):
        sequence_order(_masks(rows), counts)
