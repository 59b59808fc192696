"""PruMerge(+) on the shared runtime: each image keeps its own count of tokens (interquartile outliers of
the attention plus evenly spread cells), each kept token the weighted mean of itself and its nearest
neighbours; images that keep fewer travel with empty slots, which never reach the LLM. (No-op, batch and
cache oracles: test_oracles.py, with the other peers; their batch mixes images that keep different counts.)"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import meteor_vlm as mv

from .conftest import make_inputs
from .test_oracles import PROMPTS, logits

ORACLE_IMAGES = (0, (1, 2), 3)  # the batch test_oracles.py runs the peers on


def plain_outliers(scores, whisker=1.5):
    q1, q3 = np.percentile(scores, [25, 75])
    return scores > q3 + whisker * (q3 - q1)


def plain_cells(n, uniform):
    m = round(uniform * n)
    return {(2 * i + 1) * n // (2 * m) for i in range(m)}


def plain_supplement(x, metric, weight, i, k):
    """Token i as the weight-averaged mean of itself and its k most cosine-similar others (first on ties)."""
    sims = [float(F.cosine_similarity(metric[i].double(), metric[j].double(), dim=0)) for j in range(len(x))]
    others = sorted((j for j in range(len(x)) if j != i), key=lambda j: (-sims[j], j))[:k]
    members = [i] + others
    w = weight[members].double()
    return (w[:, None] * x[members].double()).sum(0) / w.sum()


def test_iqr_outliers_and_padded_indices_equal_plain_loops():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 50, generator=gen).exp()  # heavy upper tail
    scores[2] = 1.0  # flat: no outlier
    for whisker in (0.0, 1.5, 3.0):
        got = mv.ops.iqr_outliers(scores, whisker)
        for b in range(4):
            assert got[b].tolist() == plain_outliers(scores[b].double().numpy(), whisker).tolist()
    assert not mv.ops.iqr_outliers(scores)[2].any() and mv.ops.iqr_outliers(scores).sum(1).unique().numel() > 1
    with pytest.raises(ValueError, match="whisker"):
        mv.ops.iqr_outliers(scores, -1.0)
    keep = torch.rand(3, 9, generator=gen) > 0.5
    keep[1] = False
    idx = mv.ops.mask_to_padded_indices(keep)
    width = int(keep.sum(1).max())
    for b in range(3):
        want = torch.where(keep[b])[0].tolist()
        assert idx[b].tolist() == want + [-1] * (width - len(want))


def test_supplement_from_neighbours_equals_a_plain_loop():
    gen = torch.Generator().manual_seed(1)
    x, metric = torch.randn(2, 16, 5, generator=gen), torch.randn(2, 16, 3, generator=gen)
    weight = torch.rand(2, 16, generator=gen)
    kept = torch.zeros(2, 16, dtype=torch.bool)
    kept[0, [0, 3, 15]] = True
    kept[1, [2, 4, 5, 6, 9, 10, 11]] = True  # neighbourhoods overlap, and include kept tokens
    for k in (0, 3, 15):
        out = mv.ops.supplement_from_neighbours(x, metric, weight, kept, k)
        for b in range(2):
            for i in range(16):
                if kept[b, i]:
                    torch.testing.assert_close(out[b, i].double(), plain_supplement(x[b], metric[b], weight[b], i, k))
                else:
                    assert torch.equal(out[b, i], x[b, i])
    assert torch.equal(mv.ops.supplement_from_neighbours(x, metric, weight, kept, 0)[kept], x[kept])
    with pytest.raises(ValueError, match="neighbours"):
        mv.ops.supplement_from_neighbours(x, metric, weight, kept, 16)
    with pytest.raises(ValueError, match=">= 0"):
        mv.ops.supplement_from_neighbours(x, metric, -weight, kept, 2)


class RecordingPruMerge(mv.PruMerge):
    """PruMerge that keeps, per expert, its context and what it answered."""

    def prune_encoder(self, ctx):
        answer = super().prune_encoder(ctx)
        self.seen[ctx.expert] = (ctx, answer)
        return answer


def run_recording(model, processor, images, method):
    imgs = [images[i] if isinstance(i, int) else [images[j] for j in i] for i in ORACLE_IMAGES]
    inputs = make_inputs(processor, imgs, PROMPTS)
    pixels = {k[len("pixel_values_"):]: v for k, v in inputs.items() if k.startswith("pixel_values_")}
    method.seen = {}
    with torch.no_grad(), method(model):
        visual = model.encode_images(pixels, method)
        logits(model, inputs)
    return visual, method


@pytest.mark.parametrize("uniform,cnn_mix", [(0.0, False), (0.2, False), (0.2, True)])
def test_prumerge_keeps_outliers_and_even_cells_per_image_each_mixed_with_its_neighbours(tiny, images, uniform, cnn_mix):
    model, processor = tiny
    method = RecordingPruMerge(uniform=uniform, whisker=0.25, neighbours=0.1, cnn_mix=cnn_mix)
    visual, method = run_recording(model, processor, images, method)
    counts_differ = False
    per_image = {}
    for e, runner in enumerate(model.runners):
        ctx, answer = method.seen[runner.spec.name]
        n = runner.num_patches
        assert ctx.block in (None, runner.num_blocks - 1)  # at the expert's output only
        importance = ctx.importance()
        weight = importance if ctx.block is not None else torch.ones_like(importance)
        k = round(0.1 * n) if ctx.block is not None or cnn_mix else 0  # a CNN's tokens unmixed unless asked
        counts = []
        for b in range(importance.shape[0]):
            want = set(np.where(plain_outliers(importance[b].double().numpy(), 0.25))[0].tolist()) | plain_cells(n, uniform)
            want = want or {int(importance[b].argmax())}
            at = answer.at[b]
            assert at[at >= 0].tolist() == sorted(want) and (at[len(want):] == -1).all()
            for slot, i in enumerate(sorted(want)):
                assert answer.group[b, i] == slot
                torch.testing.assert_close(answer.merged[b, slot].double(),
                                           plain_supplement(ctx.patches[b], ctx.merge_metric()[b], weight[b], i, k),
                                           atol=1e-5, rtol=1e-5)
                if k == 0:
                    assert torch.equal(answer.merged[b, slot], ctx.patches[b, i])
            assert int((answer.group[b] >= 0).sum()) == len(want)
            # what reaches fusion: exactly those tokens, at their cells in order, then empty slots
            mine = (visual.expert[b] == e) & visual.mask[b]
            assert visual.grid_index[b, mine].tolist() == sorted(want)
            assert not visual.mask[b, visual.expert[b] == e][len(want):].any()
            counts.append(len(want))
        counts_differ |= len(set(counts)) > 1
        per_image[runner.spec.name] = counts
    assert counts_differ, "the batch holds images that keep different counts"
    # the stats count each sample's images: the second prompt holds images 1 and 2
    owners = [0, 1, 1, 2]
    for s, stats in enumerate(method.stats):
        for name, counts in per_image.items():
            assert stats["stage1"][name] == sum(c for c, o in zip(counts, owners) if o == s)
        assert stats["fusion_tokens"] == sum(stats["stage1"].values())


def test_prumerge_with_no_outlier_keeps_each_images_most_important_token(tiny, images):
    model, processor = tiny
    visual, method = run_recording(model, processor, images, RecordingPruMerge(uniform=0.0, whisker=1e9))
    for e, runner in enumerate(model.runners):
        ctx, answer = method.seen[runner.spec.name]
        assert answer.at.shape[1] == 1
        assert answer.at[:, 0].tolist() == ctx.importance().argmax(1).tolist()
    assert all(s["fusion_tokens"] == len(model.runners) * s["images"] for s in method.stats)


def test_prumerge_bad_settings_and_bench_names():
    from meteor_vlm.bench.accuracy import make_method, resolve_methods

    for bad in (dict(uniform=1.5), dict(neighbours=-0.1)):
        with pytest.raises(ValueError, match="must be a ratio in"):
            mv.PruMerge(**bad)
    with pytest.raises(ValueError, match="whisker"):
        mv.PruMerge(whisker=-1)
    assert resolve_methods(["prumerge:uniform0.2", "prumerge:uniform0"]) == ["prumerge:uniform0.2", "prumerge:uniform0"]
    assert make_method("prumerge:uniform0.2") == mv.PruMerge(uniform=0.2)
    assert make_method("prumerge:uniform0") == mv.PruMerge(uniform=0.0)
    assert make_method("prumerge:uniform0.2-n0.01-cnnmix") == mv.PruMerge(uniform=0.2, neighbours=0.01, cnn_mix=True)
    assert make_method("prumerge:uniform0.2-cnnmix") == mv.PruMerge(uniform=0.2, cnn_mix=True)
    assert mv.methods.get("prumerge") is mv.PruMerge
