"""METEOR: multi-encoder collaborative token pruning, in three stages (PAPER.md).

1. Inside each expert (rank-guided assignment): at the ends of the expert's three thirds, drop the
   patch tokens most similar to the mean token (first point) or least attended by CLS (later points;
   mean received attention for experts without CLS, or mean similarity there too: ``nocls_score``). The
   tokens kept at each point are split over the experts in proportion to their stored feature rank. A CNN
   is pruned once, at its output (by the mean-similarity score, or by its activations' norm: ``cnn_score``).
2. At fusion (cooperative pruning): keep the K tokens, over all experts, least redundant with the
   other experts' tokens.
3. In the LLM (instance-adaptive, text-guided): at layers scaled from 4/12/20 of 32, score visual
   tokens by the text query's attention in the top-k heads and keep K = lambda * sum(VAV) of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import ClassVar

import torch

from .. import ops
from .base import (
    EncoderPoint,
    FusionPoint,
    PruningMethod,
    check_llm_layers,
    check_ratio,
    expert_ranks,
    register,
    stage1_plan,
)

__all__ = ["Meteor", "scaled_llm_layers", "PAPER_LLM_LAYERS"]

PAPER_LLM_LAYERS = (4, 12, 20)  # of a 32-layer LLM
FUSION_STRATEGIES = ("cooperative", "separate", "random")
QUERIES = ("last", "text")
CNN_SCORES = ("mean-similarity", "activation")
NOCLS_SCORES = ("received-attention", "mean-similarity")
BUDGETS = ("adaptive", "fixed")


def scaled_llm_layers(num_layers: int, reference=PAPER_LLM_LAYERS, reference_depth: int = 32) -> tuple[int, ...]:
    """The paper's pruning layers (4, 12, 20 of 32) scaled to another depth, distinct and in range."""
    layers = sorted({min(num_layers - 1, int(math.floor(r * num_layers / reference_depth + 0.5))) for r in reference})
    return tuple(layers)


@register
@dataclass
class Meteor(PruningMethod):
    """METEOR's three stages; each can be switched off or used alone.

    Stage 1 (encoder): ``encoder_keep`` share of all experts' patch tokens kept after stage 1
    (or ``encoder_tokens`` as a count), reached geometrically over the three pruning points (on a model
    whose images each have their own grid, Qwen2-VL, the share of each image's tokens; no count);
    ``allocation`` = "rank" | "average" | "rank-reverse"; ``rank_table``: a dict, a JSON path, or
    None to use the model's ``config.rank_table`` (from ``meteor calibrate``). ``cnn_score``: how an expert
    with no blocks to prune inside (a CNN, pruned once at its output) ranks its cells: "mean-similarity"
    (the shallow score: drop the cells most like the mean cell) or "activation" (keep the cells whose
    trunk features, before the CNN's output norm if it has one, have the largest norm, `ops.activation_norm`).
    ``nocls_score``: how an expert without CLS ranks its tokens at its later pruning points (PAPER.md leaves it
    open): "received-attention" (keep the tokens that receive the most attention, averaged over queries and
    heads) or "mean-similarity" (drop those most like the mean token, the first point's score, at every point).

    Stage 2 (fusion): ``fusion_keep`` share of stage 1's output kept (or ``fusion_tokens``);
    ``fusion_strategy`` = "cooperative" | "separate" | "random".

    Stage 3 (LLM): ``layers`` (None = 4/12/20 of 32 scaled to the model), ``lam`` (one value or one per
    layer), ``lam_reference_tokens``: lambda is given for this many visual tokens entering the LLM and
    scaled to the actual count (None = use lambda as is), ``top_heads`` (k), ``query`` = "last" (last
    instruction token) | "text" (all prompt text tokens after the first image), ``budget`` =
    "adaptive" | "fixed" (keep ``fixed_keep[i]`` of the LLM's visual input at layer i, the ablation).
    """

    name: ClassVar[str] = "meteor"

    encoder: bool = True
    encoder_keep: float = 1193 / 4096
    encoder_tokens: int | None = None
    allocation: str = "rank"
    rank_table: dict | str | None = None
    cnn_score: str = "mean-similarity"
    nocls_score: str = "received-attention"

    fusion: bool = True
    fusion_keep: float = 576 / 1193
    fusion_tokens: int | None = None
    fusion_strategy: str = "cooperative"

    llm: bool = True
    layers: tuple[int, ...] | None = None
    lam: float | tuple[float, ...] = 50.0
    lam_reference_tokens: int | None = 576
    top_heads: int = 5
    query: str = "last"
    budget: str = "adaptive"
    fixed_keep: tuple[float, ...] = (390 / 576, 172 / 576, 78 / 576)

    seed: int = 0
    _plan: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    PRESETS: ClassVar[dict[str, dict]] = {
        "paper-312": {"lam": 65.0},
        "paper-242": {"lam": 50.0},
        "paper-126": {"lam": 25.0},
        "stage1": {"fusion": False, "llm": False},
        "stage2": {"encoder": False, "llm": False},
        "stage3": {"encoder": False, "fusion": False},
        "stage1+3": {"fusion": False},
    }

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def presets(cls) -> list[str]:
        """Names accepted by `Meteor.preset`."""
        return list(cls.PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides) -> Meteor:
        """A preset of the paper's settings (see `presets()`), with optional overrides."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown METEOR preset {name!r}; known presets: {cls.presets()}")
        return cls(**{**cls.PRESETS[name], **overrides})

    def with_(self, **changes) -> Meteor:
        """A copy with some settings changed (validated again)."""
        return replace(self, **changes)

    def validate(self) -> None:
        check_ratio("encoder_keep", self.encoder_keep)
        check_ratio("fusion_keep", self.fusion_keep)
        for r in self.fixed_keep:
            check_ratio("fixed_keep", r)
        for name in ("encoder_tokens", "fusion_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.allocation not in ops.ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; choose one of {ops.ALLOCATIONS}")
        if self.cnn_score not in CNN_SCORES:
            raise ValueError(f"unknown cnn_score {self.cnn_score!r}; choose one of {CNN_SCORES}")
        if self.nocls_score not in NOCLS_SCORES:
            raise ValueError(f"unknown nocls_score {self.nocls_score!r}; choose one of {NOCLS_SCORES}")
        if self.fusion_strategy not in FUSION_STRATEGIES:
            raise ValueError(f"unknown fusion_strategy {self.fusion_strategy!r}; choose one of {FUSION_STRATEGIES}")
        if self.query not in QUERIES:
            raise ValueError(f"unknown query {self.query!r}; choose one of {QUERIES}")
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget {self.budget!r}; choose one of {BUDGETS}")
        lams = self.lam if isinstance(self.lam, (tuple, list)) else (self.lam,)
        if any(float(v) < 0 for v in lams):
            raise ValueError(f"lambda must be >= 0, got {self.lam}")
        if self.top_heads < 1:
            raise ValueError(f"top_heads must be >= 1, got {self.top_heads}")
        if self.layers is not None and any(int(i) < 0 for i in self.layers):
            raise ValueError(f"LLM layers must be >= 0, got {self.layers}")
        if self.lam_reference_tokens is not None and self.lam_reference_tokens < 1:
            raise ValueError(f"lam_reference_tokens must be >= 1, got {self.lam_reference_tokens}")

    # ---- planning (when attached to a model) ------------------------------------------------------
    def setup(self, model) -> None:
        plan: dict = {}
        runners = model.runners
        if self.encoder:
            if model.config.fusion == "pre":
                raise ValueError("stage 1 (encoder pruning) needs post-projection fusion; this model fuses channels")
            if all(r.fixed_grid for r in runners):
                plan["encoder"] = self._plan_encoder(model)
            elif self.encoder_tokens is not None:  # one expert whose images each have their own grid (Qwen2-VL)
                raise ValueError("encoder_tokens is a count for a fixed grid; this model's images each have their own "
                                 "grid: give encoder_keep, a share of each image's tokens")
            else:
                plan["encoder"] = {}  # planned for each grid as it comes (_encoder_steps)
        if self.fusion:
            if model.config.fusion == "pre" or len(runners) < 2:
                raise ValueError("stage 2 (cooperative fusion pruning) needs at least two experts fused along the sequence")
            counts = {r.spec.name: r.num_patches for r in runners}
            if self.encoder:
                counts = {n: c[-1] for n, c in plan["encoder"].items()}
            n_in = sum(counts.values())
            k = self.fusion_tokens if self.fusion_tokens is not None else max(1, round(self.fusion_keep * n_in))
            if k > n_in:
                raise ValueError(f"fusion budget {k} is larger than the tokens available after stage 1 ({n_in})")
            plan["fusion"] = k
        if self.llm:
            depth = model.num_llm_layers
            layers = tuple(self.layers) if self.layers is not None else scaled_llm_layers(depth)
            check_llm_layers(layers, depth)
            heads = model.config.text_config.num_attention_heads
            if self.top_heads > heads:
                raise ValueError(f"top_heads={self.top_heads} but the LLM has {heads} heads")
            lams = tuple(self.lam) if isinstance(self.lam, (tuple, list)) else (float(self.lam),) * len(layers)
            if len(lams) != len(layers):
                raise ValueError(f"{len(lams)} lambda values for {len(layers)} pruning layers {layers}")
            if self.budget == "fixed" and len(self.fixed_keep) != len(layers):
                raise ValueError(f"{len(self.fixed_keep)} fixed_keep ratios for {len(layers)} pruning layers {layers}")
            plan["llm"] = dict(zip(layers, range(len(layers))))
            plan["lam"] = lams
        self._plan = plan

    def _ranks(self, model) -> dict:
        return expert_ranks(model, self.rank_table, f"allocation={self.allocation!r}")

    def _plan_encoder(self, model) -> dict[str, list[int]]:
        """Patch tokens each expert keeps after each of its pruning points: {expert: [n1, n2, n3]}."""
        # a single expert (a stock LLaVA's tower) takes the whole budget whatever the split, so needs no rank table
        allocation = self.allocation if len(model.runners) > 1 else "average"
        ranks = self._ranks(model) if allocation != "average" else None
        return stage1_plan(model, ranks, allocation, self.encoder_keep, self.encoder_tokens)

    # ---- stage 1 ---------------------------------------------------------------------------------
    def prunes_in_encoder(self) -> bool:
        return self.encoder

    def _encoder_steps(self, ctx: EncoderPoint) -> list[int]:
        """The patch tokens ctx's expert keeps after each of its pruning points: planned when attached, or, for
        an expert whose images each have their own grid (one expert: the whole budget), from this one's."""
        planned = self._plan["encoder"].get(ctx.expert)
        if planned is None:  # ctx.runner walks the images of one grid
            planned = stage1_plan(SimpleNamespace(runners=[ctx.runner]), None, "average", self.encoder_keep)[ctx.expert]
        return planned

    def prune_encoder(self, ctx: EncoderPoint) -> torch.Tensor | None:
        if not self.encoder:
            return None
        steps = self._encoder_steps(ctx)
        staged = len(steps) == 3
        keep = steps[ctx.point] if staged else steps[0]
        patches = ctx.patches
        if keep >= patches.shape[1]:
            return None
        if ctx.block is None and self.cnn_score == "activation":  # a CNN's output, before any output norm
            return ops.topk_indices(ops.activation_norm(patches if ctx.trunk is None else ctx.trunk), keep)
        if ctx.point == 0 or ctx.block is None or (not ctx.has_cls and self.nocls_score == "mean-similarity"):
            return ops.topk_indices(ops.mean_similarity(patches), keep, largest=False)
        score = ctx.cls_attention() if ctx.has_cls else ctx.received_attention()
        return ops.topk_indices(score, keep)

    # ---- stage 2 ---------------------------------------------------------------------------------
    def prune_fusion(self, ctx: FusionPoint) -> torch.Tensor | None:
        if not self.fusion:
            return None
        k = self._plan["fusion"]
        z = ctx.tokens
        B, N, _ = z.shape
        if k > N:
            raise ValueError(f"fusion budget {k} is larger than the tokens available ({N})")
        if self.fusion_strategy == "cooperative":
            return ops.topk_indices(ops.cooperative_redundancy(z, ctx.expert_ids, ctx.num_experts), k, largest=False)
        if self.fusion_strategy == "random":
            gen = torch.Generator().manual_seed(self.seed)
            scores = torch.rand(B, N, generator=gen).to(z.device)
            return ops.topk_indices(scores, k)
        # separate: each expert keeps a share proportional to its size, by within-expert redundancy
        sizes = [int((ctx.expert_ids == e).sum()) for e in range(ctx.num_experts)]
        shares = ops.allocate_budget(k, sizes, sizes)
        keep = torch.zeros(B, N, dtype=torch.bool, device=z.device)
        for e, share in enumerate(shares):
            cols = (ctx.expert_ids == e).nonzero()[:, 0]
            red = ops.within_redundancy(z[:, cols])
            keep[:, cols] = ops.topk_mask(red, share, largest=False)
        return ops.mask_to_indices(keep)

    # ---- stage 3 ---------------------------------------------------------------------------------
    def llm_layers(self, num_layers: int) -> set[int]:
        return set(self._plan.get("llm", {})) if self.llm else set()

    def prune_llm(self, ctx) -> torch.Tensor | None:
        j = self._plan["llm"][ctx.layer_idx]
        vis = ctx.visual & ctx.valid
        if self.query == "last":
            qidx = ctx.query_index[:, None]
            qvalid = torch.ones_like(qidx, dtype=torch.bool)
        else:
            qidx, qvalid = _mask_to_padded_index(ctx.text_query_mask & (ctx.visual.long().cumsum(1) > 0))
        rows = ctx.attention_rows(qidx, qvalid)  # (B, H, Q, T)
        attn = rows.sum(2) / qvalid.sum(1).clamp_min(1)[:, None, None]
        vav = ops.visual_attention_values(attn, vis)
        heads = ops.top_heads(vav, self.top_heads)
        score = (attn * heads[:, :, None]).sum(1)
        available = vis.sum(1)
        if self.budget == "adaptive":
            lam = self._plan["lam"][j]
            if self.lam_reference_tokens is not None:
                lam_b = lam * ctx.llm_visual_tokens.float() / self.lam_reference_tokens
            else:
                lam_b = torch.full_like(available, lam, dtype=torch.float)
            k = torch.minimum(torch.round(lam_b * (vav * heads).sum(-1)).long().clamp_min(1), available)
        else:
            k = torch.round(self.fixed_keep[j] * ctx.llm_visual_tokens.float()).long().clamp_min(1)
            k = torch.minimum(k, available)
        k = torch.where(available > 0, k, available)
        keep_vis = ops.topk_mask(score, k, candidates=vis)
        return (ctx.valid & ~ctx.visual) | keep_vis


def _mask_to_padded_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) bool -> (B, Q) indices of True columns (right-padded) and their validity."""
    counts = mask.sum(1)
    Q = max(int(counts.max()), 1)
    T = mask.shape[1]
    cols = torch.arange(T, device=mask.device).expand_as(mask)
    order = torch.sort(torch.where(mask, cols, T), dim=1).values[:, :Q]
    valid = order < T
    return order.clamp_max(T - 1), valid
