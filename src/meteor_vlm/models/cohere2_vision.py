"""Pruning on a stock transformers Command A Vision (`Cohere2VisionForConditionalGeneration`).

It is Aya Vision's layout (`models/aya_vision.py`): square tiles (and the whole image as a last one when there are
several) of a SigLIP ViT without CLS, every s x s window of patches folded into one visual token by the projector's
pixel shuffle (s = `downsample_factor`: 2), a SwiGLU MLP, and a Cohere 2 decoder. What differs: the features are the
tower's last hidden state (every block, then its final LayerNorm, applied to each patch of a window), the projector
has no LayerNorm before its MLP, and in the prompt an image is `<|START_OF_IMG|>`, then for each tile its tokens and
`<|IMG_LINE_BREAK|>`, then `<|END_OF_IMG|>` (`Cohere2VisionProcessor`), so the adapter groups the tiles into images
by the token after each tile's line break. Inside `with method(model)` this one instance's `forward`,
`prepare_inputs_for_generation` and `_expand_inputs_for_generation` are replaced (`adapters.StockAdapter`).
"""

from __future__ import annotations

import torch
from transformers import Cohere2VisionForConditionalGeneration

from .adapters import token_runs
from .aya_vision import AyaVisionAdapter, AyaVisionRunner
from .idefics3 import Idefics3Runner

__all__ = ["Cohere2VisionAdapter", "Cohere2VisionRunner", "cohere2_vision_adapter", "IMAGE_TOKENS"]

# an image's start and end, one visual token, and the end of a tile, as Cohere2VisionProcessor writes them
IMAGE_TOKENS = ("<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>")


def cohere2_vision_adapter(model) -> Cohere2VisionAdapter | None:
    """The adapter for a transformers Cohere2VisionForConditionalGeneration, or None for any other model."""
    return Cohere2VisionAdapter(model) if type(model) is Cohere2VisionForConditionalGeneration else None


class Cohere2VisionRunner(AyaVisionRunner):
    """Aya Vision's window runner over every block of the tower, ending with the tower's final LayerNorm on each
    patch (`Idefics3Runner.finalize`), as its last hidden state has it."""

    kind = "cohere2-vision"
    finalize = Idefics3Runner.finalize


class Cohere2VisionAdapter(AyaVisionAdapter):
    """What the methods and the runtime need to know about one `Cohere2VisionForConditionalGeneration` (images).

    Attributes read by methods' `setup`: runners (one, "vision", walking each tile), expert_names, num_llm_layers,
    config (fusion "post", text_config, rank_table: the model config's `rank_table` attribute if it has one). In
    `stats`, encoder_tokens counts every tile's windows and kept_grid has an entry per tile (the whole-image tile
    last)."""

    def __init__(self, model: Cohere2VisionForConditionalGeneration):
        self._locate_windows(model, Cohere2VisionRunner, model.model.vision_tower.config.num_hidden_layers)

    def project(self, windows: torch.Tensor) -> torch.Tensor:
        """(..., s*s*D) windows, as the pixel shuffle lays them out, through the projector after its pixel shuffle:
        the SwiGLU MLP (the first half of linear_1's output gated by SiLU of the second)."""
        proj = self.model.model.multi_modal_projector
        x, gate = proj.linear_1(windows).chunk(2, dim=-1)
        return proj.linear_2(proj.act(gate) * x)

    def tiles_per_image(self, input_ids: torch.Tensor, tiles: int) -> list[int]:
        """The tiles of each image, in row-major order over the batch: each tile is a run of `tokens_per_tile`
        image tokens and a line break, and an image's last tile is the one whose line break is followed by the
        token that follows every prompt's last one (`<|END_OF_IMG|>`). ValueError unless every run is one tile
        followed by one same token, the runs add up to `tiles`, and the prompts agree on the image's end."""
        n, T = self.tokens_per_tile, input_ids.shape[1]
        rows, starts, ends, last = token_runs(input_ids, self.image_token_id)
        runs = (ends - starts).tolist()
        if any(r != n for r in runs) or len(runs) != tiles:
            raise ValueError(f"the prompts' image-token runs {runs} are not one run of {n} tokens per tile of the "
                             f"{tiles} tiles given")
        breaks = input_ids[rows, ends.clamp_max(T - 1)]
        after = input_ids[rows, (ends + 1).clamp_max(T - 1)]  # the token after each tile's line break
        tags = sorted(set(after[last].tolist()))
        if len(set(breaks.tolist())) > 1 or len(tags) > 1 or (ends[last] + 1 >= T).any():
            raise ValueError(f"the prompts' tiles are not each followed by one line break token, and every image's "
                             f"last by {IMAGE_TOKENS[1]} after it, as the processor writes them (tokens after the "
                             f"tiles {sorted(set(breaks.tolist()))}, after the last line breaks {tags})")
        ends_image = (after == tags[0]).long() if tags else after.long()
        image = torch.cumsum(ends_image, 0) - ends_image  # the image each tile belongs to
        return torch.bincount(image, minlength=int(ends_image.sum())).tolist()
