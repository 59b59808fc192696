"""Stock transformers Ovis2 (`Ovis2ForConditionalGeneration`: tiles of an AIMv2 ViT, 2x2 windows through a visual
head and table, indicator tokens embedded from that table) under every method: no-op == stock model, drop == mask,
batch == one by one, cached == uncached, beams; windows dropped inside the ViT == the stock blocks run without them."""

import pytest
import torch

import meteor_vlm as mv
from meteor_vlm.models.adapters import adapt

from .test_gemma3 import NOOPS, PRUNING
from .test_llava import assert_noop_is_the_stock_model, pruned_logits, stock_logits
from .test_oracles import (DropWindows, assert_drop_at_layer_equals_masking, check_batch_and_cache,
                           check_beams_against_the_stock_model, masked_decoder_logits, survivors)

PROMPTS = ["<image> what is in the image ?", "how many <image> and <image> ?", "<image> describe"]
SIZES = [(48, 32), (30, 60), (40, 40), (64, 20)]
IMAGES = [1, 2, 1]


@pytest.fixture(scope="module", params=["softmax", "st_argmax"])
def ovis2(request):
    return mv.testing.tiny_ovis2(seed=2, tokenize=request.param)


@pytest.fixture(scope="module")
def pictures():
    return [im.resize(size) for im, size in zip(mv.testing.random_images(4, seed=8), SIZES)]


def inputs_for(processor, pictures, which=(0, 1, 2)):
    starts = [sum(IMAGES[:i]) for i in range(len(IMAGES))]
    imgs = [pictures[starts[i] + j] for i in which for j in range(IMAGES[i])]
    return dict(processor(images=imgs, text=[PROMPTS[i] for i in which], return_tensors="pt", padding=True))


def stock_embeds(model, inputs):
    """The stock model's input embeddings: its visual tokens at the image tokens, its indicator features at the
    indicator tokens."""
    with torch.no_grad():
        ids = inputs["input_ids"]
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"])
        embeds = model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == model.config.image_token_id)[..., None].expand_as(embeds),
                                       out.pooler_output.flatten(0, 1))
        for i, token in enumerate(model.config.visual_indicator_token_ids):
            embeds[ids == token] = out.visual_indicator_features[i]
        return embeds


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_equals_the_stock_model_and_the_block_restores_it(ovis2, pictures, make):
    model, processor = ovis2
    method = make()
    assert_noop_is_the_stock_model(model, inputs_for(processor, pictures), method, stock_logits,
                                   lambda m, i, meth: pruned_logits(m, i, meth))
    assert [s["images"] for s in method.stats] == [1, 2, 1]  # each a whole image and its crops


@pytest.mark.parametrize("layer", [0, 3])
def test_dropping_at_llm_layer_equals_masking_keys(ovis2, pictures, layer):
    model, processor = ovis2
    inputs = inputs_for(processor, pictures, which=(0, 1))
    assert_drop_at_layer_equals_masking(model, inputs, stock_embeds(model, inputs), layer)


def stock_tower_without(model, pixels):
    """(kept windows, (tiles, K, D) tokens): the stock ViT's blocks on the patches left, the windows `survivors`
    drops at each block removed, then the stock final norm, the 2x2 fold (dropped windows' patches zero-filled) and
    the stock head and table (`Ovis2Model.get_image_features` on those hidden states)."""
    tower = model.model.vision_tower
    hidden = tower.transformer.embeddings(pixels)  # (tiles, g*g, D)
    g = round(hidden.shape[1] ** 0.5)
    window_of = torch.arange(g * g).view(g // 2, 2, g // 2, 2).permute(0, 2, 1, 3).reshape(-1, 4)
    alive, patches = torch.arange(g * g // 4), torch.arange(g * g)
    for b, block in enumerate(tower.transformer.encoder.layers):
        hidden = block(hidden, None)
        alive = survivors(alive, b, 3)
        left = torch.isin(patches, window_of[alive].flatten())
        hidden, patches = hidden[:, left], patches[left]
    full = hidden.new_zeros(hidden.shape[0], g * g, hidden.shape[-1])
    full[:, patches] = tower.transformer.rms_norm(hidden)
    folded = full[:, window_of].flatten(2)  # each window's patches row by row, as the stock fold
    logits = tower.head_norm(tower.head_linear(folded))
    probs = logits.softmax(-1) if tower.config.tokenize_function == "softmax" else \
        torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.cat([probs, probs.new_zeros(*probs.shape[:-1], tower.num_visual_indicator_tokens)], -1)
    return alive, model.model.visual_embeddings_table(probs)[:, alive]


def test_the_fold_and_head_are_the_stock_models(ovis2, pictures):
    """With nothing dropped the reference above gives `get_image_features`' tokens: its window order, head and table
    are the stock model's."""
    model, processor = ovis2
    inputs = inputs_for(processor, pictures, which=(0,))
    with torch.no_grad():
        tower = model.model.vision_tower
        hidden = tower.transformer.embeddings(inputs["pixel_values"])
        for block in tower.transformer.encoder.layers:
            hidden = block(hidden, None)
        g = round(hidden.shape[1] ** 0.5)
        window_of = torch.arange(g * g).view(g // 2, 2, g // 2, 2).permute(0, 2, 1, 3).reshape(-1, 4)
        folded = tower.transformer.rms_norm(hidden)[:, window_of].flatten(2)
        mine = adapt(model).project(folded)
        stock = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    torch.testing.assert_close(mine, stock, atol=1e-5, rtol=1e-5)


def test_windows_dropped_inside_the_vit_equal_the_stock_blocks_run_without_them(ovis2, pictures):
    """After each of the ViT's 2 blocks a test method drops whole windows of every tile: the tokens that leave the
    tower equal the stock blocks run on the patches left, normed, folded and through the stock head and table; the
    logits equal the stock decoder with the dropped windows' image tokens masked from layer 0 on."""
    model, processor = ovis2
    inputs = inputs_for(processor, pictures, which=(0,))
    with torch.no_grad():
        tokens = adapt(model).encode_images({"pixel_values": inputs["pixel_values"]}, DropWindows(3))
        alive, want = stock_tower_without(model, inputs["pixel_values"])
        assert 0 < len(alive) < 4 and (tokens.grid_index == alive).all()
        torch.testing.assert_close(tokens.features, want, atol=1e-5, rtol=1e-5)
        embeds = stock_embeds(model, inputs)
        is_img = inputs["input_ids"] == model.config.image_token_id
        cols = is_img[0].nonzero()[:, 0]
        drop = [[int(c) for k, c in enumerate(cols) if k % 4 not in alive.tolist()]]
        for k, c in enumerate(cols):
            if k % 4 in alive.tolist():
                embeds[0, c] = want[k // 4, alive.tolist().index(k % 4)]
        reference = masked_decoder_logits(model.model.language_model, model.lm_head, embeds,
                                          inputs["attention_mask"].bool(), drop, 0)
    got = pruned_logits(model, inputs, DropWindows(3))
    text = ~is_img
    torch.testing.assert_close(got[text], reference[text], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_obeys_the_batch_and_cache_oracles(ovis2, pictures, make):
    model, processor = ovis2
    check_batch_and_cache(model, make(), lambda which: inputs_for(processor, pictures, which),
                          lambda batch, ids: {"pixel_values": batch["pixel_values"]},
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


def test_beam_search_keeps_each_prompts_tiles_with_its_rows(ovis2, pictures):
    model, processor = ovis2
    check_beams_against_the_stock_model(model, inputs_for(processor, pictures, which=(0, 1)),
                                        mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0))


def test_a_gumbel_tokenizer_is_refused():
    model, _ = mv.testing.tiny_ovis2(seed=2)
    model.config.vision_config.tokenize_function = "gumbel_argmax"
    with pytest.raises(ValueError, match="tokenize_function='gumbel_argmax' is not supported"):
        pruned_logits(model, {"input_ids": torch.tensor([[1, 2]])}, mv.FastV())


TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} a{% endif %}")


def test_meteor_ask_and_speed_run_an_ovis2_checkpoint_folder(tmp_path, capsys, pictures):
    """A transformers Ovis2 checkpoint folder (model, tokenizer, PIL image processor, chat template) loads its own
    processor and runs under `meteor ask` (the answer greedy generate gives under the same method) and `meteor
    speed`."""
    from transformers import Ovis2Processor

    from meteor_vlm.cli import main

    model, processor = mv.testing.tiny_ovis2(seed=3)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    Ovis2Processor(processor.image_processor, processor.tokenizer, chat_template=TEMPLATE,
                   image_seq_length=4).save_pretrained(ckpt)
    loaded = Ovis2Processor.from_pretrained(ckpt)
    pictures[2].save(tmp_path / "img.png")
    prompt = loaded.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                      {"type": "text", "text": "what is in the image ?"}]}],
                                        add_generation_prompt=True)
    inputs = dict(loaded(images=[pictures[2]], text=[prompt], return_tensors="pt"))
    assert main(["ask", str(tmp_path / "img.png"), "what is in the image ?", "--model", str(ckpt), "--method",
                 "fastv:k1-r0.5", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    with mv.FastV(layer=1, ratio=0.5)(model), torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    answer = processor.decode(want[0, inputs["input_ids"].shape[1]:]).strip()
    assert f"answer: {answer}\n" in out
    assert main(["speed", "--model", str(ckpt), "--samples", "1", "--new-tokens", "2", "--methods",
                 "unpruned,fastv:k1-r0.5"]) == 0
    assert "fastv:k1-r0.5" in capsys.readouterr().out
