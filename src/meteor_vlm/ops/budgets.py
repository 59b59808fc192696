"""Token budgets: feature rank, rank-proportional allocation, instance-adaptive K."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["feature_rank", "allocation_weights", "allocate_budget", "staged_budgets", "adaptive_budget", "ALLOCATIONS"]

ALLOCATIONS = ("rank", "average", "rank-reverse")


def feature_rank(x: torch.Tensor, rtol: float = 1e-2) -> float:
    """Numerical rank of a token matrix: singular values above rtol * the largest.

    A relative tolerance (rather than machine epsilon) is used because real feature maps are
    almost never exactly rank-deficient; what matters is how many directions carry energy.

    Args:
        x: (N, D) tokens of one image, or (B, N, D) for a batch (the mean over the batch is returned).
        rtol: relative threshold on singular values.
    Returns:
        the rank as a float (a mean when a batch is given).
    """
    if x.dim() == 2:
        x = x.unsqueeze(0)
    s = torch.linalg.svdvals(x.float())  # (B, min(N, D))
    return float((s > rtol * s[:, :1]).sum(1).float().mean())


def allocation_weights(ranks: Sequence[float], strategy: str = "rank") -> list[float]:
    """Weights that split a budget over experts.

    Args:
        ranks: C feature ranks (positive).
        strategy: "rank" (proportional to rank, METEOR), "average" (equal) or "rank-reverse"
            (proportional to 1 / rank, the ablation's worst case).
    Returns:
        C non-negative weights.
    """
    if strategy not in ALLOCATIONS:
        raise ValueError(f"unknown allocation strategy {strategy!r}; choose one of {ALLOCATIONS}")
    if any(not r > 0 for r in ranks):
        raise ValueError(f"feature ranks must be > 0, got {list(ranks)}")
    if strategy == "rank":
        return [float(r) for r in ranks]
    if strategy == "average":
        return [1.0] * len(ranks)
    return [1.0 / float(r) for r in ranks]


def allocate_budget(total: int, weights: Sequence[float], capacity: Sequence[int]) -> list[int]:
    """Split an integer budget in proportion to weights, exactly, without exceeding any capacity.

    k[l] ~ total * w[l] / sum(w); experts that would get more than they hold are capped and the
    rest is shared again among the others (water filling); rounding by largest remainder keeps
    sum(k) == total exactly.

    Args:
        total: tokens to keep over all experts.
        weights: C non-negative weights (e.g. feature ranks).
        capacity: C tokens each expert holds.
    Returns:
        C ints with sum == total and 0 <= k[l] <= capacity[l].
    """
    C = len(weights)
    if len(capacity) != C:
        raise ValueError(f"{C} weights but {len(capacity)} capacities")
    if total < 0:
        raise ValueError(f"budget must be >= 0, got {total}")
    if total > sum(capacity):
        raise ValueError(f"budget {total} is larger than the tokens available ({sum(capacity)})")
    alloc = [0.0] * C
    free = [i for i in range(C) if capacity[i] > 0]
    remaining = float(total)
    while free and remaining > 1e-9:
        wsum = sum(weights[i] for i in free)
        share = {i: remaining * (weights[i] / wsum if wsum > 0 else 1.0 / len(free)) for i in free}
        over = [i for i in free if alloc[i] + share[i] > capacity[i]]
        if not over:
            for i in free:
                alloc[i] += share[i]
            break
        for i in over:  # cap, then share what is left among the others
            remaining -= capacity[i] - alloc[i]
            alloc[i] = float(capacity[i])
            free.remove(i)
    out = [min(int(math.floor(a + 1e-9)), capacity[i]) for i, a in enumerate(alloc)]
    # largest remainder, only to experts with room left
    order = sorted(range(C), key=lambda i: (-(alloc[i] - out[i]), i))
    short = total - sum(out)
    for i in order:
        if short == 0:
            break
        if out[i] < capacity[i]:
            out[i] += 1
            short -= 1
    assert sum(out) == total
    return out


def staged_budgets(sizes: dict[str, int], staged: Sequence[str], ranks: dict[str, Sequence[float]] | None,
                   final: int, strategy: str = "rank") -> dict[str, list[int]]:
    """METEOR's stage-1 schedule: the patch tokens each expert keeps after each of its pruning points.

    The total shrinks geometrically to `final` over three points (rho^(b/3) of the experts' tokens after
    point b, rho = final / total). The `staged` experts (three pruning points) share the first two
    targets, every expert the last (a CNN prunes once, at its output), each by `allocation_weights` of
    its rank at that point, keeping at least one token and at most what it has.

    Args:
        sizes: {expert: patch tokens before pruning}; staged: the experts with three pruning points;
        ranks: {expert: [rank at point 0, 1, 2]} (unused, may be None, for strategy "average");
        final: tokens left after the last point, len(sizes) <= final <= the total; strategy: see
        `allocation_weights`.
    Returns:
        {expert: [tokens after each of its points]} (three entries for a staged expert, one otherwise).
    """
    names, total = list(sizes), sum(sizes.values())
    if final > total:
        raise ValueError(f"encoder budget {final} is larger than the tokens available ({total})")
    if final < len(names):
        raise ValueError(f"encoder budget {final} leaves an expert with no token ({len(names)} experts)")
    if strategy == "average" or ranks is None:
        ranks = {n: [1.0, 1.0, 1.0] for n in names}
    cur = dict(sizes)
    plan: dict[str, list[int]] = {n: [] for n in names}
    rho = final / total
    for b in range(3):
        members = list(staged) if b < 2 else names
        if not members:
            continue
        target = final if b == 2 else round(rho ** ((b + 1) / 3) * sum(sizes[n] for n in members))
        target = max(target, len(members))
        weights = allocation_weights([float(ranks[n][b]) for n in members], strategy)
        # every expert keeps at least one token; the rest follows the weights
        extra = allocate_budget(target - len(members), weights, [cur[n] - 1 for n in members])
        for n, e in zip(members, extra):
            cur[n] = e + 1
            plan[n].append(cur[n])
    return plan


def adaptive_budget(vav_selected: torch.Tensor, lam: float, available: torch.Tensor | int) -> torch.Tensor:
    """Instance-adaptive token count K = lambda * sum of the selected heads' VAV, clamped to [1, available].

    Args:
        vav_selected: (B, H) visual attention values with unselected heads zeroed.
        lam: lambda >= 0 (tokens per unit of visual attention).
        available: int or (B,) visual tokens left per sample.
    Returns:
        (B,) long budgets.
    """
    if lam < 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    k = torch.round(lam * vav_selected.sum(-1)).long()
    avail = torch.as_tensor(available, device=k.device).expand_as(k)
    return torch.minimum(k.clamp_min(1), avail)
