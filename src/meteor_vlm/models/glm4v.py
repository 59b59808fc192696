"""Pruning on a stock transformers GLM-4.1V (`Glm4vForConditionalGeneration`) and GLM-4.5V
(`Glm4vMoeForConditionalGeneration`), on images.

GLM-4.1V's vision encoder is Qwen2-VL's in shape: each image on its own patch grid, 2D rotary positions, whole
2x2 merge windows (a 2x2 convolution, then a merger, turns each into one visual token), multimodal RoPE in the
language model. So `Glm4vRunner` walks it as `Qwen2VLRunner` does (stage-1 methods keep, drop or merge whole
windows between its blocks) with what it adds: an RMSNorm after the patch embedding and learned position
embeddings resampled (bicubic) to each patch of the grid before block 0; an RMSNorm, the 2x2 convolution and the
merger at its end. Its decoder (GLM-4) rotates only part of each head (GLM-4.1V pairing neighbouring dimensions,
GLM-4.5V's mixture-of-experts decoder dimension i with i + d/2), which the runtime's stage-3 scores follow; GLM-4.5V
routes each token on its own, so a pruned token changes no other token's experts. Videos (GLM's prompts write each
frame apart, with its time) are refused.
"""

from __future__ import annotations

import torch
from transformers import Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration
from transformers.vision_utils import get_vision_position_ids

from .qwen2_vl import Qwen2VLAdapter, Qwen2VLImageTextProcessor, Qwen2VLRunner

__all__ = ["Glm4vAdapter", "Glm4vRunner", "Glm4vImageTextProcessor", "glm4v_adapter", "VISION_TOKENS"]

# GLM-4.1V's vision tokens, by the config field that names each one's id
VISION_TOKENS = {"image_start_token_id": "<|begin_of_image|>", "image_end_token_id": "<|end_of_image|>",
                 "image_token_id": "<|image|>", "video_start_token_id": "<|begin_of_video|>",
                 "video_end_token_id": "<|end_of_video|>", "video_token_id": "<|video|>"}


def glm4v_adapter(model) -> Glm4vAdapter | None:
    """The adapter for a transformers Glm4vForConditionalGeneration or Glm4vMoeForConditionalGeneration, or None for
    any other model."""
    stock = (Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration)
    return Glm4vAdapter(model) if type(model) in stock else None


class Glm4vRunner(Qwen2VLRunner):
    """GLM-4.1V's vision encoder walked as Qwen2-VL's (`Qwen2VLRunner`: a token is one 2x2 merge window, its
    patches side by side), with its own ends: the patch embedding, its RMSNorm and the learned position
    embeddings the stock encoder samples at each patch of the grid; and, at the end, its RMSNorm, the 2x2
    convolution over each window's patches and the merger."""

    kind = "glm4v"

    @property
    def out_dim(self) -> int:
        return self.module.merger.down_proj.out_features

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, P, _ = pixel_values.shape
        visual = self.module
        x = visual.post_conv_layernorm(visual.patch_embed(pixel_values.reshape(B * P, -1)))
        grids = torch.tensor([self.grid_thw] * B, device=pixel_values.device)
        ids = get_vision_position_ids(grids, self.merge).to(x.device)  # (B * P, 2): each patch's row and column
        x = visual.embeddings(x, [P] * B, grids, ids[:, 0], ids[:, 1])
        return x.reshape(B, P // self.window, -1)

    def finalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, m*m*D) kept windows -> (B, N, out_dim): the norm, the m x m convolution, the merger."""
        B, N, _ = x.shape
        visual = self.module
        h = visual.post_layernorm(x.reshape(B * N * self.window, -1))
        h = h.view(B * N, self.merge, self.merge, -1).permute(0, 3, 1, 2)
        h = visual.downsample(h).view(B * N, -1)
        return visual.merger(h).view(B, N, -1)


class Glm4vAdapter(Qwen2VLAdapter):
    """`Glm4vForConditionalGeneration` (GLM-4.1V-9B) and `Glm4vMoeForConditionalGeneration` (GLM-4.5V) on images:
    Qwen2-VL's adapter with `Glm4vRunner`. Its prompts hold each image's tokens between <|begin_of_image|> and <|end_of_image|>, and its
    multimodal RoPE positions are the stock model's `get_rope_index`. ValueError for videos."""

    RUNNER = Glm4vRunner

    def _grids(self, images: dict):
        if images.get("pixel_values_videos") is not None:
            raise ValueError("GLM-4.1V: pruning runs on images; videos (each frame written apart, with its time) "
                             "are not supported")
        return super()._grids(images)


class Glm4vImageTextProcessor(Qwen2VLImageTextProcessor):
    """What transformers' `Glm4vProcessor` does for still images, without its video processor (which needs
    torchvision): a tokenizer and `Glm4vImageProcessorPil`. Each "<|image|>" in a prompt, one per image as the chat
    template writes it between <|begin_of_image|> and <|end_of_image|>, becomes one per merged visual token of the
    next image. Returns input_ids and attention_mask (left-padded), pixel_values, image_grid_thw and
    mm_token_type_ids (1 on image tokens). `alias`, if given, is a shorter word for an image's placeholder."""

    image_token, video_token = "<|image|>", "<|video|>"
    image_placeholder = "<|begin_of_image|><|image|><|end_of_image|>"
    video_placeholder = "<|begin_of_video|><|video|><|end_of_video|>"

    def __call__(self, images=None, text=(), videos=None, return_tensors="pt", padding=True, fps=None):
        if videos is not None or fps is not None:
            raise ValueError("GLM-4.1V: this processor takes images only")
        return super().__call__(images=images, text=text, return_tensors=return_tensors, padding=padding)

    @classmethod
    def from_pretrained(cls, path) -> Glm4vImageTextProcessor:
        """From a GLM-4.1V or GLM-4.5V checkpoint folder: its tokenizer, preprocessor_config.json, and the chat
        template of chat_template.jinja or chat_template.json where the folder has one (else the tokenizer's)."""
        from transformers import AutoTokenizer
        from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

        return cls(Glm4vImageProcessorPil.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                   cls.read_chat_template(path))
