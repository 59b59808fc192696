"""Pruning on a stock transformers LLaVA (`LlavaForConditionalGeneration`: LLaVA-1.5 and its kin) and LLaVA-NeXT
(`LlavaNextForConditionalGeneration`, "anyres" tiles).

The adapter locates the model's parts and speaks its input format; the methods and the LLM runtime are
the ones the multi-encoder VLM uses, so every method runs here unchanged:

- the vision tower (CLIP with CLS, or SigLIP without) is the one expert, named "vision", walked block by
  block up to the layer LLaVA reads its features from (`vision_feature_layer`, -2 for LLaVA-1.5), so
  stage-1 methods prune inside it; the blocks after that layer, which stock LLaVA runs and discards, are
  not run;
- the multi-modal projector projects the kept tokens; `prune_fusion` sees them (one expert);
- the prompt holds one image token per patch (the processor expands `<image>`; LLaVA-NeXT's are the tiles'
  patches in the layout its `pack_image_features` makes, with row-end tokens, see `LlavaNextAdapter`); each
  kept visual token takes its patch's column, so it keeps its unpruned RoPE position, and a pruned patch's
  column leaves the sequence;
- the language model's layers run in the shared runtime (`runtime.prefill` / `decode`), so stage-3
  methods drop tokens mid-stack with SDPA and the KV cache as on the project's own model.

Inside `with method(llava)` this one instance's `forward` and `prepare_inputs_for_generation` are
replaced (nothing is patched on the class); leaving the block restores them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers import DynamicCache, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from . import runtime
from .experts import CLIPRunner, ExpertSpec, SiglipRunner
from .vlm import fuse_and_prune, prefill_stats, run_expert

__all__ = ["LlavaAdapter", "LlavaNextAdapter", "Layout", "llava_adapter"]

_OUTPUT_CACHE = "cache" if "cache" in LlavaCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
EXPERT = "vision"
# keyword arguments generate or a caller may pass that change nothing here when None / False
_HARMLESS = ("cache_position", "output_attentions", "output_hidden_states", "return_dict", "is_first_iteration",
             "next_sequence_length")


def llava_adapter(model) -> LlavaAdapter | None:
    """The adapter for a transformers LlavaForConditionalGeneration or LlavaNextForConditionalGeneration, or None
    for any other model (subclasses included)."""
    if type(model) is LlavaForConditionalGeneration:
        return LlavaAdapter(model)
    if type(model) is LlavaNextForConditionalGeneration:
        return LlavaNextAdapter(model)
    return None


class _TowerBlocks:
    """LLaVA's reading of a vision tower: the blocks up to its feature layer, no final norm, no CLS."""

    def __init__(self, module, spec: ExpertSpec, depth: int):
        super().__init__(module, spec)
        self._blocks = module.encoder.layers[:depth]

    @property
    def blocks(self):
        return self._blocks

    def finalize(self, x):
        return x[:, 1:] if self.has_cls else x


class LlavaCLIPRunner(_TowerBlocks, CLIPRunner):
    pass


class LlavaSiglipRunner(_TowerBlocks, SiglipRunner):
    pass


_TOWERS = {"CLIPVisionModel": ("clip", LlavaCLIPRunner, "default"), "SiglipVisionModel": ("siglip", LlavaSiglipRunner, "full")}


@dataclass
class Layout:
    """How a batch of images' tokens sit among their image tokens in the prompt (the k-th image holds the next
    span[k] image tokens, in row-major order over the batch).

    tile_image: (num_tiles,) the image each tile the tower encodes belongs to; slot: (num_tiles, N) the offset,
    within its image's span, of each of the tile's patches (-1: a patch the image does not show, cut off by
    LLaVA-NeXT's unpadding); span: (num_images,) image tokens per image; extra_image, extra_offset: (M,) image
    tokens that are no patch (LLaVA-NeXT's row ends), and extra: (D,) their embedding.
    """

    tile_image: torch.Tensor
    slot: torch.Tensor
    span: torch.Tensor
    extra_image: torch.Tensor | None = None
    extra_offset: torch.Tensor | None = None
    extra: torch.Tensor | None = None


class LlavaAdapter:
    """What the methods and the runtime need to know about one `LlavaForConditionalGeneration`.

    Attributes read by methods' `setup`: runners (one, "vision"), expert_names, num_llm_layers, config
    (fusion "post", text_config, rank_table: the model config's `rank_table` attribute if it has one).
    """

    def __init__(self, model: LlavaForConditionalGeneration):
        cfg = model.config
        tower = model.model.vision_tower
        kind = _TOWERS.get(type(tower).__name__)
        if kind is None:
            raise ValueError(f"unsupported LLaVA vision tower {type(tower).__name__}: supported "
                             f"{sorted(_TOWERS)}")
        name, runner_cls, strategy = kind
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer={layer}: features concatenated from several layers are not supported")
        if cfg.vision_feature_select_strategy != strategy:
            raise ValueError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} with a {name} tower "
                             f"is not supported (only {strategy!r}: every patch token, no CLS, none dropped)")
        attention = getattr(cfg.text_config, "_attn_implementation", None)
        if attention != "sdpa":
            raise ValueError(f"the language model runs {attention!r} attention; pruning needs 'sdpa' (load the model "
                             "with attn_implementation='sdpa')")
        vcfg = tower.config
        n_layers = vcfg.num_hidden_layers
        depth = layer if layer >= 0 else n_layers + 1 + layer  # hidden_states[0] is the first block's input
        if not 1 <= depth <= n_layers:
            raise ValueError(f"vision_feature_layer={layer} is outside the tower's {n_layers} blocks")
        spec = ExpertSpec(EXPERT, name, vcfg.image_size, {})
        self.model = model
        self.runners = [runner_cls(tower, spec, depth)]
        self.expert_names = [EXPERT]
        self.num_llm_layers = cfg.text_config.num_hidden_layers
        self.config = SimpleNamespace(fusion="post", text_config=cfg.text_config,
                                      rank_table=getattr(cfg, "rank_table", None))
        self.image_token_id = cfg.image_token_id
        lm = model.model.language_model
        self.decoder = runtime.DecoderParts(lm.embed_tokens, lm.layers, lm.rotary_emb, lm.norm, model.lm_head)

    @property
    def tokens_per_image(self) -> int:
        return self.runners[0].num_patches

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- attaching -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def pruning(self, method):
        """Replace this instance's forward and prepare_inputs_for_generation while the block runs."""
        model = self.model
        saved = {k: vars(model)[k] for k in ("forward", "prepare_inputs_for_generation") if k in vars(model)}
        adapter = self

        def forward(input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
                    past_key_values=None, use_cache=None, logits_to_keep=0, query_positions=None, image_sizes=None,
                    **kwargs):
            return adapter.forward(method, input_ids, pixel_values, attention_mask, position_ids,
                                   cache if cache is not None else past_key_values, use_cache, logits_to_keep,
                                   query_positions, image_sizes, **kwargs)

        def prepare_inputs_for_generation(input_ids, past_key_values=None, attention_mask=None, cache=None, **kwargs):
            return runtime.generation_inputs(input_ids, cache if cache is not None else past_key_values, attention_mask,
                                             kwargs, lambda k: k in ("pixel_values", "image_sizes"))

        model.forward = forward
        model.prepare_inputs_for_generation = prepare_inputs_for_generation
        try:
            yield
        finally:
            for k in ("forward", "prepare_inputs_for_generation"):
                if k in saved:
                    setattr(model, k, saved[k])
                else:
                    delattr(model, k)

    # ---- stages 1 and 2 ----------------------------------------------------------------------------
    def encode_expert(self, index: int, pixel_values: torch.Tensor, method):
        """The tower (expert 0) block by block on (num_tiles, 3, S, S) pixels, with stage-1 pruning."""
        runner = self.runners[index]
        return run_expert(runner, index, pixel_values.to(runner.module.dtype), method)

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

    def layout(self, images: dict) -> Layout:
        """Where each tile's patch tokens sit among its image's image tokens (LLaVA-1.5: patch g at offset g)."""
        n, count = self.tokens_per_image, images["pixel_values"].shape[0]
        dev = images["pixel_values"].device
        return Layout(torch.arange(count, device=dev), torch.arange(n, device=dev).expand(count, n),
                      torch.full((count,), n, device=dev))

    # ---- the prompt ----------------------------------------------------------------------------
    def splice(self, input_ids, attention_mask, visual, layout: Layout | None, position_ids=None):
        """Text embeddings with each kept visual token at its patch's image-token column (and each extra token of
        the layout at its own); pruned patches' columns (and padding) leave the sequence, left-padded again.

        Returns embeds (B, L, D), valid (B, L), is_visual (B, L), vis_index (B, L) (tile * N + slot into
        `visual`, -1 elsewhere), positions (B, L) (the unpruned RoPE positions), input_col (B, L) (the
        input_ids column each came from, -1 on padding) and owner (the sample of each tile).
        """
        B, T = input_ids.shape
        dev = input_ids.device
        is_img = input_ids == self.image_token_id
        per_sample = is_img.sum(1)
        span = layout.span if layout is not None else torch.zeros(0, dtype=torch.long, device=dev)
        first = span.cumsum(0) - span  # each image's first image token, counted over the batch in row-major order
        ib, it = is_img.nonzero(as_tuple=True)
        if int(per_sample.sum()) != int(span.sum()) or (len(span) and bool((ib[first] != ib[first + span - 1]).any())):
            raise ValueError(f"the prompts hold {per_sample.tolist()} image tokens but the {len(span)} image(s) given "
                             f"need {span.tolist()} (the processor expands each <image> to them)")
        embeds = self.decoder.embed_tokens(input_ids.masked_fill(is_img, 0))
        mask = attention_mask.bool()
        positions = runtime.positions_from_mask(mask) if position_ids is None else position_ids.long()
        placed = torch.zeros_like(is_img)
        vis_index = torch.full((B, T), -1, dtype=torch.long, device=dev)
        owner = ib[first[layout.tile_image]].tolist() if layout is not None else []
        if layout is not None:
            embeds = embeds.clone()
            vi, vj = visual.mask.nonzero(as_tuple=True)
            offset = layout.slot[vi, visual.grid_index[vi, vj]]
            vi, vj, offset = vi[offset >= 0], vj[offset >= 0], offset[offset >= 0]  # patches the image shows
            k = first[layout.tile_image[vi]] + offset
            rows, cols = ib[k], it[k]
            embeds[rows, cols] = visual.features[vi, vj].to(embeds.dtype)
            placed[rows, cols] = True
            vis_index[rows, cols] = vi * visual.features.shape[1] + vj
            if layout.extra_image is not None:  # tokens of the image that are no patch (LLaVA-NeXT's row ends)
                k = first[layout.extra_image] + layout.extra_offset
                embeds[ib[k], it[k]] = layout.extra.to(embeds.dtype)
                placed[ib[k], it[k]] = True
        keep = mask & (~is_img | placed)
        cols = torch.arange(T, device=dev).expand(B, T)
        valid, embeds, positions, is_vis, vis_index, input_col = runtime.compact(keep, embeds, positions, placed,
                                                                                 vis_index, cols)
        return embeds, valid, is_vis, vis_index, positions, input_col.masked_fill(~valid, -1), owner

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, method, input_ids, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
                use_cache=None, logits_to_keep=0, query_positions=None, image_sizes=None, **kwargs):
        """LLaVA's forward with `method` at every stage: logits aligned with input_ids (B, T, V); a pruned
        patch's column gives the logits of the last token present before it."""
        unknown = [k for k, v in kwargs.items() if k not in _HARMLESS and v is not None and v is not False]
        if unknown:
            raise ValueError(f"unexpected inputs while a pruning method is attached to a LLaVA model: {unknown} "
                             "(labels, inputs_embeds and per-call vision settings are not supported)")
        if input_ids is None:
            raise ValueError("input_ids are required while a pruning method is attached (inputs_embeds are not supported)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.bool()
        use_cache = getattr(self.config.text_config, "use_cache", True) if use_cache is None else use_cache
        parts = self.decoder
        state = runtime.get_state(cache)
        if state is not None:  # decoding against a filled (maybe pruned) cache
            if pixel_values is not None:
                raise ValueError("images can only be given with the first (prefill) call, not with a filled cache")
            hidden = runtime.decode_new_tokens(parts, input_ids, attention_mask, cache)
        else:
            if use_cache and cache is None:
                cache = DynamicCache(config=self.config.text_config)
            images = None if pixel_values is None else {"pixel_values": pixel_values, "image_sizes": image_sizes}
            visual = self.encode_images(images, method) if images is not None else None
            layout = self.layout(images) if images is not None else None
            embeds, valid, is_vis, vis_index, positions, input_col, owner = self.splice(
                input_ids, attention_mask, visual, layout, position_ids)
            B, T = input_ids.shape
            qpos = torch.full((B,), T - 1, device=input_ids.device)
            if query_positions is not None:
                qpos = torch.as_tensor(query_positions, device=input_ids.device).long().expand_as(qpos)
            query_col = (input_col == qpos[:, None]).long().argmax(1)
            hidden, cols, kept = runtime.prefill(parts, embeds, valid, is_vis, query_col, cache if use_cache else None,
                                                 method.llm_layers(self.num_llm_layers), method.prune_llm, positions)
            survivors = torch.where(cols >= 0, vis_index.gather(1, cols.clamp_min(0)), -1)
            method.stats.extend(prefill_stats(owner, is_vis & valid, visual, kept, survivors, self.num_llm_layers,
                                              self.tokens_per_image, self.expert_names))
            out_col = torch.where(cols >= 0, input_col.gather(1, cols.clamp_min(0)), -1)
            hidden = runtime.at_columns(hidden, out_col, torch.arange(T, device=input_ids.device).expand(B, T))
            if use_cache:
                runtime.get_state(cache).seen = T
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = parts.lm_head(hidden)
        return LlavaCausalLMOutputWithPast(logits=logits, **{_OUTPUT_CACHE: cache if use_cache else None})


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (`LlavaNextForConditionalGeneration`, "anyres"): each image is a base tile of the whole image
    plus high-resolution tiles; the tower encodes every tile (stage-1 methods prune inside each tile, the
    tiles of a batch being the tower's batch). An image's tokens are the base tile's patches, then the
    high-resolution tiles' patches stitched into one grid, unpadded to the image's aspect, each row ended by a
    learned newline token; the layout comes from the model's own `pack_image_features`, run on patch indices.
    The newline tokens enter the LLM as visual tokens (stage-3 methods may drop them); a kept patch the
    unpadding cuts off does not enter it. `stats` count tiles as images (encoder_tokens: N per tile)."""

    def _tile_counts(self, sizes) -> list[int]:
        cfg = self.model.config
        return [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes]

    def tiles(self, images: dict) -> torch.Tensor:
        pixels, sizes = images["pixel_values"], images.get("image_sizes")
        if sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes with pixel_values (its processor returns both)")
        counts = self._tile_counts(sizes)
        if pixels.dim() == 5:  # (images, most tiles, 3, S, S), padded with empty tiles
            pixels = torch.cat([p[:c] for p, c in zip(pixels, counts)])
        if pixels.dim() != 4 or pixels.shape[0] != sum(counts):
            raise ValueError(f"pixel_values {tuple(images['pixel_values'].shape)} do not hold the {sum(counts)} tiles "
                             f"the image sizes need ({counts} per image)")
        return pixels

    def layout(self, images: dict) -> Layout:
        sizes = images["image_sizes"]
        counts = self._tile_counts(sizes)
        n, dev = self.tokens_per_image, images["pixel_values"].device
        row_end = torch.full((1,), -1.0, device=dev)
        slots, spans, extra_image, extra_offset = [], [], [], []
        for k, (size, c) in enumerate(zip(sizes, counts)):
            index = torch.arange(c * n, device=dev, dtype=torch.float32).view(c, n, 1)  # exact below 2**24
            packed, _ = self.model.model.pack_image_features([index], size[None], "default", image_newline=row_end)
            packed = packed[0][:, 0].long()
            shown = (packed >= 0).nonzero()[:, 0]
            slot = torch.full((c * n,), -1, dtype=torch.long, device=dev)
            slot[packed[shown]] = shown
            slots.append(slot.view(c, n))
            spans.append(len(packed))
            ends = (packed < 0).nonzero()[:, 0]
            extra_image.append(torch.full_like(ends, k))
            extra_offset.append(ends)
        tile_image = torch.repeat_interleave(torch.arange(len(counts), device=dev), torch.tensor(counts, device=dev))
        return Layout(tile_image, torch.cat(slots), torch.tensor(spans, device=dev), torch.cat(extra_image),
                      torch.cat(extra_offset), self.model.model.image_newline)
