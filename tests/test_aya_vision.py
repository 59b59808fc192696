"""Stock transformers Aya Vision (`AyaVisionForConditionalGeneration`) and Command A Vision
(`Cohere2VisionForConditionalGeneration`, the same layout: its tower read to its final norm, no norm in its projector,
a line break after each tile) under every method: the oracles the project's own model obeys (no-op == stock model,
drop == mask, batch == one by one, cached == uncached) on their Cohere 2 decoder (parallel blocks, rotation on the
sliding layers only), and windows dropped inside their SigLIP ViT == the stock blocks run without them, folded by the
model's own pixel shuffle and projector."""

import pytest
import torch
from transformers import AyaVisionForConditionalGeneration

import meteor_vlm as mv
from meteor_vlm.models.adapters import adapt
from meteor_vlm.models.aya_vision import HEAD_SCALES_LOGITS

from .test_internvl import (IMAGES, NOOPS, PROMPTS, PRUNING, assert_ask_and_speed_run_the_folder,
                            assert_drop_at_layer_is_masking, assert_windows_dropped_match)
from .test_llava import assert_noop_is_the_stock_model, pruned_logits, stock_logits
from .test_oracles import check_batch_and_cache, check_beams_against_the_stock_model, survivors

KINDS = {"aya-vision": mv.testing.tiny_aya_vision, "command-a-vision": mv.testing.tiny_cohere2_vision}


@pytest.fixture(scope="module", params=list(KINDS))
def aya(request):
    return KINDS[request.param](seed=2)


def is_aya(model) -> bool:
    return type(model) is AyaVisionForConditionalGeneration


def stock_head(model):
    """The stock model's output head: `lm_head`, times the text config's `logit_scale` (0.0625 in the tiny config, so
    a missing or extra factor fails the oracles) where the installed transformers applies it (5.25 on)."""
    scale = model.config.text_config.logit_scale
    assert scale != 1
    if not is_aya(model):  # Command A Vision's head never scales
        return model.lm_head
    return lambda hidden: model.lm_head(hidden) * (scale if HEAD_SCALES_LOGITS else 1.0)


def inputs_for(processor, tile_pictures, which=(0, 1, 2)):
    """InternVL's test prompts (`PROMPTS`, with `IMAGES` images each) as Aya Vision's processor writes them."""
    starts = [sum(IMAGES[:i]) for i in range(len(IMAGES))]
    imgs = [tile_pictures[s + j] for i in which for s in [starts[i]] for j in range(IMAGES[i])]
    text = [PROMPTS[i].replace("<image>", processor.image_token) for i in which]  # Command A Vision: <|IMG_PATCH|>
    return dict(processor(images=imgs, text=text, return_tensors="pt", padding=True))


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_equals_the_stock_model_and_the_block_restores_it(aya, tile_pictures, make):
    model, processor = aya
    inputs = inputs_for(processor, tile_pictures)
    method = make()
    image_tokens = assert_noop_is_the_stock_model(model, inputs, method, stock_logits, pruned_logits)
    assert [s["images"] for s in method.stats] == IMAGES
    assert image_tokens == [4, 4 * (3 + 3), 4 * 5]  # 4 visual tokens per tile: 1, 3 + 3, 5 tiles


def test_the_decoder_rotates_on_its_sliding_layers_only(aya):
    """The runtime hands the full-attention layers the identity rotation, and the stock decoder is indeed blind to
    positions there: its full layer gives the same output whatever the tokens' distances, its sliding layer does
    not."""
    model, _ = aya
    parts = adapt(model).decoder
    assert parts.layer_types[:3] == ("sliding_attention", "sliding_attention", "full_attention")
    assert parts.nope_layers == (2, 5)
    h = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(5)[None]
    pe = parts.position_embeddings(h, pos)
    assert torch.equal(pe[2][0], torch.ones_like(pe[2][0])) and torch.equal(pe[2][1], torch.zeros_like(pe[2][1]))
    assert not torch.equal(pe[0][1], torch.zeros_like(pe[0][1]))
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        for i, moved in ((2, False), (0, True)):
            near, far = (parts.layers[i](h, position_embeddings=parts.rotary_emb(h, position_ids=p), attention_mask=mask)
                         for p in (pos, pos * pos))  # other distances
            assert moved != torch.allclose(near, far, atol=1e-6)


def stock_tower_without(model, pixels):
    """(kept windows, (tiles, K, D) projected tokens): the stock SigLIP's blocks on the patches left, the windows
    `survivors` drops at each block removed (Command A Vision: then its final norm), then the stock projector (its
    pixel shuffle, dropped windows zero-filled, then its norm, if any, and MLP)."""
    tower = model.model.vision_tower
    hidden = tower.embeddings(pixels)  # (tiles, g*g, D)
    g = round(hidden.shape[1] ** 0.5)
    window_of = torch.arange(g * g).view(g // 2, 2, g // 2, 2).permute(0, 2, 1, 3).reshape(-1, 4)  # its 4 patches
    alive, patches = torch.arange(g * g // 4), torch.arange(g * g)
    for b, block in enumerate(tower.encoder.layers):
        hidden = block(hidden, attention_mask=None)
        alive = survivors(alive, b, 3)
        left = torch.isin(patches, window_of[alive].flatten())
        hidden, patches = hidden[:, left], patches[left]
    full = hidden.new_zeros(hidden.shape[0], g * g, hidden.shape[-1])
    full[:, patches] = hidden if is_aya(model) else tower.post_layernorm(hidden)
    projected = model.model.multi_modal_projector(full)  # (tiles, g/2, g/2, D)
    return alive, projected.reshape(projected.shape[0], -1, projected.shape[-1])[:, alive]


def test_windows_dropped_inside_the_vit_equal_the_stock_blocks_run_without_them(aya, tile_pictures):
    """After each of the ViT's 3 blocks a test method drops whole 2x2 windows: the tokens that leave the tower equal
    the stock blocks run on the patches left, through the model's own projector, and the logits equal the stock
    language model with the dropped windows' image tokens masked from layer 0 on."""
    model, processor = aya
    inputs = inputs_for(processor, tile_pictures, which=(0, 1))
    assert_windows_dropped_match(model, inputs, {"pixel_values": inputs["pixel_values"]}, stock_tower_without,
                                 model.model.language_model, head=stock_head(model))


@pytest.mark.parametrize("layer", [0, 2, 4])
def test_dropping_at_llm_layer_equals_masking_keys(aya, tile_pictures, layer):
    """Dropping image tokens before a sliding layer (0, 4) or a full one (2) equals masking their keys from there."""
    model, processor = aya
    inputs = inputs_for(processor, tile_pictures, which=(0, 1))
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output.flatten(0, 1)
    assert_drop_at_layer_is_masking(model, inputs, feats, model.model.language_model, layer, head=stock_head(model))


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_obeys_the_batch_and_cache_oracles(aya, tile_pictures, make):
    model, processor = aya
    check_batch_and_cache(model, make(), lambda which: inputs_for(processor, tile_pictures, which),
                          lambda batch, ids: {"pixel_values": batch["pixel_values"]},
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


def test_beam_search_keeps_each_prompts_tiles_with_its_rows(aya, tile_pictures):
    """Beams repeat each prompt's row and its images' tiles follow it (the second prompt's two images have 3 tiles
    each): pruning nothing, beam search equals the stock model's; under METEOR cached equals uncached."""
    model, processor = aya
    inputs = inputs_for(processor, tile_pictures, which=(0, 1))
    check_beams_against_the_stock_model(model, inputs, mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0))


def test_meteor_stage1_keeps_its_share_of_every_tile(aya, tile_pictures):
    model, processor = aya
    method = mv.Meteor.preset("stage1", encoder_keep=0.5)
    pruned_logits(model, inputs_for(processor, tile_pictures), method)
    assert [s["stage1_tokens"] for s in method.stats] == [2, 2 * 6, 2 * 5]
    assert [len(s["kept_grid"]) for s in method.stats] == [1, 6, 5]


def test_bad_inputs_and_settings_are_refused(aya, tile_pictures):
    model, processor = aya
    inputs = inputs_for(processor, tile_pictures, which=(0,))
    short = {**inputs, "pixel_values": torch.cat([inputs["pixel_values"]] * 2)}
    with pytest.raises(ValueError, match=r"image-token runs \[4\] are not one run of 4 tokens per tile of the 2 tiles"):
        pruned_logits(model, short, mv.FastV())
    two = inputs_for(processor, tile_pictures, which=(0, 2))
    end = processor.tokenizer.convert_tokens_to_ids("<|END_OF_IMG|>")
    two["input_ids"][1][two["input_ids"][1] == end] = processor.tokenizer.convert_tokens_to_ids("what")
    with pytest.raises(ValueError, match=r"last image-token runs are followed by different tokens|every image's "
                                         r"last by <\|END_OF_IMG\|>"):
        pruned_logits(model, two, mv.FastV())
    if not is_aya(model):  # no feature-layer settings
        return
    model.config.vision_feature_select_strategy = "default"
    try:
        with pytest.raises(ValueError, match="vision_feature_select_strategy='default' is not supported"):
            pruned_logits(model, inputs, mv.FastV())
    finally:
        model.config.vision_feature_select_strategy = "full"
    model.config.vision_feature_layer = [-1, -2]
    try:
        with pytest.raises(ValueError, match="several layers"):
            pruned_logits(model, inputs, mv.FastV())
    finally:
        model.config.vision_feature_layer = -1
    assert "forward" not in vars(model)


TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} a{% endif %}")


def test_meteor_ask_and_speed_run_an_aya_vision_checkpoint_folder(tmp_path, capsys, tile_pictures):
    """A transformers Aya Vision checkpoint folder (saved model, its processor with a chat template) runs under
    `meteor ask` (the answer greedy generate gives on the chat template's prompt under the same method; ToMe merges
    windows in every tile) and `meteor speed`; the processor read back from the folder gives the same inputs."""
    from meteor_vlm.models.aya_vision import load_processor

    assert_a_templated_folder_runs(*mv.testing.tiny_aya_vision(seed=3), load_processor, tile_pictures, tmp_path, capsys)


def assert_a_templated_folder_runs(model, processor, load_processor, tile_pictures, tmp_path, capsys, tokens=12):
    """`model` and `processor` saved with `TEMPLATE` (its image token the processor's) as chat template, read back by
    `load_processor`: the template's prompt for one picture gives the processor's inputs for "<image>\nQUESTION a", and the folder runs under `meteor
    ask` and `meteor speed` (`assert_ask_and_speed_run_the_folder`, the image's `tokens` unpruned)."""
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.chat_template = TEMPLATE.replace("<image>", processor.image_token)  # Janus: <image_placeholder>
    processor.save_pretrained(ckpt)
    loaded = load_processor(ckpt)
    tile_pictures[1].save(tmp_path / "img.png")
    prompt = loaded.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                      {"type": "text", "text": "what is in the image ?"}]}],
                                        add_generation_prompt=True)
    inputs = dict(loaded(images=[tile_pictures[1]], text=[prompt], return_tensors="pt"))
    mine = processor(images=[tile_pictures[1]], text=[f"{processor.image_token}\nwhat is in the image ? a"],
                     return_tensors="pt")
    assert inputs.keys() == mine.keys() and all(torch.equal(inputs[k], mine[k]) for k in inputs)
    assert_ask_and_speed_run_the_folder(model, processor, inputs, ckpt, tmp_path, capsys, tokens=tokens)
