"""Processor of the multi-encoder VLM: per-expert image preprocessing, tokenizer, prompt template."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, PreTrainedTokenizerFast

from .experts import ExpertSpec

__all__ = ["MultiEncoderProcessor", "build_word_tokenizer", "IMAGE_TOKEN"]

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)


def build_word_tokenizer(words: Sequence[str], bos: bool = False) -> PreTrainedTokenizerFast:
    """A small word-level tokenizer (lowercased, '?' and punctuation split off) for models trained here.

    Ids: <pad>=0, <s>=1, </s>=2, <unk>=3, <image>=4, then `words` in order. Left padding. With `bos`,
    every encoded text starts with <s> (unless add_special_tokens=False): a fixed first token that
    attention can fall back on.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=[IMAGE_TOKEN],
        padding_side="left",
    )
    return fast


class MultiEncoderProcessor:
    """Turns images and prompts into the inputs of a MultiEncoderVLM, following transformers' convention.

    ``processor(images=[img, ...], text=[prompt, ...], return_tensors="pt", padding=True)`` with PIL
    images (one per prompt, or a list per prompt for several images or video frames). A prompt holds one
    ``<image>`` per image; a prompt with none gets them prepended. Every image is resized to each
    expert's resolution and normalised with that expert's mean/std (`pixel_values_<expert>`).
    """

    def __init__(self, tokenizer, experts: Sequence[ExpertSpec], prompt_template: str = "{prompt}"):
        if "{prompt}" not in prompt_template:
            raise ValueError("prompt_template must contain '{prompt}'")
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.experts = list(experts)
        self.prompt_template = prompt_template
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token")

    # ---- images -----------------------------------------------------------------------------
    @staticmethod
    def _to_pil(image) -> Image.Image:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise ValueError(f"image file not found: {path}")
            try:
                return Image.open(path).convert("RGB")
            except Exception as e:  # noqa: BLE001 - any decoder error means the file is unreadable
                raise ValueError(f"cannot read image {path}: {e}") from e
        if isinstance(image, np.ndarray) and image.ndim == 3:
            return Image.fromarray(image.astype(np.uint8)).convert("RGB")
        raise ValueError(f"expected a PIL image, an image path or an (H, W, 3) array, got {type(image).__name__}")

    def preprocess(self, image, spec: ExpertSpec) -> torch.Tensor:
        """One image -> (3, S, S) float tensor at the expert's resolution and normalisation."""
        img = self._to_pil(image).resize((spec.image_size, spec.image_size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(spec.image_mean).view(3, 1, 1)
        std = torch.tensor(spec.image_std).view(3, 1, 1)
        return (x - mean) / std

    # ---- prompts ------------------------------------------------------------------------------
    def format_prompt(self, question: str, num_images: int = 1) -> str:
        """The model's prompt for a question about `num_images` images."""
        return self.prompt_template.format(prompt=(self.image_token + " ") * num_images + question)

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True, **kwargs) -> BatchFeature:
        if text is None:
            raise ValueError("text is required")
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            per_text: list[list] = [[] for _ in texts]
        elif not isinstance(images, (list, tuple)):
            per_text = [[images]]
        else:
            per_text = [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]
        if len(per_text) != len(texts):
            raise ValueError(f"{len(texts)} prompts but images for {len(per_text)} prompts")
        prompts = []
        for i, (t, imgs) in enumerate(zip(texts, per_text)):
            n = t.count(self.image_token)
            if n == 0 and imgs:
                t = (self.image_token + " ") * len(imgs) + t
            elif n != len(imgs):
                raise ValueError(f"prompt {i} has {n} {self.image_token} placeholders but {len(imgs)} images were given")
            prompts.append(t)
        enc = self.tokenizer(prompts, return_tensors=return_tensors, padding=padding, **kwargs)
        data = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        flat = [img for imgs in per_text for img in imgs]
        if flat:
            for spec in self.experts:
                data[f"pixel_values_{spec.name}"] = torch.stack([self.preprocess(im, spec) for im in flat])
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=kwargs.pop("skip_special_tokens", True), **kwargs)

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=kwargs.pop("skip_special_tokens", True), **kwargs)

    # ---- save / load ----------------------------------------------------------------------------
    def save_pretrained(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        cfg = {"experts": [e.to_dict() for e in self.experts], "prompt_template": self.prompt_template}
        (path / "processor_config.json").write_text(json.dumps(cfg, indent=2))

    @classmethod
    def from_pretrained(cls, path) -> MultiEncoderProcessor:
        path = Path(path)
        cfg_file = path / "processor_config.json"
        if not cfg_file.is_file():
            raise ValueError(f"no processor_config.json in {path}")
        cfg = json.loads(cfg_file.read_text())
        # the fast-tokenizer class directly: AutoTokenizer would read config.json, the VLM's, and warn about it
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
        return cls(tok, [ExpertSpec.from_dict(e) for e in cfg["experts"]], cfg.get("prompt_template", "{prompt}"))
