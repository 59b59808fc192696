"""Pruning on a stock transformers Qwen2-VL or Qwen2.5-VL (`Qwen2VLForConditionalGeneration`,
`Qwen2_5_VLForConditionalGeneration`) and Qwen3-VL (`Qwen3VLForConditionalGeneration`, `Qwen3VLAdapter`: DeepStack;
also the mixture-of-experts Qwen3-VL, `Qwen3VLMoeForConditionalGeneration`) and Qwen3.5 (`Qwen3_5ForConditionalGeneration`,
`Qwen3_5MoeForConditionalGeneration`: a hybrid linear-attention decoder), on images and videos: inside its
vision encoder, where its visual tokens enter the language model, and inside the language model.

Qwen2-VL's vision encoder merges each 2x2 window of patches into one visual token at its end (the merger), so a
token inside it is a whole merge window (`Qwen2VLRunner`: the window's patches side by side): stage-1 methods
(METEOR's stage 1, EvoPrune, ToMe, VisionZip, PruMerge) keep, drop or merge whole windows between its blocks,
and the merger still finds each kept window's patches together. Each image has its own grid, so the images of
one grid are encoded together, one per row, and a method's counts follow each image's grid. The merged tokens
are the one expert, "vision", that `prune_fusion` sees (DivPrune), and stage-3 methods (FastV, PyramidDrop,
DART, SparseVLM, METEOR's stage 3) drop them inside the LLM. Every kept token keeps its multimodal RoPE position
(temporal, height, width; `get_rope_index`), which the runtime carries as (B, T, 3), so dropping a token is
masking it, and decoding goes on after the prompt's last token as generate does. Videos (lists of frames, paired
into temporal patches that each attend within themselves) run through the same encoder, each on its own grid;
a prompt may hold images and videos in any order. Inside
`with method(model)` this one instance's `forward`, `prepare_inputs_for_generation` and
`_expand_inputs_for_generation` are replaced (`adapters.StockAdapter`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (Exaone4_5_ForConditionalGeneration, HyperCLOVAXVisionV2ForConditionalGeneration,
                          LlavaOnevision15ForConditionalGeneration, Qwen2_5OmniThinkerForConditionalGeneration,
                          Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration,
                          Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration,
                          Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration)
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

from . import runtime
from .adapters import Layout, StockAdapter, StockProcessor, encode_by_grid, items_in_prompt_order
from .experts import ExpertRunner, ExpertSpec
from .vlm import VisualTokens, fuse_and_prune, run_expert

__all__ = ["Qwen2VLAdapter", "Qwen2VLRunner", "Qwen3VLAdapter", "Qwen3VLRunner", "Qwen2VLImageTextProcessor",
           "qwen2_vl_adapter", "VISION_TOKENS", "add_vision_tokens"]

EXPERT = "vision"

# Qwen's vision tokens, by the config field that names each one's id (in the order a word tokenizer adds them)
VISION_TOKENS = {"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                 "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"}


def add_vision_tokens(tokenizer) -> dict[str, int]:
    """Adds "<image>" and Qwen's vision tokens to a word tokenizer as special tokens (for random Qwen-VL models);
    returns the config fields that name their ids."""
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *VISION_TOKENS.values()]})
    return {field: tokenizer.convert_tokens_to_ids(token) for field, token in VISION_TOKENS.items()}


QWEN3_TYPES = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")  # prompts that write each video's patches with times
# models whose transformers processor is EXAONE 4.5's: Qwen2-VL's images, no mm_token_type_ids
EXAONE_PROCESSOR_TYPES = ("exaone4_5", "llava_onevision1_5", "hyperclovax_vision_v2")
# the checkpoint model_types `Qwen2VLImageTextProcessor.from_pretrained` reads
PROCESSOR_TYPES = ("qwen2_vl", "qwen2_5_vl", *QWEN3_TYPES, *EXAONE_PROCESSOR_TYPES)


def qwen2_vl_adapter(model) -> Qwen2VLAdapter | None:
    """The adapter for a transformers Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration, Qwen3_5ForConditionalGeneration or
    Qwen3_5MoeForConditionalGeneration, or None for any other model."""
    if type(model) is LlavaOnevision15ForConditionalGeneration:
        return LlavaOnevision15Adapter(model)
    if type(model) is Exaone4_5_ForConditionalGeneration:
        return Exaone45Adapter(model)
    if type(model) is HyperCLOVAXVisionV2ForConditionalGeneration:
        return HyperClovaXVisionV2Adapter(model)
    if type(model) is Qwen2_5OmniThinkerForConditionalGeneration:
        return Qwen25OmniThinkerAdapter(model)
    if type(model) in (Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration,
                       Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration):
        return Qwen3VLAdapter(model)
    stock = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
    return Qwen2VLAdapter(model) if type(model) in stock else None


class Qwen2VLRunner(ExpertRunner):
    """Qwen2-VL's or Qwen2.5-VL's vision encoder walked block by block over the images of one grid.

    grid_thw: (t, h, w) the images' patch grid (t = 1 for a still image; a video has t temporal patches, each
    attending within itself). A token is one merge window (m x m
    patches, m = spatial_merge_size) holding its patches side by side: tokens are (B, N, m*m*D), N = t*h*w / m^2,
    in the order of the merged visual tokens (row-major over the merged grid), so a token's grid index is its
    visual token's offset in the image's span. The blocks run on the kept windows' patches, each image a row of
    batched SDPA, each patch with its own 2D rotary position; Qwen2.5-VL's windowed blocks attend within their
    attention windows (each window's kept patches a row of one padded batch, as its reordered windows do).
    Without grid_thw the runner only
    describes the encoder (its blocks and pruning points), as the adapter's `runners` entry that methods read
    when they are attached.
    """

    kind, has_cls = "qwen2_vl", False

    def __init__(self, visual, spec: ExpertSpec, grid_thw: tuple[int, int, int] | None = None):
        super().__init__(visual, spec)
        cfg = visual.config
        self.merge = cfg.spatial_merge_size
        self.window = self.merge**2
        self.grid_thw = None if grid_thw is None else tuple(int(v) for v in grid_thw)
        self.fixed_grid = self.grid_thw is not None
        self.full_attention = getattr(cfg, "fullatt_block_indexes", None)  # Qwen2.5-VL: the others are windowed
        self.attention_window = cfg.window_size // self.merge // cfg.patch_size if self.full_attention is not None else 0
        self._rotary_cache: dict = {}

    @property
    def blocks(self):
        return self.module.blocks

    @property
    def out_dim(self) -> int:
        return self.module.merger.mlp[-1].out_features

    def grid(self) -> tuple[int, int]:
        if self.grid_thw is None:
            raise ValueError("Qwen2-VL's vision encoder has no fixed grid: each image has its own (image_grid_thw)")
        t, h, w = self.grid_thw
        return t * h // self.merge, w // self.merge

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, t*h*w, C*T*p*p) each image's patches, as the processor packs them (each window's patches together)
        -> (B, N, m*m*D)."""
        B, P, _ = pixel_values.shape
        return self.module.patch_embed(pixel_values.reshape(B * P, -1)).reshape(B, P // self.window, -1)

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1] * self.window, -1)

    def _tokens(self, h: torch.Tensor) -> torch.Tensor:
        return h.reshape(h.shape[0], h.shape[1] // self.window, -1)

    def _patch_index(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, N) window grid indices -> (B, N * m*m) the image's patch indices."""
        return (grid[..., None] * self.window + torch.arange(self.window, device=grid.device)).flatten(1)

    def _rotary(self, grid: torch.Tensor):
        """(cos, sin), (B, N * m*m, d) each: the rotary embedding of the patches of the windows in `grid`."""
        key = grid.device
        if key not in self._rotary_cache:  # the whole image's, once per device
            t, h, w = self.grid_thw
            ids = get_vision_position_ids(torch.tensor([[t, h, w]], device=grid.device), self.merge)
            probe = torch.empty(0, device=grid.device)
            self._rotary_cache[key] = self.module.rotary_pos_emb(probe, ids)
        index = self._patch_index(grid)
        return tuple(f[index] for f in self._rotary_cache[key])

    def _qkv(self, i: int, h: torch.Tensor, grid: torch.Tensor):
        """Block i's rotated queries, keys and values of the (B, L, D) patches h: (B, H, L, d) each (queries and
        keys through the attention's per-head norms first, where it has them: GLM-OCR's)."""
        attn = self.blocks[i].attn
        B, L, _ = h.shape
        normed = self.blocks[i].norm1(h)
        if not hasattr(attn, "qkv"):  # Qwen2.5-Omni's: separate projections
            q, k, v = (p(normed).view(B, L, attn.num_heads, -1) for p in (attn.q, attn.k, attn.v))
            return self._rotated_heads(q, k, v, attn, grid)
        qkv = attn.qkv(normed)
        if hasattr(attn, "kv_dim"):  # EXAONE 4.5's grouped heads: fewer key and value heads, each for a group
            q, k, v = qkv.split([attn.q_dim, attn.kv_dim, attn.kv_dim], -1)
            q, k, v = (t.view(B, L, -1, attn.head_dim) for t in (q, k, v))
            k, v = (t.repeat_interleave(attn.num_key_value_groups, 2) for t in (k, v))
        else:
            q, k, v = qkv.view(B, L, 3, attn.num_heads, -1).unbind(2)
        return self._rotated_heads(q, k, v, attn, grid)

    def _rotated_heads(self, q, k, v, attn, grid):
        """(B, L, H, d) queries, keys and values -> (B, H, L, d) each, queries and keys through the attention's
        per-head norms where it has them (GLM-OCR's), then rotated."""
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = self._rotary(grid)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attention_groups(self, i, grid):
        """Each patch's attention group (equal ids attend to each other): a video's frame (each temporal patch
        attends within itself, as the stock encoder's cu_seqlens say) and, in Qwen2.5-VL's windowed blocks, its
        attention window within the frame; None for a still image's full-attention blocks."""
        t, h, w = self.grid_thw
        rows, cols = h // self.merge, w // self.merge
        frame, cell = grid // (rows * cols), grid % (rows * cols)
        if self.full_attention is None or i in self.full_attention:
            return None if t == 1 else frame.repeat_interleave(self.window, 1)
        s = self.attention_window
        across = cols // s + 1  # windows per row of windows, padding included
        ids = (frame * (rows // s + 1) + cell // cols // s) * across + cell % cols // s
        return ids.repeat_interleave(self.window, 1)

    def _attend(self, i: int, q, k, v, bias, grid) -> torch.Tensor:
        """Block i's attention for (B, H, L, d) rotated queries, keys and values: one SDPA over each image's
        patches, or, in Qwen2.5-VL's windowed blocks, one over each attention window's kept patches (windows
        padded into one batch), the work the stock encoder does. bias: (B, N) per token, or None."""
        scale = self._attention_of(i).scaling
        bias = None if bias is None else bias.repeat_interleave(self.window, 1).to(q.dtype)  # (B, L) per patch
        groups = self.attention_groups(i, grid)
        if groups is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias[:, None, None, :],
                                                  scale=scale)
        B, H, L, d = q.shape
        rows = torch.arange(B, device=q.device)[:, None]
        _, which, counts = torch.unique((groups + rows * (int(groups.max()) + 1)).flatten(), return_inverse=True,
                                        return_counts=True)  # each patch's window, over the batch
        order = torch.argsort(which, stable=True)
        slot = torch.empty_like(which)
        slot[order] = torch.arange(B * L, device=q.device) - (counts.cumsum(0) - counts)[which[order]]
        W, n = len(counts), int(counts.max())

        def packed(t):  # (B, H, L, d) -> (W, H, n, d), each window's patches in a row of its own
            out = t.new_zeros(W, n, H, d)
            out[which, slot] = t.transpose(1, 2).reshape(B * L, H, d)
            return out.transpose(1, 2)

        mask = None
        if bias is not None or bool((counts != n).any()):
            mask = torch.full((W, n), float("-inf"), dtype=q.dtype, device=q.device)
            mask[which, slot] = 0.0 if bias is None else bias.flatten()
            mask = mask[:, None, None, :]
        out = F.scaled_dot_product_attention(packed(q), packed(k), packed(v), attn_mask=mask, scale=scale)
        return out.transpose(1, 2)[which, slot].view(B, L, H, d).transpose(1, 2)

    def run_attention(self, i, x, bias=None, grid=None):
        block, h = self.blocks[i], self._patches(x)
        q, k, v = self._qkv(i, h, grid)
        out = self._attend(i, q, k, v, bias, grid)
        h = h + block.attn.proj(out.transpose(1, 2).flatten(2))
        return self._tokens(h), k

    def run_mlp(self, i, x):
        block, h = self.blocks[i], self._patches(x)
        return self._tokens(h + block.mlp(block.norm2(h)))

    def run_block(self, i, x, bias=None, grid=None):
        return self.run_mlp(i, self.run_attention(i, x, bias, grid)[0])

    def query_key(self, i, x, grid=None):
        q, k, _ = self._qkv(i, self._patches(x), grid)
        return q, k, self._attention_of(i).scaling

    def _attention_of(self, i: int):
        """Block i's attention module (`attn` in Qwen2-VL's blocks)."""
        return self.blocks[i].attn

    def finalize(self, x):
        """The merger on each kept window's patches: (B, N, m*m*D) -> (B, N, out_dim)."""
        B, N, _ = x.shape
        return self.module.merger(x.reshape(B * N * self.window, -1)).view(B, N, -1)


class Qwen2VLAdapter(StockAdapter):
    """What the methods and the runtime need to know about one `Qwen2VLForConditionalGeneration` or
    `Qwen2_5_VLForConditionalGeneration`, with images, videos or both. `runners` holds the encoder's
    `Qwen2VLRunner` without a grid; each batch is encoded by one runner per grid. The encoder's items are every
    image, then every video (`VisualTokens` rows in that order); the layout puts each at its place in the prompts,
    where images and videos may come in any order. In `stats`, "images" counts a sample's images and videos."""

    IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
                    "mm_token_type_ids")
    PIXEL_INPUTS = ("pixel_values", "pixel_values_videos")
    PER_IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    _KINDS = (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw"))

    RUNNER = Qwen2VLRunner

    def __init__(self, model: Qwen2VLForConditionalGeneration):
        self._locate(model, [self.RUNNER(self.visual_of(model), ExpertSpec(EXPERT, self.RUNNER.kind, 0, {}))])
        self.video_token_id = model.config.video_token_id

    @staticmethod
    def visual_of(model):
        """The model's vision encoder (`model.model.visual`)."""
        return model.model.visual

    def _grids(self, images: dict) -> tuple[torch.Tensor, int]:
        """(items, 3) the grids of every image, then every video, and how many are images."""
        grids = []
        for pixels, grid in self._KINDS:
            if images.get(pixels) is not None:
                if images.get(grid) is None:
                    raise ValueError(f"Qwen2-VL needs {grid} with {pixels} (its processor returns both)")
                need = int(images[grid].prod(-1).sum())
                if images[pixels].shape[0] != need:
                    raise ValueError(f"{pixels} hold {images[pixels].shape[0]} patches but {grid} "
                                     f"{images[grid].tolist()} needs {need}")
                grids.append(images[grid])
        if not grids:
            raise ValueError("Qwen2-VL needs pixel_values or pixel_values_videos")
        first = images.get("pixel_values") is not None
        return torch.cat(grids), len(grids[0]) if first else 0

    def _counts(self, grids: torch.Tensor) -> list[int]:
        """The merged visual tokens of each item of `grids`."""
        return (grids.prod(-1) // self.model.config.vision_config.spatial_merge_size ** 2).tolist()

    @staticmethod
    def _take(pixels: torch.Tensor, grid: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The patches of items `index` of packed `pixels` (each item's grid's product of them, one after another)."""
        starts = torch.cat([grid.new_zeros(1), grid.prod(-1).cumsum(0)])
        patches = [torch.arange(int(starts[i]), int(starts[i + 1]), device=grid.device) for i in index.tolist()]
        return pixels[torch.cat(patches)] if patches else pixels[:0]

    def expand_images(self, images: dict, input_ids: torch.Tensor, expand_size: int, context: dict | None = None) -> dict:
        """Every prompt's images and videos `expand_size` times, the copies of a prompt one after another (pixels
        hold every item's patches one after another, its grid's product of them)."""
        layout = self.layout(images, input_ids)
        span = layout.span
        rows = self.visual_columns(input_ids, images).nonzero(as_tuple=True)[0][span.cumsum(0) - span]
        order = runtime.images_for_expanded_rows(rows, input_ids.shape[0], expand_size)  # in prompt order
        item = torch.empty_like(layout.tile_image)
        item[layout.tile_image] = torch.arange(len(item), device=item.device)
        items, first_video = item[order], self._grids(images)[1]
        out = {}
        for kind, (pixels, grid) in enumerate(self._KINDS):
            if images.get(pixels) is None:
                continue
            index = items[items < first_video] if kind == 0 else items[items >= first_video] - first_video
            out[pixels], out[grid] = self._take(images[pixels], images[grid], index), images[grid][index]
            if kind == 1 and images.get("second_per_grid_ts") is not None:
                out["second_per_grid_ts"] = images["second_per_grid_ts"][index]
        return out

    def encoder_tokens(self, images: dict) -> list[int]:
        """The merged visual tokens of each image, then each video (none are pruned before the encoder's end)."""
        return self._counts(self._grids(images)[0])

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(..., N, out_dim) the encoder's kept tokens -> (..., N, text width): as they are (Qwen2-VL's merger is the
        runner's `finalize`); models whose projector comes after the encoder's output override it."""
        return features

    def encode_images(self, images: dict, method):
        """The encoder's merged tokens of every image and video, through `project`, then stage 2."""
        tokens = self.encode_expert(0, images, method)
        return fuse_and_prune([tokens], [self.project(tokens.features)], self.expert_names, method)

    def encode_expert(self, index: int, images: dict, method) -> VisualTokens:
        """The one expert's merged tokens of every image, then every video (their pixels and grids in `images`),
        with the method's stage-1 pruning: (items, most tokens, D), empty slots after an item's last token. The
        items of one grid are encoded together (`Qwen2VLRunner`)."""
        grids = self._grids(images)[0]
        visual = self.visual_of(self.model)
        pixels = torch.cat([images[k] for k, _ in self._KINDS if images.get(k) is not None]).to(visual.dtype)
        starts = [0, *grids.prod(-1).cumsum(0).tolist()]

        def encode(g, members):
            batch = torch.stack([pixels[starts[i]:starts[i + 1]] for i in members])
            return run_expert(self.RUNNER(visual, self.runners[0].spec, g), index, batch, method)

        return encode_by_grid(grids, self._counts(grids), encode)

    def layout(self, images: dict, input_ids: torch.Tensor | None = None) -> Layout:
        """Item i's token g at offset g of its span; the items (images, then videos) in the order the prompts show
        them, which the prompt's image and video tokens tell where there are videos. ValueError where the prompts'
        visual tokens do not split into the items given."""
        grids, first_video = self._grids(images)
        counts_list = self._counts(grids)
        counts = torch.tensor(counts_list, device=grids.device)
        order = list(range(len(counts_list)))
        if first_video < len(counts_list):  # videos: the prompts say where each image and video comes
            if input_ids is None:
                raise ValueError("with videos, Qwen2-VL's layout needs the prompt (where each image and video comes)")
            is_video = (input_ids[self.visual_columns(input_ids, images)] == self.video_token_id).tolist()  # row-major
            order = items_in_prompt_order(is_video, counts_list, first_video)
        order_t = torch.tensor(order, device=counts.device)
        tile_image = torch.empty_like(order_t)
        tile_image[order_t] = torch.arange(len(order), device=counts.device)
        grid = torch.arange(int(counts.max()), device=counts.device).expand(len(counts), -1)
        return Layout(tile_image, grid.masked_fill(grid >= counts[:, None], -1), counts[order_t])

    def rope_positions(self, input_ids, attention_mask, images: dict | None):
        """(B, T, 3) the stock model's multimodal RoPE positions of the unpruned prompt (None without images or
        videos)."""
        if images is None:
            return None
        kinds = images.get("mm_token_type_ids")
        if kinds is None:
            kinds = (input_ids == self.image_token_id).int() + 2 * (input_ids == self.video_token_id).int()
        seconds = images.get("second_per_grid_ts")
        extra = {"second_per_grid_ts": seconds} if seconds is not None else {}
        grids = {k: images.get(g) if images.get(k) is not None else None for k, g in self._KINDS}
        positions, _ = self.model.model.get_rope_index(input_ids, kinds, grids["pixel_values"],
                                                       grids.get("pixel_values_videos"), attention_mask=attention_mask,
                                                       **extra)
        return positions.permute(1, 2, 0)


class Qwen3VLRunner(Qwen2VLRunner):
    """Qwen3-VL's vision encoder walked as Qwen2-VL's (`Qwen2VLRunner`), with what it adds: learned position
    embeddings resampled to the grid, added to the patches before block 0, and DeepStack: after each block
    `deepstack_visual_indexes` names, its own merger on each window's patches (`tap`), features the language model
    adds to the visual tokens' hidden states after its first layers."""

    kind = "qwen3_vl"

    def __init__(self, visual, spec: ExpertSpec, grid_thw: tuple[int, int, int] | None = None):
        super().__init__(visual, spec, grid_thw)
        self.deepstack = list(getattr(visual.config, "deepstack_visual_indexes", None) or ())  # none in Qwen3.5

    @property
    def out_dim(self) -> int:
        return self.module.merger.linear_fc2.out_features

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, P, _ = pixel_values.shape
        visual = self.module
        x = visual.patch_embed(pixel_values.reshape(B * P, -1)).reshape(B, P, -1)
        grid = torch.tensor([self.grid_thw], device=pixel_values.device)
        index, weight = get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=self.merge)
        x = x + (visual.pos_embed(index) * weight[:, :, None]).sum(1).to(x.dtype)  # each patch's, in pixel order
        return x.reshape(B, P // self.window, -1)

    def tap(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """After a DeepStack block: (B, N, D') its merger on each window's patches."""
        if i not in self.deepstack:
            return None
        B, N, _ = x.shape
        merger = self.module.deepstack_merger_list[self.deepstack.index(i)]
        return merger(x.reshape(B * N * self.window, -1)).view(B, N, -1)


class Qwen3VLAdapter(Qwen2VLAdapter):
    """`Qwen3VLForConditionalGeneration` and `Qwen3VLMoeForConditionalGeneration` (Qwen3-VL-30B-A3B, -235B-A22B: the
    same vision encoder and attention, sparse MLPs that route each token alone, so pruning needs nothing more) on
    images and videos: Qwen2-VL's adapter with `Qwen3VLRunner`, and DeepStack
    carried through pruning: each visual token that enters the language model takes the DeepStack features its
    window had at each tapped block (after that block's own pruning: a token merged there or before is tapped as
    merged; one merged later takes the features of the window it was merged into), which the runtime adds to its
    hidden state after layers 0, 1, ... (`layer_residuals`); a token pruned before such a layer takes its features
    with it. Its decoder is a Qwen3 (per-head q/k norms, which the stage-3 scores apply). Its prompts write each
    temporal patch of a video apart, with its time (`Qwen2VLImageTextProcessor(timestamps=True)`): a video's tokens
    come in several runs, which the layout reads in order like one.

    Also `Qwen3_5ForConditionalGeneration` and `Qwen3_5MoeForConditionalGeneration` (Qwen3.5): the same vision
    encoder without DeepStack, and a hybrid decoder, three linear-attention layers (gated delta rule) to each
    attention layer with a gated output. Its linear-attention layers have no attention to score tokens with, so an
    LLM-stage method asked to prune before one prunes before the next attention layer
    (`runtime.DecoderParts.scoring_layer`); and since they read their input as a sequence, dropping tokens is not
    masking them there: the oracle is the stock layers run on the shortened sequence."""

    RUNNER = Qwen3VLRunner

    def encode_images(self, images: dict, method):
        tokens = self.encode_expert(0, images, method)
        fused = fuse_and_prune([tokens], [tokens.features], self.expert_names, method)
        index = fused.grid_index[..., None]
        fused.taps = [(dense.gather(1, index.expand(-1, -1, dense.shape[-1])), fused.grid_index)
                      for dense, _ in tokens.taps or ()]
        return fused

    def layer_residuals(self, visual, vis_index: torch.Tensor) -> list[torch.Tensor] | None:
        """Each DeepStack level's features at the columns of the tokens they belong to, zeros elsewhere."""
        if visual is None or not visual.taps:
            return None
        present = (vis_index >= 0)[..., None]
        return [tapped.flatten(0, 1)[vis_index.clamp_min(0)] * present for tapped, _ in visual.taps]


class Qwen2VLImageTextProcessor(StockProcessor):
    """What transformers' `Qwen2VLProcessor` does for still images and for videos given as frames, without its
    video processor (which needs torchvision): a tokenizer and `Qwen2VLImageProcessorPil`. Each `image_token`
    ("<|image_pad|>") in a prompt, one per image as the chat template writes it between <|vision_start|> and
    <|vision_end|>, becomes one pad per merged visual token of the next image (its grid's patches /
    merge_size^2); each `video_token` ("<|video_pad|>") likewise for the next video. Returns input_ids and
    attention_mask (PyTorch tensors, left-padded; `return_tensors` and `padding` are accepted for a processor's
    call signature), pixel_values and image_grid_thw (the image processor's), pixel_values_videos and
    video_grid_thw, and mm_token_type_ids (1 on image tokens, 2 on video tokens). A video is a list of frames
    (PIL images of one size), already sampled: each frame is sized and normalised as the image processor does
    an image (its pixel limits, not those of Qwen's video processor), consecutive frames are paired into
    temporal patches (`temporal_patch_size`, the last frame repeated to fill the last pair). `fps`, the rate the
    frames were sampled at (one number, or one per video), gives `second_per_grid_ts` (temporal_patch_size / fps
    seconds per temporal patch of each video, as Qwen2.5-VL's processor returns it; Qwen2.5-VL spaces the temporal
    positions by it); without, none is returned (Qwen2.5-VL then spaces temporal patches 1 s apart, which is
    2 fps; Qwen2-VL ignores it). With `timestamps` (Qwen3-VL; `from_pretrained` sets it for a Qwen3-VL folder),
    each video is written a temporal patch at a time, "<T seconds>" and the patch's tokens between vision start and
    end, T the mean time of its frames (frame k at k / fps; 2 fps without `fps`), as Qwen3-VL's processor writes
    it, and no `second_per_grid_ts` is returned. `image_placeholder` /
    `video_placeholder` are what stand for one image / video in a prompt written by hand, and `alias`, if given,
    a shorter word for an image (the tests' tiny models write "<image>"). Without `token_types`, no mm_token_type_ids
    (for a model whose forward takes none, as EXAONE 4.5's)."""

    image_token, video_token = "<|image_pad|>", "<|video_pad|>"
    image_placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    video_placeholder = "<|vision_start|><|video_pad|><|vision_end|>"

    TOKEN_TYPES = True  # whether the processor returns mm_token_type_ids, unless told

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None, alias: str | None = None,
                 timestamps: bool = False, token_types: bool | None = None):
        self.image_processor, self.tokenizer, self.alias = image_processor, tokenizer, alias
        self.timestamps = timestamps
        for kind in ("image", "video"):  # a tokenizer that names its own (as EXAONE 4.5's processor reads them)
            own = getattr(tokenizer, f"{kind}_token", None)
            default = getattr(type(self), f"{kind}_token")
            if isinstance(own, str) and own != default:
                setattr(self, f"{kind}_token", own)
                setattr(self, f"{kind}_placeholder", getattr(type(self), f"{kind}_placeholder").replace(default, own))
        self.token_types = type(self).TOKEN_TYPES if token_types is None else token_types
        self.merge_size = image_processor.merge_size
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if self.image_token not in tokenizer.get_vocab():
            raise ValueError(f"the tokenizer has no {self.image_token!r} token: not a Qwen2-VL tokenizer")
        self.tokenizer.padding_side = "left"

    @classmethod
    def from_pretrained(cls, path) -> Qwen2VLImageTextProcessor:
        """From a Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 (dense or MoE) or EXAONE 4.5 checkpoint folder: its
        tokenizer, preprocessor_config.json, and the chat template of chat_template.jinja or chat_template.json where
        the folder has one (else the tokenizer's); a Qwen3-VL's or Qwen3.5's writes each video's temporal patches with
        their times; an EXAONE 4.5's, LLaVA-OneVision-1.5's or HyperCLOVA X Vision V2's (whose transformers processor is
        EXAONE 4.5's) returns no mm_token_type_ids (their forwards take none)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        config = Path(path) / "config.json"
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
        return cls(Qwen2VLImageProcessorPil.from_pretrained(path), cls.read_tokenizer(path),
                   cls.read_chat_template(path), timestamps=model_type in QWEN3_TYPES,
                   token_types=model_type not in EXAONE_PROCESSOR_TYPES)

    def videos(self, videos) -> dict:
        """pixel_values_videos and video_grid_thw for videos given as lists of frames (see the class docstring):
        each frame's patches as the image processor makes them, the frames of a temporal patch side by side where
        the image processor repeats one frame."""
        tp = self.image_processor.temporal_patch_size
        pixels, grids = [], []
        for frames in videos:
            frames = list(frames)
            if not frames or len({f.size for f in frames}) != 1:
                raise ValueError(f"a video must be a non-empty list of frames of one size, got sizes "
                                 f"{[f.size for f in frames]}")
            frames += frames[-1:] * (-len(frames) % tp)  # the last frame repeated to fill the last temporal patch
            each = self.image_processor(images=frames, return_tensors="pt")
            grid = each["image_grid_thw"][0]
            n = int(grid.prod())
            patches = each["pixel_values"].view(len(frames), n, 3, tp, -1)[:, :, :, 0]  # one copy of each frame
            pairs = patches.view(len(frames) // tp, tp, n, 3, -1).permute(0, 2, 3, 1, 4)  # (t, n, C, tp, p*p)
            pixels.append(pairs.reshape((len(frames) // tp) * n, -1))
            grids.append(torch.tensor([len(frames) // tp, int(grid[1]), int(grid[2])]))
        return {"pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.stack(grids)}

    def _given(self, text, images, videos) -> tuple[list[str], list, list]:
        """The prompts (the alias written out), images and videos as lists; ValueError where the prompts' image or
        video tokens do not match them one to one."""
        texts = [text] if isinstance(text, str) else list(text)
        if self.alias:
            texts = [t.replace(self.alias, self.image_placeholder) for t in texts]
        images = list(images) if images is not None else []
        videos = list(videos) if videos is not None else []
        for token, given in ((self.image_token, images), (self.video_token, videos)):
            wanted = sum(t.count(token) for t in texts)
            if wanted != len(given):
                raise ValueError(f"the prompts hold {wanted} {token} tokens for {len(given)} "
                                 f"{'images' if token == self.image_token else 'videos'}")
        return texts, images, videos

    @staticmethod
    def _rates(fps, videos: int) -> list[float]:
        """Each video's frame rate: `fps` (one rate, or one per video), 2 without; ValueError otherwise."""
        rates = [fps if fps is not None else 2.0] * videos if not isinstance(fps, (list, tuple)) else list(fps)
        if len(rates) != videos or not all(r > 0 for r in rates):
            raise ValueError(f"fps must be one rate > 0 or one per video ({videos}), got {fps}")
        return rates

    def __call__(self, images=None, text=(), videos=None, return_tensors="pt", padding=True, fps=None):
        texts, images, videos = self._given(text, images, videos)
        pixels = dict(self.image_processor(images=images, return_tensors="pt")) if images else {}
        tp = self.image_processor.temporal_patch_size
        if videos:
            pixels.update(self.videos(videos))
            rates = self._rates(fps, len(videos))
            if self.timestamps:  # Qwen3-VL: each temporal patch written as a frame of its own, at its time
                texts = self._timestamped(texts, [len(v) for v in videos], rates, pixels["video_grid_thw"])
            elif fps is not None:
                pixels["second_per_grid_ts"] = torch.tensor([tp / r for r in rates])
        elif fps is not None:
            raise ValueError("fps is the frame rate of videos, and no videos were given")
        for token, grid in ((self.image_token, "image_grid_thw"), (self.video_token, "video_grid_thw")):
            if token == self.video_token and self.timestamps:
                continue
            counts = iter((pixels[grid].prod(-1) // self.merge_size**2).tolist() if grid in pixels else [])
            texts = [self._expand(t, token, counts) for t in texts]
        out = dict(self.tokenizer(texts, return_tensors="pt", padding=True))
        ids = out["input_ids"]
        if self.token_types:  # not for a model whose forward takes none (EXAONE 4.5's)
            vocab = self.tokenizer.get_vocab()
            out["mm_token_type_ids"] = (ids == vocab[self.image_token]).int()
            if self.video_token in vocab:  # (PaddleOCR-VL's tokenizer has none)
                out["mm_token_type_ids"] += 2 * (ids == vocab[self.video_token]).int()
        return {**out, **pixels}

    def _timestamped(self, texts: list[str], frames: list[int], rates: list[float], grids: torch.Tensor) -> list[str]:
        """Qwen3-VL's prompts for videos: each video (its placeholder, or a bare video token) becomes, per temporal
        patch, "<T seconds>" (the mean time of its frames, frame k at k / fps, the last repeated to fill the patch)
        and the patch's tokens between vision start and end."""
        tp, start, end = self.image_processor.temporal_patch_size, *self.video_placeholder.split(self.video_token)
        written = []
        for n, rate, (t, h, w) in zip(frames, rates, grids.tolist()):
            index = list(range(n)) + [n - 1] * (-n % tp)
            times = [(index[i] + index[i + tp - 1]) / 2 / rate for i in range(0, len(index), tp)]
            pads = self.video_token * (h * w // self.merge_size**2)
            written.append("".join(f"<{s:.1f} seconds>{start}{pads}{end}" for s in times[:t]))
        parts = [re.split(f"{re.escape(self.video_placeholder)}|{re.escape(self.video_token)}", text) for text in texts]
        fill = iter(written)
        return [p[0] + "".join(next(fill) + rest for rest in p[1:]) for p in parts]

    @staticmethod
    def _fill(text: str, token: str, fills) -> str:
        """`text` with each `token` replaced by the next string of the iterator `fills` (shared across prompts)."""
        parts = text.split(token)
        return parts[0] + "".join(next(fills) + rest for rest in parts[1:])

    @classmethod
    def _expand(cls, text: str, token: str, counts) -> str:
        """Each `token` repeated the next of `counts` times."""
        return cls._fill(text, token, (token * n for n in counts))


def _frames_as_items(tokens: VisualTokens, frames: list[int], per_frame: list[int]) -> VisualTokens:
    """`tokens` with one row per frame (item i's `frames[i]` frames in a row, `per_frame[i]` slots each) as one row per
    item: its frames' slots one after another, each frame's grid indices offset by the tokens of the frames before it."""
    rows = torch.repeat_interleave(torch.arange(len(frames)), torch.tensor(frames)).tolist()
    width = max(t * n for t, n in zip(frames, per_frame))
    D, dev = tokens.features.shape[-1], tokens.features.device
    features = tokens.features.new_zeros(len(frames), width, D)
    grid = torch.zeros(len(frames), width, dtype=torch.long, device=dev)
    size = torch.ones(len(frames), width, device=dev)
    valid = torch.zeros(len(frames), width, dtype=torch.bool, device=dev)
    seen = [0] * len(frames)
    for r, item in enumerate(rows):
        n, k = per_frame[item], seen[item]
        at = slice(k * n, (k + 1) * n)
        features[item, at], size[item, at] = tokens.features[r, :n], tokens.size[r, :n]
        grid[item, at], valid[item, at] = tokens.grid_index[r, :n] + k * n, tokens.mask[r, :n]
        seen[item] += 1
    return VisualTokens(features, torch.zeros_like(grid), grid, size, valid=None if bool(valid.all()) else valid)


class LlavaOnevision15Runner(Qwen2VLRunner):
    """LLaVA-OneVision-1.5's RICE ViT on still images (and a video's frames, each as one): Qwen2-VL's window tokens (each 2x2 merge window's patches side
    by side, in the processor's order) with a CLS in front, as the encoder prepends one to each image: tokens are
    (B, 1 + N, m*m*D), the CLS row first (its D values, then zeros), its own rotary angles (`class_pos_emb`). The
    blocks run on CLS and the kept windows' patches; the pre-norm comes before block 0; `finalize` drops CLS and runs
    the merger (each patch normed, the window's patches through an MLP) on each kept window."""

    kind, has_cls = "llava_onevision1_5", True

    @property
    def out_dim(self) -> int:
        return self.module.merger.linear_fc2.out_features

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, P, _ = pixel_values.shape
        visual = self.module
        patches = visual.patch_embed(pixel_values.reshape(B * P, -1)).reshape(B, P, -1)
        cls = visual.cls_embeddings.class_embedding.to(patches.dtype).expand(B, 1, -1)
        return self._tokens(visual.pre_layernorm(torch.cat([cls, patches], 1)))

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        B, n = x.shape[0], x.shape[1] - 1
        D = x.shape[-1] // self.window
        return torch.cat([x[:, :1, :D], x[:, 1:].reshape(B, n * self.window, D)], 1)

    def _tokens(self, h: torch.Tensor) -> torch.Tensor:
        B, L, D = h.shape
        cls = torch.cat([h[:, :1], h.new_zeros(B, 1, (self.window - 1) * D)], -1)
        return torch.cat([cls, h[:, 1:].reshape(B, (L - 1) // self.window, -1)], 1)

    def _rotary(self, grid: torch.Tensor):
        """(cos, sin), (B, 1 + N * m*m, d) each: CLS's angles, then those of the patches of the windows in `grid`."""
        cos, sin = super()._rotary(grid)
        embeddings = self.module.cls_embeddings
        angles = torch.cat([embeddings.class_pos_emb, embeddings.class_pos_emb], -1).to(cos.dtype)  # (1, d)
        first = angles.expand(cos.shape[0], 1, -1)
        return torch.cat([first.cos(), cos], 1), torch.cat([first.sin(), sin], 1)

    def run_attention(self, i, x, bias=None, grid=None):
        if self.grid_thw[0] != 1:  # its adapter encodes a video's frames as images
            raise ValueError("LlavaOnevision15Runner walks one frame at a time (a CLS per frame)")
        block, h = self.blocks[i], self._patches(x)
        q, k, v = self._qkv(i, h, grid)
        mask = None
        if bias is not None:  # CLS's, then each window's on each of its patches
            mask = torch.cat([bias[:, :1], bias[:, 1:].repeat_interleave(self.window, 1)], 1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype),
                                             scale=block.attn.scaling)
        return self._tokens(h + block.attn.proj(out.transpose(1, 2).flatten(2))), k

    def finalize(self, x):
        B, N = x.shape[0], x.shape[1] - 1
        return self.module.merger(x[:, 1:].reshape(B * N * self.window, -1)).view(B, N, -1)


class Qwen2VLImagesAdapter(Qwen2VLAdapter):
    """Qwen2-VL's adapter on a model it takes images of, not videos (their inputs, where the model has them, refused
    by name in `VIDEO_INPUTS_REFUSED`)."""

    IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")
    PIXEL_INPUTS = ("pixel_values",)
    PER_IMAGE_INPUTS = ("pixel_values", "image_grid_thw")
    _KINDS = (("pixel_values", "image_grid_thw"),)


class Qwen2VL1DAdapter(Qwen2VLAdapter):
    """Qwen2-VL's adapter on a model whose decoder rotates by 1D positions (kept tokens, a video's too, at their
    unpruned running positions) and whose forward takes images and videos without mm_token_type_ids or
    second_per_grid_ts (EXAONE 4.5's processor's inputs)."""

    IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    PER_IMAGE_INPUTS = IMAGE_INPUTS

    def rope_positions(self, input_ids, attention_mask, images: dict | None):
        return None  # its decoder rotates by 1D positions: the running count of real tokens


class LlavaOnevision15Adapter(Qwen2VL1DAdapter):
    """`LlavaOnevision15ForConditionalGeneration` (LLaVA-OneVision-1.5) on images and videos: Qwen2-VL's adapter with
    `LlavaOnevision15Runner` (a CLS per image, which stage-1 methods that read CLS attention use) and a Qwen3 decoder
    with 1D RoPE. Its encoder gives each frame (temporal patch) of a video a CLS of its own and attends within the
    frame, so a video is encoded as its frames, each an image of the video's grid (stage 1 keeps its share of each),
    their kept tokens then put back together in frame order as the video's."""

    RUNNER = LlavaOnevision15Runner

    def encode_expert(self, index: int, images: dict, method) -> VisualTokens:
        grids = self._grids(images)[0]
        frames = grids[:, 0].tolist()
        if all(t == 1 for t in frames):
            return super().encode_expert(index, images, method)
        pixels = torch.cat([images[k] for k, _ in self._KINDS if images.get(k) is not None])
        one = grids.clone()
        one[:, 0] = 1
        as_images = {"pixel_values": pixels, "image_grid_thw": one.repeat_interleave(grids[:, 0], 0)}
        tokens = super().encode_expert(index, as_images, method)  # one row per frame, items in order
        return _frames_as_items(tokens, frames, self._counts(one))

class Exaone45Adapter(Qwen2VL1DAdapter):
    """`Exaone4_5_ForConditionalGeneration` (EXAONE 4.5) on images and videos: Qwen2.5-VL's windowed encoder with
    grouped key and value heads (`Qwen2VLRunner`, which repeats them per group as its attention does), an EXAONE 4
    decoder with 1D RoPE and sliding-window layers."""


class HyperClovaXVisionV2Adapter(Exaone45Adapter):
    """`HyperCLOVAXVisionV2ForConditionalGeneration` (HyperCLOVA X SEED Think 32B) on images: Qwen2.5-VL's windowed
    encoder (`model.model.vision_model`), a linear projector after its merger, and a HyperCLOVA X decoder (Granite's
    kind: its input embeddings, visual tokens' too, and its blocks' outputs scaled) with 1D RoPE; the stock head
    multiplies the logits by the text config's `logits_scaling`, and so does the adapter's. Its videos run as EXAONE
    4.5's (the stock model encodes them as images of their grids, through the same projector)."""

    def __init__(self, model):
        super().__init__(model)
        self.decoder = dataclasses.replace(self.decoder, logit_scale=model.config.text_config.logits_scaling)

    @staticmethod
    def visual_of(model):
        return model.model.vision_model

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.projector(features)


class Qwen25OmniThinkerAdapter(Qwen2VLImagesAdapter):
    """`Qwen2_5OmniThinkerForConditionalGeneration` (the thinker of Qwen2.5-Omni 3B and 7B, `model.thinker` of a
    `Qwen2_5OmniForConditionalGeneration`, whose `generate` runs it) on images: Qwen2.5-VL's windowed encoder (its
    attention's projections apart) and a Qwen2.5-VL-like decoder with multimodal RoPE, the positions from its own
    `get_rope_index`. Its videos and audio are refused (`use_audio_in_video` is taken while False)."""

    IMAGE_INPUTS = ("pixel_values", "image_grid_thw")
    VIDEO_INPUTS_REFUSED = ("pixel_values_videos", "video_grid_thw", "input_features", "feature_attention_mask")
    FLAGS = ("use_audio_in_video",)  # Qwen2.5-Omni's generate hands it to its thinker's

    def rope_positions(self, input_ids, attention_mask, images: dict | None):
        if images is None:
            return None
        positions, _ = self.model.model.get_rope_index(input_ids, images.get("image_grid_thw"), None,
                                                       attention_mask=attention_mask)
        return positions.permute(1, 2, 0)
