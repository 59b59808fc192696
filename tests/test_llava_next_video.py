"""Stock transformers LLaVA-NeXT-Video (`LlavaNextVideoForConditionalGeneration`) under every method: LLaVA-NeXT's
images beside videos whose frames the model pools over 2 x 2 windows before its projector. The oracles: pruning
nothing is the stock model; patches dropped in the tower leave each window as the pooling of its surviving patches
(computed here from the frames' geometry); drop == mask; batch == one by one; cached == uncached; beams."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import meteor_vlm as mv
from meteor_vlm.models.adapters import adapt
from meteor_vlm.models.llava import LlavaNextVideoImageTextProcessor

from .test_llava import (NOOPS, PRUNING, assert_bad_videos_refused, assert_drop_at_layer_is_masking,
                         assert_videos_noop_is_the_stock_model, place_tokens, pruned_logits, stock_embeds)
from .test_oracles import check_batch_and_cache, check_beams_against_the_stock_model, masked_decoder_logits

PROMPTS = ["<video> <image> what is in the image ?", "<image> <video> <image> how many red circle are there ?",
           "<video> describe the shape ?"]
IMAGES = {0: [0], 1: [1, 2], 2: []}  # the pictures of each prompt


@pytest.fixture(scope="module", params=["average", "max"])
def next_video(request):
    return mv.testing.tiny_llava(seed=2, video=request.param)


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(4)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 90), (70, 50), (64, 64)]]


def video_inputs(processor, pictures, which=(0, 1, 2), frames=3):
    """PROMPTS[i] with their images (one, two, none) and a video of `frames` random frames each: images and videos in
    either order, a prompt with a video alone; left-padded."""
    rng = np.random.default_rng(7)
    videos = [[Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)) for _ in range(frames)]
              for _ in range(3)]
    images = [pictures[k] for i in which for k in IMAGES[i]]
    return processor(images=images or None, videos=[videos[i] for i in which], text=[PROMPTS[i] for i in which],
                     return_tensors="pt", padding=True)


def image_kwargs(batch, ids):
    return {k: batch[k] for k in ("pixel_values", "image_sizes", "pixel_values_videos") if k in batch}


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_llava_next_video_pruning_nothing_equals_the_stock_model(next_video, pictures, make):
    """Videos (each frame's 2 x 2 windows pooled before the projector, no row end) beside images, before or after them,
    or alone: pruning nothing is the stock model; `stats` count a sample's images and videos, the patches the tower
    hands on (every frame's 16) and the tokens entering the LLM (4 a frame)."""
    model, processor = next_video
    inputs = video_inputs(processor, pictures)
    method = make()
    assert_videos_noop_is_the_stock_model(model, inputs, method)
    video_tokens = (inputs["input_ids"] == model.config.video_token_id).sum(1)
    assert video_tokens.tolist() == [3 * 4] * 3
    image_patches = [16 * sum(image_size_to_num_patches(pictures[k].size[::-1], model.config.image_grid_pinpoints, 32)
                              for k in IMAGES[i]) for i in range(3)]
    assert [s["stage1_tokens"] for s in method.stats] == [p + 3 * 16 for p in image_patches]


class FrameGaps(mv.PruningMethod):
    """Test method: at the tower's output, keep every patch of the first `tiles` rows (the images' tiles) and, in the
    frames after them, the patches where (3 * patch + row) % 4 != 0 (the first patch always): gaps in every window
    position across the frames, a different count per frame."""

    name = "frame-gaps-test"

    def __init__(self, tiles):
        self.tiles = tiles
        self.stats = []

    def encoder_blocks(self, num_blocks):
        return [num_blocks - 1]

    def prune_encoder(self, ctx):
        B, N = ctx.patches.shape[:2]
        keep = (torch.arange(N)[None] * 3 + torch.arange(B)[:, None]) % 4 != 0
        keep[: self.tiles] = True
        keep[:, 0] = True
        self.kept = keep
        return mv.ops.mask_to_padded_indices(keep)


def pooled_video_embeds(model, inputs, keep):
    """The stock input embeddings with each video token replaced, computed here: frame f's window (i, j) (its patches
    (2i + a, 2j + b), a, b in {0, 1}) is the mean (or max, by the model's pool mode) of the tower's features of its
    patches `keep` (frames, 16) holds, projected by the stock projector, and present where its patch (2i + 1, 2j + 1)
    was kept. Returns embeds and, per sample, the video columns not present."""
    cfg, m = model.config, model.model
    embeds = stock_embeds(model, inputs)
    tokens = []
    with torch.no_grad():
        frames = inputs["pixel_values_videos"].flatten(0, 1)
        hidden = m.vision_tower(frames, output_hidden_states=True).hidden_states[cfg.vision_feature_layer][:, 1:]
        for x, k in zip(hidden, keep):
            for i in range(2):
                for j in range(2):
                    cells = [(2 * i + a) * 4 + 2 * j + b for a in (0, 1) for b in (0, 1)]
                    alive = [c for c in cells if k[c]]
                    if not k[(2 * i + 1) * 4 + 2 * j + 1]:
                        tokens.append(None)
                        continue
                    pooled = x[alive].mean(0) if cfg.spatial_pool_mode == "average" else x[alive].max(0).values
                    tokens.append(m.multi_modal_projector(pooled))
    drop = [[] for _ in range(len(embeds))]
    place_tokens(embeds, inputs["input_ids"] == cfg.video_token_id, tokens, drop)
    return embeds, drop


def test_frames_pruned_in_the_tower_leave_the_pooling_of_the_patches_kept(next_video, pictures):
    """Patches dropped at the tower's output in every frame (the images' tiles kept whole): each window is present
    where its patch nearest the centre survived, as the pooling of the window's surviving patches (computed here,
    `pooled_video_embeds`), projected; the absent windows masked from layer 0 on. Keeping every patch, that
    computation is the stock model's embedding; the stock features so masked are not the answer."""
    model, processor = next_video
    inputs = video_inputs(processor, pictures)
    every, none = pooled_video_embeds(model, inputs, torch.ones(9, 16, dtype=torch.bool))
    torch.testing.assert_close(every, stock_embeds(model, inputs), atol=1e-6, rtol=1e-6)
    assert none == [[], [], []]
    adapter = adapt(model)
    tiles = len(adapter.tiles({k: inputs.get(k) for k in adapter.IMAGE_INPUTS})) - 9
    method = FrameGaps(tiles)
    got = pruned_logits(model, inputs, method)
    keep = method.kept[tiles:]
    embeds, drop = pooled_video_embeds(model, inputs, keep)
    assert all(len(d) > 0 for d in drop) and not keep.all()
    ids = inputs["input_ids"]
    visual = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
    assert [s["fusion_tokens"] for s in method.stats] == [int(n) - len(d) for n, d in zip(visual.sum(1), drop)]
    lm, mask = model.model.language_model, inputs["attention_mask"].bool()
    want = masked_decoder_logits(lm, model.lm_head, embeds, mask, drop, 0)
    text = mask & ~visual
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)
    masked = masked_decoder_logits(lm, model.lm_head, stock_embeds(model, inputs), mask, drop, 0)
    assert (got[text] - masked[text]).abs().max() > 1e-3, "the pooled windows changed: the stock features masked are not it"


@pytest.mark.parametrize("layer", [0, 3])
def test_dropping_video_and_image_tokens_at_an_llm_layer_equals_masking_them_from_that_layer_on(next_video, pictures,
                                                                                                 layer):
    model, processor = next_video
    assert_drop_at_layer_is_masking(model, video_inputs(processor, pictures, which=(0, 1)), layer)


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_on_llava_next_video_obeys_the_batch_and_cache_oracles(next_video, pictures, make):
    model, processor = next_video
    check_batch_and_cache(model, make(), lambda which: video_inputs(processor, pictures, which), image_kwargs,
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


def test_beam_search_keeps_each_prompts_images_and_videos_with_its_rows(next_video, pictures):
    model, processor = next_video
    check_beams_against_the_stock_model(model, video_inputs(processor, pictures, which=(0, 1)),
                                        mv.FastV(layer=1, ratio=0.5))


def test_llava_next_video_inputs_and_settings_it_cannot_run_get_clear_errors(pictures):
    model, processor = mv.testing.tiny_llava(seed=2, video="average")
    inputs = video_inputs(processor, pictures, which=(2,))
    assert_bad_videos_refused(model, processor, inputs)
    with pytest.raises(ValueError, match="give no video_processor"):
        LlavaNextVideoImageTextProcessor(object(), processor.image_processor, processor.tokenizer)
    model.config.spatial_pool_mode = "conv"
    try:
        with pytest.raises(ValueError, match="spatial_pool_mode='conv' is not supported"):
            pruned_logits(model, inputs, mv.FastV())
    finally:
        model.config.spatial_pool_mode = "average"
    assert "forward" not in vars(model)


def test_meteor_ask_and_speed_run_a_llava_next_video_checkpoint_folder(tmp_path, capsys):
    """A saved LLaVA-NeXT-Video folder (model, and the processor with its frame settings) runs under `meteor ask` (the
    answer greedy generate gives under the same method) and `meteor speed`, with images and with `--video`."""
    from meteor_vlm.cli import main

    model, processor = mv.testing.tiny_llava(seed=3, video="average")
    processor.frame_settings["crop_size"] = {"height": 32, "width": 32}
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    loaded = LlavaNextVideoImageTextProcessor.from_pretrained(tmp_path / "ckpt")
    assert loaded.frame_settings == processor.frame_settings and loaded.patch_size == 8
    older = tmp_path / "older"  # a folder without a video processor's settings: the image processor's, as stock reads
    processor.save_pretrained(older)
    (older / "video_preprocessor_config.json").unlink()
    images = json.loads((older / "preprocessor_config.json").read_text())
    frames = LlavaNextVideoImageTextProcessor.from_pretrained(older).frame_settings
    assert frames["crop_size"] == images["crop_size"] and frames["size"] == images["size"] == {"shortest_edge": 32}
    picture = mv.testing.random_images(1, seed=9)[0].resize((80, 48))
    picture.save(tmp_path / "img.png")
    ckpt = str(tmp_path / "ckpt")
    assert main(["ask", str(tmp_path / "img.png"), "what is in the image ?", "--model", ckpt, "--method",
                 "visionzip:keep0.5", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    inputs = processor(images=[picture], text=["<image> what is in the image ?"], return_tensors="pt")
    with mv.VisionZip(keep=0.5)(model), torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert f"answer: {processor.decode(want[0, inputs['input_ids'].shape[1]:]).strip()}\n" in out
    assert main(["speed", "--model", ckpt, "--samples", "2", "--new-tokens", "2", "--video", "2", "--methods",
                 "unpruned,tome:keep0.5", "--out", str(tmp_path)]) == 0
    assert "a video of 2 frames" in capsys.readouterr().out
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert rows[0]["tokens"] == 2 * 4 > rows[1]["tokens"]  # two frames of 4 pooled tokens, no row end
