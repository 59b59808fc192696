"""ToMe on the shared runtime: bipartite matching and merges equal plain references, the counts follow the
schedule block by block, and proportional attention makes a merged token of k duplicates act as the k
tokens did. (No-op, batch and cache oracles: test_oracles.py, with the other peers.)"""

import math

import pytest
import torch
import torch.nn.functional as F

import meteor_vlm as mv

from .conftest import make_inputs
from .test_oracles import PROMPTS, logits


def plain_matching(metric, r):
    """ToMe's bipartite matching of one row as loops: A = even positions, B = odd; each A token's edge is
    its most similar B token (first on ties); the r strongest edges (ties: earlier A) are merged."""
    n = len(metric)
    a, b = list(range(0, n, 2)), list(range(1, n, 2))
    edges = []
    for i in a:
        sims = [float(F.cosine_similarity(metric[i], metric[j], dim=0)) for j in b]
        edges.append((max(sims), i, b[sims.index(max(sims))]))
    chosen = sorted(edges, key=lambda e: (-e[0], e[1]))[:r]
    into = list(range(n))
    for _, i, j in chosen:
        into[i] = j
    return into


def test_bipartite_soft_matching_equals_a_plain_loop():
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(3, 15, 4, generator=gen)
    metric[2, 4] = metric[2, 7]  # an exact duplicate: its edge is the strongest
    for r in (0, 3, 8):
        into = mv.ops.bipartite_soft_matching(metric, r)
        for row in range(3):
            assert into[row].tolist() == plain_matching(metric[row], r)
    assert mv.ops.bipartite_soft_matching(metric, 1)[2, 4] == 7
    with pytest.raises(ValueError, match="merges at most 8 of 15"):
        mv.ops.bipartite_soft_matching(metric, 9)


def test_merge_groups_refuses_a_token_sent_into_a_merged_one():
    x, size = torch.randn(1, 4, 3), torch.ones(1, 4)
    with pytest.raises(ValueError, match="into a kept token"):
        mv.ops.merge_groups(x, size, torch.tensor([[1, 2, 2, 3]]))  # 0 goes into 1, which itself goes into 2


def plain_tome_step(x, metric, size, n):
    """One expert point of ToMe for one row, as loops: bipartite rounds (at most half each) on the metric
    until n tokens are left; merged tokens (and metrics) are size-weighted means. Returns (at, groups, x)."""
    tokens = [([i], i) for i in range(len(x))]  # (members, position)
    x, metric, size = x.double(), metric.double(), size.double()
    while len(tokens) > n:
        r = min(len(tokens) - n, math.ceil(len(tokens) / 2))
        into = plain_matching(metric, r)
        keep = [i for i in range(len(tokens)) if into[i] == i]
        new_x, new_m, new_s, new_t = [], [], [], []
        for k in keep:
            members = [i for i in range(len(tokens)) if into[i] == k]
            w = size[members]
            new_x.append((w[:, None] * x[members]).sum(0) / w.sum())
            new_m.append((w[:, None] * metric[members]).sum(0) / w.sum())
            new_s.append(w.sum())
            new_t.append((sorted(sum((tokens[i][0] for i in members), [])), tokens[k][1]))
        x, metric, size, tokens = torch.stack(new_x), torch.stack(new_m), torch.stack(new_s), new_t
    return [t[1] for t in tokens], [t[0] for t in tokens], x


class RecordingToMe(mv.ToMe):
    def prune_encoder(self, ctx):
        answer = super().prune_encoder(ctx)
        if answer is not None:
            metric = ctx.patches if ctx.block is None else ctx.patch_keys().mean(1)
            self.seen.append((ctx.expert, ctx.block, ctx.patches, metric, ctx.size.clone(), answer))
        return answer


def schedule(runner, settings):
    """The patch tokens ToMe leaves after each block of a ViT expert (or at a CNN's output; [] where it leaves
    the CNN alone): keep's geometric schedule, or r per block capped at half of what is left."""
    n0 = runner.num_patches
    if "r" in settings:
        out, n = [], n0
        for _ in range(runner.num_blocks):
            n -= min(settings["r"], n // 2)
            out.append(n)
        return out
    if not runner.num_blocks:
        return [round(n0 * settings["keep"])]
    return [round(n0 * settings["keep"] ** ((i + 1) / runner.num_blocks)) for i in range(runner.num_blocks)]


def attention_of(block):
    """A ViT block's attention module (CLIP's self_attn, Pix2Struct's attention)."""
    return block.self_attn if hasattr(block, "self_attn") else block.attention


SETTINGS = [dict(keep=0.4), dict(keep=0.1), dict(r=7)]  # keep 0.1: more than one round per block; r 7: capped at half in CLIP


@pytest.mark.parametrize("settings", SETTINGS, ids=["keep0.4", "keep0.1", "r7"])
def test_tome_merges_in_every_block_as_a_plain_reference(tiny, images, settings):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0], images[1]], PROMPTS[:2])
    pixels = {k[len("pixel_values_"):]: v for k, v in inputs.items() if k.startswith("pixel_values_")}
    method = RecordingToMe(**settings)
    method.seen = []
    masks = {}  # (expert, block) -> the attention bias the block's attention ran with
    hooks = [attention_of(block).register_forward_pre_hook(
        lambda module, args, kwargs, key=(r.spec.name, i): masks.__setitem__(key, kwargs.get("attention_mask")),
        with_kwargs=True) for r in model.runners for i, block in enumerate(r.blocks)]
    try:
        with torch.no_grad(), method(model):
            visual = model.encode_images(pixels, method)
    finally:
        for h in hooks:
            h.remove()
    for e, runner in enumerate(model.runners):
        name, n0 = runner.spec.name, runner.num_patches
        calls = [s for s in method.seen if s[0] == name]
        targets = schedule(runner, settings)
        assert len(calls) == len(targets)
        if runner.num_blocks:
            assert [c[1] for c in calls] == list(range(runner.num_blocks))
            # proportional attention: block 0 runs unbiased; each later block adds log(size) of what it sees
            assert masks[(name, 0)] is None
            for i in range(1, runner.num_blocks):
                bias = calls[i][4].log()
                if runner.has_cls:
                    bias = torch.cat([torch.zeros(2, 1), bias], 1)
                torch.testing.assert_close(masks[(name, i)], bias[:, None, None, :])
        for (_, _, patches, metric, size, answer), n in zip(calls, targets):
            assert answer.keep.shape[1] == 0 and answer.merged.shape[1] == n
            for b in range(2):
                at, groups, merged = plain_tome_step(patches[b], metric[b], size[b], n)
                assert answer.at[b].tolist() == at
                assert [torch.where(answer.group[b] == j)[0].tolist() for j in range(n)] == groups
                torch.testing.assert_close(answer.merged[b].double(), merged, atol=1e-5, rtol=1e-5)
        mine = visual.expert[0] == e
        assert int(mine.sum()) == (targets[-1] if targets else n0)
        assert torch.equal(visual.size[:, mine].sum(1), torch.full((2,), float(n0)))
        grid = visual.grid_index[:, mine]
        assert (grid[:, 1:] > grid[:, :-1]).all()


def plain_tome_expert(runner, pixels, settings):
    """ToMe through one ViT expert for one image, by hand from each block's parts: its attention half (with
    log(size) added to every key's logits, 0 for CLS), then `plain_tome_step` on the keys that attention used
    (the key projection of the normed input, averaged over heads) down to the schedule's count, then the MLP
    half on the merged tokens. Returns (features, grid positions, sizes)."""
    kind, counts = runner.kind, schedule(runner, settings)
    x = runner.embed(pixels)  # (1, N, D)
    grid, size = list(range(runner.num_patches)), [1.0] * runner.num_patches
    cls = 1 if runner.has_cls else 0
    for i, block in enumerate(runner.blocks):
        norm1, attn, norm2 = ((block.layer_norm1, block.self_attn, block.layer_norm2) if kind != "pix2struct" else
                              (block.pre_attention_layer_norm, block.attention, block.pre_mlp_layer_norm))
        h = norm1(x)
        bias = torch.tensor([0.0] * cls + [math.log(s) for s in size])[None, None, None, :]
        mask = None if all(s == 1 for s in size) else bias
        out = attn(h, attention_mask=mask)[0] if kind == "pix2struct" else attn(hidden_states=h, attention_mask=mask)[0]
        x = x + out
        keys = (attn.key if kind == "pix2struct" else attn.k_proj)(h)[0]
        heads = attn.n_heads if kind == "pix2struct" else attn.num_heads
        metric = keys.view(len(keys), heads, -1).mean(1)[cls:]
        n = counts[i]
        if n < len(grid):
            at, groups, merged = plain_tome_step(x[0, cls:], metric, torch.tensor(size), n)
            grid, size = [grid[a] for a in at], [sum(size[m] for m in g) for g in groups]
            x = torch.cat([x[:, :cls], merged.float()[None]], 1)
        x = x + block.mlp(norm2(x))
    return runner.finalize(x)[0], grid, size


@pytest.mark.parametrize("settings", SETTINGS, ids=["keep0.4", "keep0.1", "r7"])
def test_tome_merges_between_attention_and_mlp(tiny, images, settings):
    """Each ViT expert's output under ToMe equals ToMe done by hand from the blocks' parts, merging after the
    attention and before the MLP of each block (ToMe's place)."""
    model, processor = tiny
    inputs = make_inputs(processor, [images[0], images[1]], PROMPTS[:2])
    method = mv.ToMe(**settings)
    vits = [e for e, r in enumerate(model.runners) if r.num_blocks]
    assert {model.runners[e].kind for e in vits} == {"clip", "pix2struct"}
    for e in vits:
        runner = model.runners[e]
        pixels = inputs[f"pixel_values_{runner.spec.name}"]
        with torch.no_grad(), method(model):
            out = model.encode_expert(e, pixels, method)
            for b in range(2):
                feats, grid, size = plain_tome_expert(runner, pixels[b : b + 1], settings)
                assert out.grid_index[b].tolist() == grid
                assert out.size[b].tolist() == size
                torch.testing.assert_close(out.features[b], feats, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("expert", [0, 1])  # CLIP (with CLS), Pix2Struct
def test_proportional_attention_makes_a_merged_token_act_as_its_duplicates(tiny, expert):
    """A block run on tokens where one token appears k times equals, for every token, the block run on one
    copy with log(k) added to its attention logits: ToMe's reason for proportional attention."""
    model, _ = tiny
    runner = model.runners[expert]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, runner.out_dim, generator=gen)
    dup = torch.cat([x, x[:, 3:4].expand(-1, 2, -1)], 1)  # token 3 three times
    size = torch.ones(2, 6)
    size[:, 3] = 3
    with torch.no_grad():
        full = runner.run_block(1, dup)
        merged = runner.run_block(1, x, size.log())
        plain = runner.run_block(1, x)
    torch.testing.assert_close(merged, full[:, :6], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, full[:, :6], atol=1e-3)


def test_tome_bad_settings_bad_blocks_and_bench_names(tiny, images):
    from meteor_vlm.bench.accuracy import make_method, resolve_methods

    model, processor = tiny
    for settings, message in ((dict(keep=1.5), "keep must be a ratio in"), (dict(keep=0.0), "keep must be > 0"),
                              (dict(r=0), "r must be a whole number"), (dict(r=2.5), "r must be a whole number")):
        with pytest.raises(ValueError, match=message):
            mv.ToMe(**settings)
    inputs = make_inputs(processor, [images[0]], PROMPTS[:1])
    with pytest.raises(ValueError, match="keeps no token"), mv.ToMe(keep=0.001)(model):
        logits(model, inputs)

    class PastTheEnd(mv.ToMe):
        def encoder_blocks(self, num_blocks):
            return [0, num_blocks]

    with pytest.raises(ValueError, match="encoder blocks must be distinct, increasing and within"), PastTheEnd()(model):
        logits(model, inputs)
    assert resolve_methods(["tome:keep0.23"]) == ["tome:keep0.23"]
    assert make_method("tome:keep0.23") == mv.ToMe(keep=0.23)
    assert resolve_methods(["tome:r8"]) == ["tome:r8"] and make_method("tome:r8") == mv.ToMe(r=8)
    assert mv.methods.get("tome") is mv.ToMe
