"""The contract every pruning method follows, and the contexts the model hands it at each stage.

A method is a dataclass of settings. It may act at three stages; each hook returns which tokens to
keep, or None to keep everything:

- ``prune_encoder(ctx: EncoderPoint)``: inside a vision expert, after a block (stage 1; the blocks are
  the ends of the expert's thirds unless ``encoder_blocks`` names others); besides keep indices it may
  return an ``EncoderMerge`` to hand on merged tokens too (with ``proportional_attention`` the expert's
  later blocks then weigh each token's attention by its size). After the expert's last block (or at a
  CNN's output) the images of a batch may keep different counts: -1 marks an empty slot in the keep
  indices (and in an EncoderMerge's ``at``), and the LLM receives each image's own tokens only
  (``ops.mask_to_padded_indices`` turns a per-image mask into such indices);
- ``prune_fusion(ctx: FusionPoint)``: after the projectors, over all experts' tokens (stage 2);
- ``prune_llm(ctx: LLMLayerContext)``: before an LLM layer listed by ``llm_layers`` (stage 3); besides a
  keep mask it may return an ``LLMMerge`` to recycle dropped tokens into merged ones, each at the place
  of a dropped visual column.

``with method(model): ...`` attaches it to one model instance and always detaches it afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from .. import ops

if TYPE_CHECKING:
    from ..models.runtime import LLMLayerContext
    from ..models.vlm import MultiEncoderVLM

__all__ = ["PruningMethod", "EncoderPoint", "EncoderMerge", "FusionPoint", "REGISTRY", "register", "get",
           "check_ratio", "check_layer_index", "check_llm_layers", "expert_ranks", "stage1_plan", "keep_most_attended"]


@dataclass
class EncoderPoint:
    """Stage-1 context: one expert, after block `block` (or at the output of a CNN).

    tokens: (B, N, D) block output (CLS first when has_cls), or, for a method whose `merges_within_block`
    is set, the output of the block's attention half (its MLP runs on what the method hands back); point:
    the index of this block among those the method acts at (by default the ends of the expert's three
    thirds: 0, 1, 2); size: (B, N_patches) how many of the expert's patches each patch token stands for (1
    until a method merges tokens); keys: (B, H, N, d) the keys the block's attention used, where the
    runner caught them (within a block), else None and computed from block_input when asked; grid:
    (B, N_patches) each patch token's grid index; trunk: at a CNN's output (block None), its features before
    the runner's output norm (`finalize`; the same tensor as `tokens` where there is none), else None.

    Where a token is a window of several patches (`runner.window` > 1, Qwen2-VL's 2x2 merge windows), the
    tokens hold the window's patches side by side, scores add up its patches' attention and keys are its
    patches' keys side by side: methods see one token per window and keep or drop whole windows.
    """

    expert: str
    expert_index: int
    kind: str
    point: int
    block: int | None
    tokens: torch.Tensor
    block_input: torch.Tensor | None
    has_cls: bool
    runner: object = field(repr=False, default=None)
    size: torch.Tensor | None = field(repr=False, default=None)
    keys: torch.Tensor | None = field(repr=False, default=None)
    grid: torch.Tensor | None = field(repr=False, default=None)
    trunk: torch.Tensor | None = field(repr=False, default=None)

    @property
    def patches(self) -> torch.Tensor:
        """(B, N_patches, D) the patch tokens (CLS removed)."""
        return self.tokens[:, 1:] if self.has_cls else self.tokens

    @property
    def patch_sizes(self) -> torch.Tensor:
        """(B, N_patches) `size`, or ones when the context was made without it."""
        return self.size if self.size is not None else torch.ones(self.patches.shape[:2], device=self.tokens.device)

    @functools.cached_property
    def _query_key(self):
        return self.runner.query_key(self.block, self.block_input, self.grid)  # once per point, whichever score asks

    @property
    def _window(self) -> int:
        return getattr(self.runner, "window", 1)

    def _per_token(self, score: torch.Tensor) -> torch.Tensor:
        """(B, N * window) per-patch scores -> (B, N) per token, each window's patches added up."""
        return score.view(score.shape[0], -1, self._window).sum(-1) if self._window > 1 else score

    def _qk(self):
        return self._query_key

    def cls_attention(self) -> torch.Tensor:
        """(B, N_patches) head-averaged attention of CLS to each patch, from the CLS query row alone."""
        if not self.has_cls:
            raise ValueError(f"expert {self.expert!r} ({self.kind}) has no CLS token")
        q, k, scale = self._qk()
        return self._per_token(ops.cls_attention(q[:, :, 0], k, scale)[:, 1:])

    def patch_keys(self) -> torch.Tensor:
        """(B, H, N_patches, d) this block's own keys of the patch tokens (CLS removed)."""
        k = self.keys if self.keys is not None else self._qk()[1]
        k = k[:, :, 1:] if self.has_cls else k
        if self._window > 1:  # a window's patches' keys side by side
            B, H, n, d = k.shape
            k = k.reshape(B, H, n // self._window, self._window * d)
        return k

    def received_attention(self) -> torch.Tensor:
        """(B, N_patches) mean attention each patch receives from all tokens (experts without CLS), within the
        block's attention windows where it has them."""
        q, k, scale = self._qk()
        groups = self.runner.attention_groups(self.block, self.grid) if self.grid is not None else None
        att = ops.received_attention(q, k, scale, groups=groups)
        return self._per_token(att[:, 1:] if self.has_cls else att)

    def importance(self) -> torch.Tensor:
        """(B, N_patches) how much each patch token matters, for methods that rank by attention: the
        attention from CLS (a ViT with CLS), the attention it receives (a ViT without), or, at a CNN's
        output, which has no attention, its distance from the mean token."""
        if self.block is None:
            return -ops.mean_similarity(self.patches)
        return self.cls_attention() if self.has_cls else self.received_attention()

    def merge_metric(self) -> torch.Tensor:
        """(B, N_patches, C) what token similarity is measured on: this block's keys averaged over heads
        (a ViT), or the features themselves (a CNN's output)."""
        return self.patches if self.block is None else self.patch_keys().mean(1)


@dataclass
class EncoderMerge:
    """A stage-1 answer that merges tokens as well as keeping some (VisionZip's contextual tokens).

    keep: (B, K) patch indices kept as they are; merged: (B, M, D) new tokens, in the block's output
    space; at: (B, M) long patch index each merged token stands at (its grid position and RoPE place;
    not among keep); group: (B, N_patches) long, the merged token (0..M-1) each patch went into, -1 for
    the kept and the dropped ones (the model adds up the merged sizes from it). After the expert's last
    block, -1 in keep or at marks an empty slot of an image that hands on fewer tokens than others.
    """

    keep: torch.Tensor
    merged: torch.Tensor
    at: torch.Tensor
    group: torch.Tensor

    @classmethod
    def every_patch_merged(cls, merged: torch.Tensor, at: torch.Tensor, group: torch.Tensor) -> EncoderMerge:
        """A merge that keeps no patch as it is: each goes into one of the merged tokens (group >= 0
        everywhere), as token-merging methods answer (a token that took in nothing is its own group)."""
        return cls(torch.empty(merged.shape[0], 0, dtype=torch.long, device=merged.device), merged, at, group)


@dataclass
class FusionPoint:
    """Stage-2 context: projected tokens of every expert for a batch of images.

    tokens: (B, N, D) concatenated along the sequence, grouped by expert; expert_ids: (N,) long.
    """

    tokens: torch.Tensor
    expert_ids: torch.Tensor
    expert_names: list[str]

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)


REGISTRY: dict[str, type[PruningMethod]] = {}


def register(cls):
    """Class decorator: make a method reachable by name (`mv.methods.get(name)`)."""
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[PruningMethod]:
    """The method class registered under `name`."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name]


def check_ratio(name: str, value: float) -> None:
    """ValueError unless the setting `name` is a ratio in [0, 1]."""
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a ratio in [0, 1], got {value}")


def check_layer_index(name: str, value) -> None:
    """ValueError unless the setting `name` is an int layer index >= 0."""
    if int(value) != value or value < 0:
        raise ValueError(f"{name} must be a layer index >= 0, got {value}")


def check_llm_layers(layers, depth: int | None = None) -> None:
    """ValueError unless `layers` are distinct and increasing and, given the LLM's `depth`, all within it."""
    layers = tuple(layers)
    if depth is not None:
        bad = [i for i in layers if i >= depth]
        if bad:
            raise ValueError(f"LLM layer(s) {bad} past the model's depth ({depth} layers, indices 0..{depth - 1})")
    if sorted(set(layers)) != list(layers):
        raise ValueError(f"LLM layers must be distinct and increasing, got {layers}")


def expert_ranks(model: MultiEncoderVLM, table=None, needed_by: str = "rank allocation") -> dict:
    """{expert: [feature rank at each pruning point]} from `table` (a dict or a JSON path; None: the
    model's `config.rank_table`); ValueError naming `needed_by` if there is none or an expert is missing."""
    table = table if table is not None else model.config.rank_table
    if isinstance(table, (str, Path)):
        table = json.loads(Path(table).read_text())
    if table is None:
        raise ValueError(
            f"{needed_by} needs a rank table: pass rank_table=, or run "
            "`meteor calibrate` / mv.calibrate(model, images) and store it in model.config.rank_table"
        )
    ranks = table.get("experts", table)
    missing = [n for n in model.expert_names if n not in ranks]
    if missing:
        raise ValueError(f"the rank table has no entry for experts {missing}")
    return ranks


def stage1_plan(model: MultiEncoderVLM, ranks: dict | None, strategy: str, keep: float,
                tokens: int | None = None) -> dict[str, list[int]]:
    """METEOR's stage-1 schedule on `model` (`ops.staged_budgets`): {expert: patch tokens it keeps after each
    of its pruning points}, the experts sharing `tokens`, or round(keep * all their patches), in the end;
    the experts with three pruning points are staged, the others (a CNN) prune once."""
    sizes = {r.spec.name: r.num_patches for r in model.runners}
    final = tokens if tokens is not None else round(keep * sum(sizes.values()))
    staged = [r.spec.name for r in model.runners if len(r.pruning_points()) == 3]
    return ops.staged_budgets(sizes, staged, ranks, final, strategy)


def keep_most_attended(ctx: LLMLayerContext, keep: torch.Tensor) -> torch.Tensor:
    """The rule FastV and PyramidDrop share: keep, per sample, the `keep` (B,) visual tokens the last prompt
    token attends to most at this layer (its own q/k with RoPE, averaged over heads), and every text token.
    Returns the (B, T) keep mask `prune_llm` hands the runtime."""
    visual = ctx.visual & ctx.valid
    rows = ctx.attention_rows(ctx.query_index[:, None])  # (B, H, 1, T)
    score = rows.mean(1)[:, 0]  # (B, T): averaged over heads
    keep = torch.minimum(keep, visual.sum(1))
    return (ctx.valid & ~ctx.visual) | ops.topk_mask(score, keep, candidates=visual)


class PruningMethod:
    """Base class. Subclasses are dataclasses and override the hooks they need."""

    name: ClassVar[str] = "base"

    def __post_init__(self):
        self.stats: list[dict] = []
        self.validate()

    # ---- hooks --------------------------------------------------------------------------
    def validate(self) -> None:
        """Check settings on construction; raise ValueError naming the bad one."""

    def setup(self, model: MultiEncoderVLM) -> None:
        """Check the method against a model and precompute plans (called when attached)."""

    def prune_encoder(self, ctx: EncoderPoint) -> torch.Tensor | EncoderMerge | None:
        return None

    def prunes_in_encoder(self) -> bool:
        """Whether this method acts inside the vision encoders (stage 1): by default, whether it has a
        `prune_encoder`. Models whose encoder cannot drop tokens (Qwen2-VL's) refuse such methods."""
        return type(self).prune_encoder is not PruningMethod.prune_encoder

    def encoder_blocks(self, num_blocks: int) -> list[int] | None:
        """The blocks of a `num_blocks`-deep vision expert after (or within) which `prune_encoder` is called, in
        increasing order; None: the ends of its three thirds (`ExpertRunner.pruning_points`)."""
        return None

    # ToMe's proportional attention: after merging, an expert's later blocks add log(size) to the attention
    # logits of each key, so a merged token counts as the tokens it stands for (subclasses may override)
    proportional_attention: ClassVar[bool] = False

    # ToMe's place: `prune_encoder` is called between the attention and the MLP of each chosen block (its
    # tokens the attention half's output, its keys those that attention used), not after the block
    merges_within_block: ClassVar[bool] = False

    def prune_fusion(self, ctx: FusionPoint) -> torch.Tensor | None:
        return None

    def llm_layers(self, num_layers: int) -> set[int]:
        return set()

    def prune_llm(self, ctx: LLMLayerContext) -> torch.Tensor | None:
        return None

    # ---- attaching -------------------------------------------------------------------------
    @contextlib.contextmanager
    def __call__(self, model):
        from ..models.adapters import adapt

        target = adapt(model, type(self).__name__)
        if hasattr(target, "check_method"):  # a model that cannot run every kind of method says so first
            target.check_method(self)
        self.setup(target)
        self.stats = []
        with target.pruning(self):
            yield self

    def settings(self) -> dict:
        """The method's name and its settings (its dataclass fields, not class constants such as Meteor's PRESETS)
        as a plain dict (for results files)."""
        fields = dataclasses.fields(self) if dataclasses.is_dataclass(self) else ()
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in fields if not f.name.startswith("_")}}

    def summary(self) -> dict:
        """Means over the recorded samples: tokens per stage and the layer-averaged count."""
        if not self.stats:
            return {}
        keys = ("encoder_tokens", "stage1_tokens", "fusion_tokens", "layer_avg_tokens")
        return {k: sum(s[k] for s in self.stats) / len(self.stats) for k in keys}


@register
@dataclass
class NoPruning(PruningMethod):
    """Keeps every token; records the unpruned model's token counts (the baseline row of a benchmark)."""

    name: ClassVar[str] = "none"
