"""Pruning on a stock transformers Aya Vision (`AyaVisionForConditionalGeneration`: Aya Vision 8B and 32B).

Aya Vision cuts an image into square tiles (up to `max_patches` by the image's aspect, then the whole image shrunk
to one tile when there are several; transformers' `GotOcr2ImageProcessor`), encodes each with a SigLIP ViT without
CLS, and folds every s x s window of patches into one visual token (its projector's pixel shuffle, s =
`downsample_factor`: 2, 169 tokens per 364 px tile) before a LayerNorm and a SwiGLU MLP. Inside the ViT a token is
therefore a whole window (`AyaVisionRunner`: its s*s patches side by side, as on InternVL and Idefics3), so stage-1
methods keep, drop or merge whole windows between its blocks, and what leaves the tower is exactly what the pixel
shuffle would have made of the kept windows. In the prompt an image is `<|START_OF_IMG|>`, then for each tile but
the last `TILE_k` and its tokens, then `TILE_GLOBAL` and the whole-image tile's tokens, then `<|END_OF_IMG|>`
(`AyaVisionProcessor`); each kept token takes its own column (and RoPE position), as on LLaVA, and the adapter
groups the tiles into images by the token after each run (an image's last run is followed by `<|END_OF_IMG|>`).

The decoder is Cohere 2: its layers add attention and MLP in parallel and rotate queries and keys only on their
sliding-window layers (the shared runtime reads which from the decoder's config, `runtime.DecoderParts.of_backbone`);
the adapter's head scales the logits by the text config's `logit_scale` exactly where the installed stock head does
(transformers 5.25 and later; 5.24's did not, `HEAD_SCALES_LOGITS`). Inside `with method(model)`
this one instance's `forward`, `prepare_inputs_for_generation` and `_expand_inputs_for_generation` are replaced
(`adapters.StockAdapter`).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from transformers import AyaVisionForConditionalGeneration

from .adapters import token_runs, tower_depth
from .experts import ExpertSpec
from .idefics3 import Idefics3Runner
from .internvl import InternVLAdapter
from .vlm import fuse_and_prune

__all__ = ["AyaVisionAdapter", "AyaVisionRunner", "aya_vision_adapter", "IMAGE_TOKENS", "HEAD_SCALES_LOGITS",
           "load_processor"]

EXPERT = "vision"
# an image's start and end, and one visual token, as AyaVisionProcessor writes them
IMAGE_TOKENS = ("<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>")
# whether the installed stock model multiplies its logits by text_config.logit_scale (transformers 5.25 on; 5.24 not):
# read from its forward's source, so the adapter's keep-all logits equal the stock ones on either version
HEAD_SCALES_LOGITS = "logit_scale" in inspect.getsource(AyaVisionForConditionalGeneration.forward)


def aya_vision_adapter(model) -> AyaVisionAdapter | None:
    """The adapter for a transformers AyaVisionForConditionalGeneration, or None for any other model."""
    return AyaVisionAdapter(model) if type(model) is AyaVisionForConditionalGeneration else None


class AyaVisionRunner(Idefics3Runner):
    """Aya Vision's SigLIP ViT walked block by block up to its feature layer (`depth` blocks), one token per
    pixel-shuffle window (B, N, s*s*D), as `Idefics3Runner` walks Idefics3's; the features are a hidden state of
    the tower, so `finalize` applies no norm."""

    kind = "aya-vision"

    def __init__(self, tower, spec: ExpertSpec, scale: int, depth: int):
        super().__init__(tower, spec, scale)
        self._blocks = tower.encoder.layers[:depth]

    @property
    def blocks(self):
        return self._blocks

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._pack(self.module.embeddings(pixel_values))

    def finalize(self, x):
        return x


class AyaVisionAdapter(InternVLAdapter):
    """What the methods and the runtime need to know about one `AyaVisionForConditionalGeneration` (images).

    Attributes read by methods' `setup`: runners (one, "vision", walking each tile), expert_names, num_llm_layers,
    config (fusion "post", text_config, rank_table: the model config's `rank_table` attribute if it has one). In
    `stats`, encoder_tokens counts every tile's windows and kept_grid has an entry per tile (the whole-image tile
    last)."""

    def __init__(self, model: AyaVisionForConditionalGeneration):
        cfg = model.config
        if cfg.vision_feature_select_strategy != "full":
            raise ValueError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} is not supported "
                             "(only 'full': every patch of a SigLIP tower)")
        depth = tower_depth(cfg.vision_feature_layer, model.model.vision_tower.config.num_hidden_layers)
        self._locate_windows(model, AyaVisionRunner, depth)
        if HEAD_SCALES_LOGITS:
            self.decoder = dataclasses.replace(self.decoder, logit_scale=cfg.text_config.logit_scale)

    def _locate_windows(self, model, runner_cls, depth: int) -> None:
        """Locate the model's parts with `runner_cls` walking the first `depth` blocks of its SigLIP tower, one token
        per `downsample_factor` x `downsample_factor` window; ValueError when the tower's patch grid does not fold
        into such windows."""
        tower = model.model.vision_tower
        vcfg, scale = tower.config, model.config.downsample_factor
        if (vcfg.image_size // vcfg.patch_size) % scale:
            raise ValueError(f"a {vcfg.image_size // vcfg.patch_size}-patch grid does not fold into {scale}x{scale} "
                             "windows")
        spec = ExpertSpec(EXPERT, runner_cls.kind, vcfg.image_size, {})
        self._locate(model, [runner_cls(tower, spec, scale, depth)])

    def project(self, windows: torch.Tensor) -> torch.Tensor:
        """(..., s*s*D) windows, as the pixel shuffle lays them out, through the projector after its pixel shuffle:
        LayerNorm, then the SwiGLU MLP (the first half of linear_1's output gated by SiLU of the second)."""
        proj = self.model.model.multi_modal_projector
        x, gate = proj.linear_1(proj.layernorm(windows)).chunk(2, dim=-1)
        return proj.linear_2(proj.act(gate) * x)

    def encode_images(self, images: dict, method):
        """Every tile's kept windows, projected into the LLM's width, then stage 2."""
        tokens = self.encode_expert(0, images["pixel_values"], method)
        return fuse_and_prune([tokens], [self.project(tokens.features)], self.expert_names, method)

    def tiles_per_image(self, input_ids: torch.Tensor, tiles: int) -> list[int]:
        """The tiles of each image, in row-major order over the batch: each tile is a run of `tokens_per_tile`
        image tokens, and an image's last tile (the whole image) is the run followed by the token that follows
        every prompt's last run (`<|END_OF_IMG|>`; a tile that is not an image's last is followed by the next
        tile's `TILE_k`). ValueError unless every run is one tile, the runs add up to `tiles`, and the prompts
        agree on that token."""
        n = self.tokens_per_tile
        rows, starts, ends, last = token_runs(input_ids, self.image_token_id)
        runs = (ends - starts).tolist()
        if any(r != n for r in runs) or len(runs) != tiles:
            raise ValueError(f"the prompts' image-token runs {runs} are not one run of {n} tokens per tile of the "
                             f"{tiles} tiles given")
        after = input_ids[rows, ends.clamp_max(input_ids.shape[1] - 1)]  # the token after each run
        tags = sorted(set(after[last].tolist()))
        if len(tags) > 1 or (ends[last] >= input_ids.shape[1]).any():
            raise ValueError(f"the prompts' last image-token runs are followed by different tokens {tags}: each "
                             f"image should end with its whole-image tile and {IMAGE_TOKENS[1]}, as the processor "
                             "writes it")
        ends_image = (after == tags[0]).long() if tags else after.long()
        image = torch.cumsum(ends_image, 0) - ends_image  # the image each tile belongs to
        return torch.bincount(image, minlength=int(ends_image.sum())).tolist()


def load_processor(path):
    """transformers' `AyaVisionProcessor` for an Aya Vision checkpoint folder, with the PIL image processor (no
    torchvision needed)."""
    from transformers import AutoTokenizer, AyaVisionProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return AyaVisionProcessor.from_pretrained(path, image_processor=GotOcr2ImageProcessorPil.from_pretrained(path),
                                             tokenizer=AutoTokenizer.from_pretrained(path))
