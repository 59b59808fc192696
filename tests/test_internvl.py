"""Stock transformers InternVL (`InternVLForConditionalGeneration`) under every method: the oracles the project's own
model obeys (no-op == stock model, drop == mask, batch == one by one, cached == uncached), and windows dropped
inside its ViT == the stock blocks run without them, folded by the model's own pixel shuffle."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import meteor_vlm as mv
from meteor_vlm.models.adapters import adapt

from .test_llava import assert_noop_is_the_stock_model, pruned_logits, stock_logits
from .test_oracles import (PEERS, DropAt, DropWindows, check_batch_and_cache, check_beams_against_the_stock_model,
                          masked_decoder_logits, survivors)

PROMPTS = ["<image> what is in the image ?", "<image> <image> how many red circle are there in the image on the left ?",
           "<image> describe the shape ?"]
IMAGES = [1, 2, 1]  # images per prompt


@pytest.fixture(scope="module", params=[{}, {"qk_norm": True}, {"decoder": "qwen3"}, {"decoder": "qwen3_moe"},
                                        {"decoder": "gpt_oss"}, {"decoder": "qwen3", "qianfan": True}],
                ids=["internvl", "internvl-qknorm", "internvl-qwen3", "internvl-qwen3-moe", "internvl-gpt-oss",
                     "qianfan-ocr"])
def internvl(request):
    return mv.testing.tiny_internvl(seed=2, **request.param)


def inputs_for(processor, tile_pictures, which=(0, 1, 2)):
    starts = [sum(IMAGES[:i]) for i in range(len(IMAGES))]
    imgs = [tile_pictures[s + j] for i in which for s in [starts[i]] for j in range(IMAGES[i])]
    return processor(images=imgs, text=[PROMPTS[i] for i in which])


NOOPS = {"none": mv.NoPruning, **{k: noop for k, (noop, _) in PEERS.items()},
         "meteor": lambda: mv.Meteor.preset("stage1+3", encoder_keep=1.0, lam=1e9)}


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_equals_the_stock_model_and_the_block_restores_it(internvl, tile_pictures, make):
    model, processor = internvl
    inputs = inputs_for(processor, tile_pictures)
    method = make()
    image_tokens = assert_noop_is_the_stock_model(model, inputs, method, stock_logits, pruned_logits)
    assert [s["images"] for s in method.stats] == IMAGES
    assert image_tokens == [4, 4 * (3 + 3), 4 * 5]  # 4 visual tokens per tile: 1, 3 + 3, 5 tiles


def stock_tower_without(model, pixels):
    """(kept windows, (tiles, K, D) projected tokens): the stock ViT's blocks on CLS and the patches left, the
    windows `survivors` drops at each block removed, then the stock final norm, pixel shuffle (dropped windows
    zero-filled) and projector."""
    tower, cfg = model.model.vision_tower, model.config
    hidden = tower.embeddings(pixels)  # (tiles, 1 + g*g, D)
    g = round((hidden.shape[1] - 1) ** 0.5)
    window_of = torch.arange(g * g).view(g // 2, 2, g // 2, 2).permute(0, 2, 1, 3).reshape(-1, 4)  # its 4 patches
    alive, patches = torch.arange(g * g // 4), torch.arange(g * g)  # the patches left, in the grid's row-major order
    for b, block in enumerate(tower.layers if hasattr(tower, "layers") else tower.encoder.layer):  # Qianfan-OCR's
        hidden = block(hidden)
        alive = survivors(alive, b, 3)
        left = torch.isin(patches, window_of[alive].flatten())
        hidden, patches = hidden[:, torch.cat([torch.ones(1, dtype=torch.bool), left])], patches[left]
    hidden = tower.layernorm(hidden)[:, 1:]
    full = hidden.new_zeros(hidden.shape[0], g * g, hidden.shape[-1])
    full[:, patches] = hidden
    folded = model.model.pixel_shuffle(full.view(-1, g, g, full.shape[-1]), scale_factor=cfg.downsample_ratio)
    folded = folded.reshape(folded.shape[0], -1, folded.shape[-1])[:, alive]
    return alive, model.model.multi_modal_projector(folded)


def test_windows_dropped_inside_the_vit_equal_the_stock_blocks_run_without_them(internvl, tile_pictures):
    """After each of the ViT's 3 blocks a test method drops whole 2x2 windows: the tokens that leave the tower equal
    the stock blocks run on CLS and the patches left, folded by the model's own pixel shuffle, and the logits
    equal the stock language model with the dropped windows' image tokens masked from layer 0 on."""
    model, processor = internvl
    inputs = inputs_for(processor, tile_pictures, which=(0, 1))
    assert_windows_dropped_match(model, inputs, {"pixel_values": inputs["pixel_values"]}, stock_tower_without,
                                 model.model.language_model)


def assert_windows_dropped_match(model, inputs, images, stock_tower_without, language_model, per_tile=4, head=None):
    """`DropWindows(3)` inside a stock VLM's tower (`per_tile` windows a tile): the tokens that leave it equal
    `stock_tower_without(model, pixels)`'s (kept windows, projected tokens), and the logits on the text equal
    `language_model` with those tokens at their image tokens and the dropped windows' masked from layer 0 on, read
    by `head` (the model's `lm_head` unless given: a stock head that also scales its logits)."""
    target = adapt(model)
    with torch.no_grad():
        tokens = target.encode_images(images, DropWindows(3))
        alive, want = stock_tower_without(model, inputs["pixel_values"])
        assert 0 < len(alive) < per_tile
        assert (tokens.grid_index == alive).all()
        torch.testing.assert_close(tokens.features, want, atol=1e-5, rtol=1e-5)
        is_img = inputs["input_ids"] == model.config.image_token_id
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        rows, cols = is_img.nonzero(as_tuple=True)
        drop = [[] for _ in range(len(inputs["input_ids"]))]
        for k, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):  # token k: tile k // per_tile, its window
            if k % per_tile in alive.tolist():
                embeds[r, c] = want[k // per_tile, alive.tolist().index(k % per_tile)]
            else:
                drop[r].append(c)
        reference = masked_decoder_logits(language_model, head or model.lm_head, embeds, inputs["attention_mask"].bool(),
                                          drop, 0)
        got = pruned_logits(model, inputs, DropWindows(3))
    text = inputs["attention_mask"].bool() & ~is_img
    torch.testing.assert_close(got[text], reference[text], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [0, 3])
def test_dropping_at_llm_layer_equals_masking_keys(internvl, tile_pictures, layer):
    model, processor = internvl
    inputs = inputs_for(processor, tile_pictures, which=(0, 1))
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output.flatten(0, 1)
    assert_drop_at_layer_is_masking(model, inputs, feats, model.model.language_model, layer)


def assert_drop_at_layer_is_masking(model, inputs, feats, language_model, layer, head=None):
    """Dropping some image tokens of the two prompts of `inputs` before LLM layer `layer` gives, on the text, the
    logits of `language_model` with the stock features `feats` at the image tokens and those keys masked from
    `layer` on, read by `head` (the model's `lm_head` unless given)."""
    vis = inputs["input_ids"] == model.config.image_token_id
    drop = [vis[0].nonzero()[::3, 0].tolist(), vis[1].nonzero()[1::2, 0].tolist()]
    got = pruned_logits(model, inputs, DropAt(layer, drop))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        embeds = embeds.masked_scatter(vis[..., None].expand_as(embeds), feats)
        want = masked_decoder_logits(language_model, head or model.lm_head, embeds, inputs["attention_mask"].bool(), drop,
                                     layer)
    text = inputs["attention_mask"].bool() & ~vis
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)


PRUNING = {**{k: pruning for k, (_, pruning) in PEERS.items()},
           "meteor": lambda: mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0)}


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_obeys_the_batch_and_cache_oracles(internvl, tile_pictures, make):
    model, processor = internvl
    check_batch_and_cache(model, make(), lambda which: inputs_for(processor, tile_pictures, which),
                          lambda batch, ids: {"pixel_values": batch["pixel_values"]},
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


def test_beam_search_keeps_each_prompts_tiles_with_its_rows(tile_pictures):
    """Beams repeat each prompt's row and its images' tiles follow it (the second prompt's two images have 3 tiles
    each): pruning nothing, beam search equals the stock model's; under METEOR cached equals uncached."""
    model, processor = mv.testing.tiny_internvl(seed=2)
    inputs = inputs_for(processor, tile_pictures, which=(0, 1))
    check_beams_against_the_stock_model(model, inputs, mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0))


VIDEO_PROMPTS = ["<video> what is in the video ? <image>", "<image> and <video> how many ?", "describe <video>"]


def video_inputs(processor, tile_pictures, which=(0, 1, 2)):
    """Prompts with a video (3, 2 and 4 frames of 32 px) after or before an image (1 and 3 tiles), or alone."""
    rng = np.random.default_rng(11)
    videos = [[Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)) for _ in range(n)] for n in (3, 2, 4)]
    images = [[tile_pictures[0]], [tile_pictures[1]], []]
    return processor(images=[im for i in which for im in images[i]] or None, videos=[videos[i] for i in which],
                     text=[VIDEO_PROMPTS[i] for i in which])


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_videos_are_their_frames_as_one_tile_images_and_pruning_nothing_is_the_stock_model(internvl, tile_pictures,
                                                                                          make):
    """A video's frames are one-tile images to the model ("FrameK: <img>...</img>", the pixels merged with the
    images' tiles in prompt order, as the stock processor writes them): pruning nothing equals the stock model, and
    `stats` count each frame as an image."""
    model, processor = internvl
    inputs = video_inputs(processor, tile_pictures)
    assert inputs["pixel_values"].shape[0] == (3 + 1) + (3 + 2) + 4  # frames and tiles, in prompt order
    one = processor(images=[tile_pictures[0]], text=["<image>"])
    assert torch.equal(inputs["pixel_values"][3], one["pixel_values"][0]), "the image after the video's 3 frames"
    method = make()
    assert_noop_is_the_stock_model(model, inputs, method, stock_logits, pruned_logits)
    assert [s["images"] for s in method.stats] == [3 + 1, 1 + 2, 4]


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_on_videos_obeys_the_batch_and_cache_oracles(tile_pictures, make):
    model, processor = mv.testing.tiny_internvl(seed=2)
    check_batch_and_cache(model, make(), lambda which: video_inputs(processor, tile_pictures, which),
                          lambda batch, ids: {"pixel_values": batch["pixel_values"]},
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


def test_the_processor_refuses_videos_the_prompts_do_not_hold(tile_pictures):
    _, processor = mv.testing.tiny_internvl(seed=2)
    with pytest.raises(ValueError, match="the prompts hold 0 <video> tokens for 1 videos"):
        processor(videos=[[tile_pictures[0]]], text=["<image>"], images=[tile_pictures[1]])
    with pytest.raises(ValueError, match="a video must be a non-empty list of frames"):
        processor(videos=[[]], text=["<video>"])


def test_proportional_attention_makes_a_merged_window_act_as_its_duplicates(internvl):
    """A block run with one window present three times equals, for every token (CLS and windows), the block run on
    one copy with log(3) added to the attention logits of that window's four patches (ToMe's proportional attention
    through the runner's per-window bias)."""
    model, _ = internvl
    runner = adapt(model).runners[0]
    x = torch.randn(2, 1 + 4, runner.window * 32, generator=torch.Generator().manual_seed(1))
    x[:, 0, 32:] = 0  # the CLS row holds CLS, then zeros
    dup = torch.cat([x, x[:, 2:3].expand(-1, 2, -1)], 1)
    size = torch.ones(2, 1 + 4)
    size[:, 2] = 3
    with torch.no_grad():
        full, merged, plain = runner.run_block(1, dup), runner.run_block(1, x, size.log()), runner.run_block(1, x)
    torch.testing.assert_close(merged, full[:, :5], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, full[:, :5], atol=1e-3)


def test_meteor_stage1_keeps_its_share_of_every_tile(internvl, tile_pictures):
    model, processor = internvl
    inputs = inputs_for(processor, tile_pictures)
    method = mv.Meteor.preset("stage1", encoder_keep=0.5)
    pruned_logits(model, inputs, method)
    assert [s["stage1_tokens"] for s in method.stats] == [2, 2 * 6, 2 * 5]
    assert [s["encoder_tokens"] for s in method.stats] == [4, 4 * 6, 4 * 5]


def test_kept_grid_has_an_entry_for_every_tile(internvl, tile_pictures):
    """`stats['kept_grid']` lists every tile of a sample, {} for one none of whose tokens reached the last layer."""
    model, processor = internvl
    method = mv.FastV(layer=1, ratio=0.9)
    pruned_logits(model, inputs_for(processor, tile_pictures), method)
    assert [len(s["kept_grid"]) for s in method.stats] == [1, 6, 5]
    assert {} in method.stats[1]["kept_grid"] and all(t == {} or set(t) == {"vision"} for t in method.stats[1]["kept_grid"])


def test_bad_inputs_and_settings_are_refused(internvl, tile_pictures):
    model, processor = internvl
    inputs = inputs_for(processor, tile_pictures, which=(0,))
    short = {**inputs, "pixel_values": torch.cat([inputs["pixel_values"]] * 2)}
    with pytest.raises(ValueError, match=r"image-token runs \[4\] are not 4 tokens per tile of the 2 tiles"):
        pruned_logits(model, short, mv.FastV())
    with pytest.raises(ValueError, match="hold 1 <IMG_CONTEXT> tokens for 2 images"):
        processor(images=tile_pictures[:2], text=["<image> what ?"])
    model.config.vision_feature_layer = [-1, -2]
    try:
        with pytest.raises(ValueError, match="several layers"):
            pruned_logits(model, inputs, mv.FastV())
    finally:
        model.config.vision_feature_layer = -1
    assert "forward" not in vars(model)


TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>\n"
            "{% elif c['type'] == 'video' %}<video>\n"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} a{% endif %}")


@pytest.mark.parametrize("qianfan", [False, True], ids=["internvl", "qianfan-ocr"])
def test_meteor_ask_and_speed_run_an_internvl_checkpoint_folder(tmp_path, capsys, tile_pictures, qianfan):
    """A transformers InternVL checkpoint folder (saved model, tokenizer, image processor, chat template) runs under
    `meteor ask` (the answer greedy generate gives on the chat template's prompt under the same method; ToMe merges
    windows in every tile) and `meteor speed`; the processor read back from the folder gives the same inputs. A
    Qianfan-OCR folder likewise, its chat template writing an image as "<image>"."""
    from meteor_vlm.cli import main
    from meteor_vlm.models.internvl import InternVLImageTextProcessor

    model, processor = mv.testing.tiny_internvl(seed=3, qianfan=qianfan)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    template = TEMPLATE.replace("<IMG_CONTEXT>", "<image>") if qianfan else TEMPLATE
    InternVLImageTextProcessor(processor.image_processor, processor.tokenizer, 4, template).save_pretrained(ckpt)
    loaded = InternVLImageTextProcessor.from_pretrained(ckpt)
    tile_pictures[1].save(tmp_path / "img.png")
    prompt = loaded.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                      {"type": "text", "text": "what is in the image ?"}]}])
    inputs = loaded(images=[tile_pictures[1]], text=[prompt])
    mine = processor(images=[tile_pictures[1]], text=["<image>\nwhat is in the image ? a"])
    assert inputs.keys() == mine.keys() and all(torch.equal(inputs[k], mine[k]) for k in inputs)
    assert_ask_and_speed_run_the_folder(model, processor, inputs, ckpt, tmp_path, capsys)
    # videos of 2 frames, each a one-tile image of 4 tokens
    assert main(["speed", "--model", str(ckpt), "--samples", "2", "--new-tokens", "2", "--video", "2", "--methods",
                 "unpruned,tome:keep0.5", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert "a video of 2 frames" in capsys.readouterr().out and rows[0]["tokens"] == 2 * 4 > rows[1]["tokens"]


def assert_ask_and_speed_run_the_folder(model, processor, inputs, ckpt, tmp_path, capsys, tokens=12):
    """`meteor ask` on tmp_path/img.png with the checkpoint folder `ckpt` answers what greedy generate gives on
    `inputs` (the chat template's prompt for that image) under ToMe keeping half, which keeps half of the image's
    `tokens` (12 by default: 3 tiles of 4) and writes a heatmap; `meteor speed` runs the folder."""
    from meteor_vlm.cli import main

    heat = tmp_path / "heat.png"
    assert main(["ask", str(tmp_path / "img.png"), "what is in the image ?", "--model", str(ckpt), "--method",
                 "tome:keep0.5", "--max-new-tokens", "3", "--heatmap", str(heat)]) == 0
    out = capsys.readouterr().out
    with mv.ToMe(keep=0.5)(model), torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    answer = processor.decode(want[0, inputs["input_ids"].shape[1]:]).strip()
    assert f"answer: {answer}\n" in out and f"visual tokens: {tokens} from the experts" in out
    assert f"stage 1 (in the experts): {tokens // 2}" in out and heat.is_file()
    assert main(["speed", "--model", str(ckpt), "--samples", "1", "--new-tokens", "2", "--methods",
                 "unpruned,tome:keep0.5"]) == 0
    assert "tome:keep0.5" in capsys.readouterr().out
