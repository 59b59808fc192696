"""PyramidDrop: drop visual tokens in stages through the LLM, keeping a geometric share of them.

Before each of its LLM layers (8, 16 and 24 of 32, scaled to the model's depth), the last prompt
token's attention, computed from that layer's own query/key projections with RoPE and averaged over
heads, ranks the visual tokens still present; after stage j the sample keeps round(ratio^j * N) of
the N visual tokens that entered the LLM (0.5, 0.25, 0.125 of them with the default ratio), each at its
original RoPE position. Nothing happens in the experts or at fusion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import PruningMethod, check_llm_layers, keep_most_attended, register
from .meteor import scaled_llm_layers

__all__ = ["PyramidDrop", "PYRAMIDDROP_LAYERS"]

PYRAMIDDROP_LAYERS = (8, 16, 24)  # of a 32-layer LLM


@register
@dataclass
class PyramidDrop(PruningMethod):
    """PyramidDrop's settings: `ratio` (lambda, the share of the previous stage's visual tokens each stage
    keeps) and `layers` (0-based LLM layers that start a stage; None: 8/16/24 of 32 scaled to the depth)."""

    name: ClassVar[str] = "pyramiddrop"
    ratio: float = 0.5
    layers: tuple[int, ...] | None = None

    def validate(self) -> None:
        if not 0.0 < float(self.ratio) <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if not self.layers or any(int(i) != i or i < 0 for i in self.layers):
                raise ValueError(f"layers must be layer indices >= 0, got {self.layers}")
            check_llm_layers(self.layers)

    def _layers(self, depth: int) -> tuple[int, ...]:
        return self.layers if self.layers is not None else scaled_llm_layers(depth, PYRAMIDDROP_LAYERS)

    def setup(self, model) -> None:
        check_llm_layers(self._layers(model.num_llm_layers), model.num_llm_layers)

    def llm_layers(self, num_layers: int) -> set[int]:
        return set(self._layers(num_layers))

    def prune_llm(self, ctx) -> torch.Tensor:
        stage = self._layers(ctx.num_layers).index(ctx.layer_idx) + 1
        return keep_most_attended(ctx, torch.round(self.ratio**stage * ctx.llm_visual_tokens.float()).long())
