"""Selecting tokens: top-k with padding and per-sample budgets, order-preserving gathers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["topk_mask", "topk_indices", "gather_tokens", "mask_to_indices", "mask_to_padded_indices", "iqr_outliers",
           "top_heads", "max_min_diverse"]


def topk_mask(
    scores: torch.Tensor,
    k: torch.Tensor | int,
    candidates: torch.Tensor | None = None,
    largest: bool = True,
) -> torch.Tensor:
    """Boolean mask of the k best candidates per row; k may differ per row.

    Ties are broken by position (earlier wins), so the result is deterministic.

    Args:
        scores: (B, N) scores.
        k: int or (B,) long, how many to keep per row (at most the number of candidates).
        candidates: (B, N) bool, the tokens that may be chosen (default: all).
        largest: keep the highest scores (True) or the lowest (False).
    Returns:
        (B, N) bool, True for kept tokens; exactly k[b] per row.
    """
    B, N = scores.shape
    cand = torch.ones_like(scores, dtype=torch.bool) if candidates is None else candidates.bool()
    k = torch.as_tensor(k, device=scores.device).expand(B).long()
    if (k > cand.sum(1)).any():
        raise ValueError(f"budget {k.tolist()} is larger than the tokens available {cand.sum(1).tolist()}")
    if (k < 0).any():
        raise ValueError(f"budget must be >= 0, got {k.tolist()}")
    s = scores.float() if largest else -scores.float()
    s = s.masked_fill(~cand, float("-inf"))
    # stable sort: equal scores keep their original order
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(N, device=scores.device).expand(B, N))
    return (rank < k.unsqueeze(1)) & cand


def mask_to_indices(keep: torch.Tensor) -> torch.Tensor:
    """Indices of kept tokens in original order; every row must keep the same count.

    Args:
        keep: (B, N) bool with the same number of True per row.
    Returns:
        (B, K) long, ascending.
    """
    counts = keep.sum(1)
    if (counts != counts[0]).any():
        raise ValueError(f"rows keep different numbers of tokens: {counts.tolist()}")
    return mask_to_padded_indices(keep)  # equal counts: no empty slot


def mask_to_padded_indices(keep: torch.Tensor) -> torch.Tensor:
    """Indices of kept tokens in original order when rows keep different counts.

    Args:
        keep: (B, N) bool.
    Returns:
        (B, K) long with K the largest count: each row's indices ascending, then -1 in its empty slots.
    """
    N = keep.shape[1]
    K = int(keep.sum(1).max()) if keep.numel() else 0
    cols = torch.sort(torch.where(keep, torch.arange(N, device=keep.device), N), dim=1).values[:, :K]
    return cols.masked_fill(cols == N, -1)


def iqr_outliers(scores: torch.Tensor, whisker: float = 1.5) -> torch.Tensor:
    """The high outliers of each row by the interquartile-range rule (PruMerge's adaptive selection):
    scores above Q3 + whisker * (Q3 - Q1), with the quartiles linearly interpolated (numpy's default).

    Args:
        scores: (B, N); whisker: >= 0.
    Returns:
        (B, N) bool; rows may hold different counts, and none at all.
    """
    if whisker < 0:
        raise ValueError(f"whisker must be >= 0, got {whisker}")
    s = scores.float()
    q = torch.quantile(s, torch.tensor([0.25, 0.75], device=s.device), dim=1)  # (2, B)
    return s > (q[1] + whisker * (q[1] - q[0]))[:, None]


def topk_indices(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Indices of the k best tokens per row, in their original order.

    Args:
        scores: (B, N); k: int.
    Returns:
        (B, k) long, ascending.
    """
    return mask_to_indices(topk_mask(scores, k, largest=largest))


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather tokens along dim 1.

    Args:
        x: (B, N, ...) any per-token tensor; idx: (B, K) long.
    Returns:
        (B, K, ...).
    """
    view = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])
    return torch.gather(x, 1, view)


def top_heads(vav: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k heads with the highest visual attention value, per sample.

    Args:
        vav: (B, H); k: 1 <= k <= H.
    Returns:
        (B, H) bool.
    """
    if not 1 <= k <= vav.shape[1]:
        raise ValueError(f"top-k heads needs 1 <= k <= {vav.shape[1]} heads, got k={k}")
    return topk_mask(vav, k)


def max_min_diverse(z: torch.Tensor, k: torch.Tensor | int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy max-min diversity selection (DivPrune), in cosine distance d(i, j) = 1 - cos(z_i, z_j).

    The first token is the one whose nearest other token is farthest; each next one is the token
    farthest from its nearest already-chosen token. Ties go to the earlier position.

    Args:
        z: (B, N, D) tokens; k: int or (B,) long, how many to choose per row;
        mask: (B, N) bool, the tokens that may be chosen (default: all).
    Returns:
        (B, N) bool, exactly k[b] True per row.
    """
    B, N, _ = z.shape
    valid = torch.ones(B, N, dtype=torch.bool, device=z.device) if mask is None else mask.bool()
    k = torch.as_tensor(k, device=z.device).expand(B).long()
    if (k > valid.sum(1)).any() or (k < 0).any():
        raise ValueError(f"budget {k.tolist()} must be in [0, tokens available {valid.sum(1).tolist()}]")
    u = F.normalize(z.float(), dim=-1)
    dist = 1.0 - u @ u.transpose(1, 2)  # (B, N, N)
    others = dist.masked_fill(~valid[:, None, :], float("inf"))
    others.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    # a token that may not (or no longer) be chosen scores -inf, and minimum() keeps it there: the loop
    # runs few ops per pick, which matters as it is sequential (k picks)
    score = others.min(-1).values.masked_fill(~valid, float("-inf"))  # the first pick: nearest other token
    K = int(k.max()) if B else 0
    picks = torch.zeros(B, K, dtype=torch.long, device=z.device)
    rows = torch.arange(B, device=z.device)
    for step in range(K):
        pick = score.argmax(1)  # first maximum on ties
        picks[:, step] = pick
        to_pick = dist[rows, pick]  # (B, N) distance of every token to the new pick
        score = to_pick.masked_fill(~valid, float("-inf")) if step == 0 else torch.minimum(score, to_pick)
        score[rows, pick] = float("-inf")
    # a row that needs fewer than K picks sends the rest to a spare column, dropped
    wanted = torch.arange(K, device=z.device) < k[:, None]
    chosen = torch.zeros(B, N + 1, dtype=torch.bool, device=z.device)
    return chosen.scatter_(1, picks.masked_fill(~wanted, N), True)[:, :N]
