"""Tiny random models for tests and for checking the library in seconds."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .models.experts import ExpertSpec
from .models.processor import MultiEncoderProcessor, build_word_tokenizer
from .models.vlm import MultiEncoderVLM, MultiEncoderVLMConfig

__all__ = ["tiny_model", "tiny_config", "tiny_llava", "tiny_qwen2_vl", "tiny_glm4v", "tiny_internvl", "tiny_idefics3",
           "tiny_gemma3", "tiny_gemma4", "tiny_llama4", "TinyLlama4Processor", "tiny_hunyuan_vl",
           "tiny_ernie45_vl", "tiny_ovis2_5", "tiny_aya_vision", "tiny_deepseek_vl", "tiny_janus", "tiny_cohere2_vision",
           "tiny_mistral3", "tiny_paligemma", "tiny_lfm2_vl", "tiny_paddleocr_vl", "tiny_video_llama3", "tiny_ovis2",
           "TinyLfm2VlProcessor", "tiny_qwen2_5_omni_thinker", "random_images", "TINY_WORDS",
           "TINY_EXPERTS"]

TINY_WORDS = (
    "what is in the image ? describe color shape how many are there a an of red green blue yellow circle "
    "square triangle yes no left right word written value chart page name date total 0 1 2 3 4 5 6 7 8 9 : ."
).split()


def _expert(kind: str, name: str | None = None) -> ExpertSpec:
    """A small expert of each supported kind (different widths and resolutions on purpose)."""
    name = name or kind
    if kind == "clip":  # ViT with CLS, low resolution: 16 patches
        cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
        return ExpertSpec(name, "clip", 32, cfg)
    if kind == "siglip":  # ViT without CLS: 16 patches
        cfg = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
        return ExpertSpec(name, "siglip", 32, cfg)
    if kind == "pix2struct":  # high-resolution patch ViT: 36 patches
        cfg = dict(
            hidden_size=32, d_kv=8, d_ff=64, num_hidden_layers=3, num_attention_heads=4, patch_embed_hidden_size=3 * 8 * 8, seq_len=64
        )
        return ExpertSpec(name, "pix2struct", 48, cfg, patch_size=8)
    if kind == "convnext":  # CNN, stride 8: 16 tokens
        cfg = dict(num_channels=3, hidden_sizes=[16, 40], depths=[1, 1], num_stages=2)
        return ExpertSpec(name, "convnext", 32, cfg)
    if kind == "efficientnet_lite":  # CNN, Lite0's first 5 blocks, stride 8: 16 tokens
        return ExpertSpec(name, "efficientnet_lite", 32, dict(num_blocks=5))
    raise ValueError(f"unknown expert kind {kind!r}")


TINY_EXPERTS = ("clip", "pix2struct", "convnext")


def _llama_text(tokenizer, num_layers: int) -> dict:
    """The text config of the tiny stock VLMs with a Llama decoder: 64 wide, `num_layers` deep, 8 heads (GQA, 4 kv
    heads), the word tokenizer's vocabulary and special ids."""
    return dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=num_layers, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)


def _peaked(params, seed: int) -> None:
    """Re-draw the matrices among `params` (and stacks of them: a mixture of experts' weights) at std 0.15: a random
    LLM at std 0.02 attends almost uniformly; larger weights give peaked, varied attention, and visual tokens as
    large as words."""
    with torch.no_grad():
        for p in params:
            if p.dim() in (2, 3):
                p.normal_(0, 0.15, generator=torch.Generator().manual_seed(seed + p.numel()))


def tiny_config(
    experts=TINY_EXPERTS, fusion: str = "post", llm: str = "llama", num_layers: int = 6, tokenizer=None,
    projector_norm: str | None = None, projector: str = "mlp", projector_hidden_ids: list[int] | None = None,
) -> MultiEncoderVLMConfig:
    """Config of a tiny multi-encoder VLM: the given experts (kind names or ExpertSpecs) and an 8-head LLM
    (GQA, 4 kv heads)."""
    tokenizer = tokenizer or build_word_tokenizer(TINY_WORDS)
    text = dict(
        model_type=llm,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return MultiEncoderVLMConfig(
        experts=[k if isinstance(k, ExpertSpec) else _expert(k) for k in experts],
        text_config=text,
        fusion=fusion,
        fusion_grid=4 if fusion == "pre" else None,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_norm=projector_norm,
        projector=projector,
        projector_hidden_ids=projector_hidden_ids,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def tiny_model(seed: int = 0, **config_kwargs) -> tuple[MultiEncoderVLM, MultiEncoderProcessor]:
    """A tiny random multi-encoder VLM and its processor (CPU, fp32, eval mode).

    Default: a CLIP-like ViT with CLS (32 px, 16 patches), a Pix2Struct patch ViT (48 px, 36 patches)
    and a ConvNeXt CNN (32 px, 16 tokens), post-projection fusion, a 6-layer Llama with 8 heads.
    Keyword arguments go to `tiny_config` (experts=, fusion=, llm=, num_layers=,
    projector_norm=, projector=).
    """
    tokenizer = build_word_tokenizer(TINY_WORDS)
    config = tiny_config(tokenizer=tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = MultiEncoderVLM(config).eval()
    _peaked(model.language_model.parameters(), seed)
    processor = MultiEncoderProcessor(tokenizer, config.expert_specs, prompt_template="{prompt}")
    return model, processor


def tiny_llava(seed: int = 0, tower: str = "clip", num_layers: int = 6, anyres: bool = False, onevision: bool = False,
               pinpoints: list | None = None, max_tiles: int = 9, decoder: str = "llama", video: str | None = None,
               feature_layers: list[int] | None = None, vip: bool = False):
    """A tiny random stock transformers `LlavaForConditionalGeneration` and its `LlavaProcessor` (CPU, fp32,
    eval mode, SDPA), the shape of LLaVA-1.5 at toy size: a 4-block vision tower ("clip": CLIP with CLS,
    features from block -2 without CLS; "siglip": SigLIP, every token) at 32 px (16 patches, so 16 image
    tokens per <image>) and a `num_layers`-deep Llama with 8 heads (GQA, 4 kv heads).

    With `anyres`, a `LlavaNextForConditionalGeneration` and `LlavaNextProcessor` instead (LLaVA-NeXT: a
    base tile plus 2-4 high-resolution tiles of 32 px per image, grids 32x64, 64x32 or 64x64 px, unpadded
    to the image's aspect, row-end tokens), so the image tokens per <image> depend on the image's size.
    With `onevision`, a `LlavaOnevisionForConditionalGeneration` and `models.llava.LlavaOnevisionImageTextProcessor`
    (its processor without a video processor): the same tiles, a SigLIP tower (whatever `tower` says) read whole
    at its last block, a row-end token after every image, and in a prompt with several images each image as its
    base tile alone, and `max_tiles` tiles' worth of high-resolution patches at most (`vision_aspect_ratio`
    "anyres_max_9"; an image with more has its grid shrunk by interpolation). `pinpoints`: the (height, width)
    grids of tiles, in pixels, instead of those three. `decoder="mistral"`: a Mistral decoder instead of the Llama,
    every layer attending within a sliding window of 12 tokens (shorter than one image's tokens); `decoder="granite"`:
    a Granite decoder (Granite Vision's: its input embeddings, visual tokens' too, times 12, each block's output times
    0.22 before the residual, its own attention scale); `decoder="phi3"`: a Phi-3 decoder (LLaVA-Phi-3's: one fused
    q/k/v projection). With `video`
    ("average" or "max", its `spatial_pool_mode`), a `LlavaNextVideoForConditionalGeneration` and
    `models.llava.LlavaNextVideoImageTextProcessor`: LLaVA-NeXT's images, and videos whose 32 px frames' 4 x 4 patches
    are pooled over 2 x 2 windows (4 tokens a frame) before the projector. `feature_layers`: the tower layers whose
    hidden states LLaVA concatenates as each patch's features (`vision_feature_layer` a list, as Granite Vision's).
    `vip`: a `VipLlavaForConditionalGeneration` (ViP-LLaVA: the CLIP tower read at `feature_layers`, [-2, -3, 1]
    unless given, each without CLS, and a projector that LayerNorms their concatenation) with the same processor."""
    from transformers import (CLIPVisionConfig, GraniteConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor, LlavaProcessor,
                              MistralConfig, Phi3Config)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    if tower not in ("clip", "siglip"):
        raise ValueError(f"unknown tower {tower!r}; choose 'clip' or 'siglip'")
    if decoder not in ("llama", "mistral", "granite", "phi3"):
        raise ValueError(f"unknown decoder {decoder!r}; choose 'llama', 'mistral', 'granite' or 'phi3'")
    if onevision:
        tower, anyres = "siglip", True
    if vip and (tower != "clip" or anyres or onevision or video is not None):
        raise ValueError("vip=True is ViP-LLaVA: a CLIP tower, LLaVA-1.5's layout")
    if vip:
        feature_layers = feature_layers or [-2, -3, 1]
    if video is not None:
        anyres = True
    tokenizer = build_word_tokenizer(TINY_WORDS)
    if onevision or video is not None:  # its processor counts video tokens too
        tokenizer.add_special_tokens({"additional_special_tokens": ["<video>"]})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
                  patch_size=8)
    if tower == "clip":
        vision_config = CLIPVisionConfig(**vision)
    else:
        from transformers import SiglipVisionConfig

        vision_config = SiglipVisionConfig(**vision)
    text = {"llama": LlamaConfig, "mistral": MistralConfig, "granite": GraniteConfig, "phi3": Phi3Config}[decoder](
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **({"sliding_window": 12} if decoder == "mistral" else {}),
        **({"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.125,
            "logits_scaling": 8.0} if decoder == "granite" else {}))
    strategy = "default" if tower == "clip" else "full"
    pinpoints = pinpoints or [[32, 64], [64, 32], [64, 64]]
    config_cls, model_cls = (LlavaNextConfig, LlavaNextForConditionalGeneration) if anyres else (LlavaConfig,
                                                                                              LlavaForConditionalGeneration)
    if onevision:
        from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

        config_cls, model_cls = LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    if video is not None:
        from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

        config_cls, model_cls = LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration
    if vip:
        from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration

        config_cls, model_cls = VipLlavaConfig, VipLlavaForConditionalGeneration
    config = config_cls(vision_config=vision_config, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                        **({} if vip else {"vision_feature_select_strategy": strategy}),
                        vision_feature_layer=feature_layers or (-1 if onevision else -2),
                        **({"image_grid_pinpoints": pinpoints} if anyres else {}),
                        **({"vision_aspect_ratio": f"anyres_max_{max_tiles}",
                            "video_token_id": tokenizer.convert_tokens_to_ids("<video>")} if onevision else {}),
                        **({"video_token_id": tokenizer.convert_tokens_to_ids("<video>"), "spatial_pool_mode": video,
                            "spatial_pool_stride": 2} if video is not None else {}))
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _peaked([*model.model.language_model.parameters(), *model.model.multi_modal_projector.parameters()], seed)
    # a generated <image> (or <video>) has no pixels behind it
    model.generation_config.suppress_tokens = [config.image_token_id] + ([config.video_token_id]
                                                                         if onevision or video is not None else [])
    sizes = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    if onevision:
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)

        from .models.llava import LlavaOnevisionImageTextProcessor

        images = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints,
                                                 image_mean=[0.5] * 3, image_std=[0.5] * 3)
        return model, LlavaOnevisionImageTextProcessor(image_processor=images, tokenizer=tokenizer, num_image_tokens=16,
                                                       vision_feature_select_strategy=strategy,
                                                       vision_aspect_ratio=f"anyres_max_{max_tiles}")
    images = LlavaNextImageProcessorPil(**sizes, image_grid_pinpoints=pinpoints) if anyres else CLIPImageProcessorPil(**sizes)
    if video is not None:
        from .models.llava import LlavaNextVideoImageTextProcessor

        return model, LlavaNextVideoImageTextProcessor(
            image_processor=images, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy=strategy,
            num_additional_image_tokens=int(tower == "clip"), frame_settings=sizes)
    processor = (LlavaNextProcessor if anyres else LlavaProcessor)(
        image_processor=images, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy=strategy,
        num_additional_image_tokens=int(tower == "clip"))
    return model, processor


def _qwen25_parts(tokenizer, num_layers: int, vision_depth: int) -> tuple[dict, dict]:
    """The tiny Qwen2.5-VL-style (vision, text) configs: the encoder on 8 px patches, 2x2 merged, attention windows
    of 2x2 visual tokens in its blocks but the last; a decoder with 8 heads (GQA, 4 kv heads) and multimodal RoPE."""
    vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                  patch_size=8, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=32,
                  fullatt_block_indexes=[vision_depth - 1])
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=8, num_key_value_heads=4, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0})
    return vision, text


def tiny_qwen2_vl(seed: int = 0, num_layers: int = 6, version: str = "2", vision_depth: int = 2):
    """A tiny random stock transformers `Qwen2VLForConditionalGeneration` (CPU, fp32, eval mode, SDPA) and a
    `models.qwen2_vl.Qwen2VLImageTextProcessor` where "<image>" stands for one image: a `vision_depth`-block
    vision encoder on 8 px patches, 2x2 merged (an image of 16 to 48 px a side gives 2 to 9 visual tokens, by
    its size), and a `num_layers`-deep decoder with 8 heads (GQA, 4 kv heads) and multimodal RoPE.
    `version="2.5"`: a `Qwen2_5_VLForConditionalGeneration` instead (attention windows of 2x2 visual tokens in
    its vision blocks but the last, full attention in the last). `version="3"`: a `Qwen3VLForConditionalGeneration`
    (learned position embeddings resampled to each grid, DeepStack: the merged features of vision blocks 0 and 1
    added to the decoder's hidden states after its layers 0 and 1; a Qwen3 decoder, per-head q/k norms; its
    processor writes each temporal patch of a video as a frame of its own, with its time, as Qwen3-VL's does).
    `version="3-moe"`: Qwen3-VL's with a mixture-of-experts decoder, `Qwen3VLMoeForConditionalGeneration` (4
    experts, 2 routed per token, in every layer but layer 1, which keeps a dense MLP). `version="3.5"`: a
    `Qwen3_5ForConditionalGeneration` (Qwen3-VL's encoder without DeepStack; a hybrid decoder, layers 2 and 5 of 6
    attention layers with gated outputs, partial rotary (half of each 16-wide head) and per-head q/k norms, the others
    linear-attention layers: a causal convolution and the gated delta rule, 2 key and 4 value heads 8 wide).
    `version="3.5-moe"`: Qwen3.5's with a mixture-of-experts decoder, `Qwen3_5MoeForConditionalGeneration` (4 routed
    experts, 2 per token, and a shared one in every layer). `version="ov1.5"`: a `LlavaOnevision15ForConditionalGeneration`
    (LLaVA-OneVision-1.5: a RICE ViT, a CLS per image with its own rotary angles, Qwen2-VL's merge windows, a Qwen3
    decoder with 1D RoPE; a video's frames each a temporal patch with a CLS of its own). `version="exaone4.5"`: an `Exaone4_5_ForConditionalGeneration` (EXAONE 4.5:
    Qwen2.5-VL's windowed encoder with 2 key and value heads for its 4, an EXAONE 4 decoder with 1D RoPE, two sliding
    layers (window 8) to each full one; images and videos). `version="hcx"`: a `HyperCLOVAXVisionV2ForConditionalGeneration`
    (HyperCLOVA X SEED Think: EXAONE 4.5's kind of encoder with as many key and value heads as query heads, a linear
    projector after its merger, a HyperCLOVA X decoder with 1D RoPE: Granite's, its input embeddings times 4, its blocks'
    outputs times 0.5, its own attention scale; the head's logits times 2; images and videos). The processors of
    "ov1.5", "exaone4.5" and "hcx" return no mm_token_type_ids, as their models' own (EXAONE 4.5's) do not."""
    from transformers import (Exaone4_5_Config, Exaone4_5_ForConditionalGeneration, HyperCLOVAXVisionV2Config,
                              HyperCLOVAXVisionV2ForConditionalGeneration, LlavaOnevision15Config,
                              LlavaOnevision15ForConditionalGeneration, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration, Qwen3_5Config, Qwen3_5ForConditionalGeneration,
                              Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .models.qwen2_vl import Qwen2VLImageTextProcessor, add_vision_tokens

    if version not in ("2", "2.5", "3", "3-moe", "3.5", "3.5-moe", "ov1.5", "exaone4.5", "hcx"):
        raise ValueError(f"unknown Qwen-VL version {version!r}; choose '2', '2.5', '3', '3-moe', '3.5', '3.5-moe', "
                         "'ov1.5', 'exaone4.5' or 'hcx'")

    tokenizer = build_word_tokenizer(TINY_WORDS)
    ids = add_vision_tokens(tokenizer)
    windowed, text = _qwen25_parts(tokenizer, num_layers, vision_depth)
    vision = dict(depth=vision_depth, embed_dim=32, hidden_size=64, num_heads=4, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, mlp_ratio=2)
    if version == "2.5":
        vision = windowed
    if version in ("3", "3-moe", "3.5", "3.5-moe"):
        vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                      patch_size=8, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                      num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
        text.update(head_dim=8, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True,
                                                 "rope_theta": 10000.0})
    if version.startswith("3.5"):
        del vision["deepstack_visual_indexes"]
        text.update(head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                    linear_value_head_dim=8, linear_conv_kernel_dim=4,
                    layer_types=(["linear_attention"] * 2 + ["full_attention"]) * (num_layers // 3)
                    + ["linear_attention"] * (num_layers % 3))
        text["rope_parameters"]["partial_rotary_factor"] = 0.5
    if version == "3.5-moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    if version == "exaone4.5":
        vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=4, num_key_value_heads=2,
                      out_hidden_size=64, patch_size=8, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                      window_size=32, fullatt_block_indexes=[vision_depth - 1])
        text.update(model_type="exaone4", head_dim=8, sliding_window=8,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * (num_layers // 3))
        text.pop("rope_parameters")
    if version == "hcx":
        vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=48,
                      patch_size=8, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=32,
                      fullatt_block_indexes=[vision_depth - 1])
        text.update(model_type="hyperclovax", head_dim=8, embedding_multiplier=4.0, residual_multiplier=0.5,
                    attention_multiplier=0.25, logits_scaling=2.0)
        text.pop("rope_parameters")
    if version == "ov1.5":
        vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                      patch_size=8, spatial_merge_size=2, in_channels=3)
        text.update(model_type="qwen3", head_dim=8)
    if version == "3-moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                    mlp_only_layers=[1])
    config_cls, model_cls = {"2": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
                             "2.5": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
                             "3": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
                             "3-moe": (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration),
                             "3.5": (Qwen3_5Config, Qwen3_5ForConditionalGeneration),
                             "3.5-moe": (Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration),
                             "ov1.5": (LlavaOnevision15Config, LlavaOnevision15ForConditionalGeneration),
                             "exaone4.5": (Exaone4_5_Config, Exaone4_5_ForConditionalGeneration),
                             "hcx": (HyperCLOVAXVisionV2Config, HyperCLOVAXVisionV2ForConditionalGeneration)}[version]
    if version == "hcx":
        vision["model_type"] = "qwen2_5_vl_vision"
    config = config_cls(vision_config=vision, text_config=text, **ids)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if version == "ov1.5":  # CLS's rotary angles and embedding as large as the patches' (not near zero)
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            model.model.visual.cls_embeddings.class_pos_emb.normal_(0, 1.0, generator=g)
            model.model.visual.cls_embeddings.class_embedding.normal_(0, 1.0, generator=g)
    visual = model.model.vision_model if version == "hcx" else model.model.visual
    mergers = [visual.merger, *getattr(visual, "deepstack_merger_list", []), *([model.model.projector]
                                                                              if version == "hcx" else [])]
    _peaked([*model.model.language_model.parameters(), *(p for m in mergers for p in m.parameters())], seed)
    model.generation_config.suppress_tokens = [ids[k] for k in ("image_token_id", "video_token_id",
                                                                "vision_start_token_id", "vision_end_token_id")]
    images = Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=48 * 48, patch_size=8, merge_size=2,
                                      temporal_patch_size=1 if version == "ov1.5" else 2, image_mean=[0.5] * 3,
                                      image_std=[0.5] * 3)
    return model, Qwen2VLImageTextProcessor(images, tokenizer, alias="<image>", timestamps=version.startswith("3"),
                                            token_types=version not in ("exaone4.5", "hcx", "ov1.5"))


def tiny_qwen2_5_omni_thinker(seed: int = 0, num_layers: int = 6, vision_depth: int = 2):
    """A tiny random stock transformers `Qwen2_5OmniThinkerForConditionalGeneration` (Qwen2.5-Omni's thinker: CPU,
    fp32, eval mode, SDPA) and a `models.qwen2_vl.Qwen2VLImageTextProcessor` for its images ("<image>" one image, no
    token types): Qwen2.5-VL's windowed encoder (attention windows of 2x2 visual tokens in its blocks but the last;
    separate q/k/v projections) on 8 px patches, 2x2 merged, a `num_layers`-deep decoder with multimodal RoPE (its
    own `get_rope_index`, which finds an image by the vision-start token before it) and a one-layer audio tower."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .models.qwen2_vl import Qwen2VLImageTextProcessor, add_vision_tokens

    tokenizer = build_word_tokenizer(TINY_WORDS)
    ids = add_vision_tokens(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|AUDIO|>"]})
    vision, text = _qwen25_parts(tokenizer, num_layers, vision_depth)
    audio = dict(d_model=32, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64, output_dim=64,
                 num_mel_bins=16, max_source_positions=100, n_window=10)
    config = Qwen2_5OmniThinkerConfig(vision_config=vision, text_config=text, audio_config=audio,
                                      image_token_index=ids["image_token_id"], video_token_index=ids["video_token_id"],
                                      vision_start_token_id=ids["vision_start_token_id"],
                                      vision_end_token_id=ids["vision_end_token_id"],
                                      audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"))
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
    _peaked([*model.model.language_model.parameters(), *model.model.visual.merger.parameters()], seed)
    model.generation_config.suppress_tokens = [ids[k] for k in ("image_token_id", "video_token_id",
                                                                "vision_start_token_id", "vision_end_token_id")]
    images = Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=48 * 48, patch_size=8, merge_size=2,
                                      temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return model, Qwen2VLImageTextProcessor(images, tokenizer, alias="<image>", token_types=False)


def tiny_paddleocr_vl(seed: int = 0, num_layers: int = 6, vision_depth: int = 2):
    """A tiny random stock transformers `PaddleOCRVLForConditionalGeneration` (CPU, fp32, eval mode, SDPA) and a
    `models.paddleocr_vl.PaddleOCRVLImageTextProcessor` where "<image>" stands for one image: a `vision_depth`-block
    SigLIP ViT on 8 px patches (learned position embeddings for a 4x4 grid, resampled to each image's; 2D rotary
    positions), each 2x2 window one visual token (an image of 16 to 48 px a side gives 2 to 9, by its size), the
    projector's per-patch norm and MLP, and a `num_layers`-deep Ernie 4.5 decoder with 8 heads (GQA, 4 kv heads)
    and multimodal RoPE."""
    from transformers import PaddleOCRVLConfig, PaddleOCRVLForConditionalGeneration
    from transformers.models.paddleocr_vl.image_processing_pil_paddleocr_vl import PaddleOCRVLImageProcessorPil

    from .models.paddleocr_vl import PaddleOCRVLImageTextProcessor

    tokens = ("<|IMAGE_START|>", "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_END|>")
    tokenizer = build_word_tokenizer(TINY_WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *tokens]})
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_depth, num_attention_heads=4,
                  image_size=32, patch_size=8, spatial_merge_size=2)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=8, num_key_value_heads=4, head_dim=8, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0})
    config = PaddleOCRVLConfig(vision_config=vision, text_config=text, image_token_id=ids[1], vision_start_token_id=ids[0])
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = PaddleOCRVLForConditionalGeneration(config).eval()
    _peaked([*model.model.language_model.parameters(), *model.model.projector.parameters(),
             *model.lm_head.parameters()], seed)
    with torch.no_grad():  # position embeddings not all alike
        model.model.visual.vision_model.embeddings.position_embedding.weight.normal_(
            0, 1.0, generator=torch.Generator().manual_seed(seed))
    model.generation_config.suppress_tokens = ids
    images = PaddleOCRVLImageProcessorPil(min_pixels=16 * 16, max_pixels=48 * 48, patch_size=8, merge_size=2,
                                          temporal_patch_size=1, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return model, PaddleOCRVLImageTextProcessor(images, tokenizer, alias="<image>")


def tiny_video_llama3(seed: int = 0, num_layers: int = 6, vision_depth: int = 2):
    """A tiny random stock transformers `VideoLlama3ForConditionalGeneration` (CPU, fp32, eval mode, SDPA) and a
    `models.paddleocr_vl.VideoLlama3ImageTextProcessor` where "<image>" stands for one image: a `vision_depth`-block
    SigLIP ViT on 8 px patches with 2D rotary positions, every patch one visual token (an image of 16 to 48 px a
    side gives 4 to 36), the projector MLP and a `num_layers`-deep Qwen2 decoder with 8 heads (GQA, 4 kv heads)."""
    from transformers import VideoLlama3Config, VideoLlama3ForConditionalGeneration
    from transformers.models.video_llama_3.image_processing_pil_video_llama_3 import VideoLlama3ImageProcessorPil

    from .models.qwen2_vl import add_vision_tokens
    from .models.paddleocr_vl import VideoLlama3ImageTextProcessor

    tokenizer = build_word_tokenizer(TINY_WORDS)
    ids = add_vision_tokens(tokenizer)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_depth, num_attention_heads=4,
                  patch_size=8)
    text = dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=num_layers, num_attention_heads=8, num_key_value_heads=4,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    config = VideoLlama3Config(vision_config=vision, text_config=text, image_token_id=ids["image_token_id"],
                               video_token_id=ids["video_token_id"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = VideoLlama3ForConditionalGeneration(config).eval()
    _peaked([*model.model.language_model.parameters(), *model.model.projector.parameters(),
             *model.lm_head.parameters()], seed)
    model.generation_config.suppress_tokens = [ids[k] for k in ("image_token_id", "video_token_id",
                                                                "vision_start_token_id", "vision_end_token_id")]
    images = VideoLlama3ImageProcessorPil(min_pixels=16 * 16, max_pixels=48 * 48, patch_size=8, image_mean=[0.5] * 3,
                                          image_std=[0.5] * 3)
    return model, VideoLlama3ImageTextProcessor(images, tokenizer, alias="<image>")


def tiny_ovis2(seed: int = 0, num_layers: int = 6, vision_depth: int = 2, tokenize: str = "softmax"):
    """A tiny random stock transformers `Ovis2ForConditionalGeneration` (CPU, fp32, eval mode, SDPA) and transformers'
    `Ovis2Processor` with the PIL image processor ("<image>" per image): 32 px tiles of 8 px patches (a large image is
    its whole and a grid of up to 4 crops), a `vision_depth`-block AIMv2 ViT, each 2x2 window one visual token (4 per
    tile) through the visual head (`tokenize`: "softmax" or "st_argmax") and a 64-row visual table, and a
    `num_layers`-deep Qwen2 decoder with 8 heads (GQA, 4 kv heads)."""
    from transformers import Ovis2Config, Ovis2ForConditionalGeneration, Ovis2Processor
    from transformers.models.ovis2.image_processing_pil_ovis2 import Ovis2ImageProcessorPil

    markers = ("<IMG_ATOM>", "<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>")
    tokenizer = build_word_tokenizer(TINY_WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *markers]})
    ids = tokenizer.convert_tokens_to_ids(list(markers))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_depth, num_attention_heads=4,
                  image_size=32, patch_size=8, hidden_stride=2, vocab_size=64, tokenize_function=tokenize)
    text = dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=num_layers, num_attention_heads=8, num_key_value_heads=4,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    config = Ovis2Config(vision_config=vision, text_config=text, image_token_id=ids[0], visual_indicator_token_ids=ids[1:],
                         hidden_size=64, vocab_size=len(tokenizer), tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Ovis2ForConditionalGeneration(config).eval()
    tower = model.model.vision_tower
    _peaked([*model.model.language_model.parameters(), *tower.head_linear.parameters(), *model.lm_head.parameters()],
            seed)
    with torch.no_grad():  # a visual table as large as words
        model.model.visual_embeddings_table.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed))
    model.generation_config.suppress_tokens = ids
    images = Ovis2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=4,
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Ovis2Processor(images, tokenizer, image_seq_length=4)
    tokenizer.padding_side = "left"
    return model, processor


def tiny_glm4v(seed: int = 0, num_layers: int = 6, vision_depth: int = 2, moe: bool = False, v46: bool = False,
               ocr: bool = False):
    """A tiny random stock transformers `Glm4vForConditionalGeneration` (CPU, fp32, eval mode, SDPA) and a
    `models.glm4v.Glm4vImageTextProcessor` where "<image>" stands for one image: a `vision_depth`-block vision
    encoder on 8 px patches with learned position embeddings for a 4x4 grid (resampled to each image's), each 2x2
    window one visual token (an image of 16 to 48 px a side gives 2 to 9, by its size), and a `num_layers`-deep
    GLM-4 decoder 128 wide with 8 heads (GQA, 4 kv heads), multimodal RoPE on half of each head's dimensions. With
    `moe`, a `Glm4vMoeForConditionalGeneration` (GLM-4.5V's kind): its decoder rotates dimension i with i + d/2, and
    its layers after the first are mixtures of 4 routed experts (2 per token, in 2 groups) and a shared one. With
    `v46`, a `Glm46VForConditionalGeneration` (GLM-4.6V: GLM-4.1V's classes under a config whose text part is
    GLM-4.1V's decoder, or with `moe` GLM-4.5V's, as GLM-4.6V-Flash and GLM-4.6V are) and a processor that writes
    a video's times as GLM-4.6V's does ("2.0 seconds"). With `ocr`, a `GlmOcrForConditionalGeneration` (GLM-OCR: the
    encoder without a norm and learned positions after its patch embedding, per-head q/k norms in its attention;
    the decoder's attention without biases)."""
    from transformers import (Glm4vConfig, Glm4vForConditionalGeneration, Glm4vMoeConfig,
                              Glm4vMoeForConditionalGeneration, Glm46VConfig, Glm46VForConditionalGeneration,
                              GlmOcrConfig, GlmOcrForConditionalGeneration)
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    from .models.glm4v import VISION_TOKENS, Glm4vImageTextProcessor

    tokenizer = build_word_tokenizer(TINY_WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *VISION_TOKENS.values()]})
    ids = {field: tokenizer.convert_tokens_to_ids(token) for field, token in VISION_TOKENS.items()}
    vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=128,
                  patch_size=8, image_size=32, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    text = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=8, num_key_value_heads=4, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0,
                                 "partial_rotary_factor": 0.5})  # 16 dims a head, the first 8 rotated
    if moe:
        text.update(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                    n_group=2, topk_group=1, first_k_dense_replace=1, attention_bias=True)
    config_cls, model_cls = ((Glm4vMoeConfig, Glm4vMoeForConditionalGeneration) if moe
                             else (Glm4vConfig, Glm4vForConditionalGeneration))
    if v46:  # its sub-configs are named by model type
        config_cls, model_cls = Glm46VConfig, Glm46VForConditionalGeneration
        text["model_type"] = "glm4v_moe_text" if moe else "glm4v_text"
        vision["model_type"] = "glm4v_moe_vision" if moe else "glm4v_vision"
    if ocr:
        config_cls, model_cls = GlmOcrConfig, GlmOcrForConditionalGeneration
    config = config_cls(vision_config=vision, text_config=text, **ids)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    visual = model.model.visual
    _peaked([*model.model.language_model.parameters(), *visual.merger.parameters()], seed)
    with torch.no_grad():  # norms and position embeddings that are not the identity and not all alike
        g = torch.Generator().manual_seed(seed)
        norms = [getattr(visual, "post_conv_layernorm", None), visual.post_layernorm]
        norms += [n for block in visual.blocks for n in (getattr(block.attn, "q_norm", None),
                                                         getattr(block.attn, "k_norm", None))]
        for norm in filter(None, norms):
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)
        if hasattr(visual, "embeddings"):
            visual.embeddings.position_embedding.weight.normal_(0, 1.0, generator=g)
    model.generation_config.suppress_tokens = list(ids.values())
    # its pixel limits count the two frames of a temporal patch: Qwen2-VL's tiny sizes, doubled
    images = Glm4vImageProcessorPil(size={"shortest_edge": 2 * 16 * 16, "longest_edge": 2 * 48 * 48}, patch_size=8,
                                    merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return model, Glm4vImageTextProcessor(images, tokenizer, alias="<image>", decimal_seconds=v46)


def tiny_internvl(seed: int = 0, num_layers: int = 6, vision_depth: int = 3, qk_norm: bool = False,
                  decoder: str = "qwen2", qianfan: bool = False):
    """A tiny random stock transformers `InternVLForConditionalGeneration` (CPU, fp32, eval mode, SDPA) and a
    `models.internvl.InternVLImageTextProcessor` where "<image>" stands for one image: a `vision_depth`-block
    InternViT (CLS, layer scale; `qk_norm`: RMS-normed queries and keys, as the 6B InternViT) on 32 px tiles of
    8 px patches, each 2x2 window folded into one visual token (4 per tile), tiles cut as InternVL cuts them (1
    to 4 by the image's aspect, plus a thumbnail when there are several), and a `num_layers`-deep Qwen2 decoder
    with 8 heads (GQA, 4 kv heads); `decoder="qwen3"`: a Qwen3 one instead (per-head q/k norms, as InternVL3.5's);
    `decoder="qwen3_moe"`: a Qwen3-MoE one (InternVL3.5-30B-A3B's kind: 4 experts, 2 per token, layer 1 dense);
    `decoder="gpt_oss"`: a GPT-OSS one (InternVL3.5-GPT-OSS-20B-A4B's kind: learned attention sinks, here drawn large
    enough to matter, every other layer attending within 8 tokens, 4 experts, 2 per token; eager attention, as the
    stock GPT-OSS has no SDPA).
    With `qianfan`, a `QianfanOCRForConditionalGeneration` (Qianfan-OCR: the ViT's blocks in a list of their own, with
    stochastic depth up to 0.1, inert at inference, biased attention)."""
    from transformers import (InternVLConfig, InternVLForConditionalGeneration, QianfanOCRConfig,
                              QianfanOCRForConditionalGeneration)
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from .models.internvl import IMAGE_TOKENS, InternVLImageTextProcessor

    tokenizer = build_word_tokenizer(TINY_WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *IMAGE_TOKENS]})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_depth, num_attention_heads=4,
                  image_size=32, patch_size=8, use_qk_norm=qk_norm, layer_scale_init_value=0.5)
    if decoder not in ("qwen2", "qwen3", "qwen3_moe", "gpt_oss"):
        raise ValueError(f"unknown decoder {decoder!r}; choose 'qwen2', 'qwen3', 'qwen3_moe' or 'gpt_oss'")
    text = dict(model_type=decoder, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=num_layers, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, **({"head_dim": 8} if decoder != "qwen2" else {}))
    if decoder == "qwen3_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                    mlp_only_layers=[1])
    if decoder == "gpt_oss":
        text.update(num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKENS[2])
    config_cls, model_cls = InternVLConfig, InternVLForConditionalGeneration
    if qianfan:
        config_cls, model_cls = QianfanOCRConfig, QianfanOCRForConditionalGeneration
        vision.update(model_type="qianfan_ocr_vision", attention_bias=True, drop_path_rate=0.1)
    config = config_cls(vision_config=vision, text_config=text, image_token_id=image_id, image_seq_length=4,
                        downsample_ratio=0.5, tie_word_embeddings=False)
    config._attn_implementation = "eager" if decoder == "gpt_oss" else "sdpa"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _peaked([*model.model.language_model.parameters(), *model.model.multi_modal_projector.parameters()], seed)
    if decoder == "gpt_oss":  # sinks that take a good share of each softmax
        g = torch.Generator().manual_seed(seed)
        for layer in model.model.language_model.layers:
            layer.self_attn.sinks.data = torch.randn(layer.self_attn.sinks.shape, generator=g) * 2
    model.generation_config.suppress_tokens = [tokenizer.convert_tokens_to_ids(t) for t in IMAGE_TOKENS]
    images = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, max_patches=4, image_mean=[0.5] * 3,
                                      image_std=[0.5] * 3)
    return model, InternVLImageTextProcessor(images, tokenizer, image_seq_length=4, alias="<image>")


def tiny_idefics3(seed: int = 0, kind: str = "idefics3", num_layers: int = 6, vision_depth: int = 3):
    """A tiny random stock transformers `Idefics3ForConditionalGeneration` (kind="idefics3": 32 px tiles of 8 px
    patches, each 2x2 window folded into one visual token) or `SmolVLMForConditionalGeneration` ("smolvlm": 64 px
    tiles, 4x4 windows), 4 visual tokens per tile either way (CPU, fp32, eval mode, SDPA), and transformers'
    `Idefics3Processor` with the PIL image processor: images scaled to 2 tiles on their longer side, cut into tiles,
    plus the whole image as one more tile. A `vision_depth`-block SigLIP ViT and a `num_layers`-deep Llama decoder
    with 8 heads (GQA, 4 kv heads)."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, SmolVLMConfig,
                              SmolVLMForConditionalGeneration)
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from .models.idefics3 import PROMPT_TOKENS

    if kind not in ("idefics3", "smolvlm"):
        raise ValueError(f"unknown kind {kind!r}; choose 'idefics3' or 'smolvlm'")
    scale = 2 if kind == "idefics3" else 4
    side = 16 * scale
    tokenizer = build_word_tokenizer(TINY_WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": list(PROMPT_TOKENS)})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_depth, num_attention_heads=4,
                  image_size=side, patch_size=8)
    text = _llama_text(tokenizer, num_layers)
    config_cls, model_cls = ((Idefics3Config, Idefics3ForConditionalGeneration) if kind == "idefics3" else
                             (SmolVLMConfig, SmolVLMForConditionalGeneration))
    config = config_cls(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                        scale_factor=scale)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _peaked([*model.model.text_model.parameters(), *model.model.connector.parameters(), *model.lm_head.parameters()],
            seed)
    model.generation_config.suppress_tokens = tokenizer.convert_tokens_to_ids(list(PROMPT_TOKENS))
    images = Idefics3ImageProcessorPil(size={"longest_edge": 2 * side}, max_image_size={"longest_edge": side},
                                       image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return model, Idefics3Processor(images, tokenizer, image_seq_len=4)


def tiny_gemma3(seed: int = 0, num_layers: int = 6, vision_depth: int = 3, sliding_window: int = 8):
    """A tiny random stock transformers `Gemma3ForConditionalGeneration` (CPU, fp32, eval mode, SDPA): 32 px images
    of 4 px patches, each 4x4 window averaged into one visual token (4 per image), and transformers'
    `Gemma3Processor` with the PIL image processor (its prompts write `<start_of_image>` where an image goes). A
    `vision_depth`-block SigLIP ViT and a `num_layers`-deep Gemma 3 decoder with 8 heads (GQA, 4 kv heads), whose
    layers alternate sliding-window (`sliding_window` tokens, short enough that the tests' prompts cross it) and
    global attention as [local, global, local, local, global, local, ...]."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from .models.gemma3 import PROMPT_TOKENS

    tokenizer = build_word_tokenizer(TINY_WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *PROMPT_TOKENS]})
    tokenizer._set_model_specific_special_tokens(special_tokens=dict(zip(("boi_token", "eoi_token", "image_token"),
                                                                         PROMPT_TOKENS)))
    pattern = ["sliding_attention", "full_attention", "sliding_attention"]
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=8, num_key_value_heads=4, head_dim=16, query_pre_attn_scalar=24,
                sliding_window=sliding_window, layer_types=[pattern[i % 3] for i in range(num_layers)],
                max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_depth, num_attention_heads=4,
                  image_size=32, patch_size=4, vision_use_head=False)
    ids = tokenizer.convert_tokens_to_ids(list(PROMPT_TOKENS))
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=ids[0],
                          eoi_token_index=ids[1], image_token_index=ids[2])
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    _peaked([*model.model.language_model.parameters(), *model.model.multi_modal_projector.parameters(),
             *model.lm_head.parameters()], seed)
    model.generation_config.suppress_tokens = ids
    images = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return model, Gemma3Processor(images, tokenizer, image_seq_length=4)


def _cohere2_configs(tokenizer, num_layers: int, vision_depth: int, sliding_window: int) -> tuple[dict, dict]:
    """The text and vision configs of the tiny Aya Vision and Command A Vision: a `num_layers`-deep Cohere 2 decoder
    with 8 heads (GQA, 4 kv heads) whose layers are [sliding, sliding, full] over and over, and a `vision_depth`-block
    SigLIP ViT on 32 px tiles of 8 px patches."""
    pattern = ["sliding_attention", "sliding_attention", "full_attention"]
    text = dict(model_type="cohere2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=num_layers, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                sliding_window=sliding_window, layer_types=[pattern[i % 3] for i in range(num_layers)],
                max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=vision_depth, num_attention_heads=4, image_size=32, patch_size=8)
    return text, vision


def tiny_aya_vision(seed: int = 0, num_layers: int = 6, vision_depth: int = 3, sliding_window: int = 8):
    """A tiny random stock transformers `AyaVisionForConditionalGeneration` (CPU, fp32, eval mode, SDPA) and
    transformers' `AyaVisionProcessor` with the PIL image processor, where "<image>" stands for one image: a
    `vision_depth`-block SigLIP ViT on 32 px tiles of 8 px patches, each 2x2 window folded into one visual token (4
    per tile), tiles cut as Aya Vision cuts them (1 to 4 by the image's aspect, plus the whole image when there are
    several), and a `num_layers`-deep Cohere 2 decoder with 8 heads (GQA, 4 kv heads) whose layers are [sliding,
    sliding, full] over and over (`sliding_window` tokens, short enough that the tests' prompts cross it; only the
    sliding layers rotate)."""
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from .models.aya_vision import IMAGE_TOKENS

    tokenizer = build_word_tokenizer(TINY_WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *IMAGE_TOKENS, "TILE", "TILE_GLOBAL"]})
    text, vision = _cohere2_configs(tokenizer, num_layers, vision_depth, sliding_window)
    config = AyaVisionConfig(vision_config=vision, text_config=text, downsample_factor=2,
                             image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS[2]), tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = AyaVisionForConditionalGeneration(config).eval()
    _peaked([*model.model.language_model.parameters(), *model.model.multi_modal_projector.parameters(),
             *model.lm_head.parameters()], seed)
    model.generation_config.suppress_tokens = tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS))
    images = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, max_patches=4, image_mean=[0.5] * 3,
                                      image_std=[0.5] * 3)
    return model, AyaVisionProcessor(images, tokenizer, patch_size=8, img_size=32, downsample_factor=2)


def tiny_deepseek_vl(seed: int = 0, num_layers: int = 6, vision_depth: int = 3, hybrid: bool = False):
    """A tiny random stock transformers `DeepseekVLForConditionalGeneration` (CPU, fp32, eval mode, SDPA) and
    transformers' `DeepseekVLProcessor` with the PIL image processor (each image padded to a square and scaled to
    32 px): a `vision_depth`-block SigLIP ViT of 8 px patches read to its final norm (16 image tokens per
    "<image>"), the aligner MLP and a `num_layers`-deep Llama decoder with 8 heads (GQA, 4 kv heads).

    hybrid: a `DeepseekVLHybridForConditionalGeneration` (DeepSeek-VL 7B's layout) and its processor instead: the
    same SigLIP ViT and decoder, plus a 2-block SAM ViT on the image at 64 px (8 px patches, windows of 4, its
    second block global) whose neck and strided convolutions bring it to the SigLIP's 4 x 4 grid, each token's two
    halves joined by the hybrid aligner; the global branch's weight (`high_res_vision_alpha`, zero at init) is set
    to 0.5 so that it counts."""
    from transformers import (DeepseekVLConfig, DeepseekVLForConditionalGeneration, DeepseekVLHybridConfig,
                              DeepseekVLHybridForConditionalGeneration, DeepseekVLHybridProcessor, DeepseekVLProcessor)
    from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil
    from transformers.models.deepseek_vl_hybrid.image_processing_pil_deepseek_vl_hybrid import (
        DeepseekVLHybridImageProcessorPil)

    tokenizer = build_word_tokenizer(TINY_WORDS)
    tokenizer._set_model_specific_special_tokens(special_tokens={"image_token": "<image>"})  # DeepseekVLProcessor reads it
    text = _llama_text(tokenizer, num_layers)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=vision_depth, num_attention_heads=4, image_size=32, patch_size=8)
    common = dict(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                  tie_word_embeddings=False)
    if hybrid:
        sam = dict(model_type="sam_vision_model", hidden_size=32, output_channels=16, num_hidden_layers=2,
                   num_attention_heads=4, image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1],
                   mlp_dim=64, num_pos_feats=16)
        config = DeepseekVLHybridConfig(high_res_vision_config=sam, **common)
    else:
        config = DeepseekVLConfig(**common)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = (DeepseekVLHybridForConditionalGeneration if hybrid else DeepseekVLForConditionalGeneration)(config).eval()
    _peaked([*model.model.language_model.parameters(), *model.model.aligner.parameters(),
             *model.lm_head.parameters()], seed)
    model.generation_config.suppress_tokens = [config.image_token_id]  # a generated <image> has no pixels behind it
    pixels = dict(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    if not hybrid:
        return model, DeepseekVLProcessor(DeepseekVLImageProcessorPil(**pixels), tokenizer, num_image_tokens=16)
    with torch.no_grad():
        model.model.high_res_vision_alpha.fill_(0.5)
    images = DeepseekVLHybridImageProcessorPil(**pixels, high_res_size={"height": 64, "width": 64},
                                               high_res_image_mean=[0.5] * 3, high_res_image_std=[0.5] * 3)
    return model, DeepseekVLHybridProcessor(images, tokenizer, num_image_tokens=16)


def tiny_janus(seed: int = 0, num_layers: int = 6, vision_depth: int = 3):
    """A tiny random stock transformers `JanusForConditionalGeneration` (CPU, fp32, eval mode, SDPA) and transformers'
    `JanusProcessor` with the PIL image processor (each image padded to a square and scaled to 32 px): a
    `vision_depth`-block Janus (SigLIP-like) ViT of 8 px patches read to its final norm, 16 image tokens per image
    between "<begin_of_image>" and "<end_of_image>", the aligner MLP, a `num_layers`-deep Llama decoder with 8 heads
    (GQA, 4 kv heads), and a small VQ-VAE (image generation's, which understanding does not use)."""
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusProcessor
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    tokenizer = build_word_tokenizer(TINY_WORDS)
    tokens = ("<image_placeholder>", "<begin_of_image>", "<end_of_image>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)})
    tokenizer._set_model_specific_special_tokens(special_tokens=dict(zip(("image_token", "boi_token", "eoi_token"),
                                                                         tokens)))
    text = _llama_text(tokenizer, num_layers)
    vision = dict(hidden_size=32, num_hidden_layers=vision_depth, num_attention_heads=4, image_size=32, patch_size=8,
                  projection_dim=64, depth=2, num_image_tokens=16)
    vq = dict(embed_dim=8, num_embeddings=32, latent_channels=32, base_channels=32, channel_multiplier=[1, 1],
              num_res_blocks=1, num_patches=4, projection_dim=64, image_token_embed_dim=64)
    config = JanusConfig(vision_config=vision, text_config=text, vq_config=vq, tie_word_embeddings=False,
                         image_token_id=tokenizer.convert_tokens_to_ids(tokens[0]))
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).eval()
    _peaked([*model.model.language_model.parameters(), *model.model.aligner.parameters(),
             *model.lm_head.parameters()], seed)
    model.generation_config.suppress_tokens = tokenizer.convert_tokens_to_ids(list(tokens))
    images = JanusImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return model, JanusProcessor(images, tokenizer, num_image_tokens=16)


def tiny_cohere2_vision(seed: int = 0, num_layers: int = 6, vision_depth: int = 3, sliding_window: int = 8):
    """A tiny random stock transformers `Cohere2VisionForConditionalGeneration` (CPU, fp32, eval mode, SDPA) and
    transformers' `Cohere2VisionProcessor`, with the PIL image processor of Aya Vision (`GotOcr2ImageProcessorPil`:
    1 to 4 tiles of 32 px by the image's aspect, plus the whole image when there are several) standing in for its
    own, which needs torchvision: a `vision_depth`-block SigLIP ViT of 8 px patches read to its final norm, each 2x2
    window folded into one visual token (4 per tile), and `tiny_aya_vision`'s Cohere 2 decoder."""
    from transformers import Cohere2VisionConfig, Cohere2VisionForConditionalGeneration, Cohere2VisionProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from .models.cohere2_vision import IMAGE_TOKENS

    tokenizer = build_word_tokenizer(TINY_WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *IMAGE_TOKENS]})
    tokenizer._set_model_specific_special_tokens(special_tokens=dict(zip(
        ("boi_token", "eoi_token", "image_token", "img_line_break_token"), IMAGE_TOKENS)))
    text, vision = _cohere2_configs(tokenizer, num_layers, vision_depth, sliding_window)
    config = Cohere2VisionConfig(vision_config=vision, text_config=text, downsample_factor=2,
                                 alignment_intermediate_size=96,
                                 image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS[2]), tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Cohere2VisionForConditionalGeneration(config).eval()
    _peaked([*model.model.language_model.parameters(), *model.model.multi_modal_projector.parameters(),
             *model.lm_head.parameters()], seed)
    model.generation_config.suppress_tokens = tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS))
    images = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=4,
                                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
    images.patch_size = 2  # what Cohere2VisionProcessor reads: visual tokens per side of a tile
    return model, Cohere2VisionProcessor(images, tokenizer)


def tiny_mistral3(seed: int = 0, num_layers: int = 6, vision_depth: int = 3, llava: bool = False, lighton: bool = False,
                  ministral: bool = False):
    """A tiny random stock transformers `Mistral3ForConditionalGeneration` (CPU, fp32, eval mode, SDPA): a Pixtral ViT
    on 8 px patches of images whose longer side is 64 px (each side a multiple of 16 px), each 2x2 window of patches
    one visual token (16 for a square image), a `vision_depth`-block tower and a `num_layers`-deep Mistral decoder
    with 8 heads (GQA, 4 kv heads), and `models.mistral3.PixtralImageTextProcessor` (transformers' PixtralProcessor
    without torchvision): write `[IMG]` where an image goes. With `llava`, a `LlavaForConditionalGeneration` with that
    Pixtral tower on 16 px patches instead (Pixtral-12B's kind: no merge, each patch one visual token, LLaVA's
    projector), the same token counts. With `lighton`, a `LightOnOcrForConditionalGeneration` (LightOnOCR: Mistral 3's
    tower and projector under its own names, a Qwen3 decoder) and a processor that writes an image as one `[IMG]`
    per visual token, without row breaks, as `LightOnOcrProcessor` does. With `ministral`, Mistral 3 with a Ministral 3
    decoder (Ministral 3's: YaRN RoPE, and queries scaled by 1 + 0.5 log(1 + floor(position / 8)), which binds from
    position 8 on here; from 16384 in the real ones)."""
    from transformers import (LightOnOcrConfig, LightOnOcrForConditionalGeneration, LlavaConfig,
                              LlavaForConditionalGeneration, Mistral3Config, Mistral3ForConditionalGeneration)
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    from .models.mistral3 import IMAGE_TOKENS, PixtralImageTextProcessor

    tokenizer = build_word_tokenizer(TINY_WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *IMAGE_TOKENS]})
    patch, merge = (16, 1) if llava else (8, 2)
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=vision_depth,
                  num_attention_heads=4, head_dim=8, image_size=64, patch_size=patch)
    text = dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=num_layers, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                sliding_window=None, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKENS[0])
    if llava:
        config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1, image_token_id=image_token,
                             vision_feature_select_strategy="full")
    elif lighton:
        text.update(model_type="qwen3", head_dim=8)
        config = LightOnOcrConfig(vision_config=vision, text_config=text, spatial_merge_size=merge,
                                  image_token_id=image_token, tie_word_embeddings=False)
    else:
        if ministral:
            text.update(model_type="ministral3", rope_parameters={
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 8,
                "llama_4_scaling_beta": 0.5, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})
        config = Mistral3Config(vision_config=vision, text_config=text, spatial_merge_size=merge, vision_feature_layer=-1,
                                image_token_index=image_token)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = (LlavaForConditionalGeneration if llava else LightOnOcrForConditionalGeneration if lighton
             else Mistral3ForConditionalGeneration)(config).eval()
    projector = model.model.vision_projection if lighton else model.model.multi_modal_projector
    _peaked([*model.model.language_model.parameters(), *projector.parameters(), *model.lm_head.parameters()], seed)
    model.generation_config.suppress_tokens = tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS))
    images = PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size={"height": 16, "width": 16},
                                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return model, PixtralImageTextProcessor(images, tokenizer, patch_size=patch, spatial_merge_size=merge,
                                            row_breaks=not lighton)


class TinyLfm2VlProcessor:
    """What transformers' `Lfm2VlProcessor` (which needs torchvision) writes for images whose sides are already
    multiples of 16 px, each one tile (no resizing, tiling or thumbnail): each image's 8 px patches flattened as
    SigLIP2's processor flattens them (rows of (row, column, channel)), padded to `max_patches`, with
    spatial_shapes and pixel_attention_mask; each "<image>" in a prompt becomes <|image_start|>, one "<image>" per
    2x2 window of patches, <|image_end|>. For the tests' tiny LFM2-VL (`tiny_lfm2_vl`); input_ids left-padded."""

    image_token, start_token, end_token = "<image>", "<|image_start|>", "<|image_end|>"

    def __init__(self, tokenizer, patch_size: int = 8, factor: int = 2, max_patches: int = 64):
        self.tokenizer, self.patch_size, self.factor, self.max_patches = tokenizer, patch_size, factor, max_patches
        self.tokenizer.padding_side = "left"

    def __call__(self, images=None, text=(), return_tensors="pt", padding=True):
        from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

        texts = [text] if isinstance(text, str) else list(text)
        images = [im for group in images or [] for im in (group if isinstance(group, (list, tuple)) else [group])]
        if sum(t.count(self.image_token) for t in texts) != len(images):
            raise ValueError(f"the prompts hold {sum(t.count(self.image_token) for t in texts)} {self.image_token} "
                             f"for {len(images)} images")
        side, p = self.patch_size * self.factor, self.patch_size
        pixels, shapes, masks, counts = [], [], [], iter([])
        for im in images:
            if im.width % side or im.height % side:
                raise ValueError(f"an image of {im.width}x{im.height} px: its sides must be multiples of {side} px")
            chw = (np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1)
            patches = convert_image_to_patches(chw, p)
            pad = np.zeros((self.max_patches - len(patches), patches.shape[1]), dtype=np.float32)
            pixels.append(np.concatenate([patches, pad]))
            masks.append(np.arange(self.max_patches) < len(patches))
            shapes.append([im.height // p, im.width // p])
        counts = iter(h * w // self.factor**2 for h, w in shapes)
        written = []
        for t in texts:
            parts = t.split(self.image_token)
            written.append(parts[0] + "".join(self.start_token + self.image_token * next(counts) + self.end_token + part
                                              for part in parts[1:]))
        out = dict(self.tokenizer(written, return_tensors="pt", padding=True))
        if images:
            out.update(pixel_values=torch.tensor(np.stack(pixels)), spatial_shapes=torch.tensor(shapes),
                       pixel_attention_mask=torch.tensor(np.stack(masks)))
        return out

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)


def tiny_lfm2_vl(seed: int = 0, num_layers: int = 6, vision_depth: int = 3, layernorm: bool = True):
    """A tiny random stock transformers `Lfm2VlForConditionalGeneration` (CPU, fp32, eval mode, SDPA) and a
    `TinyLfm2VlProcessor`: a `vision_depth`-block SigLIP2 NaFlex ViT on 8 px patches (position embeddings for a
    4x4 grid, resized to each image's), each 2x2 window of patches one visual token (an image of 16 to 64 px a side,
    multiples of 16, gives 1 to 16), the projector's LayerNorm and MLP, and a `num_layers`-deep LFM2 decoder 64 wide
    with 8 heads (GQA, 4 kv heads), its layers 2 and 5 attention layers (per-head q/k norms), the others short causal
    convolutions (kernel 3). `layernorm=False`: a projector without its LayerNorm (`projector_use_layernorm`, as
    LFM2-VL-450M's)."""
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration

    tokenizer = build_word_tokenizer(TINY_WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", TinyLfm2VlProcessor.start_token,
                                                                TinyLfm2VlProcessor.end_token]})
    vision = dict(model_type="siglip2_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=vision_depth,
                  num_attention_heads=4, num_patches=16, patch_size=8, vision_use_head=False)
    kinds = ["full_attention" if i % 3 == 2 else "conv" for i in range(num_layers)]  # as LFM2-350M begins: 2, 5
    text = dict(model_type="lfm2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=num_layers, num_attention_heads=8, num_key_value_heads=4, layer_types=kinds,
                conv_L_cache=3, block_auto_adjust_ff_dim=False, max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    config = Lfm2VlConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                          projector_hidden_size=48, downsample_factor=2, tie_word_embeddings=False,
                          projector_use_layernorm=layernorm)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Lfm2VlForConditionalGeneration(config).eval()
    lm = model.model.language_model
    _peaked([*lm.parameters(), *model.model.multi_modal_projector.parameters(), *model.lm_head.parameters()], seed)
    with torch.no_grad():  # norms that are not the identity, position embeddings not all alike
        g = torch.Generator().manual_seed(seed)
        for layer in lm.layers:
            attn = getattr(layer, "self_attn", None)
            for norm in (layer.operator_norm, layer.ffn_norm, *((attn.q_layernorm, attn.k_layernorm) if attn else ())):
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)
        model.model.vision_tower.embeddings.position_embedding.weight.normal_(0, 1.0, generator=g)
    model.generation_config.suppress_tokens = tokenizer.convert_tokens_to_ids(
        ["<image>", TinyLfm2VlProcessor.start_token, TinyLfm2VlProcessor.end_token])
    return model, TinyLfm2VlProcessor(tokenizer)


def tiny_paligemma(seed: int = 0, num_layers: int = 6, vision_depth: int = 3, version: int = 1):
    """A tiny random stock transformers `PaliGemmaForConditionalGeneration` (CPU, fp32, eval mode, SDPA): a
    `vision_depth`-block SigLIP tower at 32 px (16 patches of 8 px, so 16 image tokens per image) read at its final
    norm, a linear projector and a `num_layers`-deep Gemma decoder with 8 heads (GQA, 4 kv heads), and transformers'
    `PaliGemmaProcessor` with the PIL image processor (it puts every image's tokens before the text and returns
    token_type_ids: the prompt is a prefix that attends both ways). `version=2`: PaliGemma 2's Gemma 2 decoder
    instead (eager attention, which transformers requires for it), its layers alternating between a sliding window
    of 8 tokens (shorter than an image's) and global attention, attention logits soft-capped at 5 and output logits
    at 3 (low caps, so that they bind on this random model's logits)."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = build_word_tokenizer(TINY_WORDS)
    images = SiglipImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    images.image_seq_length = 16
    processor = PaliGemmaProcessor(images, tokenizer)  # adds its location and segmentation tokens to the tokenizer
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_depth, num_attention_heads=4,
                  image_size=32, patch_size=8, projection_dim=64)
    if version not in (1, 2):
        raise ValueError(f"PaliGemma version {version!r}: 1 or 2")
    text = dict(model_type="gemma", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=num_layers, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    if version == 2:
        text.update(model_type="gemma2", sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                    query_pre_attn_scalar=8)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                             projection_dim=64)
    config._attn_implementation = "sdpa" if version == 1 else "eager"
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    _peaked([*model.model.language_model.parameters(), *model.model.multi_modal_projector.parameters(),
             *model.lm_head.parameters()], seed)
    model.generation_config.suppress_tokens = [processor.image_token_id]
    return model, processor


def tiny_gemma4(seed: int = 0, num_layers: int = 6, vision_depth: int = 2, per_layer: bool = True,
                shared_layers: int = 2, bidirectional: bool = True, k_eq_v: bool = False, moe: bool = False,
                sliding_window: int = 8):
    """A tiny random stock transformers `Gemma4ForConditionalGeneration` (CPU, fp32, eval mode, SDPA) and the
    project's `Gemma4ImageTextProcessor` with transformers' PIL image processor (images, and video frames, resized to
    at most 70 visual tokens, the smallest budget it takes): a `vision_depth`-block Gemma 4 ViT of 4 px patches, each 2x2
    window averaged into one visual token, and a `num_layers`-deep Gemma 4 decoder with 8 heads (GQA, 4 kv heads) of
    8 dims on its sliding layers (window `sliding_window` tokens, shorter than an image's run) and 16 on its full
    ones, [sliding, sliding, full] over and over, the last one full, output logits soft-capped at 30.
    `per_layer`: per-layer embeddings of 8 dims (E2B's and E4B's kind); `shared_layers`: that many last layers reuse
    the keys and values of the last earlier layer of their kind; `bidirectional`: an image's tokens see each other
    both ways on the sliding layers (use_bidirectional_attention "vision"); `k_eq_v`: the full layers' values are
    their keys, with one kv head (31B's kind); `moe`: a mixture of 4 experts (top 2) beside each layer's MLP
    (26B A4B's kind)."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    from .models.gemma4 import PROMPT_TOKENS, VIDEO_TOKEN, Gemma4ImageTextProcessor

    tokenizer = build_word_tokenizer(TINY_WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": [*PROMPT_TOKENS, VIDEO_TOKEN]})
    ids = tokenizer.convert_tokens_to_ids([*PROMPT_TOKENS, VIDEO_TOKEN])
    pattern = ["sliding_attention", "sliding_attention", "full_attention"]
    types = [pattern[i % 3] for i in range(num_layers)]
    types[-1] = "full_attention"
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=8, num_key_value_heads=4, head_dim=8, global_head_dim=16,
                sliding_window=sliding_window, layer_types=types, max_position_embeddings=512,
                hidden_size_per_layer_input=8 if per_layer else 0, vocab_size_per_layer_input=len(tokenizer),
                num_kv_shared_layers=shared_layers, final_logit_softcapping=30.0,
                use_bidirectional_attention="vision" if bidirectional else None, attention_k_eq_v=k_eq_v,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    if k_eq_v:
        text["num_global_key_value_heads"] = 1
    if moe:
        text.update(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_depth, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=8, patch_size=4, pooling_kernel_size=2, position_embedding_size=64)
    config = Gemma4Config(text_config=text, vision_config=vision, audio_config=None, boi_token_id=ids[0],
                          eoi_token_id=ids[1], image_token_id=ids[2], video_token_id=ids[3])
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config).eval()
    _peaked([*model.model.language_model.parameters(), *model.model.embed_vision.parameters(),
             *model.lm_head.parameters()], seed)
    model.generation_config.suppress_tokens = ids
    images = Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=70, pooling_kernel_size=2)
    return model, Gemma4ImageTextProcessor(images, tokenizer)


LLAMA4_TOKENS = ("<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>",
                 "<|tile_y_separator|>")


class TinyLlama4Processor:
    """What transformers' `Llama4Processor` (whose image processor needs torchvision) gives for images cut into a
    chosen grid of tiles: each image resized to rows x cols tiles of `tile` px (its `tiles` entry, (1, 1) by default),
    those tiles row by row and then the whole image resized to one tile (a one-tile image: that tile alone), pixels
    scaled to [-1, 1]; each "<|image|>" in a prompt becomes the stock processor's writing of the image
    (`Llama4Processor._prompt_split_image`: <|image_start|>, each tile's run of `tokens` <|patch|> with tile
    separators, <|image|> and the whole-image tile's run, <|image_end|>). For the tests' tiny Llama 4 (`tiny_llama4`);
    input_ids left-padded."""

    image_token = "<|image|>"

    def __init__(self, tokenizer, tile: int = 32, tokens: int = 16):
        self.tokenizer, self.tile, self.tokens = tokenizer, tile, tokens
        self.tokenizer.padding_side = "left"

    def __call__(self, images=None, text=(), tiles=None, return_tensors="pt", padding=True):
        from transformers.models.llama4.processing_llama4 import Llama4Processor

        texts = [text] if isinstance(text, str) else list(text)
        images = list(images or [])
        tiles = list(tiles) if tiles is not None else [(1, 1)] * len(images)
        if sum(t.count(self.image_token) for t in texts) != len(images) or len(tiles) != len(images):
            raise ValueError("one <|image|> and one (rows, cols) per image")
        pixels, written = [], []
        for im, (rows, cols) in zip(images, tiles):
            big = self._scaled(im.resize((cols * self.tile, rows * self.tile)))
            if rows * cols > 1:
                pixels += [big[:, r * self.tile:(r + 1) * self.tile, c * self.tile:(c + 1) * self.tile]
                           for r in range(rows) for c in range(cols)]
            pixels.append(self._scaled(im.resize((self.tile, self.tile))))
            written.append(Llama4Processor._prompt_split_image(None, (rows, cols), self.tokens))
        shown = iter(written)
        texts = [t.split(self.image_token)[0] + "".join(next(shown) + part for part in t.split(self.image_token)[1:])
                 for t in texts]
        out = dict(self.tokenizer(texts, return_tensors="pt", padding=True))
        if images:
            out["pixel_values"] = torch.stack(pixels)
        return out

    @staticmethod
    def _scaled(im) -> torch.Tensor:
        return torch.tensor(np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)


def tiny_llama4(seed: int = 0, num_layers: int = 6, vision_depth: int = 2, attention_chunk_size: int = 16):
    """A tiny random stock transformers `Llama4ForConditionalGeneration` (CPU, fp32, eval mode, SDPA) and
    `TinyLlama4Processor`: a `vision_depth`-block Llama 4 ViT on 32 px tiles of 4 px patches, each 2x2 window folded
    into one visual token (16 per tile), and a `num_layers`-deep Llama 4 decoder with 8 heads (GQA, 4 kv heads):
    layers 3, 7, ... rotate nothing and attend to the whole prompt, the others rotate (complex RoPE, then a q/k norm)
    within chunks of `attention_chunk_size` positions (shorter than the tests' prompts); every other layer a mixture
    of 4 experts with a shared one."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    tokenizer = build_word_tokenizer(TINY_WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": list(LLAMA4_TOKENS)})
    ids = tokenizer.convert_tokens_to_ids(list(LLAMA4_TOKENS))
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=32, intermediate_size_mlp=128,
                num_hidden_layers=num_layers, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
                attention_chunk_size=attention_chunk_size, max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    vision = dict(hidden_size=32, num_hidden_layers=vision_depth, num_attention_heads=4, intermediate_size=128,
                  image_size=32, patch_size=4, pixel_shuffle_ratio=0.5, projector_input_dim=64,
                  projector_output_dim=64, vision_output_dim=64,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config = Llama4Config(text_config=text, vision_config=vision, boi_token_index=ids[0], eoi_token_index=ids[1],
                          image_token_index=ids[3])
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Llama4ForConditionalGeneration(config).eval()
    _peaked([*model.language_model.parameters(), *model.multi_modal_projector.parameters()], seed)
    model.generation_config.suppress_tokens = ids
    return model, TinyLlama4Processor(tokenizer)


HUNYUAN_VL_TOKENS = ("<hy_image>", "<hy_image_start>", "<hy_image_end>", "<hy_newline>")


def tiny_hunyuan_vl(seed: int = 0, num_layers: int = 4, vision_depth: int = 2):
    """A tiny random stock transformers `HunYuanVLForConditionalGeneration` (CPU, fp32, eval mode, SDPA) and
    transformers' `HunYuanVLProcessor` with the PIL image processor (images resized within 16 x 16 to 64 x 64 4 px
    patches, sides in whole 2x2 windows; "<hy_image_start><hy_image><hy_image_end>" stands for an image): a
    `vision_depth`-block ViT, each 2x2 window merged into one visual token with a newline after each row and a begin and
    end token around the image, and a `num_layers`-deep HunYuan decoder with 8 heads (GQA, 4 kv heads) rotating by
    four multimodal RoPE axes, then normalising queries and keys."""
    from transformers import HunYuanVLConfig, HunYuanVLForConditionalGeneration, HunYuanVLProcessor
    from transformers.models.hunyuan_vl.image_processing_pil_hunyuan_vl import HunYuanVLImageProcessorPil

    tokenizer = build_word_tokenizer(TINY_WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": list(HUNYUAN_VL_TOKENS)})
    tokenizer._set_model_specific_special_tokens(special_tokens=dict(zip(
        ("image_token", "image_start_token", "image_end_token"), HUNYUAN_VL_TOKENS)))
    ids = tokenizer.convert_tokens_to_ids(list(HUNYUAN_VL_TOKENS))
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2, 2]},
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_depth, num_attention_heads=4,
                  patch_size=4, spatial_merge_size=2, max_image_size=32, text_hidden_size=64, out_hidden_size=64)
    config = HunYuanVLConfig(text_config=text, vision_config=vision, image_token_id=ids[0], im_start_id=ids[1],
                             im_end_id=ids[2], im_newline_id=ids[3])
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = HunYuanVLForConditionalGeneration(config).eval()
    _peaked([*model.model.language_model.parameters(), *model.model.vision_tower.patch_merger.parameters(),
             *model.lm_head.parameters()], seed)
    model.generation_config.suppress_tokens = ids
    images = HunYuanVLImageProcessorPil(patch_size=4, merge_size=2,
                                        size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
    return model, HunYuanVLProcessor(images, tokenizer)


ERNIE45_VL_TOKENS = ("<|IMAGE_PLACEHOLDER|>", "<|IMAGE_START|>", "<|IMAGE_END|>", "<|VIDEO_PLACEHOLDER|>",
                     "<|VIDEO_START|>", "<|VIDEO_END|>")


def tiny_ernie45_vl(seed: int = 0, num_layers: int = 4, vision_depth: int = 2):
    """A tiny random stock transformers `Ernie4_5_VLMoeForConditionalGeneration` (CPU, fp32, eval mode, SDPA) and
    `Ernie45VLImageTextProcessor` with transformers' PIL image processor (images resized within 8 x 8 to 16 x 16 2x2
    windows of 4 px patches; "<image>" stands for an image): a `vision_depth`-block ViT with 2D RoPE, each 2x2 window
    resampled into one visual token, and a `num_layers`-deep decoder with 8 heads (GQA, 4 kv heads) and multimodal
    RoPE whose layers after the first send text and visual tokens (`moe_mm_token_type_ids`) to separate mixtures of 4
    experts (top 2, one shared expert)."""
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil,
    )

    from .models.ernie4_5_vl import Ernie45VLImageTextProcessor

    tokenizer = build_word_tokenizer(TINY_WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": list(ERNIE45_VL_TOKENS)})
    ids = dict(zip(ERNIE45_VL_TOKENS, tokenizer.convert_tokens_to_ids(list(ERNIE45_VL_TOKENS))))
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                moe_intermediate_size=[32, 16], moe_k=2, moe_num_experts=4, moe_num_shared_experts=1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4,
                  spatial_merge_size=2, rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    config = Ernie4_5_VLMoeConfig(text_config=text, vision_config=vision, image_token_id=ids["<|IMAGE_PLACEHOLDER|>"],
                                  image_start_token_id=ids["<|IMAGE_START|>"], image_end_token_id=ids["<|IMAGE_END|>"],
                                  video_token_id=ids["<|VIDEO_PLACEHOLDER|>"],
                                  video_start_token_id=ids["<|VIDEO_START|>"], video_end_token_id=ids["<|VIDEO_END|>"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Ernie4_5_VLMoeForConditionalGeneration(config).eval()
    _peaked([*model.model.language_model.parameters(), *model.model.resampler_model.parameters(),
             *model.lm_head.parameters()], seed)
    model.generation_config.suppress_tokens = list(ids.values())
    images = Ernie4_5_VLMoeImageProcessorPil(patch_size=4, merge_size=2,
                                             size={"shortest_edge": 8 * 8 * 16, "longest_edge": 16 * 16 * 16})
    return model, Ernie45VLImageTextProcessor(images, tokenizer, alias="<image>")


OVIS2_5_TOKENS = ("<image>", "<ovis_image_start>", "<ovis_image_end>", "<video>", "<ovis_video_start>",
                  "<ovis_video_end>")


def tiny_ovis2_5(seed: int = 0, num_layers: int = 4, vision_depth: int = 2, windowed: bool = True):
    """A tiny random stock transformers `Ovis2_5ForConditionalGeneration` (CPU, fp32, eval mode, SDPA) and
    `Ovis25ImageTextProcessor` with transformers' PIL image processor (images resized within 8 x 8 to 16 x 16 2x2
    windows of 4 px patches): a `vision_depth`-block ViT whose first block attends within attention windows of 2 x 2
    merge windows (without `windowed`, as in Ovis2.5's own configs, the whole image; the others always), its visual
    head over a 64-word visual vocabulary, and a
    `num_layers`-deep Qwen3 decoder with 8 heads (GQA, 4 kv heads)."""
    from transformers import Ovis2_5Config, Ovis2_5ForConditionalGeneration
    from transformers.models.ovis2_5.image_processing_pil_ovis2_5 import Ovis2_5ImageProcessorPil

    from .models.ovis2_5 import Ovis25ImageTextProcessor

    tokenizer = build_word_tokenizer(TINY_WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": list(OVIS2_5_TOKENS)})
    ids = dict(zip(OVIS2_5_TOKENS, tokenizer.convert_tokens_to_ids(list(OVIS2_5_TOKENS))))
    text = dict(model_type="qwen3", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=num_layers, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_depth, num_attention_heads=4,
                  patch_size=4, image_size=32, window_size=16, spatial_merge_size=2, vocab_size=64,
                  num_visual_indicator_tokens=4,
                  layer_types=["window_attention" if windowed else "full_attention"] + ["full_attention"] * (vision_depth - 1))
    config = Ovis2_5Config(text_config=text, vision_config=vision, image_token_id=ids["<image>"],
                           image_start_token_id=ids["<ovis_image_start>"], image_end_token_id=ids["<ovis_image_end>"],
                           video_token_id=ids["<video>"], video_start_token_id=ids["<ovis_video_start>"],
                           video_end_token_id=ids["<ovis_video_end>"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Ovis2_5ForConditionalGeneration(config).eval()
    _peaked([*model.model.language_model.parameters(), *model.model.multi_modal_projector.parameters(),
             *model.lm_head.parameters()], seed)
    model.generation_config.suppress_tokens = list(ids.values())
    images = Ovis2_5ImageProcessorPil(patch_size=4, merge_size=2,
                                      size={"shortest_edge": 8 * 8 * 16, "longest_edge": 16 * 16 * 16})
    return model, Ovis25ImageTextProcessor(images, tokenizer)


def random_images(n: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    """n random RGB images (blocks of colour plus noise), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, size=(4, 4, 3)).repeat(size // 4, 0).repeat(size // 4, 1)
        noise = rng.integers(-40, 40, size=base.shape)
        out.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
    return out
