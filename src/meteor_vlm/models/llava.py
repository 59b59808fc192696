"""Pruning on a stock transformers LLaVA (`LlavaForConditionalGeneration`: LLaVA-1.5 and its kin), LLaVA-NeXT
(`LlavaNextForConditionalGeneration`, "anyres" tiles), LLaVA-NeXT-Video (`LlavaNextVideoForConditionalGeneration`:
LLaVA-NeXT's images, and videos whose frames are pooled before the projector) and LLaVA-OneVision
(`LlavaOnevisionForConditionalGeneration`, "anyres_max_9" tiles, and videos).

The adapter locates the model's parts and speaks its input format; the methods and the LLM runtime are
the ones the multi-encoder VLM uses, so every method runs here unchanged:

- the vision tower (CLIP with CLS, or SigLIP without) is the one expert, named "vision", walked block by
  block up to the layer LLaVA reads its features from (`vision_feature_layer`, -2 for LLaVA-1.5), so
  stage-1 methods prune inside it; the blocks after that layer, which stock LLaVA runs and discards, are
  not run. Where the config names several layers (Granite Vision: four of its SigLIP's), each kept token's
  features are its hidden states at those layers, concatenated in the config's order, as stock LLaVA reads
  them (a token merged in the tower: the merged token's, and before the merge those of the patch it sits at);
- the multi-modal projector projects the kept tokens; `prune_fusion` sees them (one expert);
- the prompt holds one image token per patch (the processor expands `<image>`; LLaVA-NeXT's are the tiles'
  patches in the layout its `pack_image_features` makes, with row-end tokens, see `LlavaNextAdapter`); each
  kept visual token takes its patch's column, so it keeps its unpruned RoPE position, and a pruned patch's
  column leaves the sequence;
- the language model's layers run in the shared runtime (`runtime.prefill` / `decode`), so stage-3
  methods drop tokens mid-stack with SDPA and the KV cache as on the project's own model.

Inside `with method(llava)` this one instance's `forward`, `prepare_inputs_for_generation` and
`_expand_inputs_for_generation` are replaced (nothing is patched on the class; `adapters.StockAdapter`);
leaving the block restores them.
"""

from __future__ import annotations


import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                          LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor,
                          LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor, VipLlavaForConditionalGeneration)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from .. import ops
from . import runtime
from .adapters import Layout, StockAdapter, StockProcessor, items_in_prompt_order, tower_depth
from .experts import CLIPRunner, ExpertSpec, SiglipRunner
from .vlm import VisualTokens, fuse_and_prune, run_expert

__all__ = ["LlavaAdapter", "LlavaNextAdapter", "LlavaNextVideoAdapter", "LlavaNextVideoImageTextProcessor",
           "LlavaOnevisionAdapter", "LlavaOnevisionImageTextProcessor", "llava_adapter"]

EXPERT = "vision"


def llava_adapter(model) -> LlavaAdapter | None:
    """The adapter for a transformers LlavaForConditionalGeneration (or ViP-LLaVA's VipLlavaForConditionalGeneration,
    the same reading of a CLIP tower at several layers), LlavaNextForConditionalGeneration,
    LlavaNextVideoForConditionalGeneration or LlavaOnevisionForConditionalGeneration, or None for any other model
    (subclasses included)."""
    if type(model) in (LlavaForConditionalGeneration, VipLlavaForConditionalGeneration):
        return LlavaAdapter(model)
    if type(model) is LlavaNextForConditionalGeneration:
        return LlavaNextAdapter(model)
    if type(model) is LlavaOnevisionForConditionalGeneration:
        return LlavaOnevisionAdapter(model)
    if type(model) is LlavaNextVideoForConditionalGeneration:
        return LlavaNextVideoAdapter(model)
    return None


class _TowerBlocks:
    """LLaVA's reading of a vision tower: the blocks up to its (last) feature layer, no final norm, no CLS.

    depths: the number of blocks run before each feature layer LLaVA reads, in the config's order (one, or several
    whose features it concatenates); the runner taps the earlier ones' outputs (`tap`) and `read_layers` joins them."""

    def __init__(self, module, spec: ExpertSpec, depths: tuple[int, ...]):
        super().__init__(module, spec)
        self.depths = tuple(depths)
        self._blocks = module.encoder.layers[:max(self.depths)]

    @property
    def blocks(self):
        return self._blocks

    def finalize(self, x):
        return x[:, 1:] if self.has_cls else x

    def tap(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """Block i's output patch tokens where an earlier feature layer is read there, else None."""
        if i + 1 == len(self._blocks) or i + 1 not in self.depths:
            return None
        return x[:, 1:] if self.has_cls else x

    def read_layers(self, tokens: VisualTokens) -> torch.Tensor:
        """(B, N, D * layers) the kept tokens' features at every feature layer, concatenated in the config's order:
        the last layer's are the tokens' own, an earlier one's its tap at the kept tokens' grid cells (every token
        kept at the end was there then)."""
        tapped = [d for d in sorted(set(self.depths)) if d != len(self._blocks)]
        if len(tapped) != len(tokens.taps or ()):
            raise RuntimeError(f"expected taps after blocks {tapped}, got {len(tokens.taps or ())}")
        B, _, D = tokens.features.shape
        parts = []
        for depth in self.depths:
            if depth == len(self._blocks):
                parts.append(tokens.features)
                continue
            feats, grid = tokens.taps[tapped.index(depth)]
            dense = feats.new_zeros(B, self.num_patches, D).scatter(1, grid[..., None].expand(-1, -1, D), feats)
            parts.append(ops.gather_tokens(dense, tokens.grid_index))
        return torch.cat(parts, -1)


class LlavaCLIPRunner(_TowerBlocks, CLIPRunner):
    pass


class LlavaSiglipRunner(_TowerBlocks, SiglipRunner):
    pass


# tower class: (expert kind, runner, the only select strategy that hands on every patch and nothing else)
_TOWERS = {"CLIPVisionModel": ("clip", LlavaCLIPRunner, "default"),
           "SiglipVisionModel": ("siglip", LlavaSiglipRunner, "full")}


class LlavaAdapter(StockAdapter):
    """What the methods and the runtime need to know about one `LlavaForConditionalGeneration`.

    Attributes read by methods' `setup`: runners (one, "vision"), expert_names, num_llm_layers, config
    (fusion "post", text_config, rank_table: the model config's `rank_table` attribute if it has one).
    """

    IMAGE_INPUTS = ("pixel_values", "image_sizes")
    PER_IMAGE_INPUTS = ("pixel_values", "image_sizes")

    def __init__(self, model: LlavaForConditionalGeneration):
        cfg = model.config
        tower = model.model.vision_tower
        kind = _TOWERS.get(type(tower).__name__)
        if kind is None:
            raise ValueError(f"unsupported LLaVA vision tower {type(tower).__name__}: supported "
                             f"{sorted(_TOWERS)}")
        name, runner_cls, strategy = kind
        select = getattr(cfg, "vision_feature_select_strategy", "default")  # ViP-LLaVA: always without CLS
        if select != strategy:
            raise ValueError(f"vision_feature_select_strategy={select!r} with a {name} tower "
                             f"is not supported (only {strategy!r}: every patch token, no CLS, none dropped)")
        vcfg = tower.config
        layers = cfg.vision_feature_layer
        depths = tuple(tower_depth(layer, vcfg.num_hidden_layers)
                       for layer in ([layers] if isinstance(layers, int) else layers))
        if not depths:
            raise ValueError("vision_feature_layer is an empty list")
        spec = ExpertSpec(EXPERT, name, vcfg.image_size, {})
        self._locate(model, [runner_cls(tower, spec, depths)])

    @property
    def tokens_per_image(self) -> int:
        return self.runners[0].num_patches

    # ---- stages 1 and 2 ----------------------------------------------------------------------------
    def encode_expert(self, index: int, pixel_values: torch.Tensor, method):
        """The tower (expert 0) block by block on (num_tiles, 3, S, S) pixels, with stage-1 pruning; with several
        feature layers, each kept token's features at all of them (`_TowerBlocks.read_layers`)."""
        runner = self.runners[index]
        tokens = run_expert(runner, index, pixel_values.to(runner.module.dtype), method)
        if len(getattr(runner, "depths", ())) > 1:  # a LLaVA tower read at several layers (not DeepSeek-VL's, PaliGemma's)
            tokens.features, tokens.taps = runner.read_layers(tokens), None
        return tokens

    def tiles(self, images: dict) -> torch.Tensor:
        """(num_tiles, 3, S, S) what the tower encodes, from the forward's image inputs (LLaVA-1.5: one tile per
        image)."""
        if images.get("image_sizes") is not None:
            raise ValueError("image_sizes are not supported on a LLaVA-1.5-layout model (one fixed-size tile per image)")
        return images["pixel_values"]

    def encode_images(self, images: dict, method):
        """The forward's image inputs -> `VisualTokens` of every tile in the LLM's width after stages 1 and 2."""
        tokens = self.encode_expert(0, self.tiles(images), method)
        projected = self.model.model.multi_modal_projector(tokens.features)
        return fuse_and_prune([tokens], [projected], self.expert_names, method)

    def encoder_tokens(self, images: dict) -> list[int]:
        """The tower's unpruned patch tokens for each tile."""
        return [self.tokens_per_image] * len(self.tiles(images))

    def layout(self, images: dict, input_ids: torch.Tensor | None = None) -> Layout:
        """Where each tile's patch tokens sit among its image's image tokens (LLaVA-1.5: patch g at offset g)."""
        n, count = self.tokens_per_image, images["pixel_values"].shape[0]
        dev = images["pixel_values"].device
        return Layout(torch.arange(count, device=dev), torch.arange(n, device=dev).expand(count, n),
                      torch.full((count,), n, device=dev))


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (`LlavaNextForConditionalGeneration`, "anyres"): each image is a base tile of the whole image
    plus high-resolution tiles; the tower encodes every tile (stage-1 methods prune inside each tile, the
    tiles of a batch being the tower's batch). An image's tokens are the base tile's patches, then the
    high-resolution tiles' patches stitched into one grid, unpadded to the image's aspect, each row ended by a
    learned newline token; the layout comes from the model's own `pack_image_features`, run on patch indices.
    The newline tokens enter the LLM as visual tokens (stage-3 methods may drop them); a kept patch the
    unpadding cuts off does not enter it. In `stats`, encoder_tokens counts every tile's N patches and
    kept_grid has one entry per tile (the base tile first)."""

    def _tile_counts(self, sizes, images: dict) -> list[int]:
        """The tiles of each image, from its size."""
        cfg = self.model.config
        return [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes]

    def tiles(self, images: dict) -> torch.Tensor:
        pixels, sizes = images["pixel_values"], images.get("image_sizes")
        if sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes with pixel_values (its processor returns both)")
        counts = self._tile_counts(sizes, images)
        if pixels.dim() == 5:  # (images, most tiles, 3, S, S), padded with empty tiles
            pixels = torch.cat([p[:c] for p, c in zip(pixels, counts)])
        if pixels.dim() != 4 or pixels.shape[0] != sum(counts):
            raise ValueError(f"pixel_values {tuple(images['pixel_values'].shape)} do not hold the {sum(counts)} tiles "
                             f"the image sizes need ({counts} per image)")
        return pixels

    def _packed_patches(self, index: torch.Tensor, size: torch.Tensor, row_end: torch.Tensor):
        """The model's own packing of one image's tiles, run on (tiles, N, 1) patch indices: (L, 1), row_end's
        value at the row ends; and, where the image's tokens mix patches, how to mix them (a `MixedItems` pack; never
        on LLaVA-NeXT: None)."""
        strategy = self.model.config.vision_feature_select_strategy
        return self.model.model.pack_image_features([index], size[None], strategy, image_newline=row_end)[0][0], None

    def layout(self, images: dict, input_ids: torch.Tensor | None = None) -> Layout:
        sizes = images["image_sizes"]
        counts = self._tile_counts(sizes, images)
        n, dev = self.tokens_per_image, images["pixel_values"].device
        row_end = torch.full((1,), -1.0, device=dev)
        slots, spans, extra_image, extra_offset, packs = [], [], [], [], []
        for k, (size, c) in enumerate(zip(sizes, counts)):
            index = torch.arange(c * n, device=dev, dtype=torch.float32).view(c, n, 1)  # exact below 2**24
            packed, pack = self._packed_patches(index, size, row_end)
            packed = packed[:, 0].long()
            packs.append(pack)
            shown = (packed >= 0).nonzero()[:, 0]
            slot = torch.full((c * n,), -1, dtype=torch.long, device=dev)
            slot[packed[shown]] = shown
            slots.append(slot.view(c, n))
            spans.append(len(packed))
            ends = (packed < 0).nonzero()[:, 0]
            extra_image.append(torch.full_like(ends, k))
            extra_offset.append(ends)
        tile_image = torch.repeat_interleave(torch.arange(len(counts), device=dev), torch.tensor(counts, device=dev))
        layout = Layout(tile_image, torch.cat(slots), torch.tensor(spans, device=dev), torch.cat(extra_image),
                        torch.cat(extra_offset), self.model.model.image_newline)
        if any(pack is not None for pack in packs):
            layout.mixed = MixedItems(counts, packs)
        return layout


@dataclass
class MixedItems:
    """The items of a `Layout` (in `VisualTokens` order: its images, then its videos) and how LLaVA-OneVision mixes
    their tokens from several patches: each item's tile count, and `packs`, per item, the model's own packing of its
    (tiles, N, C) features with a row end (C,) into the (L, C) tokens of its span, or None where its tokens are its
    patches (what `LlavaOnevisionAdapter.placed_features` needs)."""

    counts: list[int]
    packs: list


# a budget no image reaches: the model's packing without its interpolation
_NO_BUDGET = f"anyres_max_{2**31 - 1}"


def _nearest(at: torch.Tensor) -> torch.Tensor:
    """(K, 2) interpolated (row, column) coordinates -> the nearest patch's, long (the larger bilinear weight on each
    axis, the later patch on a tie)."""
    return torch.floor(at + 0.5).long()


class _Videos:
    """Videos beside LLaVA-NeXT's images, for an adapter of the `LlavaNextAdapter` family whose model encodes each
    video frame as one base tile and shrinks its patch grid (`_pool_frames`): the tower encodes every image's tiles,
    then every video's frames (`VisualTokens` rows in that order; stage-1 methods prune inside each tile and frame),
    and the layout puts each image and video at its place in the prompts, a video's frames one after another (and a
    row end after the last where `VIDEO_ROW_END`). A pooled token's place belongs to the patch nearest to it (the
    model's pooling run on the patches' (row, column); the later patch on a tie)."""

    PIXEL_INPUTS = ("pixel_values", "pixel_values_videos")
    VIDEO_ROW_END = True  # a row-end token after each video's last frame

    def _pool_frames(self, features: torch.Tensor) -> torch.Tensor:
        """The model's shrinking of frames' (frames, N, C) patch features: (frames, M, C)."""
        raise NotImplementedError

    def _videos(self, images: dict) -> torch.Tensor | None:
        """(videos, frames, 3, S, S) pixel_values_videos, or None; ValueError for another shape."""
        videos = images.get("pixel_values_videos")
        S = self.model.config.vision_config.image_size
        if videos is not None and (videos.dim() != 5 or tuple(videos.shape[2:]) != (3, S, S)):
            raise ValueError(f"pixel_values_videos {tuple(videos.shape)} are not (videos, frames, 3, {S}, {S})")
        return videos

    def tiles(self, images: dict) -> torch.Tensor:
        """(num_tiles, 3, S, S): every image's tiles, then every video's frames."""
        parts = [super().tiles(images)] if images.get("pixel_values") is not None else []
        videos = self._videos(images)
        if videos is not None:
            parts.append(videos.flatten(0, 1))
        return torch.cat(parts)

    def _frame_slots(self, frames: int, device) -> tuple[torch.Tensor, int]:
        """(frames, N) each frame patch's offset in its video's span where it is the patch nearest to a pooled
        token, else -1 (the pooling run on the patches' (row, column), float64), and the pooled tokens per frame."""
        n = self.tokens_per_image
        side = math.isqrt(n)
        g = torch.arange(n, device=device)
        at = self._pool_frames(torch.stack([g // side, g % side], -1).double()[None])[0]
        nearest = _nearest(at)
        per_frame = len(at)
        slot = torch.full((n,), -1, dtype=torch.long, device=device)
        slot[nearest[:, 0] * side + nearest[:, 1]] = torch.arange(per_frame, device=device)
        offsets = torch.arange(frames, device=device)[:, None] * per_frame
        return torch.where(slot >= 0, slot + offsets, -1), per_frame

    def _items(self, images: dict, input_ids: torch.Tensor | None):
        """The image part's layout (None without images), the number of images, the order in which the prompts show
        the items (images, then videos), and each item's image tokens (in item order)."""
        base = super().layout(images, input_ids) if images.get("pixel_values") is not None else None
        videos = self._videos(images)
        num_images = 0 if base is None else len(base.span)
        counts = [] if base is None else base.span.tolist()
        if videos is None:
            return base, num_images, list(range(num_images)), counts
        if input_ids is None:
            raise ValueError(f"with videos, the layout of a {type(self.model).__name__} needs the prompt (where each "
                             "image and video comes)")
        per_video = videos.shape[1] * self._frame_slots(1, videos.device)[1] + int(self.VIDEO_ROW_END)
        counts += [per_video] * videos.shape[0]
        is_video = (input_ids[self.visual_columns(input_ids, images)] == self.video_token_id).tolist()  # row-major
        return base, num_images, items_in_prompt_order(is_video, counts, num_images), counts

    def _video_mixes(self, base: Layout | None, num_videos: int, frames: int, images: dict) -> MixedItems | None:
        """The layout's `mixed` (None: no item's tokens mix patches at placement)."""
        return None

    def layout(self, images: dict, input_ids: torch.Tensor | None = None) -> Layout:
        """LLaVA-NeXT's layout of the images, and each video's frames: frame f's pooled tokens after the earlier
        frames' (then a row end where `VIDEO_ROW_END`); the items in the order the prompts show them. ValueError where
        the prompts' visual tokens do not split into the items given."""
        base, num_images, order, spans = self._items(images, input_ids)
        videos = self._videos(images)
        if videos is None:
            return base
        V, F = videos.shape[:2]
        dev = videos.device
        frame, _ = self._frame_slots(F, dev)
        per_video = spans[-1]  # its frames' pooled tokens (and a row end)
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        video_items = num_images + torch.arange(V, device=dev)
        item = torch.cat([empty if base is None else base.tile_image, video_items.repeat_interleave(F)])
        slot = torch.cat([frame.new_zeros(0, frame.shape[1]) if base is None else base.slot, frame.repeat(V, 1)])
        ends = video_items if self.VIDEO_ROW_END else empty
        extra_item = torch.cat([empty if base is None else base.extra_image, ends])
        extra_offset = torch.cat([empty if base is None else base.extra_offset, torch.full_like(ends, per_video - 1)])
        place = torch.empty(len(order), dtype=torch.long, device=dev)  # each item's place in the prompts
        place[torch.tensor(order, device=dev)] = torch.arange(len(order), device=dev)
        layout = Layout(place[item], slot, torch.tensor(spans, device=dev)[order], place[extra_item], extra_offset,
                        self.model.model.image_newline)
        layout.mixed = self._video_mixes(base, V, F, images)
        return layout

    def expand_images(self, images: dict, input_ids: torch.Tensor, expand_size: int, context: dict | None = None) -> dict:
        """Every prompt's images and videos `expand_size` times, the copies of a prompt one after another."""
        if images.get("pixel_values_videos") is None:
            return super().expand_images(images, input_ids, expand_size, context)
        both = {**images, **(context or {})}
        _, num_images, order, spans = self._items(both, input_ids)
        span = torch.tensor(spans, device=input_ids.device)[order]  # in prompt order
        rows = self.visual_columns(input_ids, both).nonzero(as_tuple=True)[0][span.cumsum(0) - span]
        items = torch.tensor(order, device=rows.device)[runtime.images_for_expanded_rows(rows, input_ids.shape[0],
                                                                                             expand_size)]
        out = {"pixel_values_videos": images["pixel_values_videos"][items[items >= num_images] - num_images]}
        if num_images:
            out.update(self.take_images({k: images[k] for k in ("pixel_values", "image_sizes") if k in images},
                                        items[items < num_images]))
        return out


class LlavaOnevisionAdapter(_Videos, LlavaNextAdapter):
    """LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's layout with a SigLIP tower read
    whole, a row-end token after a single-tile image too, and, in a prompt with several images, each image as its
    base tile alone (`batch_num_images`, which its processor returns, says how many images each prompt has).

    Where an image's high-resolution patches exceed its `vision_aspect_ratio` budget ("anyres_max_9": nine tiles'
    worth), the stock model shrinks their grid by bilinear interpolation after the projector, so each of those
    image tokens mixes up to four neighbouring patches; a video's frames are each shrunk to half their side so
    (`apply_pooling`), and the video ends in one row-end token. There a token's place belongs to the patch nearest
    to it (its largest weight; no patch is nearest to two tokens): the token enters the LLM where stages 1 and 2
    kept that patch, as the model's own interpolation of the kept patches alone, its weights renormalised over them
    (`placed_features`). Pruning nothing, that is the stock model; a share of the patches kept leaves about that
    share of the tokens, and a kept patch that is nearest to no token enters the LLM only in its neighbours' mixes.

    The tower encodes every image's tiles, then every video's frames (`VisualTokens` rows in that order; stage-1
    methods prune inside each tile and frame); the layout puts each image and video at its place in the prompts. In
    `stats`, "images" counts a sample's images and videos, and kept_grid has one entry per tile and frame."""

    IMAGE_INPUTS = ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos")
    PER_IMAGE_INPUTS = ("pixel_values", "image_sizes", "pixel_values_videos")

    def __init__(self, model: LlavaOnevisionForConditionalGeneration):
        super().__init__(model)
        self.video_token_id = model.config.video_token_id

    def _tile_counts(self, sizes, images: dict) -> list[int]:
        """The tiles of each image: its anyres tiles where its prompt has one image, its base tile alone where the
        prompt has several (`batch_num_images`; without it every image counts as a prompt's only one)."""
        per_prompt = images.get("batch_num_images")
        alone = [True] * len(sizes) if per_prompt is None else [int(k) == 1 for k in per_prompt for _ in range(int(k))]
        if len(alone) != len(sizes):
            raise ValueError(f"batch_num_images {[int(k) for k in per_prompt]} do not add up to the {len(sizes)} images")
        whole = super()._tile_counts(sizes, images)
        return [c if a else 1 for c, a in zip(whole, alone)]

    def _pack(self, features: torch.Tensor, size: torch.Tensor, row_end: torch.Tensor, budget: str | None = None):
        """The model's packing of one image's (tiles, N, C) features: (L, C), row_end at the row ends."""
        ratio = budget or self.model.config.vision_aspect_ratio
        return self.model.model.pack_image_features([features], size[None], image_newline=row_end,
                                                    vision_aspect_ratio=ratio)[0][0]

    def _pool_frames(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.apply_pooling(features)

    def _video_mixes(self, base: Layout | None, num_videos: int, frames: int, images: dict) -> MixedItems:
        """Every item's tiles and packing: the images' (None where not interpolated), then each video's frames, pooled
        after the projector (`placed_features` mixes the kept patches' projected features)."""
        num_images = 0 if base is None else len(base.span)
        counts = ([] if base is None else self._tile_counts(images["image_sizes"], images)) + [frames] * num_videos
        packs = base.mixed.packs if base is not None and base.mixed is not None else [None] * num_images
        return MixedItems(counts, packs + [self._pack_video] * num_videos)

    def _pack_video(self, features: torch.Tensor, row_end: torch.Tensor) -> torch.Tensor:
        """The model's reading of one video's (frames, N, C) features: each frame pooled, then one row end: (L, C)."""
        return torch.cat([self.model.model.apply_pooling(features).flatten(0, 1), row_end[None].to(features)])

    def _packed_patches(self, index: torch.Tensor, size: torch.Tensor, row_end: torch.Tensor):
        """Each token's patch: its own, or where the image is interpolated the patch nearest to it, and then how to
        mix the image's tokens (else None). The packing runs without the budget on the indices (the unpadded grid of
        patches), then with it on each patch's (row, column) in that grid (float64): a token's interpolated
        coordinates, rounded, are its nearest patch."""
        grid_rows = self._pack(index.double(), size, row_end.double(), _NO_BUDGET)[:, 0]
        n = index.shape[1]
        if index.shape[0] == 1:  # a base tile alone is never interpolated
            return grid_rows[:, None].to(index.dtype), None
        grid = grid_rows[n:].view(int((grid_rows[n:] < 0).sum()), -1)[:, :-1].long()  # (H, W): rows end in row_end
        where = torch.zeros(index.numel(), 2, dtype=torch.float64, device=index.device)
        h, w = torch.meshgrid(torch.arange(grid.shape[0]), torch.arange(grid.shape[1]), indexing="ij")
        where[grid.flatten()] = torch.stack([h, w], -1).view(-1, 2).to(where)
        at = self._pack(where.view(*index.shape[:2], 2), size, torch.full((2,), -1.0, dtype=torch.float64,
                                                                          device=index.device))[n:]
        if len(at) == len(grid_rows) - n:  # within the budget: not interpolated
            return grid_rows[:, None].to(index.dtype), None
        patch = at[:, 0] >= 0  # not a row end
        nearest = _nearest(at[patch])
        packed = torch.full((n + len(at),), -1.0, dtype=index.dtype, device=index.device)
        packed[:n] = grid_rows[:n].to(index.dtype)
        packed[n:][patch] = grid[nearest[:, 0], nearest[:, 1]].to(index.dtype)
        return packed[:, None], lambda x, end: self._pack(x, size, end)

    def placed_features(self, visual, layout: Layout, vi: torch.Tensor, vj: torch.Tensor) -> torch.Tensor:
        """The features of the kept tokens (vi, vj) the splice places; on an interpolated image or a video, each is
        the model's interpolation of the item's kept patches (projected features, zero where a patch was pruned)
        divided by the same interpolation of their presence: the bilinear weights renormalised over the kept
        patches."""
        features = visual.features[vi, vj]
        mixed = layout.mixed
        if mixed is None:
            return features
        n, D = self.tokens_per_image, visual.features.shape[-1]
        mask, t0 = visual.mask, 0
        for c, pack in zip(mixed.counts, mixed.packs):
            t0 += c
            if pack is None:
                continue
            ti, tj = mask[t0 - c:t0].nonzero(as_tuple=True)
            cells = visual.grid_index[t0 - c + ti, tj]
            dense = visual.features.new_zeros(c, n, D + 1)
            dense[ti, cells, :D] = visual.features[t0 - c + ti, tj]
            dense[ti, cells, D] = 1
            packed = pack(dense, dense.new_zeros(D + 1))
            here = (vi >= t0 - c) & (vi < t0)
            mix = packed[layout.slot[vi[here], visual.grid_index[vi[here], vj[here]]]]
            lost = bool((dense[..., D] == 0).any())  # pruning nothing: the model's interpolation itself
            features[here] = mix[:, :D] / mix[:, D:] if lost else mix[:, :D]
        return features


class LlavaNextVideoAdapter(_Videos, LlavaNextAdapter):
    """LLaVA-NeXT-Video (`LlavaNextVideoForConditionalGeneration`): LLaVA-NeXT's images (anyres tiles, row ends) and
    videos whose frames are each one tile of the same tower, each frame's patch grid averaged (or max-pooled) over
    k x k windows by the model's `vision_resampler` (k = 2: 576 patches, 144 tokens a frame) *before* the projector,
    and no row end after a video.

    Stage 1 prunes patches inside every tile and frame; then a frame's window is present where the patch nearest to
    its centre (the later one on a tie, as `_Videos` places tokens) survived, as the model's pooling of the window's
    surviving patches alone (average: weighted by the patches each stands for; max: over them), projected. Stage 2
    sees the images' patches and the frames' pooled tokens. Pruning nothing, that is the stock model; a share of a
    frame's patches kept leaves about that share of its tokens. In `stats`, stage1 counts the patches the tower
    hands on, fusion_tokens what enters the LLM; "images" counts a sample's images and videos."""

    IMAGE_INPUTS = ("pixel_values", "image_sizes", "pixel_values_videos")
    PER_IMAGE_INPUTS = ("pixel_values", "image_sizes", "pixel_values_videos")
    VIDEO_ROW_END = False

    def __init__(self, model: LlavaNextVideoForConditionalGeneration):
        super().__init__(model)
        self.video_token_id = model.config.video_token_id
        if model.config.spatial_pool_mode not in ("average", "max"):
            raise ValueError(f"spatial_pool_mode={model.config.spatial_pool_mode!r} is not supported (only 'average' "
                             "and 'max', which pool the patches a method keeps alone; a learned 'conv' pooling needs "
                             "every patch)")

    def _pool_frames(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.vision_resampler(features)

    def encode_images(self, images: dict, method):
        """The images' tiles and the videos' frames through the tower (stage 1), each frame's surviving patches pooled
        by window, all projected, then stage 2."""
        tokens = self.encode_expert(0, self.tiles(images), method)
        videos = self._videos(images)
        frames = 0 if videos is None else videos.shape[0] * videos.shape[1]
        first = tokens.features.shape[0] - frames
        pooled = self._pooled_frames(tokens, first) if frames else None
        parts = [VisualTokens(tokens.features[:first], tokens.expert[:first], tokens.grid_index[:first],
                              tokens.size[:first], valid=tokens.mask[:first])] + ([pooled] if pooled is not None else [])
        width = max(p.features.shape[1] for p in parts)
        projector = self.model.model.multi_modal_projector

        def padded(x, fill):  # (rows, n, ...) -> (rows, width, ...)
            return torch.cat([x, x.new_full((x.shape[0], width - x.shape[1], *x.shape[2:]), fill)], 1)
        both = VisualTokens(*(torch.cat([padded(getattr(p, k), 0) for p in parts]) for k in ("features", "expert",
                                                                                             "grid_index", "size")),
                            valid=torch.cat([padded(p.mask, False) for p in parts]))
        if bool(both.valid.all()):
            both.valid = None
        out = fuse_and_prune([both], [projector(both.features)], self.expert_names, method)
        out.stage1 = {EXPERT: tokens.mask.sum(1).tolist()}  # the patches each tile and frame handed on
        return out

    def _pooled_frames(self, tokens, first: int):
        """`VisualTokens` of the frames (tokens' rows from `first` on): each window's pooling of its surviving
        patches (features in the tower's width), at the grid index of the patch nearest to its centre, present where
        that patch survived."""
        feats, mask = tokens.features[first:], tokens.mask[first:]
        rows, n, C = feats.shape[0], self.tokens_per_image, feats.shape[-1]
        ti, tj = mask.nonzero(as_tuple=True)
        cells = tokens.grid_index[first:][ti, tj]
        average = self.model.config.spatial_pool_mode == "average"
        weight = tokens.size[first:][ti, tj][:, None] if average else 1.0
        dense = feats.new_zeros(rows, n, C + 1) if average else feats.new_full((rows, n, C + 1), -torch.inf)
        dense[ti, cells, :C] = feats[ti, tj] * weight
        dense[ti, cells, C:] = weight if average else 1.0
        pooled = self._pool_frames(dense)
        slot, per_frame = self._frame_slots(1, feats.device)
        nearest = torch.empty(per_frame, dtype=torch.long, device=feats.device)
        shown = (slot[0] >= 0).nonzero()[:, 0]
        nearest[slot[0, shown]] = shown  # each pooled token's patch
        kept = torch.zeros(rows, n, dtype=torch.bool, device=feats.device)
        kept[ti, cells] = True
        present = kept[:, nearest]
        values = pooled[..., :C] / pooled[..., C:] if average else pooled[..., :C]
        values = torch.where(present[..., None], values, 0.0)
        grid = nearest.expand(rows, -1)
        return VisualTokens(values, torch.zeros_like(grid), grid, torch.ones(grid.shape, device=feats.device),
                            valid=present)


class _FramesWithoutVideoProcessor:
    """What the project's LLaVA-OneVision and LLaVA-NeXT-Video processors share: the stock processor with no video
    processor (transformers' need torchvision), videos taken as lists of frames (the same count in each video of a
    batch) whose pixels `_frame_pixels` makes, (frames, 3, S, S), and each `<video>` expanded as the stock processor
    does."""

    def check_argument_for_proper_class(self, attribute_name, arg):
        if attribute_name == "video_processor" and arg is None:
            return None
        return super().check_argument_for_proper_class(attribute_name, arg)

    def _frame_pixels(self, frames: list) -> torch.Tensor:
        raise NotImplementedError

    def _process_videos(self, videos, **kwargs):
        from transformers.video_utils import make_batched_videos

        videos = make_batched_videos(videos)
        frames = {len(v) for v in videos}
        if len(frames) > 1:
            raise ValueError(f"the videos of a batch need the same number of frames, not {sorted(frames)}")
        pixels = self._frame_pixels([frame for video in videos for frame in video])
        processed = {"pixel_values_videos": pixels.view(len(videos), -1, *pixels.shape[1:])}
        return processed, [self.replace_video_token(processed, video_idx=i) for i in range(len(videos))]


class LlavaOnevisionImageTextProcessor(_FramesWithoutVideoProcessor, LlavaOnevisionProcessor):
    """transformers' `LlavaOnevisionProcessor` without a video processor (which needs torchvision, and which the
    stock class insists on checking even when given None). Prompts and image pixels are the stock processor's: nest
    the images by prompt (`images=[[a], [b, c]]`) so that `batch_num_images` tells the model which prompts hold
    several images. Videos are lists of frames (`videos=[[f0, f1, ...], ...]`, the same count in each video of a
    batch), each frame resized to the tower's tile as the image processor resizes a whole image into its base tile;
    they come as `pixel_values_videos` (videos, frames, 3, S, S), and each `<video>` in the prompt as the video's
    tokens (frames times its pooled tokens, and a row end). The stock video processor also samples frames, and
    resizes them with its own settings."""

    def _frame_pixels(self, frames: list) -> torch.Tensor:
        return self.image_processor(frames, return_tensors="pt")["pixel_values"][:, 0]  # each frame's whole-image tile

    @classmethod
    def from_pretrained(cls, path) -> LlavaOnevisionImageTextProcessor:
        """From a LLaVA-OneVision checkpoint folder: its tokenizer, image processor (the PIL one where torchvision
        is missing), chat template and processor_config.json's num_image_tokens, vision_feature_select_strategy
        and vision_aspect_ratio."""
        from transformers import AutoImageProcessor, AutoTokenizer

        path = Path(path)
        settings = {}
        if (path / "processor_config.json").is_file():
            saved = json.loads((path / "processor_config.json").read_text())
            settings = {k: saved[k] for k in ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")
                        if k in saved}
        return cls(image_processor=AutoImageProcessor.from_pretrained(path),
                   tokenizer=AutoTokenizer.from_pretrained(path), chat_template=StockProcessor.read_chat_template(path),
                   **settings)

    def save_pretrained(self, path) -> None:
        """The tokenizer, preprocessor_config.json, processor_config.json (the settings `from_pretrained` reads) and
        chat_template.jinja (if any) into `path` (the stock method would save the missing video processor)."""
        path = Path(path)
        StockProcessor.save_pretrained(self, path)
        settings = {"num_image_tokens": self.num_image_tokens, "vision_aspect_ratio": self.vision_aspect_ratio,
                    "vision_feature_select_strategy": self.vision_feature_select_strategy}
        (path / "processor_config.json").write_text(json.dumps(settings, indent=2))


# the settings of a LLaVA-NeXT-Video video processor that `LlavaNextVideoImageTextProcessor` reads, and its defaults
# (transformers' LlavaNextVideoVideoProcessor: CLIP's resize of the shortest edge, centre crop, CLIP's mean and std)
_FRAME_SETTINGS = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                   "resample": 3, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                   "do_convert_rgb": True}


class LlavaNextVideoImageTextProcessor(_FramesWithoutVideoProcessor, LlavaNextVideoProcessor):
    """transformers' `LlavaNextVideoProcessor` without its video processor (which needs torchvision): prompts and image
    pixels are the stock processor's; videos are lists of frames (`videos=[[f0, f1, ...], ...]`, the same count in
    each video of a batch), each frame resized and cropped by a PIL CLIP image processor with the video processor's
    settings (`frame_settings`: its shortest edge, crop, mean and std; from video_preprocessor_config.json in
    `from_pretrained`). They come as `pixel_values_videos` (videos, frames, 3, S, S), and each `<video>` in the
    prompt as the video's tokens (frames times the pooled tokens of a frame). The stock video processor also samples
    frames, and resizes with torchvision (whose bicubic differs from PIL's by a few levels)."""

    def __init__(self, video_processor=None, image_processor=None, tokenizer=None, chat_template=None,
                 frame_settings: dict | None = None, **kwargs):
        if video_processor is not None:
            raise ValueError("LlavaNextVideoImageTextProcessor resizes frames itself (frame_settings): give no "
                             "video_processor")
        super().__init__(None, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.frame_settings = {**_FRAME_SETTINGS, **{k: v for k, v in (frame_settings or {}).items()
                                                     if k in _FRAME_SETTINGS}}

    def _frame_pixels(self, frames: list) -> torch.Tensor:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(**self.frame_settings)(frames, return_tensors="pt")["pixel_values"]

    @classmethod
    def from_pretrained(cls, path) -> LlavaNextVideoImageTextProcessor:
        """From a LLaVA-NeXT-Video checkpoint folder: its tokenizer, image processor (the PIL one where torchvision
        is missing), chat template, processor_config.json's patch_size, vision_feature_select_strategy and
        num_additional_image_tokens, and the frame settings where transformers' video processor would find them:
        processor_config.json's "video_processor", else video_preprocessor_config.json, else (older folders)
        preprocessor_config.json; the video processor's defaults where none of them says."""
        from transformers import AutoImageProcessor, AutoTokenizer

        path = Path(path)
        saved = json.loads((path / "processor_config.json").read_text()) if (path / "processor_config.json").is_file() else {}
        settings = {k: saved[k] for k in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens")
                    if k in saved}
        frames = saved.get("video_processor")
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            if frames is None and (path / name).is_file():
                frames = json.loads((path / name).read_text())
        return cls(image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=AutoTokenizer.from_pretrained(path),
                   chat_template=StockProcessor.read_chat_template(path), frame_settings=frames, **settings)

    def save_pretrained(self, path) -> None:
        """The tokenizer, preprocessor_config.json, processor_config.json and video_preprocessor_config.json (the
        settings `from_pretrained` reads) and chat_template.jinja (if any) into `path`."""
        path = Path(path)
        StockProcessor.save_pretrained(self, path)
        settings = {"patch_size": self.patch_size, "vision_feature_select_strategy": self.vision_feature_select_strategy,
                    "num_additional_image_tokens": self.num_additional_image_tokens}
        (path / "processor_config.json").write_text(json.dumps(settings, indent=2))
        (path / "video_preprocessor_config.json").write_text(json.dumps(self.frame_settings, indent=2))
