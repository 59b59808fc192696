"""Stock transformers Gemma 4 (`Gemma4ForConditionalGeneration`) under every method: no-op == stock model, drop ==
mask (on a decoder with per-layer embeddings, last layers reusing earlier layers' keys and values, sliding and full
layers, image tokens seeing each other both ways on the sliding ones), batch == one by one, cached == uncached,
beams; windows dropped inside its ViT == the stock blocks run without them, pooled and embedded as the stock model
does; its videos and audio refused."""

import re

import pytest
import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.gemma4.modeling_gemma4 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

import meteor_vlm as mv
from meteor_vlm.models.adapters import adapt

from .test_gemma3 import NOOPS, PRUNING
from .test_internvl import assert_ask_and_speed_run_the_folder
from .test_llava import assert_noop_is_the_stock_model, pruned_logits, stock_logits
from .test_oracles import DropAt, DropWindows, check_batch_and_cache, check_beams_against_the_stock_model, survivors

PROMPTS = ["<|image|> what is in the image ?",
           "<|image|> <|image|> how many red circle are there in the image on the left ?",
           "describe <|image|> what is it ?"]
IMAGES = [1, 2, 1]  # images per prompt
SIZES = [(48, 48), (64, 32), (32, 64), (48, 48)]  # two images of one grid, two of others
IMAGE_KEYS = ("pixel_values", "image_position_ids")
VIDEO_KEYS = ("pixel_values_videos", "video_position_ids", "num_frames_per_video")
VIDEO_PROMPTS = ["<|image|> what is in the image ?", "<|video|> then <|image|> how many red circle are there ?",
                 "describe <|video|> what is it ?"]
VARIANTS = {"e2b": {}, "31b": dict(per_layer=False, shared_layers=0, k_eq_v=True),
            "moe": dict(moe=True, per_layer=False, bidirectional=False, shared_layers=3)}


@pytest.fixture(scope="module")
def gemma4():
    return mv.testing.tiny_gemma4(seed=2)


@pytest.fixture(scope="module")
def pictures():
    return [im.resize(size) for im, size in zip(mv.testing.random_images(4, seed=5), SIZES)]


def inputs_for(processor, pictures, which=(0, 1, 2)):
    starts = [sum(IMAGES[:i]) for i in range(len(IMAGES))]
    imgs = [pictures[starts[i] + j] for i in which for j in range(IMAGES[i])]
    return processor(images=imgs, text=[PROMPTS[i] for i in which])


def tower_tokens(model, inputs) -> tuple:
    """Each image's visual tokens as the adapter's unpruned tower gives them, (tokens, text width) each, then each
    video's (its frames' one after another)."""
    given = {k: inputs[k] for k in (*IMAGE_KEYS, *VIDEO_KEYS) if k in inputs}
    with torch.no_grad():
        visual = adapt(model).encode_images(given, mv.NoPruning())
    tiles = [visual.features[i, :n] for i, n in enumerate(adapt(model).encoder_tokens(given))]
    frames = inputs["num_frames_per_video"].tolist() if "num_frames_per_video" in inputs else []
    images = len(tiles) - sum(frames)
    starts = [images + sum(frames[:v]) for v in range(len(frames) + 1)]
    return tuple(tiles[:images]) + tuple(torch.cat(tiles[starts[v]:starts[v + 1]]) for v in range(len(frames)))


def stock_on_tower_tokens(model, inputs):
    """The stock model's logits (RoPE positions counted over real tokens, as generate does with left padding) on the
    adapter's unpruned visual tokens, handed to it as precomputed encoder outputs (`mm_encoder_outputs`): those equal
    the stock tower's up to float32 rounding of its pooling
    (`test_the_unpruned_tower_gives_the_stock_models_visual_tokens`), which a random model's logits amplify past the
    oracles' tolerance, so the oracles compare the decoders on the same tokens."""
    pos = (inputs["attention_mask"].long().cumsum(1) - 1).clamp_min(0)
    rest = {k: v for k, v in inputs.items() if k not in (*IMAGE_KEYS, *VIDEO_KEYS[:2])}
    tokens = tower_tokens(model, inputs)
    images = len(inputs["pixel_values"]) if "pixel_values" in inputs else 0
    encoded = {"image": BaseModelOutputWithPooling(pooler_output=tokens[:images])} if images else {}
    if "pixel_values_videos" in inputs:
        encoded["video"] = BaseModelOutputWithPooling(pooler_output=tokens[images:])
    with torch.no_grad():
        return model(**rest, position_ids=pos, use_cache=False, mm_encoder_outputs=encoded).logits


def stock_embeds(model, inputs, tokens=None):
    """(B, T, D) the stock model's input embeddings: each image's visual tokens (the stock tower's, or `tokens`: each
    image's, then each video's) at its image tokens, each video's at its video tokens."""
    with torch.no_grad():
        ids = inputs["input_ids"]
        image, video = ids == model.config.image_token_id, ids == model.config.video_token_id
        embeds = model.get_input_embeddings()(ids.masked_fill(image | video, model.config.text_config.pad_token_id))
        if tokens is None:
            tokens = model.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"]).pooler_output
        images = int(image.any()) and len(inputs["pixel_values"])
        for where, part in ((image, tokens[:images]), (video, tokens[images:])):
            if len(part):
                embeds = embeds.masked_scatter(where[..., None].expand_as(embeds), torch.cat(part))
        return embeds


def video_inputs(processor, pictures, which=(0, 1, 2)):
    """Prompts with images and videos: an image; a video of 3 frames, then an image; a video of 2 frames (frames of
    another grid than the images')."""
    frames = [im.resize((64, 32)) for im in mv.testing.random_images(3, seed=9)]
    items = [([pictures[0]], []), ([pictures[1]], [frames]), ([], [frames[:2]])]
    return processor(images=[im for i in which for im in items[i][0]] or None,
                     videos=[v for i in which for v in items[i][1]] or None,
                     text=[VIDEO_PROMPTS[i] for i in which], fps=2)


def stock_decoder_logits(model, inputs, embeds, drop=(), layer=0):
    """(B, T, V) the stock Gemma 4 decoder's layers on `embeds`, with its per-layer inputs as the stock model makes
    them, the keys and values its storing layers hand on to the layers that reuse them, and each layer the mask
    transformers builds for its kind (where `inputs` has mm_token_type_ids and the model's images see themselves,
    both ways among an image's tokens on the sliding layers), the columns listed per sample in `drop` masked as keys
    from `layer` on (a dropped row still sees itself): on a layer that reuses an earlier layer's keys too."""
    lm, cfg = model.model.language_model, model.config.get_text_config()
    mask, ids = inputs["attention_mask"], inputs["input_ids"]
    B, T = mask.shape
    pos = (mask.long().cumsum(1) - 1).clamp_min(0)
    kw = dict(config=cfg, inputs_embeds=embeds, attention_mask=mask, cache=None, position_ids=pos)
    if "mm_token_type_ids" in inputs and cfg.use_bidirectional_attention == "vision":
        masks = create_masks_for_vision_model(
            block_sequence_ids=get_block_sequence_ids_for_mask(inputs["mm_token_type_ids"], embeds.device), **kw)
    else:
        masks = {"full_attention": create_causal_mask(**kw), "sliding_attention": create_sliding_window_causal_mask(**kw)}
    dropped = torch.zeros(B, T, dtype=torch.bool)
    for b, cols in enumerate(drop):
        dropped[b, list(cols)] = True
    eye = torch.eye(T, dtype=torch.bool)
    with torch.no_grad():
        per_layer = None
        if cfg.hidden_size_per_layer_input:
            visual = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
            own = ids.masked_fill(visual, cfg.pad_token_id)
            per_layer = lm.project_per_layer_inputs(embeds, lm.get_per_layer_inputs(own, embeds))
        shared, h = {}, embeds
        for i, block in enumerate(lm.layers):
            kind = cfg.layer_types[i]
            m = masks[kind]
            if m is None:  # what transformers leaves to SDPA's own causal mask (a batch without padding)
                m = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
            if i >= layer:
                m = (m & ~dropped[:, None, None, :]) | eye
            h = block(h, None if per_layer is None else per_layer[:, :, i], shared_kv_states=shared, attention_mask=m,
                      position_ids=pos, position_embeddings=lm.rotary_emb(h, pos, kind))
        logits = model.lm_head(lm.norm(h))
        cap = cfg.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_tiny_models_exercise_what_gemma4_adds(pictures, variant):
    """The prompts are longer than the sliding window, hold images of several grids, reach KV-shared layers (e2b,
    moe) and per-layer inputs (e2b); the image blocks change the stock logits (e2b, 31b); and the reference decoder
    of these tests is the stock model."""
    model, processor = mv.testing.tiny_gemma4(seed=2, **VARIANTS[variant])
    inputs = inputs_for(processor, pictures)
    cfg = model.config.get_text_config()
    assert inputs["input_ids"].shape[1] > 4 * cfg.sliding_window
    assert len({tuple(g) for g in adapt(model)._tiles(inputs)[0].tolist()}) == 3
    assert ("reuse" in cfg.kv_sharing_modes) == (variant != "31b")
    assert bool(cfg.hidden_size_per_layer_input) == (variant == "e2b")
    real = inputs["attention_mask"].bool()
    causal = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    if variant != "moe":
        assert not torch.allclose(stock_logits(model, inputs)[real], stock_logits(model, causal)[real], atol=1e-2)
    for given in (inputs, causal):
        torch.testing.assert_close(stock_decoder_logits(model, given, stock_embeds(model, given))[real],
                                   stock_logits(model, given)[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["e2b", "31b"])
def test_the_unpruned_tower_gives_the_stock_models_visual_tokens(pictures, variant):
    """Images of three grids, padded to the patch budget in one batch for the stock tower, one grid at a time here:
    the same tokens up to float32 rounding (the stock pooler averages each window by a one-hot matrix product, in
    float32 whatever the model's dtype; here a mean, in another order)."""
    model, processor = mv.testing.tiny_gemma4(seed=2, **VARIANTS[variant])
    inputs = inputs_for(processor, pictures)
    with torch.no_grad():
        stock = model.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"]).pooler_output
    mine = tower_tokens(model, inputs)
    assert [len(t) for t in mine] == [len(t) for t in stock] == [64, 55, 55, 64]
    for a, b in zip(mine, stock):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_equals_the_stock_model_and_the_block_restores_it(gemma4, pictures, make):
    model, processor = gemma4
    method = make()
    image_tokens = assert_noop_is_the_stock_model(model, inputs_for(processor, pictures), method,
                                                  stock_on_tower_tokens, pruned_logits)
    assert [s["images"] for s in method.stats] == IMAGES
    assert image_tokens == [s["encoder_tokens"] for s in method.stats] == [64, 55 + 55, 64]


@pytest.mark.parametrize("variant", ["31b", "moe"])
def test_pruning_nothing_equals_the_stock_model_on_the_other_kinds(pictures, variant):
    model, processor = mv.testing.tiny_gemma4(seed=2, **VARIANTS[variant])
    assert_noop_is_the_stock_model(model, inputs_for(processor, pictures), mv.NoPruning(), stock_on_tower_tokens,
                                   pruned_logits)


@pytest.mark.parametrize("layer", [0, 1, 2, 4, 5])  # sliding, full (storing), sliding and full reusing earlier keys
def test_dropping_at_llm_layer_equals_masking_keys(gemma4, pictures, layer):
    model, processor = gemma4
    assert_drop_is_masking(model, inputs_for(processor, pictures, which=(0, 1)), layer)


@pytest.mark.parametrize("variant", ["31b", "moe"])
def test_dropping_equals_masking_on_the_other_kinds(pictures, variant):
    model, processor = mv.testing.tiny_gemma4(seed=2, **VARIANTS[variant])
    for layer in (2, 4):
        assert_drop_is_masking(model, inputs_for(processor, pictures, which=(0, 1)), layer)


def assert_drop_is_masking(model, inputs, layer):
    vis = (inputs["input_ids"] == model.config.image_token_id) | (inputs["input_ids"] == model.config.video_token_id)
    drop = [vis[0].nonzero()[::3, 0].tolist(), vis[1].nonzero()[1::2, 0].tolist()]
    got = pruned_logits(model, inputs, DropAt(layer, drop))
    want = stock_decoder_logits(model, inputs, stock_embeds(model, inputs, tower_tokens(model, inputs)), drop, layer)
    text = inputs["attention_mask"].bool() & ~vis
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)


def stock_tower_without(model, patches, grid):
    """(kept windows, (K, D) embedded tokens) of one image of `grid` (rows, cols) patches: the stock patch embedder,
    the stock blocks on the patches left (with their own x, y positions and 2D rotary embedding), the windows
    `survivors` drops at each block removed, then the stock pooler (over whole windows), and the model's embedder."""
    tower = model.model.vision_tower
    h, w = grid
    k = tower.config.pooling_kernel_size
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    where = torch.stack([xs.flatten(), ys.flatten()], -1)[None]
    hidden = tower.patch_embedder(patches[None], where, torch.zeros(1, h * w, dtype=torch.bool))
    window = (where[0, :, 1] // k) * (w // k) + where[0, :, 0] // k  # each patch's window, row-major
    alive, left = torch.arange(h * w // k // k), torch.ones(h * w, dtype=torch.bool)
    for b, block in enumerate(tower.encoder.layers):
        pe = tower.encoder.rotary_emb(hidden, where[:, left])
        hidden = block(hidden, attention_mask=None, position_embeddings=pe, position_ids=where[:, left])
        alive = survivors(alive, b, 4)
        now = torch.isin(window[left], alive)
        hidden, left = hidden[:, now], left & torch.isin(window, alive)
    full = hidden.new_zeros(1, h * w, hidden.shape[-1])
    full[:, left] = hidden
    pooled, _ = tower.pooler(full, where, ~left[None], h * w // k // k)
    return alive, model.model.embed_vision(pooled[0, alive].to(hidden.dtype))


def test_windows_dropped_inside_the_vit_equal_the_stock_blocks_run_without_them(gemma4, pictures):
    """After each of the ViT's 2 blocks a test method drops whole 2x2 windows: the tokens that leave the tower equal
    the stock blocks run on the patches left, pooled by the stock pooler and embedded, and the logits equal the stock
    decoder with the dropped windows' image tokens masked from layer 0 on."""
    model, processor = gemma4
    inputs = inputs_for(processor, pictures, which=(0,))
    with torch.no_grad():
        visual = adapt(model).encode_images({k: inputs[k] for k in IMAGE_KEYS}, DropWindows(4))
        alive, want = stock_tower_without(model, inputs["pixel_values"][0, :256], (16, 16))
        kept = visual.mask[0] if visual.mask is not None else torch.ones_like(visual.grid_index[0], dtype=torch.bool)
        assert 0 < len(alive) < 64 and visual.grid_index[0][kept].tolist() == alive.tolist()
        torch.testing.assert_close(visual.features[0][kept], want, atol=1e-5, rtol=1e-5)
        is_img = inputs["input_ids"] == model.config.image_token_id
        embeds = stock_embeds(model, inputs)
        cols = is_img[0].nonzero()[:, 0]
        embeds[0, cols[alive]] = visual.features[0][kept]  # the same tokens as the pruned model's (close to `want`)
        drop = [[int(c) for g, c in enumerate(cols) if g not in alive.tolist()]]
        reference = stock_decoder_logits(model, inputs, embeds, drop, 0)
    got = pruned_logits(model, inputs, DropWindows(4))
    torch.testing.assert_close(got[~is_img], reference[~is_img], atol=1e-5, rtol=1e-5)


def types_grown(batch, ids):
    grown = torch.zeros_like(ids[:, batch["input_ids"].shape[1]:])
    return {**{k: batch[k] for k in IMAGE_KEYS}, "mm_token_type_ids": torch.cat([batch["mm_token_type_ids"], grown], 1)}


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_obeys_the_batch_and_cache_oracles(gemma4, pictures, make):
    """Generation runs past the sliding window, whose cache layers keep only their last keys, and through the layers
    that reuse the cached keys of earlier ones."""
    model, processor = gemma4
    check_batch_and_cache(model, make(), lambda which: inputs_for(processor, pictures, which), types_grown,
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id], steps=6)


@pytest.mark.parametrize("variant", ["31b", "moe"])
def test_the_other_kinds_obey_the_batch_and_cache_oracles(pictures, variant):
    model, processor = mv.testing.tiny_gemma4(seed=2, **VARIANTS[variant])
    check_batch_and_cache(model, mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0),
                          lambda which: inputs_for(processor, pictures, which), types_grown,
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id], steps=6)


def test_beam_search_keeps_each_prompts_images_with_its_rows(pictures):
    model, processor = mv.testing.tiny_gemma4(seed=2)
    inputs = inputs_for(processor, pictures, which=(0, 1))
    check_beams_against_the_stock_model(model, inputs, mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0))


def test_meteor_stage1_keeps_its_share_of_every_image(gemma4, pictures):
    model, processor = gemma4
    method = mv.Meteor.preset("stage1", encoder_keep=0.5)
    pruned_logits(model, inputs_for(processor, pictures), method)
    assert [s["stage1_tokens"] for s in method.stats] == [32, 28 + 28, 32]  # half of 55 rounds to 28


def test_bad_inputs_and_audio_are_refused(gemma4, pictures):
    model, processor = gemma4
    inputs = inputs_for(processor, pictures, which=(0,))
    with pytest.raises(ValueError, match="videos are not supported"):  # the stock adapter's words for its audio
        pruned_logits(model, {**inputs, "input_features": inputs["pixel_values"]}, mv.FastV())
    with pytest.raises(ValueError, match="needs num_frames_per_video"):
        pruned_logits(model, {**inputs, "pixel_values_videos": inputs["pixel_values"],
                              "video_position_ids": inputs["image_position_ids"]}, mv.FastV())
    shuffled = inputs["image_position_ids"].clone()
    shuffled[0, :2] = shuffled[0, [1, 0]]
    with pytest.raises(ValueError, match="not a row-major grid"):
        pruned_logits(model, {**inputs, "image_position_ids": shuffled}, mv.FastV())
    with pytest.raises(ValueError, match="needs image_position_ids"):
        pruned_logits(model, {k: v for k, v in inputs.items() if k != "image_position_ids"}, mv.FastV())
    short = {**inputs, "mm_token_type_ids": inputs["mm_token_type_ids"][:, 1:]}
    with pytest.raises(ValueError, match="mm_token_type_ids .* must have the shape of input_ids"):
        pruned_logits(model, short, mv.FastV())
    with pytest.raises(ValueError, match=re.escape("hold 0 <|video|> tokens for 1 videos")):
        processor(videos=[[pictures[0]]], text=["what is it ?"])
    with pytest.raises(ValueError, match="frames of one size"):
        processor(videos=[[pictures[0], pictures[1]]], text=["<|video|>"])
    with pytest.raises(ValueError, match=re.escape("hold 2 <|image|> tokens for 1 images")):
        processor(images=[pictures[0]], text=[PROMPTS[1]])
    assert "forward" not in vars(model)


TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|image|>"
            "{% elif c['type'] == 'video' %}<|video|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
            "{% if add_generation_prompt %} a{% endif %}")


def test_meteor_ask_and_speed_run_a_gemma4_checkpoint_folder(tmp_path, capsys, pictures):
    """A transformers Gemma 4 checkpoint folder (saved model, tokenizer, image processor, chat template) runs under
    `meteor ask` (the answer greedy generate gives on the chat template's prompt under the same method; ToMe keeps
    half of the image's 64 tokens; a heatmap) and `meteor speed`, with `Gemma4ImageTextProcessor` read back from the
    folder, which gives the same inputs; `meteor speed --video` runs it on videos."""
    from meteor_vlm.cli import main
    from meteor_vlm.models.gemma4 import Gemma4ImageTextProcessor

    model, processor = mv.testing.tiny_gemma4(seed=3)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    Gemma4ImageTextProcessor(processor.image_processor, processor.tokenizer, TEMPLATE).save_pretrained(ckpt)
    pictures[0].save(tmp_path / "img.png")
    loaded = Gemma4ImageTextProcessor.from_pretrained(ckpt)
    prompt = loaded.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                      {"type": "text", "text": "what is in the image ?"}]}])
    inputs = loaded(images=[pictures[0]], text=[prompt])
    mine = processor(images=[pictures[0]], text=["<|image|>what is in the image ? a"])
    assert inputs.keys() == mine.keys() and all(torch.equal(inputs[k], mine[k]) for k in inputs)
    assert_ask_and_speed_run_the_folder(model, processor, inputs, ckpt, tmp_path, capsys, tokens=64)
    assert loaded.video_soft_tokens == 70
    assert main(["speed", "--model", str(ckpt), "--samples", "1", "--new-tokens", "2", "--video", "2", "--methods",
                 "unpruned,fastv:k1-r0.5"]) == 0
    assert "a video of 2 frames" in capsys.readouterr().out


def test_attention_rows_and_keys_on_layers_that_reuse_earlier_keys():
    """On a Gemma 4 text decoder whose last two layers reuse the keys of the first two (a sliding and a full layer,
    the full one with wider heads rotated over a quarter of each), per-layer inputs and attention scaled by 1 after
    q/k norms: the rows `attention_rows` scores equal the rows of the eager attention map on every layer, and the
    keys `key_states` gives (DART's) are the ones the layer's attention uses before RoPE: on a reusing layer, its
    source layer's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from meteor_vlm.models.runtime import DecoderParts, LLMLayerContext

    cfg = AutoConfig.for_model("gemma4_text", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=4, head_dim=8, global_head_dim=16,
                               sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2,
                               num_kv_shared_layers=2, hidden_size_per_layer_input=8, vocab_size_per_layer_input=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(1)
    lm = AutoModelForCausalLM.from_config(cfg).eval()
    for name, weights in lm.named_parameters():
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            weights.data.uniform_(0.5, 1.5)
    parts = DecoderParts.of(lm)
    assert parts.kv_sources == (None, None, 0, 1)
    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(0))
    keys = {}  # the keys layers 0 and 1 compute, before RoPE
    for i in (0, 1):
        lm.model.layers[i].self_attn.k_norm.register_forward_hook(
            lambda module, args, k, i=i: keys.__setitem__(i, k.flatten(2)))
    with torch.no_grad():
        out = lm(input_ids=ids, output_attentions=True, output_hidden_states=True, return_shared_kv_states=True)
        pos = torch.arange(13).expand(2, -1)
        valid = torch.ones(2, 13, dtype=torch.bool)
        for layer in range(4):
            h = out.hidden_states[layer]
            source = parts.kv_sources[layer]
            shared = None if source is None else out.shared_kv_states[cfg.layer_types[layer]][0]
            ctx = LLMLayerContext(layer, 4, lm.model.layers[layer], h, valid, valid, pos,
                                  parts.position_embeddings(h, pos)[layer], torch.tensor([12, 12]), valid,
                                  torch.tensor([13, 13]), shared)
            rows = ctx.attention_rows(torch.tensor([[12, 5], [12, 7]]))
            want = out.attentions[layer]
            torch.testing.assert_close(rows[:, :, 0], want[:, :, 12], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(rows[1, :, 1], want[1, :, 7], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(ctx.key_states(), keys[layer if source is None else source], atol=1e-5,
                                       rtol=1e-5)


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_videos_beside_images_pruning_nothing_equal_the_stock_model(gemma4, pictures, make):
    """A prompt with an image, one with a video and then an image, one with a video: every method at keep-all settings
    equals the stock model (its videos through its own `get_video_features` path's inputs); `stats` count a video as
    one item, its frames' tokens summed."""
    model, processor = gemma4
    inputs = video_inputs(processor, pictures)
    method = make()
    image_tokens = assert_noop_is_the_stock_model(model, inputs, method, stock_on_tower_tokens, pruned_logits)
    assert [s["images"] for s in method.stats] == [1, 2, 1]
    assert image_tokens == [s["encoder_tokens"] for s in method.stats] == [64, 3 * 55 + 55, 2 * 55]


def test_the_unpruned_tower_gives_the_stock_models_video_tokens(gemma4, pictures):
    model, processor = gemma4
    inputs = video_inputs(processor, pictures)
    with torch.no_grad():
        stock = model.model.get_video_features(*(inputs[k] for k in VIDEO_KEYS)).pooler_output
    mine = tower_tokens(model, inputs)[2:]
    assert [len(t) for t in mine] == [len(t) for t in stock] == [165, 110]
    for a, b in zip(mine, stock):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("layer", [2, 4])
def test_dropping_video_tokens_at_llm_layer_equals_masking_keys(gemma4, pictures, layer):
    model, processor = gemma4
    assert_drop_is_masking(model, video_inputs(processor, pictures, which=(1, 2)), layer)


def video_types_grown(batch, ids):
    return {**types_grown(batch, ids), **{k: batch[k] for k in VIDEO_KEYS}}


@pytest.mark.parametrize("make", [PRUNING["meteor"], PRUNING["fastv"], PRUNING["tome"]], ids=["meteor", "fastv", "tome"])
def test_videos_obey_the_batch_and_cache_oracles(gemma4, pictures, make):
    model, processor = gemma4
    check_batch_and_cache(model, make(), lambda which: video_inputs(processor, pictures, which), video_types_grown,
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


def test_beam_search_keeps_each_prompts_videos_with_its_rows(pictures):
    model, processor = mv.testing.tiny_gemma4(seed=2)
    inputs = video_inputs(processor, pictures, which=(1, 2))
    check_beams_against_the_stock_model(model, inputs, mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0))


def test_a_video_is_written_frame_by_frame_with_its_times(gemma4, pictures):
    """As `Gemma4Processor.replace_video_token` writes it: each frame's "mm:ss" time (frame k at k / fps seconds)
    before its `<|image>`, its tokens, `<image|>`, the frames separated by spaces; types 2 on its tokens."""
    _, processor = gemma4
    frames = [pictures[0].resize((64, 32))] * 3
    inputs = processor(videos=[frames], text=["a <|video|> b"], fps=0.5)
    n = int(inputs["mm_token_type_ids"].eq(2).sum()) // 3
    one = "<|image>" + "<|video|>" * n + "<image|>"
    want = processor.tokenizer(f"a 00:00 {one} 00:02 {one} 00:04 {one} b", return_tensors="pt")["input_ids"]
    assert n == 55 and torch.equal(inputs["input_ids"], want)
    assert processor.written_video(3, 2, 0.05) == ("00:00 <|image><|video|><|video|><image|> 00:20 "
                                                   "<|image><|video|><|video|><image|> 00:40 <|image><|video|><|video|><image|>")
    assert processor.written_video(2, 1, 1 / 75).startswith("00:00 <|image><|video|><image|> 01:15 ")
    assert inputs["num_frames_per_video"].tolist() == [3] and len(inputs["pixel_values_videos"]) == 3
