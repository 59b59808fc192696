"""The runtime's oracles: no-op == unmodified, drop == mask, cache == recompute, batch == one by one."""

import contextlib

import pytest
import torch

import meteor_vlm as mv
from meteor_vlm.methods.base import PruningMethod
from meteor_vlm.models.runtime import RECURRENT_LAYERS, LLMLayerContext

from .conftest import make_inputs

PROMPTS = ["what is in the image ?", "how many red circle are there in the image ?", "describe the shape ?"]


def logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, use_cache=False, **kw).logits


def keep_all_meteor():
    """Every stage on, every budget at 'keep everything'."""
    return mv.Meteor(encoder_keep=1.0, fusion_keep=1.0, lam=1e9)


@pytest.mark.parametrize("method_factory", [mv.NoPruning, keep_all_meteor])
def test_noop_pruning_equals_unmodified_model_and_block_restores(tiny, images, method_factory):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0], [images[1], images[2]], images[3]], PROMPTS)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    before = logits(model, inputs)
    method = method_factory()
    with method(model):
        assert model._pruning_method is method
        pruned = logits(model, inputs)
    real = inputs["attention_mask"].bool()  # padded columns carry no prediction
    torch.testing.assert_close(pruned[real], before[real], atol=1e-5, rtol=0)
    assert method.stats and all(s["layer_avg_tokens"] == s["fusion_tokens"] for s in method.stats)
    # afterwards: no method, no hooks, same weights, same outputs
    assert model._pruning_method is None
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(logits(model, inputs), before, atol=0, rtol=0)


def test_block_restores_model_after_an_exception(tiny, images):
    model, processor = tiny
    with pytest.raises(RuntimeError, match="boom"):
        with mv.Meteor.preset("paper-242")(model):
            raise RuntimeError("boom")
    assert model._pruning_method is None


class DropAt(PruningMethod):
    """Test method: drop given expanded columns (per sample) before LLM layer `layer`."""

    name = "drop-at-test"

    def __init__(self, layer, drop):
        self.layer, self.drop = layer, drop
        self.stats = []

    def llm_layers(self, num_layers):
        return {self.layer}

    def prune_llm(self, ctx: LLMLayerContext):
        cols = torch.arange(ctx.valid.shape[1]).expand_as(ctx.valid)
        drop = torch.zeros_like(ctx.valid)
        for b, cs in enumerate(self.drop):  # at the first pruning layer columns are still the original ones
            for c in cs:
                drop[b] |= cols[b] == c
        assert (ctx.visual | ~drop).all(), "test drops only visual tokens"
        return ctx.valid & ~drop


def survivors(grid: torch.Tensor, point: int, every: int) -> torch.Tensor:
    """The tokens (grid indices, ascending) `DropWindows` keeps at stage-1 point `point`: all but those with
    (g + point) % every == 1, the first one if that leaves none."""
    keep = (grid + point) % every != 1
    return grid[keep] if bool(keep.any()) else grid[:1]


class DropWindows(PruningMethod):
    """Test method: at each stage-1 point, keep the tokens `survivors` names (on a stock VLM's window runner,
    whole merge windows)."""

    name = "drop-windows-test"

    def __init__(self, every: int):
        self.every, self.stats = every, []

    def prunes_in_encoder(self):
        return True

    def prune_encoder(self, ctx):
        return torch.stack([torch.searchsorted(g, survivors(g, ctx.point, self.every)) for g in ctx.grid])


def reference_masked_logits(model, inputs, drop, layer, replace=None):
    """Unpruned model run layer by layer, with the dropped tokens' keys masked from `layer` on; `replace`,
    if given, maps the hidden states entering `layer` to the ones that layer gets instead."""
    pixels = {k[len("pixel_values_") :]: v for k, v in inputs.items() if k.startswith("pixel_values_")}
    with torch.no_grad():
        visual = model.encode_images(pixels)
        embeds, valid, _, text_col, _, _ = model._splice(inputs["input_ids"], inputs["attention_mask"].bool(), visual)
    out = masked_decoder_logits(model.language_model.model, model.language_model.lm_head, embeds, valid, drop, layer,
                                replace)
    return out.gather(1, text_col[:, :, None].expand(-1, -1, out.shape[-1]))


def masked_decoder_logits(lm, lm_head, embeds, valid, drop, layer, replace=None, positions=None, residuals=None):
    """(B, T, V) logits of a Llama-style backbone `lm` run layer by layer on `embeds` (B, T, D) with valid (B, T)
    left-padded columns, the columns listed per sample in `drop` masked as keys from `layer` on; `positions`:
    the rotary embedding's position ids (default: the running count of real tokens); `residuals`: (B, T, D)
    tensors added to the hidden states after layers 0, 1, ... (Qwen3-VL's DeepStack). A layer its config makes
    sliding (Mistral) gets transformers' own sliding-window mask. A backbone that scales its input embeddings
    (Granite's `embedding_multiplier`) scales `embeds` as its forward does; a decoder that runs eager attention
    (GPT-OSS's) gets the same masks made additive."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    B, T, _ = embeds.shape
    dropped = torch.zeros(B, T, dtype=torch.bool)
    for b, cs in enumerate(drop):
        dropped[b, list(cs)] = True
    pos = (valid.long().cumsum(1) - 1).clamp_min(0)
    cfg = lm.config
    window = getattr(cfg, "sliding_window", None)
    kinds = getattr(cfg, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * len(lm.layers)
    with torch.no_grad():
        pe = lm.rotary_emb(embeds, position_ids=pos if positions is None else positions)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        eye = torch.eye(T, dtype=torch.bool)
        sliding = (create_sliding_window_causal_mask(config=cfg, inputs_embeds=embeds, attention_mask=valid.long(),
                                                     cache=None, position_ids=pos)
                   if "sliding_attention" in kinds else None)
        if sliding is not None and sliding.dtype != torch.bool:  # an eager decoder's: 0 where a key is seen
            sliding = sliding == 0
        eager = cfg._attn_implementation == "eager"
        h = embeds * getattr(lm, "embedding_multiplier", 1.0)
        for i, block in enumerate(lm.layers):
            if i == layer and replace is not None:
                h = replace(h)
            keys = valid & ~dropped if i >= layer else valid
            mask = ((causal[None] & keys[:, None, :]) | eye[None]).unsqueeze(1)
            if kinds[i] == "sliding_attention":
                mask = (sliding & keys[:, None, None, :]) | eye
            if eager:
                mask = torch.zeros(mask.shape, dtype=h.dtype).masked_fill(~mask, torch.finfo(h.dtype).min)
            h = block(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
            if residuals is not None and i < len(residuals):
                h = h + residuals[i]
        return lm_head(lm.norm(h))


def stock_head(model):
    """The stock model's output head: `lm_head`, times the text config's `logits_scaling` on a model whose forward
    multiplies its logits by it (HyperCLOVA X Vision V2's)."""
    if type(model).__name__ == "HyperCLOVAXVisionV2ForConditionalGeneration":
        scale = model.config.text_config.logits_scaling
        return lambda hidden: model.lm_head(hidden) * scale
    return model.lm_head


def assert_drop_at_layer_equals_masking(model, inputs, embeds, layer):
    """`DropAt(layer)` dropping every third image token of sample 0 and every other one of sample 1 of a stock VLM:
    its logits on the text equal the stock decoder run on `embeds` (the stock model's input embeddings) with those
    columns' keys masked from `layer` on."""
    vis = inputs["input_ids"] == model.config.image_token_id
    drop = [vis[0].nonzero()[::3, 0].tolist(), vis[1].nonzero()[1::2, 0].tolist()]
    with DropAt(layer, drop)(model), torch.no_grad():
        got = model(**inputs, use_cache=False).logits
    want = masked_decoder_logits(model.model.language_model, stock_head(model), embeds,
                                 inputs["attention_mask"].bool(), drop, layer)
    text = inputs["attention_mask"].bool() & ~vis
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)


def first_attention_layer(config, layer: int) -> int:
    """The first layer at or after `layer` that a decoder's config does not make a recurrent one (Qwen3.5's
    linear-attention layers, LFM2's convolutions)."""
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return next(i for i in range(layer, len(kinds)) if kinds[i] not in RECURRENT_LAYERS)


def has_recurrent_layers(config) -> bool:
    """Whether a decoder's config makes some of its layers recurrent (`RECURRENT_LAYERS`)."""
    return any(kind in RECURRENT_LAYERS for kind in getattr(config, "layer_types", None) or ())


def dropped_decoder_logits(lm, lm_head, embeds, valid, drop, layer, positions):
    """(B, T, V) logits of a stock transformers decoder backbone `lm` (its own forward, masks and cache-free
    layers) with the columns listed per sample in `drop` removed from the sequence before `layer`: each sample
    alone, unpadded, its real columns through layers 0 .. layer - 1, then its columns but the dropped ones, at
    their `positions` ((B, T), or (3, B, T) multimodal; None: counted over the real tokens), through the stock
    decoder cut to layers layer .. N - 1 (the oracle of a decoder whose recurrent layers read their input as a
    sequence, where masking a token is not removing it). Logits of the removed and padded columns are zeros."""
    B, T, _ = embeds.shape
    cfg, layers = lm.config, lm.layers
    kinds, depth = list(cfg.layer_types), cfg.num_hidden_layers
    out = torch.zeros(B, T, lm_head.out_features)
    with torch.no_grad():
        for b in range(B):
            cols = valid[b].nonzero()[:, 0]
            if positions is None:
                pos = torch.arange(len(cols))[None]
            else:
                pos = positions[b : b + 1, cols] if positions.dim() == 2 else positions[:, b : b + 1, cols]
            h = embeds[b : b + 1, cols]
            if layer > 0:
                h = lm(inputs_embeds=h, position_ids=pos, attention_mask=torch.ones(h.shape[:2], dtype=torch.long),
                       use_cache=False, output_hidden_states=True).hidden_states[layer]
            kept = torch.tensor([int(c) not in set(drop[b]) for c in cols])
            lm.layers, cfg.num_hidden_layers, cfg.layer_types = layers[layer:], depth - layer, kinds[layer:]
            try:
                # an explicit mask: given none, transformers reads the kept positions' gaps as packed sequences
                tail = lm(inputs_embeds=h[:, kept], position_ids=pos[..., kept], use_cache=False,
                          attention_mask=torch.ones(1, int(kept.sum()), dtype=torch.long)).last_hidden_state
            finally:
                lm.layers, cfg.num_hidden_layers, cfg.layer_types = layers, depth, kinds
            out[b, cols[kept]] = lm_head(tail)[0]
    return out


def assert_one_drop_equals_masking(model, inputs, got, vis, kept, layer):
    """A batch-1 method that dropped every visual column but `kept` before `layer`: its logits `got` equal
    the unpruned model's with those columns' keys masked from `layer` on."""
    drop = [sorted(set(torch.where(vis)[0].tolist()) - set(kept))]
    want = reference_masked_logits(model, inputs, drop, layer)
    real = inputs["input_ids"] != model.config.image_token_id
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [0, 2, 5])
def test_dropping_at_layer_equals_masking_keys_from_that_layer_on(tiny, images, layer):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0], images[1]], PROMPTS[:2])
    with torch.no_grad():
        visual = model.encode_images({k[13:]: v for k, v in inputs.items() if k.startswith("pixel_values_")})
        _, valid, vis, _, _, _ = model._splice(inputs["input_ids"], inputs["attention_mask"].bool(), visual)
    # drop a different set of visual tokens in each sample (every third / every second one)
    drop = [vis[0].nonzero()[::3, 0].tolist(), vis[1].nonzero()[1::2, 0].tolist()]
    method = DropAt(layer, drop)
    with method(model):
        got = logits(model, inputs)
    want = reference_masked_logits(model, inputs, drop, layer)
    text = inputs["input_ids"] != model.config.image_token_id
    real = inputs["attention_mask"].bool() & text
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    # and the drop really changed something (the oracle is not vacuous)
    base = logits(model, inputs)
    assert (got[real] - base[real]).abs().max() > 1e-3


class RecycleAt(DropAt):
    """Test method: like DropAt, and each group of dropped columns (per sample) comes back as one merged token,
    the mean of the group's hidden states, at the place of the group's last column."""

    name = "recycle-at-test"

    def __init__(self, layer, drop, groups):
        super().__init__(layer, drop)
        self.groups = groups

    def prune_llm(self, ctx: LLMLayerContext):
        keep = super().prune_llm(ctx)
        M = max(len(g) for g in self.groups)
        merged = torch.zeros(len(self.groups), M, ctx.hidden.shape[-1])
        at = torch.full((len(self.groups), M), -1)
        for b, gs in enumerate(self.groups):
            for m, g in enumerate(gs):
                merged[b, m], at[b, m] = ctx.hidden[b, g].mean(0), g[-1]
        return mv.methods.LLMMerge(keep, merged, at)


@pytest.mark.parametrize("layer", [0, 3])
def test_recycling_at_layer_equals_writing_the_merged_states_and_masking_the_rest(tiny, images, layer):
    """An LLMMerge before layer L: the logits equal the unpruned model's where that layer's input has each
    merged token written at its column and the other dropped columns' keys are masked from L on; a sample
    that merges nothing (an empty slot in the other's row) is a plain drop."""
    model, processor = tiny
    inputs = make_inputs(processor, [images[0], images[1]], PROMPTS[:2])
    with torch.no_grad():
        visual = model.encode_images({k[13:]: v for k, v in inputs.items() if k.startswith("pixel_values_")})
        _, _, vis, _, _, _ = model._splice(inputs["input_ids"], inputs["attention_mask"].bool(), visual)
    cols = [vis[b].nonzero()[:, 0].tolist() for b in range(2)]
    drop = [cols[0][::2], cols[1][1::3]]
    groups = [[drop[0][0:3], drop[0][5:7]], [drop[1][2:6]]]
    method = RecycleAt(layer, drop, groups)
    with method(model):
        got = logits(model, inputs)
    # the merged tokens' columns stay; the rest of each drop is masked
    dropped = [sorted(set(d) - {g[-1] for g in gs}) for d, gs in zip(drop, groups)]

    def write(h):
        h = h.clone()
        for b, gs in enumerate(groups):
            for g in gs:
                h[b, g[-1]] = h[b, g].mean(0)
        return h

    want = reference_masked_logits(model, inputs, dropped, layer, replace=write)
    real = inputs["attention_mask"].bool() & (inputs["input_ids"] != model.config.image_token_id)
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    plain = reference_masked_logits(model, inputs, dropped, layer)
    assert (got[real] - plain[real]).abs().max() > 1e-3, "the merged states matter (the oracle is not vacuous)"
    assert [s["stage3"][layer] for s in method.stats] == [len(c) - len(d) + len(gs) for c, d, gs in zip(cols, drop, groups)]


def test_recycled_tokens_must_take_the_place_of_dropped_visual_columns(tiny, images):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0]], PROMPTS[:1])
    with torch.no_grad():
        visual = model.encode_images({k[13:]: v for k, v in inputs.items() if k.startswith("pixel_values_")})
        _, _, vis, _, _, _ = model._splice(inputs["input_ids"], inputs["attention_mask"].bool(), visual)
    cols = vis[0].nonzero()[:, 0].tolist()
    text = (~vis[0]).nonzero()[0, 0].item()
    for drop, groups, match in (
        ([cols[1:4]], [[[cols[4]]]], "a real visual column the answer drops"),  # a kept column
        ([cols[1:4]], [[[text]]], "a real visual column the answer drops"),  # a text column
        ([cols[1:4]], [[[cols[2]], [cols[2]]]], "same column"),
    ):
        with RecycleAt(1, drop, groups)(model), pytest.raises(ValueError, match=match):
            logits(model, inputs)


class DropAtFusion(PruningMethod):
    """Test method: keep tokens `keep` (per image, ascending) of the fused sequence (stage 2)."""

    name = "drop-at-fusion-test"

    def __init__(self, keep):
        self.keep = keep
        self.stats = []

    def prune_fusion(self, ctx):
        return self.keep.expand(ctx.tokens.shape[0], -1)


class GapsAtOutput(PruningMethod):
    """Test method: at each expert's output, keep the patch tokens whose first feature is above `cut` (a
    different count per image: the shorter ones padded with -1 slots), and the first token always."""

    name = "gaps-at-output-test"

    def __init__(self, cut=0.0):
        self.cut = cut
        self.kept = {}
        self.stats = []

    def encoder_blocks(self, num_blocks):
        return [num_blocks - 1]

    def prune_encoder(self, ctx):
        keep = ctx.patches[..., 0] > self.cut
        keep[:, 0] = True
        self.kept[ctx.expert] = keep
        return mv.ops.mask_to_padded_indices(keep)


def test_a_different_count_per_image_before_the_llm_equals_masking_from_layer_0(tiny, images):
    """Stage 1 may keep a different number of tokens per image (empty slots, -1, in the shorter ones): the
    logits equal the unpruned model's with each image's dropped tokens masked from LLM layer 0 on, at the
    original positions; and a batch equals its samples run alone."""
    model, processor = tiny
    imgs = [images[0], [images[1], images[2]], images[3]]
    inputs = make_inputs(processor, imgs, PROMPTS)
    method = GapsAtOutput()
    with method(model):
        got = logits(model, inputs)
    counts = torch.stack([k.sum(1) for k in method.kept.values()])  # (experts, images)
    assert (counts != counts[:, :1]).any(), "images keep different counts"
    with torch.no_grad():
        visual = model.encode_images({k[13:]: v for k, v in inputs.items() if k.startswith("pixel_values_")})
        _, _, vis, _, vis_index, _ = model._splice(inputs["input_ids"], inputs["attention_mask"].bool(), visual)
    n_vis = visual.features.shape[1]
    image, j = (vis_index // n_vis).clamp_min(0), vis_index % n_vis
    kept = torch.stack([torch.stack([method.kept[model.expert_names[e]][i, g]
                                     for e, g in zip(visual.expert[i], visual.grid_index[i])])
                        for i in range(visual.features.shape[0])])  # (images, n_vis)
    dropped = vis & ~kept[image, j]
    drop = [dropped[b].nonzero()[:, 0].tolist() for b in range(dropped.shape[0])]
    want = reference_masked_logits(model, inputs, drop, 0)
    real = inputs["attention_mask"].bool() & (inputs["input_ids"] != model.config.image_token_id)
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert [s["fusion_tokens"] for s in method.stats] == [int(n) for n in (vis & ~dropped).sum(1)]
    for b in range(3):
        with method(model):
            alone = logits(model, make_inputs(processor, [imgs[b]], [PROMPTS[b]]))[0]
        torch.testing.assert_close(got[b, -alone.shape[0]:], alone, atol=1e-4, rtol=1e-4)


def test_empty_slots_only_at_an_experts_output(tiny, images):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0], images[1], images[3]], PROMPTS)

    class EarlyGaps(GapsAtOutput):
        def encoder_blocks(self, num_blocks):
            return [0, num_blocks - 1]

    with pytest.raises(ValueError, match="only possible after the expert's last block"), EarlyGaps()(model):
        logits(model, inputs)


def test_fusion_pruning_after_a_count_per_image_sees_each_image_alone(tiny, images):
    """Stage 1 keeps a different count per image, then DivPrune prunes at fusion: each image's fusion answer is
    the one it gets alone (its real tokens only), so a batch equals its samples run alone and each image keeps
    its share of its own tokens."""
    model, processor = tiny
    imgs = [images[0], [images[1], images[2]], images[3]]
    inputs = make_inputs(processor, imgs, PROMPTS)

    class ThenDivPrune(GapsAtOutput):
        def prune_fusion(self, ctx):
            return mv.DivPrune(keep=0.5).prune_fusion(ctx)

    method = ThenDivPrune()
    with method(model):
        got = logits(model, inputs)
    stage1 = [s["stage1_tokens"] for s in method.stats]
    assert len(set(stage1)) > 1, f"the samples hand on different counts: {stage1}"
    fused = [s["fusion_tokens"] for s in method.stats]
    assert all(f < n for f, n in zip(fused, stage1)), "fusion pruned every sample"
    for b in range(3):
        with method(model):
            alone = logits(model, make_inputs(processor, [imgs[b]], [PROMPTS[b]]))[0]
        torch.testing.assert_close(got[b, -alone.shape[0]:], alone, atol=1e-4, rtol=1e-4)
        assert method.stats[-1]["fusion_tokens"] == fused[b]


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_pruning_before_the_llm_equals_masking_from_layer_0_with_original_positions(tiny, images, positions):
    """Stage 2 drops tokens before the LLM; with `visual_positions="original"` the kept ones keep the
    RoPE positions of the unpruned sequence, so the logits equal the unpruned model's with the dropped
    tokens' keys masked from layer 0 on. "compact" renumbers the shorter sequence and does not."""
    model, processor = tiny
    inputs = make_inputs(processor, [images[0], [images[1], images[2]]], PROMPTS[:2])
    with torch.no_grad():
        visual = model.encode_images({k[13:]: v for k, v in inputs.items() if k.startswith("pixel_values_")})
        _, valid, vis, _, vis_index, _ = model._splice(inputs["input_ids"], inputs["attention_mask"].bool(), visual)
    n_vis = visual.features.shape[1]
    keep = torch.tensor([j for j in range(n_vis) if j % 3 and j != n_vis - 1])  # the last token goes too
    dropped = ~torch.isin(vis_index % n_vis, keep) & vis
    drop = [dropped[b].nonzero()[:, 0].tolist() for b in range(dropped.shape[0])]
    model.config.visual_positions = positions
    try:
        with DropAtFusion(keep)(model):
            got = logits(model, inputs)
    finally:
        model.config.visual_positions = "original"
    want = reference_masked_logits(model, inputs, drop, 0)
    real = inputs["attention_mask"].bool() & (inputs["input_ids"] != model.config.image_token_id)
    if positions == "original":
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    else:
        assert (got[real] - want[real]).abs().max() > 1e-3


def test_visual_positions_must_be_known(tiny, images):
    with pytest.raises(ValueError, match="visual_positions"):
        mv.models.MultiEncoderVLMConfig(visual_positions="shifted")
    model, processor = tiny
    inputs = make_inputs(processor, [images[0]], PROMPTS[:1])
    model.config.visual_positions = "shifted"
    try:
        with pytest.raises(ValueError, match="visual_positions"):
            logits(model, inputs)
    finally:
        model.config.visual_positions = "original"


@pytest.mark.parametrize(
    "method",
    [
        mv.Meteor.preset("paper-242"),
        mv.Meteor.preset("paper-242", query="text"),
        mv.Meteor.preset("paper-126", budget="fixed"),
    ],
    ids=["last-query", "text-query", "fixed-budget"],
)
def test_cached_generate_equals_uncached_recomputation(tiny, images, method):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0], [images[1], images[2]]], PROMPTS[:2])
    steps = 6
    with method(model), torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            return_dict_in_generate=True, output_logits=True,
        )
        # one prefill per sample, then decoding on the cache (not the whole sequence again at each step)
        assert len(method.stats) == inputs["input_ids"].shape[0]
        T0 = inputs["input_ids"].shape[1]
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        pixels = {k: v for k, v in inputs.items() if k.startswith("pixel_values_")}
        for step in range(steps):
            # no cache: the whole sequence again; stage-3 queries stay at the last prompt token
            full = model(input_ids=ids, attention_mask=mask, **pixels, use_cache=False, query_positions=T0 - 1).logits[:, -1]
            torch.testing.assert_close(out.logits[step], full, atol=1e-4, rtol=1e-4)
            full[:, model.config.image_token_id] = float("-inf")  # generate never emits the placeholder
            full[:, processor.tokenizer.eos_token_id] = float("-inf")  # nor, under min_new_tokens, the end
            ids = torch.cat([ids, full.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(out.sequences, ids)
    assert all(s["stage3"] for s in method.stats), "stage 3 ran"
    assert all(s["stage1_tokens"] < s["encoder_tokens"] for s in method.stats), "stage 1 ran"


def test_batch_equals_samples_run_alone_with_different_budgets(tiny, images):
    model, processor = tiny
    imgs = [images[0], [images[1], images[2]], images[3]]
    prompts = ["what ?", "how many red circle are there in the image on the left ?", "describe the shape of it ?"]
    method = mv.Meteor.preset("paper-242")
    with method(model), torch.no_grad():
        batch_in = make_inputs(processor, imgs, prompts)
        assert (batch_in["attention_mask"] == 0).any(), "left padding is exercised"
        batch_logits = model(**batch_in, use_cache=False).logits
        batch_stats = list(method.stats)
        for b in range(3):
            alone_in = make_inputs(processor, [imgs[b]], [prompts[b]])
            alone = model(**alone_in, use_cache=False).logits[0]
            n = alone.shape[0]
            torch.testing.assert_close(batch_logits[b, -n:], alone, atol=1e-4, rtol=1e-4)
            assert method.stats[-1]["stage3"] == batch_stats[b]["stage3"]
    kept = [tuple(s["stage3"].values()) for s in batch_stats]
    assert len(set(kept)) == 3, f"each sample keeps a different number of tokens: {kept}"


def test_batch_generate_equals_one_by_one(tiny, images):
    model, processor = tiny
    imgs, prompts = [images[4], images[5]], ["what ?", "how many circle are there in the image ?"]
    method = mv.Meteor.preset("paper-312")
    with method(model), torch.no_grad():
        batch = model.generate(**make_inputs(processor, imgs, prompts), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        for b in range(2):
            one = model.generate(**make_inputs(processor, [imgs[b]], [prompts[b]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
            assert torch.equal(batch[b, -one.shape[1] :], one[0])


def test_every_layer_keeps_running_sdpa_while_pruning(tiny, images, monkeypatch):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0], images[1]], PROMPTS[:2])
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    method = mv.Meteor.preset("paper-242")
    with method(model), torch.no_grad():
        model(**inputs, use_cache=False)
    transformer_blocks = sum(r.num_blocks for r in model.runners)
    assert len(calls) == transformer_blocks + model.num_llm_layers
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(module, "q_proj" if hasattr(module, "q_proj") else "query"):
            assert cfg._attn_implementation == "sdpa"
    assert model.config.text_config._attn_implementation == "sdpa"
    # the LLM layers after pruning ran on fewer tokens
    llm_lens = [c[2] for c in calls[transformer_blocks:]]
    assert llm_lens[-1] < llm_lens[0]


# every peer: (its keep-everything setting, a setting that prunes)
PEERS = {
    "fastv": (lambda: mv.FastV(layer=2, ratio=0.0), lambda: mv.FastV(layer=2, ratio=0.6)),
    "pyramiddrop": (lambda: mv.PyramidDrop(ratio=1.0), lambda: mv.PyramidDrop(ratio=0.6)),
    "dart": (lambda: mv.DART(layer=2, ratio=0.0), lambda: mv.DART(layer=2, ratio=0.6)),
    "divprune": (lambda: mv.DivPrune(keep=1.0), lambda: mv.DivPrune(keep=0.4)),
    "visionzip": (lambda: mv.VisionZip(keep=1.0), lambda: mv.VisionZip(keep=0.4)),
    "evoprune": (lambda: mv.EvoPrune(keep=1.0), lambda: mv.EvoPrune(keep=0.4)),
    "tome": (lambda: mv.ToMe(keep=1.0), lambda: mv.ToMe(keep=0.4)),
    "prumerge": (lambda: mv.PruMerge(uniform=1.0), lambda: mv.PruMerge(uniform=0.2, whisker=0.25)),  # counts differ per image
    "sparsevlm": (lambda: mv.SparseVLM(keep=(1.0, 1.0, 1.0)), lambda: mv.SparseVLM(keep=(0.6, 0.4, 0.2), recycle=0.5, cluster=0.25)),
}


@pytest.mark.parametrize("make", [noop for noop, _ in PEERS.values()], ids=list(PEERS))
def test_peers_pruning_nothing_are_the_unmodified_model(tiny, images, make):
    """A peer at its keep-everything setting gives the unmodified model's logits (padded batch, 1 or 2 images)."""
    model, processor = tiny
    inputs = make_inputs(processor, [images[0], [images[1], images[2]]], PROMPTS[:2])
    before = logits(model, inputs)
    with make()(model):
        same = logits(model, inputs)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(same[real], before[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [prune for _, prune in PEERS.values()], ids=list(PEERS))
def test_peers_batch_equals_one_by_one_and_cached_generate_equals_uncached(tiny, images, make):
    """The peers on the shared runtime obey its batch and cache oracles too."""
    assert_batch_and_cache_oracles(*tiny, images, make())


@pytest.fixture(scope="module")
def tiny_qwen2(images):
    model, processor = mv.testing.tiny_model(seed=1, experts=("siglip", "pix2struct", "convnext"), llm="qwen2")
    model.config.rank_table = mv.calibrate(model, processor, images[:2], progress=False)
    return model, processor


@pytest.mark.parametrize("make", [prune for _, prune in PEERS.values()] + [lambda: mv.Meteor.preset("paper-242")],
                         ids=[*PEERS, "meteor"])
def test_every_method_obeys_the_batch_and_cache_oracles_on_a_qwen2_llm(tiny_qwen2, images, make):
    """The same oracles with a Qwen2 decoder (biased q/k/v projections) and a CLS-less SigLIP expert."""
    assert_batch_and_cache_oracles(*tiny_qwen2, images, make())


def assert_batch_and_cache_oracles(model, processor, images, method):
    """A left-padded batch of 3 (1 or 2 images) under `method` = its samples alone, and greedy generate with
    the KV cache = step-by-step recomputation without it."""
    imgs = [images[0], [images[1], images[2]], images[3]]
    check_batch_and_cache(
        model, method, lambda which: make_inputs(processor, [imgs[b] for b in which], [PROMPTS[b] for b in which]),
        lambda batch, ids: {k: v for k, v in batch.items() if k.startswith("pixel_values_")},
        [model.config.image_token_id, processor.tokenizer.eos_token_id])


def check_batch_and_cache(model, method, inputs_for, images_for, never, steps=4, alone_with=None):
    """The batch and cache oracles on any model a method attaches to.

    inputs_for(which): the model's inputs for prompts `which` (a left-padded batch); images_for(batch, ids): the
    image inputs (and any per-column ones, grown to `ids`) to run the batch's prompts grown to `ids` again
    without cache; never: token ids greedy generation must not pick (suppressed ones, and the end under
    min_new_tokens); alone_with(b, batch, alone): what else prompt b run alone is given (a model whose positions
    depend on the batch, as HunYuanVL's image index: those it had in the batch), or None.
    Checks that the batch of prompts 0, 1, 2 equals each alone, that the method pruned, that
    the same prompts padded on the right give the same logits, kept tokens and generated tokens, and that greedy
    generate with the KV cache equals step-by-step recomputation without it and generate without the cache."""
    with method(model), torch.no_grad():
        batch_in = inputs_for((0, 1, 2))
        assert (batch_in["attention_mask"] == 0).any(), "left padding is exercised"
        batch = model(**batch_in, use_cache=False).logits
        for b in range(3):
            alone_in = inputs_for((b,))
            extra = alone_with(b, batch_in, alone_in) if alone_with is not None else {}
            alone = model(**alone_in, use_cache=False, **extra).logits[0]
            torch.testing.assert_close(batch[b, -alone.shape[0]:], alone, atol=1e-4, rtol=1e-4)
        assert all(s["layer_avg_tokens"] < s["encoder_tokens"] for s in method.stats[:3]), "it pruned"
        left_stats = method.stats[:3]
        check_right_padding(model, batch_in, batch)
        assert [s["tokens_per_layer"] for s in method.stats[-3:]] == [s["tokens_per_layer"] for s in left_stats]
        out = model.generate(**batch_in, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
        ids, mask = batch_in["input_ids"], batch_in["attention_mask"]
        for step in range(steps):
            full = model(input_ids=ids, attention_mask=mask, **images_for(batch_in, ids), use_cache=False,
                         query_positions=batch_in["input_ids"].shape[1] - 1).logits[:, -1]
            torch.testing.assert_close(out.logits[step], full, atol=1e-4, rtol=1e-4)
            full[:, never] = float("-inf")
            ids = torch.cat([ids, full.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        # right-padded prompts generate the same tokens (transformers' stock models need left padding for that)
        right = model.generate(**right_padded(batch_in), max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        # generate without the cache runs each step on the whole sequence, choosing with the prompt's query too
        uncached = model.generate(**batch_in, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                  use_cache=False)
    assert torch.equal(out.sequences, ids)
    assert torch.equal(right[:, -steps:], ids[:, -steps:])
    assert torch.equal(uncached, ids)


def right_padded(inputs: dict) -> dict:
    """A left-padded batch's inputs with each row's padding moved to its end: every (B, T) tensor (input_ids,
    attention_mask and per-column ones such as token_type_ids) rolled left by the row's padding."""
    ids = inputs["input_ids"]
    pads = (inputs["attention_mask"] == 0).sum(1)
    out = dict(inputs)
    for k, v in inputs.items():
        if torch.is_tensor(v) and v.shape == ids.shape:
            out[k] = torch.stack([row.roll(-int(p)) for row, p in zip(v, pads)])
    return out


def check_right_padding(model, left_in: dict, left_logits: torch.Tensor) -> None:
    """The same prompts right-padded give each real column the logits of the left-padded batch (whose rows
    equal the samples alone): padding after a prompt is no token, and not its query either."""
    right_in = right_padded(left_in)
    assert (right_in["attention_mask"][:, -1] == 0).any(), "right padding is exercised"
    right = model(**right_in, use_cache=False).logits
    for b, n in enumerate(left_in["attention_mask"].sum(1).tolist()):
        torch.testing.assert_close(right[b, :n], left_logits[b, -n:], atol=1e-4, rtol=1e-4)


def check_beams_against_the_stock_model(model, inputs, method, stock_scores: bool = True):
    """Beam search (3 beams) on a stock VLM whose prompts hold several images or tiles: pruning nothing, it equals
    the stock model's (each prompt's images follow its repeated rows), sequences and scores; under `method`, with the
    KV cache it equals recomputation without it. `stock_scores` False: the stock model's beams' scores are not
    compared (HunYuanVL's stock beams number the repeated images across the expanded batch in another order)."""
    beams = dict(max_new_tokens=4, min_new_tokens=4, num_beams=3, do_sample=False, return_dict_in_generate=True,
                 output_scores=True)
    with torch.no_grad():
        stock = model.generate(**inputs, **beams)
        with mv.NoPruning()(model):
            same = model.generate(**inputs, **beams)
        with method(model):
            cached = model.generate(**inputs, **beams)
            uncached = model.generate(**inputs, **beams, use_cache=False, query_positions=inputs["input_ids"].shape[1] - 1)
    # the beams' scores too: a prompt given another prompt's image may still pick the same words
    for got, want in ((same, stock), (cached, uncached)):
        assert torch.equal(got.sequences, want.sequences)
        if want is uncached or stock_scores:
            torch.testing.assert_close(got.sequences_scores, want.sequences_scores, atol=1e-4, rtol=1e-4)
    assert "_expand_inputs_for_generation" not in vars(model)


def test_beam_search_keeps_each_prompts_images_with_its_rows(tiny, images):
    """Beams repeat each prompt's row, and its images (two for the second prompt) follow as a group: beam search
    with the KV cache under METEOR equals beam search recomputed without it."""
    model, processor = tiny
    inputs = make_inputs(processor, [images[0], [images[1], images[2]]], PROMPTS[:2])
    beams = dict(max_new_tokens=4, min_new_tokens=4, num_beams=3, do_sample=False)
    with mv.Meteor.preset("paper-242")(model), torch.no_grad():
        cached = model.generate(**inputs, **beams)
        uncached = model.generate(**inputs, **beams, use_cache=False, query_positions=inputs["input_ids"].shape[1] - 1)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("pruning", [False, True])
def test_a_right_padded_batch_without_images_equals_the_left_padded_one(tiny, pruning):
    """Prompts with no image, padded on the right: each real column has its left-padded logits (padding leaves the
    sequence whichever side it is on), with the model alone and inside a method's block."""
    model, processor = tiny
    left_in = processor(text=["what ?", "how many red circle are there in the image ?"], return_tensors="pt",
                        padding=True)
    with contextlib.ExitStack() as stack, torch.no_grad():
        if pruning:
            stack.enter_context(mv.FastV(layer=2, ratio=0.5)(model))
        check_right_padding(model, left_in, model(**left_in, use_cache=False).logits)


@pytest.mark.parametrize("family", ["project", "llava"])
def test_a_method_attached_inside_another_runs_alone_and_hands_back_to_it(tiny, images, family):
    """`with b(model)` inside `with a(model)`: inside, the model is b's alone (a is not applied on top); after b's
    block, a's again; after both, the unmodified model."""
    if family == "project":
        model, processor = tiny
        inputs = make_inputs(processor, [images[0], images[1]], ["what ?", "how many circle are there ?"])
    else:
        model, processor = mv.testing.tiny_llava(seed=0)
        inputs = processor(images=[images[0], images[1]], text=["<image> what ?", "<image> how many circle ?"],
                           return_tensors="pt", padding=True)
    outer, inner = (lambda: mv.FastV(layer=1, ratio=0.75)), (lambda: mv.VisionZip(keep=0.25))

    def alone(make):
        with make()(model), torch.no_grad():
            return model(**inputs, use_cache=False).logits

    with torch.no_grad():
        plain = model(**inputs, use_cache=False).logits
        want_outer, want_inner = alone(outer), alone(inner)
        assert not torch.allclose(want_outer, want_inner)
        with outer()(model) as a:
            with inner()(model) as b:
                torch.testing.assert_close(model(**inputs, use_cache=False).logits, want_inner, atol=0, rtol=0)
            torch.testing.assert_close(model(**inputs, use_cache=False).logits, want_outer, atol=0, rtol=0)
        torch.testing.assert_close(model(**inputs, use_cache=False).logits, plain, atol=0, rtol=0)
    assert len(a.stats) == 2 and len(b.stats) == 2
