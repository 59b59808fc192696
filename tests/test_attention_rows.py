"""Scores computed from one query row equal the rows of the eager attention map."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel

import meteor_vlm as mv
from meteor_vlm.methods.base import EncoderPoint
from meteor_vlm.models.runtime import DecoderParts, LLMLayerContext


def test_cls_row_and_received_attention_equal_eager_map(tiny, images):
    model, processor = tiny
    runner = model.runners[model.expert_names.index("clip")]
    pixels = processor(images=[images[0], images[1]], text=["a", "b"])["pixel_values_clip"]
    eager = CLIPVisionModel(runner.module.config.__class__(**runner.module.config.to_dict()))
    eager.config._attn_implementation = "eager"
    eager.load_state_dict(runner.module.state_dict())
    with torch.no_grad():
        maps = eager(pixels, output_attentions=True).attentions  # per layer (B, H, N, N)
        x = runner.embed(pixels)
        for i in range(runner.num_blocks):
            x_in, x = x, runner.run_block(i, x)
            ctx = EncoderPoint("clip", 0, "clip", 0, i, x, x_in, True, runner)
            torch.testing.assert_close(ctx.cls_attention(), maps[i][:, :, 0, 1:].mean(1), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(ctx.received_attention(), maps[i].mean((1, 2))[:, 1:], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("decoder", ["project", "qwen2", "qwen3", "gemma3_text", "gemma2", "cohere2", "glm4", "lfm2",
                                     "exaone4", "llama4_text", "granite", "phi3", "olmo2", "phi", "stablelm", "apertus",
                                     "ministral3", "gpt_oss"])
def test_llm_attention_rows_equal_eager_map_rows_with_rope_and_gqa(tiny, decoder):
    """On the project's Llama, a Qwen2 (biased q/k/v), a Qwen3 (per-head q/k norms before RoPE), a Gemma 3 text
    decoder (its own attention scale, local and global layers at different RoPE bases; a window longer than the
    sequence, which attention_rows does not apply) and a Gemma 2 (its attention logits soft-capped, here at 1 so
    that the cap binds) and a Cohere 2 (Aya Vision's: neighbouring dimensions rotated together, on its sliding
    layers only) and a GLM-4 (GLM-4.1V's decoder: neighbouring dimensions, half of each head rotated) and an LFM2
    (LFM2-VL's: its own names for the norms, `operator_norm` before the mixer and `q_layernorm` / `k_layernorm`;
    short convolutions at layers 1 and 2, attention at 0 and 3) and a Llama 4 (complex RoPE, a q/k norm after it,
    chunked layers, a layer without RoPE whose queries are scaled by the column's temperature) and a Granite (its own
    attention scale) and a Phi-3 (one fused q/k/v projection) and an OLMo 2 (post-norm; q/k norms over all heads
    together) and a Phi (a quarter of each head rotated, LayerNorms over each head's queries and keys, its final norm
    `final_layernorm`) and a StableLM (a quarter rotated, a LayerNorm per head) and an Apertus (its norm before the
    attention `attention_layernorm`) and a Ministral 3 (its queries scaled by their positions, here from position 4
    on) and a GPT-OSS (a learned sink per head that takes a share of each softmax; sliding layers); and the keys
    `key_states` gives (DART's) are the ones the layer's attention computes before RoPE."""
    model, _ = tiny
    lm_sdpa = model.language_model
    cfg = lm_sdpa.config.__class__(**lm_sdpa.config.to_dict())
    if decoder != "project":
        extra = dict(query_pre_attn_scalar=24, sliding_window=16,
                     layer_types=["sliding_attention", "full_attention"] * 2) if decoder.startswith("gemma") else {}
        if decoder == "cohere2":
            extra = dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2)
        if decoder == "glm4":
            extra = dict(pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "partial_rotary_factor": 0.5})
        if decoder == "gemma2":
            extra.update(attn_logit_softcapping=1.0, query_pre_attn_scalar=1)
        if decoder == "exaone4":  # post-norm layers, q/k norms, no rotation on its full-attention layers
            extra = dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2)
        if decoder == "llama4_text":  # complex RoPE on neighbouring dimensions, then a weightless q/k norm; layer 3
            # rotates nothing and scales its queries by a factor of the column (it binds from column 3 on here)
            extra = dict(no_rope_layers=[1, 1, 1, 0], attention_chunk_size=16, floor_scale=4, attn_scale=0.5,
                         num_local_experts=2, interleave_moe_layer_step=2, intermediate_size_mlp=128)
        if decoder == "lfm2":
            extra = dict(layer_types=["full_attention", "conv", "conv", "full_attention"], block_auto_adjust_ff_dim=False)
        if decoder == "granite":
            extra = dict(attention_multiplier=0.5, embedding_multiplier=3.0, residual_multiplier=0.5)
        if decoder in ("phi", "stablelm"):
            extra = dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                         **({"qk_layernorm": True} if decoder == "phi" else {"use_qk_layernorm": True}))
        if decoder == "gpt_oss":
            extra = dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        if decoder == "ministral3":
            extra = dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "llama_4_scaling_beta": 0.5,
                                          "original_max_position_embeddings": 4})
        if decoder == "phi3":
            extra = dict(pad_token_id=0)
        width = 128 if decoder in ("phi", "stablelm") else 64  # their heads are width / heads wide, whatever head_dim
        cfg = AutoConfig.for_model(decoder, vocab_size=64, hidden_size=width, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, head_dim=16, **extra)
    cfg._attn_implementation = "eager"
    torch.manual_seed(1)
    lm = AutoModelForCausalLM.from_config(cfg).eval()
    if decoder == "project":
        lm.load_state_dict(lm_sdpa.state_dict())
    else:  # norms that are not the identity
        for name, weights in lm.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight", "q_layernorm.weight", "k_layernorm.weight",
                              "operator_norm.weight", "ffn_norm.weight", "attention_layernorm.weight",
                              "self_attn.sinks")) or (
                    ".k_layernorm.norms." in name or ".q_layernorm.norms." in name):
                weights.data.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 13, cfg.hidden_size, generator=g)
    keys = {}  # each layer's keys before RoPE, as its attention computed them
    attending = [i for i, block in enumerate(lm.model.layers) if hasattr(block, "self_attn")]  # the maps are theirs
    hooks = []
    for i in attending:
        attn = lm.model.layers[i].self_attn
        source = getattr(attn, "k_norm", None) or getattr(attn, "k_layernorm", None) or getattr(attn, "k_proj", None)
        if source is None:  # a fused projection: its key heads follow the query heads
            q_width, k_width = cfg.num_attention_heads * attn.head_dim, cfg.num_key_value_heads * attn.head_dim
            hooks.append(attn.qkv_proj.register_forward_hook(
                lambda module, args, qkv, i=i: keys.__setitem__(i, qkv[..., q_width: q_width + k_width])))
        else:  # (B, T, width), or per head: (B, T, heads, head_dim), or heads first (Gemma 3's, Phi's), T = 13
            hooks.append(source.register_forward_hook(lambda module, args, k, i=i: keys.__setitem__(
                i, (k.transpose(1, 2) if k.dim() == 4 and k.shape[1] != 13 else k).flatten(2))))
    with torch.no_grad():
        out = lm(inputs_embeds=embeds, output_attentions=True, output_hidden_states=True)
        for hook in hooks:  # what the runtime computes below runs the same modules
            hook.remove()
        pos = torch.arange(13).expand(2, -1)
        parts = DecoderParts.of(lm)
        for layer in (0, 3):
            h = out.hidden_states[layer]
            pe = parts.position_embeddings(h, pos)[layer]
            valid = torch.ones(2, 13, dtype=torch.bool)
            ctx = LLMLayerContext(layer, cfg.num_hidden_layers, lm.model.layers[layer], h, valid, valid, pos, pe,
                                  torch.tensor([12, 12]), valid, torch.tensor([13, 13]))
            rows = ctx.attention_rows(torch.tensor([[12, 5], [12, 7]]))  # (B, H, 2, T)
            want = out.attentions[attending.index(layer)]
            torch.testing.assert_close(rows[:, :, 0], want[:, :, 12], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(rows[0, :, 1], want[0, :, 5], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(rows[1, :, 1], want[1, :, 7], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(ctx.key_states(), keys[layer], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["glm4.1v", "glm4.5v", "qwen3.5", "paddleocr-vl"])
def test_multimodal_attention_rows_equal_eager_map_rows_at_multimodal_positions(kind):
    """GLM-4.1V's decoder (its rotary embedding interleaves cos and sin over the first half of each head),
    GLM-4.5V's (the first half of each head, dimension i with i + d/2) and Qwen3.5's (interleaved multimodal RoPE on
    half of each head; its query projection also holds each head's output gate; attention layers 2 and 5, between
    linear-attention ones) and PaddleOCR-VL's (Ernie 4.5 with multimodal RoPE), at multimodal positions that repeat
    and jump: the rows equal its eager attention map's."""
    if kind == "qwen3.5":
        model, _ = mv.testing.tiny_qwen2_vl(seed=1, version="3.5")
    elif kind == "paddleocr-vl":
        model, _ = mv.testing.tiny_paddleocr_vl(seed=1)
    else:
        model, _ = mv.testing.tiny_glm4v(seed=1, moe=kind == "glm4.5v")
    lm = model.model.language_model
    lm.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 13, lm.config.hidden_size, generator=g)
    pos = torch.stack([torch.arange(13), torch.arange(13).div(2, rounding_mode="floor"),
                       torch.arange(13) % 4]).expand(2, 3, 13).permute(1, 0, 2) + torch.tensor([0, 3])[None, :, None]
    with torch.no_grad():
        out = lm(inputs_embeds=embeds, position_ids=pos, output_attentions=True, output_hidden_states=True)
        parts = DecoderParts.of_backbone(lm, model.lm_head)
        valid = torch.ones(2, 13, dtype=torch.bool)
        attending = [i for i in range(len(lm.layers)) if not parts.is_linear(i)]  # the maps are theirs, in order
        for layer in (attending[0], attending[-1]):
            h = out.hidden_states[layer]
            pe = parts.position_embeddings(h, pos)[layer]
            ctx = LLMLayerContext(layer, len(lm.layers), lm.layers[layer], h, valid, valid, pos[0], pe,
                                  torch.tensor([12, 12]), valid, torch.tensor([13, 13]))
            rows = ctx.attention_rows(torch.tensor([[12, 5], [12, 7]]))
            want = out.attentions[attending.index(layer)]
            torch.testing.assert_close(rows[:, :, 0], want[:, :, 12], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(rows[1, :, 1], want[1, :, 7], atol=1e-5, rtol=1e-4)
