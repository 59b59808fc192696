"""Which models a pruning method can be attached to, and what stands in for each of them.

`with method(model)` asks `adapt(model)` for a *target*: an object with what the methods' `setup` reads
(`runners`, `expert_names`, `num_llm_layers`, `config.{rank_table, fusion, text_config}`) and a
`pruning(method)` context manager that runs the model with the method inside the block and leaves it
exactly as it was afterwards; a target may also have `check_method(method)`, asked before the method's
`setup`, to refuse what it cannot run. The project's `MultiEncoderVLM` is its own target. A stock transformers
VLM gets a `StockAdapter`: `LlavaAdapter` / `LlavaNextAdapter` / `LlavaNextVideoAdapter` / `LlavaOnevisionAdapter`
(`models/llava.py`), `Qwen2VLAdapter` / `Qwen3VLAdapter` (`models/qwen2_vl.py`), `InternVLAdapter`
(`models/internvl.py`), `Idefics3Adapter` (`models/idefics3.py`, for Idefics3 and SmolVLM), `Gemma3Adapter`
(`models/gemma3.py`), `Gemma4Adapter` (`models/gemma4.py`), `Llama4Adapter` (`models/llama4.py`),
`HunYuanVLAdapter` (`models/hunyuan_vl.py`), `Ernie45VLAdapter` (`models/ernie4_5_vl.py`), `Mistral3Adapter` /
`LlavaPixtralAdapter` (`models/mistral3.py`) or `PaliGemmaAdapter` (`models/paligemma.py`), among others, which
patch that one instance while the block runs.

A stock model's prompt holds one image token per visual token; `StockAdapter` does what every such model
shares (placing each kept token at its own image token's column, with that column's unpruned RoPE
position; the shared LLM runtime; generation), and each subclass only locates its model's parts and says
how its images become tokens (`encode_images`, `layout`, `rope_positions`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import runtime

__all__ = ["adapt", "SUPPORTED", "Layout", "StockAdapter", "StockProcessor", "encode_by_grid", "items_in_prompt_order",
           "one_run_per_item", "tiles_layout", "tower_depth", "token_runs"]

SUPPORTED = ("meteor_vlm.MultiEncoderVLM", "transformers' LlavaForConditionalGeneration",
             "VipLlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
             "LlavaNextVideoForConditionalGeneration", "LlavaOnevisionForConditionalGeneration",
             "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
             "Qwen3VLMoeForConditionalGeneration", "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration",
             "InternVLForConditionalGeneration", "QianfanOCRForConditionalGeneration",
             "Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration", "Gemma3ForConditionalGeneration",
             "Gemma4ForConditionalGeneration", "Llama4ForConditionalGeneration", "Mistral3ForConditionalGeneration", "LightOnOcrForConditionalGeneration",
             "PaliGemmaForConditionalGeneration", "AyaVisionForConditionalGeneration",
             "Glm4vForConditionalGeneration", "Glm4vMoeForConditionalGeneration", "Glm46VForConditionalGeneration",
             "GlmOcrForConditionalGeneration", "DeepseekVLForConditionalGeneration",
             "DeepseekVLHybridForConditionalGeneration", "JanusForConditionalGeneration",
             "Cohere2VisionForConditionalGeneration", "Lfm2VlForConditionalGeneration",
             "PaddleOCRVLForConditionalGeneration", "VideoLlama3ForConditionalGeneration", "Ovis2ForConditionalGeneration",
             "HunYuanVLForConditionalGeneration", "Ernie4_5_VLMoeForConditionalGeneration",
             "Ovis2_5ForConditionalGeneration")

_OUTPUT_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# keyword arguments generate or a caller may pass that change nothing here (output_* only when not true:
# `runtime.refuse_layer_outputs`)
_HARMLESS = ("cache_position", "output_attentions", "output_hidden_states", "return_dict", "is_first_iteration",
             "next_sequence_length")


def adapt(model, method_name: str = "a pruning method"):
    """The target `method_name` runs on for `model`; ValueError naming the class if it is not supported.
    An adapter passed in is returned as it is, so `with method(adapter)` runs on the adapter a caller holds
    (`meteor speed` times its parts)."""
    from .aya_vision import aya_vision_adapter
    from .cohere2_vision import cohere2_vision_adapter
    from .deepseek_vl import deepseek_vl_adapter
    from .ernie4_5_vl import ernie45_vl_adapter
    from .gemma3 import gemma3_adapter
    from .gemma4 import gemma4_adapter
    from .glm4v import glm4v_adapter
    from .hunyuan_vl import hunyuan_vl_adapter
    from .idefics3 import idefics3_adapter
    from .internvl import internvl_adapter
    from .lfm2_vl import lfm2_vl_adapter
    from .llama4 import llama4_adapter
    from .llava import llava_adapter
    from .mistral3 import mistral3_adapter
    from .ovis2 import ovis2_adapter
    from .ovis2_5 import ovis2_5_adapter
    from .paddleocr_vl import paddleocr_vl_adapter
    from .paligemma import paligemma_adapter
    from .qwen2_vl import qwen2_vl_adapter
    from .vlm import MultiEncoderVLM

    if isinstance(model, (MultiEncoderVLM, StockAdapter)):
        return model
    adapter = (mistral3_adapter(model) or llava_adapter(model) or qwen2_vl_adapter(model) or internvl_adapter(model)
               or idefics3_adapter(model) or gemma3_adapter(model) or gemma4_adapter(model)
               or paligemma_adapter(model) or aya_vision_adapter(model) or glm4v_adapter(model) or deepseek_vl_adapter(model)
               or cohere2_vision_adapter(model) or lfm2_vl_adapter(model)
               or paddleocr_vl_adapter(model) or ovis2_adapter(model)
               or llama4_adapter(model) or hunyuan_vl_adapter(model)
               or ernie45_vl_adapter(model) or ovis2_5_adapter(model))  # Mistral 3's first: it takes Pixtral LLaVAs
    if adapter is not None:
        return adapter
    raise ValueError(f"unsupported model class {type(model).__name__}: {method_name} runs on {', '.join(SUPPORTED)}")


@dataclass
class Layout:
    """How a batch of images' tokens sit among their image tokens in the prompt (the k-th image holds the next
    span[k] image tokens, in row-major order over the batch).

    tile_image: (num_tiles,) the image each tile of `VisualTokens` belongs to; slot: (num_tiles, N) the offset,
    within its image's span, of each of the tile's tokens by grid index (-1: a token the image does not show,
    e.g. cut off by LLaVA-NeXT's unpadding, or an empty slot); span: (num_images,) image tokens per image;
    extra_image, extra_offset: (M,) image tokens that are no patch (LLaVA-NeXT's row ends), and extra: (D,)
    their embedding, or (M, D) each one's (HunYuanVL's begin, newline and end tokens); mixed: what an adapter's
    `placed_features` needs for images whose tokens mix several patches (LLaVA-OneVision's interpolated grids and
    pooled video frames; there slot gives each token's place to the patch nearest to it), or None.
    """

    tile_image: torch.Tensor
    slot: torch.Tensor
    span: torch.Tensor
    extra_image: torch.Tensor | None = None
    extra_offset: torch.Tensor | None = None
    extra: torch.Tensor | None = None
    mixed: object | None = None


def one_run_per_item(counts: list[int], device) -> Layout:
    """The layout of items (images, tiles) each shown as one run of image tokens in prompt order, its tokens in grid
    order (Mistral 3's images, LFM2-VL's tiles): item k's token g at offset g of its run; `counts` each item's."""
    span = torch.tensor(counts, device=device)
    grid = torch.arange(int(span.max()), device=device).expand(len(span), -1)
    return Layout(torch.arange(len(span), device=device), grid.masked_fill(grid >= span[:, None], -1), span)


def tiles_layout(counts: list[int], n: int, device) -> Layout:
    """The layout of images cut into tiles of `n` visual tokens each, image k's `counts[k]` tiles one after another
    (InternVL's, Llama 4's): tile t of an image holds the image tokens t*n .. t*n + n - 1 of its span."""
    tile_image = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
    first = torch.cat([torch.zeros(1, dtype=torch.long, device=device), tile_image.new_tensor(counts).cumsum(0)])
    within = torch.arange(len(tile_image), device=device) - first[tile_image]
    return Layout(tile_image, within[:, None] * n + torch.arange(n, device=device),
                  torch.tensor(counts, device=device) * n)


def items_in_prompt_order(is_video: list[bool], counts: list[int], first_video: int) -> list[int]:
    """The order in which the prompts show a batch's items (its images, items 0 to first_video - 1, then its videos),
    read from whether each visual token of the prompts, in row-major order, is a video's: counts[i] tokens per item.
    ValueError where the tokens do not split into the items given."""
    order, p, nxt = [], 0, [0, first_video]
    while p < len(is_video):
        kind = int(is_video[p])
        i = nxt[kind]
        if i >= (first_video if kind == 0 else len(counts)):
            raise ValueError(f"the prompts hold more {('image', 'video')[kind]}s than the "
                             f"{first_video} image(s) and {len(counts) - first_video} video(s) given")
        order.append(i)
        nxt[kind], p = i + 1, p + counts[i]
    if sorted(order) != list(range(len(counts))) or p != len(is_video):
        raise ValueError(f"the prompts' image and video tokens do not split into the {first_video} image(s) "
                         f"and {len(counts) - first_video} video(s) given ({counts} tokens each)")
    return order


def encode_by_grid(grids: torch.Tensor, counts: list[int], encode):
    """`VisualTokens` of items whose encoder runs each on its own grid (Qwen2-VL's images and videos, Mistral 3's
    images), items of equal grid encoded together: `encode(grid, members)` gives the tokens of the items `members`
    (a list, in that order) of `grid` (a tuple, a row of `grids`). Returns them in item order, (items, most tokens,
    D) with empty slots after an item's last token (`counts`: each item's unpruned tokens), and each tapped block's
    features by token (zeros where a token was gone by then)."""
    from .vlm import VisualTokens

    same_grid: dict[tuple, list[int]] = {}
    for i, g in enumerate(grids.tolist()):
        same_grid.setdefault(tuple(g), []).append(i)
    parts = [(members, encode(g, members)) for g, members in same_grid.items()]
    first = parts[0][1]
    n, dev = max(counts), first.features.device
    features = first.features.new_zeros(len(counts), n, first.features.shape[-1])
    grid = torch.zeros(len(counts), n, dtype=torch.long, device=dev)
    size = torch.ones(len(counts), n, device=dev)
    valid = torch.zeros(len(counts), n, dtype=torch.bool, device=dev)
    for members, tokens in parts:
        k = tokens.features.shape[1]
        rows = torch.tensor(members, device=dev)
        features[rows, :k], grid[rows, :k] = tokens.features, tokens.grid_index
        size[rows, :k], valid[rows, :k] = tokens.size, tokens.mask
    taps = []  # each tapped block's features of every item, by token (zeros where a token was gone by then)
    for level, (first_tap, _) in enumerate(first.taps or []):
        dense = first_tap.new_zeros(len(counts), n, first_tap.shape[-1])
        for members, tokens in parts:
            tapped, at = tokens.taps[level]
            dense[torch.tensor(members, device=dev)[:, None].expand_as(at), at] = tapped
        taps.append((dense, torch.arange(n, device=dev).expand(len(counts), n)))
    return VisualTokens(features, torch.zeros_like(grid), grid, size, valid=None if bool(valid.all()) else valid,
                        taps=taps or None)


def attention_configs(config) -> list:
    """A transformers config and its sub-configs (text, vision, ...): those whose `_attn_implementation` says which
    attention their model's modules call."""
    subs = [getattr(config, name, None) for name in getattr(config, "sub_configs", {})]
    return [config, *(c for c in subs if c is not None)]


def token_runs(input_ids: torch.Tensor, token_id: int):
    """Each run of `token_id` in (B, T) `input_ids`, in row-major order: (rows, starts, ends, last), its row, its
    first column, the column after its last, and whether it is the last run of its row."""
    is_tok = (input_ids == token_id).int()
    edges = torch.diff(torch.nn.functional.pad(is_tok, (1, 1)), dim=1)  # +1 where a run starts, -1 after it ends
    (rows, starts), ends = (edges == 1).nonzero(as_tuple=True), (edges == -1).nonzero()[:, 1]
    last = torch.ones_like(rows, dtype=torch.bool)
    last[:-1] = rows[1:] != rows[:-1]
    return rows, starts, ends, last


def tower_depth(layer, num_layers: int) -> int:
    """The vision blocks to run for features read at `vision_feature_layer` `layer` (hidden_states[0] is the first
    block's input, -1 the last block's output); ValueError for a list of layers or one outside the tower."""
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer}: features concatenated from several layers are not supported")
    depth = layer if layer >= 0 else num_layers + 1 + layer
    if not 1 <= depth <= num_layers:
        raise ValueError(f"vision_feature_layer={layer} is outside the tower's {num_layers} blocks")
    return depth


class StockProcessor:
    """What the project's processors for stock checkpoints whose transformers processors need torchvision (for
    videos) share: a tokenizer (`self.tokenizer`), an image processor (`self.image_processor`), the checkpoint's
    chat template (`self.chat_template`), decoding, and reading and writing them in a checkpoint folder."""

    @staticmethod
    def read_chat_template(path) -> str | None:
        """The chat template of a checkpoint folder: chat_template.jinja or chat_template.json, None without one."""
        path = Path(path)
        if (path / "chat_template.jinja").is_file():
            return (path / "chat_template.jinja").read_text()
        if (path / "chat_template.json").is_file():
            return json.loads((path / "chat_template.json").read_text()).get("chat_template")
        return None

    @staticmethod
    def read_tokenizer(path):
        """A checkpoint folder's tokenizer: `AutoTokenizer`'s, except where its tokenizer_config.json names the generic
        fast tokenizer (`TokenizersBackend`, `PreTrainedTokenizerFast`: its tokenizer.json as it is), which
        AutoTokenizer would replace by the class of the folder's model type (Qwen3.5's rebuilds the vocabulary as its
        own byte-level BPE)."""
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        config = Path(path) / "tokenizer_config.json"
        named = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
        if named in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(path)
        return AutoTokenizer.from_pretrained(path)

    def save_pretrained(self, path) -> None:
        """The tokenizer, preprocessor_config.json and chat_template.jinja (if any) into `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        if self.chat_template:
            (path / "chat_template.jinja").write_text(self.chat_template)

    def apply_chat_template(self, conversation, add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        """The chat template (the checkpoint's) applied to `conversation` as text."""
        if not self.chat_template:
            raise ValueError("this processor has no chat template")
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, tokenize=tokenize,
                                                  add_generation_prompt=add_generation_prompt)

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)


class StockAdapter:
    """The shared part of the adapters of stock transformers VLMs (see the module docstring).

    Subclasses call `_locate(model, runners)` (which sets model, runners, expert_names, num_llm_layers, config,
    image_token_id and decoder), set IMAGE_INPUTS (the forward's keyword arguments that carry images, the pixels
    first), and define encode_images(images, method) -> VisualTokens, layout(images, input_ids) -> Layout and
    encoder_tokens(images) -> the unpruned tokens of each tile; rope_positions and check_method may be
    overridden.
    """

    IMAGE_INPUTS: tuple[str, ...] = ("pixel_values",)
    PIXEL_INPUTS: tuple[str, ...] = ("pixel_values",)  # those of IMAGE_INPUTS that carry pixels (Qwen2-VL: videos' too)
    PER_IMAGE_INPUTS: tuple[str, ...] = ("pixel_values",)  # indexed by image (generate must not repeat them by row)
    WHOLE_IMAGE_TILE: int = 0  # which of an image's tiles shows all of it (LLaVA-NeXT's base tile; InternVL, Idefics3: -1)
    video_token_id: int | None = None  # the prompt's video token, on models whose adapter takes videos
    VIDEO_INPUTS_REFUSED: tuple[str, ...] = ()  # a model's video inputs its adapter does not take (refused by name)
    FLAGS: tuple[str, ...] = ()  # other keywords the stock forward takes, accepted while False or None (generate checks)
    ROPE_AXES: int = 3  # multimodal RoPE's axes, the last of a caller's position_ids (HunYuanVL: 4, the first text's)

    def _locate(self, model, runners: list, language_model=None, lm_head=None) -> None:
        """Sets what every stock adapter holds, read from a transformers VLM with `model.lm_head` (or `lm_head`), a
        config with text_config and image_token_id (a `rank_table` attribute, if the config has one, is METEOR's) and
        its decoder `language_model` (by default `model.model.language_model`)."""
        cfg = model.config
        self.model, self.runners = model, runners
        self.expert_names = [r.spec.name for r in runners]
        self.num_llm_layers = cfg.text_config.num_hidden_layers
        self.config = SimpleNamespace(fusion="post", text_config=cfg.text_config, rank_table=getattr(cfg, "rank_table", None))
        self.image_token_id = cfg.image_token_id
        lm = model.model.language_model if language_model is None else language_model
        self.decoder = runtime.DecoderParts.of_backbone(lm, model.lm_head if lm_head is None else lm_head)
        decoder_type = getattr(cfg.text_config, "model_type", None)
        if decoder_type not in runtime.TESTED_DECODERS:
            warnings.warn(f"{type(model).__name__}'s {decoder_type!r} decoder is not among those the project's tests run "
                          "their oracles on: check the runtime on this model with `meteor verify --model PATH` (or "
                          "`mv.verify(model, processor)`) before trusting its numbers", runtime.UntestedDecoderWarning,
                          stacklevel=3)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def visual_columns(self, input_ids: torch.Tensor, images: dict | None = None) -> torch.Tensor:
        """(B, T) bool: the prompt's visual token columns for the image inputs `images`: its image tokens, and its
        video tokens (`video_token_id`, on models with videos) where videos (`pixel_values_videos`) are given
        (without, the stock models read them as text)."""
        columns = input_ids == self.image_token_id
        if self.video_token_id is not None and images is not None and images.get("pixel_values_videos") is not None:
            columns = columns | (input_ids == self.video_token_id)
        return columns

    def rope_positions(self, input_ids, attention_mask, images: dict | None):
        """(B, T) RoPE positions of the unpruned prompt (or (B, T, 3) for multimodal RoPE); None: the running
        count of real tokens."""
        return None

    def take_images(self, images: dict, index: torch.Tensor) -> dict:
        """The per-image inputs of the images `index` (num_images,) picks, in that order (by default each input's
        first dimension is the image)."""
        return {k: v[index] for k, v in images.items()}

    def expand_images(self, images: dict, input_ids: torch.Tensor, expand_size: int, context: dict | None = None) -> dict:
        """What generate's beams (or num_return_sequences) need: every prompt's images `expand_size` times, the
        copies of a prompt one after another, as its rows are repeated (repeating each image in place would hand
        a prompt with two images the wrong ones). `context`: the other image inputs, per prompt, as given."""
        span = self.layout({**images, **(context or {})}, input_ids).span
        rows = self.visual_columns(input_ids, images).nonzero(as_tuple=True)[0][span.cumsum(0) - span]  # their prompts
        return self.take_images(images, runtime.images_for_expanded_rows(rows, input_ids.shape[0], expand_size))

    def expand_tiles(self, images: dict, input_ids: torch.Tensor, expand_size: int) -> dict:
        """`expand_images` for a model whose pixel_values hold every image's tiles, image after image (the layout's
        tile_image): every prompt's tiles `expand_size` times, the copies of a prompt one after another."""
        layout = self.layout(images, input_ids)
        span = layout.span
        rows = (input_ids == self.image_token_id).nonzero(as_tuple=True)[0][span.cumsum(0) - span]
        order = runtime.images_for_expanded_rows(rows, input_ids.shape[0], expand_size)
        tiles = torch.cat([(layout.tile_image == i).nonzero()[:, 0] for i in order.tolist()])
        return {"pixel_values": images["pixel_values"][tiles]}

    def placed_features(self, visual, layout: Layout, vi: torch.Tensor, vj: torch.Tensor) -> torch.Tensor:
        """(K, D) what the LLM gets for the kept tokens (vi, vj) of `visual` that the layout places: by default their
        own features."""
        return visual.features[vi, vj]

    def layer_residuals(self, visual, vis_index: torch.Tensor) -> list[torch.Tensor] | None:
        """(B, L, D) tensors the runtime adds to the hidden states after LLM layers 0, 1, ... (`runtime.prefill`),
        for the spliced prompt whose columns hold the tokens `vis_index` (B, L) of `visual` (-1 elsewhere); None
        by default (Qwen3-VL's DeepStack)."""
        return None

    def attention_blocks(self, input_ids: torch.Tensor, images: dict) -> torch.Tensor | None:
        """(B, T) long: prompt columns that see each other both ways share an id >= 0 (-1 elsewhere), or None (by
        default: the LLM is causal everywhere). `images`: the forward's image inputs as given (Gemma 3's
        `token_type_ids` among them)."""
        return None

    def token_inputs(self, images: dict) -> dict[str, torch.Tensor]:
        """{keyword: (B, T) tensor over the prompt's columns} per-token inputs the decoder's layers take (ERNIE 4.5 VL's
        `moe_mm_token_type_ids`), read from the forward's image inputs `images`; none by default. Columns past a
        shorter one's end (tokens generate added) get 0."""
        return {}

    def check_method(self, method) -> None:
        """ValueError if this model cannot run `method` (asked when the method is attached, before its setup)."""

    # ---- attaching -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def pruning(self, method):
        """Replace this instance's forward, prepare_inputs_for_generation and _expand_inputs_for_generation while
        the block runs, and run its attention as SDPA (the runtime hands the language model's layers boolean masks,
        the vision blocks additive ones): a model loaded with eager or flash attention is switched to SDPA inside
        the block and back after it. A decoder that soft-caps its attention logits (Gemma 2) or has learned sinks
        (GPT-OSS), which SDPA cannot do, runs eager attention instead, on additive masks
        (`runtime.DecoderParts.layer_mask`, `runtime.attention_implementation`)."""
        model = self.model
        attention = [(c, c._attn_implementation) for c in attention_configs(model.config)]
        saved = {k: vars(model)[k] for k in ("forward", "prepare_inputs_for_generation", "_expand_inputs_for_generation")
                 if k in vars(model)}
        adapter = self

        def forward(input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                    use_cache=None, logits_to_keep=0, query_positions=None, **kwargs):
            return adapter.forward(method, input_ids, attention_mask, position_ids,
                                   cache if cache is not None else past_key_values, use_cache, logits_to_keep,
                                   query_positions, **kwargs)

        def prepare_inputs_for_generation(input_ids, past_key_values=None, attention_mask=None, cache=None, **kwargs):
            return runtime.generation_inputs(input_ids, cache if cache is not None else past_key_values, attention_mask,
                                             kwargs, lambda k: k in adapter.IMAGE_INPUTS)

        # generate() checks its keyword arguments against the forward's signature: name the image inputs in it
        signature = inspect.signature(forward)
        params = list(signature.parameters.values())
        images = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None)
                  for k in self.IMAGE_INPUTS + self.FLAGS]
        forward.__signature__ = signature.replace(parameters=params[:-1] + images + params[-1:])
        def expand_inputs_for_generation(expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
            per_image = {k: model_kwargs.pop(k) for k in adapter.PER_IMAGE_INPUTS if model_kwargs.get(k) is not None}
            context = {k: model_kwargs[k] for k in adapter.IMAGE_INPUTS if model_kwargs.get(k) is not None}
            model_kwargs = runtime.prompt_query(input_ids, model_kwargs)
            input_ids_out, model_kwargs = type(model)._expand_inputs_for_generation(
                model, expand_size, is_encoder_decoder, input_ids, **model_kwargs)
            if per_image:
                model_kwargs.update(adapter.expand_images(per_image, input_ids, expand_size, context) if expand_size > 1
                                    else per_image)
            return input_ids_out, model_kwargs

        model.forward = forward
        model.prepare_inputs_for_generation = prepare_inputs_for_generation
        model._expand_inputs_for_generation = expand_inputs_for_generation
        try:
            text = getattr(model.config, "text_config", None)
            for config, _ in attention:  # the text config after its parent: its own setting stands
                config._attn_implementation = runtime.attention_implementation(
                    config, sinks=self.decoder.sinks and config is text)
            yield
        finally:
            for config, implementation in attention:
                config._attn_implementation = implementation
            for k in ("forward", "prepare_inputs_for_generation", "_expand_inputs_for_generation"):
                if k in saved:
                    setattr(model, k, saved[k])
                else:
                    delattr(model, k)

    # ---- the prompt ----------------------------------------------------------------------------
    def embed_text(self, input_ids: torch.Tensor, with_images: bool) -> torch.Tensor:
        """(B, T, D) the embeddings of the prompt's tokens (its image tokens' overwritten after): the decoder's
        (Ovis2 embeds its image indicators with its visual table where images are given)."""
        return self.decoder.embed_tokens(input_ids)

    def splice(self, input_ids, attention_mask, visual, layout: Layout | None, positions=None,
               images: dict | None = None):
        """Text embeddings with each kept visual token at its image-token column (and each extra token of the
        layout at its own); pruned tokens' columns (and padding) leave the sequence, left-padded again.

        Returns embeds (B, L, D), valid (B, L), is_visual (B, L), vis_index (B, L) (tile * N + slot into
        `visual`, -1 elsewhere), positions (B, L[, 3]) (the unpruned RoPE positions), input_col (B, L) (the
        input_ids column each came from, -1 on padding) and owner (the sample of each tile). `images`: the
        forward's image inputs, which say which token kinds are visual (`visual_columns`).
        """
        B, T = input_ids.shape
        dev = input_ids.device
        is_img = self.visual_columns(input_ids, images)
        per_sample = is_img.sum(1)
        span = layout.span if layout is not None else torch.zeros(0, dtype=torch.long, device=dev)
        first = span.cumsum(0) - span  # each image's first image token, counted over the batch in row-major order
        ib, it = is_img.nonzero(as_tuple=True)
        if int(per_sample.sum()) != int(span.sum()) or (len(span) and bool((ib[first] != ib[first + span - 1]).any())):
            raise ValueError(f"the prompts hold {per_sample.tolist()} image tokens but the {len(span)} image(s) given "
                             f"need {span.tolist()} (the processor expands each image placeholder to them)")
        embeds = self.embed_text(input_ids.masked_fill(is_img, 0), layout is not None)
        mask = attention_mask.bool()
        positions = runtime.positions_from_mask(mask) if positions is None else positions.long()
        placed = torch.zeros_like(is_img)
        vis_index = torch.full((B, T), -1, dtype=torch.long, device=dev)
        owner = ib[first[layout.tile_image]].tolist() if layout is not None else []
        if layout is not None:
            embeds = embeds.clone()
            vi, vj = visual.mask.nonzero(as_tuple=True)
            offset = layout.slot[vi, visual.grid_index[vi, vj]]
            vi, vj, offset = vi[offset >= 0], vj[offset >= 0], offset[offset >= 0]  # tokens the image shows
            k = first[layout.tile_image[vi]] + offset
            rows, cols = ib[k], it[k]
            embeds[rows, cols] = self.placed_features(visual, layout, vi, vj).to(embeds.dtype)
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
    def forward(self, method, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0, query_positions=None, **kwargs):
        """The model's forward with `method` at every stage: logits aligned with input_ids (B, T, V); a pruned
        visual token's column gives the logits of the last token present before it."""
        from .vlm import prefill_stats

        images = {k: kwargs.pop(k, None) for k in self.IMAGE_INPUTS}
        refused = [k for k in self.VIDEO_INPUTS_REFUSED if kwargs.get(k) is not None]
        if refused:
            raise ValueError(f"{type(self.model).__name__}'s videos are not supported while a pruning method is "
                             f"attached (its images are; given {refused}: audio, where the model takes it, neither)")
        runtime.refuse_layer_outputs(kwargs, f"a {type(self.model).__name__} while a pruning method is attached")
        unknown = [k for k, v in kwargs.items() if k not in _HARMLESS and v is not None and v is not False]
        if unknown:
            raise ValueError(f"unexpected inputs while a pruning method is attached to a {type(self.model).__name__}: "
                             f"{unknown} (labels, inputs_embeds and per-call vision settings are not supported)")
        if input_ids is None:
            raise ValueError("input_ids are required while a pruning method is attached (inputs_embeds are not supported)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.bool()
        use_cache = getattr(self.config.text_config, "use_cache", True) if use_cache is None else use_cache
        parts = self.decoder
        state = runtime.get_state(cache)
        pixels = next((images[k] for k in self.PIXEL_INPUTS if images.get(k) is not None), None)
        if state is not None:  # decoding against a filled (maybe pruned) cache
            if pixels is not None:
                raise ValueError("images can only be given with the first (prefill) call, not with a filled cache")
            hidden = runtime.decode_new_tokens(parts, input_ids, attention_mask, cache)
        else:
            if use_cache and cache is None:
                cache = DynamicCache(config=self.config.text_config)
            blocks = self.attention_blocks(input_ids, images)
            token_inputs = self.token_inputs(images)
            for name, values in token_inputs.items():  # generate without a cache grows the prompt, not these
                if values.shape[0] != input_ids.shape[0] or values.shape[1] > input_ids.shape[1]:
                    raise ValueError(f"{name} {tuple(values.shape)} does not fit input_ids {tuple(input_ids.shape)}")
                token_inputs[name] = torch.nn.functional.pad(values, (0, input_ids.shape[1] - values.shape[1]))
            images = images if pixels is not None else None
            visual = self.encode_images(images, method) if images is not None else None
            layout = self.layout(images, input_ids) if images is not None else None
            if position_ids is not None and position_ids.dim() == 3:  # multimodal RoPE as transformers has it:
                # (3, B, T), or (4, B, T) with text positions first (HunYuanVL's four axes: all of them)
                position_ids = position_ids[-self.ROPE_AXES:].permute(1, 2, 0)
            positions = position_ids if position_ids is not None else self.rope_positions(input_ids, attention_mask, images)
            embeds, valid, is_vis, vis_index, positions, input_col, owner = self.splice(
                input_ids, attention_mask, visual, layout, positions, images)
            B, T = input_ids.shape
            qpos = torch.full((B,), T - 1, device=input_ids.device)
            if query_positions is not None:
                qpos = torch.as_tensor(query_positions, device=input_ids.device).long().expand_as(qpos)
            # the query: the last token still present at or before the query column (a prompt may end with an image)
            query_col = (torch.searchsorted(input_col.contiguous(), qpos[:, None].contiguous(), right=True) - 1)[:, 0]
            if blocks is not None:  # the spliced columns' blocks
                blocks = torch.where(input_col >= 0, blocks.gather(1, input_col.clamp_min(0)), -1)
            spliced_ids = input_ids.gather(1, input_col.clamp_min(0))
            per_token = {k: v.gather(1, input_col.clamp_min(0)) for k, v in token_inputs.items()}
            hidden, cols, kept = runtime.prefill(parts, embeds, valid, is_vis, query_col, cache if use_cache else None,
                                                 method.llm_layers(self.num_llm_layers), method.prune_llm, positions,
                                                 self.layer_residuals(visual, vis_index), blocks,
                                                 parts.layer_inputs(spliced_ids, embeds, is_vis | ~valid), per_token)
            survivors = torch.where(cols >= 0, vis_index.gather(1, cols.clamp_min(0)), -1)
            unpruned = self.encoder_tokens(images) if images is not None else []
            image_owner = list(dict(zip(layout.tile_image.tolist(), owner)).values()) if layout is not None else []
            method.stats.extend(prefill_stats(owner, is_vis & valid, visual, kept, survivors, self.num_llm_layers,
                                              unpruned, self.expert_names, image_owner))
            out_col = torch.where(cols >= 0, input_col.gather(1, cols.clamp_min(0)), -1)
            hidden = runtime.at_columns(hidden, out_col, torch.arange(T, device=input_ids.device).expand(B, T))
            if use_cache:
                runtime.get_state(cache).seen = T
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = parts.logits(hidden)
        return CausalLMOutputWithPast(logits=logits, **{_OUTPUT_CACHE: cache if use_cache else None})
