"""SparseVLM: text raters score the visual tokens at a few LLM layers; some dropped tokens are recycled.

Raters: before LLM layer 0, each text token after the first image (the instruction) is rated by how much
the visual tokens point at it: the mean over visual tokens v of softmax over text tokens t of <v, t>,
on the input embeddings. The text tokens rated at least the mean are the raters (at least one always is).

At each of its layers (the first layers that see each pruned sequence: 3, 7 and 16 of 32, after its
sparse layers 2, 6 and 15, scaled to the model's depth), the raters' attention to the visual tokens,
from that layer's own query/key projections with RoPE, averaged over heads and raters, scores the visual
tokens present; each sample keeps the round(keep[j] * N) best (N: the visual tokens that entered the LLM).
Recycling: of the tokens dropped there, the ceil(recycle * dropped) best scored are clustered
(`ops.density_peak_clusters`, ceil(cluster * recycled) clusters) and each cluster becomes one token,
the plain mean of its members' hidden states, at the place and RoPE position of its centre. Recycled
tokens count as visual tokens at the later layers (they may be dropped or recycled again).

The defaults are SparseVLM's 192-token setting on LLaVA-1.5 (576 visual tokens: 300, 200 and 110 kept;
30% of the dropped recycled into a tenth as many clusters). Reading of the published method: the
scores come from the attention of the first layer that sees the pruned sequence (SparseVLM prunes the
output of the layer whose attention scored it), and merged tokens keep a dropped token's position (its
released code compacts positions, which this runtime never does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..models.runtime import LLMMerge
from .base import PruningMethod, check_llm_layers, check_ratio, register

__all__ = ["SparseVLM", "SPARSEVLM_LAYERS", "SPARSEVLM_KEEP"]

SPARSEVLM_LAYERS = (3, 7, 16)  # of a 32-layer LLM: the first layers after its sparse layers 2, 6 and 15
SPARSEVLM_KEEP = (300 / 576, 200 / 576, 110 / 576)  # its 192-token setting


@register
@dataclass
class SparseVLM(PruningMethod):
    """SparseVLM's settings: `keep` (per stage, the share of the visual tokens that entered the LLM kept from
    that stage's layer on, recycled tokens not counted), `layers` (0-based LLM layers that start each stage;
    None: 3/7/16 of 32 scaled to the depth, each at least one after the previous), `recycle` (the share of
    each stage's dropped tokens recycled, the best scored; 0: none) and `cluster` (clusters per recycled
    token)."""

    name: ClassVar[str] = "sparsevlm"
    keep: tuple[float, ...] = SPARSEVLM_KEEP
    layers: tuple[int, ...] | None = None
    recycle: float = 0.3
    cluster: float = 0.1

    def validate(self) -> None:
        self.keep = tuple(float(k) for k in self.keep)
        if not self.keep:
            raise ValueError("keep needs a share for at least one stage")
        for k in self.keep:
            check_ratio("keep", k)
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if any(int(i) != i or i < 0 for i in self.layers):
                raise ValueError(f"layers must be layer indices >= 0, got {self.layers}")
            check_llm_layers(self.layers)
            if len(self.layers) != len(self.keep):
                raise ValueError(f"{len(self.layers)} layers for {len(self.keep)} keep shares")
        elif len(self.keep) != len(SPARSEVLM_LAYERS):
            raise ValueError(f"the default layers are {len(SPARSEVLM_LAYERS)} stages; got {len(self.keep)} keep "
                             "shares: pass layers= too")
        check_ratio("recycle", self.recycle)
        if not 0.0 < float(self.cluster) <= 1.0:
            raise ValueError(f"cluster must be in (0, 1], got {self.cluster}")

    @staticmethod
    def scaled_layers(depth: int, reference=SPARSEVLM_LAYERS, reference_depth: int = 32) -> tuple[int, ...]:
        """SparseVLM's layers at the same relative depth of a `depth`-layer LLM, each at least one after
        the previous (ValueError if the LLM is too shallow for them)."""
        out: list[int] = []
        for r in reference:
            out.append(max(int(math.floor(r * depth / reference_depth + 0.5)), out[-1] + 1 if out else 1))
        if out[-1] >= depth:
            raise ValueError(f"a {depth}-layer LLM is too shallow for {len(reference)} SparseVLM stages after "
                             "layer 0: pass layers=")
        return tuple(out)

    def _layers(self, depth: int) -> tuple[int, ...]:
        return self.layers if self.layers is not None else self.scaled_layers(depth)

    def setup(self, model) -> None:
        check_llm_layers(self._layers(model.num_llm_layers), model.num_llm_layers)

    def llm_layers(self, num_layers: int) -> set[int]:
        return {0} | set(self._layers(num_layers))  # layer 0: choose the raters on the input embeddings

    # ---- raters ----------------------------------------------------------------------------------
    @staticmethod
    def rater_mask(ctx) -> torch.Tensor:
        """(B, T) bool: the text raters of each sample, from this context's hidden states (`ctx.hidden`,
        the input embeddings before layer 0)."""
        text = ctx.text_query_mask & (ctx.visual.long().cumsum(1) > 0)  # the instruction, after the first image
        text = torch.where(text.any(1, keepdim=True), text, ctx.text_query_mask)  # no text after it: all text
        vis = ctx.visual & ctx.valid
        tidx = ops.mask_to_padded_indices(text)  # (B, Q): the text columns, -1 in empty slots
        h = ctx.hidden.float()
        logits = h @ ops.gather_tokens(h, tidx.clamp_min(0)).transpose(1, 2)  # (B, T, Q)
        soft = torch.softmax(logits.masked_fill(tidx[:, None, :] < 0, float("-inf")), dim=-1) * vis[:, :, None]
        rating = soft.sum(1) / vis.sum(1, keepdim=True).clamp_min(1)  # (B, Q): mean over the visual tokens
        rated = tidx >= 0
        mean = (rating * rated).sum(1, keepdim=True) / rated.sum(1, keepdim=True).clamp_min(1)
        chosen = rated & (rating >= mean)
        out = torch.zeros_like(text)
        rows = torch.arange(text.shape[0], device=text.device)[:, None].expand_as(tidx)
        out[rows[chosen], tidx[chosen]] = True
        return out

    def prune_llm(self, ctx) -> torch.Tensor | LLMMerge | None:
        if ctx.layer_idx == 0:
            # raters stay text tokens (never dropped) and keep their RoPE positions: remember those
            ridx = ops.mask_to_padded_indices(self.rater_mask(ctx))
            self._rater_positions = ctx.positions.gather(1, ridx.clamp_min(0)).masked_fill(ridx < 0, -1)
        layers = self._layers(ctx.num_layers)
        if ctx.layer_idx not in layers:
            return None
        raters = (ctx.positions[:, :, None] == self._rater_positions[:, None, :]).any(-1) & ctx.valid & ~ctx.visual
        return self.select(ctx, raters, self.keep[layers.index(ctx.layer_idx)])

    def scores(self, ctx, raters: torch.Tensor) -> torch.Tensor:
        """(B, T): the raters' attention to each column at this layer, averaged over heads and raters."""
        qidx = ops.mask_to_padded_indices(raters)
        qvalid = qidx >= 0
        rows = ctx.attention_rows(qidx.clamp_min(0), qvalid)  # (B, H, Q, T)
        return rows.mean(1).sum(1) / qvalid.sum(1, keepdim=True).clamp_min(1)

    def select(self, ctx, raters: torch.Tensor, share: float) -> torch.Tensor | LLMMerge:
        """This stage's answer: keep the best scored visual tokens, recycle the best of the dropped ones."""
        vis = ctx.visual & ctx.valid
        score = self.scores(ctx, raters)
        available = vis.sum(1)
        k = torch.minimum(torch.round(share * ctx.llm_visual_tokens.float()).long(), available)
        keep_vis = ops.topk_mask(score, k, candidates=vis)
        keep = (ctx.valid & ~ctx.visual) | keep_vis
        dropped = vis & ~keep_vis
        centre = torch.zeros_like(vis)  # the columns merged tokens take the place of
        recycled = torch.zeros_like(ctx.hidden)  # each merged token, at its column
        for b in range(vis.shape[0]):
            r = math.ceil(self.recycle * int(dropped[b].sum()) - 1e-9)
            if r == 0:
                continue
            cols = ops.mask_to_indices(ops.topk_mask(score[b : b + 1], r, candidates=dropped[b : b + 1]))[0]
            centres, assign = ops.density_peak_clusters(ctx.hidden[b, cols], math.ceil(self.cluster * r - 1e-9))
            members = ctx.hidden[b, cols][None]
            merged, _ = ops.merge_groups(members, torch.ones(members.shape[:2], device=vis.device), centres[assign][None])
            centre[b, cols[centres]] = True
            recycled[b, cols[centres]] = merged[0]
        if not centre.any():
            return keep
        at = ops.mask_to_padded_indices(centre)  # both ascending: merged tokens in the order of their columns
        return LLMMerge(keep, ops.gather_tokens(recycled, at.clamp_min(0)), at)
