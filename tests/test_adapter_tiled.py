"""InternVL and SmolVLM / Idefics3 adapters: pixel-shuffle replay, ViT signals against eager maps, layouts.

The invariant matrix (test_invariants.py) checks pruning end to end on these families; here the pieces
whose errors would only change *which* tokens are kept: the pooling groups, the signals, the image rule.
"""

import pytest
import torch
from tiny_internvl import tiny_internvl
from tiny_models import batch_inputs
from tiny_smolvlm import SMOLVLM_SPECIALS, tiny_idefics3, tiny_smolvlm
from tokprune.patches import adapter_for
from tokprune.patches.internvl import visual_runs

from tokprune.bench.synthetic import make_tokenizer
from tokprune.core.layout import VisionSignalStore
from tokprune.errors import UnsupportedInputError

SIGNALS = {"cls_attention", "received_attention", "vit_keys"}


@pytest.fixture(scope="module")
def internvl():
    return tiny_internvl("eager")


@pytest.fixture(scope="module")
def smolvlm():
    return tiny_smolvlm("eager")


def _vision_signals(model, names: set[str], **kwargs) -> dict[str, torch.Tensor]:
    """The adapter's vision hooks for `names`, run once through get_image_features and removed."""
    store = VisionSignalStore()
    handles = adapter_for(model).install_vision_hooks(names, store)
    try:
        with torch.no_grad():
            model.model.get_image_features(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return store.values


def _pooled(value: torch.Tensor, side: int, scale: int) -> torch.Tensor:
    """(n, side * side[, d]) per patch, row-major -> (n * G[, d]): mean over scale x scale blocks, the
    blocks in row-major order (what a pixel shuffle merges, written out by hand)."""
    n, rest = value.shape[0], value.shape[2:]
    grid = value.reshape(n, side // scale, scale, side // scale, scale, *rest)
    return grid.float().mean(dim=(2, 4)).reshape(n * (side // scale) ** 2, *rest)


def _keys_spy(k_proj, store: list):
    return k_proj.register_forward_hook(lambda module, args, output: store.append(output))


# ------------------------------------------------------------------------------------------ InternVL
def test_internvl_merge_groups_follow_the_models_pixel_shuffle(internvl):
    model, _ = internvl
    adapter = adapter_for(model)
    groups = adapter.merge_groups(8)  # (16, 4)
    features = torch.randn(1, 8, 8, 5)
    shuffled = model.model.pixel_shuffle(features, scale_factor=0.5).reshape(16, 4, 5)  # (G, r, C)
    assert torch.equal(shuffled, features.reshape(64, 5)[groups])
    rows, cols = groups // 8, groups % 8  # every LLM token = one 2x2 block, blocks in raster order
    token = torch.arange(16)
    assert torch.equal(rows.min(1).values, 2 * (token // 4)) and torch.equal(
        rows.max(1).values, 2 * (token // 4) + 1
    )
    assert torch.equal(cols.min(1).values, 2 * (token % 4)) and torch.equal(
        cols.max(1).values, 2 * (token % 4) + 1
    )


def test_internvl_signals_match_eager_maps_pooled(internvl):
    model, proc = internvl
    pixel_values = batch_inputs("internvl", proc, (1, 2))["pixel_values"]  # 5 tiles
    tower = model.model.vision_tower
    layer = adapter_for(model).score_layer
    assert (
        layer == len(tower.encoder.layer) - 1
    )  # vision_feature_layer=-1: the last layer feeds the projector
    keys_out = []
    spy = _keys_spy(tower.encoder.layer[layer].attention.k_norm, keys_out)
    try:
        with torch.no_grad():
            attn = tower(pixel_values=pixel_values, output_attentions=True).attentions[
                layer
            ]  # (n, H, 65, 65)
    finally:
        spy.remove()
    values = _vision_signals(model, SIGNALS, pixel_values=pixel_values)
    n, heads, length, _ = attn.shape
    torch.testing.assert_close(
        values["cls_attention"], _pooled(attn[:, :, 0, 1:].mean(1), 8, 2), atol=1e-6, rtol=0
    )
    received = attn.mean(dim=(1, 2))[:, 1:]
    torch.testing.assert_close(values["received_attention"], _pooled(received, 8, 2), atol=1e-6, rtol=0)
    keys = keys_out[0].view(n, length, heads, -1).mean(2)[:, 1:]  # after qk-norm, head mean, [CLS] dropped
    torch.testing.assert_close(values["vit_keys"], _pooled(keys, 8, 2), atol=1e-5, rtol=0)
    assert values["cls_attention"].shape == (n * 16,)


def test_internvl_layout_tiles_and_thumbnail(internvl):
    model, proc = internvl
    inputs = batch_inputs("internvl", proc, (1, 2))  # images of 1 tile, 2 tiles + thumbnail, 1 tile
    layout = adapter_for(model).image_layout(inputs)
    assert layout.counts == [16, 48, 16]
    assert layout.grids == [(4, 4), None, (4, 4)]
    assert layout.units[0] is None and layout.units[2] is None
    units = layout.units[1]
    assert [u.kind for u in units] == ["tile", "tile", "base"] and all(u.grid == (4, 4) for u in units)
    assert torch.equal(torch.cat([u.index for u in units]), torch.arange(48))


def test_internvl_layout_rejects_prompts_that_do_not_match_the_tiles(internvl):
    model, proc = internvl
    inputs = batch_inputs("internvl", proc, (1, 2))
    adapter = adapter_for(model)
    fewer = dict(inputs, pixel_values=inputs["pixel_values"][:-1])
    with pytest.raises(UnsupportedInputError, match="tiles give"):
        adapter.image_layout(fewer)
    ids = inputs["input_ids"].clone()
    ids[1, (ids[1] == model.config.image_token_id).nonzero()[0, 0]] = 5  # a run of 15: not whole tiles
    with pytest.raises(UnsupportedInputError, match="multiple of 16"):
        adapter.image_layout(dict(inputs, input_ids=ids))


def test_visual_runs_row_by_row():
    visual = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert visual_runs(visual) == [(0, 1, 2), (0, 4, 1), (1, 0, 3)]


# ------------------------------------------------------------------------------- SmolVLM / Idefics3
def test_smolvlm_merge_groups_follow_the_connectors_pixel_shuffle(smolvlm):
    model, _ = smolvlm
    groups = adapter_for(model).merge_groups(64)  # (16, 4)
    features = torch.randn(2, 64, 3)
    shuffled = model.model.connector.pixel_shuffle(features, 2).reshape(2, 16, 4, 3)
    assert torch.equal(shuffled, features[:, groups])
    values = torch.arange(64.0).view(1, 64)  # pooling by the groups = 2x2 block means in raster order
    from tokprune.patches.internvl import pool_groups

    assert torch.equal(pool_groups(values, groups), _pooled(values, 8, 2))


def test_smolvlm_signals_match_eager_maps_pooled(smolvlm):
    """No [CLS]: cls_attention = attention received; frames of padded batch slots are not encoded."""
    model, proc = smolvlm
    inputs = batch_inputs("smolvlm", proc, (1, 2))  # 5 + 3 + 5 frames in slots of 8 per row
    adapter = adapter_for(model)
    assert adapter.language_model is model.model.text_model
    pixels = {k: inputs[k] for k in ("pixel_values", "pixel_attention_mask")}
    tower = model.model.vision_model
    layer = adapter.score_layer
    keys_out = []
    spy = _keys_spy(tower.encoder.layers[layer].self_attn.k_proj, keys_out)
    try:
        with torch.no_grad():
            real = inputs["pixel_values"].flatten(0, 1).flatten(1).ne(0).any(1)
            frames = inputs["pixel_values"].flatten(0, 1)[real]
            attn = tower(pixel_values=frames, output_attentions=True).attentions[layer]  # (13, H, 64, 64)
    finally:
        spy.remove()
    values = _vision_signals(model, SIGNALS, **pixels)
    n, heads, length, _ = attn.shape
    assert n == 13
    received = _pooled(attn.mean(dim=(1, 2)), 8, 2)
    torch.testing.assert_close(values["cls_attention"], received, atol=1e-6, rtol=0)
    torch.testing.assert_close(values["received_attention"], received, atol=1e-6, rtol=0)
    keys = keys_out[0].view(n, length, heads, -1).mean(2)
    torch.testing.assert_close(values["vit_keys"], _pooled(keys, 8, 2), atol=1e-5, rtol=0)


def test_smolvlm_padding_patches_receive_nothing(smolvlm):
    """A frame partly padded (pixel_attention_mask): attention received among its real patches only."""
    model, proc = smolvlm
    pixel_values = batch_inputs("smolvlm", proc, (1, 0))["pixel_values"][
        :1, :2
    ].clone()  # (1, 2, 3, 112, 112)
    mask = torch.ones(1, 2, 112, 112, dtype=torch.long)
    mask[0, 1, :, 56:] = 0  # the right half of frame 1 is padding
    pixel_values[0, 1, :, :, 56:] = 0
    values = _vision_signals(
        model, {"received_attention"}, pixel_values=pixel_values, pixel_attention_mask=mask
    )
    patch_mask = mask[0, :, ::14, ::14].reshape(2, 64).bool()
    with torch.no_grad():
        attn = model.model.vision_model(
            pixel_values=pixel_values[0],
            patch_attention_mask=patch_mask.view(2, 8, 8),
            output_attentions=True,
        ).attentions[adapter_for(model).score_layer]
    expected = torch.zeros(2, 64)
    for frame in range(2):
        real = patch_mask[frame]
        expected[frame, real] = attn[frame][:, real][:, :, real].mean(dim=(0, 1))
    assert bool((expected[1, ~patch_mask[1]] == 0).all())
    torch.testing.assert_close(values["received_attention"], _pooled(expected, 8, 2), atol=1e-6, rtol=0)


def test_smolvlm_layout_groups_frames_into_images(smolvlm):
    model, proc = smolvlm
    inputs = batch_inputs("smolvlm", proc, (1, 2))  # 2x2 tiles + global, 1x2 + global, 2x2 + global
    layout = adapter_for(model).image_layout(inputs)
    assert layout.counts == [80, 48, 80]
    assert layout.grids == [None, None, None]
    kinds = [[u.kind for u in units] for units in layout.units]
    assert kinds == [["tile"] * 4 + ["base"], ["tile"] * 2 + ["base"], ["tile"] * 4 + ["base"]]
    assert all(torch.equal(u.index, torch.arange(16 * i, 16 * i + 16)) for i, u in enumerate(layout.units[1]))
    # a text-only row beside an image row: its all-zero frame slots are not images
    inputs = batch_inputs("smolvlm", proc, (0, 1))
    assert adapter_for(model).image_layout(inputs).counts == [80]


def test_smolvlm_layout_one_frame_images_and_video_frames(smolvlm):
    """Frames that are each a global view (unsplit images, video frames) are images of one frame."""
    model, _ = smolvlm
    tok = make_tokenizer(SMOLVLM_SPECIALS)
    fake, glob, image = (
        tok.convert_tokens_to_ids(t) for t in ("<fake_token_around_image>", "<global-img>", "<image>")
    )
    frame = [fake, glob] + [image] * 16 + [fake]
    tile = [fake, tok.convert_tokens_to_ids("<row_1_col_1>")] + [image] * 16
    ids = torch.tensor([[5] + frame + [6] + frame + [7], [5] + tile + frame + [7] * 3])
    layout = adapter_for(model).layout_from_ids(ids, 4)
    assert layout.counts == [16, 16, 32]
    assert layout.units[:2] == [None, None] and [u.kind for u in layout.units[2]] == ["tile", "base"]


def test_smolvlm_layout_rejects_prompts_that_do_not_match_the_frames(smolvlm):
    model, proc = smolvlm
    inputs = batch_inputs("smolvlm", proc, (1, 2))
    adapter = adapter_for(model)
    pixel_values = inputs["pixel_values"].clone()
    pixel_values[1, 2] = 0  # one real frame fewer
    with pytest.raises(UnsupportedInputError, match="real frames give"):
        adapter.image_layout(dict(inputs, pixel_values=pixel_values))
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == model.config.image_token_id).nonzero()[0, 0]] = 5
    with pytest.raises(UnsupportedInputError, match="multiple of 16"):
        adapter.image_layout(dict(inputs, input_ids=ids))


def test_idefics3_shares_the_adapter_and_finds_its_text_model():
    model, proc = tiny_idefics3("sdpa")
    adapter = adapter_for(model)
    assert type(adapter).__name__ == "SmolVLMAdapter"
    assert adapter.language_model is model.model.text_model
    assert adapter.decoder_layers is model.model.text_model.layers
    layout = adapter.image_layout(batch_inputs("idefics3", proc, (1, 2)))  # unsplit: one global frame each
    assert layout.counts == [16, 16, 16] and layout.grids == [(4, 4)] * 3 and layout.units == [None] * 3
