"""Pruning on a stock transformers Llama 4 (`Llama4ForConditionalGeneration`: Llama 4 Scout and Maverick), on images.

Llama 4 cuts each image into 336 px tiles (rows x cols of them, then the whole image shrunk to one tile; a small
image is that last tile alone) and encodes each with its ViT: 14 px patches by an unfolding linear map, a CLS
appended after them, learned position embeddings, a LayerNorm, blocks whose attention rotates queries and keys by
each patch's (x, y) (2D RoPE in complex form; CLS unrotated), a final LayerNorm; then CLS is dropped, every 2x2
window of patches is folded into one token (its pixel shuffle: the window's patches row by row, concatenated) and an
MLP and one matrix bring the 144 tokens of a tile into the LLM's width. Inside the ViT a token is therefore a whole
window (`Llama4Runner`: CLS first, then the windows, however the tower orders them), so stage-1 methods keep, drop or
merge whole windows, and what leaves the tower is what the pixel shuffle would have made of the kept windows. In the
prompt an image is `<|image_start|>`, its tiles' runs of `<|patch|>` (144 each) between tile separators, then
`<|image|>` and the whole-image tile's run, `<|image_end|>`; each kept token takes its own column, as on LLaVA.

Its decoder's attention layers rotate by RoPE in complex form and then normalise queries and keys (a weightless RMS
norm), within chunks of `attention_chunk_size` positions (`runtime.DecoderParts.attention_chunk`, counted in the
unpruned positions, so a token dropped at layer L is a token masked from L on); every fourth layer rotates nothing,
attends to the whole prompt and scales its queries by a temperature that grows with the column (`floor_scale`: 8192
columns a step). The stock layer counts that column within the sequence it is given, so beyond 8192 tokens a prompt
pruned before such a layer gets another temperature than the unpruned one (none below: every scale is 1 there).
Transformers' `Llama4ImageProcessor` needs torchvision, which this project does not install: the adapter takes what
it returns, and `meteor ask` / `speed` do not load Llama 4 folders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Llama4ForConditionalGeneration

from .adapters import Layout, StockAdapter, tiles_layout, token_runs
from .experts import ExpertRunner, ExpertSpec, PixelShuffleWindows
from .vlm import fuse_and_prune, run_expert

__all__ = ["Llama4Adapter", "Llama4Runner", "llama4_adapter"]

EXPERT = "vision"


def llama4_adapter(model) -> Llama4Adapter | None:
    """The adapter for a transformers Llama4ForConditionalGeneration, or None for any other model."""
    return Llama4Adapter(model) if type(model) is Llama4ForConditionalGeneration else None


class Llama4Runner(PixelShuffleWindows, ExpertRunner):
    """Llama 4's ViT (`vision_model`) walked block by block, one token per pixel-shuffle window: tokens are
    (B, 1 + N, s*s*D), the CLS row first (its D values, then zeros), then the N = (g/s)^2 windows of the g x g patch
    grid of a tile in row-major order, each holding its s x s patches row by row (s = 1 / pixel_shuffle_ratio). The
    blocks run on CLS and the kept windows' patches, each with its own rotation (the tower's `freqs_ci` of its place;
    CLS's, the last row, rotates nothing); `finalize` drops CLS and applies the tower's final LayerNorm to each
    patch."""

    kind, has_cls = "llama4", True

    def __init__(self, tower, spec: ExpertSpec):
        super().__init__(tower, spec)
        cfg = tower.config
        self.side = cfg.image_size // cfg.patch_size
        self.scale = round(1 / cfg.pixel_shuffle_ratio)
        if self.scale * cfg.pixel_shuffle_ratio != 1 or self.side % self.scale:
            raise ValueError(f"pixel_shuffle_ratio {cfg.pixel_shuffle_ratio} on a {self.side} x {self.side} patch grid: "
                             "only 1 / an integer that divides the grid folds whole windows")
        self.window = self.scale**2
        g, s = self.side, self.scale
        self._window_patches = torch.arange(g * g).view(g // s, s, g // s, s).permute(0, 2, 1, 3).reshape(-1, s * s)

    @property
    def blocks(self):
        return self.module.model.layers

    def grid(self) -> tuple[int, int]:
        return self.side // self.scale, self.side // self.scale

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(T, 3, S, S) tiles -> (T, 1 + N, s*s*D): the patches and CLS (after them, as the tower appends it) with
        their position embeddings, through the pre-LayerNorm, CLS moved first and the patches gathered by window."""
        tower = self.module
        patches = tower.patch_embedding(pixel_values)
        cls = tower.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        h = tower.layernorm_pre(torch.cat([patches, cls], 1) + tower.positional_embedding_vlm.to(patches.dtype))
        return self._pack(torch.cat([h[:, -1:], h[:, :-1]], 1))

    def _freqs(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N*s*s, 1, d/2) complex: CLS's rotation (the tower's last row), then each kept window's patches'."""
        freqs = self.module.rotary_embedding.freqs_ci.to(grid.device)  # (g*g + 1, 1, d/2), CLS last
        places = self._window_patches.to(grid.device)[grid].flatten(1)  # (B, N*s*s)
        cls = torch.full_like(places[:, :1], freqs.shape[0] - 1)
        return freqs[torch.cat([cls, places], 1)]

    def _qkv(self, i: int, h: torch.Tensor, grid: torch.Tensor):
        """Block i's rotated queries and keys and its values for the (B, L, D) tokens h (CLS first): (B, H, L, d)."""
        attn = self.blocks[i].self_attn
        n = self.blocks[i].input_layernorm(h)
        B, L, _ = n.shape
        freqs = self._freqs(grid)

        def rotated(t):
            pairs = torch.view_as_complex(t.float().reshape(B, L, attn.num_heads, -1, 2))
            return torch.view_as_real(pairs * freqs).flatten(3).type_as(t)

        q, k, v = (proj(n).view(B, L, attn.num_heads, -1) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        return rotated(q).transpose(1, 2), rotated(k).transpose(1, 2), v.transpose(1, 2)

    def _grid_of(self, x: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
        return grid if grid is not None else torch.arange(x.shape[1] - 1, device=x.device).expand(x.shape[0], -1)

    def run_attention(self, i, x, bias=None, grid=None):
        block, h = self.blocks[i], self._unpack(x)
        q, k, v = self._qkv(i, h, self._grid_of(x, grid))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(self._patch_bias(bias), q),
                                             scale=block.self_attn.scaling)
        return self._pack(h + block.self_attn.o_proj(out.transpose(1, 2).flatten(2)), window_major=True), k

    def run_mlp(self, i, x):
        block, h = self.blocks[i], self._unpack(x)
        return self._pack(h + block.mlp(block.post_attention_layernorm(h)), window_major=True)

    def run_block(self, i, x, bias=None, grid=None):
        return self.run_mlp(i, self.run_attention(i, x, bias, grid)[0])

    def query_key(self, i, x, grid=None):
        q, k, _ = self._qkv(i, self._unpack(x), self._grid_of(x, grid))
        return q, k, self.blocks[i].self_attn.scaling

    def finalize(self, x):
        """The tower's final LayerNorm on each kept window's patches, CLS dropped: (B, N, s*s*D)."""
        B, N = x.shape[0], x.shape[1] - 1
        return self.module.layernorm_post(x[:, 1:].reshape(B, N, self.window, -1)).reshape(B, N, -1)


class Llama4Adapter(StockAdapter):
    """What the methods and the runtime need to know about one Llama 4, on images.

    Attributes read by methods' `setup`: runners (one, "vision", walking each tile), expert_names, num_llm_layers,
    config (fusion "post", text_config, rank_table: the model config's `rank_table` attribute if it has one). The
    images come as the processor gives them: pixel_values (tiles, 3, 336, 336), every image's tiles and then its
    whole-image tile, image after image; which tiles make an image is read from the prompt (the runs of `<|patch|>`
    between an `<|image_start|>` and its `<|image_end|>`). In `stats`, "images" counts images, encoder_tokens every
    tile's windows, and kept_grid has an entry per tile.
    """

    IMAGE_INPUTS = ("pixel_values",)
    PER_IMAGE_INPUTS = ("pixel_values",)
    WHOLE_IMAGE_TILE = -1  # the whole-image tile, after the others (the only one of a one-tile image)

    def __init__(self, model):
        cfg = model.config
        if cfg.vision_config.vision_feature_select_strategy != "default":
            raise ValueError(f"vision_feature_select_strategy={cfg.vision_config.vision_feature_select_strategy!r} is "
                             "not supported (only 'default': every patch, CLS dropped)")
        tower = model.vision_model
        spec = ExpertSpec(EXPERT, Llama4Runner.kind, tower.config.image_size, {})
        self._locate(model, [Llama4Runner(tower, spec)], model.language_model.model, model.language_model.lm_head)
        self.image_start_id = cfg.boi_token_index

    @property
    def tokens_per_tile(self) -> int:
        return self.runners[0].num_patches

    def tiles(self, images: dict) -> torch.Tensor:
        """(T, 3, S, S) the tiles; ValueError for another shape or size than the tower's."""
        pixels = images["pixel_values"]
        side = self.runners[0].module.config.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, side, side):
            raise ValueError(f"pixel_values must be (tiles, 3, {side}, {side}) as the processor gives them, got shape "
                             f"{tuple(pixels.shape)}")
        return pixels

    def encode_images(self, images: dict, method):
        """Every tile's kept windows, through the tower's pixel-shuffle MLP and the projector, then stage 2."""
        runner = self.runners[0]
        tokens = run_expert(runner, 0, self.tiles(images).to(runner.module.dtype), method)
        return fuse_and_prune([tokens], [self.project(tokens.features)], self.expert_names, method)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(..., N, s*s*D) kept windows (each the pixel shuffle's token of its window) -> (..., N, text width)."""
        return self.model.multi_modal_projector(self.runners[0].module.vision_adapter.mlp(features))

    def encoder_tokens(self, images: dict) -> list[int]:
        """The unpruned visual tokens of each tile."""
        return [self.tokens_per_tile] * len(self.tiles(images))

    def tiles_per_image(self, input_ids: torch.Tensor, tiles: int) -> list[int]:
        """The tiles of each image, in row-major order over the batch: each run of `<|patch|>` is a tile of the image
        whose `<|image_start|>` last came before it. ValueError unless the runs are one tile's tokens each and add up
        to `tiles`."""
        rows, starts, ends, _ = token_runs(input_ids, self.image_token_id)
        n = self.tokens_per_tile
        if bool(((ends - starts) != n).any()) or len(starts) != tiles:
            raise ValueError(f"the prompts' runs of image tokens {(ends - starts).tolist()} are not {n} tokens for each "
                             f"of the {tiles} tiles given (the processor writes each tile's {n} tokens as one run)")
        opened = (input_ids == self.image_start_id).flatten().long().cumsum(0) - 1  # images begun, row-major
        image = opened[rows * input_ids.shape[1] + starts]
        if bool((image < 0).any()):
            raise ValueError("a run of image tokens comes before any <|image_start|>")
        return torch.unique_consecutive(image, return_counts=True)[1].tolist()

    def layout(self, images: dict, input_ids: torch.Tensor | None = None) -> Layout:
        """Tile t of an image holds the image tokens t*N .. t*N + N - 1 of its runs (N tokens per tile)."""
        if input_ids is None:
            raise ValueError("Llama 4's layout needs the prompt (each image's tiles are read from its tokens)")
        counts = self.tiles_per_image(input_ids, len(self.tiles(images)))
        return tiles_layout(counts, self.tokens_per_tile, images["pixel_values"].device)

    def expand_images(self, images: dict, input_ids: torch.Tensor, expand_size: int, context: dict | None = None) -> dict:
        """Every prompt's tiles `expand_size` times, the copies of a prompt one after another."""
        return self.expand_tiles(images, input_ids, expand_size)
