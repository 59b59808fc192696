"""Stock transformers Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`)
under every method: the oracles the project's own model obeys (no-op == stock model, drop == mask, batch == one by
one, cached == uncached), and windows dropped inside their ViT == the stock blocks run without them, folded by the
model's own pixel shuffle."""

import pytest
import torch

import meteor_vlm as mv
from meteor_vlm.models.adapters import adapt

from .test_internvl import (IMAGES, NOOPS, PROMPTS, assert_ask_and_speed_run_the_folder,
                             assert_drop_at_layer_is_masking, assert_windows_dropped_match)
from .test_llava import assert_noop_is_the_stock_model, pruned_logits, stock_logits
from .test_oracles import PEERS, check_batch_and_cache, check_beams_against_the_stock_model, survivors

# the prompts, images per prompt and no-op methods of the InternVL tests, on conftest's tile_pictures
TILES = [5, 3 + 3, 5]  # tiles per prompt
KINDS = ["idefics3", "smolvlm"]


@pytest.fixture(scope="module", params=KINDS)
def idefics3(request):
    return mv.testing.tiny_idefics3(seed=2, kind=request.param)


def inputs_for(processor, tile_pictures, which=(0, 1, 2)):
    starts = [sum(IMAGES[:i]) for i in range(len(IMAGES))]
    imgs = [[tile_pictures[starts[i] + j] for j in range(IMAGES[i])] for i in which]
    return dict(processor(images=imgs, text=[PROMPTS[i] for i in which], return_tensors="pt", padding=True))


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_equals_the_stock_model_and_the_block_restores_it(idefics3, tile_pictures, make):
    model, processor = idefics3
    inputs = inputs_for(processor, tile_pictures)
    assert (inputs["pixel_values"].flatten(2) == 0).all(2).any(), "padding tiles are exercised"
    method = make()
    image_tokens = assert_noop_is_the_stock_model(model, inputs, method, stock_logits, pruned_logits)
    assert [s["images"] for s in method.stats] == IMAGES  # the tiles grouped into images
    assert image_tokens == [4 * t for t in TILES]  # 4 visual tokens per tile


def stock_tower_without(model, pixels):
    """(kept windows, (tiles, K, D) projected tokens): the stock ViT's blocks on the patches left, the windows
    `survivors` drops at each block removed, then the stock final norm, pixel shuffle (dropped windows zero-filled)
    and projection."""
    tower, connector = model.model.vision_model, model.model.connector
    s = connector.scale_factor
    pixels = pixels.flatten(0, 1)
    pixels = pixels[(pixels != 0).flatten(1).any(1)]
    g = pixels.shape[-1] // tower.config.patch_size
    every = torch.ones(pixels.shape[0], g, g, dtype=torch.bool)
    hidden = tower.embeddings(pixels, patch_attention_mask=every)  # (tiles, g*g, D)
    window_of = torch.arange(g * g).view(g // s, s, g // s, s).permute(0, 2, 1, 3).reshape(-1, s * s)  # its patches
    alive, patches = torch.arange(g * g // (s * s)), torch.arange(g * g)  # the patches left, in row-major order
    for b, block in enumerate(tower.encoder.layers):
        hidden = block(hidden, attention_mask=None)
        alive = survivors(alive, b, 3)
        left = torch.isin(patches, window_of[alive].flatten())
        hidden, patches = hidden[:, left], patches[left]
    hidden = tower.post_layernorm(hidden)
    full = hidden.new_zeros(hidden.shape[0], g * g, hidden.shape[-1])
    full[:, patches] = hidden
    folded = connector.pixel_shuffle(full, s)[:, alive]
    return alive, connector.modality_projection(folded)


def test_windows_dropped_inside_the_vit_equal_the_stock_blocks_run_without_them(idefics3, tile_pictures):
    """After each of the ViT's 3 blocks a test method drops whole windows (2x2 on Idefics3, 4x4 on SmolVLM): the
    tokens that leave the tower equal the stock blocks run on the patches left, folded by the model's own pixel
    shuffle, and the logits equal the stock language model with the dropped windows' image tokens masked from
    layer 0 on."""
    model, processor = idefics3
    inputs = inputs_for(processor, tile_pictures, which=(0, 1))
    assert_windows_dropped_match(model, inputs, {"pixel_values": inputs["pixel_values"]}, stock_tower_without,
                                 model.model.text_model)


@pytest.mark.parametrize("layer", [0, 3])
def test_dropping_at_llm_layer_equals_masking_keys(idefics3, tile_pictures, layer):
    model, processor = idefics3
    inputs = inputs_for(processor, tile_pictures, which=(0, 1))
    with torch.no_grad():
        feats = torch.cat(model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
    assert_drop_at_layer_is_masking(model, inputs, feats, model.model.text_model, layer)


PRUNING = {**{k: pruning for k, (_, pruning) in PEERS.items()},
           "meteor": lambda: mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0)}


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_obeys_the_batch_and_cache_oracles(idefics3, tile_pictures, make):
    model, processor = idefics3
    check_batch_and_cache(model, make(), lambda which: inputs_for(processor, tile_pictures, which),
                          lambda batch, ids: {k: batch[k] for k in ("pixel_values", "pixel_attention_mask")},
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_keeps_each_prompts_tiles_with_its_rows(tile_pictures, kind):
    """Beams repeat each prompt's row and its tiles follow it (the second prompt has 6 tiles, the first 5 and a
    padding tile): pruning nothing, beam search equals the stock model's; under METEOR cached equals uncached."""
    model, processor = mv.testing.tiny_idefics3(seed=2, kind=kind)
    inputs = inputs_for(processor, tile_pictures, which=(0, 1))
    check_beams_against_the_stock_model(model, inputs, mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0))


def smolvlm2_video_inputs(processor, frames, which=(0, 1, 2)):
    """SmolVLM2's video prompts as its processor writes them (`SmolVLMProcessor`, whose video processor needs
    torchvision): each frame a whole image, not cut into tiles, after its timestamp ("Frame from 00:0k:"), so a
    frame is one `<global-img>` run; prompts of 3, 2 and 4 frames."""
    counts, questions = [3, 2, 4], ["what happens ?", "how many circle are there ?", "describe it ?"]
    text = ["".join(f"Frame from 00:0{k}: <image>" for k in range(counts[i])) + " " + questions[i] for i in which]
    videos = [frames[: counts[i]] for i in which]
    return dict(processor(images=videos, text=text, return_tensors="pt", padding=True, do_image_splitting=False))


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_on_smolvlm2_videos_obeys_the_batch_and_cache_oracles(tile_pictures, make):
    """SmolVLM2 videos (frames as whole-image tiles between timestamps) under every method: the batch and cache
    oracles, each frame counted as an image with its own windows."""
    model, processor = mv.testing.tiny_idefics3(seed=2, kind="smolvlm")
    method = make()
    check_batch_and_cache(model, method, lambda which: smolvlm2_video_inputs(processor, tile_pictures, which),
                          lambda batch, ids: {k: batch[k] for k in ("pixel_values", "pixel_attention_mask")},
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])
    assert [s["images"] for s in method.stats[:3]] == [3, 2, 4]
    assert [s["encoder_tokens"] for s in method.stats[:3]] == [3 * 4, 2 * 4, 4 * 4]


def test_proportional_attention_makes_a_merged_window_act_as_its_duplicates(idefics3):
    """A block run with one window present three times equals, for every window, the block run on one copy with
    log(3) added to the attention logits of that window's patches (ToMe's proportional attention through the
    runner's per-window bias)."""
    model, _ = idefics3
    runner = adapt(model).runners[0]
    x = torch.randn(2, 4, runner.window * 32, generator=torch.Generator().manual_seed(1))
    dup = torch.cat([x, x[:, 2:3].expand(-1, 2, -1)], 1)
    size = torch.ones(2, 4)
    size[:, 2] = 3
    with torch.no_grad():
        full, merged, plain = runner.run_block(1, dup), runner.run_block(1, x, size.log()), runner.run_block(1, x)
        half, keys = runner.run_attention(1, x, size.log())
        _, own_keys, _ = runner.query_key(1, x)
    torch.testing.assert_close(merged, full[:, :4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(runner.run_mlp(1, half), merged, atol=1e-5, rtol=1e-5)  # the block in two halves
    torch.testing.assert_close(keys, own_keys)  # (B, H, patches, d): the keys its attention used
    assert not torch.allclose(plain, full[:, :4], atol=1e-3)


def test_meteor_stage1_keeps_its_share_of_every_tile(idefics3, tile_pictures):
    model, processor = idefics3
    method = mv.Meteor.preset("stage1", encoder_keep=0.5)
    pruned_logits(model, inputs_for(processor, tile_pictures), method)
    assert [s["stage1_tokens"] for s in method.stats] == [2 * t for t in TILES]
    assert [s["encoder_tokens"] for s in method.stats] == [4 * t for t in TILES]


def test_kept_grid_has_an_entry_for_every_tile_and_images_end_with_their_whole_image_tile(idefics3, tile_pictures):
    """The second prompt's two images have 2 + 1 tiles each: `stats` count 2 images and list 6 tiles, and the adapter's
    layout puts tiles 0-2 in its first image and 3-5 in its second, the last of each the tile after `<global-img>`."""
    model, processor = idefics3
    inputs = inputs_for(processor, tile_pictures)
    method = mv.FastV(layer=1, ratio=0.9)
    pruned_logits(model, inputs, method)
    assert [s["images"] for s in method.stats] == IMAGES
    assert [len(s["kept_grid"]) for s in method.stats] == TILES
    layout = adapt(model).layout({k: inputs[k] for k in ("pixel_values", "pixel_attention_mask")}, inputs["input_ids"])
    assert layout.tile_image.tolist() == [0] * 5 + [1] * 3 + [2] * 3 + [3] * 5
    assert layout.span.tolist() == [20, 12, 12, 20]
    assert layout.slot[7].tolist() == [8, 9, 10, 11]  # tile 7: the third of image 1
    glob = processor.tokenizer.convert_tokens_to_ids("<global-img>")
    ids = inputs["input_ids"]
    starts = ((ids == model.config.image_token_id).int().diff(dim=1) == 1).nonzero(as_tuple=True)
    whole = [k for k, (r, c) in enumerate(zip(*starts)) if ids[r, c] == glob]  # runs after the tag
    assert whole == [4, 7, 10, 15]


def test_bad_inputs_are_refused(idefics3, tile_pictures):
    model, processor = idefics3
    inputs = inputs_for(processor, tile_pictures, which=(0,))
    fewer = {**inputs, "pixel_values": inputs["pixel_values"][:, :3], "pixel_attention_mask": None}
    with pytest.raises(ValueError, match=r"not one run of 4 tokens per tile of the \[3\] tiles"):
        pruned_logits(model, fewer, mv.FastV())
    shifted = inputs["input_ids"].clone()  # runs of 5 and 3 image tokens: the same count, not a run per tile
    is_img = shifted[0] == model.config.image_token_id
    first_end = int(is_img.int().diff().eq(-1).nonzero()[0, 0])  # the first run's last token
    shifted[0, first_end + 1] = model.config.image_token_id
    shifted[0, first_end + 3] = inputs["input_ids"][0, first_end + 2]
    with pytest.raises(ValueError, match=r"image-token runs \[5, 3, 4, 4, 4\]"):
        pruned_logits(model, {**inputs, "input_ids": shifted}, mv.FastV())
    untagged = inputs["input_ids"].clone()  # the whole-image tile's tag replaced by a tile's place
    glob = untagged[0] == processor.tokenizer.convert_tokens_to_ids("<global-img>")
    untagged[0, glob] = processor.tokenizer.convert_tokens_to_ids("<row_1_col_1>")
    two = inputs_for(processor, tile_pictures, which=(0, 2))
    two["input_ids"] = torch.cat([untagged, two["input_ids"][1:]])
    with pytest.raises(ValueError, match="last image-token runs follow different tokens"):
        pruned_logits(model, two, mv.FastV())
    padded = {**inputs, "pixel_attention_mask": inputs["pixel_attention_mask"].clone()}
    padded["pixel_attention_mask"][0, 1, :, 8:] = 0  # the right three quarters of tile 1: padding
    with pytest.raises(ValueError, match="pads some patches of a tile"):
        pruned_logits(model, padded, mv.FastV())
    flat = {**inputs, "pixel_values": inputs["pixel_values"][0]}
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, tiles, 3, height, width\)"):
        pruned_logits(model, flat, mv.FastV())
    side = inputs["pixel_values"].shape[-1]
    small = {**inputs, "pixel_values": inputs["pixel_values"][..., : side // 2, : side // 2], "pixel_attention_mask": None}
    with pytest.raises(ValueError, match="tower's"):
        pruned_logits(model, small, mv.FastV())
    assert "forward" not in vars(model)


TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} a{% endif %}")


@pytest.mark.parametrize("kind", KINDS)
def test_meteor_ask_and_speed_run_a_checkpoint_folder(tmp_path, capsys, tile_pictures, kind):
    """A transformers Idefics3 / SmolVLM checkpoint folder (saved model, tokenizer, image processor, chat template)
    runs under `meteor ask` (the answer greedy generate gives on the chat template's prompt under the same method;
    ToMe merges windows in every tile; the heatmap draws the last tile, the whole image) and `meteor speed`; the
    processor read back from the folder gives the same inputs."""
    from transformers import Idefics3Processor

    from meteor_vlm.models.idefics3 import load_processor

    model, processor = mv.testing.tiny_idefics3(seed=3, kind=kind)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    Idefics3Processor(processor.image_processor, processor.tokenizer, image_seq_len=4,
                      chat_template=TEMPLATE).save_pretrained(ckpt)
    loaded = load_processor(ckpt)
    tile_pictures[1].save(tmp_path / "img.png")
    prompt = loaded.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                      {"type": "text", "text": "what is in the image ?"}]}],
                                        add_generation_prompt=True)
    inputs = loaded(images=[tile_pictures[1]], text=[prompt], return_tensors="pt")
    mine = processor(images=[tile_pictures[1]], text=["<image>what is in the image ? a"], return_tensors="pt")
    assert inputs.keys() == mine.keys() and all(torch.equal(inputs[k], mine[k]) for k in inputs)
    assert_ask_and_speed_run_the_folder(model, processor, inputs, ckpt, tmp_path, capsys)
