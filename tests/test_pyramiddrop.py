"""PyramidDrop on the shared runtime: its first choice = the eager attention map's, its schedule, cache and batch oracles."""

import pytest
import torch

import meteor_vlm as mv

from .conftest import make_inputs
from .test_fastv import eager_last_row
from .test_oracles import PROMPTS


class RecordingPyramidDrop(mv.PyramidDrop):
    """PyramidDrop that keeps the masks it returned, by layer."""

    def prune_llm(self, ctx):
        kept = super().prune_llm(ctx)
        self.kept = {**getattr(self, "kept", {}), ctx.layer_idx: kept}
        return kept


def test_pyramiddrop_keeps_a_geometric_share_chosen_by_the_last_token(tiny, images):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0]], PROMPTS[:1])
    layers = mv.methods.scaled_llm_layers(model.num_llm_layers, (8, 16, 24))
    assert layers == (2, 3, 5)  # 8/16/24 of 32 on this 6-layer model
    method = RecordingPyramidDrop(ratio=0.5)
    with method(model), torch.no_grad():
        model(**inputs, use_cache=False)
    n = method.stats[0]["fusion_tokens"]
    assert method.stats[0]["stage3"] == {2: round(n / 2), 3: round(n / 4), 5: round(n / 8)}
    assert method.stats[0]["tokens_per_layer"] == [n, n, round(n / 2), round(n / 4), round(n / 4), round(n / 8)]
    # the first stage ranks by the unpruned model's own last-token attention at that layer (eager copy)
    row, vis = eager_last_row(model, inputs, layers[0])
    want = set(torch.where(vis)[0][row[vis].topk(round(n / 2)).indices].tolist())
    assert set(torch.where(method.kept[layers[0]][0] & vis)[0].tolist()) == want  # at its first layer columns are still the original ones


def test_pyramiddrop_bad_settings_and_bench_names(tiny):
    from meteor_vlm.bench.accuracy import make_method, resolve_methods

    model, _ = tiny
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="ratio must be in"):
            mv.PyramidDrop(ratio=bad)
    with pytest.raises(ValueError, match="distinct and increasing"):
        mv.PyramidDrop(layers=(3, 1))
    with pytest.raises(ValueError, match="past the model's depth"), mv.PyramidDrop(layers=(1, 9))(model):
        pass
    assert resolve_methods(["pyramiddrop:r0.5"]) == ["pyramiddrop:r0.5"]
    assert make_method("pyramiddrop:r0.5") == mv.PyramidDrop(ratio=0.5)
    assert mv.methods.get("pyramiddrop") is mv.PyramidDrop
