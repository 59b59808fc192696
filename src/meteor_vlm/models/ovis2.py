"""Pruning on a stock transformers Ovis2 (`Ovis2ForConditionalGeneration`: Ovis2-1B to -34B), on images.

Ovis2 cuts an image into square tiles (the whole image first, then a grid of crops), encodes each with an AIMv2 ViT
(RMS norms, SwiGLU MLPs, no CLS), folds every s x s window of patches (`hidden_stride`, the window's patches row by
row) into one visual token, and turns it into a probability over a visual vocabulary (a linear head, a LayerNorm,
a softmax) that weighs the rows of a visual embedding table. Inside the ViT a token is therefore a whole window
(`Ovis2Runner`), so stage-1 methods keep, drop or merge whole windows, and the adapter's head and table make the
kept windows' visual tokens as the model would. In the prompt a tile is a run of `<IMG_ATOM>` tokens between its
indicator tokens (`<IMG_START>`, `<IMG_GRID>`, `<IMG_COL>`, `<IMG_ROW>`, `<IMG_END>`), which the model embeds with
the last rows of its visual table rather than its text embeddings: the adapter does the same (`embed_text`).
Which tiles make an image is read from the prompt (a whole image's tile follows its start indicator), so `stats`
count images, and `kept_grid` has an entry per tile. Its processor (`Ovis2Processor` with the PIL image processor) loads as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Ovis2ForConditionalGeneration

from .adapters import StockAdapter, tiles_layout, token_runs
from .experts import ExpertSpec
from .idefics3 import Idefics3Runner
from .vlm import fuse_and_prune, run_expert

__all__ = ["Ovis2Adapter", "Ovis2Runner", "ovis2_adapter"]

EXPERT = "vision"


def ovis2_adapter(model) -> Ovis2Adapter | None:
    """The adapter for a transformers Ovis2ForConditionalGeneration, or None for any other model."""
    return Ovis2Adapter(model) if type(model) is Ovis2ForConditionalGeneration else None


class Ovis2Runner(Idefics3Runner):
    """Ovis2's AIMv2 ViT (`vision_tower.transformer`) walked block by block, one token per s x s window (Idefics3's
    window tokens: (B, N, s*s*D), the windows row-major, each holding its patches row by row), its blocks' own
    names (`attention`, `rms_norm1`, `rms_norm2`, `ffn`); `finalize` applies its final RMS norm to each patch."""

    kind = "ovis2"

    def grid(self) -> tuple[int, int]:
        cfg = self.module.config
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        g = size // patch // self.scale
        return g, g

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(T, 3, S, S) tiles -> (T, N, s*s*D): the patch embedding, its RMS norm and the position embeddings."""
        return self._pack(self.module.embeddings(pixel_values))

    def _attend(self, i, h, bias):
        block = self.blocks[i]
        attn = block.attention
        n = block.rms_norm1(h)
        q, k, v = (self._split_heads(p(n), attn.num_heads) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        mask = self._mask(self._patch_bias(bias), h)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        return h + attn.out_proj(out.transpose(1, 2).flatten(2)), k

    def run_attention(self, i, x, bias=None, grid=None):
        h, keys = self._attend(i, self._unpack(x), bias)
        return self._pack(h, window_major=True), keys

    def run_mlp(self, i, x):
        block, h = self.blocks[i], self._unpack(x)
        return self._pack(h + block.ffn(block.rms_norm2(h)), window_major=True)

    def run_block(self, i, x, bias=None, grid=None):
        return self.run_mlp(i, self.run_attention(i, x, bias)[0])

    def query_key(self, i, x, grid=None):
        block, h = self.blocks[i], self._unpack(x)
        attn = block.attention
        n = block.rms_norm1(h)
        return self._split_heads(attn.q_proj(n), attn.num_heads), self._split_heads(attn.k_proj(n), attn.num_heads), attn.scale

    def finalize(self, x):
        B, N, _ = x.shape
        return self.module.rms_norm(x.reshape(B, N, self.window, -1)).reshape(B, N, -1)


class Ovis2Adapter(StockAdapter):
    """What the methods and the runtime need to know about one `Ovis2ForConditionalGeneration`. The images come as
    its processor gives them: pixel_values (tiles, 3, S, S), every image's tiles in prompt order. ValueError for a
    tokenizing function other than softmax or a straight-through argmax (Gumbel noise is random), or a tile grid the
    windows do not fold."""

    IMAGE_INPUTS = ("pixel_values", "grids")
    PIXEL_INPUTS = ("pixel_values",)
    PER_IMAGE_INPUTS = ("pixel_values",)

    def __init__(self, model):
        cfg = model.config.vision_config
        if cfg.tokenize_function not in ("softmax", "st_argmax"):
            raise ValueError(f"tokenize_function={cfg.tokenize_function!r} is not supported (its Gumbel noise makes "
                             "each forward different): only 'softmax' and 'st_argmax'")
        tower = model.model.vision_tower
        runner = Ovis2Runner(tower.transformer, ExpertSpec(EXPERT, Ovis2Runner.kind, 0, {}), cfg.hidden_stride)
        side = runner.grid()[0] * runner.scale
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        if side != size // patch:
            raise ValueError(f"a tile of {size // patch} x {size // patch} patches does not fold into "
                             f"{cfg.hidden_stride} x {cfg.hidden_stride} windows (the stock model pads it)")
        self._locate(model, [runner])
        self.indicator_ids = list(model.config.visual_indicator_token_ids)

    @property
    def tokens_per_tile(self) -> int:
        return self.runners[0].num_patches

    def encoder_tokens(self, images: dict) -> list[int]:
        return [self.tokens_per_tile] * len(images["pixel_values"])

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(..., N, s*s*D) kept windows -> (..., N, text width): the visual head's probabilities over the visual
        vocabulary (the indicators' rows at zero) weighing the visual embedding table's rows."""
        tower, table = self.model.model.vision_tower, self.model.model.visual_embeddings_table
        logits = tower.head_norm(tower.head_linear(features))
        if tower.config.tokenize_function == "softmax":
            probs = logits.softmax(-1)
        else:  # a straight-through argmax: its forward is the one-hot of the largest
            probs = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
        probs = torch.cat([probs, probs.new_zeros(*probs.shape[:-1], tower.num_visual_indicator_tokens)], -1)
        return probs @ table.weight

    def encode_expert(self, index: int, images: dict, method):
        runner = self.runners[index]
        return run_expert(runner, index, images["pixel_values"].to(runner.module.embeddings.patch_embedding.weight.dtype),
                          method)

    def encode_images(self, images: dict, method):
        tokens = self.encode_expert(0, images, method)
        return fuse_and_prune([tokens], [self.project(tokens.features)], self.expert_names, method)

    def tiles_per_image(self, input_ids: torch.Tensor, tiles: int) -> list[int]:
        """The tiles of each image, in row-major order over the batch: each run of image tokens is a tile, and an
        image's first tile (the whole image) follows its start indicator, which no other tile follows (Ovis2Processor
        writes <IMG_START>, the whole image's run, <IMG_GRID>, the crops' runs between <IMG_COL> and <IMG_ROW>,
        <IMG_END>). ValueError unless the runs are one tile's tokens each and add up to `tiles`."""
        rows, starts, ends, _ = token_runs(input_ids, self.image_token_id)
        n = self.tokens_per_tile
        if bool(((ends - starts) != n).any()) or len(starts) != tiles or not tiles or bool((starts == 0).any()):
            raise ValueError(f"the prompts' runs of image tokens {(ends - starts).tolist()} are not {n} tokens for each "
                             f"of the {tiles} tiles given, each after an indicator token")
        before = input_ids[rows, starts - 1]  # the indicator before each tile
        first = before == before[0]  # the start indicator, which the batch's first tile follows
        image = first.long().cumsum(0) - 1
        return torch.bincount(image, minlength=int(image.max()) + 1).tolist()

    def layout(self, images: dict, input_ids: torch.Tensor | None = None):
        """Tile t of an image (the whole image first, then its crops) holds the image tokens t*N .. t*N + N - 1 of
        its runs (N tokens per tile; the indicators between them are text)."""
        if input_ids is None:
            raise ValueError("Ovis2's layout needs the prompt (each image's tiles are read from its tokens)")
        counts = self.tiles_per_image(input_ids, len(images["pixel_values"]))
        return tiles_layout(counts, self.tokens_per_tile, images["pixel_values"].device)

    def expand_images(self, images: dict, input_ids: torch.Tensor, expand_size: int, context: dict | None = None) -> dict:
        """Every prompt's tiles `expand_size` times, the copies of a prompt one after another."""
        return self.expand_tiles(images, input_ids, expand_size)

    def embed_text(self, input_ids: torch.Tensor, with_images: bool) -> torch.Tensor:
        """The text embeddings, the indicator tokens' from the visual table's last rows where images are given (as
        the stock model embeds them)."""
        embeds = super().embed_text(input_ids, with_images)
        if not with_images:
            return embeds
        table = self.model.model.visual_embeddings_table
        first = table.num_embeddings - len(self.indicator_ids)
        embeds = embeds.clone()
        for i, token in enumerate(self.indicator_ids):
            embeds[input_ids == token] = table.weight[first + i].to(embeds.dtype)
        return embeds
