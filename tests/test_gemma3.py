"""Stock transformers Gemma 3 (`Gemma3ForConditionalGeneration`) under every method: the oracles the project's own
model obeys (no-op == stock model, drop == mask, batch == one by one, cached == uncached, beams), on a decoder whose
layers mix sliding-window and global attention (a window of 8 tokens, which the prompts cross) and whose image
tokens see each other both ways; and windows dropped inside its ViT == the stock blocks run without them, pooled by
the model's own projector."""

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

import meteor_vlm as mv
from meteor_vlm.models.adapters import adapt

from .test_internvl import assert_ask_and_speed_run_the_folder
from .test_llava import assert_noop_is_the_stock_model, pruned_logits, stock_logits
from .test_oracles import (PEERS, DropAt, DropWindows, check_batch_and_cache, check_beams_against_the_stock_model,
                           survivors)

PROMPTS = ["<start_of_image> what is in the image ?",
           "<start_of_image> <start_of_image> how many red circle are there in the image on the left ?",
           "describe <start_of_image> what is it ?"]
IMAGES = [1, 2, 1]  # images per prompt
NOOPS = {"none": mv.NoPruning, **{k: noop for k, (noop, _) in PEERS.items()},
         "meteor": lambda: mv.Meteor.preset("stage1+3", encoder_keep=1.0, lam=1e9)}
PRUNING = {**{k: pruning for k, (_, pruning) in PEERS.items()},
           "meteor": lambda: mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0)}


@pytest.fixture(scope="module")
def gemma3():
    return mv.testing.tiny_gemma3(seed=2)


@pytest.fixture(scope="module")
def pictures():
    return mv.testing.random_images(4, size=48, seed=5)


def inputs_for(processor, pictures, which=(0, 1, 2)):
    starts = [sum(IMAGES[:i]) for i in range(len(IMAGES))]
    imgs = [[pictures[starts[i] + j] for j in range(IMAGES[i])] for i in which]
    return dict(processor(images=imgs, text=[PROMPTS[i] for i in which], return_tensors="pt", padding=True))


def stock_decoder_logits(model, inputs, embeds, drop=(), layer=0):
    """(B, T, V) the stock Gemma 3 decoder's layers on `embeds`, each with the mask transformers builds for its kind
    (sliding or global; causal, or both ways among an image's tokens where `inputs` has token_type_ids), the columns
    listed per sample in `drop` masked as keys from `layer` on (a dropped row still sees itself)."""
    lm, cfg = model.model.language_model, model.config.get_text_config()
    mask = inputs["attention_mask"]
    B, T = mask.shape
    pos = (mask.long().cumsum(1) - 1).clamp_min(0)
    kw = dict(config=cfg, inputs_embeds=embeds, attention_mask=mask, cache=None, position_ids=pos)
    if "token_type_ids" in inputs:
        masks = create_masks_for_vision_model(block_sequence_ids=get_block_sequence_ids_for_mask(inputs["token_type_ids"]),
                                              **kw)
    else:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        masks = {"full_attention": create_causal_mask(**kw), "sliding_attention": create_sliding_window_causal_mask(**kw)}
    dropped = torch.zeros(B, T, dtype=torch.bool)
    for b, cols in enumerate(drop):
        dropped[b, list(cols)] = True
    eye = torch.eye(T, dtype=torch.bool)
    with torch.no_grad():
        h = embeds
        for i, block in enumerate(lm.layers):
            kind = cfg.layer_types[i]
            m = masks[kind]
            if i >= layer:
                m = (m & ~dropped[:, None, None, :]) | eye
            h = block(h, attention_mask=m, position_ids=pos, position_embeddings=lm.rotary_emb(h, pos, kind))
        return model.lm_head(lm.norm(h))


def stock_embeds(model, inputs):
    with torch.no_grad():
        ids = inputs["input_ids"]
        embeds = model.get_input_embeddings()(ids)
        feats = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output.flatten(0, 1)
        return embeds.masked_scatter((ids == model.config.image_token_id)[..., None].expand_as(embeds), feats)


def test_the_tiny_model_exercises_windows_blocks_and_both_rope_bases(gemma3, pictures):
    """The prompts are longer than the sliding window, the image blocks change the stock logits, and the reference
    decoder of these tests is the stock model (the oracles below would hold trivially otherwise)."""
    model, processor = gemma3
    inputs = inputs_for(processor, pictures)
    cfg = model.config.get_text_config()
    assert inputs["input_ids"].shape[1] > 2 * cfg.sliding_window
    assert {"sliding_attention", "full_attention"} <= set(cfg.layer_types)
    causal = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    real = inputs["attention_mask"].bool()
    assert not torch.allclose(stock_logits(model, inputs)[real], stock_logits(model, causal)[real], atol=1e-2)
    for given in (inputs, causal):
        torch.testing.assert_close(stock_decoder_logits(model, given, stock_embeds(model, given))[real],
                                   stock_logits(model, given)[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_equals_the_stock_model_and_the_block_restores_it(gemma3, pictures, make):
    model, processor = gemma3
    inputs = inputs_for(processor, pictures)
    method = make()
    image_tokens = assert_noop_is_the_stock_model(model, inputs, method, stock_logits, pruned_logits)
    assert [s["images"] for s in method.stats] == IMAGES and image_tokens == [4 * n for n in IMAGES]


def test_without_token_type_ids_the_stock_model_is_causal_and_so_is_the_pruned_one(gemma3, pictures):
    model, processor = gemma3
    inputs = {k: v for k, v in inputs_for(processor, pictures).items() if k != "token_type_ids"}
    assert_noop_is_the_stock_model(model, inputs, mv.NoPruning(), stock_logits, pruned_logits)


def stock_tower_without(model, pixels):
    """(kept windows, (images, K, D) projected tokens): the stock ViT's blocks on the patches left, the windows
    `survivors` drops at each block removed, then the stock final norm and projector (its pooling over the kept
    windows)."""
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    k, g = projector.kernel_size, projector.patches_per_image
    hidden = tower.embeddings(pixels)
    window_of = torch.arange(g * g).view(g // k, k, g // k, k).permute(0, 2, 1, 3).reshape(-1, k * k)
    alive, patches = torch.arange((g // k) ** 2), torch.arange(g * g)
    for b, block in enumerate(tower.encoder.layers):
        hidden = block(hidden, attention_mask=None)
        alive = survivors(alive, b, 3)
        left = torch.isin(patches, window_of[alive].flatten())
        hidden, patches = hidden[:, left], patches[left]
    full = hidden.new_zeros(hidden.shape[0], g * g, hidden.shape[-1])
    full[:, patches] = tower.post_layernorm(hidden)
    return alive, projector(full)[:, alive]


def test_windows_dropped_inside_the_vit_equal_the_stock_blocks_run_without_them(gemma3, pictures):
    """After each of the ViT's 3 blocks a test method drops whole 4x4 windows: the tokens that leave the tower equal
    the stock blocks run on the patches left, pooled and projected by the model's own projector, and the logits equal
    the stock decoder with the dropped windows' image tokens masked from layer 0 on."""
    model, processor = gemma3
    inputs = inputs_for(processor, pictures, which=(0, 1))
    target = adapt(model)
    with torch.no_grad():
        tokens = target.encode_images({"pixel_values": inputs["pixel_values"]}, DropWindows(3))
        alive, want = stock_tower_without(model, inputs["pixel_values"])
        assert 0 < len(alive) < 4
        assert (tokens.grid_index == alive).all()
        torch.testing.assert_close(tokens.features, want, atol=1e-5, rtol=1e-5)
        is_img = inputs["input_ids"] == model.config.image_token_id
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        drop = [[] for _ in inputs["input_ids"]]
        for k, (r, c) in enumerate(zip(*is_img.nonzero(as_tuple=True))):  # token k: image k // 4, its window
            if k % 4 in alive.tolist():
                embeds[r, c] = want[k // 4, alive.tolist().index(k % 4)]
            else:
                drop[r].append(int(c))
        reference = stock_decoder_logits(model, inputs, embeds, drop, 0)
    got = pruned_logits(model, inputs, DropWindows(3))
    text = inputs["attention_mask"].bool() & ~is_img
    torch.testing.assert_close(got[text], reference[text], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [1, 3])  # a global layer and a sliding one
def test_dropping_at_llm_layer_equals_masking_keys(gemma3, pictures, layer):
    model, processor = gemma3
    assert_drop_is_masking(model, inputs_for(processor, pictures, which=(0, 1)), stock_decoder_logits, layer)


def assert_drop_is_masking(model, inputs, decoder_logits, layer):
    """Dropping some image tokens of the two prompts of `inputs` before LLM layer `layer` gives, on the text,
    `decoder_logits(model, inputs, the stock embeddings, drop, layer)`: the stock decoder under the model's own masks
    with those keys masked from `layer` on."""
    vis = inputs["input_ids"] == model.config.image_token_id
    drop = [vis[0].nonzero()[::3, 0].tolist(), vis[1].nonzero()[1::2, 0].tolist()]
    got = pruned_logits(model, inputs, DropAt(layer, drop))
    want = decoder_logits(model, inputs, stock_embeds(model, inputs), drop, layer)
    text = inputs["attention_mask"].bool() & ~vis
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)


def types_grown_with(fill: int):
    """`images_for` of check_batch_and_cache: the batch's images, and its token_type_ids grown to `ids` with `fill`,
    the type of the generated tokens (Gemma 3: 0, text; PaliGemma: 1, the causal suffix, as generate marks it)."""
    def images_for(batch, ids):
        grown = torch.full_like(ids[:, batch["input_ids"].shape[1]:], fill)
        return {"pixel_values": batch["pixel_values"], "token_type_ids": torch.cat([batch["token_type_ids"], grown], 1)}
    return images_for


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_obeys_the_batch_and_cache_oracles(gemma3, pictures, make):
    """Generation runs past the sliding window, whose cache layers keep only their last keys."""
    model, processor = gemma3
    check_batch_and_cache(model, make(), lambda which: inputs_for(processor, pictures, which), types_grown_with(0),
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id], steps=6)


def test_beam_search_keeps_each_prompts_images_with_its_rows(pictures):
    model, processor = mv.testing.tiny_gemma3(seed=2)
    inputs = inputs_for(processor, pictures, which=(0, 1))
    check_beams_against_the_stock_model(model, inputs, mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0))


def test_meteor_stage1_keeps_its_share_of_every_image(gemma3, pictures):
    model, processor = gemma3
    method = mv.Meteor.preset("stage1", encoder_keep=0.5)
    pruned_logits(model, inputs_for(processor, pictures), method)
    assert [s["stage1_tokens"] for s in method.stats] == [2 * n for n in IMAGES]
    assert [s["encoder_tokens"] for s in method.stats] == [4 * n for n in IMAGES]


def test_bad_inputs_are_refused(gemma3, pictures):
    model, processor = gemma3
    inputs = inputs_for(processor, pictures, which=(0,))
    small = {**inputs, "pixel_values": inputs["pixel_values"][..., :16, :16]}
    with pytest.raises(ValueError, match=r"pixel_values must be \(images, 3, 32, 32\)"):
        pruned_logits(model, small, mv.FastV())
    short = {**inputs, "token_type_ids": inputs["token_type_ids"][:, 1:]}
    with pytest.raises(ValueError, match="token_type_ids .* must have the shape of input_ids"):
        pruned_logits(model, short, mv.FastV())
    two = {**inputs, "pixel_values": inputs["pixel_values"].repeat(2, 1, 1, 1)}
    with pytest.raises(ValueError, match="image tokens but the 2 image"):
        pruned_logits(model, two, mv.FastV())
    assert "forward" not in vars(model)


TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} a{% endif %}")


def test_meteor_ask_and_speed_run_a_gemma3_checkpoint_folder(tmp_path, capsys, pictures):
    """A transformers Gemma 3 checkpoint folder (saved model, tokenizer, image processor, chat template) runs under
    `meteor ask` (the answer greedy generate gives on the chat template's prompt under the same method; ToMe keeps 2
    of the image's 4 tokens; a heatmap) and `meteor speed`, with its own AutoProcessor read back from the folder."""
    from transformers import AutoProcessor, Gemma3Processor

    model, processor = mv.testing.tiny_gemma3(seed=3)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    Gemma3Processor(processor.image_processor, processor.tokenizer, image_seq_length=4,
                    chat_template=TEMPLATE).save_pretrained(ckpt)
    pictures[1].save(tmp_path / "img.png")
    loaded = AutoProcessor.from_pretrained(ckpt)
    prompt = loaded.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                      {"type": "text", "text": "what is in the image ?"}]}],
                                        add_generation_prompt=True)
    inputs = dict(loaded(images=[pictures[1]], text=[prompt], return_tensors="pt"))
    mine = processor(images=[pictures[1]], text=["<start_of_image>what is in the image ? a"], return_tensors="pt")
    assert inputs.keys() == mine.keys() and all(torch.equal(inputs[k], mine[k]) for k in inputs)
    assert_ask_and_speed_run_the_folder(model, processor, inputs, ckpt, tmp_path, capsys, tokens=4)



def test_pan_and_scan_crops_are_images_of_their_own(gemma3, pictures):
    """With pan-and-scan, a wide image comes as itself and its crops, each 256 (here 4) image tokens of its own in the
    prompt: pruning nothing equals the stock model, `stats` count each crop as an image, and stage 1 keeps its share of
    each."""
    model, processor = gemma3
    wide = pictures[0].resize((192, 64))
    inputs = dict(processor(images=[[wide], [pictures[1]]], text=[PROMPTS[0], "a <start_of_image> how many ?"],
                            return_tensors="pt", padding=True, do_pan_and_scan=True, pan_and_scan_min_crop_size=16))
    assert inputs["pixel_values"].shape[0] == 1 + 3 + 1  # the wide image, its 3 crops, the other image
    image_tokens = assert_noop_is_the_stock_model(model, inputs, mv.NoPruning(), stock_logits, pruned_logits)
    assert image_tokens == [16, 4]
    method = mv.Meteor.preset("stage1", encoder_keep=0.5)
    pruned_logits(model, inputs, method)
    assert [(s["images"], s["stage1_tokens"]) for s in method.stats] == [(4, 8), (1, 2)]
