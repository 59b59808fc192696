"""Stock transformers VLMs with a Qwen2-VL-style encoder before a decoder with 1D RoPE, on images: LLaVA-OneVision-1.5
(`LlavaOnevision15ForConditionalGeneration`: a RICE ViT with a CLS per image, a Qwen3 decoder), EXAONE 4.5
(`Exaone4_5_ForConditionalGeneration`: Qwen2.5-VL's windowed encoder with grouped key and value heads, an EXAONE 4
decoder, post-norm, sliding layers rotated and full ones not) and HyperCLOVA X Vision V2
(`HyperCLOVAXVisionV2ForConditionalGeneration`: Qwen2.5-VL's windowed encoder, a linear projector after it, a Granite-like
decoder scaling its input embeddings and its blocks' outputs, logits scaled by the head), under every method (their
videos: `test_qwen2_vl.py`): no-op == stock model, drop ==
mask, batch == one by one, cached == uncached, beams; windows dropped inside the ViT == the stock blocks run without
them, and on LLaVA-OneVision-1.5's videos frame by frame (their other oracles: `test_qwen2_vl.py`)."""

import pytest
import torch
from transformers.vision_utils import get_vision_position_ids

import meteor_vlm as mv
from .test_gemma3 import NOOPS, PRUNING
from .test_llava import assert_noop_is_the_stock_model, pruned_logits, stock_logits
from .test_oracles import (assert_drop_at_layer_equals_masking, check_batch_and_cache,
                           check_beams_against_the_stock_model, survivors)
from .test_qwen2_vl import SIZES, qwen_inputs, stock_blocks_without
from .test_video_llama3 import assert_one_images_tokens_dropped

IMAGE_KEYS = ("pixel_values", "image_grid_thw")


@pytest.fixture(scope="module", params=["ov1.5", "exaone4.5", "hcx"], ids=["llava-onevision-1.5", "exaone4.5", "hcx"])
def ov15(request):
    return mv.testing.tiny_qwen2_vl(version=request.param, seed=2)


@pytest.fixture(scope="module")
def pictures():
    return [im.resize(size) for im, size in zip(mv.testing.random_images(4, seed=8), SIZES)]


def stock_embeds(model, inputs):
    with torch.no_grad():
        ids = inputs["input_ids"]
        embeds = model.get_input_embeddings()(ids)
        feats = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        return embeds.masked_scatter((ids == model.config.image_token_id)[..., None].expand_as(embeds), feats)


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_equals_the_stock_model_and_the_block_restores_it(ov15, pictures, make):
    model, processor = ov15
    method = make()
    assert_noop_is_the_stock_model(model, qwen_inputs(processor, pictures), method, stock_logits,
                                   lambda m, i, meth: pruned_logits(m, i, meth))
    assert [s["images"] for s in method.stats] == [1, 2, 1]


@pytest.mark.parametrize("layer", [0, 3])
def test_dropping_at_llm_layer_equals_masking_keys(ov15, pictures, layer):
    model, processor = ov15
    inputs = qwen_inputs(processor, pictures, which=(0, 1))
    assert_drop_at_layer_equals_masking(model, inputs, stock_embeds(model, inputs), layer)


def stock_tower_without(model, pixels, grid_thw):
    """(kept windows, (K, D) tokens) of one image: the stock patch embedding, CLS prepended with its rotary angles,
    the pre-norm, the stock blocks on CLS and the patches of the windows left (each with its stock rotary angles),
    the windows `survivors` drops at each block removed, then the stock merger on the windows left."""
    visual = model.model.visual
    m = visual.spatial_merge_size
    grid = torch.tensor([grid_thw])
    hidden = visual.patch_embed(pixels)  # (h*w, D), each window's patches together
    cos, sin = visual.rotary_pos_emb(hidden, get_vision_position_ids(grid, m))
    hidden, (cos, sin) = visual.cls_embeddings(hidden, cos, sin, [hidden.shape[0]])
    hidden = visual.pre_layernorm(hidden)
    alive = torch.arange((hidden.shape[0] - 1) // m**2)
    rows = torch.arange(hidden.shape[0])  # CLS, then the patches left
    for b, block in enumerate(visual.blocks):
        cu = torch.tensor([0, len(rows)], dtype=torch.int32)
        hidden = block(hidden, cu, position_embeddings=(cos[rows], sin[rows]))
        alive = survivors(alive, b, 4)
        patches = (alive[:, None] * m**2 + torch.arange(m**2)).flatten()
        keep = torch.cat([torch.zeros(1, dtype=torch.long), 1 + patches])
        hidden, rows = hidden[torch.isin(rows, keep)], keep
    return alive, visual.merger(hidden[1:])


def test_windows_dropped_inside_the_vit_equal_the_stock_blocks_run_without_them(ov15, pictures):
    """After each of the ViT's 2 blocks a test method drops whole merge windows: the tokens that leave the tower equal
    the stock blocks run on CLS and the patches left, then its merger; the logits equal the stock decoder with the
    dropped windows' image tokens masked from layer 0 on."""
    model, processor = ov15
    inputs = qwen_inputs(processor, pictures, which=(0,))
    grid = inputs["image_grid_thw"][0].tolist()
    visual = getattr(model.model, "visual", None) or model.model.vision_model
    if hasattr(visual, "cls_embeddings"):  # LLaVA-OneVision-1.5
        stock = lambda: stock_tower_without(model, inputs["pixel_values"], grid)  # noqa: E731
    else:  # EXAONE 4.5, HyperCLOVA X: Qwen2.5-VL's windowed encoder (HyperCLOVA X's projector after it)
        def stock():
            alive, tokens = stock_blocks_without(visual, inputs["pixel_values"], grid)[:2]
            return alive, model.model.projector(tokens) if hasattr(model.model, "projector") else tokens
    assert_one_images_tokens_dropped(model, inputs, IMAGE_KEYS, 6, stock)


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_obeys_the_batch_and_cache_oracles(ov15, pictures, make):
    model, processor = ov15
    check_batch_and_cache(model, make(), lambda which: qwen_inputs(processor, pictures, which),
                          lambda batch, ids: {k: batch[k] for k in IMAGE_KEYS},
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


def test_beam_search_keeps_each_prompts_images_with_its_rows(ov15, pictures):
    model, processor = ov15
    check_beams_against_the_stock_model(model, qwen_inputs(processor, pictures, which=(0, 1)),
                                        mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0))


def test_a_llava_onevision15_videos_frames_pruned_in_the_vit_equal_the_stock_tower_frame_by_frame():
    """LLaVA-OneVision-1.5's encoder gives each frame of a video its own CLS and attends within the frame: windows
    dropped after each block of a 2-frame video equal, frame by frame, the stock blocks run on that frame's CLS and
    the windows left, the frames' tokens one after another at their places in the video (frame k's window w its
    token k * 6 + w), and the logits = the stock decoder with the dropped windows' video tokens masked from layer 0."""
    from .test_oracles import DropWindows, masked_decoder_logits, stock_head
    from .test_qwen2_vl import video_frames

    model, processor = mv.testing.tiny_qwen2_vl(version="ov1.5", seed=2)
    inputs = processor(videos=[video_frames(2)], text=[f"{processor.video_placeholder} what is it ?"])
    t, h, w = inputs["video_grid_thw"][0].tolist()
    patches, windows = h * w, h * w // 4
    assert t == 2
    with torch.no_grad():
        tokens = mv.models.adapters.adapt(model).encode_expert(
            0, {k: inputs[k] for k in ("pixel_values_videos", "video_grid_thw")}, DropWindows(4))
        stock = [stock_tower_without(model, inputs["pixel_values_videos"][k * patches:(k + 1) * patches], [1, h, w])
                 for k in range(t)]
        alive = torch.cat([kept + k * windows for k, (kept, _) in enumerate(stock)])
        want = torch.cat([features for _, features in stock])
        assert 0 < len(alive) < t * windows and tokens.grid_index[0][tokens.mask[0]].tolist() == alive.tolist()
        torch.testing.assert_close(tokens.features[0][tokens.mask[0]], want, atol=1e-5, rtol=1e-5)
        is_vis = inputs["input_ids"] == model.config.video_token_id
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        cols = is_vis[0].nonzero()[:, 0]
        embeds[0, cols[alive]] = want
        drop = [[int(c) for g, c in enumerate(cols.tolist()) if g not in alive.tolist()]]
        reference = masked_decoder_logits(model.model.language_model, stock_head(model), embeds,
                                          inputs["attention_mask"].bool(), drop, 0)
    got = pruned_logits(model, inputs, DropWindows(4))
    torch.testing.assert_close(got[~is_vis], reference[~is_vis], atol=1e-5, rtol=1e-5)
