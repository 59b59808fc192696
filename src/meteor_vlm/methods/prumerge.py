"""PruMerge and PruMerge+: an adaptive number of tokens per image, chosen as attention outliers, each
kept token taking in its nearest neighbours.

At the last block of each vision expert (or the output of a CNN):

1. the patch tokens whose importance is a high outlier by the interquartile-range rule (above
   Q3 + whisker * (Q3 - Q1), `ops.iqr_outliers`) are kept: few on an image whose attention is flat,
   more on a busy one, so each image keeps its own count;
2. PruMerge+ adds round(uniform * N) cells spread evenly over the grid (every N/m-th cell in reading
   order, from the middle of the first step: a slanted lattice when the grid's width is not a multiple
   of the step), so that no region of the image goes empty; `uniform=0` is plain PruMerge;
3. each kept token becomes the importance-weighted mean of itself and its round(neighbours * N) most
   similar other tokens, kept or not (`ops.supplement_from_neighbours`), and stays at its own cell.

Importance is the attention from CLS (head-averaged, from the block's own q/k) as in the paper, which
is written for one CLIP encoder with CLS. With several experts: an expert without CLS ranks its tokens by
the attention they receive, and a CNN, which has no attention, by its tokens' distance from their mean.
With no attention to weigh neighbours by, a CNN's kept tokens are handed on as they are; `cnn_mix=True`
mixes them too, with equal weights, on the CNN's features (on the embedded model that blurs the words the
CNN reads: see the README). An image whose rule picks nothing (uniform=0, flat scores) keeps its most
important token. Keeping every token (uniform=1) leaves the expert unchanged. Nothing happens at fusion
or in the LLM; the LLM receives a different number of visual tokens per image, and a batch carries the
shorter images with empty slots.

The neighbour share defaults to 32/576 (32 neighbours on LLaVA-1.5's grid of 576) and the uniform share to
0.2, which with the outliers comes to about a quarter of the tokens; both are our reading of the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from .base import EncoderMerge, EncoderPoint, PruningMethod, check_ratio, register

__all__ = ["PruMerge"]


@register
@dataclass
class PruMerge(PruningMethod):
    """PruMerge(+)'s settings: `uniform`, the share of each expert's grid sampled evenly besides the
    outliers (0: PruMerge, > 0: PruMerge+); `whisker`, the interquartile-range rule's factor; `neighbours`,
    the share of the expert's tokens each kept one takes in; `cnn_mix`, whether a CNN's kept tokens take
    in their neighbours too (with equal weights; by default they are handed on as they are)."""

    name: ClassVar[str] = "prumerge"
    uniform: float = 0.2
    whisker: float = 1.5
    neighbours: float = 32 / 576
    cnn_mix: bool = False

    def validate(self) -> None:
        check_ratio("uniform", self.uniform)
        check_ratio("neighbours", self.neighbours)
        if not self.whisker >= 0:
            raise ValueError(f"whisker must be >= 0, got {self.whisker}")

    def encoder_blocks(self, num_blocks: int) -> list[int]:
        return [num_blocks - 1]  # the expert's output

    def prune_encoder(self, ctx: EncoderPoint):
        patches = ctx.patches
        B, n, _ = patches.shape
        importance = ctx.importance()
        keep = ops.iqr_outliers(importance, self.whisker)
        m = round(self.uniform * n)
        if m:
            cells = (2 * torch.arange(m, device=patches.device) + 1) * n // (2 * m)
            keep[:, cells] = True
        if bool(keep.all()):
            return None
        empty = ~keep.any(1)
        if bool(empty.any()):
            keep[empty] = ops.topk_mask(importance[empty], 1)
        weight = importance if ctx.block is not None else torch.ones_like(importance)
        k = min(round(self.neighbours * n), n - 1) if ctx.block is not None or self.cnn_mix else 0
        mixed = ops.supplement_from_neighbours(patches, ctx.merge_metric(), weight, keep, k)
        at = ops.mask_to_padded_indices(keep)  # (B, K), -1 in the empty slots of images that keep fewer
        slot = torch.arange(at.shape[1], device=at.device).expand_as(at)
        group = torch.full((B, n + 1), -1, dtype=torch.long, device=at.device)  # column n takes the empty slots
        group = group.scatter(1, torch.where(at >= 0, at, n), slot)[:, :n]  # each kept token is its own group
        nothing = torch.empty(B, 0, dtype=torch.long, device=at.device)  # every kept token comes back as a merge
        return EncoderMerge(nothing, ops.gather_tokens(mixed, at.clamp_min(0)), at, group)
