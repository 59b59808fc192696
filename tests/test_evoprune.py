"""EvoPrune on the shared runtime: pruned during encoding on a geometric schedule, the choice equals a plain
reference (rank mix, candidate pool, greedy max-min), dropped tokens merged size-weighted into kept ones,
every patch accounted for once. (No-op, batch and cache oracles: test_oracles.py, with the other peers.)"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import meteor_vlm as mv

from .conftest import make_inputs
from .test_divprune import plain_max_min
from .test_oracles import PROMPTS, logits


def plain_merge_into_kept(x, metric, size, kept):
    """Each token not kept joins its most cosine-similar kept token (first on ties); a kept token becomes
    its group's size-weighted mean. Returns {kept index: (members, merged)}."""
    targets = [i for i in range(len(x)) if kept[i]]
    groups = {t: [t] for t in targets}
    for i in range(len(x)):
        if not kept[i]:
            sims = [float(F.cosine_similarity(metric[i], metric[t], dim=0)) for t in targets]
            groups[targets[sims.index(max(sims))]].append(i)
    out = {}
    for t, members in groups.items():
        w = size[members].double()
        out[t] = (sorted(members), (w[:, None] * x[members].double()).sum(0) / w.sum())
    return out


def test_merge_into_kept_equals_a_plain_loop():
    gen = torch.Generator().manual_seed(0)
    x, metric = torch.randn(2, 20, 5, generator=gen), torch.randn(2, 20, 3, generator=gen)
    size = torch.randint(1, 5, (2, 20), generator=gen).float()
    kept = torch.zeros(2, 20, dtype=torch.bool)
    kept[0, [0, 4, 5, 11, 19]] = True
    kept[1, torch.randperm(20, generator=gen)[:5]] = True
    merged, group = mv.ops.merge_into_kept(x, metric, size, kept)
    assert merged.shape == (2, 5, 5)
    for b in range(2):
        want = plain_merge_into_kept(x[b], metric[b], size[b], kept[b])
        for j, t in enumerate(sorted(want)):
            members, mean = want[t]
            assert torch.where(group[b] == j)[0].tolist() == members
            torch.testing.assert_close(merged[b, j].double(), mean, atol=1e-6, rtol=1e-6)
            if members == [t]:  # a kept token that took in nothing is left exactly as it was
                assert torch.equal(merged[b, j], x[b, t])
    assert any(len(m) == 1 for m, _ in plain_merge_into_kept(x[0], metric[0], size[0], kept[0]).values())
    with pytest.raises(ValueError, match="at least one kept"):
        mv.ops.merge_into_kept(x, metric, size, torch.zeros(2, 20, dtype=torch.bool))


def rank_share(v):
    """Rank of each value in the row (ties: earlier lower), scaled to [0, 1]."""
    order = sorted(range(len(v)), key=lambda i: (v[i], i))
    share = np.empty(len(v))
    share[order] = np.arange(len(v)) / max(len(v) - 1, 1)
    return share


def plain_choice(importance, metric, n, alpha, candidates):
    """EvoPrune's choice for one row, in numpy float64: rank mix, the pool of the best ceil(candidates * n)
    (ties: earlier), greedy max-min diversity within it."""
    u = metric / np.linalg.norm(metric, axis=1, keepdims=True)
    redundancy = (u @ u.T).sum(1) - 1.0  # summed cosine similarity to the other tokens
    score = (1 - alpha) * rank_share(importance) + alpha * rank_share(-redundancy)
    size = min(len(score), int(np.ceil(candidates * n)))
    pool = sorted(range(len(score)), key=lambda i: (-score[i], i))[:size]
    valid = np.zeros(len(score), bool)
    valid[pool] = True
    return plain_max_min(metric, n, valid)


def encode_watching_blocks(model, pixels, method, make_hook):
    """encode_images under `method` with make_hook(expert name, block index) as a forward pre-hook (with
    kwargs) on every expert block; the hooks are removed afterwards."""
    hooks = [block.register_forward_pre_hook(make_hook(r.spec.name, i), with_kwargs=True)
             for r in model.runners for i, block in enumerate(r.blocks)]
    try:
        with torch.no_grad(), method(model):
            return model.encode_images(pixels, method)
    finally:
        for h in hooks:
            h.remove()


class RecordingEvoPrune(mv.EvoPrune):
    """EvoPrune that records, at each point where it prunes, what it saw and what it answered."""

    def prune_encoder(self, ctx):
        answer = super().prune_encoder(ctx)
        if answer is not None:
            if ctx.block is None:
                importance, metric = -mv.ops.mean_similarity(ctx.patches), ctx.patches
            else:
                importance = ctx.cls_attention() if ctx.has_cls else ctx.received_attention()
                metric = ctx.patch_keys().mean(1)
            self.seen.append((ctx.expert, ctx.point, ctx.patches, ctx.size.clone(), importance, metric, answer))
        return answer


@pytest.mark.parametrize("keep, candidates", [(0.3, 1.0), (0.2, 1.5)])  # pool = target: diversity idle; a wider pool
def test_evoprune_prunes_during_encoding_and_its_choice_equals_a_plain_reference(tiny, images, keep, candidates):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0], images[1]], PROMPTS[:2])
    pixels = {k[len("pixel_values_"):]: v for k, v in inputs.items() if k.startswith("pixel_values_")}
    method = RecordingEvoPrune(keep=keep, alpha=0.4, candidates=candidates)
    method.seen = []
    lengths = {}  # expert -> the token counts its blocks ran on
    visual = encode_watching_blocks(model, pixels, method, lambda name, i: lambda module, args, kwargs: lengths.setdefault(
        name, []).append(args[0].shape[1]))
    for e, runner in enumerate(model.runners):
        name, n0, cls = runner.spec.name, runner.num_patches, int(runner.has_cls)
        calls = [s for s in method.seen if s[0] == name]
        if runner.num_blocks:  # a ViT: pruned after each of its three blocks, down to n0 * keep^(j/3)
            targets = [round(n0 * keep ** (j / 3)) for j in (1, 2, 3)]
            assert [c[1] for c in calls] == [0, 1, 2]
            assert lengths[name] == [n0 + cls, targets[0] + cls, targets[1] + cls], "the later blocks run on fewer tokens"
        else:  # a CNN: once, at its output
            targets = [round(n0 * keep)]
            assert len(calls) == 1
        for (_, _, patches, size, importance, metric, answer), n in zip(calls, targets):
            assert answer.keep.shape[1] == 0 and answer.merged.shape[1] == n
            for b in range(2):
                want = plain_choice(importance[b].double().numpy(), metric[b].double().numpy(), n, 0.4, candidates)
                assert answer.at[b].tolist() == sorted(want)
                kept = torch.zeros(patches.shape[1], dtype=torch.bool)
                kept[sorted(want)] = True
                merged = plain_merge_into_kept(patches[b], metric[b], size[b], kept)
                for j, t in enumerate(sorted(want)):
                    assert torch.where(answer.group[b] == j)[0].tolist() == merged[t][0]
                    torch.testing.assert_close(answer.merged[b, j].double(), merged[t][1], atol=1e-5, rtol=1e-5)
        # what reaches fusion: the last target's count, increasing grid positions, sizes adding up to n0
        mine = visual.expert[0] == e
        assert int(mine.sum()) == targets[-1]
        assert torch.equal(visual.size[:, mine].sum(1), torch.full((2,), float(n0)))
        grid = visual.grid_index[:, mine]
        assert (grid[:, 1:] > grid[:, :-1]).all()
    assert any(s[3].max() > 1 for s in method.seen), "a later point saw merged sizes"


def test_evoprune_without_merging_drops_and_keeps_sizes_at_one(tiny, images):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0]], PROMPTS[:1])
    pixels = {k[len("pixel_values_"):]: v for k, v in inputs.items() if k.startswith("pixel_values_")}
    with torch.no_grad(), mv.EvoPrune(keep=0.3)(model) as merging:
        merged = model.encode_images(pixels, merging)
    with torch.no_grad(), mv.EvoPrune(keep=0.3, merge=False)(model) as dropping:
        dropped = model.encode_images(pixels, dropping)
    assert dropped.features.shape == merged.features.shape
    assert (dropped.size == 1).all() and merged.size.sum() > dropped.size.sum()


@pytest.mark.parametrize("proportional", [False, True])
def test_evoprune_weighs_merged_tokens_by_size_only_when_asked(tiny, images, proportional):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0]], PROMPTS[:1])
    pixels = {k[len("pixel_values_"):]: v for k, v in inputs.items() if k.startswith("pixel_values_")}
    method = RecordingEvoPrune(keep=0.3, proportional_attention=proportional)
    method.seen = []
    masks = {}
    encode_watching_blocks(model, pixels, method, lambda name, i: lambda module, args, kwargs: masks.__setitem__(
        (name, i), kwargs.get("attention_mask")))
    clip = model.runners[0]  # with CLS: the bias of CLS is 0
    sizes = [s[3] for s in method.seen if s[0] == clip.spec.name]  # the sizes blocks 0, 1, 2 ran on
    assert masks[(clip.spec.name, 0)] is None
    for block in (1, 2):
        if proportional:
            bias = torch.cat([torch.zeros(1, 1), sizes[block].log()], 1)
            torch.testing.assert_close(masks[(clip.spec.name, block)], bias[:, None, None, :])
        else:
            assert masks[(clip.spec.name, block)] is None


def test_evoprune_points_choose_where_it_prunes(tiny, images):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0]], PROMPTS[:1])
    pixels = {k[len("pixel_values_"):]: v for k, v in inputs.items() if k.startswith("pixel_values_")}
    method = RecordingEvoPrune(keep=0.25, points=(0, 2))
    method.seen = []
    with torch.no_grad(), method(model):
        model.encode_images(pixels, method)
    clip = model.runners[0]
    n0 = clip.num_patches
    assert [(s[1], s[-1].merged.shape[1]) for s in method.seen if s[0] == clip.spec.name] == [
        (0, round(n0 * 0.5)), (2, round(n0 * 0.25))]


def test_evoprune_rank_allocation_follows_meteors_stage1_plan(tiny, images):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0], images[1]], PROMPTS[:2])
    pixels = {k[len("pixel_values_"):]: v for k, v in inputs.items() if k.startswith("pixel_values_")}
    meteor = mv.Meteor(encoder_keep=0.3, fusion=False, llm=False)
    meteor.setup(model)
    plan = meteor._plan["encoder"]
    assert len({tuple(steps) for steps in plan.values()}) == 3 and plan["clip"][-1] != round(0.3 * 16)
    method = RecordingEvoPrune(keep=0.3, allocation="rank")
    method.seen = []
    with torch.no_grad(), method(model):
        visual = model.encode_images(pixels, method)
    for e, runner in enumerate(model.runners):
        counts = [s[-1].merged.shape[1] for s in method.seen if s[0] == runner.spec.name]
        assert counts == plan[runner.spec.name]
        assert int((visual.expert[0] == e).sum()) == plan[runner.spec.name][-1]
    bare, _ = mv.testing.tiny_model(seed=0)  # no rank table
    with pytest.raises(ValueError, match="allocation='rank' needs a rank table"), method(bare):
        pass


def test_evoprune_bad_settings_and_bench_names(tiny, images):
    from meteor_vlm.bench.accuracy import make_method, resolve_methods

    model, processor = tiny
    for kwargs, message in (
        (dict(keep=1.5), "keep must be a ratio in"),
        (dict(keep=0.0), "keep must be > 0"),
        (dict(alpha=-0.1), "alpha must be a ratio in"),
        (dict(points=(2, 0)), "points must be distinct, increasing"),
        (dict(points=(0, 3)), "points must be distinct, increasing"),
        (dict(points=()), "points must be distinct, increasing"),
        (dict(candidates=0.5), "candidates must be >= 1"),
        (dict(allocation="average"), "unknown allocation 'average'"),
    ):
        with pytest.raises(ValueError, match=message):
            mv.EvoPrune(**kwargs)
    inputs = make_inputs(processor, [images[0]], PROMPTS[:1])
    with pytest.raises(ValueError, match="keeps no token"), mv.EvoPrune(keep=0.001)(model):
        logits(model, inputs)
    assert resolve_methods(["evoprune:keep0.23"]) == ["evoprune:keep0.23"]
    assert make_method("evoprune:keep0.23") == mv.EvoPrune(keep=0.23)
    assert make_method("evoprune:keep0.23-rank") == mv.EvoPrune(keep=0.23, allocation="rank")
    assert mv.methods.get("evoprune") is mv.EvoPrune
