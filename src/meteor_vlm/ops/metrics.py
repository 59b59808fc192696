"""Metrics of kept tokens: diversity, layer-averaged token count."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = ["diversity", "layer_averaged_tokens", "tokens_per_layer"]


def diversity(x: torch.Tensor) -> float:
    """Diversity of a token set, ||A||_* / N with rows normalised to unit length (METEOR, 002 §A).

    Bounded by sqrt(min(N, D)) / sqrt(N) <= 1, so sets of different sizes can be compared.

    Args:
        x: (N, D) tokens.
    Returns:
        diversity in (0, 1]; 1/sqrt(N) for N identical tokens, 1 for N orthogonal ones.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"diversity needs a non-empty (N, D) matrix, got shape {tuple(x.shape)}")
    a = F.normalize(x.float(), dim=-1)
    return float(torch.linalg.svdvals(a).sum() / a.shape[0])


def tokens_per_layer(num_layers: int, initial: int, drops: Mapping[int, int]) -> list[int]:
    """Visual tokens seen by each LLM layer, given the count kept before each pruning layer.

    Args:
        num_layers: LLM depth.
        initial: visual tokens entering the LLM.
        drops: {layer index: tokens kept from that layer on}.
    Returns:
        num_layers counts.
    """
    counts, cur = [], initial
    for layer in range(num_layers):
        cur = drops.get(layer, cur)
        counts.append(cur)
    return counts


def layer_averaged_tokens(counts: Sequence[int]) -> float:
    """The "242*" figure: visual tokens seen by each LLM layer, averaged over layers.

    Args:
        counts: one count per LLM layer.
    Returns:
        the mean.
    """
    if len(counts) == 0:
        raise ValueError("need at least one layer")
    return float(sum(counts)) / len(counts)
