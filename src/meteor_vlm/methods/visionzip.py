"""VisionZip: at each expert's output, keep the dominant tokens and merge the rest into a few contextual ones.

At the last block of each vision expert (or the output of a CNN), round(keep * N) tokens leave it:
the `dominant` ones, those with the most attention from CLS (head-averaged, from that block's own q/k),
and round(contextual * that) contextual tokens, made by merging everything else: targets spread evenly
over the remaining tokens take in the ones whose keys (head-averaged) are most similar, and each
contextual token is the mean of its group (`ops.merge_into_targets`). Nothing happens at fusion or in
the LLM; every token stands at its grid position, a contextual one at its target's.

VisionZip is defined for one CLIP-like encoder with a CLS token. With several experts: an expert without
CLS ranks its tokens by the attention they receive, and a CNN, which has no attention, by its tokens'
distance from their mean (METEOR's shallow score), merging on its features instead of keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import ops
from .base import EncoderMerge, EncoderPoint, PruningMethod, check_ratio, register

__all__ = ["VisionZip"]


@register
@dataclass
class VisionZip(PruningMethod):
    """VisionZip's settings: `keep`, the share of each expert's patch tokens that leave it (dominant plus
    contextual; its paper's 64 of 576 by default), and `contextual`, the share of those that are merged
    contextual tokens (10 of 64)."""

    name: ClassVar[str] = "visionzip"
    keep: float = 64 / 576
    contextual: float = 10 / 64

    def validate(self) -> None:
        check_ratio("keep", self.keep)
        check_ratio("contextual", self.contextual)

    def prune_encoder(self, ctx: EncoderPoint):
        if ctx.block is not None and ctx.block != ctx.runner.num_blocks - 1:
            return None  # only at the expert's output
        patches = ctx.patches
        n = patches.shape[1]
        k = round(self.keep * n)
        if k >= n:
            return None
        if k < 1:
            raise ValueError(f"VisionZip keeps no token of expert {ctx.expert!r} ({n} tokens, keep={self.keep})")
        contextual = round(self.contextual * k)
        dominant = ops.topk_mask(ctx.importance(), k - contextual)
        if contextual == 0:
            return ops.mask_to_indices(dominant)
        merged, at, group = ops.merge_into_targets(patches, ctx.merge_metric(), ~dominant, contextual)
        return EncoderMerge(ops.mask_to_indices(dominant), merged, at, group)
