"""FastV on the shared runtime: its choice = the eager attention map's, its drop = masking, cache and batch oracles."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import meteor_vlm as mv

from .conftest import make_inputs
from .test_oracles import PROMPTS, assert_one_drop_equals_masking, logits


class RecordingFastV(mv.FastV):
    """FastV that keeps the mask it returned (for the test to compare)."""

    def prune_llm(self, ctx):
        self.kept = super().prune_llm(ctx)
        return self.kept


def eager_last_row(model, inputs, layer):
    """Head-averaged attention of the last prompt token at `layer` of an eager copy of the unpruned LLM
    (batch 1, no padding: positions 0..T-1), over the spliced sequence; and which columns are visual."""
    lm_sdpa = model.language_model
    cfg = lm_sdpa.config.__class__(**lm_sdpa.config.to_dict())
    cfg._attn_implementation = "eager"
    lm = AutoModelForCausalLM.from_config(cfg)
    lm.load_state_dict(lm_sdpa.state_dict())
    pixels = {k[len("pixel_values_"):]: v for k, v in inputs.items() if k.startswith("pixel_values_")}
    with torch.no_grad():
        visual = model.encode_images(pixels)
        embeds, valid, vis, _, _, _ = model._splice(inputs["input_ids"], inputs["attention_mask"].bool(), visual)
        assert valid.all()
        att = lm(inputs_embeds=embeds, output_attentions=True).attentions[layer]  # (1, H, T, T)
    return att[0, :, -1].mean(0), vis[0]


@pytest.mark.parametrize("layer,ratio", [(1, 0.75), (3, 0.5)])
def test_fastv_keeps_the_most_attended_tokens_and_its_drop_equals_masking(tiny, images, layer, ratio):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0]], PROMPTS[:1])
    row, vis = eager_last_row(model, inputs, layer)
    n = int(vis.sum())
    keep = round((1 - ratio) * n)
    want_kept = set(torch.where(vis)[0][row[vis].topk(keep).indices].tolist())
    method = RecordingFastV(layer=layer, ratio=ratio)
    with method(model):
        got = logits(model, inputs)
    kept = set(torch.where(method.kept[0] & vis)[0].tolist())
    assert kept == want_kept and len(kept) == keep < n
    assert method.stats[0]["stage3"] == {layer: keep}
    assert_one_drop_equals_masking(model, inputs, got, vis, kept, layer)


def test_fastv_bad_settings_and_bench_names(tiny):
    from meteor_vlm.bench.accuracy import make_method, resolve_methods

    model, _ = tiny
    with pytest.raises(ValueError, match="ratio must be a ratio in"):
        mv.FastV(ratio=1.5)
    with pytest.raises(ValueError, match="layer must be"):
        mv.FastV(layer=-1)
    with pytest.raises(ValueError, match="past the model's depth"), mv.FastV(layer=model.num_llm_layers)(model):
        pass
    assert resolve_methods(["fastv:k1-r0.875"]) == ["fastv:k1-r0.875"]
    assert make_method("fastv:k1-r0.875") == mv.FastV(layer=1, ratio=0.875)
    assert mv.methods.get("fastv") is mv.FastV
    assert [mv.FastV.scaled_layer(n) for n in (32, 8, 6, 1)] == [2, 1, 0, 0]
