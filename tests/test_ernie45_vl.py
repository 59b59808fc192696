"""Stock transformers ERNIE 4.5 VL (`Ernie4_5_VLMoeForConditionalGeneration`) on images, under every method: no-op ==
stock model, drop == mask (multimodal RoPE, mixture-of-experts layers that route text and visual tokens apart by
`moe_mm_token_type_ids`), batch == one by one, cached == uncached, beams; windows dropped inside its ViT == the stock
blocks run without them, resampled as the stock model does; videos refused."""

import pytest
import torch
from transformers.vision_utils import get_vision_position_ids

import meteor_vlm as mv
from meteor_vlm.models.adapters import adapt

from .test_gemma3 import NOOPS, PRUNING
from .test_llava import assert_noop_is_the_stock_model, pruned_logits
from .test_oracles import DropAt, DropWindows, check_batch_and_cache, check_beams_against_the_stock_model, survivors

PROMPTS = ["<image> what is in the image ?", "a <image> then <image> how many red circle are there ?",
           "describe <image> what is it ?"]
IMAGES = [1, 2, 1]
SIZES = [(64, 64), (64, 32), (32, 64), (48, 48)]
IMAGE_KEYS = ("pixel_values", "image_grid_thw")


@pytest.fixture(scope="module")
def ernie():
    return mv.testing.tiny_ernie45_vl(seed=2)


@pytest.fixture(scope="module")
def pictures():
    return [im.resize(size) for im, size in zip(mv.testing.random_images(4, seed=5), SIZES)]


def inputs_for(processor, pictures, which=(0, 1, 2)):
    starts = [sum(IMAGES[:i]) for i in range(len(IMAGES))]
    return processor(images=[pictures[starts[i] + j] for i in which for j in range(IMAGES[i])],
                     text=[PROMPTS[i] for i in which])


def stock_logits(model, inputs):
    """The stock model's logits (its own multimodal positions, from the padded prompt)."""
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def stock_decoder_logits(model, inputs, drop=(), layer=0):
    """(B, T, V) the stock decoder's layers on the stock model's input embeddings at its multimodal positions, each
    layer given the prompt's `moe_mm_token_type_ids` (which experts each token goes to), the columns listed per sample
    in `drop` masked as keys from `layer` on (a dropped row still sees itself)."""
    lm = model.model.language_model
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    B, T = ids.shape
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        feats = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        embeds = embeds.masked_scatter((ids == model.config.image_token_id)[..., None].expand_as(embeds), feats)
        positions = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                               attention_mask=mask)[0]
        dropped = torch.zeros(B, T, dtype=torch.bool)
        for b, cols in enumerate(drop):
            dropped[b, list(cols)] = True
        causal, eye = torch.ones(T, T, dtype=torch.bool).tril(), torch.eye(T, dtype=torch.bool)
        h, pe = embeds, lm.rotary_emb(embeds, positions)
        for i, block in enumerate(lm.layers):
            keys = mask & ~dropped if i >= layer else mask
            m = ((causal[None] & keys[:, None, :]) | eye[None]).unsqueeze(1)
            h = block(h, attention_mask=m, position_embeddings=pe, moe_mm_token_type_ids=inputs["moe_mm_token_type_ids"])
        return model.lm_head(lm.norm(h))


def test_the_tiny_model_routes_tokens_by_modality(ernie, pictures):
    """The experts a token goes to change the stock logits (so the oracles see a wrong routing); the reference
    decoder of these tests is the stock model."""
    model, processor = ernie
    inputs = inputs_for(processor, pictures)
    real = inputs["attention_mask"].bool()
    untyped = {k: v for k, v in inputs.items() if k != "moe_mm_token_type_ids"}
    assert not torch.allclose(stock_logits(model, inputs)[real], stock_logits(model, untyped)[real], atol=1e-2)
    torch.testing.assert_close(stock_decoder_logits(model, inputs)[real], stock_logits(model, inputs)[real],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_equals_the_stock_model_and_the_block_restores_it(ernie, pictures, make):
    model, processor = ernie
    method = make()
    assert_noop_is_the_stock_model(model, inputs_for(processor, pictures), method, stock_logits, pruned_logits)
    assert [s["images"] for s in method.stats] == IMAGES
    assert [s["encoder_tokens"] for s in method.stats] == [64, 32 + 32, 36]


def test_without_modality_types_every_token_goes_to_the_text_experts(ernie, pictures):
    model, processor = ernie
    inputs = {k: v for k, v in inputs_for(processor, pictures).items() if k != "moe_mm_token_type_ids"}
    assert_noop_is_the_stock_model(model, inputs, mv.NoPruning(), stock_logits, pruned_logits)


@pytest.mark.parametrize("layer", [0, 2])
def test_dropping_at_llm_layer_equals_masking_keys(ernie, pictures, layer):
    model, processor = ernie
    inputs = inputs_for(processor, pictures, which=(0, 1))
    vis = inputs["input_ids"] == model.config.image_token_id
    drop = [vis[0].nonzero()[::3, 0].tolist(), vis[1].nonzero()[1::2, 0].tolist()]
    got = pruned_logits(model, inputs, DropAt(layer, drop))
    want = stock_decoder_logits(model, inputs, drop, layer)
    text = inputs["attention_mask"].bool() & ~vis
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)


def stock_tower_without(model, pixels, grid_thw):
    """(kept windows, (K, D) tokens) of one image: the stock patch embedding, the stock blocks on the patches left
    (with their stock 2D rotary positions), the windows `survivors` drops at each block removed, the final norm and
    the stock resampler on the kept windows."""
    tower = model.model.vision_tower
    hidden = tower.patch_embed(pixels)
    cos, sin = tower.rotary_pos_emb(hidden, get_vision_position_ids(torch.tensor([grid_thw]), 2))
    alive, left = torch.arange(hidden.shape[0] // 4), torch.arange(hidden.shape[0])
    for b, block in enumerate(tower.blocks):
        hidden = block(hidden, cu_seqlens=torch.tensor([0, len(left)], dtype=torch.int32),
                       position_embeddings=(cos[left], sin[left]))
        alive = survivors(alive, b, 4)
        now = torch.isin(left // 4, alive)
        hidden, left = hidden[now], left[now]
    kept = model.model.resampler_model(tower.ln(hidden), torch.tensor([[1, 2, 2 * len(alive)]]))
    return alive, kept


def test_windows_dropped_inside_the_vit_equal_the_stock_blocks_run_without_them(ernie, pictures):
    model, processor = ernie
    inputs = inputs_for(processor, pictures, which=(0,))
    with torch.no_grad():
        visual = adapt(model).encode_images({k: inputs[k] for k in IMAGE_KEYS}, DropWindows(4))
        alive, want = stock_tower_without(model, inputs["pixel_values"], inputs["image_grid_thw"][0].tolist())
        kept = visual.mask[0] if visual.mask is not None else torch.ones_like(visual.grid_index[0], dtype=torch.bool)
        assert 0 < len(alive) < 64 and visual.grid_index[0][kept].tolist() == alive.tolist()
        torch.testing.assert_close(visual.features[0][kept], want, atol=1e-5, rtol=1e-5)


def types_grown(batch, ids):
    """The batch's image inputs, and its per-column types grown to `ids` with text's (0)."""
    grown = torch.zeros_like(ids[:, batch["input_ids"].shape[1]:])
    return {**{k: batch[k] for k in IMAGE_KEYS},
            **{k: torch.cat([batch[k], grown], 1) for k in ("mm_token_type_ids", "moe_mm_token_type_ids") if k in batch}}


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_obeys_the_batch_and_cache_oracles(ernie, pictures, make):
    """Generated tokens go to the text experts, with the cache and without."""
    model, processor = ernie
    check_batch_and_cache(model, make(), lambda which: inputs_for(processor, pictures, which), types_grown,
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


def test_beam_search_keeps_each_prompts_images_with_its_rows(pictures):
    model, processor = mv.testing.tiny_ernie45_vl(seed=2)
    inputs = inputs_for(processor, pictures, which=(0, 1))
    check_beams_against_the_stock_model(model, inputs, mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0))


def test_videos_are_refused_and_the_processor_marks_image_bounds(ernie, pictures):
    model, processor = ernie
    inputs = inputs_for(processor, pictures, which=(0,))
    with pytest.raises(ValueError, match="videos are not supported"):
        pruned_logits(model, {**inputs, "pixel_values_videos": inputs["pixel_values"],
                              "video_grid_thw": inputs["image_grid_thw"]}, mv.FastV())
    with pytest.raises(ValueError, match="takes images only"):
        processor(videos=[[pictures[0]]], text=["<|VIDEO_PLACEHOLDER|>"])
    ids, moe = inputs["input_ids"][0], inputs["moe_mm_token_type_ids"][0]
    vocab = processor.tokenizer.get_vocab()
    bounds = (ids == vocab["<|IMAGE_START|>"]) | (ids == vocab["<|IMAGE_END|>"])
    assert int(bounds.sum()) == 2 and torch.equal(moe.bool(), (ids == model.config.image_token_id) | bounds)
    assert torch.equal(inputs["mm_token_type_ids"][0].bool(), ids == model.config.image_token_id)


TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
            "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
            "{% endfor %}{% if add_generation_prompt %} a{% endif %}")


def test_meteor_ask_and_speed_run_an_ernie45_vl_checkpoint_folder(tmp_path, capsys, pictures):
    """A transformers ERNIE 4.5 VL checkpoint folder runs under `meteor ask` (the answer greedy generate gives
    under the same method, a heatmap) and `meteor speed`, with `Ernie45VLImageTextProcessor` read back from the folder
    giving the same inputs."""
    from meteor_vlm.models.ernie4_5_vl import Ernie45VLImageTextProcessor

    from .test_internvl import assert_ask_and_speed_run_the_folder

    model, processor = mv.testing.tiny_ernie45_vl(seed=3)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    Ernie45VLImageTextProcessor(processor.image_processor, processor.tokenizer, TEMPLATE).save_pretrained(ckpt)
    loaded = Ernie45VLImageTextProcessor.from_pretrained(ckpt)
    pictures[0].save(tmp_path / "img.png")
    prompt = loaded.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                      {"type": "text", "text": "what is in the image ?"}]}])
    inputs = loaded(images=[pictures[0]], text=[prompt])
    mine = processor(images=[pictures[0]], text=["<image>what is in the image ? a"])
    assert inputs.keys() == mine.keys() and all(torch.equal(inputs[k], mine[k]) for k in inputs)
    assert_ask_and_speed_run_the_folder(model, processor, inputs, ckpt, tmp_path, capsys, tokens=64)
