"""Stock transformers LLaVA (`LlavaForConditionalGeneration`) and LLaVA-NeXT (`LlavaNextForConditionalGeneration`)
under every method: the oracles the project's own model obeys (no-op == stock model, drop == mask, batch == one by
one, cached == uncached)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import meteor_vlm as mv
from meteor_vlm.methods.base import keep_most_attended
from meteor_vlm.models.adapters import adapt, attention_configs
from meteor_vlm.models.llava import LlavaOnevisionImageTextProcessor

from .test_oracles import (PEERS, DropAt, GapsAtOutput, check_batch_and_cache, check_beams_against_the_stock_model,
                          masked_decoder_logits, survivors)

PROMPTS = ["<image> what is in the image ?", "<image> <image> how many red circle are there in the image on the left ?",
           "<image> describe the shape ?"]
IMAGES = [1, 2, 1]  # images per prompt
KINDS = {"clip": dict(tower="clip"), "siglip": dict(tower="siglip"), "next": dict(tower="clip", anyres=True),
         "onevision": dict(onevision=True),
         # one tile's worth of high-resolution patches at most: the one-image prompts' grids are interpolated
         "onevision-interpolated": dict(onevision=True, max_tiles=1),
         # a Mistral decoder whose every layer attends within 12 tokens: an image's 16 and the prompts cross it
         "mistral": dict(tower="clip", decoder="mistral"),
         # Granite Vision: LLaVA-NeXT tiles, a SigLIP tower read at several layers, concatenated, a Granite decoder
         # (its embeddings scaled, image tokens' too; its blocks' outputs scaled)
         "next-layers": dict(tower="siglip", anyres=True, feature_layers=[-2, -4, -1], decoder="granite"),
         # LLaVA-Phi-3: a Phi-3 decoder, one fused q/k/v projection
         "phi3": dict(tower="clip", decoder="phi3"),
         # ViP-LLaVA: a CLIP tower read at layers [-2, -3, 1] without CLS, a LayerNorm in the projector
         "vip": dict(vip=True)}


@pytest.fixture(scope="module", params=list(KINDS))
def llava(request):
    return mv.testing.tiny_llava(seed=2, **KINDS[request.param])


@pytest.fixture(scope="module")
def clip_llava():
    return mv.testing.tiny_llava(seed=2, tower="clip")


@pytest.fixture(scope="module")
def pictures():
    """Random pictures of different aspects (LLaVA-NeXT gives each its own tiles and token count)."""
    rng = np.random.default_rng(4)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 90), (70, 50), (64, 64), (50, 100)]]


def llava_inputs(processor, images, which=(0, 1, 2)):
    """The processor's inputs for PROMPTS[i] with their images (left-padded; for LLaVA-OneVision nested by prompt, so
    that a prompt with two images shows each as its base tile alone)."""
    starts = [sum(IMAGES[:i]) for i in range(len(IMAGES))]
    imgs = [[images[starts[i] + j] for j in range(IMAGES[i])] for i in which]
    if not isinstance(processor, LlavaOnevisionImageTextProcessor):
        imgs = [im for group in imgs for im in group]
    return processor(images=imgs, text=[PROMPTS[i] for i in which], return_tensors="pt", padding=True)


def stock_logits(model, inputs):
    """The stock model's logits, RoPE positions counted over real tokens as generate does with left padding."""
    pos = (inputs["attention_mask"].long().cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(**inputs, position_ids=pos, use_cache=False).logits


def pruned_logits(model, inputs, method, **kw):
    with method(model), torch.no_grad():
        return model(**inputs, use_cache=False, **kw).logits


def stock_embeds(model, inputs):
    """(B, T, D) the stock model's input embeddings: each image's features at its image tokens (and LLaVA-OneVision's
    videos' at their video tokens)."""
    with torch.no_grad():
        ids = inputs["input_ids"]
        embeds = model.get_input_embeddings()(ids)
        if "pixel_values" in inputs:
            sizes = {k: inputs[k] for k in ("image_sizes", "batch_num_images") if k in inputs}
            feats = model.get_image_features(pixel_values=inputs["pixel_values"], **sizes).pooler_output
            feats = torch.cat(feats) if isinstance(feats, (list, tuple)) else feats.flatten(0, 1)  # ViP-LLaVA: a tensor
            embeds = embeds.masked_scatter((ids == model.config.image_token_id)[..., None].expand_as(embeds), feats)
        if "pixel_values_videos" in inputs:
            feats = model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"]).pooler_output.flatten(0, 1)
            embeds = embeds.masked_scatter((ids == model.config.video_token_id)[..., None].expand_as(embeds), feats)
        return embeds


NOOPS = {"none": mv.NoPruning, **{k: noop for k, (noop, _) in PEERS.items()},
         "meteor": lambda: mv.Meteor.preset("stage1+3", encoder_keep=1.0, lam=1e9)}


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_equals_the_stock_model_and_the_block_restores_it(llava, pictures, make):
    model, processor = llava
    inputs = llava_inputs(processor, pictures)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    method = make()
    image_tokens = assert_noop_is_the_stock_model(model, inputs, method, stock_logits, pruned_logits)
    assert [s["fusion_tokens"] for s in method.stats] == image_tokens
    if "image_sizes" not in inputs:  # LLaVA-NeXT counts its tiles as images
        assert [s["images"] for s in method.stats] == IMAGES and image_tokens == [16 * n for n in IMAGES]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def assert_noop_is_the_stock_model(model, inputs, method, stock, pruned) -> list[int]:
    """`method` pruning nothing on a left-padded batch: the stock model's logits (`stock(model, inputs)`) on the
    real columns, every layer seeing every image token, and afterwards the instance unpatched with the same
    outputs. Returns the image tokens per sample."""
    assert (inputs["attention_mask"] == 0).any(), "left padding is exercised"
    before = stock(model, inputs)
    same = pruned(model, inputs, method)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(same[real], before[real], atol=1e-5, rtol=0)
    ids = inputs["input_ids"]
    visual = inputs["mm_token_type_ids"] > 0 if "mm_token_type_ids" in inputs else (
        ids == model.config.image_token_id)  # Qwen2-VL: image and video tokens
    if "pixel_values_videos" in inputs and "mm_token_type_ids" not in inputs:  # LLaVA-OneVision's videos
        visual = visual | (ids == model.config.video_token_id)
    image_tokens = visual.sum(1).tolist()
    assert [s["layer_avg_tokens"] for s in method.stats] == image_tokens
    assert "forward" not in vars(model) and "prepare_inputs_for_generation" not in vars(model)
    torch.testing.assert_close(stock(model, inputs), before, atol=0, rtol=0)
    return image_tokens


def dropped_columns(model, inputs, stats):
    """Per sample, the image-token columns that hold none of the tokens the method kept before the LLM (read
    from `stats['kept_grid']`, one entry per tile) nor a row end: where the adapter's layout puts them."""
    adapter = adapt(model)
    layout = adapter.layout({k: inputs.get(k) for k in adapter.IMAGE_INPUTS})
    is_img = inputs["input_ids"] == model.config.image_token_id
    ib, it = is_img.nonzero(as_tuple=True)
    first = layout.span.cumsum(0) - layout.span
    kept = torch.zeros_like(is_img)
    tiles = [tile["vision"] for s in stats for tile in s["kept_grid"]]
    assert len(tiles) == len(layout.tile_image), "every tile kept a token"
    for t, cells in enumerate(tiles):
        for g in cells:
            offset = int(layout.slot[t, g])
            if offset >= 0:
                k = first[layout.tile_image[t]] + offset
                kept[ib[k], it[k]] = True
    if layout.extra_image is not None:
        k = first[layout.extra_image] + layout.extra_offset
        kept[ib[k], it[k]] = True
    return [(is_img[b] & ~kept[b]).nonzero()[:, 0].tolist() for b in range(is_img.shape[0])]


def bilinear_tokens(grid, kept, h, w):
    """PyTorch's bilinear rule (align_corners=False) shrinking grid (C, H, W) to (h, w), computed here: each output
    the mix of its (up to four) source cells, the weights renormalised over the cells `kept` (H, W) holds, and
    present (else None) where its nearest source (the larger weight on each axis, the later one on a tie) was kept.
    Returns the h * w outputs, row by row."""
    H, W = kept.shape

    def sources(i, n_in, n_out):  # [(index, weight)], the nearest first
        x = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = int(x)
        hi, frac = min(lo + 1, n_in - 1), x - lo
        return [(hi, frac), (lo, 1 - frac)] if frac >= 0.5 else [(lo, 1 - frac), (hi, frac)]
    out = []
    for i in range(h):
        for j in range(w):
            pairs = [(y, x, a * b) for y, a in sources(i, H, h) for x, b in sources(j, W, w)]
            total = sum(wt * kept[y, x] for y, x, wt in pairs)
            mix = sum(wt * kept[y, x] * grid[:, y, x] for y, x, wt in pairs) / total if total else None
            out.append(mix if kept[pairs[0][0], pairs[0][1]] else None)
    return out


def interpolated_embeds(model, inputs, keep):
    """LLaVA-OneVision's input embeddings with the patches `keep` (tiles, N) bool says survived (every image's tiles,
    then every video's frames), computed here from the stock tower and projector, the tiles' grid and PyTorch's
    bilinear rule (`bilinear_tokens`): a token of an interpolated image grid or of a pooled video frame is the mix of
    its source patches renormalised over the kept ones, present where its nearest source was kept; any other token
    is its patch's own feature, present where that was kept (row ends always). Images fill the image tokens and
    videos the video tokens, each in order. Returns embeds (B, T, D) and, per sample, the visual columns not
    present."""
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

    cfg, m = model.config, model.model
    S = cfg.vision_config.image_size
    side = S // cfg.vision_config.patch_size
    budget = int(cfg.vision_aspect_ratio.removeprefix("anyres_max_")) * side * side
    per_prompt = inputs["batch_num_images"].tolist() if "batch_num_images" in inputs else []
    alone = [k == 1 for k in per_prompt for _ in range(k)]
    t0 = 0

    def projected(pixels, count):  # (count, N, D), and the next `count` tiles of keep as (count, N) floats
        nonlocal t0
        k = keep[t0:t0 + count].float()
        t0 += count
        return m.multi_modal_projector(m.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]), k

    def as_grid(x):  # (N, C) -> (C, side, side)
        return x.T.reshape(-1, side, side)
    image_tokens, video_tokens = [], []  # (D,) features in order, None where absent
    with torch.no_grad():
        for pixels, size, one in zip(inputs.get("pixel_values", []), inputs.get("image_sizes", []), alone):
            nh, nw = get_anyres_image_grid_shape(size.tolist(), cfg.image_grid_pinpoints, S) if one else (0, 0)
            f, k = projected(pixels[:1 + nh * nw], 1 + nh * nw)
            image_tokens += [f[0, g] if k[0, g] else None for g in range(side * side)]
            if nh * nw:
                def stitch(x):  # (tiles, N, C) -> (C, H, W), unpadded
                    x = x[1:].reshape(nh, nw, side, side, -1).permute(4, 0, 2, 1, 3).reshape(-1, nh * side, nw * side)
                    return unpad_image(x, size)
                grid, kept = stitch(f), stitch(k[..., None])[0]
                H, W = kept.shape
                ratio = (H * W / budget) ** 0.5
                h, w = (int(H // ratio), int(W // ratio)) if ratio > 1.1 else (H, W)
                rows = bilinear_tokens(grid, kept, h, w)
                for i in range(h):
                    image_tokens += rows[i * w:(i + 1) * w] + [m.image_newline]
            else:
                image_tokens.append(m.image_newline)
        for frames in inputs.get("pixel_values_videos", []):
            f, k = projected(frames, len(frames))
            pooled = -(-side // 2)
            for x, kx in zip(f, k):
                video_tokens += bilinear_tokens(as_grid(x), as_grid(kx[:, None])[0], pooled, pooled)
            video_tokens.append(m.image_newline)
        assert t0 == len(keep), "every tile and frame"
        ids = inputs["input_ids"]
        embeds = model.get_input_embeddings()(ids)
        drop = [[] for _ in range(ids.shape[0])]
        for token, tokens in [(cfg.image_token_id, image_tokens), (cfg.video_token_id, video_tokens)]:
            place_tokens(embeds, ids == token, tokens, drop)
    return embeds, drop


def place_tokens(embeds, columns, tokens, drop):
    """Write `tokens` ((D,) features, or None where absent) into `embeds` (B, T, D) at the `columns` (B, T) holding
    them, in row-major order, and add each absent one's column to its sample's list in `drop`."""
    ib, it = columns.nonzero(as_tuple=True)
    assert len(tokens) == len(ib), "the tokens the prompts hold"
    for b, t, x in zip(ib.tolist(), it.tolist(), tokens):
        if x is None:
            drop[b].append(t)
        else:
            embeds[b, t] = x


@pytest.mark.parametrize("make", [lambda: mv.DivPrune(keep=0.4), GapsAtOutput], ids=["divprune", "count-per-image"])
def test_pruning_before_the_llm_equals_masking_those_image_columns_from_layer_0(llava, pictures, make):
    """Tokens selected (not changed) before the LLM, the same count per image or not: the stock model with the
    other patches' image columns masked from layer 0 on, every kept token at its own column's RoPE position.
    (Where LLaVA-OneVision interpolates an image's grid, pruning also changes the mixes: see
    `test_llava_onevision_prunes_the_images_whose_patches_it_interpolates`.)"""
    model, processor = llava
    inputs = llava_inputs(processor, pictures)
    if adapt(model).layout({k: inputs.get(k) for k in adapt(model).IMAGE_INPUTS}).mixed is not None:
        pytest.skip("an interpolated grid: its tokens' mixes change too")
    method = make()
    got = pruned_logits(model, inputs, method)
    assert [s["images"] for s in method.stats] == IMAGES  # images, not tiles
    counts = [len(tile["vision"]) for s in method.stats for tile in s["kept_grid"]]
    assert isinstance(method, mv.DivPrune) or len(set(counts)) > 1, f"images keep different counts: {counts}"
    drop = dropped_columns(model, inputs, method.stats)
    assert all(len(d) > 0 for d in drop)
    lm = model.model.language_model
    want = masked_decoder_logits(lm, model.lm_head, stock_embeds(model, inputs), inputs["attention_mask"].bool(), drop, 0)
    text = inputs["attention_mask"].bool() & (inputs["input_ids"] != model.config.image_token_id)
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)
    assert (got[text] - stock_logits(model, inputs)[text]).abs().max() > 1e-3, "the pruning changed the answer"


@pytest.mark.parametrize("layer", [0, 3])
def test_dropping_at_llm_layer_equals_masking_keys_from_that_layer_on(llava, pictures, layer):
    model, processor = llava
    assert_drop_at_layer_is_masking(model, llava_inputs(processor, pictures, which=(0, 1)), layer)


def assert_drop_at_layer_is_masking(model, inputs, layer):
    """Dropping some visual tokens (image tokens, and video tokens where videos are given) of the two prompts of
    `inputs` before LLM layer `layer` gives, on the text, the stock decoder with those keys masked from `layer` on,
    which differs from the stock model's logits."""
    vis = inputs["input_ids"] == model.config.image_token_id
    if "pixel_values_videos" in inputs:
        vis = vis | (inputs["input_ids"] == model.config.video_token_id)
    drop = [vis[0].nonzero()[::3, 0].tolist(), vis[1].nonzero()[1::2, 0].tolist()]
    got = pruned_logits(model, inputs, DropAt(layer, drop))
    lm = model.model.language_model
    want = masked_decoder_logits(lm, model.lm_head, stock_embeds(model, inputs), inputs["attention_mask"].bool(), drop,
                                 layer)
    text = inputs["attention_mask"].bool() & ~vis
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)
    assert (got[text] - stock_logits(model, inputs)[text]).abs().max() > 1e-3


PRUNING = {**{k: prune for k, (_, prune) in PEERS.items()},
           "meteor-stage1+3": lambda: mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0)}


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_on_llava_obeys_the_batch_and_cache_oracles(llava, pictures, make):
    """A left-padded batch of 3 (1 or 2 images) = its samples alone; greedy generate with the KV cache = step by
    step recomputation without it; and the method pruned something."""
    model, processor = llava
    check_batch_and_cache(model, make(), lambda which: llava_inputs(processor, pictures, which),
                          lambda batch, ids: {k: batch[k] for k in ("pixel_values", "image_sizes", "batch_num_images")
                                                 if k in batch},
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


def test_llava_inputs_and_settings_it_cannot_run_get_clear_errors(clip_llava, images):
    model, processor = clip_llava
    inputs = llava_inputs(processor, images, which=(0,))
    with pytest.raises(ValueError, match=r"image tokens but the 2 image\(s\) given need \[16, 16\]"):
        pruned_logits(model, {**inputs, "pixel_values": torch.cat([inputs["pixel_values"]] * 2)}, mv.FastV())
    with pytest.raises(ValueError, match="needs at least two experts"):
        pruned_logits(model, inputs, mv.Meteor.preset("paper-242"))
    with pytest.raises(ValueError, match="not supported"):
        pruned_logits(model, {**inputs, "labels": inputs["input_ids"]}, mv.FastV())
    with pytest.raises(ValueError, match="past the model's depth"):
        pruned_logits(model, inputs, mv.FastV(layer=6))
    assert "forward" not in vars(model)
    for key, value, message in [("vision_feature_layer", [], "an empty list"),
                                ("vision_feature_layer", [0, -1], "outside the tower"),
                                ("vision_feature_select_strategy", "full", "not supported"),
                                ("vision_feature_layer", -6, "outside the tower")]:
        old = getattr(model.config, key)
        setattr(model.config, key, value)
        try:
            with pytest.raises(ValueError, match=message):
                pruned_logits(model, inputs, mv.FastV())
        finally:
            setattr(model.config, key, old)
    with pytest.raises(ValueError, match="image_sizes are not supported"):
        pruned_logits(model, {**inputs, "image_sizes": torch.tensor([[32, 32]])}, mv.FastV())
    next_model, next_processor = mv.testing.tiny_llava(seed=2, anyres=True)
    next_inputs = llava_inputs(next_processor, images, which=(0,))
    with pytest.raises(ValueError, match="needs image_sizes"):
        pruned_logits(next_model, {k: v for k, v in next_inputs.items() if k != "image_sizes"}, mv.FastV())
    with pytest.raises(ValueError, match="image tokens but the 1 image"):  # a wider image needs other tiles
        pruned_logits(next_model, {**next_inputs, "image_sizes": torch.tensor([[32, 64]])}, mv.FastV())
    with pytest.raises(ValueError, match="unsupported model class Linear.*LlavaForConditionalGeneration.*LlavaNext"):
        with mv.FastV()(torch.nn.Linear(2, 2)):
            pass


@pytest.mark.parametrize("kind, depths", [(dict(tower="siglip", feature_layers=[-2, -4, -1]), (3, 1, 4)),
                                          (dict(tower="clip", feature_layers=[-2, -4, -1]), (3, 1, 4)),
                                          (dict(vip=True), (3, 2, 1))], ids=["siglip", "clip", "vip"])
def test_patches_dropped_in_a_tower_read_at_several_layers_equal_the_stock_blocks_run_without_them(pictures, kind,
                                                                                                   depths):
    """LLaVA reading its features at several layers (`vision_feature_layer` [-2, -4, -1] of 4 blocks, out of order on
    purpose; ViP-LLaVA's [-2, -3, 1]): after each pruning point a test method drops patches, and each kept token's features equal the stock blocks run
    on the patches left, its hidden states at those layers concatenated in the config's order, through the stock
    projector; the logits equal the stock decoder with those tokens at their image tokens and the dropped patches'
    masked from layer 0 on."""
    from .test_internvl import assert_windows_dropped_match

    model, processor = mv.testing.tiny_llava(seed=2, **kind)
    inputs = llava_inputs(processor, pictures, which=(0, 1))

    def stock_tower_without(model, pixels):
        tower = model.model.vision_tower
        hidden = tower.embeddings(pixels)
        if tower_has_cls := hasattr(tower, "pre_layrnorm"):  # CLIP: the CLS in front, never dropped
            hidden = tower.pre_layrnorm(hidden)
        alive, seen = torch.arange(hidden.shape[1] - tower_has_cls), {}
        points = adapt(model).runners[0].pruning_points()  # the blocks after which the method drops (0, 2, 3)
        for b, block in enumerate(tower.encoder.layers):
            hidden = block(hidden, attention_mask=None)
            kept = survivors(alive, points.index(b), 3) if b in points else alive
            keep = torch.cat([torch.ones(int(tower_has_cls), dtype=torch.bool), torch.isin(alive, kept)])
            hidden, alive = hidden[:, keep], kept
            seen[b + 1] = (alive, hidden[:, int(tower_has_cls):])  # the hidden states after b + 1 blocks
        layers = [seen[d][1][:, torch.isin(seen[d][0], alive)] for d in depths]
        return alive, model.model.multi_modal_projector(torch.cat(layers, -1))

    assert_windows_dropped_match(model, inputs, {"pixel_values": inputs["pixel_values"]}, stock_tower_without,
                                 model.model.language_model, per_tile=16)


@pytest.mark.parametrize("family", ["llava", "llava-onevision", "llava-next-video", "qwen2-vl", "internvl", "gemma3",
                                    "mistral3"])
def test_a_model_loaded_with_eager_attention_runs_sdpa_inside_the_block(family, pictures, tile_pictures):
    """The runtime hands the language model's layers boolean masks and the vision blocks additive ones, which SDPA
    reads: a model loaded with eager attention (or flash attention, on a GPU) runs SDPA inside the block, equal to
    the stock model's eager logits pruning nothing, and has its own attention back after the block."""
    from .test_internvl import inputs_for

    if family == "qwen2-vl":
        model, processor = mv.testing.tiny_qwen2_vl(seed=2)
        inputs = processor(images=[p.resize((40, 24)) for p in pictures[:3]], text=PROMPTS[:2])
    elif family == "internvl":
        model, processor = mv.testing.tiny_internvl(seed=2)
        inputs = inputs_for(processor, tile_pictures, which=(0, 1))
    elif family == "gemma3":  # sliding-window layers and image blocks in eager's own masks
        from .test_gemma3 import inputs_for as gemma3_inputs

        model, processor = mv.testing.tiny_gemma3(seed=2)
        inputs = gemma3_inputs(processor, pictures, which=(0, 1))
    elif family == "mistral3":  # the Pixtral tower's own block mask over images of two sizes
        model, processor = mv.testing.tiny_mistral3(seed=2)
        inputs = processor(images=[[pictures[0]], [pictures[1], pictures[2]]],
                           text=["[IMG] what is in the image ?", "[IMG] [IMG] how many ?"])
    elif family == "llava-next-video":  # its frames' pooled windows beside images
        from .test_llava_next_video import video_inputs

        model, processor = mv.testing.tiny_llava(seed=2, video="average")
        inputs = video_inputs(processor, pictures, which=(0, 1))
    else:
        model, processor = mv.testing.tiny_llava(seed=2, onevision=family == "llava-onevision")
        inputs = llava_inputs(processor, pictures, which=(0, 1))
    model.set_attn_implementation("eager")
    with torch.no_grad():  # Qwen2-VL's multimodal positions from its own get_rope_index
        stock = model(**inputs, use_cache=False).logits if family == "qwen2-vl" else stock_logits(model, inputs)
    method = mv.NoPruning()
    with method(model), torch.no_grad():
        inside = [c._attn_implementation for c in attention_configs(model.config)]
        same = model(**inputs, use_cache=False).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(same[real], stock[real], atol=1e-5, rtol=0)
    assert set(inside) == {"sdpa"} and {c._attn_implementation for c in attention_configs(model.config)} == {"eager"}
    with mv.FastV(layer=1, ratio=0.5)(model), torch.no_grad():
        pruned = model(**inputs, use_cache=False).logits
    model.set_attn_implementation("sdpa")
    with mv.FastV(layer=1, ratio=0.5)(model), torch.no_grad():
        torch.testing.assert_close(model(**inputs, use_cache=False).logits, pruned, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llava", "next", "onevision", "vip"])
def test_meteor_ask_and_speed_run_a_llava_checkpoint_folder(tmp_path, capsys, kind):
    """A transformers LLaVA / LLaVA-NeXT / LLaVA-OneVision / ViP-LLaVA checkpoint folder (saved model and processor) runs under
    `meteor ask` (the answer greedy generate gives under the same method, the kept tokens, a heatmap) and `meteor
    speed`; the commands built on the project's own model refuse it clearly."""
    from meteor_vlm.cli import main

    model, processor = mv.testing.tiny_llava(seed=3, anyres=kind == "next", onevision=kind == "onevision",
                                             vip=kind == "vip")
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    picture = mv.testing.random_images(1, seed=9)[0].resize((80, 48))
    picture.save(tmp_path / "img.png")
    ckpt, heat = str(tmp_path / "ckpt"), tmp_path / "heat.png"
    assert main(["ask", str(tmp_path / "img.png"), "what is in the image ?", "--model", ckpt, "--method", "visionzip:keep0.5",
                 "--max-new-tokens", "3", "--heatmap", str(heat)]) == 0
    out = capsys.readouterr().out
    inputs = processor(images=[picture], text=["<image> what is in the image ?"], return_tensors="pt")
    with mv.VisionZip(keep=0.5)(model) as method, torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    answer = processor.decode(want[0, inputs["input_ids"].shape[1]:]).strip()
    assert f"answer: {answer}\n" in out and f"stage 1 (in the experts): {method.stats[0]['stage1_tokens']}" in out
    assert heat.is_file()
    assert main(["speed", "--model", ckpt, "--samples", "1", "--new-tokens", "2", "--methods", "unpruned,fastv:k1-r0.5"]) == 0
    assert "fastv:k1-r0.5" in capsys.readouterr().out
    if kind == "onevision":  # videos of 2 frames: 2 x 4 pooled tokens and a row end
        assert main(["speed", "--model", ckpt, "--samples", "2", "--new-tokens", "2", "--video", "2", "--methods",
                     "unpruned,tome:keep0.5", "--out", str(tmp_path)]) == 0
        assert "a video of 2 frames" in capsys.readouterr().out
        rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
        assert rows[0]["tokens"] == 9 > rows[1]["tokens"]
    assert main(["ask", str(tmp_path / "img.png"), "what ?", "--model", ckpt]) == 2  # paper-242 needs two experts
    assert "needs at least two experts" in capsys.readouterr().err
    assert main(["calibrate", "--model", ckpt, "--synthetic", "2", "--out", str(tmp_path / "ranks.json")]) == 2
    assert "`meteor ask`, `meteor speed` and `meteor bench` run it" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as patch:  # refused before the model is loaded
        patch.setattr("meteor_vlm.cli._load", lambda *a, **k: pytest.fail("demo loaded the folder"))
        assert main(["demo", "--model", ckpt]) == 2
    assert "run `meteor bench --model PATH --methods ...`" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["llava", "qwen2-vl"])
def test_meteor_bench_asks_a_stock_vlm_folder_the_synthetic_questions(tmp_path, capsys, kind):
    """`meteor bench --model PATH` on a stock VLM's folder: each method's row holds, per sample, whether the first
    word of its greedy reply to the question and "Answer with a single word or number." (the processor's prompt,
    its chat template where it has one) is the answer, recomputed here with the folder's model and processor; the
    tokens are the image's unpruned count for the unpruned row and fewer for the others."""
    from meteor_vlm.bench.accuracy import SHORT_ANSWER, first_word
    from meteor_vlm.bench.speed import _image_side, stock_prompt
    from meteor_vlm.cli import _load, main
    from meteor_vlm import synth

    model, processor = mv.testing.tiny_llava(seed=3) if kind == "llava" else mv.testing.tiny_qwen2_vl(seed=3)
    # the reply always starts with "yes" (a bias its generation config keeps), so some answers are right
    model.generation_config.sequence_bias = [[[processor.tokenizer.convert_tokens_to_ids("yes")], 100.0]]
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    names = ["unpruned", "fastv:k1-r0.5", "tome:keep0.5"]
    assert main(["bench", "--model", str(ckpt), "--samples", "2", "--methods", ",".join(names), "--seed", "7",
                 "--out", str(tmp_path / "out")]) == 0
    assert "tome:keep0.5" in capsys.readouterr().out
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    model, processor = _load(str(ckpt), llava=True)
    samples = synth.make_split(7, 2, image_size=_image_side(processor))
    for row, make in zip(rows, [mv.NoPruning, lambda: mv.FastV(layer=1, ratio=0.5), lambda: mv.ToMe(keep=0.5)]):
        hits, tokens = [], []
        for s in samples:
            inputs = processor(images=[s.image], text=[stock_prompt(processor, s.question + SHORT_ANSWER)],
                               return_tensors="pt")
            with make()(model) as method, torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
            reply = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            hits.append(str(int(first_word(reply) == s.answer)))
            tokens.append(method.stats[0]["layer_avg_tokens"])
        assert row["correct"] == "".join(hits) and "1" in hits and "0" in hits
        assert row["tokens"] == pytest.approx(sum(tokens) / len(tokens))
    assert rows[0]["tokens"] > max(rows[1]["tokens"], rows[2]["tokens"])


def test_first_word_reads_a_reply_as_the_synthetic_answers_are_written():
    from meteor_vlm.bench.accuracy import first_word

    assert [first_word(r) for r in ["Three.", " Yes, it is.", "circle", "12 bars", "", "Pig!"]] == [
        "3", "yes", "circle", "12", "", "pig"]


@pytest.mark.parametrize("family", ["llava", "llava-next", "qwen2-vl", "qwen2.5-vl", "gemma3", "mistral3"])
def test_text_only_prompts_beside_an_image_or_alone_equal_the_stock_model(family):
    """A batch whose first prompt has no image, and a batch with no image at all: pruning nothing gives the stock
    model's logits, and generation under a method runs."""
    pics = mv.testing.random_images(1, seed=4)
    if family.startswith("qwen"):
        model, processor = mv.testing.tiny_qwen2_vl(seed=1, version="2" if family == "qwen2-vl" else "2.5")
        batches = [processor(images=[pics[0].resize((40, 24))], text=["what is red ?", "<image> what is in the image ?"]),
                   processor(images=None, text=["what is red ?", "a b c what is in it"])]
    elif family == "gemma3":  # token_type_ids with no image token, and no image at all
        model, processor = mv.testing.tiny_gemma3(seed=1)
        batches = [dict(processor(images=[[], [pics[0]]], text=["what is red ?", "<start_of_image> what is in the image ?"],
                                  return_tensors="pt", padding=True)),
                   dict(processor(text=["what is red ?", "a b c what is in it"], return_tensors="pt", padding=True))]
    elif family == "mistral3":
        model, processor = mv.testing.tiny_mistral3(seed=1)
        batches = [processor(images=[[], [pics[0]]], text=["what is red ?", "[IMG] what is in the image ?"]),
                   processor(text=["what is red ?", "a b c what is in it"])]
    else:
        model, processor = mv.testing.tiny_llava(seed=1, anyres=family == "llava-next")
        batches = [dict(processor(images=[pics[0]], text=["what is red ?", "<image> what is in the image ?"],
                                  return_tensors="pt", padding=True)),
                   dict(processor(text=["what is red ?", "a b c what is in it"], return_tensors="pt", padding=True))]
    for inputs in batches:
        assert (inputs["attention_mask"] == 0).any()
        pos = {} if family.startswith("qwen") else {"position_ids": (inputs["attention_mask"].cumsum(1) - 1).clamp_min(0)}
        with torch.no_grad():
            want = model(**inputs, **pos).logits
            with mv.NoPruning()(model) as method:
                got = model(**inputs).logits
            with mv.FastV(layer=1, ratio=0.5)(model):
                model.generate(**inputs, max_new_tokens=2, do_sample=False)
        real = inputs["attention_mask"].bool()
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
        assert method.stats[0]["images"] == 0


class FirstPatchesThenFastV(mv.PruningMethod):
    """Test method: the tower hands on its first 4 patches only (so an image's last patch never enters the LLM),
    then FastV's rule at LLM layer 1, which reads the query token's attention."""

    name = "first-patches-then-fastv-test"

    def __init__(self):
        self.stats = []

    def encoder_blocks(self, num_blocks):
        return [num_blocks - 1]

    def prune_encoder(self, ctx):
        return torch.arange(4).expand(ctx.tokens.shape[0], -1)

    def llm_layers(self, num_layers):
        return {1}

    def prune_llm(self, ctx):
        last = torch.where(ctx.valid, torch.arange(ctx.valid.shape[1]), -1).max(1).values
        assert torch.equal(ctx.query_index, last), "the query is the last token still present"
        return keep_most_attended(ctx, torch.full_like(ctx.query_index, 2))


def test_a_prompt_ending_with_an_image_queries_its_last_token_still_present(clip_llava, pictures):
    """When the query column (the prompt's last) is an image token that pruning before the LLM removed, stage 3
    queries the last token still present (here that image's last kept patch), alone and in a batch."""
    model, processor = clip_llava
    prompts = ["what is in the image ? <image>", "<image> how many red circle are there in the image ?"]
    method = FirstPatchesThenFastV()
    with method(model), torch.no_grad():
        batch_in = processor(images=pictures[:2], text=prompts, return_tensors="pt", padding=True)
        batch = model(**batch_in, use_cache=False).logits
        for b in range(2):
            alone = model(**processor(images=[pictures[b]], text=[prompts[b]], return_tensors="pt"), use_cache=False).logits[0]
            torch.testing.assert_close(batch[b, -alone.shape[0]:], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "llava-next", "llava-onevision", "llava-onevision-interpolated",
                                    "llava-onevision-video", "qwen2-vl"])
def test_beam_search_keeps_each_prompts_images_with_its_rows(family, pictures):
    """generate with beams repeats each prompt's row; its images must follow as a group (a prompt with two images
    would otherwise get the wrong ones): pruning nothing, beam search equals the stock model's, and under a method
    beam search with the cache equals it without (stage 3 querying the prompt's last token)."""
    if family == "qwen2-vl":
        model, processor = mv.testing.tiny_qwen2_vl(seed=2)
        inputs = processor(images=[p.resize((40, 24)) for p in pictures[:3]], text=PROMPTS[:2])
    else:
        model, processor = mv.testing.tiny_llava(seed=2, anyres=family == "llava-next",
                                                 onevision=family.startswith("llava-onevision"),
                                                 max_tiles=1 if family.endswith("interpolated") else 9)
        inputs = llava_inputs(processor, pictures, which=(0, 1))
        if family.endswith("video"):
            inputs = onevision_video_inputs(processor, pictures, which=(0, 1))
    check_beams_against_the_stock_model(model, inputs, mv.FastV(layer=1, ratio=0.5))


def test_the_stage_1_and_3_bench_name_runs_meteor_on_one_tower(clip_llava, pictures):
    """`meteor:e<keep>-l<lambda>` is METEOR without its fusion stage at a chosen budget: it runs on a LLaVA (where
    the three-stage names refuse) and keeps that share of the tower's patches after stage 1."""
    from meteor_vlm.bench.accuracy import make_method

    model, processor = clip_llava
    method = make_method("meteor:e0.5-l3")
    assert isinstance(method, mv.Meteor) and not method.fusion and method.encoder and method.llm
    pruned_logits(model, llava_inputs(processor, pictures), method)
    assert [s["stage1_tokens"] for s in method.stats] == [8 * n for n in IMAGES]
    assert all(s["stage3"] for s in method.stats)
    with pytest.raises(ValueError, match="needs at least two experts"):
        pruned_logits(model, llava_inputs(processor, pictures), make_method("meteor:e0.5-f0.5-l3"))


class SpreadGaps(GapsAtOutput):
    """Test method: at the tower's output, drop the patches of every tile where (5 * patch + tile) % 3 == 0, the
    first patch kept (a different count per tile, gaps all over each grid)."""

    def prune_encoder(self, ctx):
        B, N = ctx.patches.shape[:2]
        keep = (torch.arange(N)[None] * 5 + torch.arange(B)[:, None]) % 3 != 0
        keep[:, 0] = True
        self.kept[ctx.expert] = keep
        return mv.ops.mask_to_padded_indices(keep)


def assert_spread_gaps_leave_the_mixes_of_the_patches_kept(model, inputs) -> int:
    """On LLaVA-OneVision: keeping every patch, `interpolated_embeds` is the stock model's embedding; under
    `SpreadGaps`, the logits are the stock LLM's on `interpolated_embeds` of the patches kept, the absent tokens
    masked from layer 0 on (which the stock features so masked are not), and `stats` count the tokens present.
    Returns the tiles and frames the tower encoded."""
    adapter = adapt(model)
    tiles = len(adapter.tiles({k: inputs.get(k) for k in adapter.IMAGE_INPUTS}))
    stock = stock_embeds(model, inputs)
    every, _ = interpolated_embeds(model, inputs, torch.ones(tiles, 16, dtype=torch.bool))
    torch.testing.assert_close(every, stock, atol=1e-6, rtol=1e-6)
    method = SpreadGaps()
    got = pruned_logits(model, inputs, method)
    keep = method.kept["vision"]
    embeds, drop = interpolated_embeds(model, inputs, keep)
    ids = inputs["input_ids"]
    visual = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
    assert [s["fusion_tokens"] for s in method.stats] == [int(n) - len(d) for n, d in zip(visual.sum(1), drop)]
    assert all(len(d) > 0 for d in drop) and not keep.all()
    lm = model.model.language_model
    want = masked_decoder_logits(lm, model.lm_head, embeds, inputs["attention_mask"].bool(), drop, 0)
    text = inputs["attention_mask"].bool() & ~visual
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)
    masked = masked_decoder_logits(lm, model.lm_head, stock, inputs["attention_mask"].bool(), drop, 0)
    assert (got[text] - masked[text]).abs().max() > 1e-3, "the mixes changed: the stock features masked are not it"
    return tiles


def test_llava_onevision_prunes_the_images_whose_patches_it_interpolates(pictures):
    """Where an image's high-resolution patches exceed the model's budget (here one tile's worth), the stock model
    interpolates their grid. Patches dropped at the tower's output (a different count per image): each such token is
    present where its nearest patch survived, as the bilinear mix of the surviving patches, renormalised (computed
    here from the tiles' geometry, `interpolated_embeds`), the absent ones masked from layer 0 on; the images of the
    two-image prompt (base tiles alone) are not interpolated. Keeping every patch, the same computation is the stock
    model's embedding."""
    model, processor = mv.testing.tiny_llava(seed=2, onevision=True, max_tiles=1)
    inputs = llava_inputs(processor, pictures)
    adapter = adapt(model)
    packs = adapter.layout({k: inputs.get(k) for k in adapter.IMAGE_INPUTS}).mixed.packs
    assert [pack is not None for pack in packs] == [True, False, False, True]
    assert_spread_gaps_leave_the_mixes_of_the_patches_kept(model, inputs)
    with pytest.raises(ValueError, match=r"batch_num_images \[1, 2, 2\] do not add up to the 4 images"):
        pruned_logits(model, {**inputs, "batch_num_images": torch.tensor([1, 2, 2])}, mv.FastV())


VIDEO_PROMPTS = ["<video> <image> what is in the image ?", "<image> <video> <image> how many red circle are there ?",
                 "<video> describe the shape ?"]


@pytest.fixture(scope="module")
def onevision():
    return mv.testing.tiny_llava(seed=2, onevision=True)


def onevision_video_inputs(processor, pictures, which=(0, 1, 2), frames=3):
    """VIDEO_PROMPTS[i] with their images (one, two, none) and a video of `frames` random frames each: images and
    videos in either order, a prompt with a video alone; left-padded."""
    rng = np.random.default_rng(7)
    images = {0: [pictures[0]], 1: [pictures[1], pictures[2]], 2: []}
    videos = [[Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)) for _ in range(frames)]
              for _ in range(3)]
    nested = [images[i] for i in which]
    return processor(images=nested if any(nested) else None, videos=[videos[i] for i in which],
                     text=[VIDEO_PROMPTS[i] for i in which], return_tensors="pt", padding=True)


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_llava_onevision_videos_pruning_nothing_equals_the_stock_model(onevision, pictures, make):
    """Videos (each frame pooled to half its side, a row end after the video) beside images, before or after them,
    or alone: pruning nothing is the stock model, and `stats` count a sample's images and videos."""
    model, processor = onevision
    assert_videos_noop_is_the_stock_model(model, onevision_video_inputs(processor, pictures), make())


def assert_videos_noop_is_the_stock_model(model, inputs, method):
    """`assert_noop_is_the_stock_model` on the three video prompts (a video and an image; an image, a video, an image;
    a video alone): every visual token enters the LLM, and `stats` count 2, 3 and 1 images and videos."""
    image_tokens = assert_noop_is_the_stock_model(model, inputs, method, stock_logits, pruned_logits)
    assert [s["fusion_tokens"] for s in method.stats] == image_tokens
    assert [s["images"] for s in method.stats] == [2, 3, 1]


def test_llava_onevision_video_frames_pruned_in_the_tower_leave_the_mixes_of_the_patches_kept(onevision, pictures):
    """Patches dropped at the tower's output in every tile and frame: a video's pooled token is present where its
    nearest patch survived, as the bilinear mix of its frame's surviving patches, renormalised (computed here,
    `interpolated_embeds`), the absent tokens masked from layer 0 on; keeping every patch, that computation is the
    stock model's embedding."""
    model, processor = onevision
    inputs = onevision_video_inputs(processor, pictures)
    tiles = assert_spread_gaps_leave_the_mixes_of_the_patches_kept(model, inputs)
    assert tiles == (1 + 2) + 2 + 3 * 3  # an image: base and two tiles; two base tiles alone; three videos, 3 frames


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_on_llava_onevision_videos_obeys_the_batch_and_cache_oracles(onevision, pictures, make):
    model, processor = onevision
    check_batch_and_cache(model, make(), lambda which: onevision_video_inputs(processor, pictures, which),
                          lambda batch, ids: {k: batch[k] for k in ("pixel_values", "image_sizes", "batch_num_images",
                                                                      "pixel_values_videos") if k in batch},
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


def test_llava_onevision_video_inputs_it_cannot_run_get_clear_errors(onevision, pictures):
    model, processor = onevision
    assert_bad_videos_refused(model, processor, onevision_video_inputs(processor, pictures, which=(2,)))
    twice = processor(videos=[[pictures[0]] * 2], text=["<video> a"], return_tensors="pt")
    image = processor(images=[[pictures[0]]], text=["<image> a"], return_tensors="pt")
    assert torch.equal(twice["pixel_values_videos"][0, 1], image["pixel_values"][0, 0]), "a frame is its image's base tile"


def assert_bad_videos_refused(model, processor, inputs):
    """A prompt with one video of 3 frames of 32 px (`inputs`): given too few frames, or videos not 5-dimensional, the
    pruned model raises a clear ValueError; the processor refuses videos of different lengths in one batch."""
    with pytest.raises(ValueError, match=r"the prompts hold more videos than the 0 image\(s\) and 1 video\(s\) given"):
        pruned_logits(model, {**inputs, "pixel_values_videos": inputs["pixel_values_videos"][:, :2]}, mv.FastV())
    with pytest.raises(ValueError, match=r"pixel_values_videos \(3, 3, 32, 32\) are not \(videos, frames, 3, 32, 32\)"):
        pruned_logits(model, {**inputs, "pixel_values_videos": inputs["pixel_values_videos"][0]}, mv.FastV())
    with pytest.raises(ValueError, match=r"the same number of frames, not \[2, 3\]"):
        processor(videos=[mv.testing.random_images(2), mv.testing.random_images(3)], text=["<video> a", "<video> b"])


def test_speed_draws_llava_onevision_images_it_does_not_interpolate():
    """`meteor speed` draws its images for LLaVA-OneVision's released grids (up to 6x6 tiles of 384 px) at 1152 px: a
    3x3 grid, nine tiles, the most anyres_max_9 takes without interpolating (a 2304 px image's grid would be shrunk,
    its tokens mixing patches)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    from meteor_vlm.bench.speed import _image_side
    from meteor_vlm.models.processor import build_word_tokenizer

    tokenizer = build_word_tokenizer(mv.testing.TINY_WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<video>"]})
    grids = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    images = LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384}, image_grid_pinpoints=grids)
    processor = LlavaOnevisionImageTextProcessor(image_processor=images, tokenizer=tokenizer, num_image_tokens=729,
                                                 vision_feature_select_strategy="full")
    assert _image_side(processor) == 1152
