"""ToMe (token merging): merge similar tokens inside every block of each vision expert, never drop them.

In each block of a ViT expert, between its attention and its MLP (ToMe's place), bipartite soft matching
(`ops.bipartite_soft_matching`) on the keys that block's attention used, averaged over heads, sends the
tokens of set A (even positions) with the strongest edges into their most similar token of set B (odd
positions); a merged token is the size-weighted mean of what went into it (`ops.merge_groups`) and stands
at its B token's grid position, and the block's MLP runs on the merged tokens. With proportional
attention (ToMe's default) the later blocks add log(size) to every key's attention logit, so a merged
token weighs as the patches it stands for. CLS is never merged.

How many: with `r` set, ToMe's own schedule, r tokens in every block (at most half of the patch tokens
left, as ToMe caps it), and a CNN's output passes as it is (ToMe is a ViT method). Without it (the
default), a geometric schedule to a share `keep` of each expert's patches after its last block,
round(N0 * keep^(i/L)) after block i of L, so experts of any size end at the same share, and a CNN,
which runs whole, has its output merged in successive bipartite rounds (each at most half) down to
round(N0 * keep), on its features. Nothing happens at fusion or in the LLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from .base import EncoderMerge, EncoderPoint, PruningMethod, check_ratio, register

__all__ = ["ToMe"]


@register
@dataclass
class ToMe(PruningMethod):
    """ToMe's settings: `keep`, the share of each expert's patch tokens left after its last block's merge;
    `proportional_attention`, whether the later blocks weigh merged tokens by their size; `r`, if set, the
    tokens merged in every block instead (ToMe's own setting; `keep` is then unused, CNNs untouched)."""

    name: ClassVar[str] = "tome"
    merges_within_block: ClassVar[bool] = True
    keep: float = 0.25
    proportional_attention: bool = True
    r: int | None = None

    def validate(self) -> None:
        check_ratio("keep", self.keep)
        if self.keep == 0:
            raise ValueError("keep must be > 0: ToMe hands on at least one token of every expert")
        if self.r is not None and (isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1):
            raise ValueError(f"r must be a whole number of tokens >= 1 merged per block, or None; got {self.r!r}")

    def encoder_blocks(self, num_blocks: int) -> list[int]:
        return list(range(num_blocks))

    def prune_encoder(self, ctx: EncoderPoint):
        patches = ctx.patches
        n0 = ctx.runner.num_patches
        if self.r is not None:  # ToMe's schedule: r in every ViT block, at most half of what is left
            if ctx.block is None:
                return None
            n = patches.shape[1] - min(self.r, patches.shape[1] // 2)
        else:  # the share of the schedule done after this block; a CNN does all of it at its output
            n = round(n0 * self.keep ** (1.0 if ctx.block is None else (ctx.block + 1) / ctx.runner.num_blocks))
        if n >= patches.shape[1]:
            return None
        if n < 1:
            raise ValueError(f"ToMe keeps no token of expert {ctx.expert!r} ({n0} patches, keep={self.keep})")
        size, metric = ctx.patch_sizes, ctx.merge_metric()
        x, at = patches, torch.arange(patches.shape[1], device=patches.device).expand(patches.shape[0], -1)
        group = at
        while x.shape[1] > n:  # a round merges at most half (set A): a larger step takes several rounds
            r = min(x.shape[1] - n, math.ceil(x.shape[1] / 2))
            into = ops.bipartite_soft_matching(metric, r)
            merged, step = ops.merge_groups(torch.cat([x, metric], -1), size, into)
            x, metric = merged[..., : x.shape[-1]], merged[..., x.shape[-1]:]
            kept = ops.mask_to_indices(into == torch.arange(into.shape[1], device=into.device))
            size = torch.zeros(kept.shape, device=size.device).scatter_add_(1, step, size)
            at, group = at.gather(1, kept), step.gather(1, group)
        return EncoderMerge.every_patch_merged(x, at, group)
