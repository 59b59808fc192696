"""SparseVLM on the shared runtime: text raters chosen on the input embeddings score the visual tokens at three
LLM layers, and the best of the dropped ones come back as cluster means at their centres' places. (No-op,
batch and cache oracles: test_oracles.py, with the other peers; that recycling at layer L is writing the
merged states and masking the rest: test_oracles.py too.)"""

import math

import pytest
import torch

import meteor_vlm as mv
from meteor_vlm.bench.accuracy import budget_method, resolve_methods

from .conftest import make_inputs
from .test_oracles import PROMPTS, logits


def plain_density_peaks(x, count, k):
    """DPC-kNN written out token by token."""
    n, d = x.shape
    dist = [[float(torch.linalg.vector_norm(x[i].double() - x[j].double())) / d**0.5 for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(v * v for v in sorted(dist[i])[:k]) / k) for i in range(n)]
    sep = []
    for i in range(n):
        denser = [dist[i][j] for j in range(n) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        sep.append(min(denser) if denser else max(max(r) for r in dist))
    score = [s * p for s, p in zip(sep, density)]
    centres = sorted(sorted(range(n), key=lambda i: (-score[i], i))[:count])
    assign = [min(range(count), key=lambda c: (dist[i][centres[c]], c)) for i in range(n)]
    for c, i in enumerate(centres):
        assign[i] = c
    return centres, assign


def test_density_peak_clusters_equal_a_plain_loop():
    gen = torch.Generator().manual_seed(0)
    blobs = torch.randn(4, 6, generator=gen) * 4
    x = blobs.repeat_interleave(5, 0) + 0.3 * torch.randn(20, 6, generator=gen)
    x[7] = x[3]  # a tie in density and distance
    for count, k in ((1, 1), (4, 4), (4, 2), (7, None), (20, 3)):
        centres, assign = mv.ops.density_peak_clusters(x, count, k)
        want_c, want_a = plain_density_peaks(x, count, k or count)
        assert centres.tolist() == want_c and assign.tolist() == want_a
    centres, assign = mv.ops.density_peak_clusters(x, 4)
    blob = [i // 5 if i != 7 else 0 for i in range(20)]  # token 7 was moved into blob 0
    assert sorted({int(assign[i]) for i in range(20) if blob[i] == g} for g in range(4)) == [{0}, {1}, {2}, {3}], "finds the blobs"
    for bad in ((0, None), (21, None), (3, 0), (3, 21)):
        with pytest.raises(ValueError):
            mv.ops.density_peak_clusters(x, *bad)


class Spy(mv.SparseVLM):
    """SparseVLM recording each context (hidden states, masks, positions) and its answer."""

    def prune_llm(self, ctx):
        answer = super().prune_llm(ctx)
        self.seen.append((ctx, ctx.hidden.clone(), answer))
        return answer


def plain_raters(ctx, hidden, b):
    """The raters of sample b: text tokens after the first image rated at least the mean."""
    vis = (ctx.visual[b] & ctx.valid[b]).nonzero()[:, 0].tolist()
    first = vis[0]
    text = [t for t in ctx.text_query_mask[b].nonzero()[:, 0].tolist() if t > first]
    h = hidden[b].double()
    rating = {t: 0.0 for t in text}
    for v in vis:
        logits = torch.stack([h[v] @ h[t] for t in text])
        for t, p in zip(text, torch.softmax(logits, 0).tolist()):
            rating[t] += p / len(vis)
    mean = sum(rating.values()) / len(text)
    return {int(ctx.positions[b, t]) for t in text if rating[t] >= mean - 1e-12}


@pytest.mark.parametrize("batch,prompts", [
    ([0], PROMPTS[:1]),
    ([0, (1, 2), 3], PROMPTS),
    ([4, 5], ["the circle in <image> is red ? what is in the image ?", "what <image> ?"]),  # text before the image
])
def test_each_stage_keeps_and_recycles_as_the_plain_rule_says(tiny, images, batch, prompts):
    model, processor = tiny
    imgs = [images[i] if isinstance(i, int) else [images[j] for j in i] for i in batch]
    method = Spy(keep=(0.6, 0.4, 0.2), recycle=0.5, cluster=0.25)
    method.seen = []
    with method(model):
        logits(model, make_inputs(processor, imgs, prompts))
    layers = method._layers(model.num_llm_layers)
    assert [c.layer_idx for c, _, _ in method.seen] == [0, *layers]
    ctx0, h0, answer0 = method.seen[0]
    assert answer0 is None, "layer 0 only chooses the raters"
    merged_any = False
    for j, (ctx, hidden, answer) in enumerate(method.seen[1:]):
        assert isinstance(answer, mv.methods.LLMMerge)
        for b in range(len(imgs)):
            raters = plain_raters(ctx0, h0, b)
            assert len(raters) >= 1
            cols = [t for t in range(ctx.valid.shape[1]) if ctx.valid[b, t] and not ctx.visual[b, t]
                    and int(ctx.positions[b, t]) in raters]
            assert len(cols) == len(raters), "the raters are found again after compaction"
            with torch.no_grad():
                rows = torch.cat([ctx.attention_rows(torch.tensor([[c] * len(imgs)]).T)[b] for c in cols], 1)  # (H, R, T)
            score = rows.mean(0).mean(0)
            vis = [t for t in range(ctx.valid.shape[1]) if ctx.valid[b, t] and ctx.visual[b, t]]
            k = min(round(method.keep[j] * int(ctx.llm_visual_tokens[b])), len(vis))
            ranked = sorted(vis, key=lambda t: (-float(score[t]), t))
            keep, dropped = set(ranked[:k]), ranked[k:]
            assert {t for t in vis if answer.keep[b, t]} == keep
            assert all(answer.keep[b, t] for t in range(ctx.valid.shape[1]) if ctx.valid[b, t] and not ctx.visual[b, t])
            recycled = dropped[: math.ceil(0.5 * len(dropped))]
            at = [a for a in answer.at[b].tolist() if a >= 0]
            if not recycled:
                assert at == []
                continue
            count = math.ceil(0.25 * len(recycled))
            order = sorted(recycled)
            centres, assign = mv.ops.density_peak_clusters(hidden[b, order], count)
            assert at == [order[c] for c in centres.tolist()]
            for m in range(count):
                members = [order[i] for i in range(len(order)) if assign[i] == m]
                torch.testing.assert_close(answer.merged[b, m], hidden[b, members].mean(0), atol=1e-6, rtol=1e-6)
            merged_any = True
    assert merged_any
    # the stats count the recycled tokens: each layer from a stage on sees kept + merged
    for b, s in enumerate(method.stats):
        for (ctx, _, answer), layer in zip(method.seen[1:], layers):
            assert s["stage3"][layer] == int(answer.keep[b][ctx.visual[b] & ctx.valid[b]].sum() + (answer.at[b] >= 0).sum())


def test_without_recycling_it_is_a_plain_drop(tiny, images):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0], images[1]], PROMPTS[:2])
    method = Spy(recycle=0.0)
    method.seen = []
    with method(model):
        logits(model, inputs)
    assert all(isinstance(a, torch.Tensor) for _, _, a in method.seen[1:])


def test_settings_names_and_errors(tiny):
    model, _ = tiny
    assert mv.SparseVLM.scaled_layers(32) == (3, 7, 16)
    assert mv.SparseVLM.scaled_layers(8) == (1, 2, 4)
    assert mv.SparseVLM.scaled_layers(6) == (1, 2, 3)  # each at least one after the previous
    with pytest.raises(ValueError, match="too shallow"):
        mv.SparseVLM.scaled_layers(3)
    m = budget_method("sparsevlm:k0.3-0.2-0.1-r0.4")
    assert isinstance(m, mv.SparseVLM) and m.keep == (0.3, 0.2, 0.1) and m.recycle == 0.4
    assert budget_method("sparsevlm:k0.5-0.25-0.125").recycle == 0.3
    assert resolve_methods(["sparsevlm:k0.3-0.2-0.1"])
    for bad, match in (
        (dict(keep=(1.5, 0.2, 0.1)), "keep"),
        (dict(keep=(0.5, 0.2)), "pass layers"),
        (dict(keep=(0.5, 0.2), layers=(1, 2, 3)), "2 keep shares"),
        (dict(layers=(3, 2, 4)), "increasing"),
        (dict(recycle=-0.1), "recycle"),
        (dict(cluster=0.0), "cluster"),
        (dict(keep=()), "at least one"),
    ):
        with pytest.raises(ValueError, match=match):
            mv.SparseVLM(**bad)
    with pytest.raises(ValueError, match="past the model's depth"):
        with mv.SparseVLM(keep=(0.5,), layers=(9,))(model):
            pass
