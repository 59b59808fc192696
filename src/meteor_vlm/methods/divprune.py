"""DivPrune: keep the most diverse projected visual tokens (greedy max-min diversity), once, before the LLM.

After the projectors, over all experts' tokens in the LLM's width, the greedy solution of the max-min
diversity problem in cosine distance (`ops.max_min_diverse`) chooses which tokens enter the LLM; they
keep their order. No attention and no text: the choice is the same for any question about the image.
Nothing happens inside the experts or the LLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from .base import FusionPoint, PruningMethod, check_ratio, register

__all__ = ["DivPrune"]


@register
@dataclass
class DivPrune(PruningMethod):
    """DivPrune's setting: `keep`, the share of the projected visual tokens kept (round(keep * N)),
    or `tokens`, a count (used when given)."""

    name: ClassVar[str] = "divprune"
    keep: float = 0.098
    tokens: int | None = None

    def validate(self) -> None:
        check_ratio("keep", self.keep)
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens < 1):
            raise ValueError(f"tokens must be a positive int, got {self.tokens!r}")

    def prune_fusion(self, ctx: FusionPoint) -> torch.Tensor | None:
        n = ctx.tokens.shape[1]
        k = self.tokens if self.tokens is not None else round(self.keep * n)
        if not 1 <= k <= n:
            raise ValueError(f"DivPrune budget {k} must be between 1 and the tokens available ({n})")
        if k == n:
            return None
        return ops.mask_to_indices(ops.max_min_diverse(ctx.tokens, k))
