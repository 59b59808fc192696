"""Stock transformers DeepSeek-VL (`DeepseekVLForConditionalGeneration`), DeepSeek-VL hybrid
(`DeepseekVLHybridForConditionalGeneration`: a SAM branch fused by channels) and Janus (`JanusForConditionalGeneration`,
its understanding path) under every method: the oracles the
project's own model obeys (no-op == stock model, drop == mask, batch == one by one, cached == uncached), and patches
dropped inside the SigLIP ViT == the stock blocks run without them, then its final norm and the aligner (on the hybrid,
each kept patch joined with the stock SAM branch's features at its cell)."""

import functools

import pytest
import torch

import meteor_vlm as mv
from meteor_vlm.models.adapters import adapt

from .test_aya_vision import assert_a_templated_folder_runs, inputs_for  # the same prompts and images
from .test_internvl import IMAGES, NOOPS, PRUNING, assert_drop_at_layer_is_masking, assert_windows_dropped_match
from .test_llava import assert_noop_is_the_stock_model, pruned_logits, stock_logits
from .test_oracles import check_batch_and_cache, check_beams_against_the_stock_model, survivors


BUILDERS = {"deepseek_vl": mv.testing.tiny_deepseek_vl,
            "hybrid": functools.partial(mv.testing.tiny_deepseek_vl, hybrid=True), "janus": mv.testing.tiny_janus}


@pytest.fixture(scope="module", params=list(BUILDERS))
def deepseek(request):
    return BUILDERS[request.param](seed=2)


def images_of(model, batch):
    """The forward's image inputs in `batch` (the hybrid's high-resolution pixels too)."""
    return {k: batch[k] for k in adapt(model).IMAGE_INPUTS}


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_equals_the_stock_model_and_the_block_restores_it(deepseek, tile_pictures, make):
    model, processor = deepseek
    inputs = inputs_for(processor, tile_pictures)
    method = make()
    image_tokens = assert_noop_is_the_stock_model(model, inputs, method, stock_logits, pruned_logits)
    assert [s["images"] for s in method.stats] == IMAGES
    assert image_tokens == [16, 2 * 16, 16]  # 16 patches of 8 px per 32 px image


def stock_tower_without(model, pixels, high_res=None):
    """(kept patches, (images, K, D) projected tokens): the stock SigLIP's blocks on the patches left, the ones
    `survivors` drops at each block removed, then its final norm and the aligner; on the hybrid, the aligner joins
    each kept patch with the stock SAM branch's features (on the high-resolution pixels) at the same cell."""
    tower = model.model.vision_model
    hidden = tower.embeddings(pixels)  # (images, 16, D)
    alive = torch.arange(hidden.shape[1])
    for b, block in enumerate(tower.encoder.layers):
        hidden = block(hidden, attention_mask=None)
        kept = survivors(alive, b, 3)
        hidden, alive = hidden[:, torch.isin(alive, kept)], kept
    if high_res is None:
        return alive, model.model.aligner(tower.post_layernorm(hidden))
    cells = model.model.get_high_res_image_features(high_res).last_hidden_state  # (images, 16, C)
    return alive, model.model.aligner(tower.post_layernorm(hidden), cells[:, alive])


def test_patches_dropped_inside_the_vit_equal_the_stock_blocks_run_without_them(deepseek, tile_pictures):
    """After each of the ViT's 3 blocks a test method drops patches: the tokens that leave the tower equal the stock
    blocks run on the patches left, through its final norm and the aligner, and the logits equal the stock language
    model with the dropped patches' image tokens masked from layer 0 on."""
    model, processor = deepseek
    inputs = inputs_for(processor, tile_pictures, which=(0, 1))
    assert_windows_dropped_match(model, inputs, images_of(model, inputs),
                                 lambda m, pixels: stock_tower_without(m, pixels, inputs.get("high_res_pixel_values")),
                                 model.model.language_model, per_tile=16)


@pytest.mark.parametrize("layer", [0, 2, 5])
def test_dropping_at_llm_layer_equals_masking_keys(deepseek, tile_pictures, layer):
    model, processor = deepseek
    inputs = inputs_for(processor, tile_pictures, which=(0, 1))
    with torch.no_grad():
        feats = model.model.get_image_features(**images_of(model, inputs)).pooler_output.flatten(0, 1)
    assert_drop_at_layer_is_masking(model, inputs, feats, model.model.language_model, layer)


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_obeys_the_batch_and_cache_oracles(deepseek, tile_pictures, make):
    model, processor = deepseek
    check_batch_and_cache(model, make(), lambda which: inputs_for(processor, tile_pictures, which),
                          lambda batch, ids: images_of(model, batch),
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


def test_beam_search_keeps_each_prompts_images_with_its_rows(deepseek, tile_pictures):
    """Beams repeat each prompt's row and its images follow it (the second prompt has two): pruning nothing, beam
    search equals the stock model's; under METEOR cached equals uncached."""
    model, processor = deepseek
    inputs = inputs_for(processor, tile_pictures, which=(0, 1))
    check_beams_against_the_stock_model(model, inputs, mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0))


def test_meteor_stage1_keeps_its_share_of_every_image(deepseek, tile_pictures):
    model, processor = deepseek
    method = mv.Meteor.preset("stage1", encoder_keep=0.5)
    pruned_logits(model, inputs_for(processor, tile_pictures), method)
    assert [s["stage1_tokens"] for s in method.stats] == [8, 2 * 8, 8]
    assert [len(s["kept_grid"]) for s in method.stats] == [1, 2, 1]
    assert adapt(model).expert_names == ["vision"]


def test_bad_inputs_are_refused(deepseek, tile_pictures):
    model, processor = deepseek
    inputs = inputs_for(processor, tile_pictures, which=(0,))
    with pytest.raises(ValueError, match=r"pixel_values must be \(images, 3, height, width\)"):
        pruned_logits(model, {**inputs, "pixel_values": inputs["pixel_values"][None]}, mv.FastV())
    twice = {k: torch.cat([v] * 2) for k, v in images_of(model, inputs).items()}
    with pytest.raises(ValueError, match="image tokens but the 2 image"):
        pruned_logits(model, {**inputs, **twice}, mv.FastV())
    if "high_res_pixel_values" in inputs:  # the hybrid's second branch
        with pytest.raises(ValueError, match="needs high_res_pixel_values"):
            pruned_logits(model, {**inputs, "high_res_pixel_values": None}, mv.FastV())
        with pytest.raises(ValueError, match=r"high_res_pixel_values must be \(images, 3, height, width\) for the 1"):
            pruned_logits(model, {**inputs, "high_res_pixel_values": twice["high_res_pixel_values"]}, mv.FastV())
    assert "forward" not in vars(model)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_meteor_ask_and_speed_run_a_deepseek_vl_checkpoint_folder(tmp_path, capsys, tile_pictures, name):
    """A transformers DeepSeek-VL (hybrid) or Janus checkpoint folder (saved model, its processor with a chat template)
    runs under `meteor ask` (the answer greedy generate gives on the chat template's prompt under the same method; ToMe
    merges half of the image's patches) and `meteor speed`; the processor read back from the folder gives the same
    inputs."""
    from meteor_vlm.models.deepseek_vl import load_processor

    assert_a_templated_folder_runs(*BUILDERS[name](seed=3), load_processor, tile_pictures, tmp_path, capsys, tokens=16)


def test_a_janus_tower_with_query_key_norms_is_refused():
    """Janus's config can ask for LayerNorms on each head's queries and keys, which the tower's runner does not apply
    when it scores patches: refused when a method attaches (the released checkpoints do not use them)."""
    model, _ = mv.testing.tiny_janus(seed=2)
    model.model.vision_model.config.use_qk_norm = True
    with pytest.raises(ValueError, match="use_qk_norm is not supported"):
        adapt(model)
