"""DART: once, early in the LLM, keep the visual tokens least duplicated with a few pivot tokens.

Before LLM layer `layer` (K), pivots are chosen by the L1 norm of that layer's keys (its key projection
of the normed input, before RoPE, which only rotates channel pairs): the `image_pivots` visual tokens
and the `text_pivots` prompt-text tokens after the image with the largest norms. The visual pivots are
kept. The rest of the budget, round((1 - ratio) * N) visual tokens in all, is split evenly over the
pivots (the first ones take the remainder); pivot by pivot, in that order, the not-yet-kept visual
tokens whose hidden states are least cosine-similar to the pivot's are kept. Kept tokens keep their
RoPE positions; layers before K see every token. No attention map is needed, so every layer stays SDPA.

Differences from the reference code, on purpose: the budget is met exactly (the reference keeps
floor(budget / pivots) per pivot plus the visual pivots), and each sample of a padded batch gets its
own pivots and budget (the reference is batch-1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops
from .base import PruningMethod, check_layer_index, check_llm_layers, check_ratio, register

__all__ = ["DART"]


@register
@dataclass
class DART(PruningMethod):
    """DART's settings: `layer` (K, the first LLM layer that sees the pruned sequence, 0-based), `ratio`
    (the share of each sample's visual tokens dropped there), `image_pivots` and `text_pivots` (how many
    pivots of each kind, at most the tokens of that kind)."""

    name: ClassVar[str] = "dart"
    layer: int = 2
    ratio: float = 0.778
    image_pivots: int = 4
    text_pivots: int = 4

    def validate(self) -> None:
        check_ratio("ratio", self.ratio)
        check_layer_index("layer", self.layer)
        if int(self.image_pivots) != self.image_pivots or self.image_pivots < 1:
            raise ValueError(f"image_pivots must be an int >= 1, got {self.image_pivots}")
        if int(self.text_pivots) != self.text_pivots or self.text_pivots < 0:
            raise ValueError(f"text_pivots must be an int >= 0, got {self.text_pivots}")

    def setup(self, model) -> None:
        check_llm_layers((self.layer,), model.num_llm_layers)

    def llm_layers(self, num_layers: int) -> set[int]:
        return {self.layer}

    def prune_llm(self, ctx) -> torch.Tensor:
        visual = ctx.visual & ctx.valid
        text = ctx.text_query_mask & (ctx.visual.long().cumsum(1) > 0)  # prompt text after the first image
        keep = torch.round((1.0 - self.ratio) * visual.sum(1).float()).long()  # (B,)
        norm = ctx.key_states().float().abs().sum(-1)  # (B, T)

        def by_norm(candidates, count, most):
            """(B, most) columns of the candidates in decreasing key norm; (B, most) which are real pivots."""
            order = torch.sort(norm.masked_fill(~candidates, float("-inf")), dim=1, descending=True, stable=True).indices
            order = order[:, :most]
            return order, torch.arange(order.shape[1], device=order.device) < count[:, None]

        image_idx, image_ok = by_norm(visual, torch.clamp(keep, max=self.image_pivots), self.image_pivots)
        text_idx, text_ok = by_norm(text, torch.clamp(text.sum(1), max=self.text_pivots), self.text_pivots)
        pivots, real = torch.cat([image_idx, text_idx], 1), torch.cat([image_ok, text_ok], 1)
        kept = torch.zeros_like(visual).scatter(1, image_idx, image_ok)

        rest = keep - image_ok.sum(1)  # (B,) the budget left after the visual pivots
        count = real.sum(1).clamp_min(1)
        order = real.long().cumsum(1) - 1
        quota = torch.where(real, rest[:, None] // count[:, None] + (order < (rest % count)[:, None]).long(), 0)

        unit = F.normalize(ctx.hidden.float(), dim=-1)  # (B, T, D)
        for p in range(pivots.shape[1]):
            similarity = (unit * ops.gather_tokens(unit, pivots[:, p : p + 1])).sum(-1)  # (B, T)
            kept |= ops.topk_mask(similarity, quota[:, p], candidates=visual & ~kept, largest=False)
        return (ctx.valid & ~ctx.visual) | kept
