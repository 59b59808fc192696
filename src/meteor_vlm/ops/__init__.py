"""Pure tensor functions behind every method: scores, selection, budgets, metrics.

No nn.Module state and no transformers import: the algorithms, readable on their own.
"""

from .budgets import ALLOCATIONS, adaptive_budget, allocate_budget, allocation_weights, feature_rank, staged_budgets
from .merging import bipartite_soft_matching, density_peak_clusters, merge_groups, merge_into_kept, merge_into_targets, supplement_from_neighbours
from .metrics import diversity, layer_averaged_tokens, tokens_per_layer
from .scores import (
    activation_norm,
    attention_rows,
    cls_attention,
    cooperative_redundancy,
    mean_similarity,
    received_attention,
    visual_attention_values,
    within_redundancy,
)
from .selection import (
    gather_tokens,
    iqr_outliers,
    mask_to_indices,
    mask_to_padded_indices,
    max_min_diverse,
    top_heads,
    topk_indices,
    topk_mask,
)

__all__ = [
    "ALLOCATIONS",
    "activation_norm",
    "adaptive_budget",
    "allocate_budget",
    "allocation_weights",
    "attention_rows",
    "bipartite_soft_matching",
    "cls_attention",
    "cooperative_redundancy",
    "density_peak_clusters",
    "diversity",
    "feature_rank",
    "gather_tokens",
    "iqr_outliers",
    "layer_averaged_tokens",
    "mask_to_indices",
    "mask_to_padded_indices",
    "merge_groups",
    "merge_into_kept",
    "merge_into_targets",
    "supplement_from_neighbours",
    "max_min_diverse",
    "mean_similarity",
    "received_attention",
    "staged_budgets",
    "tokens_per_layer",
    "top_heads",
    "topk_indices",
    "topk_mask",
    "visual_attention_values",
    "within_redundancy",
]
