"""DART on the shared runtime: its choice = a plain reference from the unpruned model's own states,
its drop = masking, bad settings raise. (Batch and cache oracles: test_oracles.py, with the other peers.)"""

import pytest
import torch
import torch.nn.functional as F

import meteor_vlm as mv

from .conftest import make_inputs
from .test_oracles import PROMPTS, assert_one_drop_equals_masking, logits


class RecordingDART(mv.DART):
    """DART that keeps the mask it returned (for the test to compare)."""

    def prune_llm(self, ctx):
        self.kept = super().prune_llm(ctx)
        return self.kept


def unpruned_states(model, inputs, layer):
    """The input hidden states of LLM layer `layer` and that layer's key projection, captured by hooks on an
    unpruned run of the language model over the spliced sequence (batch 1, no padding); which columns are visual."""
    pixels = {k[len("pixel_values_"):]: v for k, v in inputs.items() if k.startswith("pixel_values_")}
    block = model.language_model.model.layers[layer]
    seen = {}

    def layer_input(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    def keys(module, args, out):
        seen["k"] = out

    hooks = [block.register_forward_pre_hook(layer_input, with_kwargs=True),
             block.self_attn.k_proj.register_forward_hook(keys)]
    try:
        with torch.no_grad():
            visual = model.encode_images(pixels)
            embeds, valid, vis, _, _, _ = model._splice(inputs["input_ids"], inputs["attention_mask"].bool(), visual)
            assert valid.all()
            model.language_model.model(inputs_embeds=embeds)
    finally:
        for h in hooks:
            h.remove()
    return seen["h"][0], seen["k"][0], vis[0]


def plain_dart(h, k, vis, ratio, image_pivots=4, text_pivots=4):
    """DART's kept columns for one sample, as loops: pivots by key L1 norm, an even split of the rest of the
    budget over the pivots, each keeping the free visual tokens least cosine-similar to it."""
    norm = k.abs().sum(-1).tolist()
    vis_cols = torch.where(vis)[0].tolist()
    keep = round((1 - ratio) * len(vis_cols))
    text_cols = [c for c in range(vis_cols[0], len(vis)) if not vis[c]]
    image_piv = sorted(vis_cols, key=lambda c: -norm[c])[: min(image_pivots, keep)]
    text_piv = sorted(text_cols, key=lambda c: -norm[c])[:text_pivots]
    pivots, kept = image_piv + text_piv, set(image_piv)
    rest = keep - len(image_piv)
    for j, p in enumerate(pivots):
        quota = rest // len(pivots) + (j < rest % len(pivots))
        free = [c for c in vis_cols if c not in kept]
        sim = {c: float(F.cosine_similarity(h[p], h[c], dim=0)) for c in free}
        kept |= set(sorted(free, key=lambda c: sim[c])[:quota])
    return kept, keep


@pytest.mark.parametrize("layer,ratio", [(1, 0.75), (3, 0.5)])
def test_dart_keeps_the_least_duplicated_tokens_and_its_drop_equals_masking(tiny, images, layer, ratio):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0]], PROMPTS[:1])
    h, k, vis = unpruned_states(model, inputs, layer)
    want_kept, keep = plain_dart(h.double(), k.double(), vis, ratio)
    method = RecordingDART(layer=layer, ratio=ratio)
    with method(model):
        got = logits(model, inputs)
    kept = set(torch.where(method.kept[0] & vis)[0].tolist())
    assert kept == want_kept and len(kept) == keep < int(vis.sum())
    assert method.stats[0]["stage3"] == {layer: keep}
    assert_one_drop_equals_masking(model, inputs, got, vis, kept, layer)


def test_dart_bad_settings_and_bench_names(tiny):
    from meteor_vlm.bench.accuracy import make_method, resolve_methods

    model, _ = tiny
    with pytest.raises(ValueError, match="ratio must be a ratio in"):
        mv.DART(ratio=-0.1)
    with pytest.raises(ValueError, match="layer must be"):
        mv.DART(layer=1.5)
    with pytest.raises(ValueError, match="image_pivots must be"):
        mv.DART(image_pivots=0)
    with pytest.raises(ValueError, match="text_pivots must be"):
        mv.DART(text_pivots=-1)
    with pytest.raises(ValueError, match="past the model's depth"), mv.DART(layer=model.num_llm_layers)(model):
        pass
    assert resolve_methods(["dart:k1-r0.875"]) == ["dart:k1-r0.875"]
    assert make_method("dart:k1-r0.875") == mv.DART(layer=1, ratio=0.875)
    assert mv.methods.get("dart") is mv.DART
