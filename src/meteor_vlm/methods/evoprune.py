"""EvoPrune: prune while the image is being encoded, layer by layer, and merge what is dropped.

Only EvoPrune's abstract is public: pruning during visual encoding at selected encoder layers, guided
by token similarity, diversity and attention importance, with token merging. Our reading (PAPER.md,
"EvoPrune"), at each scheduled pruning point of each vision expert:

1. target: the expert's patches shrink geometrically over the scheduled points, to round(N0 * keep^(j/J))
   after the j-th of J, so the blocks after an early point already run on fewer tokens;
2. score: importance (attention from CLS, or the attention a token receives in an expert without CLS)
   and non-redundancy (minus the token's summed cosine similarity to the others, on that block's keys)
   are turned into rank shares in [0, 1] and mixed, (1 - alpha) * importance + alpha * non-redundancy;
3. diversity: among the `candidates` x target best-scored tokens, greedy max-min diversity on the keys
   (`ops.max_min_diverse`) chooses the target count;
4. merge: every other token goes into its most similar kept token (keys), which becomes the
   size-weighted mean of its group (`ops.merge_into_kept`); sizes add up in `VisualTokens.size`.

A CNN, which cannot drop tokens mid-network, is pruned once at its output, with the distance from its
mean token as importance and its features in place of keys. Open choices, ours: the schedule (every
point of `points`, geometric), the rank mix and the candidate pool; by default no proportional
attention after a merge (the abstract names none: the sizes are recorded, not fed back; set
`proportional_attention=True` to weigh merged tokens by their size, as ToMe does). Nothing happens at
fusion or in the LLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .. import ops
from .base import EncoderMerge, EncoderPoint, PruningMethod, check_ratio, expert_ranks, register, stage1_plan

__all__ = ["EvoPrune"]

POINTS = (0, 1, 2)  # the ends of the three thirds of an expert (`ExpertRunner.pruning_points`)
ALLOCATIONS = ("same", "rank")


def _rank_share(score: torch.Tensor) -> torch.Tensor:
    """(B, N) scores -> their rank within the row scaled to [0, 1] (the lowest 0, the highest 1)."""
    n = score.shape[1]
    return score.argsort(dim=1, stable=True).argsort(dim=1).double() / max(n - 1, 1)  # float64: exact ties stay ties


@register
@dataclass
class EvoPrune(PruningMethod):
    """EvoPrune's settings: `keep`, the share of each expert's patch tokens left after its last scheduled
    point; `points`, which of the expert's three pruning points (ends of its thirds) prune; `alpha`, the
    weight of non-redundancy against attention importance; `candidates`, how many times the target count
    the diversity selection chooses from; `merge`, whether dropped tokens are merged into kept ones;
    `proportional_attention`, whether the expert's later blocks weigh merged tokens by their size;
    `allocation`, "same" (every expert keeps the share `keep`) or "rank" (METEOR's stage-1 schedule: the
    experts share round(keep * all their patches) by the feature ranks of the model's rank table,
    `ops.staged_budgets`; not in EvoPrune's abstract: METEOR's allocation with EvoPrune's choice)."""

    name: ClassVar[str] = "evoprune"
    keep: float = 0.25
    points: tuple[int, ...] = POINTS
    alpha: float = 0.5
    candidates: float = 2.0
    merge: bool = True
    proportional_attention: bool = False
    allocation: str = "same"
    _plan: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def validate(self) -> None:
        check_ratio("keep", self.keep)
        if self.keep == 0:
            raise ValueError("keep must be > 0: EvoPrune hands on at least one token of every expert")
        check_ratio("alpha", self.alpha)
        self.points = tuple(self.points)
        if not self.points or sorted(set(self.points)) != list(self.points) or not set(self.points) <= set(POINTS):
            raise ValueError(f"points must be distinct, increasing and among {POINTS}, got {self.points}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; choose one of {ALLOCATIONS}")
        if not self.candidates >= 1:
            raise ValueError(f"candidates must be >= 1 (a multiple of the target count), got {self.candidates}")

    def setup(self, model) -> None:
        self._plan = {}
        if self.allocation == "rank":
            self._plan = stage1_plan(model, expert_ranks(model, None, "allocation='rank'"), "rank", self.keep)

    def schedule(self, ctx: EncoderPoint) -> tuple[int, int] | None:
        """(j, J): this is the j-th of the expert's J scheduled points, or None if it does not prune here.
        A CNN, or a ViT too shallow for three distinct points, prunes once, at its output."""
        if ctx.block is None:
            return 1, 1
        n_points = len(ctx.runner.pruning_points())
        if n_points < len(POINTS):
            return (1, 1) if ctx.point == n_points - 1 else None
        if ctx.point not in self.points:
            return None
        return self.points.index(ctx.point) + 1, len(self.points)

    def target(self, num_patches: int, j: int, J: int) -> int:
        """Patch tokens an expert of `num_patches` keeps after the j-th of its J scheduled points."""
        return round(num_patches * self.keep ** (j / J))

    def prune_encoder(self, ctx: EncoderPoint):
        patches = ctx.patches
        n_now = patches.shape[1]
        at = self.schedule(ctx)
        if at is None:
            return None
        if self._plan:  # rank allocation: the staged plan's count at this point (a single-point expert: its one)
            steps = self._plan[ctx.expert]
            n = steps[ctx.point] if len(steps) == len(POINTS) and ctx.block is not None else steps[-1]
        else:
            n = self.target(ctx.runner.num_patches, *at)
        if n >= n_now:
            return None
        if n < 1:
            raise ValueError(f"EvoPrune keeps no token of expert {ctx.expert!r} ({ctx.runner.num_patches} "
                             f"patches, keep={self.keep})")
        metric = ctx.merge_metric()
        score = (1 - self.alpha) * _rank_share(ctx.importance()) + self.alpha * _rank_share(-ops.within_redundancy(metric))
        pool = ops.topk_mask(score, min(n_now, math.ceil(self.candidates * n)))
        kept = ops.max_min_diverse(metric, n, mask=pool)
        if not self.merge:
            return ops.mask_to_indices(kept)
        merged, group = ops.merge_into_kept(patches, metric, ctx.patch_sizes, kept)
        return EncoderMerge.every_patch_merged(merged, ops.mask_to_indices(kept), group)
