"""Token scores: how much a visual token matters, from features or from attention rows.

Every function is pure (tensors in, tensors out). Shapes use B = batch, N = tokens,
D = channels, H = heads, d = head width, Q = query rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "mean_similarity",
    "activation_norm",
    "attention_rows",
    "cls_attention",
    "received_attention",
    "cooperative_redundancy",
    "within_redundancy",
    "visual_attention_values",
]


def _valid(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return mask.bool()


def mean_similarity(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity of each token to the mean token (METEOR's shallow stage-1 score).

    Args:
        x: (B, N, D) token features.
        mask: (B, N) bool, True for real tokens; padding is left out of the mean.
    Returns:
        (B, N) similarity in [-1, 1]; high means "looks like the average", i.e. background.
    """
    valid = _valid(mask, x)
    w = valid.to(x.dtype).unsqueeze(-1)
    mean = (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
    return F.cosine_similarity(x, mean.expand_as(x), dim=-1, eps=1e-8)


def activation_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each token's feature vector: how strongly a CNN's output cell responds.

    A CNN has no attention to score its cells with; the energy of its activations over channels is the
    usual spatial saliency map of a convolutional network (strong on edges and objects, weak on flat
    background).

    Args:
        x: (B, N, D) token features.
    Returns:
        (B, N) non-negative norms; high means "salient".
    """
    return x.float().norm(dim=-1)


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of a few query rows over all keys, without the full N x N map.

    Args:
        q: (B, H, Q, d) queries of the rows we need (already rotated if the model uses RoPE).
        k: (B, H, N, d) keys.
        scale: the layer's softmax scale (usually d ** -0.5).
        key_mask: (B, N) or (B, Q, N) bool, True where a key may be attended to.
        softcap: where the layer soft-caps its attention logits (Gemma 2), the cap c: logits become
            c * tanh(logits / c) before the softmax.
        sinks: (H,) where the layer has learned attention sinks (GPT-OSS), each head's sink logit: a column that takes
            its share of the softmax but is no key (the rows then sum to less than 1).
    Returns:
        (B, H, Q, N) attention probabilities in float32; masked keys get 0.
    """
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if key_mask is not None:
        m = key_mask.bool()
        m = m[:, None, None, :] if m.dim() == 2 else m[:, None, :, :]
        logits = logits.masked_fill(~m, float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
        return torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with no key: 0


def cls_attention(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention from the CLS token to every token, averaged over heads, from the CLS row alone.

    Args:
        q_cls: (B, H, d) the CLS token's query.
        k: (B, H, N, d) keys of all tokens (CLS included).
        scale: softmax scale.
    Returns:
        (B, N) head-averaged attention of CLS to each token (rows sum to 1).
    """
    return attention_rows(q_cls.unsqueeze(2), k, scale)[:, :, 0, :].mean(1)


def received_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    chunk_size: int = 256,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean attention each token receives, over all queries and heads (score for experts without CLS).

    Computed in query chunks so memory stays O(chunk_size x N) instead of O(N x N).

    Args:
        q: (B, H, N, d) queries; k: (B, H, N, d) keys.
        scale: softmax scale.
        mask: (B, N) bool, True for real tokens (padding neither sends nor receives).
        chunk_size: query rows per chunk.
        groups: (B, N) long, or None: a query attends to the keys of its own group only (windowed attention),
            computed group by group.
    Returns:
        (B, N) mean received attention; sums to 1 over valid tokens.
    """
    B, H, N, _ = q.shape
    valid = torch.ones(B, N, dtype=torch.bool, device=q.device) if mask is None else mask.bool()
    total = torch.zeros(B, N, dtype=torch.float32, device=q.device)
    if groups is not None:  # each group's own queries and keys: no logit across two groups is computed
        for b in range(B):
            for g in torch.unique(groups[b][valid[b]]).tolist():
                idx = ((groups[b] == g) & valid[b]).nonzero()[:, 0]
                total[b, idx] += attention_rows(q[b : b + 1, :, idx], k[b : b + 1, :, idx], scale).sum((1, 2))[0]
        return total / (H * valid.float().sum(1, keepdim=True).clamp_min(1))
    for start in range(0, N, chunk_size):
        keys = None if mask is None else valid
        rows = attention_rows(q[:, :, start : start + chunk_size], k, scale, keys)
        row_valid = valid[:, start : start + chunk_size].float()  # (B, Qc)
        total += (rows.sum(1) * row_valid[..., None]).sum(1)  # (an einsum here took 30x longer on CPU)
    return total / (H * valid.float().sum(1, keepdim=True).clamp_min(1))


def cooperative_redundancy(
    z: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-expert redundancy R_i^j = sum_{l != j} sum_m cos(z_i^j, z_m^l), in closed form.

    With unit vectors u, sum_m cos(z_i, z_m^l) = u_i . S_l where S_l is the sum of expert l's unit
    vectors, so R_i = u_i . (S - S_{j(i)}): linear in N, no N x N similarity matrix.

    Args:
        z: (B, N, D) projected tokens of all experts, concatenated along the sequence.
        expert_ids: (N,) or (B, N) long, the expert (0..num_experts-1) each token came from.
        num_experts: C.
        mask: (B, N) bool, True for real tokens.
    Returns:
        (B, N) redundancy; low means the token carries what the other experts do not.
    """
    valid = _valid(mask, z)
    u = F.normalize(z.float(), dim=-1) * valid.unsqueeze(-1)
    ids = expert_ids.expand(z.shape[:2]) if expert_ids.dim() == 1 else expert_ids
    onehot = F.one_hot(ids.long(), num_experts).float() * valid.unsqueeze(-1)  # (B, N, C)
    per_expert = torch.einsum("bnc,bnd->bcd", onehot, u)  # S_l: (B, C, D)
    own = torch.gather(per_expert, 1, ids.long().unsqueeze(-1).expand(-1, -1, u.shape[-1]))
    others = per_expert.sum(1, keepdim=True) - own
    return (u * others).sum(-1)


def within_redundancy(z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Summed cosine similarity of each token to the other tokens of the same set, in closed form.

    Args:
        z: (B, N, D) tokens; mask: (B, N) bool.
    Returns:
        (B, N) sum_{m != i} cos(z_i, z_m).
    """
    valid = _valid(mask, z)
    u = F.normalize(z.float(), dim=-1) * valid.unsqueeze(-1)
    return (u * u.sum(1, keepdim=True)).sum(-1) - (u * u).sum(-1)


def visual_attention_values(attn: torch.Tensor, visual_mask: torch.Tensor) -> torch.Tensor:
    """Per-head visual attention value VAV_h = sum_i a_{i,h} over visual tokens i.

    Args:
        attn: (B, H, N) attention of the text query (rows averaged if several) to every key.
        visual_mask: (B, N) bool, True for visual tokens.
    Returns:
        (B, H) share of each head's attention that lands on the image, in [0, 1].
    """
    return (attn * visual_mask[:, None, :].to(attn.dtype)).sum(-1)
