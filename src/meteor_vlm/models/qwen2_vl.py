"""Pruning on a stock transformers Qwen2-VL or Qwen2.5-VL (`Qwen2VLForConditionalGeneration`,
`Qwen2_5_VLForConditionalGeneration`), inside its language model and where its visual tokens enter it.

Qwen2-VL's vision encoder packs every image's patches into one sequence and merges each 2x2 group of patches
into one visual token at its end, so tokens cannot leave it mid-way: stage-1 methods (those that prune inside
an encoder) are refused. Its merged tokens are the one expert, "vision", that `prune_fusion` sees (DivPrune),
and stage-3 methods (FastV, PyramidDrop, DART, SparseVLM, METEOR's stage 3) drop them inside the LLM. Every
kept token keeps its multimodal RoPE position (temporal, height, width; `get_rope_index`), which the
runtime carries as (B, T, 3), so dropping a token is masking it, and decoding goes on from the largest
position + 1 as the stock model's does. Inside `with method(model)` this one instance's `forward`,
`prepare_inputs_for_generation` and `_expand_inputs_for_generation` are replaced (`adapters.StockAdapter`).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from . import runtime
from .adapters import Layout, StockAdapter, check_sdpa
from .vlm import VisualTokens, fuse_and_prune

__all__ = ["Qwen2VLAdapter", "qwen2_vl_adapter"]

EXPERT = "vision"


def qwen2_vl_adapter(model) -> Qwen2VLAdapter | None:
    """The adapter for a transformers Qwen2VLForConditionalGeneration or Qwen2_5_VLForConditionalGeneration, or None
    for any other model."""
    stock = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
    return Qwen2VLAdapter(model) if type(model) in stock else None


class Qwen2VLAdapter(StockAdapter):
    """What the methods and the runtime need to know about one `Qwen2VLForConditionalGeneration` or
    `Qwen2_5_VLForConditionalGeneration` (images only, no videos). `runners` is empty: no stage-1 point."""

    IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")
    PER_IMAGE_INPUTS = ("pixel_values", "image_grid_thw")

    def __init__(self, model: Qwen2VLForConditionalGeneration):
        cfg = model.config
        check_sdpa(cfg.text_config)
        self.model = model
        self.runners = []
        self.expert_names = [EXPERT]
        self.num_llm_layers = cfg.text_config.num_hidden_layers
        self.config = SimpleNamespace(fusion="post", text_config=cfg.text_config, rank_table=None)
        self.image_token_id = cfg.image_token_id
        lm = model.model.language_model
        self.decoder = runtime.DecoderParts(lm.embed_tokens, lm.layers, lm.rotary_emb, lm.norm, model.lm_head)

    def take_images(self, images: dict, index: torch.Tensor) -> dict:
        """pixel_values hold every image's patches one after another (image_grid_thw's product each)."""
        grid = images["image_grid_thw"]
        starts = torch.cat([grid.new_zeros(1), grid.prod(-1).cumsum(0)])
        patches = torch.cat([torch.arange(int(starts[i]), int(starts[i + 1]), device=grid.device) for i in index.tolist()])
        return {"pixel_values": images["pixel_values"][patches], "image_grid_thw": grid[index]}

    def check_method(self, method) -> None:
        if method.prunes_in_encoder():
            raise ValueError(f"{type(method).__name__} prunes inside the vision encoder, which Qwen2-VL's does not allow "
                             "(it packs every image into one sequence and merges 2x2 patches at its end); use a method "
                             "that acts after it (FastV, PyramidDrop, DART, SparseVLM, DivPrune, METEOR's stage 3)")

    def _counts(self, images: dict) -> list[int]:
        grid = images.get("image_grid_thw")
        if grid is None:
            raise ValueError("Qwen2-VL needs image_grid_thw with pixel_values (its processor returns both)")
        return (grid.prod(-1) // self.model.config.vision_config.spatial_merge_size ** 2).tolist()

    def encoder_tokens(self, images: dict) -> list[int]:
        """The merged visual tokens of each image (none are pruned before the encoder's end)."""
        return self._counts(images)

    def encode_images(self, images: dict, method):
        """The encoder's merged tokens of every image, (num_images, most tokens, D) with empty slots after the
        smaller images', then stage 2."""
        counts = self._counts(images)
        feats = self.model.model.get_image_features(images["pixel_values"], images["image_grid_thw"]).pooler_output
        n, dev = max(counts), feats[0].device
        features = feats[0].new_zeros(len(counts), n, feats[0].shape[-1])
        for i, f in enumerate(feats):
            features[i, : len(f)] = f
        grid = torch.arange(n, device=dev).expand(len(counts), n)
        valid = grid < torch.tensor(counts, device=dev)[:, None]
        tokens = VisualTokens(features, torch.zeros_like(grid), grid, torch.ones(grid.shape, device=dev),
                              valid=None if bool(valid.all()) else valid)
        return fuse_and_prune([tokens], [features], self.expert_names, method)

    def layout(self, images: dict) -> Layout:
        """Image i's token g at offset g of its span."""
        counts = torch.tensor(self._counts(images), device=images["pixel_values"].device)
        grid = torch.arange(int(counts.max()), device=counts.device).expand(len(counts), -1)
        return Layout(torch.arange(len(counts), device=counts.device), grid.masked_fill(grid >= counts[:, None], -1),
                      counts)

    def rope_positions(self, input_ids, attention_mask, images: dict | None):
        """(B, T, 3) the stock model's multimodal RoPE positions of the unpruned prompt (None without images)."""
        if images is None:
            return None
        kinds = images.get("mm_token_type_ids")
        if kinds is None:
            kinds = (input_ids == self.image_token_id).int()
        positions, _ = self.model.model.get_rope_index(input_ids, kinds, images["image_grid_thw"],
                                                       attention_mask=attention_mask)
        return positions.permute(1, 2, 0)
