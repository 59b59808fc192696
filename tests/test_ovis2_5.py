"""Stock transformers Ovis2.5 (`Ovis2_5ForConditionalGeneration`) on images, under every method: no-op == stock model
(its tokens in the encoder's window order, before its final norm, as transformers has them; windowed and full
blocks; start and end tokens from the visual table), drop == mask, batch == one by one, cached == uncached, beams;
windows dropped inside its ViT == the stock blocks run without them, through the stock visual head and table."""

import pytest
import torch
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

import meteor_vlm as mv
from meteor_vlm.models.adapters import adapt

from .test_gemma3 import NOOPS, PRUNING
from .test_llava import assert_noop_is_the_stock_model, pruned_logits, stock_logits
from .test_oracles import (DropAt, DropWindows, check_batch_and_cache, check_beams_against_the_stock_model,
                           masked_decoder_logits, survivors)

from .test_ernie45_vl import IMAGE_KEYS, IMAGES, SIZES, inputs_for, types_grown  # the same prompts and pictures


@pytest.fixture(scope="module")
def ovis():
    return mv.testing.tiny_ovis2_5(seed=2)


@pytest.fixture(scope="module")
def pictures():
    return [im.resize(size) for im, size in zip(mv.testing.random_images(4, seed=5), SIZES)]


def stock_embeds(model, inputs):
    """(B, T, D) the stock model's input embeddings (its visual tokens, and its start and end tokens' indicators)."""
    with torch.no_grad():
        ids = inputs["input_ids"]
        embeds = model.get_input_embeddings()(ids)
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        return model.model._merge_visual_features(ids, embeds, feats, is_video=False)


def test_the_tiny_model_orders_tokens_by_window_and_attends_in_windows(ovis, pictures):
    """The images are larger than an attention window, so the encoder's window order is not the grid's; the windowed
    block changes the stock logits; and the reference decoder of these tests is the stock model."""
    model, processor = ovis
    inputs = inputs_for(processor, pictures)
    cfg = model.config.vision_config
    order, _ = get_vision_window_index(inputs["image_grid_thw"][:1], spatial_merge_size=2, window_size=cfg.window_size,
                                       patch_size=cfg.patch_size)
    assert not torch.equal(order, torch.arange(len(order)))
    real = inputs["attention_mask"].bool()
    full, _ = mv.testing.tiny_ovis2_5(seed=2, windowed=False)
    assert not torch.allclose(stock_logits(full, inputs)[real], stock_logits(model, inputs)[real], atol=1e-2)
    want = masked_decoder_logits(model.model.language_model, model.lm_head, stock_embeds(model, inputs), real,
                                 [[]] * 3, 0)
    torch.testing.assert_close(want[real], stock_logits(model, inputs)[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_equals_the_stock_model_and_the_block_restores_it(ovis, pictures, make):
    model, processor = ovis
    method = make()
    assert_noop_is_the_stock_model(model, inputs_for(processor, pictures), method, stock_logits, pruned_logits)
    assert [s["images"] for s in method.stats] == IMAGES
    assert [s["encoder_tokens"] for s in method.stats] == [64, 32 + 32, 36]


@pytest.mark.parametrize("layer", [0, 2])
def test_dropping_at_llm_layer_equals_masking_keys(ovis, pictures, layer):
    model, processor = ovis
    inputs = inputs_for(processor, pictures, which=(0, 1))
    vis = inputs["input_ids"] == model.config.image_token_id
    drop = [vis[0].nonzero()[::3, 0].tolist(), vis[1].nonzero()[1::2, 0].tolist()]
    got = pruned_logits(model, inputs, DropAt(layer, drop))
    want = masked_decoder_logits(model.model.language_model, model.lm_head, stock_embeds(model, inputs),
                                 inputs["attention_mask"].bool(), drop, layer)
    text = inputs["attention_mask"].bool() & ~vis
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)


def stock_tower_without(model, pixels, grid_thw):
    """(kept windows, (K, D) tokens) of one image, on a tower whose blocks all attend to the whole image: the stock
    embeddings, the stock blocks on the patches left (their stock rotary positions), the windows `survivors` drops at
    each block removed, then the stock visual head and table."""
    tower = model.model.vision_tower
    grid = torch.tensor([grid_thw])
    hidden = tower.embeddings(pixels, grid)
    cos, sin = tower.rotary_emb(hidden, get_vision_position_ids(grid, 2))
    alive, left = torch.arange(hidden.shape[0] // 4), torch.arange(hidden.shape[0])
    for b, block in enumerate(tower.layers):
        hidden = block(hidden, cu_seqlens=torch.tensor([0, len(left)], dtype=torch.int32),
                       position_embeddings=(cos[left], sin[left]))
        alive = survivors(alive, b, 4)
        now = torch.isin(left // 4, alive)
        hidden, left = hidden[now], left[now]
    return alive, model.model.multi_modal_projector(hidden)


def test_windows_dropped_inside_the_vit_equal_the_stock_blocks_run_without_them(pictures):
    model, processor = mv.testing.tiny_ovis2_5(seed=2, windowed=False)
    inputs = inputs_for(processor, pictures, which=(0,))
    with torch.no_grad():
        visual = adapt(model).encode_images({k: inputs[k] for k in IMAGE_KEYS}, DropWindows(4))
        alive, want = stock_tower_without(model, inputs["pixel_values"], inputs["image_grid_thw"][0].tolist())
        kept = visual.mask[0] if visual.mask is not None else torch.ones_like(visual.grid_index[0], dtype=torch.bool)
        assert 0 < len(alive) < 64 and visual.grid_index[0][kept].tolist() == alive.tolist()
        torch.testing.assert_close(visual.features[0][kept], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_obeys_the_batch_and_cache_oracles(ovis, pictures, make):
    model, processor = ovis
    check_batch_and_cache(model, make(), lambda which: inputs_for(processor, pictures, which), types_grown,
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


def test_beam_search_keeps_each_prompts_images_with_its_rows(pictures):
    model, processor = mv.testing.tiny_ovis2_5(seed=2)
    inputs = inputs_for(processor, pictures, which=(0, 1))
    check_beams_against_the_stock_model(model, inputs, mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0))


def test_videos_are_refused_and_images_are_written_between_their_bounds(ovis, pictures):
    model, processor = ovis
    inputs = inputs_for(processor, pictures, which=(0,))
    with pytest.raises(ValueError, match="videos are not supported"):
        pruned_logits(model, {**inputs, "pixel_values_videos": inputs["pixel_values"],
                              "video_grid_thw": inputs["image_grid_thw"]}, mv.FastV())
    with pytest.raises(ValueError, match="takes images only"):
        processor(videos=[[pictures[0]]], text=["<video>"])
    want = processor.tokenizer(["<ovis_image_start>" + "<image>" * 64 + "<ovis_image_end> what is in the image ?"],
                               return_tensors="pt")["input_ids"]
    assert torch.equal(inputs["input_ids"], want)


TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} a{% endif %}")


def test_meteor_ask_and_speed_run_an_ovis2_5_checkpoint_folder(tmp_path, capsys, pictures):
    from meteor_vlm.models.ovis2_5 import Ovis25ImageTextProcessor

    from .test_internvl import assert_ask_and_speed_run_the_folder

    model, processor = mv.testing.tiny_ovis2_5(seed=3)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    Ovis25ImageTextProcessor(processor.image_processor, processor.tokenizer, TEMPLATE).save_pretrained(ckpt)
    loaded = Ovis25ImageTextProcessor.from_pretrained(ckpt)
    pictures[0].save(tmp_path / "img.png")
    prompt = loaded.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                      {"type": "text", "text": "what is in the image ?"}]}])
    inputs = loaded(images=[pictures[0]], text=[prompt])
    mine = processor(images=[pictures[0]], text=["<image>what is in the image ? a"])
    assert inputs.keys() == mine.keys() and all(torch.equal(inputs[k], mine[k]) for k in inputs)
    assert_ask_and_speed_run_the_folder(model, processor, inputs, ckpt, tmp_path, capsys, tokens=64)
