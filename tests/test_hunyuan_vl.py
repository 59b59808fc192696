"""Stock transformers HunYuanVL (`HunYuanVLForConditionalGeneration`, HunyuanOCR) on images, under every method:
no-op == stock model, drop == mask (four-axis multimodal RoPE, q/k norms after it), batch == one by one, cached ==
uncached, beams; windows dropped inside its ViT == the stock blocks run without them, merged by the stock merger
(its begin, newline and end tokens the layout's extra tokens)."""

import pytest
import torch

import meteor_vlm as mv
from meteor_vlm.models.adapters import adapt

from .test_gemma3 import NOOPS, PRUNING
from .test_internvl import assert_ask_and_speed_run_the_folder
from .test_llava import assert_noop_is_the_stock_model, pruned_logits
from .test_oracles import (DropAt, DropWindows, check_batch_and_cache, check_beams_against_the_stock_model,
                           masked_decoder_logits, survivors)

IMAGE = "<hy_image_start><hy_image><hy_image_end>"
PROMPTS = [f"{IMAGE} what is in the image ?", f"a {IMAGE} then {IMAGE} how many red circle are there ?",
           f"describe {IMAGE} what is it ?"]
IMAGES = [1, 2, 1]
SIZES = [(48, 48), (64, 32), (32, 64), (48, 48)]  # grids of 12 x 12, 8 x 16 and 16 x 8 patches
IMAGE_KEYS = ("pixel_values", "image_grid_thw")


@pytest.fixture(scope="module")
def hunyuan():
    return mv.testing.tiny_hunyuan_vl(seed=2)


@pytest.fixture(scope="module")
def pictures():
    return [im.resize(size) for im, size in zip(mv.testing.random_images(4, seed=5), SIZES)]


def inputs_for(processor, pictures, which=(0, 1, 2)):
    starts = [sum(IMAGES[:i]) for i in range(len(IMAGES))]
    images = [pictures[starts[i] + j] for i in which for j in range(IMAGES[i])]
    return dict(processor(images=images, text=[PROMPTS[i] for i in which], return_tensors="pt"))


def stock_logits(model, inputs):
    """The stock model's logits (its own multimodal RoPE positions, computed from the padded prompt)."""
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def stock_positions(model, inputs):
    return model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                      attention_mask=inputs["attention_mask"])[0]


def stock_embeds(model, inputs):
    """(B, T, D) the stock model's input embeddings: each image's merged tokens (its begin, newline and end tokens
    among them) at its image tokens."""
    with torch.no_grad():
        ids = inputs["input_ids"]
        embeds = model.get_input_embeddings()(ids)
        tokens = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        return embeds.masked_scatter((ids == model.config.image_token_id)[..., None].expand_as(embeds), tokens)


def test_the_tiny_model_exercises_its_positions_and_extra_tokens(hunyuan, pictures):
    """Images of three grids, each spanning its begin token, rows of windows each with a newline, its end token; the
    multimodal positions differ from the sequence's; the reference decoder of these tests is the stock model."""
    model, processor = hunyuan
    inputs = inputs_for(processor, pictures)
    assert inputs["image_grid_thw"].tolist() == [[1, 12, 12], [1, 8, 16], [1, 16, 8], [1, 12, 12]]
    assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == [6 * 7 + 2, 4 * 9 + 2 + 8 * 5 + 2,
                                                                                     6 * 7 + 2]
    positions = stock_positions(model, inputs)
    assert positions.shape[0] == 4 and not torch.equal(positions[1], positions[0])
    real = inputs["attention_mask"].bool()
    want = masked_decoder_logits(model.model.language_model, model.lm_head, stock_embeds(model, inputs), real, [[]] * 3,
                                 0, positions=positions)
    torch.testing.assert_close(want[real], stock_logits(model, inputs)[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_equals_the_stock_model_and_the_block_restores_it(hunyuan, pictures, make):
    model, processor = hunyuan
    method = make()
    assert_noop_is_the_stock_model(model, inputs_for(processor, pictures), method, stock_logits, pruned_logits)
    assert [s["images"] for s in method.stats] == IMAGES
    assert [s["encoder_tokens"] for s in method.stats] == [36, 32 + 32, 36]


@pytest.mark.parametrize("layer", [0, 2])
def test_dropping_at_llm_layer_equals_masking_keys(hunyuan, pictures, layer):
    model, processor = hunyuan
    inputs = inputs_for(processor, pictures, which=(0, 1))
    vis = inputs["input_ids"] == model.config.image_token_id
    drop = [vis[0].nonzero()[1::3, 0].tolist(), vis[1].nonzero()[1::2, 0].tolist()]
    got = pruned_logits(model, inputs, DropAt(layer, drop))
    want = masked_decoder_logits(model.model.language_model, model.lm_head, stock_embeds(model, inputs),
                                 inputs["attention_mask"].bool(), drop, layer, positions=stock_positions(model, inputs))
    text = inputs["attention_mask"].bool() & ~vis
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)


def stock_tower_without(model, patches, grid):
    """(kept windows, (K, D) merged tokens) of one image of `grid` (rows, cols) patches: the stock patch embedding,
    the stock blocks on the patches left, the windows `survivors` drops at each block removed, then the stock merger
    on the image's grid (dropped windows zero), read at the kept windows' places."""
    tower = model.model.vision_tower
    h, w = grid
    hidden = tower.embeddings(patches, [[1, h, w]])
    window = torch.arange(h * w).view(h // 2, 2, w // 2, 2).permute(0, 2, 1, 3).reshape(-1, 4)  # row-major windows
    alive, left = torch.arange(h * w // 4), torch.arange(h * w)
    for b, block in enumerate(tower.layers):
        hidden = block(hidden, attention_mask=None, cu_seqlens=torch.tensor([0, len(left)], dtype=torch.int32))
        alive = survivors(alive, b, 4)
        now = torch.isin(left, window[alive].flatten())
        hidden, left = hidden[:, now], left[now]
    full = hidden.new_zeros(1, h * w, hidden.shape[-1])
    full[:, left] = hidden
    merged = tower.patch_merger(full, size=(h, w))[0]
    cols = w // 2
    return alive, merged[1 + (alive // cols) * (cols + 1) + alive % cols]


def test_windows_dropped_inside_the_vit_equal_the_stock_blocks_run_without_them(hunyuan, pictures):
    """After each of the ViT's 2 blocks a test method drops whole 2x2 windows: the tokens that leave the tower equal
    the stock blocks run on the patches left, merged by the stock merger; and the logits equal the stock decoder with
    the dropped windows' image tokens masked from layer 0 on (the begin, newline and end tokens kept)."""
    model, processor = hunyuan
    inputs = inputs_for(processor, pictures, which=(0,))
    with torch.no_grad():
        visual = adapt(model).encode_images({k: inputs[k] for k in IMAGE_KEYS}, DropWindows(4))
        alive, want = stock_tower_without(model, inputs["pixel_values"], (12, 12))
        kept = visual.mask[0] if visual.mask is not None else torch.ones_like(visual.grid_index[0], dtype=torch.bool)
        assert 0 < len(alive) < 36 and visual.grid_index[0][kept].tolist() == alive.tolist()
        torch.testing.assert_close(visual.features[0][kept], want, atol=1e-5, rtol=1e-5)
        is_img = inputs["input_ids"] == model.config.image_token_id
        embeds = stock_embeds(model, inputs)
        cols = is_img[0].nonzero()[:, 0]
        place = 1 + (torch.arange(36) // 6) * 7 + torch.arange(36) % 6  # each window's image token
        embeds[0, cols[place[alive]]] = visual.features[0][kept]
        drop = [cols[place[~torch.isin(torch.arange(36), alive)]].tolist()]
        reference = masked_decoder_logits(model.model.language_model, model.lm_head, embeds,
                                          inputs["attention_mask"].bool(), drop, 0,
                                          positions=stock_positions(model, inputs))
    got = pruned_logits(model, inputs, DropWindows(4))
    torch.testing.assert_close(got[~is_img], reference[~is_img], atol=1e-5, rtol=1e-5)


def types_grown(batch, ids):
    grown = torch.zeros_like(ids[:, batch["input_ids"].shape[1]:])
    return {**{k: batch[k] for k in IMAGE_KEYS}, "mm_token_type_ids": torch.cat([batch["mm_token_type_ids"], grown], 1)}


def test_the_stock_model_numbers_images_across_the_batch(hunyuan, pictures):
    """The stock model's image-index axis counts a batch's images, not a prompt's: a prompt's positions (and logits)
    in a batch are not those it has alone. So the batch oracle below runs each prompt alone at the positions it had
    in the batch."""
    model, processor = hunyuan
    batch, alone = inputs_for(processor, pictures), inputs_for(processor, pictures, which=(2,))
    T = alone["input_ids"].shape[1]
    assert not torch.equal(stock_positions(model, batch)[:, 2, -T:], stock_positions(model, alone)[:, 0])
    assert not torch.allclose(stock_logits(model, batch)[2, -T:], stock_logits(model, alone)[0], atol=1e-3)


def at_batch_positions(model):
    def alone_with(b, batch, alone):
        return {"position_ids": stock_positions(model, batch)[:, b : b + 1, -alone["input_ids"].shape[1]:]}
    return alone_with


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_obeys_the_batch_and_cache_oracles(hunyuan, pictures, make):
    model, processor = hunyuan
    check_batch_and_cache(model, make(), lambda which: inputs_for(processor, pictures, which), types_grown,
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id],
                          alone_with=at_batch_positions(model))


def test_beam_search_keeps_each_prompts_images_with_its_rows(pictures):
    """Beams equal the stock model's words (not their scores: the stock model numbers the beams' repeated images in
    the order its own expansion gives them, another than each prompt's images repeated as a group); with the KV
    cache they equal recomputation without it, scores too."""
    model, processor = mv.testing.tiny_hunyuan_vl(seed=2)
    inputs = inputs_for(processor, pictures, which=(0, 1))
    check_beams_against_the_stock_model(model, inputs, mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0),
                                        stock_scores=False)


def test_meteor_stage1_keeps_its_share_of_every_image(hunyuan, pictures):
    model, processor = hunyuan
    method = mv.Meteor.preset("stage1", encoder_keep=0.5)
    pruned_logits(model, inputs_for(processor, pictures), method)
    assert [s["stage1_tokens"] for s in method.stats] == [18, 16 + 16, 18]


TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
            "<hy_image_start><hy_image><hy_image_end>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
            "{% if add_generation_prompt %} a{% endif %}")


def test_meteor_ask_and_speed_run_a_hunyuan_vl_checkpoint_folder(tmp_path, capsys, pictures):
    """A transformers HunYuanVL checkpoint folder (saved model, tokenizer, image processor, chat template) runs under
    `meteor ask` (the answer greedy generate gives under the same method; ToMe keeps half of the image's 36 windows;
    a heatmap) and `meteor speed`, with its own AutoProcessor read back from the folder."""
    from transformers import AutoProcessor, HunYuanVLProcessor

    model, processor = mv.testing.tiny_hunyuan_vl(seed=3)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    HunYuanVLProcessor(processor.image_processor, processor.tokenizer, chat_template=TEMPLATE).save_pretrained(ckpt)
    pictures[0].save(tmp_path / "img.png")
    loaded = AutoProcessor.from_pretrained(ckpt)
    prompt = loaded.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                      {"type": "text", "text": "what is in the image ?"}]}],
                                        add_generation_prompt=True)
    inputs = dict(loaded(images=[pictures[0]], text=[prompt], return_tensors="pt"))
    assert_ask_and_speed_run_the_folder(model, processor, inputs, ckpt, tmp_path, capsys, tokens=36)


def test_attention_rows_equal_the_eager_maps_rows_at_multimodal_positions(hunyuan, pictures):
    """On HunYuanVL's decoder (four RoPE axes at an image prompt's multimodal positions, per-head q/k norms after
    RoPE), the rows `attention_rows` scores equal the rows of the eager attention map, and the keys `key_states` gives
    are the layer's before RoPE."""
    from meteor_vlm.models.runtime import LLMLayerContext

    model, processor = hunyuan
    inputs = inputs_for(processor, pictures, which=(0,))
    lm, cfg = model.model.language_model, model.config.text_config
    embeds = stock_embeds(model, inputs)
    positions = stock_positions(model, inputs)
    T = embeds.shape[1]
    keys = {}
    hooks = [lm.layers[i].self_attn.k_proj.register_forward_hook(lambda m, a, k, i=i: keys.__setitem__(i, k))
             for i in range(len(lm.layers))]
    saved, cfg._attn_implementation = cfg._attn_implementation, "eager"
    try:
        with torch.no_grad():
            out = lm(inputs_embeds=embeds, position_ids=positions, output_attentions=True, output_hidden_states=True)
            parts = adapt(model).decoder
            pe = parts.position_embeddings(embeds, positions)
            valid = torch.ones(1, T, dtype=torch.bool)
            for layer in range(len(lm.layers)):
                ctx = LLMLayerContext(layer, len(lm.layers), lm.layers[layer], out.hidden_states[layer], valid, valid,
                                      positions[0], pe[layer], torch.tensor([T - 1]), valid, torch.tensor([T]))
                rows = ctx.attention_rows(torch.tensor([[T - 1, T // 2]]))
                torch.testing.assert_close(rows[0, :, 0], out.attentions[layer][0, :, T - 1], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(rows[0, :, 1], out.attentions[layer][0, :, T // 2], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(ctx.key_states(), keys[layer], atol=1e-6, rtol=1e-5)
    finally:
        cfg._attn_implementation = saved
        for h in hooks:
            h.remove()
