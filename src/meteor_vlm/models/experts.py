"""Expert runners: walk a transformers vision model block by block so tokens can be dropped between blocks.

A runner only *locates* things in one vision class (embeddings, blocks, the pre-attention norm and q/k
projections, the final norm); the pruning decisions live in the methods. Four kinds are supported:

- ``clip``: CLIPVisionModel, a ViT with a CLS token;
- ``siglip``: SiglipVisionModel, a ViT without CLS;
- ``pix2struct``: Pix2StructVisionModel, a patch ViT with row/column embeddings (high resolution);
- ``convnext``: ConvNextModel, a CNN, which cannot drop tokens mid-network;
- ``efficientnet_lite``: EfficientNet-Lite0's trunk (`models.efficientnet_lite`), a CNN that can start
  from ImageNet weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    ConvNextModel,
    Pix2StructVisionConfig,
    Pix2StructVisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from .efficientnet_lite import EfficientNetLiteConfig, EfficientNetLiteModel

EXPERT_KINDS = ("clip", "siglip", "pix2struct", "convnext", "efficientnet_lite")

_CLASSES = {
    "clip": (CLIPVisionConfig, CLIPVisionModel),
    "siglip": (SiglipVisionConfig, SiglipVisionModel),
    "pix2struct": (Pix2StructVisionConfig, Pix2StructVisionModel),
    "convnext": (ConvNextConfig, ConvNextModel),
    "efficientnet_lite": (EfficientNetLiteConfig, EfficientNetLiteModel),
}


@dataclass(frozen=True)
class ExpertSpec:
    """What the VLM config stores about one expert.

    name: unique label (used in stats, rank tables, processor keys); kind: one of EXPERT_KINDS;
    image_size: square input side in pixels; patch_size: pixels per token side (pix2struct only;
    the others read it from their config); config: kwargs of the transformers vision config.
    """

    name: str
    kind: str
    image_size: int
    config: dict
    patch_size: int | None = None
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_dict(cls, d: dict) -> ExpertSpec:
        d = dict(d)
        for key in ("image_mean", "image_std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "image_size": self.image_size,
            "config": dict(self.config),
            "patch_size": self.patch_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }


def build_expert(spec: ExpertSpec, attn_implementation: str = "sdpa") -> nn.Module:
    """Instantiate the transformers vision model an ExpertSpec describes (random weights)."""
    if spec.kind not in _CLASSES:
        raise ValueError(f"unsupported expert kind {spec.kind!r}; supported: {EXPERT_KINDS}")
    config_cls, model_cls = _CLASSES[spec.kind]
    kwargs = dict(spec.config)
    if spec.kind == "pix2struct":
        # Pix2StructVisionConfig defaults to initializer_range=1e-10, which leaves the patch projection and
        # MLPs at ~0 in a model built from scratch: the expert would see only its position embeddings
        kwargs.setdefault("initializer_range", 0.02)
    config = config_cls(**kwargs)
    if _RUNNERS[spec.kind].is_transformer:  # CNNs have no attention to choose
        config._attn_implementation = attn_implementation
    model = model_cls(config)
    return model


class ExpertRunner:
    """Block-by-block access to one expert. Stateless: holds only a reference to the module."""

    kind: str
    has_cls: bool = False
    is_transformer: bool = True
    window: int = 1  # patches each token stands for (Qwen2-VL: a 2x2 merge window, its patches side by side)
    fixed_grid: bool = True  # False: the grid is each image's own (Qwen2-VL), so num_patches is known per image

    def __init__(self, module: nn.Module, spec: ExpertSpec):
        self.module = module
        self.spec = spec

    # --- overridden per kind -------------------------------------------------------------
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the output token grid."""
        raise NotImplementedError

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels -> (B, N0, D) tokens entering block 0 (CLS first when has_cls)."""
        raise NotImplementedError

    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def run_block(self, i: int, x: torch.Tensor, bias: torch.Tensor | None = None,
                  grid: torch.Tensor | None = None) -> torch.Tensor:
        """Run block i on (B, N, D) tokens (SDPA attention; no padding mask: all samples keep equal counts).
        bias: (B, N) added to every query's attention logit for each key (proportional attention); grid:
        (B, N_patches) each patch token's grid index, for runners whose blocks need positions (Qwen2-VL's
        rotary embedding and windows; the others ignore it)."""
        raise NotImplementedError

    def run_attention(self, i: int, x: torch.Tensor, bias: torch.Tensor | None = None,
                      grid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i's first half on (B, N, D) tokens: its attention (with `bias` as in run_block) plus the
        residual, and the (B, H, N, d) keys that attention used, caught from its key projection rather than
        computed again. `run_mlp(i, ...)` on the first finishes the block: together they are `run_block`."""
        raise NotImplementedError

    def run_mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block i's second half on (B, N, D) tokens: its MLP plus the residual."""
        raise NotImplementedError

    def query_key(self, i: int, x: torch.Tensor, grid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Block i's own queries and keys for its input x: (B, H, N * window, d) each (one row per patch), and
        its softmax scale."""
        raise NotImplementedError

    def attention_groups(self, i: int, grid: torch.Tensor) -> torch.Tensor | None:
        """(B, N * window) long: block i's attention stays within tokens of equal group (Qwen2.5-VL's windows),
        or None where every token sees every other."""
        return None

    def finalize(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block -> (B, N_patches, D_out) features (CLS dropped)."""
        raise NotImplementedError

    def tap(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """Features the model reads off block i's output besides the final ones, (B, N, D') for the tokens x
        (Qwen3-VL's DeepStack), or None (the default: none)."""
        return None

    # --- shared ------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks) if self.is_transformer else 0

    @property
    def num_patches(self) -> int:
        h, w = self.grid()
        return h * w

    @property
    def out_dim(self) -> int:
        raise NotImplementedError

    def pruning_points(self) -> list[int]:
        """Blocks after which stage 1 prunes: the ends of the three equal thirds (d/3-1, 2d/3-1, d-1)."""
        d = self.num_blocks
        if d == 0:
            return []
        return sorted({max(0, round(d * b / 3) - 1) for b in (1, 2, 3)})

    def _split_heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        B, N, _ = t.shape
        return t.view(B, N, heads, -1).transpose(1, 2)

    @staticmethod
    def _mask(bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """(B, N) per-key bias -> the additive (B, 1, 1, N) attention mask the blocks take."""
        return None if bias is None else bias[:, None, None, :].to(x.dtype)

    def _catching_keys(self, key_projection: nn.Module, heads: int, attend):
        """attend()'s result and the (B, H, N, d) output of `key_projection` during it."""
        caught = []
        hook = key_projection.register_forward_hook(lambda module, args, out: caught.append(out))
        try:
            out = attend()
        finally:
            hook.remove()
        return out, self._split_heads(caught[-1], heads)


class PixelShuffleWindows:
    """For runners of towers whose patches a pixel shuffle folds, s x s at a time, into one visual token after the
    last block (InternVL, Idefics3, SmolVLM): a token inside the tower is a whole window, its s*s patches side by
    side (B, [1 +] N, s*s*D), row by row (the order the pixel shuffle concatenates them in); with `has_cls` the CLS
    row comes first (its D values, then zeros). Set `scale` and `window` (= scale**2) in __init__."""

    scale: int
    window: int
    has_cls: bool

    @property
    def out_dim(self) -> int:
        """A token's width: its window's s*s patches side by side."""
        return self.module.config.hidden_size * self.window

    def _pack(self, h: torch.Tensor, window_major: bool = False) -> torch.Tensor:
        """(B, [1 +] L, D) [CLS and] patches -> (B, [1 +] N, s*s*D) tokens. window_major=False: the patches in
        row-major grid order (the embeddings'); True: already window by window."""
        c = int(self.has_cls)
        B, L, D = h.shape[0], h.shape[1] - c, h.shape[2]
        patches = h[:, c:]
        if not window_major:
            g, s = round(L**0.5), self.scale
            patches = patches.reshape(B, g // s, s, g // s, s, D).permute(0, 1, 3, 2, 4, 5)
        windows = patches.reshape(B, L // self.window, self.window * D)
        if not c:
            return windows
        cls = torch.cat([h[:, :1], h.new_zeros(B, 1, (self.window - 1) * D)], -1)
        return torch.cat([cls, windows], 1)

    def _unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, [1 +] N, s*s*D) tokens -> (B, [1 +] N*s*s, D): [CLS, then] each window's patches."""
        c = int(self.has_cls)
        B, n = x.shape[0], x.shape[1] - c
        D = x.shape[-1] // self.window
        patches = x[:, c:].reshape(B, n * self.window, D)
        return torch.cat([x[:, :1, :D], patches], 1) if c else patches

    def _patch_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """(B, [1 +] N) per-token bias -> (B, [1 +] N*s*s): each window's bias on each of its patches."""
        if bias is None:
            return None
        c = int(self.has_cls)
        return torch.cat([bias[:, :c], bias[:, c:].repeat_interleave(self.window, 1)], 1)


class _ViTRunner(ExpertRunner):
    """CLIP and SigLIP share their block layout (layer_norm1 -> self_attn.{q,k}_proj)."""

    @property
    def blocks(self) -> nn.ModuleList:
        return self.module.encoder.layers

    @property
    def out_dim(self) -> int:
        return self.module.config.hidden_size

    def grid(self) -> tuple[int, int]:
        g = self.spec.image_size // self.module.config.patch_size
        return g, g

    def run_block(self, i, x, bias=None, grid=None):
        return self.blocks[i](x, attention_mask=self._mask(bias, x))

    def run_attention(self, i, x, bias=None, grid=None):
        block = self.blocks[i]
        (h, _), keys = self._catching_keys(block.self_attn.k_proj, block.self_attn.num_heads, lambda: block.self_attn(
            hidden_states=block.layer_norm1(x), attention_mask=self._mask(bias, x)))
        return x + h, keys

    def run_mlp(self, i, x):
        block = self.blocks[i]
        return x + block.mlp(block.layer_norm2(x))

    def query_key(self, i, x, grid=None):
        block = self.blocks[i]
        h = block.layer_norm1(x)
        heads = block.self_attn.num_heads
        q = self._split_heads(block.self_attn.q_proj(h), heads)
        k = self._split_heads(block.self_attn.k_proj(h), heads)
        return q, k, block.self_attn.scale

    def finalize(self, x):
        x = self.module.post_layernorm(x)
        return x[:, 1:] if self.has_cls else x


class CLIPRunner(_ViTRunner):
    kind, has_cls = "clip", True

    def embed(self, pixel_values):
        return self.module.pre_layrnorm(self.module.embeddings(pixel_values))


class SiglipRunner(_ViTRunner):
    kind, has_cls = "siglip", False

    def embed(self, pixel_values):
        return self.module.embeddings(pixel_values)


class Pix2StructRunner(ExpertRunner):
    """Pix2Struct's encoder takes flattened patches with 1-based row/col ids; we patchify a fixed grid."""

    kind, has_cls = "pix2struct", False

    @property
    def blocks(self):
        return self.module.encoder.layer

    @property
    def out_dim(self) -> int:
        return self.module.config.hidden_size

    def grid(self):
        g = self.spec.image_size // self.spec.patch_size
        return g, g

    def embed(self, pixel_values):
        p = self.spec.patch_size
        B, C, S, _ = pixel_values.shape
        g = S // p
        patches = pixel_values.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(B, g * g, p * p * C)
        rows = torch.arange(1, g + 1, device=pixel_values.device, dtype=patches.dtype).repeat_interleave(g)
        cols = torch.arange(1, g + 1, device=pixel_values.device, dtype=patches.dtype).repeat(g)
        ids = torch.stack([rows, cols], -1).expand(B, -1, -1)
        return self.module.embeddings(torch.cat([ids, patches], -1))

    def run_block(self, i, x, bias=None, grid=None):
        return self.blocks[i](x, attention_mask=self._mask(bias, x))[0]

    def run_attention(self, i, x, bias=None, grid=None):
        block = self.blocks[i]
        (h, _), keys = self._catching_keys(block.attention.key, block.attention.n_heads, lambda: block.attention(
            block.pre_attention_layer_norm(x), attention_mask=self._mask(bias, x)))
        return x + h, keys

    def run_mlp(self, i, x):
        block = self.blocks[i]
        return x + block.mlp(block.pre_mlp_layer_norm(x))

    def query_key(self, i, x, grid=None):
        block = self.blocks[i]
        h = block.pre_attention_layer_norm(x)
        heads = block.attention.n_heads
        q = self._split_heads(block.attention.query(h), heads)
        k = self._split_heads(block.attention.key(h), heads)
        return q, k, block.attention.scaling

    def finalize(self, x):
        return self.module.layernorm(x)


class ConvNextRunner(ExpertRunner):
    """A CNN has no tokens to drop mid-network: it runs whole and is pruned once at its output."""

    kind, has_cls, is_transformer = "convnext", False, False

    @property
    def blocks(self):
        return nn.ModuleList()

    @property
    def out_dim(self) -> int:
        return self.module.config.hidden_sizes[-1]

    def grid(self):
        stride = 4 * 2 ** (len(self.module.config.hidden_sizes) - 1)
        g = self.spec.image_size // stride
        return g, g

    def embed(self, pixel_values):
        fmap = self.module.encoder(self.module.embeddings(pixel_values)).last_hidden_state  # (B, C, h, w)
        return fmap.flatten(2).transpose(1, 2)

    def finalize(self, x):
        return self.module.layernorm(x)


class EfficientNetLiteRunner(ConvNextRunner):
    """Lite0's trunk, like any CNN, runs whole and is pruned once at its output (already batch-normed)."""

    kind = "efficientnet_lite"

    @property
    def out_dim(self) -> int:
        return self.module.config.hidden_size

    def grid(self):
        g = self.spec.image_size // self.module.config.stride
        return g, g

    def embed(self, pixel_values):
        return self.module(pixel_values).flatten(2).transpose(1, 2)

    def finalize(self, x):
        return x


_RUNNERS = {"clip": CLIPRunner, "siglip": SiglipRunner, "pix2struct": Pix2StructRunner, "convnext": ConvNextRunner,
            "efficientnet_lite": EfficientNetLiteRunner}


def runner_for(module: nn.Module, spec: ExpertSpec) -> ExpertRunner:
    """The runner that walks `module`, an expert of kind spec.kind."""
    return _RUNNERS[spec.kind](module, spec)
