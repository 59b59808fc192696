"""Pruning on a stock transformers DeepSeek-VL (`DeepseekVLForConditionalGeneration`: DeepSeek-VL 1.3B),
DeepSeek-VL hybrid (`DeepseekVLHybridForConditionalGeneration`: DeepSeek-VL 7B) and Janus
(`JanusForConditionalGeneration`: Janus and Janus-Pro, when they read images to answer about them).

DeepSeek-VL encodes each image, padded to a square and scaled to the tower's side (384 px), with a SigLIP ViT
without CLS; its features are the tower's last hidden state (every block, then the final LayerNorm), which a
two-layer MLP (the `aligner`) projects into a Llama decoder, one visual token per patch (576). The prompt holds one
image token per patch, as on LLaVA-1.5, so the adapter is LLaVA's with the tower read to its end and the aligner
as the projector: stage-1 methods prune inside the ViT, each kept visual token takes its patch's column (and RoPE
position), and the decoder's layers run in the shared runtime. Inside `with method(model)` this one instance's
`forward`, `prepare_inputs_for_generation` and `_expand_inputs_for_generation` are replaced
(`adapters.StockAdapter`).

The hybrid model is a two-encoder VLM fused by channels: beside the SigLIP tower (384 px, 24 x 24 patches) a SAM ViT
reads the image at 1024 px, and its output (plus its neck's reading of its first global block, weighted by
`high_res_vision_alpha`) is brought to the SigLIP's 24 x 24 grid by two strided convolutions; the aligner projects
each grid cell's SAM and SigLIP features to half of the LLM's width each and mixes them into one visual token per
cell (576). Stage-1 methods prune inside the SigLIP tower only: the SAM runs whole (its windowed attention, relative
positions and convolutional neck need the full grid), and each visual token the SigLIP keeps is joined with the SAM
features of its grid cell (a token merged in the SigLIP, as ToMe's, VisionZip's contextual ones or PruMerge+'s, with
those of the cell it sits at). Stage 2 and the LLM-stage methods then see one fused token per cell, as on
DeepSeek-VL 1.3B.

Janus reads images for understanding as DeepSeek-VL 1.3B does (a SigLIP-like ViT of its own read to its final norm,
an aligner MLP, one image token per patch, here between begin- and end-of-image tokens), so its adapter is
DeepSeek-VL's with the tower's runner (`JanusRunner`). Its image generation (a VQ-VAE's codes, fed back as
`inputs_embeds`) is not pruned: with a method attached it is refused, as any call with `inputs_embeds` is.
"""

from __future__ import annotations

import torch
from transformers import (DeepseekVLForConditionalGeneration, DeepseekVLHybridForConditionalGeneration,
                          JanusForConditionalGeneration)

from .. import ops
from .experts import ExpertSpec, SiglipRunner
from .llava import EXPERT, LlavaAdapter
from .vlm import fuse_and_prune

__all__ = ["DeepseekVLAdapter", "DeepseekVLHybridAdapter", "JanusRunner", "deepseek_vl_adapter", "load_processor"]


def deepseek_vl_adapter(model) -> DeepseekVLAdapter | None:
    """The adapter for a transformers DeepseekVLForConditionalGeneration, DeepseekVLHybridForConditionalGeneration or
    JanusForConditionalGeneration, or None for any other model."""
    if type(model) is DeepseekVLHybridForConditionalGeneration:
        return DeepseekVLHybridAdapter(model)
    if type(model) in (DeepseekVLForConditionalGeneration, JanusForConditionalGeneration):
        return DeepseekVLAdapter(model)
    return None


class JanusRunner(SiglipRunner):
    """Janus's ViT (`JanusVisionModel`): SigLIP's block layout (its attention's output projection named otherwise,
    which the runner does not touch), no CLS, a final LayerNorm."""

    def __init__(self, module, spec):
        if module.config.use_qk_norm:
            raise ValueError("a Janus vision tower with use_qk_norm is not supported (the checkpoints do not use it)")
        super().__init__(module, spec)


class DeepseekVLAdapter(LlavaAdapter):
    """What the methods and the runtime need to know about one `DeepseekVLForConditionalGeneration` or
    `JanusForConditionalGeneration` (images).

    Attributes read by methods' `setup`: runners (one, "vision": every block of the SigLIP tower and its final norm,
    `SiglipRunner`; Janus's tower, `JanusRunner`), expert_names, num_llm_layers, config (fusion "post", text_config,
    rank_table: the model config's `rank_table` attribute if it has one). The images come as pixel_values
    (num_images, 3, S, S)."""

    IMAGE_INPUTS = ("pixel_values",)
    PER_IMAGE_INPUTS = ("pixel_values",)

    def __init__(self, model: DeepseekVLForConditionalGeneration):
        tower = model.model.vision_model
        runner = JanusRunner if type(model) is JanusForConditionalGeneration else SiglipRunner
        spec = ExpertSpec(EXPERT, runner.kind, tower.config.image_size, {})
        self._locate(model, [runner(tower, spec)])

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


class DeepseekVLHybridAdapter(DeepseekVLAdapter):
    """`DeepseekVLAdapter` for a `DeepseekVLHybridForConditionalGeneration`: the images come as pixel_values
    (num_images, 3, S, S) for the SigLIP tower (the one runner, "vision", where stage-1 methods prune) and
    high_res_pixel_values (num_images, 3, S', S') for the SAM branch, which runs whole; each kept token is the
    aligner's mix of its SigLIP features and the SAM branch's features at its grid cell."""

    IMAGE_INPUTS = ("pixel_values", "high_res_pixel_values")
    PER_IMAGE_INPUTS = ("pixel_values", "high_res_pixel_values")

    def encode_images(self, images: dict, method):
        """The forward's image inputs -> `VisualTokens` of every image in the LLM's width after stages 1 and 2."""
        tokens = self.encode_expert(0, self.tiles(images), method)
        cells = ops.gather_tokens(self.high_res_features(images), tokens.grid_index)
        return fuse_and_prune([tokens], [self.model.model.aligner(tokens.features, cells)], self.expert_names, method)

    def high_res_features(self, images: dict) -> torch.Tensor:
        """(num_images, G, C) the SAM branch's features on the SigLIP's grid (G cells, row-major), as the stock model
        computes them."""
        pixels, high = images["pixel_values"], images.get("high_res_pixel_values")
        if high is None:
            raise ValueError("a DeepSeek-VL hybrid model needs high_res_pixel_values with pixel_values (its processor "
                             "gives both)")
        if high.dim() != 4 or high.shape[0] != pixels.shape[0]:
            raise ValueError(f"high_res_pixel_values must be (images, 3, height, width) for the {pixels.shape[0]} "
                             f"images of pixel_values, got shape {tuple(high.shape)}")
        sam = self.model.model.high_res_vision_model
        features = self.model.model.get_high_res_image_features(high.to(sam.dtype)).last_hidden_state
        if features.shape[1] != self.tokens_per_image:
            raise ValueError(f"the SAM branch gives {features.shape[1]} cells, the SigLIP tower "
                             f"{self.tokens_per_image} patches: they must be the same grid")
        return features


def load_processor(path):
    """transformers' `DeepseekVLProcessor`, `DeepseekVLHybridProcessor` or `JanusProcessor` for a DeepSeek-VL,
    DeepSeek-VL hybrid or Janus checkpoint folder (by its config's model_type), with the PIL image processor (no
    torchvision needed)."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer, DeepseekVLHybridProcessor, DeepseekVLProcessor, JanusProcessor
    from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil
    from transformers.models.deepseek_vl_hybrid.image_processing_pil_deepseek_vl_hybrid import (
        DeepseekVLHybridImageProcessorPil)
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    kinds = {"deepseek_vl_hybrid": (DeepseekVLHybridProcessor, DeepseekVLHybridImageProcessorPil),
             "janus": (JanusProcessor, JanusImageProcessorPil)}
    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    processor, images = kinds.get(model_type, (DeepseekVLProcessor, DeepseekVLImageProcessorPil))
    return processor.from_pretrained(path, image_processor=images.from_pretrained(path),
                                     tokenizer=AutoTokenizer.from_pretrained(path))
