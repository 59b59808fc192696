"""The pruning-aware LLM runtime: runs decoder layers one by one so visual tokens can leave mid-stack.

What it keeps straight after tokens are dropped at layer L:

- hidden states are compacted per sample and left-padded again (samples may keep different counts);
- kept tokens keep the RoPE positions of the unpruned sequence, so dropping a token at layer L is
  exactly masking its key from layer L on (the oracle the tests check);
- a method may also recycle dropped tokens (`LLMMerge`): each merged token takes the place, and the
  RoPE position, of one dropped visual column, so recycling at layer L is exactly writing the merged
  states there and masking the other dropped keys from layer L on;
- every layer keeps running its own SDPA attention with an explicit boolean mask (causal in the
  compacted order, which preserves the original order, and padding-aware); a sliding-window layer
  (Mistral, Gemma 3's local layers) also masks keys a window or more behind the query, counted in the
  unpruned positions, and tokens of one image may see each other both ways (Gemma 3's image blocks);
- the KV cache holds, per layer, only the tokens that layer saw; a per-layer key-validity mask and the
  next RoPE position travel with the cache so decoding after pruning stays correct;
- a chunked-attention layer (Llama 4's) masks keys of another chunk of positions; what a layer takes besides its
  hidden states (Gemma 4's per-layer embeddings, ERNIE 4.5 VL's modality types) leaves with its tokens, and a layer
  that reuses an earlier layer's keys and values (Gemma 4's last layers) sees them compacted with the hidden states,
  and masked against the cache by what its source layer cached.

It works on any Llama-style causal LM (Llama, Qwen2, Qwen3, Gemma 3, ...) located by `DecoderParts`.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import ops

__all__ = ["DecoderParts", "CacheState", "LLMLayerContext", "LLMMerge", "prefill", "decode", "compact", "at_columns",
           "generation_inputs", "decode_new_tokens", "images_for_expanded_rows"]

# the decoders (text configs' model_type) whose stock VLMs the tests run every oracle on, beside a tiny vision tower;
# a stock VLM with another decoder gets an `UntestedDecoderWarning` that points to `meteor verify`
TESTED_DECODERS = frozenset({
    "llama", "mistral", "ministral3", "qwen2", "qwen3", "qwen3_moe", "gpt_oss", "granite", "hyperclovax", "phi3",
    "exaone4", "cohere2", "lfm2", "gemma", "gemma2", "gemma3_text", "gemma4_text", "llama4_text", "qwen2_vl_text",
    "qwen2_5_vl_text", "qwen3_vl_text", "qwen3_vl_moe_text", "qwen3_5_text", "qwen3_5_moe_text", "glm4v_text",
    "glm4v_moe_text", "glm_ocr_text", "paddleocr_vl_text", "hunyuan_vl_text", "ernie4_5_vl_moe_text", "qwen2_5_omni_text"})


class UntestedDecoderWarning(UserWarning):
    """A stock VLM whose decoder is not in `TESTED_DECODERS`: the runtime may still run it right (most Llama-style
    decoders do), but no test has shown it; `meteor verify` asks the model itself."""


def attention_implementation(config, sinks: bool = False) -> str:
    """The attention a pruned model's modules run under `config` (a VLM's config or one of its sub-configs): eager where
    the attention soft-caps its logits (Gemma 2) or, `sinks`, has learned sinks (GPT-OSS's: the config of a decoder
    whose `DecoderParts.sinks` is set), neither of which SDPA can do; SDPA everywhere else (the runtime hands the
    layers boolean masks)."""
    return "eager" if getattr(config, "attn_logit_softcapping", None) or sinks else "sdpa"


# a backbone's norm after its last layer: most name it `norm`; LFM2 `embedding_norm` (applied last despite its name),
# Phi `final_layernorm`
FINAL_NORMS = ("norm", "embedding_norm", "final_layernorm")
RECURRENT_LAYERS = ("linear_attention", "conv")  # layer types that read their input as a sequence, with no keys


@dataclass
class DecoderParts:
    """Where the pieces of a decoder-only LM are. Adapters fill this; nothing else knows model classes.

    layer_types: per layer "full_attention" or "sliding_attention" (empty: every layer full); sliding_window:
    a sliding layer's window W (a query sees keys less than W positions behind it, as transformers' masks do);
    attn_softcap, final_softcap: where the decoder soft-caps its attention logits and its output logits (Gemma 2:
    c * tanh(x / c)), the caps. SDPA cannot soft-cap, so such a decoder's layers run eager attention, which takes
    additive masks (`layer_mask`); blocks_over_window: on a sliding layer, the tokens of one block (`prefill(blocks=)`)
    see each other at any distance (transformers' PaliGemma 2 mask: the sliding causal mask OR the blocks), rather
    than only within the window (Gemma 3's: the window AND (causal OR the blocks)). Adapters set it. nope_layers:
    the layers whose attention rotates nothing (Cohere 2's full-attention layers): they get the identity rotation
    (cos 1, sin 0), which their own attention ignores and `LLMLayerContext.attention_rows` applies as none.
    A recurrent layer (`RECURRENT_LAYERS`: Qwen3.5's "linear_attention", the gated delta rule, a causal convolution
    and a recurrent state in place of attention; LFM2's "conv", a short causal convolution) takes no attention mask
    and no positions: it gets the real tokens' (B, T) mask, which zeroes the padding's inputs, and its cache holds
    states, not keys (`scoring_layer`: where hooks asked before it run). blocks_on_full: whether the blocks reach the
    full-attention layers too (Gemma 3's) or only the sliding ones (Gemma 4's). kv_sources: per layer, the earlier
    layer whose keys and values it reuses (Gemma 4's KV-shared last layers: the last layer of their kind before them,
    handed on in `shared_kv_states`), None for a layer with its own. per_layer: the backbone whose per-layer inputs
    each layer also takes (Gemma 4's per-layer embeddings, `layer_inputs`), or None. attention_chunk: on a
    "chunked_attention" layer (Llama 4's), a query sees only the keys of its own chunk of C positions (position // C
    equal, counted in the unpruned positions, as transformers' chunked masks count real tokens), C this.
    embed_scale: the factor the backbone multiplies its input embeddings by, visual tokens' too (Granite's and
    HyperCLOVAX's `embedding_multiplier`), or None; `prefill` and `decode` apply it to what they are given. sinks:
    whether the layers' attention has learned sinks (GPT-OSS's, a logit per head that takes a share of each softmax),
    which SDPA cannot take either: such layers run eager attention on additive masks too."""

    embed_tokens: nn.Module
    layers: nn.ModuleList
    rotary_emb: nn.Module
    norm: nn.Module
    lm_head: nn.Module
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    blocks_over_window: bool = False
    nope_layers: tuple[int, ...] = ()
    logit_scale: float | None = None  # a factor on the head's logits (Cohere's), where the stock model applies one
    blocks_on_full: bool = True
    kv_sources: tuple[int | None, ...] = ()
    per_layer: nn.Module | None = None
    attention_chunk: int | None = None
    embed_scale: float | None = None
    sinks: bool = False

    @classmethod
    def of(cls, causal_lm: nn.Module) -> DecoderParts:
        """Locate the parts of a transformers *ForCausalLM with a `.model` backbone (Llama, Qwen2, Mistral...)."""
        backbone = getattr(causal_lm, "model", None)
        needed = ("embed_tokens", "layers", "rotary_emb")
        normed = backbone is not None and any(hasattr(backbone, n) for n in FINAL_NORMS)
        if not normed or not all(hasattr(backbone, n) for n in needed) or not hasattr(causal_lm, "lm_head"):
            raise ValueError(
                f"unsupported language model class {type(causal_lm).__name__}: expected a Llama-style "
                "*ForCausalLM with .model.{embed_tokens,layers,rotary_emb,norm} and .lm_head"
            )
        return cls.of_backbone(backbone, causal_lm.lm_head)

    @classmethod
    def of_backbone(cls, lm: nn.Module, lm_head: nn.Module) -> DecoderParts:
        """The parts of a transformers decoder backbone (`.embed_tokens`, `.layers`, `.rotary_emb`, `.norm`) and its
        output head, with each layer's kind read from its config: `layer_types` where it has them (Qwen2, Gemma 3),
        else every layer sliding where it has a `sliding_window` (Mistral), else every layer full. The runtime hands
        every layer its own mask, causal but for the blocks an adapter gives (`prefill(blocks=)`), so a config's
        `use_bidirectional_attention` (PaliGemma sets it, and builds its prefix's mask itself) changes nothing here.
        A Cohere 2 decoder (Aya Vision's) rotates queries and keys on its sliding layers only, as does an EXAONE 4
        with sliding layers (EXAONE 4.5's)."""
        cfg = getattr(lm, "config", None)
        window = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * len(lm.layers)
        if "sliding_attention" in types and not window:
            raise ValueError("the config has sliding-window layers but no sliding_window")
        chunk = getattr(cfg, "attention_chunk_size", None) if "chunked_attention" in types else None
        if "chunked_attention" in types and not chunk:
            raise ValueError("the config has chunked-attention layers but no attention_chunk_size")
        types = tuple(types[: len(lm.layers)])
        # Cohere 2 rotates on its sliding layers only, and so does EXAONE 4 where it has sliding layers
        nope = getattr(cfg, "model_type", None) == "cohere2" or (getattr(cfg, "model_type", None) == "exaone4"
                                                                  and "sliding_attention" in types)
        final_norm = next((getattr(lm, n) for n in FINAL_NORMS if hasattr(lm, n)), None)
        if final_norm is None:
            raise ValueError(f"{type(lm).__name__} has no final norm that the runtime knows (one of {FINAL_NORMS})")
        gemma4 = getattr(cfg, "model_type", None) == "gemma4_text"
        return cls(lm.embed_tokens, lm.layers, lm.rotary_emb, final_norm, lm_head, types,
                   window if "sliding_attention" in types else None, getattr(cfg, "attn_logit_softcapping", None),
                   getattr(cfg, "final_logit_softcapping", None),
                   nope_layers=tuple(i for i, t in enumerate(types) if t == "full_attention") if nope else (),
                   blocks_on_full=not gemma4, kv_sources=_kv_sources(getattr(cfg, "kv_sharing_modes", None), types),
                   per_layer=lm if getattr(cfg, "hidden_size_per_layer_input", None) else None, attention_chunk=chunk,
                   embed_scale=getattr(lm, "embedding_multiplier", None),
                   sinks=any(hasattr(getattr(layer, "self_attn", None), "sinks") for layer in lm.layers))

    def layer_inputs(self, input_ids: torch.Tensor, embeds: torch.Tensor,
                     visual: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, T, layers, P) what each layer takes per token besides the hidden states (Gemma 4's per-layer
        embeddings: the token's own, from input_ids, and a projection of its input embedding `embeds`), or None on a
        decoder without. `visual` (B, T) bool: columns whose own embedding is the pad token's (visual tokens and
        padding, as the stock model gives them)."""
        if self.per_layer is None:
            return None
        if visual is not None:
            input_ids = input_ids.masked_fill(visual, self.per_layer.config.pad_token_id)
        return self.per_layer.project_per_layer_inputs(embeds, self.per_layer.get_per_layer_inputs(input_ids, embeds))

    def scaled(self, embeds: torch.Tensor) -> torch.Tensor:
        """Input embeddings as the first layer takes them: times `embed_scale` where the backbone scales them."""
        return embeds if self.embed_scale is None else embeds * self.embed_scale

    def layer_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A boolean attention mask as the layers take it: itself for SDPA, or, on a decoder whose layers run eager
        attention (a soft-capped one, one with sinks), 0 where a key is seen and the dtype's lowest value where it is
        not."""
        if self.attn_softcap is None and not self.sinks:
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head on final hidden states, scaled where the stock model scales them (`logit_scale`) and
        soft-capped where the decoder caps its logits."""
        out = self.lm_head(hidden)
        if self.logit_scale is not None:
            out = out * self.logit_scale
        if self.final_softcap is not None:
            out = torch.tanh(out / self.final_softcap) * self.final_softcap
        return out

    def is_linear(self, i: int) -> bool:
        """Whether layer i mixes tokens by a recurrence or a convolution (a "linear_attention" layer, Qwen3.5's; a
        "conv" layer, LFM2's short causal convolution) rather than attention."""
        return bool(self.layer_types) and self.layer_types[i] in RECURRENT_LAYERS

    def scoring_layer(self, i: int) -> int:
        """The layer before which a hook asked for before layer i runs: i itself, or, where layer i is a recurrent
        layer (`is_linear`: it has no attention to score tokens with, and every LLM-stage method scores with one),
        the first attention layer after it. Dropping there leaves the tokens in the recurrent layers between,
        which costs a little saving and nothing else. ValueError when no attention layer is at or after i."""
        j = i
        while j < len(self.layers) and self.is_linear(j):
            j += 1
        if j == len(self.layers):
            full = [k for k in range(len(self.layers)) if not self.is_linear(k)]
            raise ValueError(f"LLM layer {i} has no attention layer at or after it to prune before (layers {i} to "
                             f"{len(self.layers) - 1} are recurrent ones, with no attention); the attention layers "
                             f"are {full}")
        return j

    def window(self, i: int) -> int | None:
        """Layer i's sliding window, or None for a full-attention layer."""
        return self.sliding_window if self.layer_types and self.layer_types[i] == "sliding_attention" else None

    def chunk(self, i: int) -> int | None:
        """Layer i's attention chunk (`attention_chunk`) on a chunked-attention layer, else None."""
        return self.attention_chunk if self.layer_types and self.layer_types[i] == "chunked_attention" else None

    def position_embeddings(self, h: torch.Tensor, position_ids: torch.Tensor) -> list:
        """Each layer's (cos, sin) for `position_ids` (Llama 4's: complex frequencies): one rotary embedding for all,
        or, for a rotary embedding that takes a `layer_type` (Gemma 3: local and global layers rotate at different
        bases), one per kind of layer; the identity rotation on `nope_layers`."""
        if not _takes_layer_type(type(self.rotary_emb)):
            pe = self.rotary_emb(h, position_ids=position_ids)
            out = [pe] * len(self.layers)
        else:
            types = self.layer_types or ("full_attention",) * len(self.layers)
            per_type = {t: self.rotary_emb(h, position_ids=position_ids, layer_type=t) for t in dict.fromkeys(types)}
            out = [per_type[t] for t in types]
        if self.nope_layers:
            cos, sin = out[0]
            none = (torch.ones_like(cos), torch.zeros_like(sin))
            out = [none if i in self.nope_layers else pe for i, pe in enumerate(out)]
        return out


def _kv_sources(modes, types: tuple[str, ...]) -> tuple[int | None, ...]:
    """Per layer, the layer whose keys and values it reuses (a "reuse" layer of Gemma 4's `kv_sharing_modes`: the
    last layer of its kind that stores them), None for the others; () without sharing."""
    if not modes or "reuse" not in modes:
        return ()
    stored, out = {}, []
    for i, (mode, kind) in enumerate(zip(modes, types)):
        if mode == "reuse":
            if kind not in stored:
                raise ValueError(f"layer {i} reuses the keys of an earlier {kind} layer, but none stores them")
            out.append(stored[kind])
        else:
            out.append(None)
            if mode == "store":
                stored[kind] = i
    return tuple(out)


@functools.cache
def _takes_layer_type(rotary_cls: type) -> bool:
    return "layer_type" in inspect.signature(rotary_cls.forward).parameters


@dataclass
class CacheState:
    """Bookkeeping that travels with the KV cache once tokens were dropped.

    key_valid[l]: (B, S_l) bool, which cached keys of layer l are real (not padding); key_positions[l]: (B, S_l)
    their positions (what a sliding window is counted in); next_position: (B,) RoPE position of the next token;
    seen: input_ids columns consumed so far. A sliding-window cache layer keeps only its last keys: the two lists
    keep as many columns as it does.
    """

    key_valid: list[torch.Tensor]
    next_position: torch.Tensor
    seen: int
    key_positions: list[torch.Tensor] | None = None
    token_inputs: tuple[str, ...] = ()  # the per-token inputs the layers took in prefill (new tokens get zeros)


_STATE_ATTR = "_meteor_state"


def get_state(cache) -> CacheState | None:
    return None if cache is None else getattr(cache, _STATE_ATTR, None)


@dataclass
class LLMLayerContext:
    """What a method sees before LLM layer `layer_idx` during prefill.

    layer: the layer the method scores with and drops before: layer `layer_idx`, or, where that is a recurrent
    layer, the first attention layer after it (`DecoderParts.scoring_layer`), whose input `hidden` is then.
    hidden: (B, T, D) the layer's input; valid: (B, T) real tokens; visual: (B, T) visual tokens;
    positions: (B, T) RoPE positions; query_index: (B,) column of the text query token (the last
    instruction token); text_query_mask: (B, T) real text tokens up to and including the query token
    (methods that want only the text after the first image, like METEOR's "text" query, restrict it);
    llm_visual_tokens: (B,) visual tokens that entered the LLM (before any stage-3 drop). With multimodal RoPE
    (Qwen2-VL), positions holds each token's first (temporal) component, a text token's own position.
    shared_keys: on a layer that reuses an earlier layer's keys (Gemma 4's KV-shared layers, `DecoderParts.kv_sources`),
    those keys, (B, KV_heads, T, head_dim) with RoPE applied, for the current columns; None elsewhere.
    """

    layer_idx: int
    num_layers: int
    layer: nn.Module
    hidden: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor
    positions: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    query_index: torch.Tensor
    text_query_mask: torch.Tensor
    llm_visual_tokens: torch.Tensor
    shared_keys: torch.Tensor | None = None

    def key_states(self, normed: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, KV_heads * head_dim) this layer's keys of its normed input (`normed`, if the caller has it),
        before RoPE: the key projection, and the attention's per-head key norm where it has one (Qwen3's
        `k_norm`). On a layer that reuses an earlier layer's keys (`shared_keys`), those keys, RoPE undone."""
        attn = self.layer.self_attn
        if self.shared_keys is not None:
            cos, sin = self.position_embeddings
            k = _rotate_one(type(attn), self.shared_keys, cos, -sin)  # the inverse rotation
            return k.transpose(1, 2).flatten(2)
        k = _projection(attn, "k", _input_norm(self.layer)(self.hidden) if normed is None else normed)
        return _head_norm(attn, "k", k)

    def attention_rows(self, query_index: torch.Tensor, query_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Per-head attention of a few query rows over all current tokens, from this layer's own q/k.

        Computes only the Q rows asked for (RoPE applied, GQA heads repeated, causal and padding masks),
        never the T x T map and without switching the layer to eager attention. On a sliding-window layer the
        window is not applied: a query scores every token before it, as on a global layer (Gemma 3 scores on
        its local layers too, and tokens outside the window would otherwise all score 0 and be dropped).

        Args:
            query_index: (B, Q) long column indices of the query tokens.
            query_valid: (B, Q) bool, False for padded query slots (their rows come back as zeros).
        Returns:
            (B, H, Q, T) float32 probabilities.
        """
        attn = self.layer.self_attn
        normed = _input_norm(self.layer)(self.hidden)
        B, T, _ = normed.shape
        hd = attn.head_dim
        pe = self.position_embeddings
        rows = ops.gather_tokens(normed, query_index)
        q = _head_norm(attn, "q", _queries(attn, rows)).view(B, rows.shape[1], -1, hd).transpose(1, 2)
        pe_rows = ops.gather_tokens(pe, query_index) if torch.is_tensor(pe) else tuple(
            ops.gather_tokens(t, query_index) for t in pe)
        q = _rotated(attn, q, pe_rows)
        if self.shared_keys is not None:
            k = self.shared_keys.to(q.dtype)
        else:
            k = _rotated(attn, self.key_states(normed).view(B, T, -1, hd).transpose(1, 2), pe)
        if hasattr(attn, "qk_norm"):  # Llama 4's: after RoPE, on its rotating layers
            q, k = attn.qk_norm(q), attn.qk_norm(k)
        if hasattr(attn, "query_layernorm"):  # HunYuan's: per-head norms after RoPE
            q, k = attn.query_layernorm(q), attn.key_layernorm(k)
        beta = (getattr(getattr(attn, "config", None), "rope_parameters", None) or {}).get("llama_4_scaling_beta")
        if beta:  # Ministral 3's queries, scaled by their positions (from its `original_max_position_embeddings` on)
            at = ops.gather_tokens(self.positions, query_index).float()
            span = attn.config.rope_parameters["original_max_position_embeddings"]
            q = (q * (1 + beta * torch.log1p(torch.floor(at / span)))[:, None, :, None]).to(q.dtype)
        if getattr(attn, "attn_temperature_tuning", False) and not attn.use_rope:  # Llama 4's NoPE layers
            # the layer's own factor, by column (it counts the columns before a query, not its position)
            scale = torch.log1p(torch.floor((query_index.float() + 1.0) / attn.floor_scale)) * attn.attn_scale + 1.0
            q = (q * scale[:, None, :, None]).to(q.dtype)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        cols = torch.arange(T, device=normed.device)
        key_mask = self.valid[:, None, :] & (cols[None, None, :] <= query_index[:, :, None])
        out = ops.attention_rows(q, k, attn.scaling, key_mask, getattr(attn, "attn_logit_softcapping", None),
                                 getattr(attn, "sinks", None))
        if query_valid is not None:
            out = out * query_valid[:, None, :, None]
        return out


@dataclass
class LLMMerge:
    """A stage-3 answer that recycles dropped visual tokens into new ones (SparseVLM) besides dropping.

    keep: (B, T) bool, the columns kept as they are; merged: (B, M, D) new hidden states for this layer's
    input; at: (B, M) long, the column each merged token takes the place of: a visual column the answer
    drops, whose RoPE position (and grid cell, for `kept_grid`) the merged token takes; -1 marks an empty
    slot of a sample that merges fewer tokens than others.
    """

    keep: torch.Tensor
    merged: torch.Tensor
    at: torch.Tensor


def place_merged(answer: LLMMerge, hidden: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor):
    """(hidden with each merged token written at its column, the keep mask with those columns added).
    ValueError unless every `at` is a distinct, real visual column that `keep` drops."""
    keep, at = answer.keep, answer.at
    B, T = keep.shape
    if answer.merged.shape[:2] != at.shape or at.shape[0] != B:
        raise ValueError(f"LLMMerge: merged {tuple(answer.merged.shape)} and at {tuple(at.shape)} disagree")
    slot = at >= 0
    if (at >= T).any():
        raise ValueError(f"LLMMerge: a column in `at` is past the sequence ({T} columns)")
    placed = torch.zeros(B, T + 1, dtype=torch.long, device=keep.device)
    placed.scatter_add_(1, torch.where(slot, at, T), slot.long())
    placed = placed[:, :T]
    if (placed > 1).any():
        raise ValueError("LLMMerge: two merged tokens take the place of the same column")
    placed = placed.bool()
    if (placed & ~(valid & visual & ~keep)).any():
        raise ValueError("LLMMerge: a merged token must take the place of a real visual column the answer drops")
    rows = torch.arange(B, device=keep.device)[:, None].expand_as(at)
    hidden = hidden.clone()
    hidden[rows[slot], at[slot]] = answer.merged[slot].to(hidden.dtype)
    return hidden, keep | placed


def _input_norm(layer: nn.Module) -> nn.Module:
    """A decoder layer's norm before its token mixer: `input_layernorm`, LFM2's `operator_norm`, Apertus's
    `attention_layernorm`, or none (the identity) in a post-norm layer (EXAONE 4's and OLMo 2's norms come after
    their attention and their MLP)."""
    for name in ("input_layernorm", "operator_norm", "attention_layernorm"):
        norm = getattr(layer, name, None)
        if norm is not None:
            return norm
    if hasattr(layer, "post_feedforward_layernorm"):
        return nn.Identity()
    raise ValueError(f"{type(layer).__name__} has no norm before its attention that the runtime knows")


def _head_norm(attn: nn.Module, which: str, x: torch.Tensor) -> torch.Tensor:
    """(..., heads * head_dim) projected queries (`which` "q") or keys ("k") through the attention's norm of them
    before RoPE (Qwen3's `q_norm` / `k_norm`, LFM2's `q_layernorm` / `k_layernorm`: an RMSNorm over each head's dims;
    OLMo 2's over all heads' together, its weight as wide as the projection; StableLM's a LayerNorm per head), or as they
    are where it has none."""
    norm = getattr(attn, f"{which}_norm", None) or getattr(attn, f"{which}_layernorm", None)
    if norm is None:
        return x
    weight = getattr(norm, "weight", None)
    if weight is not None and weight.shape[-1] == x.shape[-1] != attn.head_dim:
        return norm(x)
    heads = x.view(*x.shape[:-1], -1, attn.head_dim)
    if isinstance(getattr(norm, "norms", None), nn.ModuleList):  # one norm per head, heads first (StableLM's)
        return norm(heads.transpose(-2, -3)).transpose(-2, -3).flatten(-2)
    return norm(heads).flatten(-2)


def _projection(attn: nn.Module, which: str, x: torch.Tensor) -> torch.Tensor:
    """The attention's query (`which` "q") or key ("k") projection of x: its `q_proj` / `k_proj`, or that part of a
    fused `qkv_proj` (Phi-3's: all query heads, then the key heads, then the value heads)."""
    fused = getattr(attn, "qkv_proj", None)
    if fused is None:
        return getattr(attn, f"{which}_proj")(x)
    cfg = attn.config
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    q, k, _ = fused(x).split([cfg.num_attention_heads * attn.head_dim, kv * attn.head_dim, kv * attn.head_dim], -1)
    return q if which == "q" else k


def _queries(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(..., heads * head_dim) the attention's query projection of x, without the output gate that a gated
    attention's projection (Qwen3.5's, Qwen3-Next's: twice as wide, each head's query then its gate) also holds."""
    q = _projection(attn, "q", x)
    heads = getattr(getattr(attn, "config", None), "num_attention_heads", None)
    if heads is not None and q.shape[-1] == 2 * heads * attn.head_dim:
        q = q.view(*q.shape[:-1], heads, 2 * attn.head_dim)[..., : attn.head_dim].flatten(-2)
    return q


def _apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
    """Llama's RoPE: dimension i paired with i + d/2."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@functools.cache
def _apply_rotary_of(attention_cls: type) -> Callable:
    """The `apply_rotary_pos_emb(q, k, cos, sin)` of the transformers module an attention class is defined in,
    the one its forward calls: most pair dimension i with i + d/2 (Llama's); Cohere's pairs neighbours (2i, 2i + 1),
    its rotary embedding interleaving cos and sin to match; GLM-4's and GLM-4V's pair neighbours and rotate only
    the first part of each head, as long as cos is. Llama's where the module has none."""
    return getattr(sys.modules.get(attention_cls.__module__), "apply_rotary_pos_emb", _apply_rotary)


def _rotate_one(attention_cls: type, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(B, H, T, d) x rotated as the attention class's module rotates its queries and keys: its
    `apply_rotary_pos_emb` rotates a pair (q, k) in most modules, one tensor in Gemma 4's."""
    rotate = _apply_rotary_of(attention_cls)
    if next(iter(inspect.signature(rotate).parameters)) == "x":  # one tensor (Gemma 4's)
        return rotate(x, cos, sin)
    return rotate(x, x[:, :1], cos, sin)[0]  # a pair; the second here is one head, not a copy of all


def _rotated(attn: nn.Module, x: torch.Tensor, pe) -> torch.Tensor:
    """(B, H, T, d) queries or keys x rotated as attention module `attn` rotates them by its position embeddings `pe`
    for those T rows: (cos, sin) through its module's own rotation (`_rotate_one`; on the first `rotary_ndims` of each
    head where the module rotates only those), or Llama 4's complex frequencies
    (B, T, d/2) on neighbouring dimensions; none on a layer that does not rotate (Llama 4's NoPE layers)."""
    if not getattr(attn, "use_rope", True):
        return x
    if torch.is_tensor(pe) and pe.is_complex():
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * pe[:, None]).flatten(-2).type_as(x)
    cos, sin = pe
    n = getattr(attn, "rotary_ndims", None)  # Phi's, StableLM's: the first n dimensions of each head rotate, the rest not
    if n is not None and n < x.shape[-1]:
        return torch.cat([_rotate_one(type(attn), x[..., :n], cos, sin), x[..., n:]], dim=-1)
    return _rotate_one(type(attn), x, cos, sin)


def positions_from_mask(valid: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE positions of a (left-)padded batch: running count of real tokens (padding gets 0)."""
    pos = valid.long().cumsum(1) - 1
    if start is not None:
        pos = pos + start[:, None]
    return pos.clamp_min(0).masked_fill(~valid, 0)


def _per_token(valid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """valid (B, T) shaped to broadcast over positions (B, T) or (B, T, 3)."""
    return valid.view(*valid.shape, *([1] * (positions.dim() - 2)))


def _rope_ids(positions: torch.Tensor) -> torch.Tensor:
    """The position ids a rotary embedding takes: (B, T), or (3, B, T) for multimodal RoPE."""
    return positions if positions.dim() == 2 else positions.permute(2, 0, 1)


def _text_positions(positions: torch.Tensor) -> torch.Tensor:
    """(B, T) one position per token: the first (temporal) component of multimodal RoPE, which is a text
    token's position (what LLMLayerContext.positions holds and the layers get for flash attention)."""
    return positions if positions.dim() == 2 else positions[..., 0]


def prefill_mask(valid: torch.Tensor, positions: torch.Tensor | None = None, blocks: torch.Tensor | None = None,
                 window: int | None = None, blocks_over_window: bool = False, chunk: int | None = None) -> torch.Tensor:
    """(B, 1, T, T) bool: each row sees the real keys before it, and with `blocks` (B, T) long also those of its own
    block after it (a block id >= 0: Gemma 3's tokens of one image see each other); with a sliding `window`, only
    keys less than `window` positions ((B, T) `positions`) behind it, as transformers' sliding-window masks count,
    except, with `blocks_over_window`, a row's own block, seen whole (PaliGemma 2); with a `chunk` C, only keys of its
    own chunk (position // C equal; Llama 4's chunked layers, which have no blocks). A row always sees itself, so padded
    rows stay finite."""
    T = valid.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)
    sees = causal[None] & valid[:, None, :]
    if window is not None:
        sees = sees & (positions[:, :, None] - positions[:, None, :] < window)
    if chunk is not None:
        sees = sees & (positions[:, :, None] // chunk == positions[:, None, :] // chunk)
    if blocks is not None:
        block = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0) & valid[:, None, :]
        if window is not None and not blocks_over_window:
            block = block & (positions[:, :, None] - positions[:, None, :] < window)
        sees = sees | block
    return (sees | eye[None]).unsqueeze(1)


def compact(keep: torch.Tensor, *tensors: torch.Tensor, fill: int | float = 0) -> tuple[torch.Tensor, ...]:
    """Drop columns per sample and left-pad again, keeping the original order.

    Args:
        keep: (B, T) bool, columns to keep (samples may keep different counts).
        tensors: (B, T, ...) tensors to compact alike.
    Returns:
        (new_valid (B, T'), *compacted tensors (B, T', ...)) with T' = max kept count.
    """
    B, T = keep.shape
    counts = keep.sum(1)
    Tn = int(counts.max()) if B else 0
    cols = torch.arange(T, device=keep.device).expand(B, T)
    order = torch.sort(torch.where(keep, cols, -1), dim=1).values[:, T - Tn :]  # -1 = padding, at the left
    new_valid = order >= 0
    idx = order.clamp_min(0)
    out = [new_valid]
    for t in tensors:
        g = ops.gather_tokens(t, idx)
        if t.dtype == torch.bool:
            g = g & new_valid.view(*new_valid.shape, *([1] * (g.dim() - 2)))
        out.append(g)
    return tuple(out)


LLMHook = Callable[[LLMLayerContext], "torch.Tensor | LLMMerge | None"]


def prefill(
    parts: DecoderParts,
    embeds: torch.Tensor,
    valid: torch.Tensor,
    visual: torch.Tensor,
    query_col: torch.Tensor,
    cache=None,
    hook_layers: set[int] | frozenset[int] = frozenset(),
    hook: LLMHook | None = None,
    positions: torch.Tensor | None = None,
    residuals: list[torch.Tensor] | None = None,
    blocks: torch.Tensor | None = None,
    layer_inputs: torch.Tensor | None = None,
    token_inputs: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """Run all decoder layers on a full sequence, letting `hook` drop visual tokens before chosen layers.

    Args:
        embeds: (B, T, D) input embeddings (text and visual tokens spliced, left-padded).
        valid: (B, T) bool real tokens; visual: (B, T) bool visual tokens.
        query_col: (B,) column of the text query token (never dropped).
        cache: a transformers DynamicCache to fill, or None.
        hook_layers: layers before which `hook` is asked for a keep mask.
        hook: LLMLayerContext -> (B, T) bool keep mask over current columns, an `LLMMerge` (kept columns
            plus merged tokens at dropped columns' places), or None to keep all.
        positions: (B, T) RoPE positions (default: the running count of real tokens), or (B, T, 3) for a
            decoder with multimodal RoPE (Qwen2-VL: temporal, height, width). Tokens pruned before the LLM leave
            gaps here, so the kept ones keep their unpruned positions.
        residuals: (B, T, D) each, the k-th added to the hidden states after layer k (Qwen3-VL's DeepStack: each
            visual token's features from a vision block, zeros elsewhere); they leave with their tokens.
        blocks: (B, T) long, tokens that see each other both ways (Gemma 3: an image's tokens) share an id >= 0;
            -1 elsewhere. None: every layer causal.
        layer_inputs: (B, T, layers, P) what each layer takes per token besides its hidden states
            (`DecoderParts.layer_inputs`, Gemma 4's per-layer embeddings); they leave with their tokens.
        token_inputs: {keyword: (B, T) tensor} per-token inputs every layer takes by that keyword (ERNIE 4.5 VL's
            `moe_mm_token_type_ids`, which experts a token goes to); they leave with their tokens, and decoding gives
            new tokens zeros (text).
    Where a layer reuses an earlier layer's keys and values (`DecoderParts.kv_sources`), those leave with their
    tokens too: dropping at a layer after the one that made them masks them from there on, and the cache (which
    holds them once, in the earlier layer) keeps, for the reusing layer, which of them it still sees.
    Returns:
        hidden (B, T', D) after the final norm, cols (B, T') the original column of each output
        (-1 for padding), and {layer: (B,) visual tokens kept from that layer on}.
    """
    if cache is not None and getattr(cache, "is_compileable", False):
        raise ValueError(f"a {type(cache).__name__} (cache_implementation='static' or similar) cannot hold a pruned "
                         "prompt: its layers have fixed lengths, and pruning leaves each layer its own; use the default "
                         "dynamic cache")
    B, T, _ = embeds.shape
    cols = torch.arange(T, device=embeds.device).expand(B, T).masked_fill(~valid, -1)
    pos = positions_from_mask(valid) if positions is None else positions.masked_fill(~_per_token(valid, positions), 0)
    if parts.sliding_window is not None and pos.dim() != 2:
        raise ValueError("sliding-window layers with multimodal RoPE positions are not supported")
    # decoding goes on after the prompt's last token, as generate does (its position + 1; multimodal RoPE: its
    # largest component, all of them the same for text; not the largest position of the prompt, which a video's
    # temporal positions in Qwen2.5-VL can exceed)
    nxt = (pos[:, -1] if pos.dim() == 2 else pos[:, -1].amax(-1)) + 1
    blocks = None if blocks is None else blocks.masked_fill(~valid, -1)
    h = parts.scaled(embeds)
    mask_kinds = [(parts.window(i), parts.chunk(i)) for i in range(len(parts.layers))]

    def attention_inputs():  # per layer (cos, sin), and the masks by window and chunk, for the columns now present
        masks = {(w, c): parts.layer_mask(prefill_mask(valid, _text_positions(pos),
                                                       blocks if w is not None or parts.blocks_on_full else None, w,
                                                       parts.blocks_over_window, c), h.dtype)
                 for w, c in dict.fromkeys(mask_kinds)}
        return parts.position_embeddings(h, _rope_ids(pos)), masks

    pe, masks = attention_inputs()
    kept: dict[int, torch.Tensor] = {}
    key_valid, key_positions = [], []
    entered = (visual & valid).sum(1)
    asked: dict[int, list[int]] = {}  # the layer each hook runs before, and the layers it was asked for there
    for i in sorted(hook_layers) if hook is not None else ():
        asked.setdefault(parts.scoring_layer(i), []).append(i)
    shared: dict = {}  # the keys and values a layer stores for later ones to reuse, by kind of layer (Gemma 4's)
    made_at: dict[int, torch.Tensor] = {}  # the columns present when a layer that stores them ran
    for i, layer in enumerate(parts.layers):
        source = parts.kv_sources[i] if parts.kv_sources else None
        for wanted in asked.get(i, ()):
            qidx = (cols == query_col[:, None]).long().argmax(1)
            text_q = valid & ~visual & (cols <= query_col[:, None])
            ctx = LLMLayerContext(wanted, len(parts.layers), layer, h, valid, visual, _text_positions(pos), pe[i], qidx,
                                  text_q, entered,
                                  None if source is None else shared[parts.layer_types[i]][0])
            keep = hook(ctx)
            if isinstance(keep, LLMMerge):
                h, keep = place_merged(keep, h, valid, visual)
            if keep is not None:
                if (~keep & valid & ~visual).any():
                    raise ValueError(f"layer {i}: a method tried to drop text tokens; only visual tokens may be dropped")
                residuals, n = residuals or [], len(residuals or [])
                extra = ([] if blocks is None else [blocks]) + ([] if layer_inputs is None else [layer_inputs])
                extra += list((token_inputs or {}).values())
                kv = [t.transpose(1, 2) for pair in shared.values() for t in pair]  # (B, T, heads, d) each
                valid, h, pos, visual, cols, *rest = compact(keep & valid, h, pos, visual, cols, *residuals, *extra,
                                                             *kv)
                residuals, rest = rest[:n], rest[n:]
                if blocks is not None:
                    blocks, rest = rest[0], rest[1:]
                if layer_inputs is not None:
                    layer_inputs, rest = rest[0], rest[1:]
                if token_inputs:
                    token_inputs, rest = dict(zip(token_inputs, rest)), rest[len(token_inputs):]
                shared = {kind: (rest[2 * j].transpose(1, 2), rest[2 * j + 1].transpose(1, 2))
                          for j, kind in enumerate(shared)}
                cols = cols.masked_fill(~valid, -1)
                pe, masks = attention_inputs()
                kept[i] = (visual & valid).sum(1)
        h = layer(
            h,
            attention_mask=valid if parts.is_linear(i) else masks[mask_kinds[i]],
            position_ids=_text_positions(pos),
            **{cache_arg(type(layer)): cache},
            use_cache=cache is not None,
            position_embeddings=pe[i],
            **_layer_extras(type(layer), layer_inputs, i, shared),
            **(token_inputs or {}),
        )
        if residuals and i < len(residuals):
            h = h + residuals[i].to(h.dtype)
        if source is None:
            made_at[i] = cols
            key_valid.append(valid)
            key_positions.append(_text_positions(pos))
        else:  # its keys are those its source cached: which of them it still sees
            seen = (made_at[source][:, :, None] == cols[:, None, :]) & (cols >= 0)[:, None, :]
            key_valid.append(key_valid[source] & seen.any(-1))
            key_positions.append(key_positions[source])
    if cache is not None:
        state = CacheState(key_valid, nxt, seen=0, key_positions=key_positions, token_inputs=tuple(token_inputs or ()))
        _match_cache(state, cache, parts.kv_sources)
        setattr(cache, _STATE_ATTR, state)
    return parts.norm(h), cols, kept


def _match_cache(state: CacheState, cache, kv_sources: tuple[int | None, ...] = ()) -> None:
    """Keep, per layer, as many key columns in `state` as the cache holds (a sliding-window cache layer keeps only
    its last keys; the others keep all); a layer that reuses another's keys (`kv_sources`) as many as that one's."""
    layers = getattr(cache, "layers", None)
    for i, kv in enumerate(state.key_valid):
        j = kv_sources[i] if kv_sources and kv_sources[i] is not None else i
        keys = getattr(layers[j], "keys", None) if layers is not None and j < len(layers) else None
        if keys is not None and keys.dim() >= 2 and keys.shape[-2] < kv.shape[1]:
            n = keys.shape[-2]
            state.key_valid[i] = kv[:, kv.shape[1] - n :]
            state.key_positions[i] = state.key_positions[i][:, kv.shape[1] - n :]


def at_columns(hidden: torch.Tensor, cols: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """(B, W, D) for each of the `wanted` (B, W) columns of the sequence given to `prefill`, the output of the
    last column still present at or before it (a dropped visual column reads as the token before it), or
    zeros where none is (a dropped column before any real token, or padding).

    hidden: (B, T', D) and cols: (B, T'), as `prefill` returns them (-1 on padding, increasing)."""
    src = torch.searchsorted(cols.contiguous(), wanted.contiguous(), right=True) - 1
    found = (src >= 0) & (cols.gather(1, src.clamp_min(0)) >= 0)
    return ops.gather_tokens(hidden, src.clamp_min(0)) * found[..., None]


def refuse_layer_outputs(kwargs: dict, who: str) -> None:
    """ValueError when a caller asks for per-layer outputs (`output_attentions` / `output_hidden_states` true):
    the runtime runs the decoder layer by layer on a sequence it shortens and collects neither, so they are
    refused, not answered with None."""
    asked = [k for k in ("output_attentions", "output_hidden_states") if kwargs.get(k)]
    if asked:
        raise ValueError(f"{' and '.join(asked)} {'are' if len(asked) > 1 else 'is'} not supported by {who}: it "
                         "returns the logits and the cache only (no per-layer hidden states or attention maps)")


def prompt_query(input_ids: torch.Tensor | None, model_kwargs: dict) -> dict:
    """`generate`'s model kwargs with `query_positions` set to the prompt's last column unless the caller gave it,
    so that every forward of the generation chooses with the prompt's query: the prefill with the KV cache (where it
    is the default anyway) and each step's whole sequence without it (`use_cache=False`), which would otherwise
    take the newest token as the query and prune differently at each step."""
    if input_ids is None or model_kwargs.get("query_positions") is not None:
        return model_kwargs
    return {**model_kwargs, "query_positions": input_ids.shape[1] - 1}


def generation_inputs(input_ids, cache, attention_mask, kwargs: dict, is_image_input: Callable[[str], bool]) -> dict:
    """What `generate` hands a pruning-aware forward at each step: the whole prompt with its images (and
    `query_positions`) while the cache is empty, afterwards only the input_ids columns the cache has not
    seen (pruned caches are shorter than the sequence, so the cache's length cannot tell)."""
    state = get_state(cache)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache,
              "use_cache": kwargs.get("use_cache", True)}
    if kwargs.get("logits_to_keep") is not None:
        inputs["logits_to_keep"] = kwargs["logits_to_keep"]
    inputs.update({k: True for k in ("output_attentions", "output_hidden_states") if kwargs.get(k)})  # refused there
    if state is not None:
        inputs["input_ids"] = input_ids[:, state.seen :]
    else:
        inputs.update({k: v for k, v in kwargs.items() if (is_image_input(k) or k == "query_positions") and v is not None})
    return inputs


def images_for_expanded_rows(image_rows: torch.Tensor, batch_size: int, expand_size: int) -> torch.Tensor:
    """(num_images * expand_size,) long: which image each slot of a beam-expanded batch takes. generate repeats
    every prompt's row `expand_size` times; each copy needs that prompt's images as a group, in order
    (`image_rows`: (num_images,) the prompt of each image)."""
    order = [i for b in range(batch_size) for _ in range(expand_size) for i in (image_rows == b).nonzero()[:, 0].tolist()]
    return torch.tensor(order, dtype=torch.long, device=image_rows.device)


@functools.cache
def _takes(module_cls: type, name: str) -> bool:
    return name in inspect.signature(module_cls.forward).parameters


def _layer_extras(layer_cls: type, layer_inputs: torch.Tensor | None, i: int, shared: dict) -> dict:
    """What a decoder layer takes besides the usual arguments: its per-layer input (Gemma 4's, from (B, T, layers, P)
    `layer_inputs`) and the dict through which layers hand on keys and values to reuse (Gemma 4's `shared_kv_states`:
    its storing layers write it even where none reuses them)."""
    extras = {}
    if layer_inputs is not None:
        extras["per_layer_input"] = layer_inputs[:, :, i]
    if _takes(layer_cls, "shared_kv_states"):
        extras["shared_kv_states"] = shared
    return extras


def cache_arg(module_cls: type) -> str:
    """The keyword a transformers module takes its KV cache by: `cache` from transformers 5.24 on,
    `past_key_values` before (the old name still works there, with a deprecation warning)."""
    return "cache" if _takes(module_cls, "cache") else "past_key_values"


def decode(parts: DecoderParts, embeds: torch.Tensor, new_valid: torch.Tensor, cache,
           layer_inputs: torch.Tensor | None = None) -> torch.Tensor:
    """Run new tokens through all layers against a cache filled by `prefill` (possibly pruned).

    Args:
        embeds: (B, q, D) embeddings of the new tokens; new_valid: (B, q) bool.
        cache: the DynamicCache that prefill filled (it carries a CacheState).
        layer_inputs: (B, q, layers, P) the new tokens' per-layer inputs (`DecoderParts.layer_inputs`), if any.
        A layer that reuses an earlier layer's keys (`DecoderParts.kv_sources`) sees that layer's cached keys and the
        new ones, masked as prefill left them for it.
    Returns:
        (B, q, D) hidden states after the final norm.
    """
    state = get_state(cache)
    if state is None:
        raise ValueError("decode needs a cache filled by prefill")
    B, q, _ = embeds.shape
    pos = positions_from_mask(new_valid, state.next_position)
    pe = parts.position_embeddings(embeds, pos)
    tri = torch.ones(q, q, dtype=torch.bool, device=embeds.device).tril()
    eye = torch.eye(q, dtype=torch.bool, device=embeds.device)
    new_block = (tri[None] & new_valid[:, None, :]) | eye[None]  # (B, q, q)
    h = parts.scaled(embeds)
    shared: dict = {}
    for i, layer in enumerate(parts.layers):
        if parts.is_linear(i):  # no keys: its state holds only real tokens; padding among new ones is zeroed
            mask = None if new_valid.all() else new_valid
        else:
            past = state.key_valid[i][:, None, :].expand(B, q, -1)
            window, chunk = parts.window(i), parts.chunk(i)
            block = new_block
            if window is not None:  # keys less than `window` positions behind each new token
                past = past & (pos[:, :, None] - state.key_positions[i][:, None, :] < window)
                block = block & ((pos[:, :, None] - pos[:, None, :] < window) | eye[None])
            if chunk is not None:  # keys of each new token's own chunk
                past = past & (pos[:, :, None] // chunk == state.key_positions[i][:, None, :] // chunk)
                block = block & ((pos[:, :, None] // chunk == pos[:, None, :] // chunk) | eye[None])
            mask = parts.layer_mask(torch.cat([past, block], dim=-1).unsqueeze(1), h.dtype)
            state.key_valid[i] = torch.cat([state.key_valid[i], new_valid], dim=1)
            state.key_positions[i] = torch.cat([state.key_positions[i], pos], dim=1)
        h = layer(h, attention_mask=mask, position_ids=pos, **{cache_arg(type(layer)): cache}, use_cache=True,
                  position_embeddings=pe[i], **_layer_extras(type(layer), layer_inputs, i, shared),
                  **{name: torch.zeros_like(new_valid, dtype=torch.long) for name in state.token_inputs})
    _match_cache(state, cache, parts.kv_sources)
    state.next_position = state.next_position + new_valid.long().sum(1)
    return parts.norm(h)


def decode_new_tokens(parts: DecoderParts, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache) -> torch.Tensor:
    """`decode` for a model's forward after the prefill: input_ids (B, q) are the new tokens only, the bool
    attention_mask may span the whole sequence; the cache's state counts them as seen. Returns (B, q, D)."""
    embeds = parts.embed_tokens(input_ids)
    hidden = decode(parts, embeds, attention_mask[:, -input_ids.shape[1] :], cache, parts.layer_inputs(input_ids, embeds))
    get_state(cache).seen += input_ids.shape[1]
    return hidden
