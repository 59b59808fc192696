"""Pruning on a stock transformers PaddleOCR-VL (`PaddleOCRVLForConditionalGeneration`: PaddleOCR-VL-0.9B), on
images; and on VideoLLaMA3's images (`VideoLlama3ForConditionalGeneration`), whose encoder is the same kind.

PaddleOCR-VL is Qwen2-VL's layout with its own encoder: each image on its own patch grid (`image_grid_thw`), a SigLIP
ViT with learned position embeddings resampled to the grid and 2D rotary positions in its attention, each image
attending within itself, its final norm; the patches come from the processor in row-major order, and the projector
norms each patch and folds every 2x2 window into one visual token (the window's patches row by row) before a
two-layer MLP; an Ernie 4.5 decoder with Qwen2-VL's multimodal RoPE. Inside the ViT a token is therefore a whole
window (`PaddleOCRRunner`), so stage-1 methods keep, drop or merge whole windows, images of one grid batched
together, and what leaves the tower is what the projector would have made of the kept windows. The rest is
Qwen2-VL's adapter: each kept token at its stock (temporal, height, width) position.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from transformers import PaddleOCRVLForConditionalGeneration, VideoLlama3ForConditionalGeneration
from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

from .experts import ExpertRunner, ExpertSpec
from .qwen2_vl import Qwen2VLImagesAdapter, Qwen2VLImageTextProcessor

__all__ = ["PaddleOCRVLAdapter", "PaddleOCRRunner", "PaddleOCRVLImageTextProcessor", "paddleocr_vl_adapter",
           "VideoLlama3Adapter", "VideoLlama3Runner", "VideoLlama3ImageTextProcessor"]


def paddleocr_vl_adapter(model) -> PaddleOCRVLAdapter | None:
    """The adapter for a transformers PaddleOCRVLForConditionalGeneration or VideoLlama3ForConditionalGeneration, or
    None for any other model."""
    if type(model) is VideoLlama3ForConditionalGeneration:
        return VideoLlama3Adapter(model)
    return PaddleOCRVLAdapter(model) if type(model) is PaddleOCRVLForConditionalGeneration else None


class PaddleOCRRunner(ExpertRunner):
    """PaddleOCR-VL's SigLIP ViT (`visual.vision_model`) walked block by block over the images of one grid
    (`grid_thw`, t = 1). A token is one m x m window of patches, its patches row by row side by side: tokens are
    (B, N, m*m*D), the windows row-major over the merged grid, so a token's grid index is its visual token's offset
    in the image's span. The blocks run on the kept windows' patches, each image a row of batched SDPA, each patch
    with its own 2D rotary position. Without grid_thw the runner only describes the encoder."""

    kind, has_cls = "paddleocr_vl", False

    def __init__(self, visual, spec: ExpertSpec, grid_thw: tuple[int, int, int] | None = None):
        super().__init__(visual.vision_model, spec)
        self._setup(visual.config.spatial_merge_size, grid_thw)

    def _setup(self, merge: int, grid_thw) -> None:
        self.merge = merge
        self.window = self.merge**2
        self.grid_thw = None if grid_thw is None else tuple(int(v) for v in grid_thw)
        self.fixed_grid = self.grid_thw is not None
        self._rotary: dict = {}

    @property
    def blocks(self):
        return self.module.encoder.layers

    @property
    def out_dim(self) -> int:
        return self.module.config.hidden_size * self.window

    def grid(self) -> tuple[int, int]:
        if self.grid_thw is None:
            raise ValueError("PaddleOCR-VL's vision encoder has no fixed grid: each image has its own (image_grid_thw)")
        t, h, w = self.grid_thw
        return t * h // self.merge, w // self.merge

    def _window_patches(self, device) -> torch.Tensor:
        """(N, m*m) each window's patches, as row-major indices into the image's patch grid."""
        _, h, w = self.grid_thw
        m = self.merge
        return torch.arange(h * w, device=device).view(h // m, m, w // m, m).permute(0, 2, 1, 3).reshape(-1, m * m)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, h*w, C, p, p) each image's patches, row-major as the processor gives them -> (B, N, m*m*D): the patch
        embedding and the position embeddings resampled to the grid."""
        B, P = pixel_values.shape[:2]
        embeddings = self.module.embeddings
        x = embeddings.patch_embedding(pixel_values.flatten(0, 1).to(embeddings.patch_embedding.weight.dtype))
        x = x.flatten(1).view(B, P, -1)
        grid = torch.tensor([self.grid_thw], device=pixel_values.device)
        index, weight = get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=embeddings.num_grid_per_side, mode=embeddings.interpolation_mode,
            align_corners=embeddings.interpolation_align_corners, spatial_merge_size=1)
        x = x + (embeddings.position_embedding(index) * weight[:, :, None]).sum(1).to(x.dtype)
        return x[:, self._window_patches(x.device).flatten()].reshape(B, P // self.window, -1)

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1] * self.window, -1)

    def _tokens(self, h: torch.Tensor) -> torch.Tensor:
        return h.reshape(h.shape[0], h.shape[1] // self.window, -1)

    @property
    def rotary_pos_emb(self):
        return self.module.encoder.rotary_pos_emb

    def _rotation(self, grid: torch.Tensor, like: torch.Tensor):
        """(cos, sin), (B, L, d) each: the 2D rotary embedding of the patches of the windows in `grid` (B, N)."""
        if grid.device not in self._rotary:
            ids = get_vision_position_ids(torch.tensor([self.grid_thw], device=grid.device), 1)  # (row, col), row-major
            self._rotary[grid.device] = self.rotary_pos_emb(like, ids)
        patches = self._window_patches(grid.device)[grid].flatten(1)
        return tuple(f[patches].to(like.dtype) for f in self._rotary[grid.device])

    def _qkv(self, i: int, h: torch.Tensor, grid: torch.Tensor):
        """Block i's rotated queries and keys and its values for the (B, L, D) patches h: (B, H, L, d) each."""
        attn = self.blocks[i].self_attn
        n = self.blocks[i].layer_norm1(h)
        B, L, _ = n.shape
        q, k, v = (p(n).view(B, L, attn.num_heads, -1) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision  # the tower's own rotation
        q, k = rotate(q, k, *self._rotation(grid, h))
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def run_attention(self, i, x, bias=None, grid=None):
        block, h = self.blocks[i], self._patches(x)
        q, k, v = self._qkv(i, h, grid)
        mask = None if bias is None else bias.repeat_interleave(self.window, 1)[:, None, None, :].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=block.self_attn.scaling)
        return self._tokens(h + block.self_attn.out_proj(out.transpose(1, 2).flatten(2))), k

    def run_mlp(self, i, x):
        block, h = self.blocks[i], self._patches(x)
        return self._tokens(h + block.mlp(block.layer_norm2(h)))

    def run_block(self, i, x, bias=None, grid=None):
        return self.run_mlp(i, self.run_attention(i, x, bias, grid)[0])

    def query_key(self, i, x, grid=None):
        q, k, _ = self._qkv(i, self._patches(x), grid)
        return q, k, self.blocks[i].self_attn.scaling

    def finalize(self, x):
        """The tower's final norm on each kept window's patches (the projector norms and folds them after)."""
        B, N, _ = x.shape
        return self.module.post_layernorm(x.reshape(B, N, self.window, -1)).reshape(B, N, -1)


class PaddleOCRVLAdapter(Qwen2VLImagesAdapter):
    """Qwen2-VL's adapter with `PaddleOCRRunner` and PaddleOCR-VL's projector on each kept window (images only)."""

    RUNNER = PaddleOCRRunner

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(..., N, m*m*D) kept windows -> (..., N, text width): the projector's norm on each patch, then its MLP."""
        projector = self.model.model.projector
        patches = projector.pre_norm(features.unflatten(-1, (self.runners[0].window, -1))).flatten(-2)
        return projector.linear_2(projector.act(projector.linear_1(patches)))


class _ImagesOnly(Qwen2VLImageTextProcessor):
    """A Qwen2-VL-style processor for a model whose adapter takes images only: videos (and a frame rate) refused
    with `NO_VIDEOS`."""

    NO_VIDEOS = "this processor takes images only"

    def __call__(self, images=None, text=(), videos=None, return_tensors="pt", padding=True, fps=None):
        if videos or fps is not None:
            raise ValueError(self.NO_VIDEOS)
        return super().__call__(images=images, text=text, return_tensors=return_tensors, padding=padding)


class PaddleOCRVLImageTextProcessor(_ImagesOnly):
    """What transformers' `PaddleOCRVLProcessor` does: a tokenizer and `PaddleOCRVLImageProcessorPil` (each image's
    patches row-major, (patches, C, p, p)); each "<|IMAGE_PLACEHOLDER|>" in a prompt, one per image as the chat
    template writes it between <|IMAGE_START|> and <|IMAGE_END|>, becomes one per merged visual token of the next
    image. Returns input_ids, attention_mask (left-padded), pixel_values, image_grid_thw and mm_token_type_ids.
    PaddleOCR-VL takes no videos (refused)."""

    image_token = "<|IMAGE_PLACEHOLDER|>"
    video_token = "<|video_pad|>"  # none is written: videos are refused
    image_placeholder = "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
    NO_VIDEOS = "PaddleOCR-VL takes no videos"

    @classmethod
    def from_pretrained(cls, path) -> PaddleOCRVLImageTextProcessor:
        """From a PaddleOCR-VL checkpoint folder: its tokenizer, preprocessor_config.json and chat template."""
        from transformers.models.paddleocr_vl.image_processing_pil_paddleocr_vl import PaddleOCRVLImageProcessorPil

        return cls(PaddleOCRVLImageProcessorPil.from_pretrained(path), cls.read_tokenizer(path),
                   cls.read_chat_template(path))


class VideoLlama3Runner(PaddleOCRRunner):
    """VideoLLaMA3's SigLIP ViT on still images: PaddleOCR-VL's kind of encoder (2D rotary positions in its attention,
    its patches row-major) without learned position embeddings, each image merged by 1 (every patch one visual
    token; the encoder's rotary embedding on itself)."""

    kind = "video_llama_3"

    def __init__(self, visual, spec: ExpertSpec, grid_thw: tuple[int, int, int] | None = None):
        ExpertRunner.__init__(self, visual, spec)
        self._setup(1, grid_thw)

    @property
    def rotary_pos_emb(self):
        return self.module.rotary_pos_emb

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, h*w, C*p*p) each image's patches, row-major -> (B, h*w, D): the patch embedding."""
        B, P = pixel_values.shape[:2]
        return self.module.embeddings(pixel_values.flatten(0, 1)).view(B, P, -1)


class VideoLlama3Adapter(PaddleOCRVLAdapter):
    """A `VideoLlama3ForConditionalGeneration` on images (VideoLLaMA3-2B, -7B): `VideoLlama3Runner`, every patch one
    visual token (image_merge_sizes 1, as its processor gives them), its projector MLP on each kept one, and a Qwen2
    decoder with 1D RoPE (kept tokens at their unpruned positions). Its videos (merged 2x2 and compressed across
    frames) are refused."""

    IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "image_merge_sizes", "mm_token_type_ids")
    PER_IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "image_merge_sizes")
    VIDEO_INPUTS_REFUSED = ("pixel_values_videos", "video_grid_thw", "video_merge_sizes")

    RUNNER = VideoLlama3Runner

    @staticmethod
    def visual_of(model):
        return model.model.vision_model

    def _grids(self, images: dict) -> tuple[torch.Tensor, int]:
        merges = images.get("image_merge_sizes")
        if merges is not None and bool((torch.as_tensor(merges) != 1).any()):
            raise ValueError(f"image_merge_sizes {torch.as_tensor(merges).tolist()}: VideoLLaMA3's images are merged by "
                             "1 (its processor's), only those are supported")
        return super()._grids(images)

    def _counts(self, grids: torch.Tensor) -> list[int]:
        return grids.prod(-1).tolist()

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.projector(features)

    def rope_positions(self, input_ids, attention_mask, images: dict | None):
        return None  # 1D RoPE: the running count of real tokens


class VideoLlama3ImageTextProcessor(_ImagesOnly):
    """What transformers' `VideoLlama3Processor` (which needs torchvision, for videos) does for still images: a
    tokenizer and `VideoLlama3ImageProcessorPil` (each image's patches row-major, merged by 1); each "<|image_pad|>"
    in a prompt becomes one per patch of the next image. Returns input_ids, attention_mask (left-padded),
    pixel_values, image_grid_thw and image_merge_sizes (no mm_token_type_ids: the stock model takes none). Videos
    are refused."""

    TOKEN_TYPES = False
    NO_VIDEOS = "VideoLlama3ImageTextProcessor takes images only"

    @classmethod
    def from_pretrained(cls, path) -> VideoLlama3ImageTextProcessor:
        """From a VideoLLaMA3 checkpoint folder: its tokenizer, preprocessor_config.json and chat template."""
        from transformers.models.video_llama_3.image_processing_pil_video_llama_3 import VideoLlama3ImageProcessorPil

        return cls(VideoLlama3ImageProcessorPil.from_pretrained(path), cls.read_tokenizer(path),
                   cls.read_chat_template(path))
