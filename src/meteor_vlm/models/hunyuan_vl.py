"""Pruning on a stock transformers HunYuanVL (`HunYuanVLForConditionalGeneration`: HunyuanOCR), on images.

HunYuanVL encodes each image at its own size (a grid of 16 px patches, its sides in whole 2x2 windows) with a ViT
whose learned position embeddings are resized to the grid, each image attending within itself (no rotary positions),
and no final norm. Its merger RMS-norms each patch, folds every m x m window into one token by a strided
convolution (a linear map of the window's patches row by row), then an activation, a 1x1 convolution and an MLP,
appends a newline token to every row of windows and puts a begin and an end token around the image, and RMS-norms
all of them. Inside the ViT a token is therefore a whole window (`HunYuanVLRunner`, PaddleOCR-VL's kind of runner:
the processor's patches row-major, images of one grid batched together), so stage-1 methods keep, drop or merge whole
windows, and the adapter's merger makes the kept windows' tokens as the model would; the begin, newline and end
tokens are the layout's extra tokens (as LLaVA-NeXT's row ends), each at its own column. Every visual token keeps
its stock multimodal RoPE position: HunYuanVL rotates by four axes (the sequence position, then a window's column
and row within its image and the image's index), and normalises queries and keys after rotating them. The stock
model counts that image index over the whole batch, not per prompt, so a prompt's logits in a batch are not those it
has alone; the adapter takes the stock positions as they are (pruning nothing is the stock model, batch included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import HunYuanVLForConditionalGeneration

from .adapters import Layout
from .experts import ExpertRunner, ExpertSpec
from .paddleocr_vl import PaddleOCRRunner, PaddleOCRVLAdapter
from .qwen2_vl import EXPERT

__all__ = ["HunYuanVLAdapter", "HunYuanVLRunner", "hunyuan_vl_adapter"]


def hunyuan_vl_adapter(model) -> HunYuanVLAdapter | None:
    """The adapter for a transformers HunYuanVLForConditionalGeneration, or None for any other model."""
    return HunYuanVLAdapter(model) if type(model) is HunYuanVLForConditionalGeneration else None


class HunYuanVLRunner(PaddleOCRRunner):
    """HunYuanVL's ViT (`vision_tower`) walked block by block over the images of one grid (`grid_thw` (1, h, w)). A
    token is one m x m merge window, its patches row by row side by side: tokens are (B, N, m*m*D), the windows
    row-major, so a token's grid index is its window's place in the image's grid. The blocks (SigLIP's layout, no
    rotation) run on the kept windows' patches, each image a row of batched SDPA. Without grid_thw the runner only
    describes the encoder."""

    kind = "hunyuan_vl"

    def __init__(self, tower, spec: ExpertSpec, grid_thw: tuple[int, int, int] | None = None):
        ExpertRunner.__init__(self, tower, spec)
        self._setup(tower.config.spatial_merge_size, grid_thw)

    @property
    def blocks(self):
        return self.module.layers

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, h*w, C*p*p) each image's patches, row-major as the processor gives them -> (B, N, m*m*D): the patch
        embedding and the position embeddings resized to the grid."""
        B, P = pixel_values.shape[:2]
        x = self.module.embeddings(pixel_values.reshape(B * P, -1), [list(self.grid_thw)] * B).view(B, P, -1)
        return x[:, self._window_patches(x.device).flatten()].reshape(B, P // self.window, -1)

    def _qkv(self, i: int, h: torch.Tensor, grid: torch.Tensor):
        attn = self.blocks[i].self_attn
        n = self.blocks[i].layer_norm1(h)
        B, L, _ = n.shape
        return tuple(p(n).view(B, L, attn.num_heads, -1).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))

    def run_attention(self, i, x, bias=None, grid=None):
        block, h = self.blocks[i], self._patches(x)
        q, k, v = self._qkv(i, h, grid)
        mask = None if bias is None else bias.repeat_interleave(self.window, 1)[:, None, None, :].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=block.self_attn.scaling)
        return self._tokens(h + block.self_attn.o_proj(out.transpose(1, 2).flatten(2))), k

    def run_mlp(self, i, x):
        block, h = self.blocks[i], self._patches(x)
        return self._tokens(h + block.mlp(block.layer_norm2(h)))

    def finalize(self, x):
        """The kept windows as they are: the tower has no final norm (its merger comes after)."""
        return x


class HunYuanVLAdapter(PaddleOCRVLAdapter):
    """Qwen2-VL's adapter with `HunYuanVLRunner`, HunYuanVL's merger on each kept window, the begin, newline and end
    tokens of each image as extra tokens, and its four-axis multimodal RoPE positions (images only)."""

    RUNNER = HunYuanVLRunner

    def __init__(self, model):
        self._locate(model, [self.RUNNER(self.visual_of(model), ExpertSpec(EXPERT, self.RUNNER.kind, 0, {}))])
        self.video_token_id = None
        self.ROPE_AXES = len(model.config.text_config.rope_parameters.get("mrope_section") or (0, 0, 0))

    @staticmethod
    def visual_of(model):
        return model.model.vision_tower

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(..., N, m*m*D) kept windows -> (..., N, text width): the merger on each window (its RMS norm on each patch,
        its strided convolution as the linear map of the window it is, the activation, the 1x1 convolution, the MLP)
        and its final RMS norm."""
        merger = self.runners[0].module.patch_merger
        window = self.runners[0].window
        patches = merger.before_rms(features.unflatten(-1, (window, -1)))
        conv = merger.proj_conv.weight  # (2D, D, m, m): each window position's map, row by row
        folded = patches.flatten(-2) @ conv.permute(0, 2, 3, 1).flatten(1).T + merger.proj_conv.bias
        out = F.linear(merger.proj_act(folded), merger.proj_out.weight.flatten(1), merger.proj_out.bias)
        return merger.after_rms(merger.mlp(out))

    def image_grid(self, images: dict, k: int) -> tuple[int, int]:
        """(rows, cols) of image k's windows, as the processor resized it."""
        _, h, w = self._grids(images)[0][k].tolist()
        return h // self.runners[0].merge, w // self.runners[0].merge

    def _extras(self) -> torch.Tensor:
        """(3, text width): the begin, newline and end tokens as the merger makes them."""
        merger = self.runners[0].module.patch_merger
        newline = merger.mlp(merger.image_newline)
        return merger.after_rms(torch.stack([merger.image_begin, newline, merger.image_end]))

    def layout(self, images: dict, input_ids: torch.Tensor | None = None) -> Layout:
        """Image k (in order) spans 2 + rows * (cols + 1) image tokens: its begin token, each row of windows followed
        by a newline token, its end token; window g at 1 + (g // cols) * (cols + 1) + g % cols."""
        grids = self._grids(images)[0]
        dev = grids.device
        merge = self.runners[0].merge
        rows, cols = (grids[:, 1] // merge).tolist(), (grids[:, 2] // merge).tolist()
        n = max(r * c for r, c in zip(rows, cols))
        g = torch.arange(n, device=dev)
        slot, span, extra_image, extra_offset, kinds = [], [], [], [], []
        for k, (r, c) in enumerate(zip(rows, cols)):
            slot.append(torch.where(g < r * c, 1 + (g // c) * (c + 1) + g % c, -1))
            span.append(2 + r * (c + 1))
            offsets = [0, *(1 + i * (c + 1) + c for i in range(r)), span[-1] - 1]
            extra_image += [k] * len(offsets)
            extra_offset += offsets
            kinds += [0, *([1] * r), 2]
        extras = self._extras()[torch.tensor(kinds, device=dev)]
        return Layout(torch.arange(len(rows), device=dev), torch.stack(slot), torch.tensor(span, device=dev),
                      torch.tensor(extra_image, device=dev), torch.tensor(extra_offset, device=dev), extras)

    def rope_positions(self, input_ids, attention_mask, images: dict | None):
        """(B, T, 4) the stock model's multimodal RoPE positions of the unpruned prompt (None without images)."""
        if images is None:
            return None
        kinds = images.get("mm_token_type_ids")
        if kinds is None:
            kinds = (input_ids == self.image_token_id).int()
        positions, _ = self.model.model.get_rope_index(input_ids, kinds, images["image_grid_thw"],
                                                       attention_mask=attention_mask)
        return positions.permute(1, 2, 0)
