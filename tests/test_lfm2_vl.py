"""Stock transformers LFM2-VL (`Lfm2VlForConditionalGeneration`: a SigLIP2 NaFlex ViT, each image on its own patch
grid, 2x2 windows unshuffled into one visual token; an LFM2 decoder of short convolutions between attention layers)
under every method: no-op == stock model, batch == one by one, cached == uncached, beams; windows dropped inside the
ViT == the stock blocks run without them; and, as its convolution layers read their input as a sequence, a drop
before an LLM layer == the stock decoder from there on the sequence without the tokens (not masking)."""

import pytest
import torch
from transformers.models.lfm2_vl.processing_lfm2_vl import Lfm2VlProcessor

import meteor_vlm as mv
from .test_gemma3 import IMAGES, NOOPS, PRUNING
from .test_llava import assert_noop_is_the_stock_model, pruned_logits, stock_logits
from .test_mistral3 import assert_windows_dropped_per_image
from .test_oracles import (DropAt, check_batch_and_cache, check_beams_against_the_stock_model, dropped_decoder_logits,
                           first_attention_layer, survivors)

PROMPTS = ["<image> what is in the image ?", "<image> <image> how many red circle are there in the image on the left ?",
           "describe <image> what is it ?"]
SIZES = [(64, 64), (64, 32), (48, 48), (32, 64)]  # (width, height): 16, 8, 9 and 8 visual tokens


@pytest.fixture(scope="module", params=[True, False], ids=["projector-layernorm", "no-layernorm"])
def lfm2(request):
    return mv.testing.tiny_lfm2_vl(seed=2, layernorm=request.param)


@pytest.fixture(scope="module")
def pictures():
    return [p.resize(s) for p, s in zip(mv.testing.random_images(4, size=64, seed=5), SIZES)]


def inputs_for(processor, pictures, which=(0, 1, 2)):
    starts = [sum(IMAGES[:i]) for i in range(len(IMAGES))]
    imgs = [[pictures[starts[i] + j] for j in range(IMAGES[i])] for i in which]
    return processor(images=imgs, text=[PROMPTS[i] for i in which])


IMAGE_KEYS = ("pixel_values", "spatial_shapes", "pixel_attention_mask")


def stock_embeds(model, inputs):
    """The stock model's input embeddings: each image's features at its image tokens."""
    with torch.no_grad():
        ids = inputs["input_ids"]
        embeds = model.get_input_embeddings()(ids)
        feats = torch.cat(model.model.get_image_features(**{k: inputs[k] for k in IMAGE_KEYS}).pooler_output)
        return embeds.masked_scatter((ids == model.config.image_token_id)[..., None].expand_as(embeds), feats)


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_equals_the_stock_model_and_the_block_restores_it(lfm2, pictures, make):
    model, processor = lfm2
    method = make()
    assert_noop_is_the_stock_model(model, inputs_for(processor, pictures), method, stock_logits,
                                   lambda m, i, meth: pruned_logits(m, i, meth))
    assert [s["images"] for s in method.stats] == IMAGES
    assert [s["encoder_tokens"] for s in method.stats] == [16, 8 + 9, 8]


def stock_tower_without(model, pixels, shape):
    """(kept windows, (K, D) projected tokens) of one image: the stock SigLIP2 embeddings and blocks on the patches
    left, the windows `survivors` drops at each block removed, then the stock final norm, and the stock projector
    over the grid with the dropped windows' patches zero-filled (`get_image_features` on those hidden states)."""
    tower = model.model.vision_tower
    rows, cols = shape
    hidden = tower.embeddings(pixels[None, : rows * cols], torch.tensor([shape]))[0]
    window_of = torch.arange(rows * cols).view(rows // 2, 2, cols // 2, 2).permute(0, 2, 1, 3).reshape(-1, 4)
    alive, patches = torch.arange(rows * cols // 4), torch.arange(rows * cols)
    for b, block in enumerate(tower.encoder.layers):
        hidden = block(hidden[None], attention_mask=None)[0]
        alive = survivors(alive, b, 3)
        left = torch.isin(patches, window_of[alive].flatten())
        hidden, patches = hidden[left], patches[left]
    full = hidden.new_zeros(rows * cols, hidden.shape[-1])
    full[patches] = tower.post_layernorm(hidden)
    folded = full[window_of].flatten(1)  # each window's patches row by row, as the pixel unshuffle concatenates them
    return alive, project(model, folded)[alive]


def project(model, folded):
    """The stock projector's norm (where it has one) and MLP on (N, 4D) folded windows."""
    projector = model.model.multi_modal_projector
    normed = projector.layer_norm(folded) if projector.layer_norm is not None else folded
    return projector.linear_2(projector.act(projector.linear_1(normed)))


def test_the_projector_folds_each_window_as_the_stock_model_does(lfm2, pictures):
    """The window order the runner and the reference above use is the stock model's: with nothing dropped, the
    reference's tokens are `get_image_features`'."""
    model, processor = lfm2
    inputs = inputs_for(processor, pictures, which=(1,))
    with torch.no_grad():
        stock = model.model.get_image_features(**{k: inputs[k] for k in IMAGE_KEYS}).pooler_output
        for k, shape in enumerate(inputs["spatial_shapes"].tolist()):
            rows, cols = shape
            tower = model.model.vision_tower
            hidden = tower.embeddings(inputs["pixel_values"][k][None, : rows * cols], torch.tensor([shape]))
            for block in tower.encoder.layers:
                hidden = block(hidden, attention_mask=None)
            window_of = torch.arange(rows * cols).view(rows // 2, 2, cols // 2, 2).permute(0, 2, 1, 3).reshape(-1, 4)
            folded = tower.post_layernorm(hidden)[0][window_of].flatten(1)
            torch.testing.assert_close(project(model, folded), stock[k], atol=1e-5, rtol=1e-5)


def test_windows_dropped_inside_the_vit_equal_the_stock_blocks_run_without_them(lfm2, pictures):
    """After each of the ViT's 3 blocks a test method drops whole 2x2 windows of each image (a 64x64 image and a
    32x64 one, each on its own grid): the tokens that leave the tower equal the stock blocks run on the patches
    left, normed and projected; and the logits equal the stock decoder on the sequence without the dropped windows'
    image tokens (removed before layer 0)."""
    model, processor = lfm2
    inputs = inputs_for(processor, pictures, which=(0, 1))
    assert_windows_dropped_per_image(
        model, inputs, IMAGE_KEYS, [16, 8, 9],
        lambda image: stock_tower_without(model, inputs["pixel_values"][image], inputs["spatial_shapes"][image].tolist()),
        lambda embeds, drop: dropped_decoder_logits(model.model.language_model, model.lm_head, embeds,
                                                    inputs["attention_mask"].bool(), drop, 0, None))


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_dropping_at_llm_layer_equals_the_stock_decoder_without_those_tokens(lfm2, pictures, layer):
    """A drop asked for before layer 0 or 3 (convolution layers) happens before the next attention layer (2, 5),
    one asked for before layer 2 there: each equals the stock decoder run to that layer on the whole sequence, then
    on the sequence without the dropped tokens; and it changes the logits."""
    model, processor = lfm2
    inputs = inputs_for(processor, pictures, which=(0, 1))
    vis = inputs["input_ids"] == model.config.image_token_id
    drop = [vis[0].nonzero()[::3, 0].tolist(), vis[1].nonzero()[1::2, 0].tolist()]
    got = pruned_logits(model, inputs, DropAt(layer, drop))
    at = first_attention_layer(model.config.text_config, layer)
    assert at == {0: 2, 2: 2, 3: 5}[layer]
    want = dropped_decoder_logits(model.model.language_model, model.lm_head, stock_embeds(model, inputs),
                                  inputs["attention_mask"].bool(), drop, at, None)
    text = inputs["attention_mask"].bool() & ~vis
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)
    assert (got[text] - stock_logits(model, inputs)[text]).abs().max() > 1e-3


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_obeys_the_batch_and_cache_oracles(lfm2, pictures, make):
    model, processor = lfm2
    check_batch_and_cache(model, make(), lambda which: inputs_for(processor, pictures, which),
                          lambda batch, ids: {k: batch[k] for k in IMAGE_KEYS},
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


def test_beam_search_keeps_each_prompts_images_with_its_rows(lfm2, pictures):
    model, processor = lfm2
    inputs = inputs_for(processor, pictures, which=(0, 1))
    check_beams_against_the_stock_model(model, inputs, mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0))


def test_meteor_stage1_keeps_its_share_of_every_image(lfm2, pictures):
    model, processor = lfm2
    method = mv.Meteor.preset("stage1", encoder_keep=0.5)
    pruned_logits(model, inputs_for(processor, pictures), method)
    assert [s["stage1_tokens"] for s in method.stats] == [8, 4 + 4, 4]  # round(0.5 * 9) = 4


def test_the_processor_writes_an_image_as_lfm2_vls_does(lfm2, pictures):
    """One tile: <|image_start|>, one image token per 2x2 window, <|image_end|>, as `Lfm2VlProcessor` builds it;
    the patches padded to the most, pixel_attention_mask marking the real ones, spatial_shapes each grid."""
    from types import SimpleNamespace

    _, processor = lfm2
    inputs = inputs_for(processor, pictures, which=(1,))
    stock = SimpleNamespace(image_token="<image>", image_start_token="<|image_start|>", image_end_token="<|image_end|>")
    written = [Lfm2VlProcessor._build_image_tokens(stock, 1, 1, 0, n, False, True) for n in (8, 9)]
    want = PROMPTS[1].replace("<image>", "{}").format(*written)
    assert inputs["input_ids"][0].tolist() == processor.tokenizer(want)["input_ids"]
    assert inputs["spatial_shapes"].tolist() == [[4, 8], [6, 6]]
    assert inputs["pixel_attention_mask"].sum(-1).tolist() == [32, 36]


def test_bad_inputs_are_refused(lfm2, pictures):
    model, processor = lfm2
    inputs = inputs_for(processor, pictures, which=(0,))
    with pytest.raises(ValueError, match="needs spatial_shapes"):
        pruned_logits(model, {**inputs, "spatial_shapes": None}, mv.FastV())
    with pytest.raises(ValueError, match=r"a grid of 2 x 2 patch windows"):
        pruned_logits(model, {**inputs, "spatial_shapes": torch.tensor([[8, 7]])}, mv.FastV())
    mask = inputs["pixel_attention_mask"].clone()
    mask[0, 3] = False
    with pytest.raises(ValueError, match="pixel_attention_mask must mark each tile's first"):
        pruned_logits(model, {**inputs, "pixel_attention_mask": mask}, mv.FastV())
    with pytest.raises(ValueError, match=r"LLM layer 6 has no attention layer at or after it .*\[2, 5\]"):
        pruned_logits(*mv.testing.tiny_lfm2_vl(seed=2, num_layers=7)[:1], inputs, mv.FastV(layer=6))
    with pytest.raises(ValueError, match="multiples of 16 px"):
        processor(images=[pictures[0].resize((40, 32))], text=["<image> ?"])
    assert "forward" not in vars(model)
