"""Stock transformers Mistral 3 (`Mistral3ForConditionalGeneration`), a LLaVA with a Pixtral tower (Pixtral-12B's
kind: no merge) and LightOnOCR (`LightOnOcrForConditionalGeneration`: Mistral 3's tower and projector under other
names, a Qwen3 decoder, no row breaks in its prompts) and Ministral 3 (Mistral 3 with a Ministral 3 decoder: YaRN, its
queries scaled by their positions), under every method: the oracles the project's own
model obeys (no-op == stock model, drop == mask, batch == one by one, cached == uncached, beams), on images of three
sizes (each its own patch grid and token count); and 2x2 windows dropped inside its Pixtral ViT == the stock blocks
run without them, merged by the model's own projector."""

KINDS = ["mistral3", "llava-pixtral", "lighton-ocr", "ministral3"]

import pytest
import torch

import meteor_vlm as mv
from meteor_vlm.models.adapters import adapt

from .test_gemma3 import IMAGES, NOOPS, PRUNING
from .test_internvl import assert_ask_and_speed_run_the_folder
from .test_llava import assert_noop_is_the_stock_model, pruned_logits, stock_logits
from .test_oracles import (DropWindows, assert_drop_at_layer_equals_masking, check_batch_and_cache,
                           check_beams_against_the_stock_model, masked_decoder_logits, survivors)

PROMPTS = ["[IMG] what is in the image ?", "[IMG] [IMG] how many red circle are there in the image on the left ?",
           "describe [IMG] what is it ?"]
SIZES = [(64, 64), (64, 32), (64, 64), (40, 64)]  # (width, height) of each picture: 16, 8, 16 and 12 tokens


def tiny(kind: str, seed: int):
    """A tiny model of that kind (`mv.testing.tiny_mistral3`)."""
    return mv.testing.tiny_mistral3(seed=seed, llava=kind == "llava-pixtral", lighton=kind == "lighton-ocr",
                                    ministral=kind == "ministral3")


@pytest.fixture(scope="module", params=KINDS)
def mistral3(request):
    return tiny(request.param, seed=2)


@pytest.fixture(scope="module")
def pictures():
    return [p.resize(s) for p, s in zip(mv.testing.random_images(4, size=64, seed=5), SIZES)]


def inputs_for(processor, pictures, which=(0, 1, 2)):
    starts = [sum(IMAGES[:i]) for i in range(len(IMAGES))]
    imgs = [[pictures[starts[i] + j] for j in range(IMAGES[i])] for i in which]
    return processor(images=imgs, text=[PROMPTS[i] for i in which])


def stock_embeds(model, inputs):
    with torch.no_grad():
        ids = inputs["input_ids"]
        embeds = model.get_input_embeddings()(ids)
        feats = torch.cat(model.get_image_features(pixel_values=inputs["pixel_values"],
                                                   image_sizes=inputs["image_sizes"]).pooler_output)
        return embeds.masked_scatter((ids == model.config.image_token_id)[..., None].expand_as(embeds), feats)


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_equals_the_stock_model_and_the_block_restores_it(mistral3, pictures, make):
    model, processor = mistral3
    inputs = inputs_for(processor, pictures)
    assert inputs["image_sizes"].tolist() == [[64, 64], [32, 64], [64, 64], [64, 48]]  # 40 px: up to 48
    method = make()
    image_tokens = assert_noop_is_the_stock_model(model, inputs, method, stock_logits, pruned_logits)
    assert image_tokens == [16, 8 + 16, 12] and [s["images"] for s in method.stats] == IMAGES


def stock_tower_without(model, pixels, size):
    """(kept windows, (K, D) projected tokens) of one image: the stock Pixtral blocks on the patches left, the windows
    `survivors` drops at each block removed, then the stock projector over the grid with the dropped windows'
    patches zero-filled (Mistral 3's norm, 2x2 merger and MLP; LLaVA's MLP on each patch, a window of one)."""
    tower = getattr(model.model, "vision_encoder", None) or model.model.vision_tower  # LightOnOCR's names, or the others'
    projector = getattr(model.model, "vision_projection", None) or model.model.multi_modal_projector
    p, m = tower.config.patch_size, getattr(model.config, "spatial_merge_size", 1)
    rows, cols = size[0] // p, size[1] // p
    hidden = tower.ln_pre(tower.patch_conv(pixels[None, :, : size[0], : size[1]]).flatten(2).transpose(1, 2))[0]
    ids = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).view(-1, 2)
    cos, sin = tower.patch_positional_embedding(hidden, ids)
    window_of = torch.arange(rows * cols).view(rows // m, m, cols // m, m).permute(0, 2, 1, 3).reshape(-1, m * m)
    alive, patches = torch.arange(rows * cols // (m * m)), torch.arange(rows * cols)
    for b, block in enumerate(tower.transformer.layers):
        hidden = block(hidden[None], attention_mask=None, position_embeddings=(cos[patches], sin[patches]))[0]
        alive = survivors(alive, b, 3)
        left = torch.isin(patches, window_of[alive].flatten())
        hidden, patches = hidden[left], patches[left]
    full = hidden.new_zeros(rows * cols, hidden.shape[-1])
    full[patches] = hidden
    return alive, (projector(full, torch.tensor([size])) if m > 1 else projector(full))[alive]


def test_windows_dropped_inside_the_vit_equal_the_stock_blocks_run_without_them(mistral3, pictures):
    """After each of the ViT's 3 blocks a test method drops whole windows of each image (2x2 patches, or one patch on
    the Pixtral LLaVA; a 64x64 image and a 64x32 one, each on its own grid): the tokens that leave the tower equal the stock blocks run on the patches left,
    merged and projected by the model's own projector, and the logits equal the stock decoder with the dropped
    windows' image tokens masked from layer 0 on."""
    model, processor = mistral3
    inputs = inputs_for(processor, pictures, which=(0, 1))
    assert_windows_dropped_per_image(
        model, inputs, ("pixel_values", "image_sizes"), [16, 8, 16],
        lambda image: stock_tower_without(model, inputs["pixel_values"][image], inputs["image_sizes"][image].tolist()),
        lambda embeds, drop: masked_decoder_logits(model.model.language_model, model.lm_head, embeds,
                                                   inputs["attention_mask"].bool(), drop, 0))


def assert_windows_dropped_per_image(model, inputs, image_keys, spans, stock_tower_without, reference):
    """`DropWindows(3)` inside the tower of a stock VLM whose images each have their own grid (`spans`: each image's
    unpruned tokens, in order): image k's tokens equal `stock_tower_without(k)`'s (kept windows, their tokens), and
    the logits on the text equal `reference(embeds, drop)`, the stock decoder on the stock embeddings with each kept
    window's tokens at its image token, the dropped windows' columns listed per sample in `drop`."""
    with torch.no_grad():
        tokens = adapt(model).encode_images({k: inputs[k] for k in image_keys}, DropWindows(3))
        ids = inputs["input_ids"]
        is_img = ids == model.config.image_token_id
        embeds = model.get_input_embeddings()(ids)
        drop, k = [[] for _ in ids], 0
        columns = list(zip(*is_img.nonzero(as_tuple=True)))
        for image, span in enumerate(spans):
            alive, want = stock_tower_without(image)
            assert 0 < len(alive) < span
            assert tokens.grid_index[image, : len(alive)].tolist() == alive.tolist()
            torch.testing.assert_close(tokens.features[image, : len(alive)], want, atol=1e-5, rtol=1e-5)
            for g in range(span):
                r, c = columns[k + g]
                if g in alive.tolist():
                    embeds[r, c] = want[alive.tolist().index(g)]
                else:
                    drop[r].append(int(c))
            k += span
        want = reference(embeds, drop)
    got = pruned_logits(model, inputs, DropWindows(3))
    text = inputs["attention_mask"].bool() & ~is_img
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [0, 3])
def test_dropping_at_llm_layer_equals_masking_keys(mistral3, pictures, layer):
    model, processor = mistral3
    inputs = inputs_for(processor, pictures, which=(0, 1))
    assert_drop_at_layer_equals_masking(model, inputs, stock_embeds(model, inputs), layer)


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_obeys_the_batch_and_cache_oracles(mistral3, pictures, make):  # both kinds
    model, processor = mistral3
    check_batch_and_cache(model, make(), lambda which: inputs_for(processor, pictures, which),
                          lambda batch, ids: {k: batch[k] for k in ("pixel_values", "image_sizes")},
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_keeps_each_prompts_images_with_its_rows(pictures, kind):
    model, processor = tiny(kind, seed=2)
    inputs = inputs_for(processor, pictures, which=(0, 1))
    check_beams_against_the_stock_model(model, inputs, mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0))


def test_meteor_stage1_keeps_its_share_of_every_image(mistral3, pictures):
    model, processor = mistral3
    method = mv.Meteor.preset("stage1", encoder_keep=0.5)
    pruned_logits(model, inputs_for(processor, pictures), method)
    assert [s["stage1_tokens"] for s in method.stats] == [8, 4 + 8, 6]
    assert [s["encoder_tokens"] for s in method.stats] == [16, 8 + 16, 12]


def test_bad_inputs_are_refused(mistral3, pictures):
    model, processor = mistral3
    inputs = inputs_for(processor, pictures, which=(0,))
    with pytest.raises(ValueError, match="needs image_sizes"):
        pruned_logits(model, {**inputs, "image_sizes": None}, mv.FastV())
    odd = {**inputs, "image_sizes": torch.tensor([[64, 56]])}  # 56 px: 7 patches of 8 px, 3.5 of 16
    message = ("must give each of the 1 images a grid of 16 px windows" if hasattr(model.config, "spatial_merge_size")
               else r"the prompts hold \[16\] image tokens but the 1 image\(s\) given need \[12\]")  # 4 x 3 patches
    with pytest.raises(ValueError, match=message):
        pruned_logits(model, odd, mv.FastV())
    with pytest.raises(ValueError, match=r"the prompts hold more \[IMG\] than the 1 image\(s\) given"):
        processor(images=[[pictures[0]]], text=["[IMG] [IMG] what ?"])
    with pytest.raises(ValueError, match=r"the prompts hold 1 \[IMG\] but 2 image\(s\) were given"):
        processor(images=[pictures[:2]], text=["[IMG] what ?"])
    assert "forward" not in vars(model)


def test_the_lighton_ocr_processor_writes_an_image_as_its_own_processor_does(pictures):
    """LightOnOCR's prompts: each image one image token per visual token (its merged grid's rows times columns), no
    row breaks or image end, as `LightOnOcrProcessor.replace_image_token` writes them; Mistral 3's keep them."""
    from types import SimpleNamespace

    from transformers.models.lighton_ocr.processing_lighton_ocr import LightOnOcrProcessor

    _, processor = tiny("lighton-ocr", seed=2)
    inputs = inputs_for(processor, pictures, which=(1,))
    stock = SimpleNamespace(image_token="[IMG]", effective_patch_size=16)
    written = [LightOnOcrProcessor.replace_image_token(stock, {"image_sizes": inputs["image_sizes"].tolist()}, k)
               for k in range(2)]
    want = PROMPTS[1].replace("[IMG]", "{}").format(*written)
    assert inputs["input_ids"][0].tolist() == processor.tokenizer(want)["input_ids"]
    assert [w.count("[IMG]") for w in written] == [8, 16]
    _, mistral = tiny("mistral3", seed=2)
    assert "[IMG_BREAK]" in mistral.tokenizer.decode(inputs_for(mistral, pictures, which=(1,))["input_ids"][0])


TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}[IMG]"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} a{% endif %}")


@pytest.mark.parametrize("kind", KINDS)
def test_meteor_ask_and_speed_run_a_mistral3_checkpoint_folder(tmp_path, capsys, pictures, kind):
    """A transformers Mistral 3 checkpoint folder (saved model, tokenizer, image processor, chat template) runs under
    `meteor ask` (the answer greedy generate gives on the chat template's prompt under ToMe, which keeps 8 of a square
    image's 16 tokens; a heatmap) and `meteor speed`; the processor read back from the folder gives the same inputs."""
    from meteor_vlm.models.mistral3 import PixtralImageTextProcessor

    model, processor = tiny(kind, seed=3)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    PixtralImageTextProcessor(processor.image_processor, processor.tokenizer, processor.patch_size,
                              processor.spatial_merge_size, TEMPLATE, row_breaks=processor.row_breaks).save_pretrained(ckpt)
    loaded = PixtralImageTextProcessor.from_pretrained(ckpt)
    pictures[0].save(tmp_path / "img.png")
    prompt = loaded.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                      {"type": "text", "text": "what is in the image ?"}]}])
    inputs = loaded(images=[pictures[0]], text=[prompt])
    mine = processor(images=[pictures[0]], text=["[IMG]what is in the image ? a"])
    assert inputs.keys() == mine.keys() and all(torch.equal(inputs[k], mine[k]) for k in inputs)
    assert_ask_and_speed_run_the_folder(model, processor, inputs, ckpt, tmp_path, capsys, tokens=16)
