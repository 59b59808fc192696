"""Pruning on a stock transformers ERNIE 4.5 VL (`Ernie4_5_VLMoeForConditionalGeneration`: ERNIE-4.5-VL-28B-A3B,
-424B-A47B), on images.

ERNIE 4.5 VL is Qwen2-VL's layout: each image on its own patch grid (`image_grid_thw`), its patches packed window by
window (2x2 merge windows), a ViT with 2D rotary positions and Qwen2-VL's blocks, each image attending within itself,
then a final LayerNorm; its resampler folds each window's patches into one visual token (an MLP on the window, a
second one on the window beside itself, as an image is its own pair of frames, a projection and an RMS norm), and
its decoder rotates by Qwen2-VL's kind of multimodal RoPE. Inside the ViT a token is therefore a whole window
(`Ernie45VLRunner`, Qwen2-VL's runner), so stage-1 methods keep, drop or merge whole windows, and the adapter's
resampler makes the kept windows' tokens as the model would; each kept token keeps its stock position. Its
decoder's mixture-of-experts layers send text and visual tokens to separate experts, as `moe_mm_token_type_ids`
says (1 on an image's tokens and its start and end tokens): that travels with the tokens through the runtime
(`runtime.prefill(token_inputs=)`), and generated tokens are text. Its videos (pairs of frames merged into one
token) are refused while a method is attached. Transformers' `Ernie4_5_VLMoeProcessor` needs torchvision (for
videos): `Ernie45VLImageTextProcessor` does what it does for images.
"""

from __future__ import annotations

import torch
from transformers import Ernie4_5_VLMoeForConditionalGeneration

from .paddleocr_vl import _ImagesOnly
from .qwen2_vl import Qwen2VLImagesAdapter, Qwen2VLRunner

__all__ = ["Ernie45VLAdapter", "Ernie45VLRunner", "Ernie45VLImageTextProcessor", "ernie45_vl_adapter"]


def ernie45_vl_adapter(model) -> Ernie45VLAdapter | None:
    """The adapter for a transformers Ernie4_5_VLMoeForConditionalGeneration, or None for any other model."""
    return Ernie45VLAdapter(model) if type(model) is Ernie4_5_VLMoeForConditionalGeneration else None


class Ernie45VLRunner(Qwen2VLRunner):
    """ERNIE 4.5 VL's ViT walked as Qwen2-VL's (`Qwen2VLRunner`: the same blocks, patch packing and 2D rotary
    positions); `finalize` applies its final LayerNorm to each kept window's patches (the resampler, which folds
    them, is the adapter's `project`)."""

    kind = "ernie4_5_vl"

    @property
    def out_dim(self) -> int:
        return self.module.config.hidden_size * self.window

    def finalize(self, x):
        B, N, _ = x.shape
        return self.module.ln(x.reshape(B, N, self.window, -1)).reshape(B, N, -1)


class Ernie45VLAdapter(Qwen2VLImagesAdapter):
    """Qwen2-VL's adapter with `Ernie45VLRunner`, ERNIE's resampler on each kept window, and its
    `moe_mm_token_type_ids` handed to every decoder layer with the tokens (images only)."""

    IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "mm_token_type_ids", "moe_mm_token_type_ids")
    VIDEO_INPUTS_REFUSED = ("pixel_values_videos", "video_grid_thw")

    RUNNER = Ernie45VLRunner

    @staticmethod
    def visual_of(model):
        return model.model.vision_tower

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(..., N, m*m*D) kept windows -> (..., N, text width): the resampler's spatial MLP on each window, its
        temporal MLP on the window beside itself (a still image is both frames of its pair), its projection and RMS
        norm."""
        resampler = self.model.model.resampler_model
        spatial = resampler.spatial_linear(features)
        return resampler.after_norm(resampler.mlp(resampler.temporal_linear(torch.cat([spatial, spatial], -1))))

    def token_inputs(self, images: dict) -> dict[str, torch.Tensor]:
        """The processor's moe_mm_token_type_ids, where given (without, the stock model sends every token to the text
        experts, and so does this)."""
        kinds = images.get("moe_mm_token_type_ids")
        return {} if kinds is None else {"moe_mm_token_type_ids": kinds}


class Ernie45VLImageTextProcessor(_ImagesOnly):
    """What transformers' `Ernie4_5_VLMoeProcessor` does for still images: a tokenizer and
    `Ernie4_5_VLMoeImageProcessorPil` (each image's patches packed window by window); each "<|IMAGE_PLACEHOLDER|>" in a
    prompt, one per image between <|IMAGE_START|> and <|IMAGE_END|> as the chat template writes them, becomes one per
    merged visual token of the next image. Returns input_ids, attention_mask (left-padded), pixel_values,
    image_grid_thw, mm_token_type_ids (1 on image tokens) and moe_mm_token_type_ids (1 on image tokens and on each
    image's start and end tokens). Videos are refused."""

    image_token = "<|IMAGE_PLACEHOLDER|>"
    video_token = "<|VIDEO_PLACEHOLDER|>"  # none is written: videos are refused
    image_placeholder = "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
    NO_VIDEOS = "Ernie45VLImageTextProcessor takes images only"

    @classmethod
    def from_pretrained(cls, path) -> Ernie45VLImageTextProcessor:
        """From an ERNIE 4.5 VL checkpoint folder: its tokenizer, preprocessor_config.json and chat template."""
        from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
            Ernie4_5_VLMoeImageProcessorPil,
        )

        return cls(Ernie4_5_VLMoeImageProcessorPil.from_pretrained(path), cls.read_tokenizer(path),
                   cls.read_chat_template(path))

    def __call__(self, images=None, text=(), videos=None, return_tensors="pt", padding=True, fps=None):
        out = super().__call__(images=images, text=text, videos=videos, return_tensors=return_tensors,
                               padding=padding, fps=fps)
        ids, vocab = out["input_ids"], self.tokenizer.get_vocab()
        marks = [vocab[t] for t in ("<|IMAGE_START|>", "<|IMAGE_END|>") if t in vocab]
        out["moe_mm_token_type_ids"] = ((ids == vocab[self.image_token]) | torch.isin(ids, torch.tensor(marks))).long()
        return out
