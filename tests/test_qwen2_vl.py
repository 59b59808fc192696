"""Stock transformers Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE and GLM-4.1V (multimodal RoPE) under every
method, inside the vision encoder (whole 2x2 merge windows) and after it: the oracles the project's own model obeys (no-op == stock model,
drop == mask, batch == one by one, cached == uncached), with each kept token at its stock (temporal, height,
width) position, and windows dropped inside the encoder == the stock blocks run without them."""

import re

import pytest
import torch
from transformers.vision_utils import (get_vision_interpolation_indices_and_weights, get_vision_position_ids,
                                     get_vision_window_index)

import meteor_vlm as mv
from meteor_vlm.models.adapters import adapt

from .test_llava import assert_noop_is_the_stock_model
from .test_oracles import (DropAt, DropWindows, check_batch_and_cache, check_beams_against_the_stock_model,
                          dropped_decoder_logits, first_attention_layer, has_recurrent_layers, masked_decoder_logits,
                          survivors)

PROMPTS = ["<image> what is in the image ?", "how many red circle are there ? <image> and <image> on the left",
           "<image> describe the shape ?"]
IMAGES = [1, 2, 1]
SIZES = [(48, 32), (30, 60), (40, 40), (64, 20)]  # each its own token count (6, 8, 4, 4 visual tokens)


def tiny(version: str, **kwargs):
    """A tiny Qwen-VL of that version ("2", "2.5", "3", "3-moe"), or, for "glm4v" / "glm4v-moe", a tiny GLM-4.1V /
    GLM-4.5V: the same
    encoder in shape (2x2 merge windows, its own positions and ends) and the same kind of prompts and inputs."""
    if version == "paddleocr":
        return mv.testing.tiny_paddleocr_vl(**kwargs)
    if version == "omni":
        return mv.testing.tiny_qwen2_5_omni_thinker(**kwargs)
    if version.startswith("glm"):
        return mv.testing.tiny_glm4v(moe=version.endswith("-moe"), v46=version.startswith("glm46v"),
                                     ocr=version == "glm-ocr", **kwargs)
    return mv.testing.tiny_qwen2_vl(version=version, **kwargs)


@pytest.fixture(scope="module", params=["2", "2.5", "3", "3-moe", "3.5", "3.5-moe", "glm4v", "glm4v-moe", "glm46v",
                                        "glm46v-moe", "glm-ocr", "paddleocr", "omni"],
                ids=["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe", "qwen3.5", "qwen3.5-moe", "glm4.1v", "glm4.5v",
                     "glm4.6v-flash", "glm4.6v", "glm-ocr", "paddleocr-vl", "qwen2.5-omni"])
def qwen(request):
    return tiny(request.param, seed=2)


@pytest.fixture(scope="module", params=["2", "2.5", "3", "3-moe", "3.5", "exaone4.5", "hcx", "ov1.5"],
                ids=["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe", "qwen3.5", "exaone4.5", "hcx",
                     "llava-onevision-1.5"])
def qwen_video(request):
    """The models that take videos beside images in one call (GLM-4.1V's take one kind per call: `glm4v_video`)."""
    return tiny(request.param, seed=2)



@pytest.fixture(scope="module")
def pictures():
    return [im.resize(size) for im, size in zip(mv.testing.random_images(4, seed=8), SIZES)]


def qwen_inputs(processor, pictures, which=(0, 1, 2), same_size=False):
    starts = [sum(IMAGES[:i]) for i in range(len(IMAGES))]
    imgs = [pictures[s + j] for i in which for s in [starts[i]] for j in range(IMAGES[i])]
    if same_size:
        imgs = [im.resize((40, 40)) for im in imgs]
    return processor(images=imgs, text=[PROMPTS[i] for i in which])


def logits(model, inputs, method=None, **kw):
    with torch.no_grad(), (method(model) if method is not None else torch.no_grad()):
        return model(**inputs, use_cache=False, **kw).logits


def stock_reference(model, inputs, drop, layer):
    """The stock model's embeddings and multimodal RoPE positions (and Qwen3-VL's DeepStack features at the image
    tokens after its first layers), run layer by layer with the columns in `drop` masked as keys from `layer` on
    (`decoder_reference`)."""
    with torch.no_grad():
        ids = inputs["input_ids"]
        out = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        is_img = (ids == model.config.image_token_id)[..., None]
        embeds = model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter(is_img.expand_as(embeds), torch.cat(out.pooler_output))
        residuals = [torch.zeros_like(embeds).masked_scatter(is_img.expand_as(embeds), torch.cat(list(level)))
                     for level in getattr(out, "deepstack_features", None) or []]
        positions = stock_positions(model, inputs)
    return decoder_reference(model, embeds, inputs["attention_mask"].bool(), drop, layer, positions, residuals)


def stock_positions(model, inputs) -> torch.Tensor:
    """(3, B, T) the stock model's multimodal RoPE positions of a prompt with images and videos, from its own
    `get_rope_index` (Qwen2.5-Omni's thinker, on images: its own signature, each image found by the vision-start token
    before it)."""
    if "mm_token_type_ids" in inputs:
        return model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs.get("image_grid_thw"),
                                          inputs.get("video_grid_thw"), attention_mask=inputs["attention_mask"])[0]
    return model.model.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"], None,
                                      attention_mask=inputs["attention_mask"])[0]


def decoder_reference(model, embeds, valid, drop, layer, positions, residuals=None):
    """The stock language model on `embeds` with the `drop` columns masked as keys from `layer` on, or, on a
    decoder with linear-attention layers (Qwen3.5), removed from the sequence before `layer`
    (`dropped_decoder_logits`: there removing a token is not masking it)."""
    lm = model.model.language_model
    if has_recurrent_layers(lm.config):
        assert not residuals
        return dropped_decoder_logits(lm, model.lm_head, embeds, valid, drop, layer, positions)
    return masked_decoder_logits(lm, model.lm_head, embeds, valid, drop, layer, positions=positions, residuals=residuals)


NOOPS = {"none": mv.NoPruning, "fastv": lambda: mv.FastV(layer=2, ratio=0.0),
         "pyramiddrop": lambda: mv.PyramidDrop(ratio=1.0), "dart": lambda: mv.DART(layer=2, ratio=0.0),
         "divprune": lambda: mv.DivPrune(keep=1.0), "sparsevlm": lambda: mv.SparseVLM(keep=(1.0, 1.0, 1.0)),
         "meteor-stage3": lambda: mv.Meteor.preset("stage3", lam=1e9),
         "meteor-stage1": lambda: mv.Meteor.preset("stage1", encoder_keep=1.0),
         "evoprune": lambda: mv.EvoPrune(keep=1.0), "visionzip": lambda: mv.VisionZip(keep=1.0)}


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_equals_the_stock_model_and_the_block_restores_it(qwen, pictures, make):
    model, processor = qwen
    method = make()
    assert_noop_is_the_stock_model(model, qwen_inputs(processor, pictures), method, logits, logits)
    assert [s["images"] for s in method.stats] == IMAGES


@pytest.mark.parametrize("layer", [0, 3])
def test_dropping_at_llm_layer_equals_masking_or_removing_them_at_their_multimodal_positions(qwen, pictures, layer):
    model, processor = qwen
    inputs = qwen_inputs(processor, pictures, which=(0, 1))
    vis = inputs["input_ids"] == model.config.image_token_id
    drop = [vis[0].nonzero()[::3, 0].tolist(), vis[1].nonzero()[1::2, 0].tolist()]
    got = logits(model, inputs, lambda m: DropAt(layer, drop)(m))
    # a linear-attention layer (Qwen3.5's) has no attention to score with: the drop happens before the next one
    want = stock_reference(model, inputs, drop, first_attention_layer(model.config.text_config, layer))
    text = inputs["attention_mask"].bool() & ~vis
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)
    assert (got[text] - logits(model, inputs)[text]).abs().max() > 1e-3


@pytest.mark.parametrize("same_size", [True, False], ids=["same-size", "sizes-differ"])
def test_fusion_pruning_equals_masking_those_tokens_from_layer_0(qwen, pictures, same_size):
    """DivPrune before the LLM = the stock model with the other visual tokens masked from layer 0 on; images of
    different sizes each keep their share of their own tokens."""
    model, processor = qwen
    inputs = qwen_inputs(processor, pictures, same_size=same_size)
    method = mv.DivPrune(keep=0.5)
    got = logits(model, inputs, method)
    is_img = inputs["input_ids"] == model.config.image_token_id
    counts = (inputs["image_grid_thw"].prod(-1) // 4).tolist()  # visual tokens per image, 2x2 merged
    drop, image = [], 0
    for b, s in enumerate(method.stats):  # image i's token g is the g-th of its image tokens
        cols = is_img[b].nonzero()[:, 0].split(counts[image:image + s["images"]])
        drop.append([int(c[g]) for c, kept in zip(cols, s["kept_grid"]) for g in range(len(c)) if g not in kept["vision"]])
        assert [len(k["vision"]) for k in s["kept_grid"]] == [round(0.5 * len(c)) for c in cols]
        image += s["images"]
    assert all(drop)
    want = stock_reference(model, inputs, drop, 0)
    text = inputs["attention_mask"].bool() & ~is_img
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)


PRUNING = {"fastv": lambda: mv.FastV(layer=2, ratio=0.6), "pyramiddrop": lambda: mv.PyramidDrop(ratio=0.6),
           "dart": lambda: mv.DART(layer=2, ratio=0.6), "divprune": lambda: mv.DivPrune(keep=0.4),
           "sparsevlm": lambda: mv.SparseVLM(keep=(0.6, 0.4, 0.2), recycle=0.5, cluster=0.25),
           "meteor-stage3": lambda: mv.Meteor.preset("stage3", lam=3.0),
           "meteor-stage1+3": lambda: mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0),
           "evoprune": lambda: mv.EvoPrune(keep=0.5), "tome": lambda: mv.ToMe(keep=0.5),
           "visionzip": lambda: mv.VisionZip(keep=0.5), "prumerge+": lambda: mv.PruMerge()}


def grown_inputs(batch, ids):
    """The image and video inputs of `batch` to run its prompts grown to `ids` without cache: the token types
    grown with text for the generated tokens, as the stock model reads them."""
    keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    if "mm_token_type_ids" not in batch:  # a model whose forward takes none (EXAONE 4.5's, HyperCLOVA X's)
        return {k: batch[k] for k in keys if k in batch}
    kinds = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(ids[:, batch["input_ids"].shape[1]:])], 1)
    return {**{k: batch[k] for k in keys if k in batch}, "mm_token_type_ids": kinds}


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_later_method_obeys_the_batch_and_cache_oracles(qwen, pictures, make):
    """Batch = one by one, cached generation = recomputation without the cache (the prompt's token types grown
    with text for the generated tokens, as the stock model reads them)."""
    model, processor = qwen
    method = make()

    check_batch_and_cache(model, method, lambda which: qwen_inputs(processor, pictures, which), grown_inputs,
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


def test_qwen3_5_prunes_before_the_next_attention_layer_and_refuses_a_layer_with_none_after_it(pictures):
    """On Qwen3.5's hybrid decoder (attention layers 2 and 5 of 7), FastV asked for layer 3, a linear-attention one,
    drops before layer 5, which is where its counts say it did (layers 0-4 see every visual token); asked for
    layer 6, after the last attention layer, it is refused."""
    model, processor = tiny("3.5", seed=2, num_layers=7)
    inputs = qwen_inputs(processor, pictures, which=(0,))
    method = mv.FastV(layer=3, ratio=0.5)
    logits(model, inputs, method)
    stats = method.stats[0]
    n = stats["fusion_tokens"]
    assert list(stats["stage3"]) == [5] and stats["stage3"][5] == n - round(0.5 * n)
    assert stats["tokens_per_layer"] == [n] * 5 + [n - round(0.5 * n)] * 2
    with pytest.raises(ValueError, match=r"LLM layer 6 has no attention layer at or after it .*\[2, 5\]"):
        logits(model, inputs, mv.FastV(layer=6, ratio=0.5))


def test_bad_inputs_and_settings_are_refused(qwen, pictures):
    model, processor = qwen
    inputs = qwen_inputs(processor, pictures, which=(0,))
    with pytest.raises(ValueError, match="needs image_grid_thw"):
        logits(model, {k: v for k, v in inputs.items() if k != "image_grid_thw"}, mv.FastV())
    with pytest.raises(ValueError, match="encoder_tokens is a count for a fixed grid"):
        logits(model, inputs, mv.Meteor.preset("stage1", encoder_tokens=2))
    doubled = {**inputs, "image_grid_thw": inputs["image_grid_thw"] * torch.tensor([2, 1, 1])}
    with pytest.raises(ValueError, match=r"pixel_values hold 24 patches but image_grid_thw \[\[2, 4, 6\]\] needs 48"):
        logits(model, doubled, mv.ToMe(keep=0.5))
    assert "forward" not in vars(model)


def stock_blocks_without(visual, pixels, grid_thw):
    """One image's or video's merged tokens from the stock encoder's own blocks and merger, the windows `survivors`
    drops at each block removed from the packed sequence (each temporal patch of a video attending within itself,
    as the stock cu_seqlens say, and the stock attention windows of Qwen2.5-VL, as its get_vision_window_index
    lays them out, among those left; Qwen3-VL's learned position embeddings resampled to the grid, and its DeepStack
    mergers after their blocks; GLM-4.1V's norm and position embeddings after the patch embedding (GLM-OCR has
    none), and its norm and 2x2 convolution before the merger): (kept window indices, (K, D) tokens, [(K, D)
    DeepStack features per level])."""
    cfg, m = visual.config, visual.spatial_merge_size
    grid = torch.tensor([grid_thw])
    hidden = visual.patch_embed(pixels)
    if hasattr(visual, "pos_embed"):  # Qwen3-VL
        index, weight = get_vision_interpolation_indices_and_weights(
            grid, visual.num_grid_per_side, visual.interpolation_mode, visual.interpolation_align_corners, m)
        hidden = hidden + (visual.pos_embed(index) * weight[:, :, None]).sum(1)
    if hasattr(visual, "post_conv_layernorm"):  # GLM-4.1V
        ids = get_vision_position_ids(grid, m)
        hidden = visual.embeddings(visual.post_conv_layernorm(hidden), [hidden.shape[0]], grid, ids[:, 0], ids[:, 1])
    deepstack = {}  # level: {window: its DeepStack features}
    cos, sin = visual.rotary_pos_emb(hidden, get_vision_position_ids(grid, m))
    alive = torch.arange(hidden.shape[0] // m**2)
    frame = alive // (grid_thw[1] * grid_thw[2] // m**2)  # a video's temporal patches attend each within itself
    window = torch.zeros_like(alive)
    if hasattr(visual, "fullatt_block_indexes"):  # each window's stock attention window
        order, cu = get_vision_window_index(grid, m, cfg.window_size, cfg.patch_size)
        window[order] = torch.searchsorted(cu[1:] // m**2, torch.arange(len(order)), right=True)
    for b, block in enumerate(visual.blocks):
        windowed = hasattr(visual, "fullatt_block_indexes") and b not in visual.fullatt_block_indexes
        groups = window if windowed else frame
        order = torch.argsort(groups[alive], stable=True)
        sizes = torch.bincount(groups[alive][order])
        cu = torch.cat([torch.zeros(1), (sizes[sizes > 0] * m**2).cumsum(0)]).int()
        patch = (alive[order, None] * m**2 + torch.arange(m**2)).flatten()
        rows = (torch.arange(len(alive))[order, None] * m**2 + torch.arange(m**2)).flatten()
        out = hidden.clone()
        out[rows] = block(hidden[rows], cu_seqlens=cu, position_embeddings=(cos[patch], sin[patch]))
        if b in getattr(visual, "deepstack_visual_indexes", []):
            level = visual.deepstack_visual_indexes.index(b)
            deepstack[level] = dict(zip(alive.tolist(), visual.deepstack_merger_list[level](out)))
        kept = survivors(alive, b, 4)
        rows = (torch.searchsorted(alive, kept)[:, None] * m**2 + torch.arange(m**2)).flatten()
        hidden, alive = out[rows], kept
    if hasattr(visual, "downsample"):  # GLM-4.1V
        hidden = visual.downsample(visual.post_layernorm(hidden).view(-1, m, m, hidden.shape[-1]).permute(0, 3, 1, 2))
        hidden = hidden.flatten(1)
    return alive, visual.merger(hidden), [torch.stack([deepstack[k][w] for w in alive.tolist()]) for k in sorted(deepstack)]


def paddle_blocks_without(model, pixels, grid_thw):
    """`stock_blocks_without` for PaddleOCR-VL's encoder, whose patches come row-major: the stock embeddings, then
    the stock blocks on the patches of the windows left (with their stock 2D rotary positions), the windows
    `survivors` drops at each block removed, the final norm, and the stock projector over the grid with the dropped
    windows' patches zero-filled: (kept windows, (K, D) tokens, [])."""
    visual = model.model.visual
    tower, m = visual.vision_model, visual.config.spatial_merge_size
    _, h, w = grid_thw
    grid = torch.tensor([grid_thw])
    hidden = tower.embeddings(pixels[None], grid_thw=grid)  # (h*w, D), row-major
    cos, sin = tower.encoder.rotary_pos_emb(hidden, get_vision_position_ids(grid, 1))
    window_of = torch.arange(h * w).view(h // m, m, w // m, m).permute(0, 2, 1, 3).reshape(-1, m * m)
    alive, patches = torch.arange(h * w // m**2), torch.arange(h * w)
    for b, block in enumerate(tower.encoder.layers):
        cu = torch.tensor([0, len(patches)], dtype=torch.int32)
        hidden = block(hidden, cu_seqlens=cu, position_embeddings=(cos[patches], sin[patches]))
        alive = survivors(alive, b, 4)
        left = torch.isin(patches, window_of[alive].flatten())
        hidden, patches = hidden[left], patches[left]
    full = hidden.new_zeros(h * w, hidden.shape[-1])
    full[patches] = tower.post_layernorm(hidden)
    return alive, model.model.projector(full, grid)[alive], []


@pytest.mark.parametrize("version", ["2", "2.5", "3", "3.5", "glm4v", "glm-ocr", "paddleocr", "omni"])
def test_windows_dropped_inside_the_encoder_equal_the_stock_blocks_run_without_them(version, pictures):
    """After each block of a 3-block encoder (Qwen2.5-VL: the first two windowed) a test method drops whole merge
    windows: the tokens that leave it equal the stock blocks and merger run on the packed sequence with those
    windows removed (two images of one grid encoded together, two of others), and the logits equal the stock
    language model with the dropped windows' image tokens masked from layer 0 on (Qwen3-VL: each kept window's
    DeepStack features, from the stock blocks and mergers, added at its column after the first layers)."""
    model, processor = tiny(version, seed=4, vision_depth=3)
    imgs = [pictures[0], pictures[3].resize((48, 32)), pictures[1], pictures[2].resize((48, 48))]  # 3 x 3: 4 windows
    inputs = processor(images=imgs, text=["<image> <image> what is it ?", "<image> and <image> ?"])
    target = adapt(model)
    with torch.no_grad():
        tokens = target.encode_expert(0, {k: inputs[k] for k in ("pixel_values", "image_grid_thw")}, DropWindows(4))
        starts = [0, *inputs["image_grid_thw"].prod(-1).cumsum(0).tolist()]
        visual, embeds_at, deepstack_at = model.model.visual, {}, {}
        is_img = inputs["input_ids"] == model.config.image_token_id
        ib, it = is_img.nonzero(as_tuple=True)
        first = 0
        for i, g in enumerate(inputs["image_grid_thw"].tolist()):
            pixels = inputs["pixel_values"][starts[i]:starts[i + 1]]
            alive, want, deepstack = (paddle_blocks_without(model, pixels, g) if version == "paddleocr"
                                      else stock_blocks_without(visual, pixels, g))
            got = tokens.features[i][tokens.mask[i]]
            if version == "paddleocr":  # its tower hands on the kept windows' patches; the projector comes after
                got = target.project(got)
            assert tokens.grid_index[i][tokens.mask[i]].tolist() == alive.tolist()
            assert 0 < len(alive) < g[1] * g[2] // 4
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            for j, (w, feat) in enumerate(zip(alive.tolist(), want)):
                embeds_at[(int(ib[first + w]), int(it[first + w]))] = feat
                deepstack_at[(int(ib[first + w]), int(it[first + w]))] = [level[j] for level in deepstack]
            first += g[1] * g[2] // 4
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        residuals = [torch.zeros_like(embeds) for _ in getattr(visual, "deepstack_visual_indexes", [])]
        assert len(residuals) == (2 if version == "3" else 0)
        for (r, c), feat in embeds_at.items():
            embeds[r, c] = feat
            for level, extra in zip(residuals, deepstack_at[(r, c)]):
                level[r, c] = extra
        drop = [[c for c in is_img[r].nonzero()[:, 0].tolist() if (r, c) not in embeds_at] for r in range(2)]
        assert_windows_dropped_are_masked(model, inputs, embeds, drop, is_img, residuals)


def assert_windows_dropped_are_masked(model, inputs, embeds, drop, vis, residuals=None):
    """Under `DropWindows(4)` the logits on the text equal the stock language model run on `embeds` with the
    `drop` columns masked from layer 0 on, at the stock multimodal positions of the prompts (`residuals` added
    after its first layers)."""
    positions = stock_positions(model, inputs)
    want = decoder_reference(model, embeds, inputs["attention_mask"].bool(), drop, 0, positions, residuals)
    got = logits(model, inputs, DropWindows(4))
    text = inputs["attention_mask"].bool() & ~vis
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)


def test_windowed_blocks_attend_within_their_windows_with_a_per_token_bias():
    """Qwen2.5-VL's windowed block attends in one padded batch of windows: the same as one dense SDPA with keys
    outside a query's window masked and the proportional bias added, on two images that kept different windows
    (uneven windows) and on whole ones (no padding)."""
    from meteor_vlm.models.qwen2_vl import Qwen2VLRunner

    model, _ = mv.testing.tiny_qwen2_vl(seed=1, version="2.5", vision_depth=3)
    runner = Qwen2VLRunner(model.model.visual, adapt(model).runners[0].spec, (1, 12, 12))  # 6 x 6 windows
    g = torch.Generator().manual_seed(0)
    for grid in (torch.tensor([[0, 1, 4, 7, 8, 20, 33], [2, 3, 9, 14, 15, 27, 35]]), torch.arange(36).expand(2, 36)):
        L = grid.shape[1] * 4
        q, k, v = (torch.randn(2, 4, L, 8, generator=g) for _ in range(3))
        bias = torch.rand(2, grid.shape[1], generator=g).log()
        groups = runner.attention_groups(0, grid)
        assert runner.attention_groups(2, grid) is None and len(set(groups[0].tolist())) > 2
        same = groups[:, :, None] == groups[:, None, :]
        dense = bias.repeat_interleave(4, 1)[:, None, None, :].masked_fill(~same[:, None], float("-inf"))
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=runner.blocks[0].attn.scaling)
        torch.testing.assert_close(runner._attend(0, q, k, v, bias, grid), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("block", [0, 1], ids=["windowed-in-2.5", "full"])
def test_proportional_attention_makes_a_merged_window_act_as_its_duplicates(qwen, block):
    """A block run with one window present three times (at its own grid position) equals, for every window, the
    block run on one copy with log(3) added to the attention logits of its four patches."""
    model, _ = qwen
    described = adapt(model).runners[0]
    runner = type(described)(model.model.visual, described.spec, (1, 8, 8))  # 4 x 4 windows
    first = runner.blocks[0]
    width = (first.norm1 if hasattr(first, "norm1") else first.layer_norm1).weight.shape[0]  # PaddleOCR-VL's name
    grid = torch.tensor([[0, 1, 5, 6, 10], [2, 3, 4, 9, 15]])
    x = torch.randn(2, 5, runner.window * width, generator=torch.Generator().manual_seed(1))
    dup, dup_grid = torch.cat([x, x[:, 1:2].expand(-1, 2, -1)], 1), torch.cat([grid, grid[:, 1:2].expand(-1, 2)], 1)
    size = torch.ones(2, 5)
    size[:, 1] = 3
    with torch.no_grad():
        full = runner.run_block(block, dup, None, dup_grid)
        merged, plain = runner.run_block(block, x, size.log(), grid), runner.run_block(block, x, None, grid)
    torch.testing.assert_close(merged, full[:, :5], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, full[:, :5], atol=1e-3)


@pytest.mark.parametrize("keep", [0.5, 0.3])
def test_meteor_stage1_keeps_its_share_of_each_images_own_windows(qwen, pictures, keep):
    """Images of different grids in one batch: each keeps round(keep * its windows) after METEOR's stage 1."""
    model, processor = qwen
    inputs = qwen_inputs(processor, pictures)
    method = mv.Meteor.preset("stage1", encoder_keep=keep)
    logits(model, inputs, method)
    counts = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    kept = [len(tile["vision"]) for s in method.stats for tile in s["kept_grid"]]
    assert kept == [max(1, round(keep * n)) for n in counts] and len(set(counts)) > 1


def test_given_multimodal_position_ids_are_read_as_transformers_passes_them(qwen, pictures):
    """position_ids given as (3, B, T) (what the stock model computes) give the same logits as none given."""
    model, processor = qwen
    inputs = qwen_inputs(processor, pictures)
    positions = stock_positions(model, inputs)
    method = mv.FastV(layer=2, ratio=0.5)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits(model, inputs, method, position_ids=positions)[real], logits(model, inputs, method)[real],
                               atol=1e-5, rtol=0)


TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
            "<|vision_end|> {% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|> "
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
            "{% if add_generation_prompt %} a{% endif %}")


@pytest.mark.parametrize("version", ["2", "2.5", "3", "3-moe", "3.5", "3.5-moe", "glm4v", "glm4v-moe", "glm46v",
                                     "glm46v-moe", "glm-ocr", "paddleocr", "exaone4.5", "ov1.5", "hcx"])
def test_meteor_ask_and_speed_run_a_qwen2_vl_checkpoint_folder(tmp_path, capsys, version):
    """A transformers Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE / GLM-4.1V checkpoint folder (saved model,
    tokenizer, image processor, chat template, where an image is its processor's placeholder) runs under `meteor ask` (the answer greedy generate gives on the chat template's prompt under
    the same method, a heatmap on the merged grid) and `meteor speed` (its prompts in the chat template too, on
    images and on videos), with the processor read back from the folder giving the same inputs; ToMe merges windows inside its encoder."""
    from meteor_vlm.cli import main

    model, processor = tiny(version, seed=3)
    kind, placeholder = type(processor), processor.image_placeholder
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    template = TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", placeholder).replace(
        "<|vision_start|><|video_pad|><|vision_end|>", processor.video_placeholder)
    kind(processor.image_processor, processor.tokenizer, template).save_pretrained(ckpt)
    loaded = kind.from_pretrained(ckpt)
    # how videos' times are written (Qwen3-VL, Qwen3.5: per temporal patch; GLM-4.6V: to a tenth), read from its config
    assert (loaded.timestamps, getattr(loaded, "decimal_seconds", None)) == (processor.timestamps,
                                                                            getattr(processor, "decimal_seconds", None))
    picture = mv.testing.random_images(1, seed=9)[0].resize((48, 32))
    picture.save(tmp_path / "img.png")
    prompt = loaded.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                      {"type": "text", "text": "what is in the image ?"}]}])
    assert prompt == f"{placeholder} what is in the image ? a"
    inputs = loaded(images=[picture], text=[prompt])
    mine = processor(images=[picture], text=["<image> what is in the image ? a"])
    assert inputs.keys() == mine.keys() and all(torch.equal(inputs[k], mine[k]) for k in inputs)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 6  # 48 x 32 px: 6 x 4 patches, 2 x 2
    # EXAONE 4.5's forward takes none, nor LLaVA-OneVision-1.5's or HyperCLOVA X's (EXAONE 4.5's processor)
    assert ("mm_token_type_ids" in inputs) == (version not in ("exaone4.5", "ov1.5", "hcx"))
    heat = tmp_path / "heat.png"
    assert main(["ask", str(tmp_path / "img.png"), "what is in the image ?", "--model", str(ckpt), "--method",
                 "fastv:k1-r0.5", "--max-new-tokens", "3", "--heatmap", str(heat)]) == 0
    out = capsys.readouterr().out
    with mv.FastV(layer=1, ratio=0.5)(model), torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    answer = processor.decode(want[0, inputs["input_ids"].shape[1]:]).strip()
    assert f"answer: {answer}\n" in out and "visual tokens: 6 from the experts" in out
    assert heat.is_file()
    from meteor_vlm.bench.speed import _prompts

    timed = _prompts(loaded, mv.synth.make_split(seed=1, per_family=1, image_size=64)[:2])["input_ids"]
    assert timed[:, -1].tolist() == [loaded.tokenizer.convert_tokens_to_ids("a")] * 2  # the chat template's turn end
    assert main(["speed", "--model", str(ckpt), "--samples", "1", "--new-tokens", "2", "--methods",
                 "unpruned,fastv:k1-r0.5"]) == 0
    assert "fastv:k1-r0.5" in capsys.readouterr().out
    video = ["speed", "--model", str(ckpt), "--video", "4", "--samples", "1", "--new-tokens", "2", "--methods",
             "unpruned,meteor:e0.5-l3"]
    if version == "paddleocr":  # it takes no videos
        assert main(video) == 2 and "PaddleOCR-VL takes no videos" in capsys.readouterr().err
    else:
        assert main(video) == 0  # a video of 4 frames: 2 temporal patches
        assert "a video of 4 frames" in capsys.readouterr().out
    assert main(["ask", str(tmp_path / "img.png"), "what ?", "--model", str(ckpt), "--method", "tome:keep0.5",
                 "--heatmap", str(heat)]) == 0
    assert "stage 1 (in the experts): 3" in capsys.readouterr().out
    with pytest.raises(ValueError, match=re.escape(f"hold 1 {processor.image_token} tokens for 2 images")):
        loaded(images=[picture, picture], text=[prompt])


def test_the_processor_writes_the_image_token_its_tokenizer_names():
    """A tokenizer that names its own image token (`tokenizer.image_token`, as EXAONE 4.5's processor reads it, for the
    models whose processor is that one): the processor writes that token, one per merged visual token, and its
    placeholder holds it; the inputs are the default token's with the ids swapped."""
    from meteor_vlm.models.qwen2_vl import Qwen2VLImageTextProcessor

    _, processor = tiny("hcx", seed=1)
    tokenizer = processor.tokenizer
    picture = mv.testing.random_images(1, seed=9)[0].resize((48, 32))
    default = processor(images=[picture], text=[f"{processor.image_placeholder} what ?"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|IMAGE_PAD|>"]})
    tokenizer.image_token = "<|IMAGE_PAD|>"
    try:
        named = Qwen2VLImageTextProcessor(processor.image_processor, tokenizer, token_types=False)
    finally:
        del tokenizer.image_token
    assert named.image_token == "<|IMAGE_PAD|>" and "<|IMAGE_PAD|>" in named.image_placeholder
    assert processor.image_token == "<|image_pad|>"  # the class's default is left alone
    got = named(images=[picture], text=[f"{named.image_placeholder} what ?"])
    own, old = tokenizer.convert_tokens_to_ids(["<|IMAGE_PAD|>", "<|image_pad|>"])
    assert int((got["input_ids"] == own).sum()) == 6 and not (got["input_ids"] == old).any()
    assert torch.equal(got["input_ids"], default["input_ids"].masked_fill(default["input_ids"] == old, own))
    assert torch.equal(got["pixel_values"], default["pixel_values"])


def video_frames(n: int, size=(48, 32), seed: int = 11):
    """n frames of one size: a video's, already sampled."""
    return [im.resize(size) for im in mv.testing.random_images(n, seed=seed)]


def video_inputs(processor, which=(0, 1, 2)):
    """Prompts with videos: a video then an image; an image then a video; a video alone (3, 2 and 4 frames: 2, 1
    and 2 temporal patches; 12, 4 and 8 visual tokens)."""
    v = processor.video_placeholder
    prompts = [f"{v} what is in the video ? <image>", f"<image> and {v} how many ?", f"describe {v}"]
    videos = [video_frames(3), video_frames(2, (32, 40), seed=12), video_frames(4, (32, 32), seed=13)]
    images = [[mv.testing.random_images(1, seed=14)[0].resize((40, 40))], [video_frames(1, (48, 48), seed=15)[0]], []]
    return processor(images=[im for i in which for im in images[i]] or None, videos=[videos[i] for i in which],
                     text=[prompts[i] for i in which])


def test_the_processor_pairs_a_videos_frames_into_temporal_patches(qwen_video):
    """A video of one frame twice is that frame as an image (the image processor repeats an image over a temporal
    patch); a video of three frames is two temporal patches, its last frame repeated to fill the second; the
    prompt gets one video token per merged token, typed 2."""
    _, processor = qwen_video
    a, b, c = video_frames(3)
    if processor.image_processor.temporal_patch_size == 1:  # LLaVA-OneVision-1.5's: each frame a temporal patch
        three = processor(videos=[[a, b, c]], text=[processor.video_placeholder])
        frames = [processor(images=[f], text=["<image>"])["pixel_values"] for f in (a, b, c)]
        assert three["video_grid_thw"].tolist() == [[3, 4, 6]] and torch.equal(three["pixel_values_videos"],
                                                                                torch.cat(frames))
        return
    same = processor(videos=[[a, a]], text=[processor.video_placeholder])
    image = processor(images=[a], text=["<image>"])
    assert torch.equal(same["pixel_values_videos"], image["pixel_values"])
    assert same["video_grid_thw"].tolist() == image["image_grid_thw"].tolist() == [[1, 4, 6]]
    three = processor(videos=[[a, b, c]], text=[processor.video_placeholder])
    assert three["video_grid_thw"].tolist() == [[2, 4, 6]]
    last = processor(images=[c], text=["<image>"])["pixel_values"]
    torch.testing.assert_close(three["pixel_values_videos"][24:], last, atol=0, rtol=0)
    first = three["pixel_values_videos"][:24].view(24, 3, 2, -1)
    assert torch.equal(first[:, :, 0], image["pixel_values"].view(24, 3, 2, -1)[:, :, 0])
    assert not torch.equal(first[:, :, 1], first[:, :, 0])  # frames a and b side by side
    video_tokens = int((three["input_ids"] == processor.tokenizer.convert_tokens_to_ids(processor.video_token)).sum())
    assert video_tokens == 12
    if processor.token_types:  # not for EXAONE 4.5's or HyperCLOVA X's, whose forwards take none
        assert (three["mm_token_type_ids"] == 2).sum() == 12 and (three["mm_token_type_ids"] == 1).sum() == 0
    with pytest.raises(ValueError, match="hold 1 <\\|video_pad\\|> tokens for 0 videos"):
        processor(text=[processor.video_placeholder])
    if processor.timestamps:  # Qwen3-VL: each temporal patch at the mean time of its frames, as its processor has it
        from transformers import Qwen3VLProcessor

        v, start, end = processor.video_placeholder, "<|vision_start|>", "<|vision_end|>"
        written = processor._timestamped([f"a {v} b"], [5], [3.0], torch.tensor([[3, 4, 6]]))[0]
        times = Qwen3VLProcessor._calculate_timestamps(None, list(range(5)), 3.0, 2)
        patch = start + "<|video_pad|>" * 6 + end
        assert written == "a " + "".join(f"<{t:.1f} seconds>{patch}" for t in times) + " b" and len(times) == 3


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_on_videos_equals_the_stock_model(qwen_video, make):
    """Videos beside images, in either order in a prompt: pruning nothing gives the stock model's logits (its
    per-temporal-patch attention, its video positions)."""
    model, processor = qwen_video
    method = make()
    assert_noop_is_the_stock_model(model, video_inputs(processor), method, logits, logits)
    assert [s["images"] for s in method.stats] == [2, 2, 1]  # images and videos


@pytest.mark.parametrize("version", ["2", "2.5", "3", "3.5"])
def test_windows_dropped_inside_the_encoder_on_videos_equal_the_stock_blocks_run_without_them(version):
    """A test method drops whole merge windows after each block: a video's tokens equal the stock blocks (each
    temporal patch attending within itself) and merger run without them, and the logits equal the stock language
    model with the dropped windows' video tokens masked from layer 0 on, at the stock video positions (Qwen3-VL,
    whose prompt writes each temporal patch apart with its time: with each kept window's DeepStack features)."""
    model, processor = mv.testing.tiny_qwen2_vl(seed=4, version=version, vision_depth=3)
    inputs = video_inputs(processor, which=(0, 2))
    target = adapt(model)
    items = [("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")]
    with torch.no_grad():
        tokens = target.encode_expert(0, {k: inputs[k] for pair in items for k in pair}, DropWindows(4))
        visual, want_at = model.model.visual, []
        for pixels, grids in items:  # the encoder's items: every image, then every video
            starts = [0, *inputs[grids].prod(-1).cumsum(0).tolist()]
            for i, g in enumerate(inputs[grids].tolist()):
                want_at.append(stock_blocks_without(visual, inputs[pixels][starts[i]:starts[i + 1]], g))
        for i, (alive, want, _) in enumerate(want_at):
            assert tokens.grid_index[i][tokens.mask[i]].tolist() == alive.tolist()
            torch.testing.assert_close(tokens.features[i][tokens.mask[i]], want, atol=1e-5, rtol=1e-5)
        assert inputs["video_grid_thw"][:, 0].tolist() == [2, 2] and 0 < len(want_at[1][0]) < 12
        # in the prompts: video 0 (12 tokens), image 0 (4) in row 0; video 1 (8) in row 1
        ids, vis = inputs["input_ids"], inputs["mm_token_type_ids"] > 0
        ib, it = vis.nonzero(as_tuple=True)
        embeds, placed, first = model.get_input_embeddings()(ids), torch.zeros_like(vis), 0
        residuals = [torch.zeros_like(embeds) for _ in getattr(visual, "deepstack_visual_indexes", [])]
        for (alive, want, deepstack), n in zip((want_at[1], want_at[0], want_at[2]), (12, 4, 8)):
            for j, (w, feat) in enumerate(zip(alive.tolist(), want)):
                embeds[ib[first + w], it[first + w]] = feat
                placed[ib[first + w], it[first + w]] = True
                for level, extra in zip(residuals, deepstack):
                    level[ib[first + w], it[first + w]] = extra[j]
            first += n
        assert first == len(ib)
        drop = [(vis[r] & ~placed[r]).nonzero()[:, 0].tolist() for r in range(2)]
        assert_windows_dropped_are_masked(model, inputs, embeds, drop, vis, residuals)


VIDEO_PRUNING = {k: PRUNING[k] for k in ("fastv", "divprune", "meteor-stage1+3", "tome", "evoprune", "visionzip")}


@pytest.mark.parametrize("make", list(VIDEO_PRUNING.values()), ids=list(VIDEO_PRUNING))
def test_every_method_on_videos_obeys_the_batch_and_cache_oracles(qwen_video, make):
    """As for images: decoding goes on after the prompt's last token, where the stock model's positions for the
    grown prompt put the next one (in Qwen2.5-VL a video's temporal positions reach past it)."""
    model, processor = qwen_video
    check_batch_and_cache(model, make(), lambda which: video_inputs(processor, which), grown_inputs,
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


def test_beam_search_keeps_each_prompts_videos_and_images_with_its_rows(qwen_video):
    """Beams repeat each prompt's row, and its images and videos follow it: pruning nothing, beam search equals the
    stock model's; under METEOR cached equals uncached."""
    model, processor = qwen_video
    inputs = video_inputs(processor)
    check_beams_against_the_stock_model(model, inputs, mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0))


def test_video_tokens_that_do_not_match_the_videos_are_refused(qwen_video):
    model, processor = qwen_video
    inputs = video_inputs(processor, which=(0, 2))
    first = int(inputs["video_grid_thw"][0].prod())  # the first video's patches (48; 72 a frame per temporal patch)
    fewer = {**inputs, "video_grid_thw": inputs["video_grid_thw"][:1],
             "pixel_values_videos": inputs["pixel_values_videos"][:first]}
    with pytest.raises(ValueError, match="more videos than the 1 image\\(s\\) and 1 video\\(s\\) given"):
        logits(model, fewer, mv.FastV())
    short = {**inputs, "pixel_values_videos": inputs["pixel_values_videos"][:-1]}
    held = inputs["pixel_values_videos"].shape[0] - 1
    with pytest.raises(ValueError, match=f"pixel_values_videos hold {held} patches but video_grid_thw"):
        logits(model, short, mv.FastV())


def test_qwen2_5_vl_spaces_a_videos_temporal_patches_by_the_seconds_given():
    """Qwen2.5-VL's `second_per_grid_ts` (seconds per temporal patch of each video) spaces its temporal positions:
    pruning nothing equals the stock model with it (and it changes the logits), and beams, which repeat it with
    each prompt's videos, equal the stock model's."""
    model, processor = mv.testing.tiny_qwen2_vl(seed=2, version="2.5")
    inputs = {**video_inputs(processor), "second_per_grid_ts": torch.tensor([0.5, 2.0, 1.5])}
    # the processor gives it from the frames' rates: temporal_patch_size (2) / fps
    v = processor.video_placeholder
    rated = processor(videos=[video_frames(3)] * 3, text=[v] * 3, fps=[4, 1, 4 / 3])
    torch.testing.assert_close(rated["second_per_grid_ts"], inputs["second_per_grid_ts"])
    assert torch.equal(processor(videos=[video_frames(3)], text=[v], fps=2)["second_per_grid_ts"], torch.tensor([1.0]))
    assert "second_per_grid_ts" not in processor(videos=[video_frames(3)], text=[v])
    for bad, message in [(dict(videos=[video_frames(3)], fps=[1, 2]), "one per video"),
                         (dict(videos=[video_frames(3)], fps=0), "one rate > 0"), (dict(fps=2), "no videos")]:
        with pytest.raises(ValueError, match=message):
            processor(text=[v] if "videos" in bad else ["a"], **bad)
    same = logits(model, inputs, mv.NoPruning())
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(same[real], logits(model, inputs)[real], atol=1e-5, rtol=0)
    assert (same[real] - logits(model, {k: v for k, v in inputs.items() if k != "second_per_grid_ts"})[real]).abs().max() > 1e-3
    check_beams_against_the_stock_model(model, inputs, mv.ToMe(keep=0.5))


@pytest.mark.parametrize("kind", ["images", "videos"])
def test_glm4v_greedy_and_beams_give_the_stock_models_scores(pictures, kind):
    """GLM-4.1V, on images and on videos: pruning nothing, greedy decoding equals the stock model's, and beam
    search (each prompt's images or videos following its repeated rows) returns beams whose scores are the stock
    model's log-probabilities of them, recomputed without cache over the whole sequence (the stock model's own beam
    search with its cache does not here: transformers 5.24 returns a beam that scores below the one found); under
    METEOR cached beams equal uncached."""
    model, processor = tiny("glm4v", seed=2)
    inputs = qwen_inputs(processor, pictures) if kind == "images" else glm4v_video_inputs(processor)
    n = inputs["input_ids"].shape[1]
    beams = dict(max_new_tokens=4, min_new_tokens=4, num_beams=3, do_sample=False)
    with torch.no_grad():
        greedy = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with mv.NoPruning()(model):
            assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), greedy)
            out = model.generate(**inputs, **beams, output_scores=True, return_dict_in_generate=True)
        ids = out.sequences
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(ids[:, n:])], 1)
        lp = model(input_ids=ids, attention_mask=mask, **grown_inputs(inputs, ids), use_cache=False).logits.log_softmax(-1)
        want = lp[:, n - 1:-1].gather(2, ids[:, n:, None])[..., 0].sum(1) / 4  # the mean over the 4 new tokens
        torch.testing.assert_close(out.sequences_scores, want, atol=1e-4, rtol=1e-4)
        with mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0)(model):
            cached = model.generate(**inputs, **beams)
            assert torch.equal(cached, model.generate(**inputs, **beams, use_cache=False, query_positions=n - 1))


@pytest.fixture(scope="module", params=["glm4v", "glm4v-moe", "glm46v"], ids=["glm4.1v", "glm4.5v", "glm4.6v-flash"])
def glm4v_video(request):
    return tiny(request.param, seed=2)


def glm4v_video_inputs(processor, which=(0, 1, 2)):
    """GLM-4.1V prompts with videos (3, 2 and 4 frames at 1, 2 and 0.5 fps: 2, 1 and 2 temporal patches; 12, 4 and
    8 visual tokens), and no images: the stock model takes one kind per call."""
    v = processor.video_placeholder
    prompts = [f"{v} what is in the video ?", f"how many ? {v}", f"describe {v}"]
    videos = [video_frames(3), video_frames(2, (32, 40), seed=12), video_frames(4, (32, 32), seed=13)]
    return processor(videos=[videos[i] for i in which], text=[prompts[i] for i in which],
                     fps=[[1.0, 2.0, 0.5][i] for i in which])


def test_the_glm4v_processor_writes_each_temporal_patch_as_an_image_with_its_time(glm4v_video):
    """GLM-4.1V's prompts, as its own processor writes them: each temporal patch of a video an image block (its
    `replace_frame_token_id`) followed by the time of its first frame, in whole seconds (GLM-4.6V's: to a tenth,
    " seconds" after, as `Glm46VProcessor` writes it); the <|image|> tokens
    inside a video typed 2, others 1 (its `create_mm_token_type_ids`); a video of one frame twice has that frame's
    pixels as an image."""
    from types import SimpleNamespace

    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor
    from transformers.models.glm46v.processing_glm46v import Glm46VProcessor

    _, processor = glm4v_video
    a, b, c = video_frames(3)
    five = processor(images=[a], videos=[[a, b, c, a, b]], fps=3.0,
                     text=[f"see <image> then {processor.video_placeholder} ?"])
    assert five["video_grid_thw"].tolist() == [[3, 4, 6]] and five["image_grid_thw"].tolist() == [[1, 4, 6]]
    stock = SimpleNamespace(image_token="<|image|>")
    writer = Glm46VProcessor if processor.decimal_seconds else Glm4vProcessor
    frames = "".join(writer.replace_frame_token_id(stock, t, num_image_tokens=6) for t in (0, 2 / 3, 4 / 3))
    want = ("see <|begin_of_image|>" + "<|image|>" * 6 + "<|end_of_image|> then <|begin_of_video|>" + frames
            + "<|end_of_video|> ?")
    tok = processor.tokenizer
    assert processor._frames([3.0], five["video_grid_thw"]) == [frames]  # as text: the tiny vocabulary lacks "seconds"
    assert five["input_ids"][0].tolist() == tok(want)["input_ids"]
    if processor.decimal_seconds:
        assert frames.endswith("<|end_of_image|>1.3 seconds") and "<|end_of_image|>0.7 seconds" in frames
    else:
        assert frames.count("<|end_of_image|>0") == 2 and frames.endswith("<|end_of_image|>1")
    vocab = tok.convert_tokens_to_ids
    ids = SimpleNamespace(video_start_id=vocab("<|begin_of_video|>"), video_end_id=vocab("<|end_of_video|>"),
                          image_token_id=vocab("<|image|>"))
    assert five["mm_token_type_ids"].tolist() == Glm4vProcessor.create_mm_token_type_ids(ids, five["input_ids"].tolist())
    assert five["mm_token_type_ids"].tolist()[0].count(2) == 18 and five["mm_token_type_ids"].tolist()[0].count(1) == 6
    same = processor(videos=[[a, a]], text=[processor.video_placeholder])
    assert torch.equal(same["pixel_values_videos"], five["pixel_values"])
    for bad, message in [(dict(videos=[[a]], fps=[1, 2]), "one per video"), (dict(fps=2), "no videos"),
                         (dict(videos=[[a], [b]]), "hold 1 <\\|video\\|> tokens for 2 videos")]:
        with pytest.raises(ValueError, match=message):
            processor(text=[processor.video_placeholder if "videos" in bad else "a"], **bad)


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_on_glm4v_videos_equals_the_stock_model(glm4v_video, make):
    """GLM-4.1V and GLM-4.5V videos: pruning nothing gives the stock model's logits (its video features, each
    temporal patch an image of its own, at its video positions); in `stats` each temporal patch counts as an image."""
    model, processor = glm4v_video
    method = make()
    assert_noop_is_the_stock_model(model, glm4v_video_inputs(processor), method, logits, logits)
    assert [s["images"] for s in method.stats] == [2, 1, 2]


@pytest.mark.parametrize("layer", [0, 3])
def test_dropping_at_llm_layer_on_glm4v_videos_equals_masking_keys_at_their_positions(glm4v_video, layer):
    """A drop at LLM layer L on videos = the stock model's video features and video positions (token types 2) run
    layer by layer with those keys masked from L on."""
    model, processor = glm4v_video
    inputs = glm4v_video_inputs(processor, which=(0, 2))
    vis = inputs["mm_token_type_ids"] == 2
    drop = [vis[0].nonzero()[::3, 0].tolist(), vis[1].nonzero()[1::2, 0].tolist()]
    got = logits(model, inputs, lambda m: DropAt(layer, drop)(m))
    with torch.no_grad():
        ids = inputs["input_ids"]
        out = model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        embeds = model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter(vis[..., None].expand_as(embeds), torch.cat(out.pooler_output))
        positions, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], None, inputs["video_grid_thw"],
                                                  attention_mask=inputs["attention_mask"])
        want = masked_decoder_logits(model.model.language_model, model.lm_head, embeds,
                                     inputs["attention_mask"].bool(), drop, layer, positions=positions)
    text = inputs["attention_mask"].bool() & ~vis
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)
    assert (got[text] - logits(model, inputs)[text]).abs().max() > 1e-3


@pytest.mark.parametrize("make", list(VIDEO_PRUNING.values()), ids=list(VIDEO_PRUNING))
def test_every_method_on_glm4v_videos_obeys_the_batch_and_cache_oracles(glm4v_video, make):
    model, processor = glm4v_video
    check_batch_and_cache(model, make(), lambda which: glm4v_video_inputs(processor, which), grown_inputs,
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


def test_glm4v_stage1_keeps_its_share_of_each_temporal_patch_and_refuses_images_beside_videos(glm4v_video, pictures):
    """METEOR's stage 1 keeps half of each temporal patch's windows (rounded), as of an image's; images and videos
    in one call are refused (the stock model cannot take both either), as are videos without their grids."""
    model, processor = glm4v_video
    inputs = glm4v_video_inputs(processor)
    method = mv.Meteor.preset("stage1", encoder_keep=0.5)
    logits(model, inputs, method)
    assert [s["fusion_tokens"] for s in method.stats] == [6, 2, 4]
    assert [[len(cells) for grid in s["kept_grid"] for cells in grid.values()] for s in method.stats] == [[3, 3], [2], [2, 2]]
    both = {**inputs, **{k: v for k, v in qwen_inputs(processor, pictures).items() if k in ("pixel_values", "image_grid_thw")}}
    with pytest.raises(ValueError, match="images or videos, not both"):
        logits(model, both, mv.FastV())
    with pytest.raises(ValueError, match="needs video_grid_thw"):
        logits(model, {k: v for k, v in inputs.items() if k != "video_grid_thw"}, mv.FastV())


def test_the_qwen2_5_omni_thinker_takes_its_generates_audio_flag_and_refuses_audio_and_videos(pictures):
    """Qwen2.5-Omni's `generate` hands its thinker `use_audio_in_video`: while False, greedy generate pruning nothing
    equals the stock thinker's; True, audio and videos are refused while a method is attached."""
    model, processor = tiny("omni", seed=2)
    inputs = qwen_inputs(processor, pictures, which=(0, 1))
    steps = dict(max_new_tokens=3, do_sample=False, use_audio_in_video=False)
    with torch.no_grad():
        stock = model.generate(**inputs, **steps)
        with mv.NoPruning()(model):
            assert torch.equal(model.generate(**inputs, **steps), stock)
    with pytest.raises(ValueError, match="unexpected inputs .*use_audio_in_video"):
        logits(model, {**inputs, "use_audio_in_video": True}, mv.FastV())
    for refused in ({"input_features": torch.zeros(1, 16, 20)},
                    {"pixel_values_videos": inputs["pixel_values"], "video_grid_thw": inputs["image_grid_thw"]}):
        with pytest.raises(ValueError, match=f"videos are not supported .*{next(iter(refused))}"):
            logits(model, {**inputs, **refused}, mv.FastV())
    assert "forward" not in vars(model)
