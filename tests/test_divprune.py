"""DivPrune on the shared runtime: greedy max-min diversity = a plain reference, on the projected tokens."""

import numpy as np
import pytest
import torch

import meteor_vlm as mv

from .conftest import make_inputs
from .test_oracles import PROMPTS, logits


def plain_max_min(z, k, valid):
    """The greedy max-min diversity choice of one row, written as loops over numpy float64 (ties: earlier)."""
    u = z / np.linalg.norm(z, axis=1, keepdims=True)
    d = 1.0 - u @ u.T
    cand = [i for i in range(len(z)) if valid[i]]
    chosen = [max(cand, key=lambda i: (min(d[i, j] for j in cand if j != i), -i))]
    while len(chosen) < k:
        chosen.append(max((i for i in cand if i not in chosen), key=lambda i: (min(d[i, j] for j in chosen), -i)))
    return set(chosen)


def test_max_min_diverse_equals_the_plain_greedy_choice_per_row():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 30, 6, generator=gen)
    valid = torch.rand(3, 30, generator=gen) > 0.2
    k = torch.tensor([5, 1, 12])
    got = mv.ops.max_min_diverse(z, k, valid)
    assert got.sum(1).tolist() == k.tolist() and not (got & ~valid).any()
    for b in range(3):
        assert set(torch.where(got[b])[0].tolist()) == plain_max_min(z[b].double().numpy(), int(k[b]), valid[b].numpy())
    with pytest.raises(ValueError, match="budget"):
        mv.ops.max_min_diverse(z, int(valid.sum(1).min()) + 1, valid)


def test_divprune_feeds_the_llm_the_diverse_projected_tokens(tiny, images):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0]], PROMPTS[:1])
    pixels = {k[len("pixel_values_"):]: v for k, v in inputs.items() if k.startswith("pixel_values_")}
    method = mv.DivPrune(keep=0.3)
    with torch.no_grad():
        full = model.encode_images(pixels)
        with method(model):
            pruned = model.encode_images(pixels, method)
            logits(model, inputs)
    n = full.features.shape[1]
    want = sorted(plain_max_min(full.features[0].double().numpy(), round(0.3 * n), np.ones(n, bool)))
    assert pruned.features.shape[1] == len(want) < n
    # the same tokens, in their original order: provenance and features
    assert pruned.expert[0].tolist() == full.expert[0, want].tolist()
    assert pruned.grid_index[0].tolist() == full.grid_index[0, want].tolist()
    torch.testing.assert_close(pruned.features[0], full.features[0, want])
    assert method.stats[0]["fusion_tokens"] == len(want)


def test_divprune_bad_settings_and_bench_names(tiny, images):
    from meteor_vlm.bench.accuracy import make_method, resolve_methods

    model, processor = tiny
    with pytest.raises(ValueError, match="keep must be a ratio in"):
        mv.DivPrune(keep=1.5)
    with pytest.raises(ValueError, match="tokens must be a positive int"):
        mv.DivPrune(tokens=0)
    inputs = make_inputs(processor, [images[0]], PROMPTS[:1])
    with pytest.raises(ValueError, match="larger than|between 1 and"), mv.DivPrune(tokens=10**6)(model):
        logits(model, inputs)
    assert resolve_methods(["divprune:keep0.23"]) == ["divprune:keep0.23"]
    assert make_method("divprune:keep0.23") == mv.DivPrune(keep=0.23)
    assert mv.methods.get("divprune") is mv.DivPrune
