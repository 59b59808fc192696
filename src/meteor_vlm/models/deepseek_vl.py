"""Pruning on a stock transformers DeepSeek-VL (`DeepseekVLForConditionalGeneration`: DeepSeek-VL 1.3B).

DeepSeek-VL encodes each image, padded to a square and scaled to the tower's side (384 px), with a SigLIP ViT
without CLS; its features are the tower's last hidden state (every block, then the final LayerNorm), which a
two-layer MLP (the `aligner`) projects into a Llama decoder, one visual token per patch (576). The prompt holds one
image token per patch, as on LLaVA-1.5, so the adapter is LLaVA's with the tower read to its end and the aligner
as the projector: stage-1 methods prune inside the ViT, each kept visual token takes its patch's column (and RoPE
position), and the decoder's layers run in the shared runtime. Inside `with method(model)` this one instance's
`forward`, `prepare_inputs_for_generation` and `_expand_inputs_for_generation` are replaced
(`adapters.StockAdapter`).
"""

from __future__ import annotations

import torch
from transformers import DeepseekVLForConditionalGeneration

from .experts import ExpertSpec, SiglipRunner
from .llava import EXPERT, LlavaAdapter
from .vlm import fuse_and_prune

__all__ = ["DeepseekVLAdapter", "deepseek_vl_adapter", "load_processor"]


def deepseek_vl_adapter(model) -> DeepseekVLAdapter | None:
    """The adapter for a transformers DeepseekVLForConditionalGeneration, or None for any other model."""
    return DeepseekVLAdapter(model) if type(model) is DeepseekVLForConditionalGeneration else None


class DeepseekVLAdapter(LlavaAdapter):
    """What the methods and the runtime need to know about one `DeepseekVLForConditionalGeneration` (images).

    Attributes read by methods' `setup`: runners (one, "vision": every block of the SigLIP tower and its final norm,
    `SiglipRunner`), expert_names, num_llm_layers, config (fusion "post", text_config, rank_table: the model
    config's `rank_table` attribute if it has one). The images come as pixel_values (num_images, 3, S, S)."""

    IMAGE_INPUTS = ("pixel_values",)
    PER_IMAGE_INPUTS = ("pixel_values",)

    def __init__(self, model: DeepseekVLForConditionalGeneration):
        tower = model.model.vision_model
        spec = ExpertSpec(EXPERT, SiglipRunner.kind, tower.config.image_size, {})
        self._locate(model, [SiglipRunner(tower, spec)])

    def encode_images(self, images: dict, method):
        """The forward's image inputs -> `VisualTokens` of every image in the LLM's width after stages 1 and 2."""
        tokens = self.encode_expert(0, self.tiles(images), method)
        return fuse_and_prune([tokens], [self.model.model.aligner(tokens.features)], self.expert_names, method)

    def tiles(self, images: dict) -> torch.Tensor:
        """(num_images, 3, S, S) the pixels (one tile per image)."""
        pixels = images["pixel_values"]
        if pixels.dim() != 4:
            raise ValueError(f"pixel_values must be (images, 3, height, width), got shape {tuple(pixels.shape)}")
        return pixels


def load_processor(path):
    """transformers' `DeepseekVLProcessor` for a DeepSeek-VL checkpoint folder, with the PIL image processor (no
    torchvision needed)."""
    from transformers import AutoTokenizer, DeepseekVLProcessor
    from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil

    return DeepseekVLProcessor.from_pretrained(path, image_processor=DeepseekVLImageProcessorPil.from_pretrained(path),
                                              tokenizer=AutoTokenizer.from_pretrained(path))
