"""The attention signals computed without eager attention must match explicit / eager attention maps."""

from __future__ import annotations

import pytest
import torch
from tiny_models import (  # tests/ is on sys.path (conftest)
    BUILDERS,
    batch_inputs,
    tiny_llava,
    tiny_qwen2vl,
    tiny_qwen25vl,
)
from tokprune.patches import VisionSignalStore, adapter_for
from tokprune.patches.llava import clip_encoder_layers, feature_layer_index

from tokprune.signals import cls_attention, last_query_attention, received_attention
from tokprune.signals.llm import last_query_scores

TOL = 1e-6


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- explicit attention


def test_cls_attention_matches_explicit_softmax():
    B, H, N, d = 2, 3, 11, 8
    query, keys = _randn(B, H, 1, d, seed=1), _randn(B, H, N, d, seed=2)
    scale = d**-0.5
    got = cls_attention(query, keys, scale)
    assert got.shape == (B, N) and got.dtype == torch.float32
    expected = torch.zeros(B, N)
    for b in range(B):
        for h in range(H):
            logits = torch.stack([(query[b, h, 0] * keys[b, h, j]).sum() * scale for j in range(N)])
            weights = logits.exp() / logits.exp().sum()
            expected[b] += weights / H
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(B), atol=TOL, rtol=0)


def test_cls_attention_half_precision_inputs_return_float32():
    query, keys = _randn(1, 2, 1, 4, seed=3), _randn(1, 2, 5, 4, seed=4)
    got = cls_attention(query.bfloat16(), keys.bfloat16(), 0.5)
    expected = cls_attention(query.bfloat16().float(), keys.bfloat16().float(), 0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 2), (4, 1)])
def test_last_query_attention_gqa_and_key_mask(heads, kv_heads):
    B, N, d = 3, 9, 8
    query, keys = _randn(B, heads, 1, d, seed=5), _randn(B, kv_heads, N, d, seed=6)
    key_mask = torch.ones(B, N, dtype=torch.bool)
    key_mask[1, :3] = False  # left padding
    key_mask[2, :7] = False
    scale = 0.3
    got = last_query_attention(query, keys, scale, key_mask)
    groups = heads // kv_heads
    expected = torch.zeros(B, N)
    for b in range(B):
        for h in range(heads):
            k = keys[
                b, h // groups
            ]  # query head h reads key/value head h // groups (transformers' repeat_kv)
            logits = (k @ query[b, h, 0]) * scale
            logits[~key_mask[b]] = float("-inf")
            expected[b] += logits.softmax(0) / heads
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    assert (got[~key_mask] == 0).all()
    # without a mask: every key counts
    unmasked = last_query_attention(query, keys, scale)
    expected_unmasked = torch.zeros(B, N)
    for b in range(B):
        for h in range(heads):
            expected_unmasked[b] += ((keys[b, h // groups] @ query[b, h, 0]) * scale).softmax(0) / heads
    torch.testing.assert_close(unmasked, expected_unmasked, atol=TOL, rtol=0)


def _explicit_received(query, keys, scale, block_sizes):
    """Column mean of the explicit block-diagonal softmax map, over heads and the queries of each block."""
    H, N, _ = query.shape
    sizes = block_sizes or [N]
    block_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    logits = (query @ keys.transpose(-1, -2)) * scale  # (H, N, N)
    same_block = block_of[:, None] == block_of[None, :]
    probs = logits.masked_fill(~same_block, float("-inf")).softmax(-1)
    block_size = torch.tensor(sizes, dtype=torch.float32)[block_of]  # queries attending to each token
    return probs.sum(dim=(0, 1)) / (H * block_size)


@pytest.mark.parametrize("block_sizes", [None, [16], [5, 7, 3], [1, 12, 4, 9], [10, 10]])
@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 7, 16, 256])
def test_received_attention_matches_block_diagonal_map(block_sizes, chunk):
    H, d = 3, 8
    N = sum(block_sizes) if block_sizes else 16
    query, keys = _randn(H, N, d, seed=7) * 2, _randn(H, N, d, seed=8) * 2
    scale = d**-0.5
    got = received_attention(query, keys, scale, block_sizes, chunk=chunk)
    expected = _explicit_received(query, keys, scale, block_sizes)
    assert got.shape == (N,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    # each block's received attention sums to 1 (every query row of a block sums to 1 over that block)
    start = 0
    for size in block_sizes or [N]:
        torch.testing.assert_close(got[start : start + size].sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
        start += size


# ------------------------------------------------------------------------------- tiny models, eager


@pytest.fixture(scope="module")
def eager_llava():
    return tiny_llava("eager")


def _vision_signals(model, names: set[str], pixel_values: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    """The adapter's vision hooks for `names`, run once over the images and removed."""
    store = VisionSignalStore()
    handles = adapter_for(model).install_vision_hooks(names, store)
    try:
        with torch.no_grad():
            model.model.get_image_features(pixel_values=pixel_values, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return store.values


def test_llava_vision_hook_matches_eager_cls_row(eager_llava):
    model, proc = eager_llava
    pixel_values = batch_inputs("llava", proc, (1, 2))["pixel_values"]  # 3 images
    tower = model.model.vision_tower
    n_layers = len(clip_encoder_layers(tower))
    layer = feature_layer_index(model.config.vision_feature_layer, n_layers)
    with torch.no_grad():
        out = tower(pixel_values=pixel_values, output_attentions=True)
    attn = out.attentions[layer]  # (n_images, H, 1 + P, 1 + P)
    expected_cls = attn[:, :, 0, 1:].mean(1).reshape(-1)  # head-mean [CLS] row without the [CLS] column

    keys_out = []
    k_proj = clip_encoder_layers(tower)[layer].self_attn.k_proj
    spy = k_proj.register_forward_hook(lambda module, args, output: keys_out.append(output))
    try:
        values = _vision_signals(model, {"cls_attention", "vit_keys"}, pixel_values)
    finally:
        spy.remove()
    got = values["cls_attention"]
    n_images, heads, length, _ = attn.shape
    assert got.shape == (n_images * (length - 1),)
    torch.testing.assert_close(got, expected_cls, atol=1e-5, rtol=0)
    # vit_keys: the head mean of the same layer's keys, [CLS] dropped
    keys = keys_out[0].view(n_images, length, heads, -1).mean(2)[:, 1:].reshape(n_images * (length - 1), -1)
    torch.testing.assert_close(values["vit_keys"], keys, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_llava_layered_signals_match_eager_maps(eager_llava, layer):
    """ "name@i" signals at any vision layer: [CLS] row and attention received (column mean over queries)."""
    model, proc = eager_llava
    pixel_values = batch_inputs("llava", proc, (1, 2))["pixel_values"]
    tower = model.model.vision_tower
    index = layer % len(clip_encoder_layers(tower))
    with torch.no_grad():
        attn = tower(pixel_values=pixel_values, output_attentions=True).attentions[index]  # (n, H, 1+P, 1+P)
    values = _vision_signals(model, {f"cls_attention@{layer}", f"received_attention@{layer}"}, pixel_values)
    expected_cls = attn[:, :, 0, 1:].mean(1).reshape(-1)
    expected_received = attn.mean(dim=(1, 2))[:, 1:].reshape(-1)
    torch.testing.assert_close(values[f"cls_attention@{layer}"], expected_cls, atol=1e-5, rtol=0)
    torch.testing.assert_close(values[f"received_attention@{layer}"], expected_received, atol=1e-5, rtol=0)


@torch.no_grad()
def test_llava_next_signals_follow_pack_image_features():
    """LLaVA-NeXT: the per-token ViT signals, in the LLM's visual-token order, equal the eager maps of every
    tile (base view and high-resolution tiles) at the feature layer, put through the model's own
    `pack_image_features` (unpadding, row-end newlines, which get 0)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    model, proc = BUILDERS["llava_next"]("eager")
    inputs = batch_inputs("llava_next", proc, (1, 2))  # 3 images, of 1x2 and 2x1 tiles + their base views
    cfg, tower = model.config, model.model.vision_tower
    tiles = [
        image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        for size in inputs["image_sizes"]
    ]
    # vision_feature_layer -2: the features are the output of layer n - 2, whose maps the signals read
    layer = len(clip_encoder_layers(tower)) + cfg.vision_feature_layer
    pixels = torch.cat([p[:n] for p, n in zip(inputs["pixel_values"], tiles)])  # every tile, image by image
    keys_out = []
    k_proj = clip_encoder_layers(tower)[layer].self_attn.k_proj
    spy = k_proj.register_forward_hook(lambda module, args, output: keys_out.append(output))
    try:
        maps = tower(pixel_values=pixels, output_attentions=True).attentions[layer]  # (tiles, H, 1+P, 1+P)
    finally:
        spy.remove()
    n_tiles, heads, length, _ = maps.shape
    per_tile = {
        "cls_attention": maps[:, :, 0, 1:].mean(1)[..., None],  # head-mean [CLS] row, [CLS] column dropped
        "received_attention": maps.mean(dim=(1, 2))[:, 1:, None],  # column mean over heads and queries
        "vit_keys": keys_out[0].view(n_tiles, length, heads, -1).mean(2)[:, 1:],  # head-mean keys
    }

    def packed(values: torch.Tensor) -> torch.Tensor:
        """(tiles, P, C) per ViT patch -> (N_visual, C) in the LLM's order, 0 at the newline tokens."""
        per_image, _ = model.model.pack_image_features(
            list(torch.split(values, tiles)), inputs["image_sizes"], cfg.vision_feature_select_strategy,
            image_newline=torch.zeros(values.shape[-1]),
        )  # fmt: skip
        return torch.cat(per_image)

    store = VisionSignalStore()
    handles = adapter_for(model).install_vision_hooks(set(per_tile), store)
    try:
        model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    n_visual = int((inputs["input_ids"] == cfg.image_token_id).sum())
    for name, values in per_tile.items():
        expected = packed(values)
        expected = expected[:, 0] if name != "vit_keys" else expected
        assert expected.shape[0] == n_visual and store.values[name].shape == expected.shape
        torch.testing.assert_close(store.values[name], expected, atol=1e-5, rtol=0)


def _capture_eager(monkeypatch, module_of_model, target):
    """Wrap the modeling module's eager attention to record the weights `target` computes."""
    maps = []
    original = module_of_model.eager_attention_forward

    def wrapped(module, *args, **kwargs):
        output = original(module, *args, **kwargs)
        if module is target:
            maps.append(output[1])
        return output

    monkeypatch.setattr(module_of_model, "eager_attention_forward", wrapped)
    return maps


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vision_hook_matches_eager_received_attention(monkeypatch, family):
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
    from transformers.models.qwen2_vl import modeling_qwen2_vl
    from transformers.vision_utils import get_vision_window_index

    build, modeling = {
        "qwen2_vl": (tiny_qwen2vl, modeling_qwen2_vl),
        "qwen2_5_vl": (tiny_qwen25vl, modeling_qwen2_5_vl),
    }[family]
    model, proc = build("eager")
    inputs = batch_inputs(family, proc, (1, 2))  # 3 images of two grid sizes
    visual = model.model.visual
    adapter = adapter_for(model)
    maps = _capture_eager(monkeypatch, modeling, visual.blocks[adapter.score_layer].attn)
    values = _vision_signals(
        model, {"cls_attention"}, inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]
    )
    assert len(maps) == len(inputs["image_grid_thw"])  # one eager call per image (cu_seqlens chunks)
    group = visual.spatial_merge_size**2
    # column mean over heads and queries of each image's map, in the ViT's token order
    received = torch.cat([weights[0].mean(dim=(0, 1)) for weights in maps])
    pooled = received.view(-1, group).mean(1)  # the patches merged into one LLM token are consecutive
    if family == "qwen2_5_vl":  # blocks run in window order; the signal is in raster order
        window_index, _ = get_vision_window_index(
            inputs["image_grid_thw"],
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        raster = torch.empty_like(pooled)
        raster[window_index] = pooled
        pooled = raster
    torch.testing.assert_close(values["cls_attention"], pooled, atol=1e-5, rtol=0)


def _vision_linear_calls(model, inputs, names: set[str] | None) -> dict[str, int]:
    """Forward calls of every Linear module of the vision tower during one model forward, with the
    adapter's vision hooks for `names` installed (None: no hooks)."""
    calls: dict[str, int] = {}
    counters = [
        module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ("vision" in name or "visual" in name)
    ]
    store = VisionSignalStore()
    handles = adapter_for(model).install_vision_hooks(names, store) if names else []
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in counters + handles:
            handle.remove()
    assert not names or store.values, "the hooks computed no signal"
    return calls


@pytest.mark.parametrize("family", list(BUILDERS))
def test_vision_signals_reuse_the_towers_projections(family):
    """Every ViT signal hook takes Q and K from the projections the attention layer computed itself: with
    hooks on two layers asking for every signal the family has, no vision Linear runs more often."""
    model, proc = BUILDERS[family]("sdpa")
    inputs = batch_inputs(family, proc, (1, 2))
    adapter = adapter_for(model)
    names = set(adapter.vision_signals) | {f"{name}@0" for name in adapter.vision_signals}
    assert len(_vision_linear_calls(model, inputs, None)) > 0
    assert _vision_linear_calls(model, inputs, names) == _vision_linear_calls(model, inputs, None)


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_last_query_scores_match_eager_weights(eager_llava, layer):
    model, proc = eager_llava
    lm = model.model.language_model
    batch = proc.tokenizer(
        [
            "USER: describe the image please ASSISTANT:",
            "w1 w2 USER: w3 w4 w5 w6 w7 w8 describe the image ASSISTANT:",
        ],
        return_tensors="pt",
        padding=True,
    )
    assert not batch["attention_mask"].all(), "the batch must be left-padded"
    captured = {}
    attn = lm.layers[layer].self_attn

    def spy(module, args, kwargs):
        captured.update(kwargs)

    handle = attn.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            out = lm(**batch, output_attentions=True)
    finally:
        handle.remove()
    expected = out.attentions[layer][:, :, -1, :].mean(1)  # (B, N) head-mean last row
    with torch.no_grad():
        got = last_query_scores(
            attn,
            captured["hidden_states"],
            captured["position_embeddings"],
            batch["attention_mask"].bool(),
        )
    assert attn.num_key_value_groups > 1  # the tiny model uses GQA
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got[~batch["attention_mask"].bool()] == 0).all()


# ------------------------------------------------------------------------------- a cached context


@pytest.mark.parametrize("signal", ["last_query", "text_query", "visual_received"])
def test_scores_with_a_cached_context_equal_the_whole_sequence_sliced(tiny, signal):
    """A follow-up turn scores its tokens with the earlier turns' cached keys in every softmax: the same
    numbers as scoring the whole conversation at once and keeping the new turn's columns."""
    from tokprune.signals.llm import KeyContext, rotated_keys, text_query_scores, visual_received_scores

    model, _ = tiny("llava")
    lm = model.model.language_model
    attn = lm.layers[1].self_attn
    batch, length, prefix = 2, 24, 9
    normed = _randn(batch, length, model.config.text_config.hidden_size, seed=3)
    cos, sin = lm.rotary_emb(normed, torch.arange(length)[None].expand(batch, -1))
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[0, :3] = False  # left padding of row 0 lies in the context
    image_id = torch.full((batch, length), -1)
    image_id[0, 12:18], image_id[1, 10:14], image_id[1, 14:19] = 0, 1, 2  # images only after the context
    queries = [torch.tensor([18, 20, 23]), torch.tensor([19, 23])]

    def score(start: int, context=None):
        """The signal of tokens start.. (their own keys, plus the context's)."""
        x, table, ok = normed[:, start:], (cos[:, start:], sin[:, start:]), valid[:, start:]
        if signal == "last_query":
            return last_query_scores(attn, x, table, ok, context=context)
        if signal == "text_query":
            return text_query_scores(attn, x, table, [q - start for q in queries], ok, context=context)
        return visual_received_scores(attn, x, table, image_id[:, start:], ok, context=context)

    with torch.no_grad():
        keys = rotated_keys(attn, normed, (cos, sin))
        got = score(prefix, KeyContext(keys[:, :, :prefix], valid[:, :prefix]))
        expected = score(0)[:, prefix:]
        alone = score(prefix)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # without the context each softmax runs over fewer keys: every row's weights grow
    assert (alone.flatten(1).sum(1) > got.flatten(1).sum(1) + 1e-3).all()
