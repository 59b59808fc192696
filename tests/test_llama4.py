"""Stock transformers Llama 4 (`Llama4ForConditionalGeneration`) on images, under every method: no-op == stock
model, drop == mask (on a decoder with chunked-attention layers, complex RoPE and q/k norms, layers without RoPE, a
mixture of experts), batch == one by one, cached == uncached, beams; windows dropped inside its ViT (CLS after the
patches, 2D complex RoPE) == the stock blocks run without them, pixel-shuffled and projected as the stock model
does."""

import pytest
import torch
from transformers.masking_utils import create_causal_mask, create_chunked_causal_mask
from transformers.models.llama4.modeling_llama4 import pixel_shuffle

import meteor_vlm as mv
from meteor_vlm.models.adapters import adapt

from .test_gemma3 import NOOPS, PRUNING
from .test_llava import assert_noop_is_the_stock_model, pruned_logits, stock_logits
from .test_oracles import DropAt, DropWindows, check_batch_and_cache, check_beams_against_the_stock_model, survivors

PROMPTS = ["<|image|> what is in the image ?", "<|image|> <|image|> how many red circle are there on the left ?",
           "describe <|image|> what is it ?"]
TILES = [[(1, 1)], [(2, 1), (1, 2)], [(2, 2)]]  # each image's grid of tiles, per prompt


@pytest.fixture(scope="module")
def llama4():
    return mv.testing.tiny_llama4(seed=2)


@pytest.fixture(scope="module")
def pictures():
    return mv.testing.random_images(4, seed=5)


def inputs_for(processor, pictures, which=(0, 1, 2)):
    starts = [sum(len(t) for t in TILES[:i]) for i in range(len(TILES))]
    images = [pictures[starts[i] + j] for i in which for j in range(len(TILES[i]))]
    return processor(images=images, tiles=[t for i in which for t in TILES[i]], text=[PROMPTS[i] for i in which])


def stock_embeds(model, inputs, features=None):
    """(B, T, D) the stock model's input embeddings: every tile's tokens (the stock tower's, or `features`, (tiles,
    N, D)) at the image tokens."""
    with torch.no_grad():
        ids = inputs["input_ids"]
        embeds = model.get_input_embeddings()(ids)
        if features is None:
            features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        is_img = (ids == model.config.image_token_index)[..., None].expand_as(embeds)
        return embeds.masked_scatter(is_img, features.reshape(-1, embeds.shape[-1]))


def stock_decoder_logits(model, inputs, embeds, drop=(), layer=0):
    """(B, T, V) the stock Llama 4 decoder's layers on `embeds`, each with the mask transformers builds for its kind
    (chunked or full), the columns listed per sample in `drop` masked as keys from `layer` on (a dropped row still
    sees itself)."""
    lm, cfg = model.language_model.model, model.config.get_text_config()
    mask = inputs["attention_mask"]
    B, T = mask.shape
    pos = (mask.long().cumsum(1) - 1).clamp_min(0)
    kw = dict(config=cfg, inputs_embeds=embeds, attention_mask=mask, cache=None, position_ids=pos)
    masks = {"full_attention": create_causal_mask(**kw), "chunked_attention": create_chunked_causal_mask(**kw)}
    dropped = torch.zeros(B, T, dtype=torch.bool)
    for b, cols in enumerate(drop):
        dropped[b, list(cols)] = True
    eye = torch.eye(T, dtype=torch.bool)
    with torch.no_grad():
        h, freqs = embeds, lm.rotary_emb(embeds, pos)
        for i, block in enumerate(lm.layers):
            m = masks[cfg.layer_types[i]]
            if m is None:  # what transformers leaves to SDPA's own causal mask (a batch without padding)
                m = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
            if i >= layer:
                m = (m & ~dropped[:, None, None, :]) | eye
            h = block(h, attention_mask=m, position_ids=pos, position_embeddings=freqs)
        return model.language_model.lm_head(lm.norm(h))


def test_the_tiny_model_exercises_chunks_rope_free_layers_and_tiles(llama4, pictures):
    """The prompts span several attention chunks, which change the stock logits; some layers rotate nothing; images
    of 1, 2 and 4 tiles (and their whole-image tiles); and the reference decoder of these tests is the stock model."""
    model, processor = llama4
    inputs = inputs_for(processor, pictures)
    cfg = model.config.get_text_config()
    assert inputs["input_ids"].shape[1] > 4 * cfg.attention_chunk_size
    assert {"chunked_attention", "full_attention"} == set(cfg.layer_types) and 0 in cfg.no_rope_layers
    assert len(inputs["pixel_values"]) == 1 + 3 + 3 + 5
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(stock_decoder_logits(model, inputs, stock_embeds(model, inputs))[real],
                               stock_logits(model, inputs)[real], atol=1e-5, rtol=1e-5)
    whole, _ = mv.testing.tiny_llama4(seed=2, attention_chunk_size=512)
    assert not torch.allclose(stock_logits(whole, inputs)[real], stock_logits(model, inputs)[real], atol=1e-2)


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_equals_the_stock_model_and_the_block_restores_it(llama4, pictures, make):
    model, processor = llama4
    method = make()
    image_tokens = assert_noop_is_the_stock_model(model, inputs_for(processor, pictures), method, stock_logits,
                                                  pruned_logits)
    assert [s["images"] for s in method.stats] == [1, 2, 1]
    assert image_tokens == [s["encoder_tokens"] for s in method.stats] == [16, 16 * (3 + 3), 16 * 5]


@pytest.mark.parametrize("layer", [0, 1, 3])  # chunked layers with RoPE, and a full one without
def test_dropping_at_llm_layer_equals_masking_keys(llama4, pictures, layer):
    model, processor = llama4
    inputs = inputs_for(processor, pictures, which=(0, 1))
    vis = inputs["input_ids"] == model.config.image_token_index
    drop = [vis[0].nonzero()[::3, 0].tolist(), vis[1].nonzero()[1::2, 0].tolist()]
    got = pruned_logits(model, inputs, DropAt(layer, drop))
    want = stock_decoder_logits(model, inputs, stock_embeds(model, inputs), drop, layer)
    text = inputs["attention_mask"].bool() & ~vis
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)


def stock_tower_without(model, pixels):
    """(kept windows, (K, D) projected tokens) of one tile: the stock patch embedding, CLS and pre-norm, the stock
    blocks on CLS and the patches left (with their own rotations), the windows `survivors` drops at each block
    removed, the final norm, then the stock pixel shuffle over the tile (dropped windows zero), its MLP and the
    projector on the kept windows."""
    tower = model.vision_model
    g = tower.config.image_size // tower.config.patch_size
    patches = tower.patch_embedding(pixels[None])
    cls = tower.class_embedding.expand(1, 1, -1)
    hidden = tower.layernorm_pre(torch.cat([patches, cls], 1) + tower.positional_embedding_vlm)
    freqs = tower.rotary_embedding.freqs_ci
    window_of = torch.arange(g * g).view(g // 2, 2, g // 2, 2).permute(0, 2, 1, 3).reshape(-1, 4)
    alive, places = torch.arange((g // 2) ** 2), torch.arange(g * g + 1)  # CLS last, as the tower has it
    for b, block in enumerate(tower.model.layers):
        hidden = block(hidden, freqs_ci=freqs[places])[0]
        alive = survivors(alive, b, 3)
        left = torch.isin(places, window_of[alive].flatten()) | (places == g * g)
        hidden, places = hidden[:, left], places[left]
    full = hidden.new_zeros(1, g * g, hidden.shape[-1])
    full[:, places[:-1]] = tower.layernorm_post(hidden)[:, :-1]
    shuffled = pixel_shuffle(full, tower.config.pixel_shuffle_ratio)[:, alive]
    return alive, model.multi_modal_projector(tower.vision_adapter.mlp(shuffled))[0]


def test_windows_dropped_inside_the_vit_equal_the_stock_blocks_run_without_them(llama4, pictures):
    """After each of the ViT's 2 blocks a test method drops whole 2x2 windows: the tokens that leave the tower equal
    the stock blocks run on CLS and the patches left, pixel-shuffled and projected as the stock model does, and the
    logits equal the stock decoder with the dropped windows' image tokens masked from layer 0 on."""
    model, processor = llama4
    inputs = inputs_for(processor, pictures, which=(0,))
    with torch.no_grad():
        visual = adapt(model).encode_images({"pixel_values": inputs["pixel_values"]}, DropWindows(3))
        alive, want = stock_tower_without(model, inputs["pixel_values"][0])
        assert 0 < len(alive) < 16 and visual.grid_index[0].tolist() == alive.tolist()
        torch.testing.assert_close(visual.features[0], want, atol=1e-5, rtol=1e-5)
        is_img = inputs["input_ids"] == model.config.image_token_index
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        cols = is_img[0].nonzero()[:, 0]
        embeds[0, cols[alive]] = visual.features[0]
        drop = [[int(c) for g, c in enumerate(cols) if g not in alive.tolist()]]
        reference = stock_decoder_logits(model, inputs, embeds, drop, 0)
    got = pruned_logits(model, inputs, DropWindows(3))
    torch.testing.assert_close(got[~is_img], reference[~is_img], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_obeys_the_batch_and_cache_oracles(llama4, pictures, make):
    """Generation runs across chunk boundaries (the cache's chunked layers keep only their last keys)."""
    model, processor = llama4
    check_batch_and_cache(model, make(), lambda which: inputs_for(processor, pictures, which),
                          lambda batch, ids: {"pixel_values": batch["pixel_values"]},
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id], steps=6)


def test_beam_search_keeps_each_prompts_tiles_with_its_rows(pictures):
    model, processor = mv.testing.tiny_llama4(seed=0)  # whose beams differ by prompt and step (seed 2's repeat a word)
    inputs = inputs_for(processor, pictures, which=(1, 2))
    check_beams_against_the_stock_model(model, inputs, mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0))


def test_meteor_stage1_keeps_its_share_of_every_tile(llama4, pictures):
    model, processor = llama4
    method = mv.Meteor.preset("stage1", encoder_keep=0.5)
    pruned_logits(model, inputs_for(processor, pictures), method)
    assert [s["stage1_tokens"] for s in method.stats] == [8, 8 * 6, 8 * 5]


def test_bad_inputs_are_refused(llama4, pictures):
    model, processor = llama4
    inputs = inputs_for(processor, pictures, which=(0,))
    small = {**inputs, "pixel_values": inputs["pixel_values"][..., :16, :16]}
    with pytest.raises(ValueError, match=r"pixel_values must be \(tiles, 3, 32, 32\)"):
        pruned_logits(model, small, mv.FastV())
    two = {**inputs, "pixel_values": inputs["pixel_values"].repeat(2, 1, 1, 1)}
    with pytest.raises(ValueError, match="are not 16 tokens for each of the 2 tiles"):
        pruned_logits(model, two, mv.FastV())
    assert "forward" not in vars(model)
