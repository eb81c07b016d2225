"""The attention signals computed without eager attention must match explicit / eager attention maps."""

from __future__ import annotations

import inspect
import sys

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

from tokprune.signals import (
    CLS_SIGNALS,
    LOGIT_SIGNALS,
    cls_attention,
    cls_attention_concat,
    cls_logits,
    last_query_attention,
    logit_column_mean,
    logit_row_mean,
    received_attention,
)
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
    hooks on two layers asking for every signal the family has (the [CLS] query's only on towers with a
    [CLS]), no vision Linear runs more often."""
    model, proc = BUILDERS[family]("sdpa")
    inputs = batch_inputs(family, proc, (1, 2))
    adapter = adapter_for(model)
    bases = [name for name in adapter.vision_signals if family in WITH_CLS or name not in CLS_SIGNALS]
    names = set(bases) | {f"{name}@0" for name in bases}
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


# ------------------------------------------------------------------------------- pre-softmax logits

WITH_CLS = ("llava", "llava_next", "internvl")  # tiny families whose tower has a [CLS] token


def _explicit_logits(query, keys, scale):
    """(..., H, N, d) -> (..., N, N) head-mean pre-softmax map, written out per head."""
    return (
        torch.stack(
            [query[..., h, :, :] @ keys[..., h, :, :].transpose(-1, -2) for h in range(query.shape[-3])]
        ).mean(0)
        * scale
    )


def test_cls_logits_and_concat_match_explicit_maps():
    B, H, N, d = 2, 3, 11, 8
    query, keys = _randn(B, H, 1, d, seed=11), _randn(B, H, N, d, seed=12)
    scale = d**-0.5
    expected = torch.zeros(B, N)
    for b in range(B):
        for h in range(H):
            expected[b] += torch.stack([(query[b, h, 0] * keys[b, h, j]).sum() for j in range(N)]) * scale / H
    got = cls_logits(query, keys, scale)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    # the concatenated heads: one softmax of the full-width dot product, scaled by C ** -0.5
    q_full, k_full = query.transpose(1, 2).reshape(B, 1, H * d), keys.transpose(1, 2).reshape(B, N, H * d)
    expected = torch.stack(
        [torch.stack([(q_full[b, 0] * k_full[b, j]).sum() for j in range(N)]) for b in range(B)]
    )
    expected = (expected * (H * d) ** -0.5).softmax(-1)
    torch.testing.assert_close(cls_attention_concat(q_full, k_full), expected, atol=TOL, rtol=0)
    torch.testing.assert_close(
        cls_attention_concat(q_full.bfloat16(), k_full.bfloat16()).sum(-1), torch.ones(B)
    )


@pytest.mark.parametrize("block_sizes", [None, [5, 7, 3], [1, 14]])
def test_logit_means_match_explicit_maps(block_sizes):
    """Column mean (over the member queries) and row mean (over the member keys) of the head-mean map,
    within every block; non-members still get their value."""
    H, d = 3, 8
    N = sum(block_sizes) if block_sizes else 15
    query, keys = _randn(H, N, d, seed=13) * 2, _randn(H, N, d, seed=14) * 2
    members = torch.ones(N, dtype=torch.bool)
    members[[2, 6]] = False
    logits = _explicit_logits(query, keys, 0.3)  # (N, N)
    col, row = torch.zeros(N), torch.zeros(N)
    start = 0
    for size in block_sizes or [N]:
        cut = slice(start, start + size)
        block, inside = logits[cut, cut], members[cut]
        col[cut] = block[inside].mean(0)
        row[cut] = block[:, inside].mean(1)
        start += size
    torch.testing.assert_close(
        logit_column_mean(query, keys, 0.3, members, block_sizes), col, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(logit_row_mean(query, keys, 0.3, members, block_sizes), row, atol=1e-5, rtol=0)
    plain = _explicit_logits(query, keys, 0.3)
    if block_sizes is None:  # without members: the plain means
        torch.testing.assert_close(logit_column_mean(query, keys, 0.3), plain.mean(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(logit_row_mean(query, keys, 0.3), plain.mean(1), atol=1e-5, rtol=0)


def _attention_module(layer: torch.nn.Module) -> torch.nn.Module:
    return next(getattr(layer, a) for a in ("self_attn", "attn", "attention") if hasattr(layer, a))


def _vision_layer_list(adapter) -> torch.nn.ModuleList:
    return adapter.visual.blocks if hasattr(adapter, "visual") else adapter.vision_layers


def _capture_logits(monkeypatch, targets: list[torch.nn.Module]) -> dict[int, list]:
    """Record, for every eager attention call of a target module, its (query, key, scaling) as
    `eager_attention_forward` receives them (after q/k norms and RoPE)."""
    calls: dict[int, list] = {id(t): [] for t in targets}
    for module_name in {type(t).__module__ for t in targets}:
        modeling = sys.modules[module_name]
        original = modeling.eager_attention_forward

        def wrapped(module, query, key, *args, _original=original, **kwargs):
            if id(module) in calls:
                calls[id(module)].append((query.detach(), key.detach(), kwargs["scaling"]))
            return _original(module, query, key, *args, **kwargs)

        monkeypatch.setattr(modeling, "eager_attention_forward", wrapped)
    return calls


def _eager_per_token(calls: list, base: str, cls: bool) -> list[torch.Tensor]:
    """Per eager call, (b, T) the signal of every ViT token from its explicit logit map ([CLS] first)."""
    out = []
    for query, key, scaling in calls:
        query, key = query.float(), key.float()
        b, heads, length, dim = query.shape
        logits = (query @ key.transpose(-1, -2)).mean(1) * scaling  # (b, T, T) head mean
        members = torch.arange(length) >= int(cls)
        if base == "cls_logits":
            value = logits[:, 0]
        elif base == "cls_attention_concat":
            q_full, k_full = (x.transpose(1, 2).reshape(b, length, heads * dim) for x in (query, key))
            value = ((q_full[:, :1] @ k_full.transpose(1, 2))[:, 0] * (heads * dim) ** -0.5).softmax(-1)
        elif base == "received_attention_concat":  # one head of full width, over the members
            q_full, k_full = (
                x.transpose(1, 2).reshape(b, length, heads * dim)[:, members] for x in (query, key)
            )
            attention = (q_full @ k_full.transpose(1, 2) * (heads * dim) ** -0.5).softmax(-1)
            value = torch.zeros(b, length)
            value[:, members] = attention.mean(1)
        elif base == "logit_column_mean":
            value = logits[:, members].mean(1)
        else:
            value = logits[:, :, members].mean(2)
        out.append(value)
    return out


def _expected_llm_order(family: str, model, inputs: dict, per_call: list[torch.Tensor]) -> torch.Tensor:
    """The per-token eager values put in the LLM's visual-token order the way each family's model puts its
    features there ([CLS] dropped, pooling over merged patches, AnyRes packing)."""
    adapter = adapter_for(model)
    if family in ("llava", "llava_next", "internvl"):
        values = torch.cat(per_call)[:, 1:]  # [CLS] dropped
    else:
        values = torch.cat(per_call) if not family.startswith("qwen") else torch.cat(per_call, dim=1)
    if family == "llava":
        return values.flatten()
    if family in ("llava_next", "llava_onevision"):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = model.config
        tiles = [
            image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            for size in inputs["image_sizes"]
        ]
        extra = {} if family == "llava_next" else {"vision_aspect_ratio": cfg.vision_aspect_ratio}
        strategy = ("default",) if family == "llava_next" else ()
        packed, _ = model.model.pack_image_features(
            list(torch.split(values[..., None], tiles)), inputs["image_sizes"], *strategy,
            image_newline=torch.zeros(1), **extra,
        )  # fmt: skip
        return torch.cat(packed)[:, 0]
    if family.startswith("qwen"):
        from transformers.vision_utils import get_vision_window_index

        pooled = values.flatten().view(-1, adapter.merge**2).mean(1)
        if family == "qwen2_5_vl":
            window_index, _ = get_vision_window_index(
                inputs["image_grid_thw"], spatial_merge_size=adapter.merge,
                window_size=adapter.visual.window_size, patch_size=adapter.visual.patch_size,
            )  # fmt: skip
            raster = torch.empty_like(pooled)
            raster[window_index] = pooled
            pooled = raster
        return pooled
    if family == "internvl":
        from tokprune.patches.internvl import pool_groups

        return pool_groups(values, adapter.merge_groups(round(values.shape[1] ** 0.5)))
    if family in ("smolvlm", "idefics3"):
        from tokprune.patches.internvl import pool_groups

        return pool_groups(values, adapter.merge_groups(values.shape[1]))
    assert family == "gemma3"
    return adapter.pooled(values[..., None])[:, 0]


def _get_image_features(model, inputs: dict) -> None:
    """The model's own vision pass over the inputs' images (what generate() runs before the prefill)."""
    function = model.model.get_image_features
    accepted = inspect.signature(function).parameters
    with torch.no_grad():
        function(**{k: v for k, v in inputs.items() if k in accepted})


@pytest.mark.parametrize("family", list(BUILDERS))
def test_logit_signals_match_eager_logits(monkeypatch, family):
    """The pre-softmax logit signals, at the feature layer and at layer 0, equal the same quantities taken
    from the eager attention's own logits (q k^T * scaling of the q/k the eager kernel receives), put in
    the LLM's order as the model puts its features there. Families without [CLS] give the logit means."""
    model, proc = BUILDERS[family]("eager")
    inputs = batch_inputs(family, proc, (1,) if family == "llava_onevision" else (1, 2))
    adapter = adapter_for(model)
    layers = _vision_layer_list(adapter)
    cls = family in WITH_CLS
    scalar = [name for name in LOGIT_SIGNALS if name != "vit_keys_concat"]  # one number per token
    bases = [name for name in scalar if cls or name not in CLS_SIGNALS]
    wanted = {layer: [f"{b}@{layer}" if layer is not None else b for b in bases] for layer in (None, 0)}
    targets = {
        layer: _attention_module(layers[adapter.score_layer if layer is None else layer]) for layer in wanted
    }
    calls = _capture_logits(monkeypatch, list(targets.values()))
    store = VisionSignalStore()
    handles = adapter.install_vision_hooks({n for names in wanted.values() for n in names}, store)
    try:
        _get_image_features(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    for layer, names in wanted.items():
        assert calls[id(targets[layer])], f"no eager call of layer {layer}"
        for base, name in zip(bases, names):
            per_call = _eager_per_token(calls[id(targets[layer])], base, cls)
            expected = _expected_llm_order(family, model, inputs, per_call)
            got = store.values[name]
            assert got.shape == expected.shape, name
            scale = expected.abs().max().clamp_min(1e-6)
            torch.testing.assert_close(got / scale, expected / scale, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("family", [f for f in BUILDERS if f not in WITH_CLS] + ["llava_siglip"])
def test_cls_signals_mean_what_each_patch_receives_on_towers_without_cls(family):
    """On a tower without [CLS], cls_logits / cls_attention_concat are the same quantities of the attention
    each patch receives (as "cls_attention" is there): logit_column_mean / received_attention_concat."""
    model, proc = tiny_llava("sdpa", tower="siglip") if family == "llava_siglip" else BUILDERS[family]("sdpa")
    data = "llava" if family == "llava_siglip" else family
    inputs = batch_inputs(data, proc, (1,) if family == "llava_onevision" else (1, 2))
    adapter = adapter_for(model)
    pairs = {"cls_logits": "logit_column_mean", "cls_attention_concat@0": "received_attention_concat@0"}
    store = VisionSignalStore()
    handles = adapter.install_vision_hooks({*pairs, *pairs.values()}, store)
    try:
        _get_image_features(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    for name, same in pairs.items():
        torch.testing.assert_close(store.values[name], store.values[same], atol=0, rtol=0, msg=name)


def test_vit_keys_concat_are_the_full_width_keys():
    """LLaVA: vit_keys_concat at a layer = that layer's k_proj output at the patches ([CLS] dropped)."""
    model, proc = BUILDERS["llava"]("sdpa")
    pixel_values = batch_inputs("llava", proc, (1, 2))["pixel_values"]
    layer = adapter_for(model).vision_layers[0].self_attn
    got = {}
    handle = layer.k_proj.register_forward_hook(lambda module, args, output: got.setdefault("k", output))
    try:
        values = _vision_signals(model, {"vit_keys_concat@0", "vit_keys@0"}, pixel_values)
    finally:
        handle.remove()
    expected = got["k"][:, 1:].flatten(0, 1)
    torch.testing.assert_close(values["vit_keys_concat@0"], expected.float(), atol=1e-6, rtol=0)
    heads = layer.num_heads
    mean = expected.view(expected.shape[0], heads, -1).float().mean(1)
    torch.testing.assert_close(values["vit_keys@0"], mean, atol=1e-6, rtol=0)


def test_llava_siglip_logit_means_match_eager_logits(monkeypatch):
    """A SigLIP LLaVA ('full' strategy, no [CLS]): the logit means run over every patch."""
    model, proc = tiny_llava("eager", tower="siglip")
    pixel_values = batch_inputs("llava", proc, (1, 2))["pixel_values"]
    adapter = adapter_for(model)
    target = _attention_module(adapter.vision_layers[adapter.score_layer])
    calls = _capture_logits(monkeypatch, [target])
    values = _vision_signals(model, {"logit_column_mean", "logit_row_mean"}, pixel_values)
    for base in ("logit_column_mean", "logit_row_mean"):
        expected = torch.cat(_eager_per_token(calls[id(target)], base, cls=False)).flatten()
        torch.testing.assert_close(values[base], expected, atol=1e-5, rtol=0)


def test_smolvlm_logit_means_run_over_real_patches(monkeypatch):
    """A frame partly padded (pixel_attention_mask): the means run over its real patches; padding gets 0."""
    model, proc = BUILDERS["smolvlm"]("eager")
    pixel_values = batch_inputs("smolvlm", proc, (1, 0))["pixel_values"][:1, :2].clone()
    mask = torch.ones(1, 2, 112, 112, dtype=torch.long)
    mask[0, 1, :, 56:] = 0  # the right half of frame 1 is padding
    pixel_values[0, 1, :, :, 56:] = 0
    adapter = adapter_for(model)
    target = _attention_module(adapter.vision_layers[adapter.score_layer])
    calls = _capture_logits(monkeypatch, [target])
    names = {"logit_column_mean", "logit_row_mean"}
    store = VisionSignalStore()
    handles = adapter.install_vision_hooks(names, store)
    try:
        with torch.no_grad():
            model.model.get_image_features(pixel_values=pixel_values, pixel_attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    [(query, key, scaling)] = calls[id(target)]
    logits = (query.float() @ key.float().transpose(-1, -2)).mean(1) * scaling  # (2, 64, 64)
    real = mask[0, :, ::14, ::14].reshape(2, 64).bool()
    from tokprune.patches.internvl import pool_groups

    groups = adapter.merge_groups(64)
    for base in names:
        expected = torch.zeros(2, 64)
        for frame in range(2):
            inside = real[frame]
            block = logits[frame][inside][:, inside]
            expected[frame, inside] = block.mean(0) if base == "logit_column_mean" else block.mean(1)
        torch.testing.assert_close(store.values[base], pool_groups(expected, groups), atol=1e-5, rtol=0)
