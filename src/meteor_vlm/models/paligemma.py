"""Pruning on a stock transformers PaliGemma (`PaliGemmaForConditionalGeneration`: PaliGemma 3B with a Gemma decoder,
at 224, 448 or 896 px, and PaliGemma 2 with a Gemma 2 decoder, 3B to 28B).

PaliGemma is LLaVA-1.5's shape with a SigLIP tower read whole (its last block and final norm: 256, 1024 or 4096
tokens per image) and a linear projector, so `LlavaAdapter` does most of it. Its prompt is a prefix (the images'
tokens, then the text) that attends both ways, given the processor's `token_type_ids` (0 on the prefix), and the
generated suffix, causal: the whole prefix is one block of the runtime (`attention_blocks`), which pruned tokens
leave. PaliGemma 2's Gemma 2 decoder alternates sliding-window and global layers and soft-caps its attention logits
and its output logits: SDPA cannot soft-cap, so its layers run eager attention on the runtime's masks made additive,
stage-3 scores soft-cap their logits as its layers do, and the head caps the logits (`runtime.DecoderParts`).
"""

from __future__ import annotations

import torch
from transformers import PaliGemmaForConditionalGeneration

from .experts import ExpertSpec, SiglipRunner
from .llava import EXPERT, LlavaAdapter

__all__ = ["PaliGemmaAdapter", "paligemma_adapter"]


def paligemma_adapter(model) -> PaliGemmaAdapter | None:
    """The adapter for a transformers PaliGemmaForConditionalGeneration, or None for any other model."""
    return PaliGemmaAdapter(model) if type(model) is PaliGemmaForConditionalGeneration else None


class PaliGemmaAdapter(LlavaAdapter):
    """What the methods and the runtime need to know about one PaliGemma: LLaVA-1.5's layout (one tile per image,
    patch g at offset g of its image's tokens) with the tower read at its final norm, and the prompt's prefix one
    block that attends both ways (a PaliGemma 2 decoder's soft-capping and sliding windows are the runtime's)."""

    # the processor returns labels with every prompt (all -100 without a suffix): named here so generate takes them
    IMAGE_INPUTS = ("pixel_values", "token_type_ids", "labels")
    PER_IMAGE_INPUTS = ("pixel_values",)

    def __init__(self, model):
        tower = model.model.vision_tower
        tower = getattr(tower, "vision_model", tower)  # SiglipVisionModel wraps its transformer in older transformers
        spec = ExpertSpec(EXPERT, SiglipRunner.kind, tower.config.image_size, {})
        self._locate(model, [SiglipRunner(tower, spec)])
        self.decoder.blocks_over_window = True  # PaliGemma 2's sliding layers: the prefix is seen whole, as stock

    def attention_blocks(self, input_ids: torch.Tensor, images: dict) -> torch.Tensor | None:
        """The prefix (token_type_ids 0) one block, the suffix causal, as the stock model reads them; None without
        token_type_ids (the stock model is then causal everywhere)."""
        types = images.get("token_type_ids")
        if types is None:
            return None
        if types.shape != input_ids.shape:
            raise ValueError(f"token_type_ids {tuple(types.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
        return torch.where(types == 0, 0, -1)

    def forward(self, method, *args, labels=None, **kwargs):
        """`StockAdapter.forward`; the processor's labels are accepted where they hold no target (all -100, a prompt
        without a suffix), since there is no loss to compute."""
        if labels is not None and bool((labels != -100).any()):
            raise ValueError("labels with targets (a suffix) are not supported while a pruning method is attached")
        return super().forward(method, *args, **kwargs)
