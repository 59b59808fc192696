"""Pruning on a stock transformers LFM2-VL (`Lfm2VlForConditionalGeneration`: LFM2-VL-450M, -1.6B, -3B), on images.

LFM2-VL encodes each image (or each tile of one, and its thumbnail) at its own size with a SigLIP2 NaFlex ViT: its
patches, already flattened by the processor (pixel_values (tiles, most patches, 3*p*p), spatial_shapes (tiles, 2)
each tile's patch grid, pixel_attention_mask (tiles, most patches) its real ones), get the position embeddings
resized to the grid, run through the blocks, each tile attending within itself, and the final norm. The projector
folds every f x f window of patches into one visual token (its pixel unshuffle: the window's patches row by row,
concatenated), then a LayerNorm and a two-layer MLP. Inside the ViT a token is therefore a whole window
(`Lfm2VlRunner`), so stage-1 methods keep, drop or merge whole windows, tiles of one grid batched together (as
Mistral 3's images are), and what leaves the tower is what the projector would have made of the kept windows. In the
prompt a tile is a run of image tokens, between text tokens (`<|image_start|>`, `<|img_row_1_col_1|>`,
`<|img_thumbnail|>`, `<|image_end|>`); each kept token takes its own column, as on LLaVA, and `stats` count tiles as
images.

Its LFM2 decoder is hybrid: short causal convolutions ("conv" layers) between its attention layers. As on Qwen3.5,
an LLM-stage method asked to prune before a convolution layer prunes before the next attention layer
(`runtime.DecoderParts.scoring_layer`), and dropping a token there is removing it from the convolutions' input, not
masking it. Transformers' `Lfm2VlProcessor` needs torchvision, which this project does not install: the adapter
takes what it returns, and `meteor ask` / `speed` do not load LFM2-VL folders.
"""

from __future__ import annotations

import torch
from transformers import Lfm2VlForConditionalGeneration

from .adapters import Layout, StockAdapter, encode_by_grid, one_run_per_item
from .experts import ExpertSpec
from .idefics3 import Idefics3Runner
from .vlm import VisualTokens, fuse_and_prune, run_expert

__all__ = ["Lfm2VlAdapter", "Lfm2VlRunner", "lfm2_vl_adapter"]

EXPERT = "vision"


def lfm2_vl_adapter(model) -> Lfm2VlAdapter | None:
    """The adapter for a transformers Lfm2VlForConditionalGeneration, or None for any other model."""
    return Lfm2VlAdapter(model) if type(model) is Lfm2VlForConditionalGeneration else None


class Lfm2VlRunner(Idefics3Runner):
    """LFM2-VL's SigLIP2 ViT walked block by block for the tiles of one patch grid (`patch_grid`, rows x cols; the
    runner in the adapter's `runners` describes the tower without one), one token per f x f window: tokens are
    (B, N, f*f*D), the windows row-major over the grid, each holding its patches row by row (the order the pixel
    unshuffle concatenates them in). The blocks are SigLIP's, run on the kept windows' patches; `finalize` applies
    the tower's final norm to each patch."""

    kind = "lfm2_vl"

    def __init__(self, tower, spec: ExpertSpec, scale: int, grid: tuple[int, int] | None = None):
        super().__init__(tower, spec, scale)
        self.patch_grid = grid
        self.fixed_grid = grid is not None

    def grid(self) -> tuple[int, int]:
        if self.patch_grid is None:
            raise ValueError("LFM2-VL's vision tower has no fixed grid: each tile has its own (spatial_shapes)")
        rows, cols = self.patch_grid
        return rows // self.scale, cols // self.scale

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, P, 3*p*p) patchified tiles of this grid (P >= rows*cols: the real patches first) -> (B, N, f*f*D):
        the patch embedding and the position embeddings resized to the grid."""
        rows, cols = self.patch_grid
        s, B = self.scale, pixel_values.shape[0]
        shapes = torch.tensor([[rows, cols]] * B, device=pixel_values.device)
        h = self.module.embeddings(pixel_values[:, : rows * cols], shapes)  # (B, rows*cols, D), row-major
        windows = h.reshape(B, rows // s, s, cols // s, s, -1).permute(0, 1, 3, 2, 4, 5)
        return windows.reshape(B, rows * cols // self.window, -1)


class Lfm2VlAdapter(StockAdapter):
    """What the methods and the runtime need to know about one `Lfm2VlForConditionalGeneration`. `runners` holds the
    tower's `Lfm2VlRunner` without a grid; each batch is encoded by one runner per tile grid. The tiles come as the
    processor gives them: pixel_values (tiles, most patches, 3*p*p), spatial_shapes and pixel_attention_mask."""

    IMAGE_INPUTS = ("pixel_values", "spatial_shapes", "pixel_attention_mask")
    PER_IMAGE_INPUTS = ("pixel_values", "spatial_shapes", "pixel_attention_mask")

    def __init__(self, model):
        tower = model.model.vision_tower
        self.factor = model.config.downsample_factor
        spec = ExpertSpec(EXPERT, Lfm2VlRunner.kind, 0, {})
        self._locate(model, [Lfm2VlRunner(tower, spec, self.factor)])

    def _grids(self, images: dict) -> torch.Tensor:
        """(tiles, 2) each tile's patch grid; ValueError without spatial_shapes, for grids the unshuffle cannot fold,
        or where pixel_attention_mask does not mark each tile's first rows*cols patches as its real ones."""
        shapes, pixels = images.get("spatial_shapes"), images["pixel_values"]
        if shapes is None:
            raise ValueError("LFM2-VL needs spatial_shapes with pixel_values (its processor returns both)")
        grids = torch.as_tensor(shapes).long()
        f = self.factor
        if pixels.dim() != 3 or len(grids) != len(pixels) or bool((grids % f).any()):
            raise ValueError(f"spatial_shapes {grids.tolist()} must give each of the {len(pixels)} tiles of "
                             f"pixel_values (tiles, patches, 3*p*p) a grid of {f} x {f} patch windows")
        mask = images.get("pixel_attention_mask")
        if mask is not None:
            first = torch.arange(mask.shape[-1], device=mask.device) < grids.prod(-1).to(mask.device)[:, None]
            if not torch.equal(mask.bool(), first):
                raise ValueError("pixel_attention_mask must mark each tile's first rows*cols patches (its "
                                 "spatial_shapes) as real and the rest as padding, as the processor does")
        return grids

    def _counts(self, grids: torch.Tensor) -> list[int]:
        return (grids.prod(-1) // self.factor**2).tolist()

    def encoder_tokens(self, images: dict) -> list[int]:
        """The visual tokens of each tile."""
        return self._counts(self._grids(images))

    def image_grid(self, images: dict, k: int) -> tuple[int, int]:
        """(rows, cols) of tile k's visual tokens."""
        rows, cols = (self._grids(images)[k] // self.factor).tolist()
        return rows, cols

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(..., N, f*f*D) kept windows -> (..., N, text width): the projector's norm and MLP on each."""
        projector = self.model.model.multi_modal_projector
        if projector.use_layer_norm:
            features = projector.layer_norm(features)
        return projector.linear_2(projector.act(projector.linear_1(features)))

    def encode_expert(self, index: int, images: dict, method) -> VisualTokens:
        """The tower's kept windows of every tile (grouped by grid, each group one runner), with the method's
        stage-1 pruning: (tiles, most windows, f*f*D), empty slots after a tile's last window."""
        grids = self._grids(images)
        described = self.runners[0]

        def encode(g, members):
            runner = Lfm2VlRunner(described.module, described.spec, self.factor, g)
            return run_expert(runner, index, images["pixel_values"][members], method)

        return encode_by_grid(grids, self._counts(grids), encode)

    def encode_images(self, images: dict, method):
        """Every tile's kept windows, projected into the LLM's width, then stage 2."""
        tokens = self.encode_expert(0, images, method)
        return fuse_and_prune([tokens], [self.project(tokens.features)], self.expert_names, method)

    def layout(self, images: dict, input_ids: torch.Tensor | None = None) -> Layout:
        """Tile k's window g at offset g among its image tokens (the tile tags are text)."""
        return one_run_per_item(self._counts(self._grids(images)), images["pixel_values"].device)
