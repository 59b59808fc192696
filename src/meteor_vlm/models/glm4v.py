"""Pruning on a stock transformers GLM-4.1V (`Glm4vForConditionalGeneration`), GLM-4.5V
(`Glm4vMoeForConditionalGeneration`), GLM-4.6V (`Glm46VForConditionalGeneration`: GLM-4.1V's model classes with
GLM-4.1V's decoder, GLM-4.6V-Flash, or GLM-4.5V's mixture of experts, GLM-4.6V) and GLM-OCR
(`GlmOcrForConditionalGeneration`: GLM-4.1V's kind of encoder without learned positions, per-head q/k norms in its
attention), on images and videos.

GLM-4.1V's vision encoder is Qwen2-VL's in shape: each image on its own patch grid, 2D rotary positions, whole
2x2 merge windows (a 2x2 convolution, then a merger, turns each into one visual token), multimodal RoPE in the
language model. So `Glm4vRunner` walks it as `Qwen2VLRunner` does (stage-1 methods keep, drop or merge whole
windows between its blocks) with what it adds: an RMSNorm after the patch embedding and learned position
embeddings resampled (bicubic) to each patch of the grid before block 0; an RMSNorm, the 2x2 convolution and the
merger at its end. Its decoder (GLM-4) rotates only part of each head (GLM-4.1V pairing neighbouring dimensions,
GLM-4.5V's mixture-of-experts decoder dimension i with i + d/2), which the runtime's stage-3 scores follow; GLM-4.5V
routes each token on its own, so a pruned token changes no other token's experts.

Videos: GLM-4.1V encodes each temporal patch of a video (two frames) as an image of its own, and its prompts write
each one as an image (<|begin_of_image|>, its <|image|> tokens, <|end_of_image|>) followed by its time in seconds,
inside <|begin_of_video|> ... <|end_of_video|>. So the adapter runs a video as those images: every method prunes a
video's temporal patches as it prunes images (stage 1 keeps its share of each), and in `stats` each temporal patch
counts as an image. As in the stock model, a call holds images or videos, not both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration, Glm46VForConditionalGeneration,
                          GlmOcrForConditionalGeneration)
from transformers.vision_utils import get_vision_position_ids

from .qwen2_vl import Qwen2VLAdapter, Qwen2VLImageTextProcessor, Qwen2VLRunner

__all__ = ["Glm4vAdapter", "Glm4vRunner", "Glm4vImageTextProcessor", "glm4v_adapter", "VISION_TOKENS"]

# GLM-4.1V's vision tokens, by the config field that names each one's id
VISION_TOKENS = {"image_start_token_id": "<|begin_of_image|>", "image_end_token_id": "<|end_of_image|>",
                 "image_token_id": "<|image|>", "video_start_token_id": "<|begin_of_video|>",
                 "video_end_token_id": "<|end_of_video|>", "video_token_id": "<|video|>"}


def glm4v_adapter(model) -> Glm4vAdapter | None:
    """The adapter for a transformers Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration,
    Glm46VForConditionalGeneration or GlmOcrForConditionalGeneration, or None for any other model."""
    stock = (Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration, Glm46VForConditionalGeneration,
             GlmOcrForConditionalGeneration)
    return Glm4vAdapter(model) if type(model) in stock else None


class Glm4vRunner(Qwen2VLRunner):
    """GLM-4.1V's vision encoder walked as Qwen2-VL's (`Qwen2VLRunner`: a token is one 2x2 merge window, its
    patches side by side), with its own ends: the patch embedding, its RMSNorm and the learned position
    embeddings the stock encoder samples at each patch of the grid (GLM-OCR's encoder has neither: its patches
    enter block 0 as embedded); and, at the end, its RMSNorm, the 2x2 convolution over each window's patches and
    the merger."""

    kind = "glm4v"

    @property
    def out_dim(self) -> int:
        return self.module.merger.down_proj.out_features

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, P, _ = pixel_values.shape
        visual = self.module
        x = visual.patch_embed(pixel_values.reshape(B * P, -1))
        if hasattr(visual, "embeddings"):  # GLM-4.1V's norm and learned positions (not GLM-OCR's)
            grids = torch.tensor([self.grid_thw] * B, device=pixel_values.device)
            ids = get_vision_position_ids(grids, self.merge).to(x.device)  # (B * P, 2): each patch's row and column
            x = visual.embeddings(visual.post_conv_layernorm(x), [P] * B, grids, ids[:, 0], ids[:, 1])
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
    """`Glm4vForConditionalGeneration` (GLM-4.1V-9B) and `Glm4vMoeForConditionalGeneration` (GLM-4.5V) on images
    or videos: Qwen2-VL's adapter with `Glm4vRunner`. Its prompts hold each image's tokens between
    <|begin_of_image|> and <|end_of_image|>, and its multimodal RoPE positions are the stock model's
    `get_rope_index`. A video's inputs become its temporal patches' images (`as_frames`) before anything else
    reads them."""

    RUNNER = Glm4vRunner

    @staticmethod
    def as_frames(inputs: dict) -> dict:
        """The forward's image inputs with each video as the images GLM-4.1V makes of it: pixel_values_videos become
        pixel_values, each temporal patch of video_grid_thw an image grid (1, h, w) (what the stock model's
        `get_video_features` encodes); mm_token_type_ids 2 (a video's <|image|> tokens) become 1, which gives the
        stock positions (`get_rope_index` places a video's temporal patches as it places images). ValueError for
        images and videos together: the prompts write both with <|image|> tokens, and the stock model takes one
        kind per call."""
        kinds = inputs.get("mm_token_type_ids")
        out = {**inputs, "mm_token_type_ids": (kinds > 0).to(kinds.dtype)} if kinds is not None else dict(inputs)
        if inputs.get("pixel_values_videos") is None:
            return out
        if inputs.get("pixel_values") is not None:
            raise ValueError("GLM-4.1V: a call holds images or videos, not both (its prompts write both with <|image|> "
                             "tokens, and the stock model takes one kind per call)")
        grid = inputs.get("video_grid_thw")
        if grid is None:
            raise ValueError("GLM-4.1V needs video_grid_thw with pixel_values_videos (its processor returns both)")
        frames = grid[:, 1:].repeat_interleave(grid[:, 0], dim=0)
        out.update(pixel_values=inputs["pixel_values_videos"], pixel_values_videos=None, video_grid_thw=None,
                   image_grid_thw=torch.cat([torch.ones_like(frames[:, :1]), frames], 1))
        return out

    def _grids(self, images: dict):
        if images.get("pixel_values_videos") is not None:  # forward and expand_images hand over frames
            raise ValueError("GLM-4.1V: a video reaches the encoder as its temporal patches' images "
                             "(Glm4vAdapter.as_frames)")
        return super()._grids(images)

    def expand_images(self, images: dict, input_ids: torch.Tensor, expand_size: int,
                      context: dict | None = None) -> dict:
        """Every prompt's images, or its videos' temporal patches as images, `expand_size` times."""
        return super().expand_images(self.as_frames(images), input_ids, expand_size, context)

    def forward(self, method, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0, query_positions=None, **kwargs):
        return super().forward(method, input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep,
                               query_positions, **self.as_frames(kwargs))


class Glm4vImageTextProcessor(Qwen2VLImageTextProcessor):
    """What transformers' `Glm4vProcessor` does, without its video processor (which needs torchvision): a tokenizer
    and `Glm4vImageProcessorPil`. Each "<|image|>" in a prompt, one per image as the chat template writes it between
    <|begin_of_image|> and <|end_of_image|>, becomes one per merged visual token of the next image. Each "<|video|>",
    one per video as the chat template writes it between <|begin_of_video|> and <|end_of_video|>, becomes, per
    temporal patch of the next video, <|begin_of_image|>, one <|image|> per merged visual token of the patch,
    <|end_of_image|> and the patch's time in whole seconds (its first frame's, as `Glm4vProcessor` writes it). A video
    is a list of frames (PIL images of one size), already sampled at `fps` (one rate, or one per video; 2 without,
    the rate GLM's video processor samples at), each frame sized and normalised as the image processor does an
    image, consecutive frames paired into temporal patches (`Qwen2VLImageTextProcessor.videos`). Returns input_ids and
    attention_mask (left-padded), pixel_values and image_grid_thw, pixel_values_videos and video_grid_thw, and
    mm_token_type_ids (1 on image tokens, 2 on the <|image|> tokens inside a video). `alias`, if given, is a shorter
    word for an image's placeholder. With `decimal_seconds` (GLM-4.6V; `from_pretrained` sets it for a glm46v
    folder) a patch's time is written as `Glm46VProcessor` writes it, to a tenth of a second and " seconds" after."""

    image_token, video_token = "<|image|>", "<|video|>"
    image_placeholder = "<|begin_of_image|><|image|><|end_of_image|>"
    video_placeholder = "<|begin_of_video|><|video|><|end_of_video|>"

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None, alias: str | None = None,
                 decimal_seconds: bool = False):
        super().__init__(image_processor, tokenizer, chat_template, alias)
        self.decimal_seconds = decimal_seconds

    def __call__(self, images=None, text=(), videos=None, return_tensors="pt", padding=True, fps=None):
        texts, images, videos = self._given(text, images, videos)
        pixels = dict(self.image_processor(images=images, return_tensors="pt")) if images else {}
        counts = iter((pixels["image_grid_thw"].prod(-1) // self.merge_size**2).tolist() if images else [])
        texts = [self._expand(t, self.image_token, counts) for t in texts]  # before the videos add <|image|> tokens
        if videos:
            pixels.update(self.videos(videos))
            rates = self._rates(fps, len(videos))
            written = iter(self._frames(rates, pixels["video_grid_thw"]))
            texts = [self._fill(t, self.video_token, written) for t in texts]
        elif fps is not None:
            raise ValueError("fps is the frame rate of videos, and no videos were given")
        out = dict(self.tokenizer(texts, return_tensors="pt", padding=True))
        ids, vocab = out["input_ids"], self.tokenizer.convert_tokens_to_ids
        inside = (ids == vocab("<|begin_of_video|>")).cumsum(1) > (ids == vocab("<|end_of_video|>")).cumsum(1)
        out["mm_token_type_ids"] = (ids == vocab(self.image_token)).int() * (1 + inside.int())
        return {**out, **pixels}

    def _frames(self, rates: list[float], grids: torch.Tensor) -> list[str]:
        """Each video's text: per temporal patch, its image block and its first frame's time (frame k at k / fps),
        in whole seconds (GLM-4.6V: to a tenth, "2.5 seconds")."""
        tp = self.image_processor.temporal_patch_size
        pads = [self.image_token * (h * w // self.merge_size**2) for _, h, w in grids.tolist()]
        start, end = self.image_placeholder.split(self.image_token)

        def time(seconds: float) -> str:
            return f"{seconds:.1f} seconds" if self.decimal_seconds else str(int(seconds))

        return ["".join(f"{start}{pad}{end}{time(i * tp / rate)}" for i in range(t))
                for rate, pad, (t, _, _) in zip(rates, pads, grids.tolist())]

    @classmethod
    def from_pretrained(cls, path) -> Glm4vImageTextProcessor:
        """From a GLM-4.1V, GLM-4.5V or GLM-4.6V checkpoint folder: its tokenizer, preprocessor_config.json, and the
        chat template of chat_template.jinja or chat_template.json where the folder has one (else the tokenizer's);
        a GLM-4.6V's writes videos' times to a tenth of a second."""
        from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

        config = Path(path) / "config.json"
        v46 = config.is_file() and json.loads(config.read_text()).get("model_type") == "glm46v"
        return cls(Glm4vImageProcessorPil.from_pretrained(path), cls.read_tokenizer(path), cls.read_chat_template(path),
                   decimal_seconds=v46)
