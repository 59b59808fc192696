"""Pruning on a stock transformers Ovis2.5 (`Ovis2_5ForConditionalGeneration`: Ovis2.5-2B, -9B), on images.

Ovis2.5 is Qwen2.5-VL's kind of encoder with SigLIP's blocks: each image on its own patch grid (`image_grid_thw`),
its patches packed window by window (2x2 merge windows), learned position embeddings resampled to the grid, 2D
rotary positions, its blocks attending within the image (or within attention windows, where its config makes a block
windowed); then each merge window's patches go through a visual head (a linear map, a LayerNorm, a softmax over a
visual vocabulary) that weighs the rows of a visual embedding table, as Ovis2's do. As transformers has it, the
encoder's tokens reach the head as its last block wrote them, before the final norm and in the order the encoder
walks its attention windows (`get_vision_window_index`): the k-th image token of an image is the window that order
puts k-th. The adapter does the same (the stock model is the oracle), so pruning nothing is the stock model. Inside the
ViT a token is a whole merge window (`Ovis25Runner`, Qwen2-VL's runner with Ovis2.5's blocks), so stage-1 methods keep,
drop or merge whole windows. An image's start and end tokens are embedded from the visual table's last rows, as the
stock model does (`embed_text`). Its videos are refused; its processor needs torchvision (for videos):
`Ovis25ImageTextProcessor` does what it does for images.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from transformers import Ovis2_5ForConditionalGeneration
from transformers.vision_utils import get_vision_window_index

from .adapters import Layout
from .paddleocr_vl import _ImagesOnly
from .qwen2_vl import Qwen2VLImagesAdapter, Qwen2VLRunner

__all__ = ["Ovis25Adapter", "Ovis25Runner", "Ovis25ImageTextProcessor", "ovis2_5_adapter"]


def ovis2_5_adapter(model) -> Ovis25Adapter | None:
    """The adapter for a transformers Ovis2_5ForConditionalGeneration, or None for any other model."""
    return Ovis25Adapter(model) if type(model) is Ovis2_5ForConditionalGeneration else None


class Ovis25Runner(Qwen2VLRunner):
    """Ovis2.5's ViT walked as Qwen2.5-VL's (`Qwen2VLRunner`: merge windows as tokens, each image on its own grid, 2D
    rotary positions, windowed blocks attending within their attention windows) with its own blocks (SigLIP's:
    `layer_norm1`, separate q/k/v projections, `out_proj`, `layer_norm2`, MLP) and its resampled position embeddings;
    `finalize` hands on the last block's output as it is, as the stock model reads it."""

    kind = "ovis2_5"

    def __init__(self, visual, spec, grid_thw=None):
        super().__init__(visual, spec, grid_thw)
        cfg = visual.config
        self.full_attention = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
        self.attention_window = cfg.window_size // self.merge // cfg.patch_size

    @property
    def blocks(self):
        return self.module.layers

    @property
    def out_dim(self) -> int:
        return self.module.config.hidden_size * self.window

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, t*h*w, C*T*p*p) each image's patches, packed window by window -> (B, N, m*m*D): the patch embedding and
        the position embeddings resampled to the grid."""
        B, P, _ = pixel_values.shape
        grid = torch.tensor([self.grid_thw] * B, device=pixel_values.device)
        return self.module.embeddings(pixel_values.reshape(B * P, -1), grid).reshape(B, P // self.window, -1)

    def _rotary(self, grid: torch.Tensor):
        key = grid.device
        if key not in self._rotary_cache:
            from transformers.vision_utils import get_vision_position_ids

            ids = get_vision_position_ids(torch.tensor([list(self.grid_thw)], device=grid.device), self.merge)
            self._rotary_cache[key] = self.module.rotary_emb(torch.empty(0, device=grid.device), ids)
        index = self._patch_index(grid)
        return tuple(f[index] for f in self._rotary_cache[key])

    def _qkv(self, i: int, h: torch.Tensor, grid: torch.Tensor):
        attn = self.blocks[i].self_attn
        n = self.blocks[i].layer_norm1(h)
        B, L, _ = n.shape
        q, k, v = (p(n).view(B, L, attn.num_heads, -1) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision  # the tower's own rotation
        q, k = rotate(q, k, *self._rotary(grid))
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def run_attention(self, i, x, bias=None, grid=None):
        block, h = self.blocks[i], self._patches(x)
        q, k, v = self._qkv(i, h, grid)
        out = self._attend(i, q, k, v, bias, grid)
        return self._tokens(h + block.self_attn.out_proj(out.transpose(1, 2).flatten(2))), k

    def run_mlp(self, i, x):
        block, h = self.blocks[i], self._patches(x)
        return self._tokens(h + block.mlp(block.layer_norm2(h)))

    def _attention_of(self, i: int):
        return self.blocks[i].self_attn

    def finalize(self, x):
        return x


class Ovis25Adapter(Qwen2VLImagesAdapter):
    """Qwen2-VL's adapter with `Ovis25Runner`, Ovis2.5's visual head and table on each kept window, each image's
    tokens in its encoder's window order, and its start and end tokens embedded from the visual table (images only)."""

    VIDEO_INPUTS_REFUSED = ("pixel_values_videos", "video_grid_thw")

    RUNNER = Ovis25Runner

    @staticmethod
    def visual_of(model):
        return model.model.vision_tower

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(..., N, m*m*D) kept windows -> (..., N, text width): the visual head (linear map, LayerNorm, softmax over
        the visual vocabulary) weighing the visual table's rows (its indicator rows get weight 0)."""
        projector = self.model.model.multi_modal_projector
        head = projector.visual_tokenizer
        probs = torch.softmax(head.norm(head.linear(features)), dim=-1, dtype=torch.float32).to(features.dtype)
        probs = F.pad(probs, (0, head.num_visual_indicator_tokens))
        return projector.visual_embeddings_table(probs)

    def layout(self, images: dict, input_ids: torch.Tensor | None = None) -> Layout:
        """Image k's window g at the place its encoder's window order gives it among the k-th run of image tokens."""
        grids = self._grids(images)[0]
        cfg = self.runners[0].module.config
        counts = self._counts(grids)
        n, dev = max(counts), grids.device
        slot = torch.full((len(counts), n), -1, dtype=torch.long, device=dev)
        for k, grid in enumerate(grids):
            order, _ = get_vision_window_index(grid[None], spatial_merge_size=cfg.spatial_merge_size,
                                               window_size=cfg.window_size, patch_size=cfg.patch_size)
            slot[k, : counts[k]] = torch.argsort(order.to(dev))
        return Layout(torch.arange(len(counts), device=dev), slot, torch.tensor(counts, device=dev))

    def rope_positions(self, input_ids, attention_mask, images: dict | None):
        return None  # 1D RoPE: the running count of real tokens

    def embed_text(self, input_ids: torch.Tensor, with_images: bool) -> torch.Tensor:
        """The text embeddings, an image's start and end tokens' from the visual table's indicator rows where images
        are given (as the stock model embeds them)."""
        embeds = super().embed_text(input_ids, with_images)
        if not with_images:
            return embeds
        projector, cfg = self.model.model.multi_modal_projector, self.model.config
        indicators = projector.get_visual_indicator_features(input_ids.device).to(embeds.dtype)
        embeds = embeds.clone()
        for i, token in enumerate((cfg.image_start_token_id, cfg.image_end_token_id)):
            embeds[input_ids == token] = indicators[i]
        return embeds


class Ovis25ImageTextProcessor(_ImagesOnly):
    """What transformers' `Ovis2_5Processor` (which needs torchvision, for videos) does for still images: a tokenizer
    and `Ovis2_5ImageProcessorPil` (each image's patches packed window by window); each "<image>" in a prompt becomes
    <ovis_image_start>, one "<image>" per merge window of the next image, <ovis_image_end>. Returns input_ids,
    attention_mask (left-padded), pixel_values, image_grid_thw and mm_token_type_ids. Videos are refused."""

    image_token = "<image>"
    video_token = "<video>"  # none is written: videos are refused
    image_placeholder = "<image>"
    start_token, end_token = "<ovis_image_start>", "<ovis_image_end>"
    NO_VIDEOS = "Ovis25ImageTextProcessor takes images only"

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None, **kwargs):
        # the tokenizer's own names for them, where it has them (as Ovis2_5Processor reads them)
        for name in ("image_token", "start_token", "end_token"):
            given = getattr(tokenizer, {"start_token": "image_start_token", "end_token": "image_end_token"}.get(name, name),
                            None)
            if isinstance(given, str):
                setattr(self, name, given)
        self.image_placeholder = self.image_token
        super().__init__(image_processor, tokenizer, chat_template, **kwargs)

    def _expand(self, text: str, token: str, counts) -> str:
        """Each image token written as the image's start token, one image token per merge window, its end token."""
        if token != self.image_token:
            return super()._expand(text, token, counts)
        return self._fill(text, token, (self.start_token + token * n + self.end_token for n in counts))

    @classmethod
    def from_pretrained(cls, path) -> Ovis25ImageTextProcessor:
        """From an Ovis2.5 checkpoint folder: its tokenizer, preprocessor_config.json and chat template."""
        from transformers.models.ovis2_5.image_processing_pil_ovis2_5 import Ovis2_5ImageProcessorPil

        return cls(Ovis2_5ImageProcessorPil.from_pretrained(path), cls.read_tokenizer(path), cls.read_chat_template(path))
