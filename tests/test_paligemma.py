"""Stock transformers PaliGemma (`PaliGemmaForConditionalGeneration`: a Gemma decoder, and PaliGemma 2's Gemma 2 one,
with sliding-window layers and soft-capped logits) under every method: the oracles the project's own model obeys (no-op
== stock model, drop == mask, batch == one by one, cached == uncached, beams), on prompts whose prefix (images and text)
attends both ways; and patches dropped inside its SigLIP tower == the stock blocks run without them."""

import pytest
import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

import meteor_vlm as mv
from meteor_vlm.models.adapters import adapt

from .test_gemma3 import IMAGES, NOOPS, PRUNING, assert_drop_is_masking, stock_embeds, types_grown_with
from .test_llava import assert_noop_is_the_stock_model, pruned_logits, stock_logits
from .test_oracles import DropWindows, check_batch_and_cache, check_beams_against_the_stock_model, survivors

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the processor's own numpy copies

PROMPTS = ["<image> what is in the image ?", "<image> <image> how many red circle are there in the image on the left ?",
           "<image> describe it ?"]


@pytest.fixture(scope="module", params=[1, 2], ids=["paligemma", "paligemma2"])
def paligemma(request):
    return mv.testing.tiny_paligemma(seed=2, version=request.param)


@pytest.fixture(scope="module")
def pictures():
    return mv.testing.random_images(4, seed=5)


def inputs_for(processor, pictures, which=(0, 1, 2)):
    """The processor's inputs for prompts `which`, without its labels (all -100: the prompts have no suffix)."""
    starts = [sum(IMAGES[:i]) for i in range(len(IMAGES))]
    imgs = [[pictures[starts[i] + j] for j in range(IMAGES[i])] for i in which]
    out = dict(processor(images=imgs, text=[PROMPTS[i] for i in which], return_tensors="pt", padding=True))
    assert bool((out.pop("labels") == -100).all())
    return out


def stock_decoder_logits(model, inputs, embeds, drop=(), layer=0):
    """(B, T, V) the stock Gemma (or Gemma 2) decoder's layers on `embeds` under the masks PaliGemma builds (causal, the
    prefix of token_type_ids 0 one block that attends both ways; PaliGemma 2's sliding layers: the sliding causal mask
    or that block), the columns listed per sample in `drop` masked as keys from `layer` on (a dropped row still sees
    itself); Gemma 2's eager layers take the masks additive, and its logits are soft-capped as the stock head does."""
    lm = model.model.language_model
    text = model.config.get_text_config()
    mask = inputs["attention_mask"]
    B, T = mask.shape
    pos = (mask.long().cumsum(1) - 1).clamp_min(0)
    kwargs = dict(inputs_embeds=embeds, attention_mask=mask, cache=None, position_ids=pos,
                  block_sequence_ids=torch.where(inputs["token_type_ids"] == 0, 0, -1))
    boolean = text.__class__.from_dict(text.to_dict())  # the masks as booleans (what SDPA takes)
    boolean._attn_implementation = "sdpa"
    masks = {"full_attention": create_causal_mask(config=boolean, **kwargs)}
    if getattr(text, "sliding_window", None) is not None:
        masks["sliding_attention"] = create_sliding_window_causal_mask(config=boolean, **kwargs)
    types = getattr(text, "layer_types", None) or ["full_attention"] * len(lm.layers)
    dropped = torch.zeros(B, T, dtype=torch.bool)
    for b, cols in enumerate(drop):
        dropped[b, list(cols)] = True
    eye = torch.eye(T, dtype=torch.bool)
    with torch.no_grad():
        h, pe = embeds, lm.rotary_emb(embeds, pos)
        for i, block in enumerate(lm.layers):
            m = masks[types[i]]
            m = (m & ~dropped[:, None, None, :]) | eye if i >= layer else m
            if text._attn_implementation == "eager":
                m = torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)
            h = block(h, attention_mask=m, position_ids=pos, position_embeddings=pe)
        logits = model.lm_head(lm.norm(h))
        cap = getattr(text, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap


def test_the_reference_is_the_stock_model_and_the_prefix_matters(paligemma, pictures):
    model, processor = paligemma
    inputs = inputs_for(processor, pictures)
    real = inputs["attention_mask"].bool()
    causal = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    assert not torch.allclose(stock_logits(model, inputs)[real], stock_logits(model, causal)[real], atol=1e-2)
    torch.testing.assert_close(stock_decoder_logits(model, inputs, stock_embeds(model, inputs))[real],
                               stock_logits(model, inputs)[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_equals_the_stock_model_and_the_block_restores_it(paligemma, pictures, make):
    model, processor = paligemma
    inputs = inputs_for(processor, pictures)
    method = make()
    image_tokens = assert_noop_is_the_stock_model(model, inputs, method, stock_logits, pruned_logits)
    assert image_tokens == [16 * n for n in IMAGES] and [s["images"] for s in method.stats] == IMAGES
    causal = {k: v for k, v in inputs.items() if k != "token_type_ids"}  # without them the stock model is causal
    assert_noop_is_the_stock_model(model, causal, make(), stock_logits, pruned_logits)


def test_patches_dropped_inside_the_tower_equal_the_stock_blocks_run_without_them(paligemma, pictures):
    """After each of the tower's 3 blocks a test method drops patches: the tokens that leave it equal the stock blocks
    run on the patches left, its final norm and projector, and the logits equal the stock decoder (prefix mask) with
    the dropped patches' image tokens masked from layer 0 on."""
    model, processor = paligemma
    inputs = inputs_for(processor, pictures, which=(0, 1))
    tower = model.model.vision_tower
    with torch.no_grad():
        tokens = adapt(model).encode_images({"pixel_values": inputs["pixel_values"]}, DropWindows(3))
        hidden, alive = tower.embeddings(inputs["pixel_values"]), torch.arange(16)
        for b, block in enumerate(tower.encoder.layers):
            hidden = block(hidden, attention_mask=None)
            keep = torch.isin(alive, survivors(alive, b, 3))
            hidden, alive = hidden[:, keep], alive[keep]
        want = model.model.multi_modal_projector(tower.post_layernorm(hidden))
        assert 0 < len(alive) < 16 and (tokens.grid_index == alive).all()
        torch.testing.assert_close(tokens.features, want, atol=1e-5, rtol=1e-5)
        ids = inputs["input_ids"]
        is_img = ids == model.config.image_token_id
        embeds = model.get_input_embeddings()(ids)
        drop = [[] for _ in ids]
        for k, (r, c) in enumerate(zip(*is_img.nonzero(as_tuple=True))):  # token k: image k // 16, its patch
            if k % 16 in alive.tolist():
                embeds[r, c] = want[k // 16, alive.tolist().index(k % 16)]
            else:
                drop[r].append(int(c))
        reference = stock_decoder_logits(model, inputs, embeds, drop, 0)
    got = pruned_logits(model, inputs, DropWindows(3))
    text = inputs["attention_mask"].bool() & ~is_img
    torch.testing.assert_close(got[text], reference[text], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [0, 3])
def test_dropping_at_llm_layer_equals_masking_keys(paligemma, pictures, layer):
    model, processor = paligemma
    assert_drop_is_masking(model, inputs_for(processor, pictures, which=(0, 1)), stock_decoder_logits, layer)


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_method_obeys_the_batch_and_cache_oracles(paligemma, pictures, make):
    model, processor = paligemma
    check_batch_and_cache(model, make(), lambda which: inputs_for(processor, pictures, which), types_grown_with(1),
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


@pytest.mark.parametrize("version", [1, 2])
def test_beam_search_keeps_each_prompts_images_with_its_rows(pictures, version):
    model, processor = mv.testing.tiny_paligemma(seed=2, version=version)
    inputs = inputs_for(processor, pictures, which=(0, 1))
    check_beams_against_the_stock_model(model, inputs, mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0))


def test_labels_with_targets_are_refused(paligemma, pictures):
    model, processor = paligemma
    inputs = inputs_for(processor, pictures, which=(0,))
    labels = torch.full_like(inputs["input_ids"], -100)
    assert pruned_logits(model, {**inputs, "labels": labels}, mv.FastV()).shape[1] == labels.shape[1]
    labels[0, -1] = 5
    with pytest.raises(ValueError, match="labels with targets"):
        pruned_logits(model, {**inputs, "labels": labels}, mv.FastV())


def test_paligemma_2_runs_eager_inside_the_block_and_its_caps_and_windows_bind(pictures, monkeypatch):
    """PaliGemma 2's decoder runs eager attention inside the block (SDPA cannot soft-cap) and its own setting after
    it; on this tiny one the caps and the windows change the stock model's logits on a causal prompt (so the oracles
    above, which match them, test them), and its sliding layers see the whole prefix, as its stock mask has it (a
    window over the prefix too is another model)."""
    from meteor_vlm.models import paligemma as paligemma_module
    from meteor_vlm.models import runtime
    from meteor_vlm.models.adapters import attention_configs

    model, processor = mv.testing.tiny_paligemma(seed=2, version=2)
    inputs = inputs_for(processor, pictures, which=(0, 1))
    real = inputs["attention_mask"].bool()
    with mv.NoPruning()(model), torch.no_grad():
        inside = [c._attn_implementation for c in attention_configs(model.config)]
        got = model(**inputs, use_cache=False).logits
    assert inside[-1] == "eager" and "eager" not in inside[:-1]
    assert model.config.text_config._attn_implementation == "eager"
    text = model.config.text_config
    stock = stock_logits(model, inputs)
    assert stock[real].abs().max() <= text.final_logit_softcapping
    attentions = [layer.self_attn for layer in model.model.language_model.layers]
    causal = {k: v for k, v in inputs.items() if k != "token_type_ids"}  # a causal prompt: its windows bind
    for owners, key, value in [(attentions, "attn_logit_softcapping", None), ([text], "final_logit_softcapping", None),
                               ([text], "sliding_window", 10**6)]:
        old = getattr(owners[0], key)
        before = stock_logits(model, causal)
        for owner in owners:
            setattr(owner, key, value)
        try:
            changed = stock_logits(model, causal)
        finally:
            for owner in owners:
                setattr(owner, key, old)
        assert (changed[real] - before[real]).abs().max() > 1e-3, key
    init = paligemma_module.PaliGemmaAdapter.__init__

    def windowed(self, model):  # a window over the prefix too: not the stock model
        init(self, model)
        self.decoder.blocks_over_window = False
    monkeypatch.setattr(paligemma_module.PaliGemmaAdapter, "__init__", windowed)
    windowed = pruned_logits(model, inputs, mv.NoPruning())
    monkeypatch.undo()
    torch.testing.assert_close(got[real], stock[real], atol=1e-5, rtol=0)
    assert (windowed[real] - stock[real]).abs().max() > 1e-3
    assert runtime.DecoderParts.of_backbone(model.model.language_model, model.lm_head).attn_softcap == 5.0


def test_meteor_ask_and_speed_run_a_paligemma_checkpoint_folder(tmp_path, capsys, pictures):
    """A transformers PaliGemma checkpoint folder (saved model and processor) runs under `meteor ask` (the answer
    greedy generate gives under ToMe, which keeps 8 of the image's 16 tokens) and `meteor speed`, with its own
    AutoProcessor."""
    from .test_internvl import assert_ask_and_speed_run_the_folder

    model, processor = mv.testing.tiny_paligemma(seed=3)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    pictures[0].save(tmp_path / "img.png")
    inputs = inputs_for(processor, pictures[:1], which=(0,))
    assert_ask_and_speed_run_the_folder(model, processor, inputs, ckpt, tmp_path, capsys, tokens=16)
