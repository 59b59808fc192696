"""Merging tokens instead of dropping them: each merged token stands for a group of the originals."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .selection import gather_tokens, mask_to_indices, topk_indices

__all__ = ["density_peak_clusters", "merge_into_targets", "merge_groups", "merge_into_kept", "bipartite_soft_matching", "supplement_from_neighbours"]


def merge_into_targets(
    x: torch.Tensor, metric: torch.Tensor, rest: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip's contextual tokens: among each row's `rest` tokens, `count` targets spread evenly over
    them (every (R // count)-th, from the first) each take in the other rest tokens most cosine-similar
    to them in `metric`; a merged token is the plain mean of its target and the tokens it took in.

    Args:
        x: (B, N, D) tokens; metric: (B, N, C) what similarity is measured on (e.g. keys);
        rest: (B, N) bool, the tokens to merge, the same number R in every row; count: 1 <= count <= R.
    Returns:
        merged (B, count, D); at (B, count) long, each target's index; group (B, N) long, the merged token
        (0..count-1) each rest token went into (a target into its own), -1 for the others.
    """
    B, N, D = x.shape
    sizes = rest.sum(1)
    R = int(sizes[0]) if B else 0
    if (sizes != R).any():
        raise ValueError(f"every row needs the same number of tokens to merge, got {sizes.tolist()}")
    if not 1 <= count <= R:
        raise ValueError(f"merging into {count} tokens needs 1 <= count <= the {R} tokens to merge")
    cols = mask_to_indices(rest)  # (B, R) ascending
    targets = torch.arange(count, device=x.device) * (R // count)  # positions among the rest
    at = cols[:, targets]
    unit = F.normalize(gather_tokens(metric, cols).float(), dim=-1)  # (B, R, C)
    assign = (unit @ unit[:, targets].transpose(1, 2)).argmax(-1)  # (B, R): the most similar target
    assign[:, targets] = torch.arange(count, device=x.device)
    group = torch.full((B, N), -1, dtype=torch.long, device=x.device).scatter(1, cols, assign)
    sums = torch.zeros(B, count, D, device=x.device).scatter_add_(
        1, assign[..., None].expand(-1, -1, D), gather_tokens(x, cols).float())
    counts = torch.zeros(B, count, device=x.device).scatter_add_(1, assign, torch.ones_like(assign, dtype=torch.float))
    return (sums / counts[..., None]).to(x.dtype), at, group


def merge_groups(x: torch.Tensor, size: torch.Tensor, into: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens into the tokens they are sent to: each kept token (one sent into itself) becomes the
    size-weighted mean of itself and the tokens sent into it; a kept token that took in nothing stays
    exactly as it was.

    Args:
        x: (B, N, D) tokens; size: (B, N) how many original tokens each already stands for;
        into: (B, N) long, the index of the kept token each token goes into (into[i] == i: i is kept),
        the same number K >= 1 of kept tokens in every row.
    Returns:
        merged (B, K, D), the kept tokens in ascending order of index; group (B, N) long, the merged token
        (0..K-1) each token went into (a kept token into its own).
    """
    B, N, D = x.shape
    kept = into == torch.arange(N, device=x.device)
    cols = mask_to_indices(kept)  # (B, K) ascending; checks the equal counts
    K = cols.shape[1]
    if K < 1:
        raise ValueError("merging needs at least one kept token per row")
    slot = torch.full((B, N), -1, dtype=torch.long, device=x.device).scatter(
        1, cols, torch.arange(K, device=x.device).expand(B, -1))
    group = slot.gather(1, into)
    if (group < 0).any():
        raise ValueError("every token must be sent into a kept token")
    # the weighted mean written as "kept token + weighted pull of the tokens sent into it": exact for a group of
    # one; only the N - K sent tokens are read (ToMe sends a few per block)
    sent = mask_to_indices(~kept)  # (B, N - K)
    into_s, group_s, w = into.gather(1, sent), group.gather(1, sent), size.float().gather(1, sent)[..., None]
    delta = gather_tokens(x, sent).float() - gather_tokens(x, into_s).float()
    pull = torch.zeros(B, K, D, device=x.device).scatter_add_(1, group_s[..., None].expand(-1, -1, D), w * delta)
    total = size.float().gather(1, cols)[..., None].scatter_add_(1, group_s[..., None], w)
    merged = gather_tokens(x, cols).float() + pull / total
    return merged.to(x.dtype), group


def merge_into_kept(
    x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, kept: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token merging onto a chosen set: every token not `kept` goes into the kept token most
    cosine-similar to it in `metric` (first on ties), and each kept token becomes the size-weighted mean
    of itself and what it took in (`merge_groups`).

    Args:
        x: (B, N, D) tokens; metric: (B, N, C) what similarity is measured on (e.g. keys);
        size: (B, N) how many original tokens each already stands for; kept: (B, N) bool, the same number
        K >= 1 in every row.
    Returns:
        merged (B, K, D), the kept tokens in ascending order of index; group (B, N) long, the merged token
        (0..K-1) each token went into (a kept token into its own).
    """
    B, N, _ = x.shape
    cols = mask_to_indices(kept)  # (B, K) ascending; checks the equal counts
    if cols.shape[1] < 1:
        raise ValueError("merging needs at least one kept token per row")
    unit = F.normalize(metric.float(), dim=-1)
    best = (unit @ gather_tokens(unit, cols).transpose(1, 2)).argmax(-1)  # (B, N): most similar kept token
    into = torch.where(kept, torch.arange(N, device=x.device).expand(B, -1), cols.gather(1, best))
    return merge_groups(x, size, into)


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> torch.Tensor:
    """ToMe's matching: tokens alternate into sets A (even positions) and B (odd); each A token's edge is
    its most cosine-similar B token in `metric`, and the r A tokens with the strongest edges (ties: the
    earlier) are sent into their B token. Every other token stays.

    Args:
        metric: (B, N, C) what similarity is measured on (ToMe: the block's keys, averaged over heads);
        r: how many tokens to merge away, 0 <= r <= the ceil(N / 2) tokens of A.
    Returns:
        into (B, N) long: the index of the token each token goes into (its own index when it stays).
    """
    B, N, _ = metric.shape
    a, b = torch.arange(0, N, 2, device=metric.device), torch.arange(1, N, 2, device=metric.device)
    if not 0 <= r <= len(a) or (r and not len(b)):
        raise ValueError(f"bipartite matching merges at most {len(a) if len(b) else 0} of {N} tokens, got r={r}")
    into = torch.arange(N, device=metric.device).expand(B, -1).clone()
    if r == 0:
        return into
    unit = F.normalize(metric.float(), dim=-1)
    edge, match = (unit[:, a] @ unit[:, b].transpose(1, 2)).max(-1)  # (B, |A|): strongest B for each A
    order = torch.sort(edge, dim=1, descending=True, stable=True).indices[:, :r]  # the r strongest edges
    into.scatter_(1, a[order], b[match.gather(1, order)])
    return into


def supplement_from_neighbours(
    x: torch.Tensor, metric: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor, k: int
) -> torch.Tensor:
    """PruMerge's token supplement: each kept token becomes the weighted mean of itself and its k most
    cosine-similar other tokens in `metric` (kept or not, first on ties), weighted by `weight` (PruMerge:
    each token's attention from CLS). Neighbourhoods may overlap: a pruned token can feed several kept ones.

    Args:
        x: (B, N, D) tokens; metric: (B, N, C); weight: (B, N) >= 0; kept: (B, N) bool (any count per
        row); k: 0 <= k < N neighbours.
    Returns:
        (B, N, D): x with every kept row replaced (the others as they were).
    """
    B, N, D = x.shape
    if not 0 <= k < max(N, 1):
        raise ValueError(f"a token has at most {N - 1} neighbours, got k={k}")
    if (weight < 0).any():
        raise ValueError("supplement weights must be >= 0")
    if k == 0:  # each kept token is its own mean
        return x
    unit = F.normalize(metric.float(), dim=-1)
    sim = (unit @ unit.transpose(1, 2)).diagonal_scatter(torch.full((B, N), float("-inf"), device=x.device), dim1=1, dim2=2)
    order = torch.sort(sim, dim=-1, descending=True, stable=True).indices[..., :k]  # (B, N, k) nearest others
    members = torch.cat([torch.arange(N, device=x.device).expand(B, N)[..., None], order], -1)  # itself first
    w = weight.float().gather(1, members.flatten(1)).view(B, N, k + 1)
    w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    feats = gather_tokens(x.float(), members.flatten(1)).view(B, N, k + 1, D)
    mixed = (w[..., None] * feats).sum(2).to(x.dtype)
    return torch.where(kept[..., None], mixed, x)


def density_peak_clusters(x: torch.Tensor, count: int, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k nearest neighbours (DPC-kNN; SparseVLM's recycling) of one set of tokens.

    Distances are Euclidean over sqrt(D). A token's density is exp(-mean squared distance to its k nearest
    tokens, itself included); its separation is its distance to the nearest denser token (on equal density,
    the earlier token counts as denser), or the largest distance of all for the densest token. The `count`
    tokens with the largest density x separation are the centres (first on ties), and every token joins
    its nearest centre (the earlier centre on ties; a centre joins itself).

    Args:
        x: (N, D) tokens; count: 1 <= count <= N clusters; k: neighbours for the density (default: count).
    Returns:
        centres (count,) long, ascending token indices; assign (N,) long, each token's cluster (0..count-1,
        the index of its centre in `centres`).
    """
    N, D = x.shape
    if not 1 <= count <= N:
        raise ValueError(f"clustering {N} tokens into {count} clusters needs 1 <= count <= {N}")
    k = count if k is None else k
    if not 1 <= k <= N:
        raise ValueError(f"density from k={k} nearest tokens needs 1 <= k <= {N}")
    xf = x.float()
    dist = torch.cdist(xf[None], xf[None])[0] / D**0.5
    dist.fill_diagonal_(0.0)
    nearest = torch.sort(dist, dim=-1, stable=True).values[:, :k]
    density = torch.exp(-(nearest**2).mean(-1))
    idx = torch.arange(N, device=x.device)
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None]))
    separation = torch.where(denser, dist, torch.full_like(dist, float("inf"))).min(-1).values
    separation = torch.where(torch.isinf(separation), dist.max(), separation)
    centres = topk_indices((separation * density)[None], count)[0]
    assign = dist[:, centres].argmin(-1)  # argmin returns the first of equal minima
    assign[centres] = torch.arange(count, device=x.device)
    return centres, assign
