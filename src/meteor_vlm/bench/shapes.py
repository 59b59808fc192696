"""Random multi-encoder VLMs at the shapes of real checkpoints, for timing and memory (`meteor speed --shape`).

Their weights are random, so their time, memory and FLOPs mean something and their answers do not. A shape
is named after its decoder (SmolLM2-135M, Qwen2-0.5B, Vicuna-7B: the layer sizes of those checkpoints'
LLMs, vocabulary included); every shape has the same three experts, sized like common real ones:

- ``lowres``: a CLIP ViT-B/16 at 224 px (12 layers, width 768; 196 patches and a CLS token);
- ``hires``: Pix2Struct-base's vision encoder at 384 px (12 layers, width 768, patches of 16: 576 tokens);
- ``cnn``: ConvNeXt-T's first three stages at 384 px (stride 16: 576 tokens of width 384);

so the LLM sees 1348 visual tokens per image before pruning (LLaVA-1.5 sees 576, LLaVA-NeXT up to 2880).

`shaped_llava` builds a stock transformers LLaVA-1.5 instead: LLaVA-1.5's tower (CLIP ViT-L/14 at 336 px,
features from its second-to-last block, 576 image tokens) and two-layer projector in front of a shape's
decoder (`vicuna-7b` is LLaVA-1.5-7B's), run through the LLaVA adapter (`models/llava.py`).
"""

from __future__ import annotations

import torch

from ..models.experts import ExpertSpec
from ..models.processor import MultiEncoderProcessor
from ..models.vlm import MultiEncoderVLM, MultiEncoderVLMConfig

__all__ = ["SHAPES", "LLAVA_TOWER", "LLAVA_NEXT_GRIDS", "QWEN2_VL_VISION", "QWEN2_5_VL_VISION", "QWEN3_VL_VISION",
           "INTERNVIT_300M",
           "shape_experts", "shape_text_config", "shaped_model", "shaped_llava", "qwen2_vl_config", "shaped_qwen2_vl",
           "shaped_internvl", "SMOLVLM_VISION", "shaped_smolvlm", "SIGLIP_SO400M", "ONEVISION_GRIDS", "shaped_onevision",
           "GEMMA3_VISION", "shaped_gemma3"]

# LLaVA-1.5's vision tower: openai/clip-vit-large-patch14-336's vision config
LLAVA_TOWER = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)

# LLaVA-NeXT's high-resolution grids (height, width in pixels): 2x1, 1x2, 2x2, 3x1 and 1x3 tiles of 336 px
LLAVA_NEXT_GRIDS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# Qwen2-VL-2B's and -7B's vision encoder (675 M parameters): 32 blocks of 1280 on 14 px patches, 2x2 merged at its end
QWEN2_VL_VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_channels=3, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")

# Qwen2.5-VL's vision encoder (all sizes): 32 SwiGLU blocks of 1280, windows of 112 px but in 4 blocks, 2x2 merged
QWEN2_5_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2, hidden_act="silu", window_size=112,
                         fullatt_block_indexes=[7, 15, 23, 31])

# Qwen3-VL-2B's and -4B's vision encoder: 24 blocks of 1024 on 16 px patches, learned position embeddings (a 48 x 48
# grid resampled to each image's), 2x2 merged at its end, DeepStack mergers after blocks 5, 11 and 17
QWEN3_VL_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, in_channels=3, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, hidden_act="gelu_pytorch_tanh",
                       num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17])

# InternVL2.5 / InternVL3's 300 M vision encoder (InternViT-300M-448px): 24 blocks of 1024 with CLS and layer scale
# on 448 px tiles of 14 px patches; each 2x2 window folds into one of 256 visual tokens per tile
INTERNVIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=448, patch_size=14, attention_bias=True, use_qk_norm=False, norm_type="layer_norm",
                      layer_norm_eps=1e-6, layer_scale_init_value=0.1, hidden_act="gelu", use_mean_pooling=True)

# SmolVLM-256M's and -500M's vision encoder (93 M parameters): SigLIP-B/16 at 512 px, 12 blocks of 768 without CLS;
# each 4x4 window of its 32 x 32 patches folds into one of 64 visual tokens per tile
SMOLVLM_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=512, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)

# LLaVA-OneVision's vision tower (SigLIP-so400m-patch14-384, 400 M parameters): 27 blocks of 1152 without CLS, read
# whole at its last block: 729 tokens per 384 px tile
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)

# Gemma 3's vision tower (4B, 12B and 27B alike): SigLIP-so400m at 896 px, 64 x 64 patches, no pooling head; its
# projector averages each 4x4 window into one of 256 visual tokens
GEMMA3_VISION = dict(SIGLIP_SO400M, image_size=896, vision_use_head=False)

# LLaVA-OneVision's grids (height, width in pixels): 1x1 to 6x6 tiles of 384 px
ONEVISION_GRIDS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]

# the decoders: transformers config kwargs of real checkpoints' LLMs (vocabulary included, since the head's
# cost per decoded token depends on it)
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0,
                       tie_word_embeddings=True),
    # Qwen2-1.5B: the decoder of Qwen2-VL-2B
    "qwen2-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0,
                       tie_word_embeddings=True),
    # Qwen2.5-3B: the decoder of Qwen2.5-VL-3B
    "qwen2.5-3b": dict(model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0,
                       tie_word_embeddings=True),
    # Qwen3-1.7B: the decoder of Qwen3-VL-2B (per-head q/k norms)
    "qwen3-1.7b": dict(model_type="qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       rope_theta=1000000.0, tie_word_embeddings=True),
    # Gemma 3 4B's decoder (3.9 B parameters): 34 layers, five of every six within a 1024-token window, local and
    # global layers at their own RoPE bases (the global ones scaled 8x), per-head q/k norms
    "gemma3-4b": dict(model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                      sliding_window=1024, vocab_size=262208, tie_word_embeddings=True,
                      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                       "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0,
                                                          "factor": 8.0}}),
    # Vicuna-7B / Llama-2-7B: the decoder of LLaVA-1.5-7B and of the paper's METEOR numbers (about 13.5 GB in bf16)
    "vicuna-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0,
                      tie_word_embeddings=False),
}


def shape_experts() -> list[ExpertSpec]:
    """The three experts every shape has (see the module's docstring)."""
    vit_b = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    return [
        ExpertSpec("lowres", "clip", 224, dict(vit_b, image_size=224, patch_size=16)),
        ExpertSpec("hires", "pix2struct", 384,
                   dict(hidden_size=768, d_kv=64, d_ff=2048, num_hidden_layers=12, num_attention_heads=12,
                        patch_embed_hidden_size=3 * 16 * 16, seq_len=576), patch_size=16),
        ExpertSpec("cnn", "convnext", 384, dict(num_channels=3, hidden_sizes=[96, 192, 384], depths=[3, 3, 9],
                                                 num_stages=3)),
    ]


def _built(model_cls, config, dtype: torch.dtype, seed: int):
    """model_cls(config) with random weights from `seed`, in eval mode, built in `dtype` directly (a 7B decoder
    would not fit in memory in fp32 first)."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return model_cls(config).eval()
    finally:
        torch.set_default_dtype(default)


def shape_text_config(shape: str, tokenizer) -> dict:
    """The decoder config of a shape (a key of SHAPES), with the tokenizer's special ids."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {sorted(SHAPES)}")
    return dict(SHAPES[shape], max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def shaped_model(shape: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                 calibration_images: int = 4) -> tuple[MultiEncoderVLM, MultiEncoderProcessor]:
    """A random model of a named shape (a key of SHAPES) and its processor, in eval mode.

    The processor uses the synthetic benchmark's word tokenizer (ids below the LLM's vocabulary size), so
    `meteor speed` can feed it the benchmark's samples. The rank table METEOR's allocation needs is
    calibrated on `calibration_images` synthetic images.
    """
    from .. import synth
    from ..calibration import calibrate
    from ..train import build_tokenizer

    tokenizer = build_tokenizer()
    text = shape_text_config(shape, tokenizer)
    experts = shape_experts()
    config = MultiEncoderVLMConfig(
        experts=experts, text_config=text, fusion="post", projector="mlp",
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = _built(MultiEncoderVLM, config, dtype, seed)
    processor = MultiEncoderProcessor(tokenizer, experts)
    images = [s.image for s in synth.make_split(seed, per_family=1, image_size=384)][:calibration_images]
    model.config.rank_table = calibrate(model, processor, images, batch_size=2, progress=False)
    return model, processor


def shaped_llava(shape: str, dtype: torch.dtype = torch.float32, seed: int = 0, anyres: bool = False):
    """A random stock transformers `LlavaForConditionalGeneration` in LLaVA-1.5's layout (`LLAVA_TOWER`, features
    from block -2 without CLS, a GELU two-layer projector) with the decoder of a shape (a key of SHAPES), and
    its `LlavaProcessor` (336 px, 576 image tokens per <image>; the synthetic benchmark's word tokenizer), in
    eval mode and SDPA attention. With `anyres`, a `LlavaNextForConditionalGeneration` in LLaVA-NeXT's layout
    instead (the same tower and projector, LLaVA-NeXT's grids `LLAVA_NEXT_GRIDS` and row-end tokens; a square
    image of 672 px or more is a base tile and 2x2 high-resolution tiles: 2928 image tokens) with its
    `LlavaNextProcessor`."""
    from transformers import (CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextProcessor, LlavaProcessor)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from ..train import build_tokenizer

    tokenizer = build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config_cls, model_cls = (LlavaNextConfig, LlavaNextForConditionalGeneration) if anyres else (LlavaConfig,
                                                                                              LlavaForConditionalGeneration)
    config = config_cls(vision_config=CLIPVisionConfig(**LLAVA_TOWER), text_config=shape_text_config(shape, tokenizer),
                        image_token_id=image_token_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
                        projector_hidden_act="gelu", **({"image_grid_pinpoints": LLAVA_NEXT_GRIDS} if anyres else {}))
    config._attn_implementation = "sdpa"
    model = _built(model_cls, config, dtype, seed)
    model.generation_config.suppress_tokens = [image_token_id]  # as the project's model: <image> is never generated
    side = LLAVA_TOWER["image_size"]
    sizes = dict(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    images = LlavaNextImageProcessorPil(**sizes, image_grid_pinpoints=LLAVA_NEXT_GRIDS) if anyres else CLIPImageProcessorPil(**sizes)
    processor = (LlavaNextProcessor if anyres else LlavaProcessor)(
        image_processor=images, tokenizer=tokenizer, patch_size=LLAVA_TOWER["patch_size"],
        vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, processor


def qwen2_vl_config(shape: str, tokenizer, version: str = "2"):
    """The config of `shaped_qwen2_vl`: Qwen2-VL's vision encoder (`QWEN2_VL_VISION`; version "2.5":
    Qwen2.5-VL's, `QWEN2_5_VL_VISION`) merging into the width of a shape's decoder, whose multimodal RoPE
    splits each head's frequencies as Qwen2-VL's do (temporal, height, width = 1/4, 3/8, 3/8 of them:
    [16, 24, 24] for 128-wide heads). `tokenizer` holds Qwen's vision tokens (`qwen2_vl.add_vision_tokens`).
    Version "3": Qwen3-VL's (`QWEN3_VL_VISION`, DeepStack), its interleaved multimodal RoPE splitting the
    frequencies 3/8, 5/16, 5/16 ([24, 20, 20] for 128-wide heads)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    from ..models.qwen2_vl import VISION_TOKENS

    if version not in ("2", "2.5", "3"):
        raise ValueError(f"unknown Qwen-VL version {version!r}; choose '2', '2.5' or '3'")

    text = {k: v for k, v in shape_text_config(shape, tokenizer).items() if k != "model_type"}
    half = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"]) // 2
    section = [half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8]
    if version == "3":
        section = [half * 3 // 8, (half - half * 3 // 8) // 2, half - half * 3 // 8 - (half - half * 3 // 8) // 2]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta"), "mrope_section": section,
                               **({"mrope_interleaved": True} if version == "3" else {})}
    config_cls, vision = {"2": (Qwen2VLConfig, dict(QWEN2_VL_VISION, hidden_size=text["hidden_size"])),
                          "2.5": (Qwen2_5_VLConfig, dict(QWEN2_5_VL_VISION, out_hidden_size=text["hidden_size"])),
                          "3": (Qwen3VLConfig, dict(QWEN3_VL_VISION, out_hidden_size=text["hidden_size"]))}[version]
    ids = {field: tokenizer.convert_tokens_to_ids(token) for field, token in VISION_TOKENS.items()}
    return config_cls(vision_config=vision, text_config=text, tie_word_embeddings=text["tie_word_embeddings"], **ids)


def shaped_qwen2_vl(shape: str, dtype: torch.dtype = torch.float32, seed: int = 0, version: str = "2"):
    """A random stock transformers `Qwen2VLForConditionalGeneration` (`qwen2_vl_config`: Qwen2-VL's vision encoder
    before a shape's decoder; qwen2-1.5b makes it Qwen2-VL-2B), or with version "2.5" a
    `Qwen2_5_VLForConditionalGeneration` (qwen2.5-3b: Qwen2.5-VL-3B), or with version "3" a
    `Qwen3VLForConditionalGeneration` (qwen3-1.7b: Qwen3-VL-2B), and its `Qwen2VLImageTextProcessor`
    (Qwen2-VL's image processor defaults, which Qwen2.5-VL shares, on 16 px patches for Qwen3-VL; the synthetic
    benchmark's word tokenizer with Qwen's vision tokens), in eval mode and SDPA attention."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..models.qwen2_vl import Qwen2VLImageTextProcessor, add_vision_tokens
    from ..train import build_tokenizer

    tokenizer = build_tokenizer()
    ids = add_vision_tokens(tokenizer)
    config = qwen2_vl_config(shape, tokenizer, version)
    config._attn_implementation = "sdpa"
    model_cls = {"2": Qwen2VLForConditionalGeneration, "2.5": Qwen2_5_VLForConditionalGeneration,
                 "3": Qwen3VLForConditionalGeneration}[version]
    model = _built(model_cls, config, dtype, seed)
    model.generation_config.suppress_tokens = list(ids.values())
    patch = config.vision_config.patch_size
    return model, Qwen2VLImageTextProcessor(Qwen2VLImageProcessorPil(patch_size=patch), tokenizer,
                                            timestamps=version == "3")


def shaped_internvl(shape: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random stock transformers `InternVLForConditionalGeneration` in InternVL2.5 / InternVL3's layout
    (`INTERNVIT_300M`, its last layer's patches, 2x2 pixel shuffle, LayerNorm + GELU MLP projector) with the decoder
    of a shape (qwen2-0.5b: InternVL3-1B's layout, qwen2-1.5b: InternVL3-2B's), and its `InternVLImageTextProcessor` (448 px tiles, up to 12 and a thumbnail; the synthetic
    benchmark's word tokenizer with InternVL's image tokens), in eval mode and SDPA attention."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from ..models.internvl import IMAGE_TOKENS, InternVLImageTextProcessor
    from ..train import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS)})
    text = shape_text_config(shape, tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKENS[2])
    config = InternVLConfig(vision_config=INTERNVIT_300M, text_config=text, image_token_id=image_token_id,
                            image_seq_length=256, downsample_ratio=0.5,
                            tie_word_embeddings=text.get("tie_word_embeddings", False))
    config._attn_implementation = "sdpa"
    model = _built(InternVLForConditionalGeneration, config, dtype, seed)
    model.generation_config.suppress_tokens = [tokenizer.convert_tokens_to_ids(t) for t in IMAGE_TOKENS]
    side = INTERNVIT_300M["image_size"]
    images = GotOcr2ImageProcessorPil(size={"height": side, "width": side}, max_patches=12,
                                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return model, InternVLImageTextProcessor(images, tokenizer, image_seq_length=256)


def shaped_smolvlm(shape: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random stock transformers `SmolVLMForConditionalGeneration` in SmolVLM-256M / -500M's layout
    (`SMOLVLM_VISION`, 4x4 pixel shuffle, one linear projection) with the decoder of a shape (smollm2-135m:
    SmolVLM-256M's), and transformers' `Idefics3Processor` with SmolVLM's image processor defaults (an image scaled
    to 2048 px on its longer side, cut into 512 px tiles, plus the whole image as one more tile: 17 tiles of 64
    tokens for a square image; the synthetic benchmark's word tokenizer with the processor's tokens), in eval mode
    and SDPA attention."""
    from transformers import Idefics3Processor, SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from ..models.idefics3 import PROMPT_TOKENS
    from ..train import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(PROMPT_TOKENS)})
    text = shape_text_config(shape, tokenizer)
    scale = 4
    config = SmolVLMConfig(vision_config=SMOLVLM_VISION, text_config=text, scale_factor=scale,
                           image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                           tie_word_embeddings=text.get("tie_word_embeddings", False))
    config._attn_implementation = "sdpa"
    model = _built(SmolVLMForConditionalGeneration, config, dtype, seed)
    model.generation_config.suppress_tokens = tokenizer.convert_tokens_to_ids(list(PROMPT_TOKENS))
    side = SMOLVLM_VISION["image_size"]
    images = SmolVLMImageProcessorPil(size={"longest_edge": 4 * side}, max_image_size={"longest_edge": side},
                                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
    tokens = (side // SMOLVLM_VISION["patch_size"] // scale) ** 2
    return model, Idefics3Processor(images, tokenizer, image_seq_len=tokens)


def shaped_onevision(shape: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random stock transformers `LlavaOnevisionForConditionalGeneration` in LLaVA-OneVision's layout
    (`SIGLIP_SO400M` read whole, a GELU two-layer projector, `ONEVISION_GRIDS`, anyres_max_9, row-end tokens) with
    the decoder of a shape (qwen2-0.5b: LLaVA-OneVision-0.5B's), and its `LlavaOnevisionImageTextProcessor`
    (the synthetic benchmark's word tokenizer), in eval mode and SDPA attention. `meteor speed` draws 1152 px
    images for it: a base tile and 3x3 tiles, 7371 image tokens."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    from ..models.llava import LlavaOnevisionImageTextProcessor
    from ..train import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<video>"]})  # its processor counts video tokens
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**SIGLIP_SO400M),
                                  text_config=shape_text_config(shape, tokenizer), image_token_id=image_token_id,
                                  video_token_id=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", projector_hidden_act="gelu",
                                  image_grid_pinpoints=ONEVISION_GRIDS, vision_aspect_ratio="anyres_max_9")
    config._attn_implementation = "sdpa"
    model = _built(LlavaOnevisionForConditionalGeneration, config, dtype, seed)
    model.generation_config.suppress_tokens = [image_token_id, config.video_token_id]
    side = SIGLIP_SO400M["image_size"]
    images = LlavaOnevisionImageProcessorPil(size={"height": side, "width": side}, image_grid_pinpoints=ONEVISION_GRIDS,
                                             image_mean=[0.5] * 3, image_std=[0.5] * 3)
    tokens = (side // SIGLIP_SO400M["patch_size"]) ** 2
    return model, LlavaOnevisionImageTextProcessor(image_processor=images, tokenizer=tokenizer, num_image_tokens=tokens,
                                                   vision_feature_select_strategy="full")


def shaped_gemma3(shape: str = "gemma3-4b", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random stock transformers `Gemma3ForConditionalGeneration` in Gemma 3's layout (`GEMMA3_VISION`, 256 visual
    tokens per 896 px image) with a Gemma 3 decoder shape (gemma3-4b: Gemma 3 4B's), and transformers'
    `Gemma3Processor` with the PIL image processor (the synthetic benchmark's word tokenizer with Gemma 3's image
    tokens), in eval mode and SDPA attention. ValueError for a shape whose decoder is not Gemma 3's."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from ..models.gemma3 import PROMPT_TOKENS
    from ..train import build_tokenizer

    if SHAPES.get(shape, {}).get("model_type") != "gemma3_text":
        raise ValueError(f"--gemma3 needs a Gemma 3 decoder shape: "
                         f"{sorted(k for k, v in SHAPES.items() if v['model_type'] == 'gemma3_text')}, got {shape!r}")
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(PROMPT_TOKENS)})
    tokenizer._set_model_specific_special_tokens(special_tokens=dict(zip(("boi_token", "eoi_token", "image_token"),
                                                                         PROMPT_TOKENS)))
    ids = tokenizer.convert_tokens_to_ids(list(PROMPT_TOKENS))
    tokens = 256
    config = Gemma3Config(text_config=shape_text_config(shape, tokenizer), vision_config=GEMMA3_VISION,
                          mm_tokens_per_image=tokens, boi_token_index=ids[0], eoi_token_index=ids[1],
                          image_token_index=ids[2])
    config._attn_implementation = "sdpa"
    model = _built(Gemma3ForConditionalGeneration, config, dtype, seed)
    model.generation_config.suppress_tokens = ids
    side = GEMMA3_VISION["image_size"]
    images = Gemma3ImageProcessorPil(size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return model, Gemma3Processor(images, tokenizer, image_seq_length=tokens)
