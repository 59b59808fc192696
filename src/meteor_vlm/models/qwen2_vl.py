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

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from . import runtime
from .adapters import Layout, StockAdapter, check_sdpa
from .vlm import VisualTokens, fuse_and_prune

__all__ = ["Qwen2VLAdapter", "Qwen2VLImageTextProcessor", "qwen2_vl_adapter", "VISION_TOKENS", "add_vision_tokens"]

EXPERT = "vision"

# Qwen's vision tokens, by the config field that names each one's id (in the order a word tokenizer adds them)
VISION_TOKENS = {"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                 "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"}


def add_vision_tokens(tokenizer) -> dict[str, int]:
    """Adds "<image>" and Qwen's vision tokens to a word tokenizer as special tokens (for random Qwen-VL models);
    returns the config fields that name their ids."""
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *VISION_TOKENS.values()]})
    return {field: tokenizer.convert_tokens_to_ids(token) for field, token in VISION_TOKENS.items()}


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
        """The encoder's merged tokens of every image, then stage 2."""
        tokens = self.encode_expert(0, images, method)
        return fuse_and_prune([tokens], [tokens.features], self.expert_names, method)

    def encode_expert(self, index: int, images: dict, method) -> VisualTokens:
        """The one expert's merged tokens of every image (pixel_values and image_grid_thw in `images`),
        (num_images, most tokens, D) with empty slots after the smaller images'; `method` cannot act here."""
        counts = self._counts(images)
        feats = self.model.model.get_image_features(images["pixel_values"], images["image_grid_thw"]).pooler_output
        n, dev = max(counts), feats[0].device
        features = feats[0].new_zeros(len(counts), n, feats[0].shape[-1])
        for i, f in enumerate(feats):
            features[i, : len(f)] = f
        grid = torch.arange(n, device=dev).expand(len(counts), n)
        valid = grid < torch.tensor(counts, device=dev)[:, None]
        return VisualTokens(features, torch.zeros_like(grid), grid, torch.ones(grid.shape, device=dev),
                            valid=None if bool(valid.all()) else valid)

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


class Qwen2VLImageTextProcessor:
    """What transformers' `Qwen2VLProcessor` does for still images, without its video processor (which needs
    torchvision): a tokenizer and `Qwen2VLImageProcessorPil`. Each `image_token` ("<|image_pad|>") in a prompt,
    one per image as the chat template writes it between <|vision_start|> and <|vision_end|>, becomes one pad
    per merged visual token of the next image (its grid's patches / merge_size^2). Returns input_ids and
    attention_mask (PyTorch tensors, left-padded; `return_tensors` and `padding` are accepted for a processor's
    call signature), pixel_values (the image processor's packed patches), image_grid_thw and mm_token_type_ids
    (1 on image tokens). `image_placeholder` is what stands for one image in a prompt written by hand, and
    `alias`, if given, a shorter word that means the same (the tests' tiny models write "<image>")."""

    image_token = "<|image_pad|>"
    image_placeholder = "<|vision_start|><|image_pad|><|vision_end|>"

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None, alias: str | None = None):
        self.image_processor, self.tokenizer, self.alias = image_processor, tokenizer, alias
        self.merge_size = image_processor.merge_size
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if self.image_token not in tokenizer.get_vocab():
            raise ValueError(f"the tokenizer has no {self.image_token!r} token: not a Qwen2-VL tokenizer")
        self.tokenizer.padding_side = "left"

    @classmethod
    def from_pretrained(cls, path) -> Qwen2VLImageTextProcessor:
        """From a Qwen2-VL / Qwen2.5-VL checkpoint folder: its tokenizer, preprocessor_config.json, and the chat
        template of chat_template.jinja or chat_template.json where the folder has one (else the tokenizer's)."""
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        path = Path(path)
        template = None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").is_file():
            template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
        return cls(Qwen2VLImageProcessorPil.from_pretrained(path), AutoTokenizer.from_pretrained(path), template)

    def save_pretrained(self, path) -> None:
        """The tokenizer, preprocessor_config.json and chat_template.jinja (if any) into `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        if self.chat_template:
            (path / "chat_template.jinja").write_text(self.chat_template)

    def __call__(self, images=None, text=(), return_tensors="pt", padding=True):
        texts = [text] if isinstance(text, str) else list(text)
        if self.alias:
            texts = [t.replace(self.alias, self.image_placeholder) for t in texts]
        images = list(images) if images is not None else []
        wanted = sum(t.count(self.image_token) for t in texts)
        if wanted != len(images):
            raise ValueError(f"the prompts hold {wanted} {self.image_token} tokens for {len(images)} images")
        pixels = dict(self.image_processor(images=images, return_tensors="pt")) if images else {}
        counts = iter((pixels["image_grid_thw"].prod(-1) // self.merge_size**2).tolist() if images else [])
        texts = [self._expand(t, counts) for t in texts]
        out = dict(self.tokenizer(texts, return_tensors="pt", padding=True))
        out["mm_token_type_ids"] = (out["input_ids"] == self.tokenizer.convert_tokens_to_ids(self.image_token)).int()
        return {**out, **pixels}

    def _expand(self, text: str, counts) -> str:
        parts = text.split(self.image_token)
        return parts[0] + "".join(self.image_token * next(counts) + rest for rest in parts[1:])

    def apply_chat_template(self, conversation, add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        """The chat template (the checkpoint's) applied to `conversation` as text."""
        if not self.chat_template:
            raise ValueError("this processor has no chat template")
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, tokenize=tokenize,
                                                  add_generation_prompt=add_generation_prompt)

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)
