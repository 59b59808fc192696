"""VisionZip on the shared runtime: dominant tokens by attention, contextual tokens = plain means of their
groups, every patch accounted for once; sizes and grid positions reach the LLM. (No-op, batch and cache
oracles: test_oracles.py, with the other peers.)"""

import pytest
import torch
import torch.nn.functional as F

import meteor_vlm as mv

from .conftest import make_inputs
from .test_oracles import PROMPTS, logits


def plain_merge(x, metric, rest_cols, count):
    """Targets every (R // count)-th rest token; each other rest token joins its most cosine-similar target
    (first on ties); a merged token is its group's mean. Returns [(target, group, mean)]."""
    step = len(rest_cols) // count
    targets = [rest_cols[i * step] for i in range(count)]
    groups = {t: [t] for t in targets}
    for c in rest_cols:
        if c not in groups:
            sims = [float(F.cosine_similarity(metric[c], metric[t], dim=0)) for t in targets]
            groups[targets[sims.index(max(sims))]].append(c)
    return [(t, sorted(groups[t]), x[groups[t]].mean(0)) for t in targets]


def test_merge_into_targets_equals_a_plain_loop():
    gen = torch.Generator().manual_seed(0)
    x, metric = torch.randn(2, 20, 5, generator=gen), torch.randn(2, 20, 3, generator=gen)
    rest = torch.zeros(2, 20, dtype=torch.bool)
    rest[0, 3:16] = True
    rest[1, torch.randperm(20, generator=gen)[:13]] = True
    merged, at, group = mv.ops.merge_into_targets(x, metric, rest, 4)
    for b in range(2):
        want = plain_merge(x[b], metric[b], torch.where(rest[b])[0].tolist(), 4)
        assert at[b].tolist() == [t for t, _, _ in want]
        for j, (_, members, mean) in enumerate(want):
            assert torch.where(group[b] == j)[0].tolist() == members
            torch.testing.assert_close(merged[b, j], mean)
        assert ((group[b] >= 0) == rest[b]).all()
    with pytest.raises(ValueError, match="count"):
        mv.ops.merge_into_targets(x, metric, rest, 14)


class RecordingVisionZip(mv.VisionZip):
    """VisionZip that keeps, per expert, the tokens it saw and what it answered."""

    def prune_encoder(self, ctx):
        answer = super().prune_encoder(ctx)
        if answer is not None:
            self.seen[ctx.expert] = (ctx.patches, answer)
        return answer


def test_visionzip_hands_on_dominant_and_contextual_tokens(tiny, images):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0]], PROMPTS[:1])
    pixels = {k[len("pixel_values_"):]: v for k, v in inputs.items() if k.startswith("pixel_values_")}
    method = RecordingVisionZip(keep=0.5, contextual=0.25)
    method.seen = {}
    with torch.no_grad(), method(model):
        visual = model.encode_images(pixels, method)
        logits(model, inputs)
    for e, runner in enumerate(model.runners):
        n, name = runner.num_patches, runner.spec.name
        patches, answer = method.seen[name]
        k = round(0.5 * n)
        contextual = round(0.25 * k)
        assert answer.keep.shape[1] == k - contextual and answer.merged.shape[1] == contextual
        # every patch is dominant or in exactly one group; each contextual token is its group's mean
        in_group = answer.group[0] >= 0
        assert not in_group[answer.keep[0]].any() and int(in_group.sum()) == n - (k - contextual)
        for j in range(contextual):
            members = torch.where(answer.group[0] == j)[0]
            assert answer.at[0, j] in members
            torch.testing.assert_close(answer.merged[0, j], patches[0, members].mean(0))
        # what reaches fusion: k tokens of that expert, at increasing grid positions, sizes adding up to n
        mine = visual.expert[0] == e
        assert int(mine.sum()) == k == method.stats[0]["stage1"][name]
        assert visual.size[0, mine].sum() == n and visual.size[0, mine].max() > 1
        grid = visual.grid_index[0, mine]
        assert (grid[1:] > grid[:-1]).all()
        assert set(grid.tolist()) == set(answer.keep[0].tolist()) | set(answer.at[0].tolist())


def test_visionzip_dominant_tokens_are_the_most_attended(tiny, images):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0]], PROMPTS[:1])
    pixels = {k[len("pixel_values_"):]: v for k, v in inputs.items() if k.startswith("pixel_values_")}
    scores = {}

    class Scores(mv.VisionZip):
        def prune_encoder(self, ctx):
            answer = super().prune_encoder(ctx)
            if answer is not None and ctx.has_cls:
                scores[ctx.expert] = (ctx.cls_attention()[0], answer.keep[0])
            return answer

    with torch.no_grad(), Scores(keep=0.5)(model) as m:
        model.encode_images(pixels, m)
    (score, keep), = scores.values()  # the tiny model's CLIP expert
    assert set(keep.tolist()) == set(score.topk(len(keep)).indices.tolist())


def test_visionzip_bad_settings_and_bench_names(tiny, images):
    from meteor_vlm.bench.accuracy import make_method, resolve_methods

    model, processor = tiny
    with pytest.raises(ValueError, match="keep must be a ratio in"):
        mv.VisionZip(keep=2.0)
    with pytest.raises(ValueError, match="contextual must be a ratio in"):
        mv.VisionZip(contextual=-0.5)
    inputs = make_inputs(processor, [images[0]], PROMPTS[:1])
    with pytest.raises(ValueError, match="keeps no token"), mv.VisionZip(keep=0.001)(model):
        logits(model, inputs)
    assert resolve_methods(["visionzip:keep0.23"]) == ["visionzip:keep0.23"]
    assert make_method("visionzip:keep0.23") == mv.VisionZip(keep=0.23)
    assert mv.methods.get("visionzip") is mv.VisionZip


def test_a_malformed_merge_is_refused(tiny, images):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0]], PROMPTS[:1])

    class Malformed(mv.VisionZip):
        def prune_encoder(self, ctx):
            answer = super().prune_encoder(ctx)
            if isinstance(answer, mv.methods.EncoderMerge):
                answer.group = answer.group[:, :-1]  # one patch short
            return answer

    with pytest.raises(ValueError, match="EncoderMerge needs"), Malformed(keep=0.5)(model):
        logits(model, inputs)
