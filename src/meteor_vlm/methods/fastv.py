"""FastV: once, early in the LLM, drop the visual tokens the last instruction token attends to least.

Before LLM layer `layer` (K), the last prompt token's attention over the sequence, computed from that
layer's own query/key projections with RoPE and averaged over all heads, ranks the visual tokens; the
top (1 - ratio) share is kept for layer K and every layer after it, at its original RoPE position.
Layers before K see every token. Nothing happens in the experts or at fusion.

FastV's layer K is a position in its LLM's depth (K = 2 of 32 layers in its paper); on a shallower
model, scale it (`scaled_layer`) to compare at the same relative depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import PruningMethod, check_layer_index, check_llm_layers, check_ratio, keep_most_attended, register
from .meteor import scaled_llm_layers

__all__ = ["FastV"]


@register
@dataclass
class FastV(PruningMethod):
    """FastV's settings: `layer` (K, the first LLM layer that sees the pruned sequence, 0-based) and
    `ratio` (R, the share of each sample's visual tokens dropped there; kept: round((1 - R) * N))."""

    name: ClassVar[str] = "fastv"
    layer: int = 2
    ratio: float = 0.5

    def validate(self) -> None:
        check_ratio("ratio", self.ratio)
        check_layer_index("layer", self.layer)

    def setup(self, model) -> None:
        check_llm_layers((self.layer,), model.num_llm_layers)

    @staticmethod
    def scaled_layer(num_layers: int, layer: int = 2, reference_depth: int = 32) -> int:
        """FastV's K (2 of 32 by default) at the same relative depth of a `num_layers`-layer LLM."""
        return scaled_llm_layers(num_layers, (layer,), reference_depth)[0]

    def llm_layers(self, num_layers: int) -> set[int]:
        return {self.layer}

    def prune_llm(self, ctx) -> torch.Tensor:
        available = (ctx.visual & ctx.valid).sum(1)
        return keep_most_attended(ctx, torch.round((1.0 - self.ratio) * available.float()).long())
