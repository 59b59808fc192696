"""Pure ops against hand-computed cases and brute force."""

import math

import pytest
import torch
import torch.nn.functional as F

from meteor_vlm import ops


def test_allocate_budget_hand_cases():
    assert ops.allocate_budget(10, [1, 1, 1], [10, 10, 10]) == [4, 3, 3]
    assert ops.allocate_budget(12, [1, 2, 3], [100, 100, 100]) == [2, 4, 6]
    # expert 0 wants 7.5 but holds 5: capped, the rest goes to expert 1
    assert ops.allocate_budget(10, [3, 1], [5, 10]) == [5, 5]
    # water filling over two rounds: 0 capped at 1, then 1 capped at 2, 2 takes the rest
    assert ops.allocate_budget(9, [10, 5, 1], [1, 2, 100]) == [1, 2, 6]
    assert ops.allocate_budget(0, [1, 2], [3, 3]) == [0, 0]
    assert ops.allocate_budget(6, [1, 2], [3, 3]) == [3, 3]


@pytest.mark.parametrize("seed", range(20))
def test_allocate_budget_sums_exactly_and_respects_caps(seed):
    g = torch.Generator().manual_seed(seed)
    C = int(torch.randint(1, 6, (1,), generator=g))
    caps = torch.randint(0, 50, (C,), generator=g).tolist()
    weights = (torch.rand(C, generator=g) * 10 + 0.1).tolist()
    total = int(torch.randint(0, sum(caps) + 1, (1,), generator=g))
    out = ops.allocate_budget(total, weights, caps)
    assert sum(out) == total
    assert all(0 <= o <= c for o, c in zip(out, caps))
    # proportionality: an uncapped expert is within 1 of its exact share of what the uncapped got
    free = [i for i in range(C) if out[i] < caps[i]]
    if len(free) > 1:
        share = sum(out[i] for i in free)
        wsum = sum(weights[i] for i in free)
        for i in free:
            assert abs(out[i] - share * weights[i] / wsum) <= 1 + 1e-9 * share


def test_allocate_budget_rejects_overdraw():
    with pytest.raises(ValueError, match="larger than the tokens available"):
        ops.allocate_budget(11, [1, 1], [5, 5])


def test_allocation_strategies():
    assert ops.allocation_weights([2.0, 4.0], "rank") == [2.0, 4.0]
    assert ops.allocation_weights([2.0, 4.0], "average") == [1.0, 1.0]
    assert ops.allocation_weights([2.0, 4.0], "rank-reverse") == [0.5, 0.25]
    with pytest.raises(ValueError, match="unknown allocation"):
        ops.allocation_weights([1.0], "bogus")


def test_feature_rank_of_low_rank_matrix():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g) @ torch.randn(3, 16, generator=g)
    assert ops.feature_rank(x) == 3.0
    assert ops.feature_rank(torch.randn(40, 16, generator=g)) == 16.0


def test_cooperative_redundancy_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    B, N, D, C = 2, 23, 8, 3
    z = torch.randn(B, N, D, generator=g)
    ids = torch.randint(0, C, (N,), generator=g)
    fast = ops.cooperative_redundancy(z, ids, C)
    cos = F.cosine_similarity(z[:, :, None], z[:, None, :], dim=-1)  # (B, N, N)
    other = ids[:, None] != ids[None, :]
    brute = (cos * other).sum(-1)
    torch.testing.assert_close(fast, brute, atol=1e-5, rtol=1e-5)


def test_within_redundancy_equals_brute_force():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 11, 5, generator=g)
    cos = F.cosine_similarity(z[:, :, None], z[:, None, :], dim=-1)
    brute = cos.sum(-1) - cos.diagonal(dim1=1, dim2=2)
    torch.testing.assert_close(ops.within_redundancy(z), brute, atol=1e-5, rtol=1e-5)


def test_received_attention_equals_full_map_mean():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 4, 37, 8, generator=g), torch.randn(2, 4, 37, 8, generator=g)
    full = torch.softmax(q @ k.transpose(-1, -2) * 8**-0.5, -1)  # (B, H, N, N)
    torch.testing.assert_close(ops.received_attention(q, k, 8**-0.5, chunk_size=5), full.mean((1, 2)), atol=1e-6, rtol=1e-5)


def test_received_attention_within_groups_equals_the_full_map_masked_to_them():
    """Windowed attention: each query attends to its own group's keys only (the groups interleaved, chunks
    crossing their borders)."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 13, 8, generator=g), torch.randn(2, 4, 13, 8, generator=g)
    groups = torch.randint(0, 3, (2, 13), generator=g)
    logits = (q @ k.transpose(-1, -2) * 8**-0.5).masked_fill(groups[:, None, :, None] != groups[:, None, None, :], -1e9)
    want = torch.softmax(logits, -1).mean((1, 2))
    got = ops.received_attention(q, k, 8**-0.5, chunk_size=4, groups=groups)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, ops.received_attention(q, k, 8**-0.5), atol=1e-3)
    real = torch.rand(2, 13, generator=g) > 0.3  # padding neither sends nor receives
    allowed = (groups[:, :, None] == groups[:, None, :]) & real[:, None, :]
    rows = torch.softmax((q @ k.transpose(-1, -2) * 8**-0.5).masked_fill(~allowed[:, None], -1e9), -1) * real[:, None, :, None]
    want = rows.sum((1, 2)) * real / (4 * real.sum(1, keepdim=True))
    torch.testing.assert_close(ops.received_attention(q, k, 8**-0.5, mask=real, groups=groups), want, atol=1e-6, rtol=1e-5)


def test_mean_similarity_ranks_background_high():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [1.0, -0.1], [0.0, 1.0]]])
    s = ops.mean_similarity(x)
    assert s[0, 3] == s[0].min()


def test_topk_mask_per_row_budget_and_padding():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.4, 0.3, 0.2, 0.1]])
    cand = torch.tensor([[True, True, True, True], [False, True, True, True]])
    m = ops.topk_mask(scores, torch.tensor([2, 1]), candidates=cand)
    assert m.tolist() == [[False, True, False, True], [False, True, False, False]]
    with pytest.raises(ValueError, match="larger than the tokens available"):
        ops.topk_mask(scores, torch.tensor([2, 4]), candidates=cand)


def test_visual_attention_values_and_adaptive_budget():
    attn = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]])  # (B=1, H=2, N=3)
    vis = torch.tensor([[False, True, True]])
    vav = ops.visual_attention_values(attn, vis)
    torch.testing.assert_close(vav, torch.tensor([[0.5, 0.9]]))
    heads = ops.top_heads(vav, 1)
    assert heads.tolist() == [[False, True]]
    assert ops.adaptive_budget(vav * heads, 10.0, 100).tolist() == [9]
    assert ops.adaptive_budget(vav * heads, 10.0, 4).tolist() == [4]  # clamped to what is left
    assert ops.adaptive_budget(vav * 0, 10.0, 4).tolist() == [1]  # at least one token
    with pytest.raises(ValueError, match="lambda"):
        ops.adaptive_budget(vav, -1.0, 4)


def test_diversity_bounds():
    same = torch.ones(9, 4)
    assert math.isclose(ops.diversity(same), 1 / 3, rel_tol=1e-5)
    assert math.isclose(ops.diversity(torch.eye(4)), 1.0, rel_tol=1e-5)


def test_layer_averaged_tokens_reproduces_paper_242():
    # 576 tokens into a 32-layer LLM, 396 / 170 / 76 kept at layers 4 / 12 / 20 (Table 3 of 002) -> 242*
    counts = ops.tokens_per_layer(32, 576, {4: 396, 12: 170, 20: 76})
    assert counts[3] == 576 and counts[4] == 396 and counts[31] == 76
    assert ops.layer_averaged_tokens(counts) == 242.0
