"""Stock transformers VideoLLaMA3 (`VideoLlama3ForConditionalGeneration`) on images, under every method: no-op ==
stock model, drop == mask, batch == one by one, cached == uncached, beams; patches dropped inside its ViT == the stock
blocks run without them; its videos and other merge sizes refused."""

import pytest
import torch
from transformers.vision_utils import get_vision_position_ids

import meteor_vlm as mv

from .test_gemma3 import NOOPS, PRUNING
from .test_llava import assert_noop_is_the_stock_model, pruned_logits, stock_logits
from .test_oracles import (DropWindows, assert_drop_at_layer_equals_masking, check_batch_and_cache,
                           check_beams_against_the_stock_model, masked_decoder_logits, stock_head, survivors)
from .test_qwen2_vl import PROMPTS, SIZES, qwen_inputs

IMAGE_KEYS = ("pixel_values", "image_grid_thw", "image_merge_sizes")


@pytest.fixture(scope="module")
def vl3():
    return mv.testing.tiny_video_llama3(seed=2)


@pytest.fixture(scope="module")
def pictures():
    return [im.resize(size) for im, size in zip(mv.testing.random_images(4, seed=8), SIZES)]


def stock_embeds(model, inputs):
    with torch.no_grad():
        ids = inputs["input_ids"]
        embeds = model.get_input_embeddings()(ids)
        feats = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                         inputs["image_merge_sizes"]).pooler_output)
        return embeds.masked_scatter((ids == model.config.image_token_id)[..., None].expand_as(embeds), feats)


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_equals_the_stock_model_and_the_block_restores_it(vl3, pictures, make):
    model, processor = vl3
    method = make()
    assert_noop_is_the_stock_model(model, qwen_inputs(processor, pictures), method, stock_logits,
                                   lambda m, i, meth: pruned_logits(m, i, meth))
    assert [s["images"] for s in method.stats] == [1, 2, 1]
    assert [s["encoder_tokens"] for s in method.stats] == [24, 32 + 25, 16]  # every patch a token


@pytest.mark.parametrize("layer", [0, 3])
def test_dropping_at_llm_layer_equals_masking_keys(vl3, pictures, layer):
    model, processor = vl3
    inputs = qwen_inputs(processor, pictures, which=(0, 1))
    assert_drop_at_layer_equals_masking(model, inputs, stock_embeds(model, inputs), layer)


def stock_tower_without(model, pixels, grid_thw):
    """(kept patches, (K, D) projected tokens) of one image: the stock patch embedding, the stock blocks on the
    patches left (with their stock 2D rotary positions), the patches `survivors` drops at each block removed, the
    final norm and the projector."""
    tower = model.model.vision_model
    grid = torch.tensor([grid_thw])
    hidden = tower.embeddings(pixels)
    cos, sin = tower.rotary_pos_emb(hidden, get_vision_position_ids(grid, torch.tensor([1])))
    alive = torch.arange(hidden.shape[0])
    for b, block in enumerate(tower.encoder.layers):
        hidden = block(hidden, cu_seqlens=torch.tensor([0, len(alive)], dtype=torch.int32),
                       position_embeddings=(cos[alive], sin[alive]))
        kept = survivors(alive, b, 4)
        hidden, alive = hidden[torch.isin(alive, kept)], kept
    return alive, model.model.projector(tower.post_layernorm(hidden))


def test_patches_dropped_inside_the_vit_equal_the_stock_blocks_run_without_them(vl3, pictures):
    """After each of the ViT's 2 blocks a test method drops patches: the tokens that leave the tower equal the stock
    blocks run on the patches left, normed and projected, and the logits the stock decoder with the dropped
    patches' image tokens masked from layer 0 on."""
    model, processor = vl3
    inputs = qwen_inputs(processor, pictures, which=(0,))
    assert_one_images_tokens_dropped(model, inputs, IMAGE_KEYS, 24, lambda: stock_tower_without(
        model, inputs["pixel_values"], inputs["image_grid_thw"][0].tolist()))


def assert_one_images_tokens_dropped(model, inputs, image_keys, tokens, stock_tower_without):
    """`DropWindows(4)` inside the tower of a stock Qwen-VL-like model on a prompt with one image of `tokens` tokens:
    the tokens that leave it equal `stock_tower_without()`'s (kept grid indices, their tokens), and the logits on the
    text equal the stock decoder with the dropped tokens' columns masked from layer 0 on."""
    with torch.no_grad():
        visual = mv.models.adapters.adapt(model).encode_images({k: inputs[k] for k in image_keys}, DropWindows(4))
        alive, want = stock_tower_without()
        kept = visual.mask[0] if visual.mask is not None else torch.ones_like(visual.grid_index[0], dtype=torch.bool)
        assert 0 < len(alive) < tokens and visual.grid_index[0][kept].tolist() == alive.tolist()
        torch.testing.assert_close(visual.features[0][kept], want, atol=1e-5, rtol=1e-5)
        is_img = inputs["input_ids"] == model.config.image_token_id
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        cols = is_img[0].nonzero()[:, 0]
        embeds[0, cols[alive]] = want
        drop = [[int(c) for g, c in enumerate(cols) if g not in alive.tolist()]]
        reference = masked_decoder_logits(model.model.language_model, stock_head(model), embeds,
                                          inputs["attention_mask"].bool(), drop, 0)
    got = pruned_logits(model, inputs, DropWindows(4))
    torch.testing.assert_close(got[~is_img], reference[~is_img], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_obeys_the_batch_and_cache_oracles(vl3, pictures, make):
    model, processor = vl3
    check_batch_and_cache(model, make(), lambda which: qwen_inputs(processor, pictures, which),
                          lambda batch, ids: {k: batch[k] for k in IMAGE_KEYS},
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


def test_beam_search_keeps_each_prompts_images_with_its_rows(vl3, pictures):
    model, processor = vl3
    inputs = qwen_inputs(processor, pictures, which=(0, 1))
    check_beams_against_the_stock_model(model, inputs, mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0))


def test_videos_and_other_merge_sizes_are_refused(vl3, pictures):
    model, processor = vl3
    inputs = qwen_inputs(processor, pictures, which=(0,))
    with pytest.raises(ValueError, match="videos are not supported"):
        pruned_logits(model, {**inputs, "pixel_values_videos": inputs["pixel_values"],
                              "video_grid_thw": inputs["image_grid_thw"]}, mv.FastV())
    with pytest.raises(ValueError, match=r"image_merge_sizes \[2\]"):
        pruned_logits(model, {**inputs, "image_merge_sizes": torch.tensor([2])}, mv.FastV())
    with pytest.raises(ValueError, match="takes images only"):
        processor(videos=[[pictures[0]]], text=[PROMPTS[0]])
    assert "forward" not in vars(model)


def test_meteor_ask_and_speed_run_a_video_llama3_checkpoint_folder(tmp_path, capsys, pictures):
    """A transformers VideoLLaMA3 checkpoint folder (model, tokenizer, image processor, chat template) runs under
    `meteor ask` (the answer greedy generate gives under the same method) and `meteor speed`; the processor read
    back from the folder gives the same inputs."""
    from meteor_vlm.cli import main
    from meteor_vlm.models.paddleocr_vl import VideoLlama3ImageTextProcessor

    from .test_qwen2_vl import TEMPLATE

    model, processor = mv.testing.tiny_video_llama3(seed=3)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    VideoLlama3ImageTextProcessor(processor.image_processor, processor.tokenizer, TEMPLATE).save_pretrained(ckpt)
    loaded = VideoLlama3ImageTextProcessor.from_pretrained(ckpt)
    picture = pictures[0]
    picture.save(tmp_path / "img.png")
    prompt = loaded.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                      {"type": "text", "text": "what is in the image ?"}]}])
    inputs = loaded(images=[picture], text=[prompt])
    mine = processor(images=[picture], text=["<image> what is in the image ? a"])
    assert inputs.keys() == mine.keys() and all(torch.equal(inputs[k], mine[k]) for k in inputs)
    assert main(["ask", str(tmp_path / "img.png"), "what is in the image ?", "--model", str(ckpt), "--method",
                 "fastv:k1-r0.5", "--max-new-tokens", "3", "--heatmap", str(tmp_path / "heat.png")]) == 0
    out = capsys.readouterr().out
    with mv.FastV(layer=1, ratio=0.5)(model), torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    answer = processor.decode(want[0, inputs["input_ids"].shape[1]:]).strip()
    assert f"answer: {answer}\n" in out and "visual tokens: 24 from the experts" in out
    assert (tmp_path / "heat.png").is_file()
    assert main(["speed", "--model", str(ckpt), "--samples", "1", "--new-tokens", "2", "--methods",
                 "unpruned,fastv:k1-r0.5"]) == 0
    assert "fastv:k1-r0.5" in capsys.readouterr().out
