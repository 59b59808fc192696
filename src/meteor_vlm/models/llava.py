"""Pruning on a stock transformers LLaVA (`LlavaForConditionalGeneration`: LLaVA-1.5 and its kin).

The adapter locates the model's parts and speaks its input format; the methods and the LLM runtime are
the ones the multi-encoder VLM uses, so every method runs here unchanged:

- the vision tower (CLIP with CLS, or SigLIP without) is the one expert, named "vision", walked block by
  block up to the layer LLaVA reads its features from (`vision_feature_layer`, -2 for LLaVA-1.5), so
  stage-1 methods prune inside it; the blocks after that layer, which stock LLaVA runs and discards, are
  not run;
- the multi-modal projector projects the kept tokens; `prune_fusion` sees them (one expert);
- the prompt holds one image token per patch (the processor expands `<image>`); each kept visual token
  takes its patch's column, so it keeps its unpruned RoPE position, and a pruned patch's column leaves
  the sequence;
- the language model's layers run in the shared runtime (`runtime.prefill` / `decode`), so stage-3
  methods drop tokens mid-stack with SDPA and the KV cache as on the project's own model.

Inside `with method(llava)` this one instance's `forward` and `prepare_inputs_for_generation` are
replaced (nothing is patched on the class); leaving the block restores them.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
from transformers import DynamicCache, LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from . import runtime
from .experts import CLIPRunner, ExpertSpec, SiglipRunner
from .vlm import fuse_and_prune, prefill_stats, run_expert

__all__ = ["LlavaAdapter", "is_llava"]

_OUTPUT_CACHE = "cache" if "cache" in LlavaCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
EXPERT = "vision"
# keyword arguments generate or a caller may pass that change nothing here when None / False
_HARMLESS = ("cache_position", "output_attentions", "output_hidden_states", "return_dict", "is_first_iteration",
             "next_sequence_length")


def is_llava(model) -> bool:
    """True for a transformers LlavaForConditionalGeneration (not its LLaVA-NeXT / Qwen2-VL cousins)."""
    return type(model) is LlavaForConditionalGeneration


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
                    past_key_values=None, use_cache=None, logits_to_keep=0, query_positions=None, **kwargs):
            return adapter.forward(method, input_ids, pixel_values, attention_mask, position_ids,
                                   cache if cache is not None else past_key_values, use_cache, logits_to_keep,
                                   query_positions, **kwargs)

        def prepare_inputs_for_generation(input_ids, past_key_values=None, attention_mask=None, cache=None, **kwargs):
            return runtime.generation_inputs(input_ids, cache if cache is not None else past_key_values, attention_mask,
                                             kwargs, lambda k: k == "pixel_values")

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
        """The tower (expert 0) block by block on (num_images, 3, S, S) pixels, with stage-1 pruning."""
        runner = self.runners[index]
        return run_expert(runner, index, pixel_values.to(runner.module.dtype), method)

    def encode_images(self, pixel_values: torch.Tensor, method):
        """(num_images, 3, S, S) pixels -> `VisualTokens` in the LLM's width after stages 1 and 2."""
        tokens = self.encode_expert(0, pixel_values, method)
        projected = self.model.model.multi_modal_projector(tokens.features)
        return fuse_and_prune([tokens], [projected], self.expert_names, method)

    # ---- the prompt ----------------------------------------------------------------------------
    def splice(self, input_ids, attention_mask, visual, position_ids=None):
        """Text embeddings with each kept visual token at its patch's image-token column; pruned patches'
        columns (and padding) leave the sequence, which is left-padded again.

        Returns embeds (B, L, D), valid (B, L), is_visual (B, L), vis_index (B, L) (image * N + slot into
        `visual`, -1 elsewhere), positions (B, L) (the unpruned RoPE positions), input_col (B, L) (the
        input_ids column each came from, -1 on padding) and owner (the sample of each image).
        """
        B, T = input_ids.shape
        dev = input_ids.device
        is_img = input_ids == self.image_token_id
        n = self.tokens_per_image
        per_sample = is_img.sum(1)
        have = 0 if visual is None else visual.features.shape[0]
        if int(per_sample.sum()) != have * n or bool((per_sample % n).any()):
            raise ValueError(f"the prompts hold {per_sample.tolist()} image tokens but {have} image(s) were given; "
                             f"each image needs {n} (the processor expands <image> to them)")
        embeds = self.decoder.embed_tokens(input_ids.masked_fill(is_img, 0))
        mask = attention_mask.bool()
        positions = runtime.positions_from_mask(mask) if position_ids is None else position_ids.long()
        placed = torch.zeros_like(is_img)
        vis_index = torch.full((B, T), -1, dtype=torch.long, device=dev)
        ib, it = is_img.nonzero(as_tuple=True)  # row-major: image k holds image columns k*n .. k*n + n - 1
        owner = ib[::n].tolist() if have else []
        if have:
            vi, vj = visual.mask.nonzero(as_tuple=True)
            k = vi * n + visual.grid_index[vi, vj]
            rows, cols = ib[k], it[k]
            embeds = embeds.clone()
            embeds[rows, cols] = visual.features[vi, vj].to(embeds.dtype)
            placed[rows, cols] = True
            vis_index[rows, cols] = vi * visual.features.shape[1] + vj
        keep = mask & (~is_img | placed)
        cols = torch.arange(T, device=dev).expand(B, T)
        valid, embeds, positions, is_vis, vis_index, input_col = runtime.compact(keep, embeds, positions, placed,
                                                                                 vis_index, cols)
        return embeds, valid, is_vis, vis_index, positions, input_col.masked_fill(~valid, -1), owner

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, method, input_ids, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
                use_cache=None, logits_to_keep=0, query_positions=None, **kwargs):
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
            visual = self.encode_images(pixel_values, method) if pixel_values is not None else None
            embeds, valid, is_vis, vis_index, positions, input_col, owner = self.splice(
                input_ids, attention_mask, visual, position_ids)
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
