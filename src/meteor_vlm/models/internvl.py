"""Pruning on a stock transformers InternVL (`InternVLForConditionalGeneration`: the "-hf" InternVL2.5, InternVL3 and
InternVL3.5 checkpoints) and Qianfan-OCR (`QianfanOCRForConditionalGeneration`: InternVL's model with its ViT's blocks
in a list of their own and a Qwen3 decoder).

InternVL cuts an image into 448 px tiles (and a thumbnail), encodes each with its ViT (InternViT, with CLS), and
folds every 2x2 window of patches into one visual token (its pixel shuffle) before the projector: 256 tokens per
tile. Inside the ViT a token is therefore a whole window (`InternVLRunner`: the window's four patches side by
side, in the pixel shuffle's order), so stage-1 methods keep, drop or merge whole windows between its blocks,
and what leaves the tower is exactly what the pixel shuffle would have made of the kept windows. In the prompt,
each image is `<img>` then 256 `<IMG_CONTEXT>` tokens per tile, tile after tile, then `</img>`; each kept token
takes its own column (and RoPE position), as on LLaVA. The model's forward gets no tile count per image, so the
adapter reads it from the prompt (each run of image tokens is one image). Inside `with method(model)` this one
instance's `forward`, `prepare_inputs_for_generation` and `_expand_inputs_for_generation` are replaced
(`adapters.StockAdapter`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import InternVLForConditionalGeneration, QianfanOCRForConditionalGeneration

from .adapters import Layout, StockAdapter, StockProcessor, tiles_layout, token_runs, tower_depth
from .experts import ExpertRunner, ExpertSpec, PixelShuffleWindows
from .vlm import fuse_and_prune, run_expert

__all__ = ["InternVLAdapter", "InternVLRunner", "InternVLImageTextProcessor", "internvl_adapter", "IMAGE_TOKENS"]

EXPERT = "vision"
IMAGE_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>")  # an image's start, end and one visual token


def internvl_adapter(model) -> InternVLAdapter | None:
    """The adapter for a transformers InternVLForConditionalGeneration or QianfanOCRForConditionalGeneration (its
    InternViT's blocks in `.layers`, with stochastic depth, which does nothing at inference), or None for any other
    model."""
    stock = (InternVLForConditionalGeneration, QianfanOCRForConditionalGeneration)
    return InternVLAdapter(model) if type(model) in stock else None


class InternVLRunner(PixelShuffleWindows, ExpertRunner):
    """InternVL's ViT walked block by block up to its feature layer (`depth` blocks), one token per pixel-shuffle
    window: tokens are (B, 1 + N, s*s*D), the CLS row first (its D values, then zeros), then the N = (g/s)^2
    windows of the g x g patch grid in row-major order, each holding its s x s patches row by row (the order the
    pixel shuffle concatenates them in). The blocks run on CLS and the kept windows' patches; `finalize` hands
    on the windows as the pixel shuffle would have (CLS dropped, the tower's final norm where the features are
    its last hidden state)."""

    kind, has_cls = "internvl", True

    def __init__(self, tower, spec: ExpertSpec, depth: int, scale: int, final_norm: bool):
        super().__init__(tower, spec)
        self._blocks = (tower.layers if hasattr(tower, "layers") else tower.encoder.layer)[:depth]  # Qianfan-OCR's
        self.scale, self.window = scale, scale * scale
        self.final_norm = final_norm

    @property
    def blocks(self):
        return self._blocks

    def grid(self) -> tuple[int, int]:
        g = self.module.config.image_size[0] // self.module.config.patch_size[0] // self.scale
        return g, g

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._pack(self.module.embeddings(pixel_values))

    def run_attention(self, i, x, bias=None, grid=None):
        block, h = self.blocks[i], self._unpack(x)
        heads = block.attention.num_heads
        (out, _), keys = self._catching_keys(block.attention.k_norm, heads, lambda: block.attention(
            block.layernorm_before(h), attention_mask=self._mask(self._patch_bias(bias), h)))
        return self._pack(h + block.lambda_1 * out, window_major=True), keys

    def run_mlp(self, i, x):
        block, h = self.blocks[i], self._unpack(x)
        out = block.mlp(block.layernorm_after(h))
        if block.lambda_2 is not None:
            out = block.lambda_2 * out
        return self._pack(h + out, window_major=True)

    def run_block(self, i, x, bias=None, grid=None):
        return self.run_mlp(i, self.run_attention(i, x, bias)[0])

    def query_key(self, i, x, grid=None):
        block, h = self.blocks[i], self._unpack(x)
        attn = block.attention
        n = block.layernorm_before(h)
        q = self._split_heads(attn.q_norm(attn.q_proj(n)), attn.num_heads)
        k = self._split_heads(attn.k_norm(attn.k_proj(n)), attn.num_heads)
        return q, k, attn.scale

    def finalize(self, x):
        windows = x[:, 1:]
        if not self.final_norm:
            return windows
        B, N, _ = windows.shape
        return self.module.layernorm(windows.reshape(B, N * self.window, -1)).reshape(B, N, -1)


class InternVLAdapter(StockAdapter):
    """What the methods and the runtime need to know about one `InternVLForConditionalGeneration` (images only).

    Attributes read by methods' `setup`: runners (one, "vision", walking each tile), expert_names,
    num_llm_layers, config (fusion "post", text_config, rank_table: the model config's `rank_table` attribute if
    it has one). In `stats`, encoder_tokens counts every tile's windows and kept_grid has an entry per tile.
    """

    IMAGE_INPUTS = ("pixel_values",)
    PER_IMAGE_INPUTS = ("pixel_values",)
    WHOLE_IMAGE_TILE = -1  # the thumbnail, after the tiles (the only tile of a one-tile image)

    def __init__(self, model: InternVLForConditionalGeneration):
        cfg = model.config
        layer = cfg.vision_feature_layer
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} is not supported "
                             "(only 'default': every patch, CLS dropped)")
        scale = round(1 / cfg.downsample_ratio)
        if scale * cfg.downsample_ratio != 1:
            raise ValueError(f"downsample_ratio={cfg.downsample_ratio}: only 1 / an integer folds whole windows")
        tower = model.model.vision_tower
        depth = tower_depth(layer, tower.config.num_hidden_layers)
        spec = ExpertSpec(EXPERT, InternVLRunner.kind, tower.config.image_size[0], {})
        self._locate(model, [InternVLRunner(tower, spec, depth, scale, final_norm=layer == -1)])

    @property
    def tokens_per_tile(self) -> int:
        return self.runners[0].num_patches

    def encode_expert(self, index: int, pixel_values: torch.Tensor, method):
        """The tower (expert 0) block by block on (num_tiles, 3, S, S) pixels, with stage-1 pruning."""
        runner = self.runners[index]
        return run_expert(runner, index, pixel_values.to(runner.module.dtype), method)

    def encode_images(self, images: dict, method):
        """Every tile's kept windows, projected into the LLM's width, then stage 2."""
        tokens = self.encode_expert(0, images["pixel_values"], method)
        projected = self.model.model.multi_modal_projector(tokens.features)
        return fuse_and_prune([tokens], [projected], self.expert_names, method)

    def encoder_tokens(self, images: dict) -> list[int]:
        """The unpruned visual tokens of each tile."""
        return [self.tokens_per_tile] * images["pixel_values"].shape[0]

    def tiles_per_image(self, input_ids: torch.Tensor, tiles: int) -> list[int]:
        """The tiles of each image, in row-major order over the batch: each run of image tokens in `input_ids`
        is one image, 256 (tokens_per_tile) per tile. ValueError if the runs do not add up to `tiles`."""
        _, starts, ends, _ = token_runs(input_ids, self.image_token_id)
        runs = (ends - starts).tolist()
        n = self.tokens_per_tile
        if any(r % n for r in runs) or sum(runs) != tiles * n:
            raise ValueError(f"the prompts' image-token runs {runs} are not {n} tokens per tile of the {tiles} tiles "
                             "given (the processor writes each image as <img>, 256 <IMG_CONTEXT> per tile, </img>)")
        return [r // n for r in runs]

    def layout(self, images: dict, input_ids: torch.Tensor | None = None) -> Layout:
        """Tile t of an image holds the image tokens t*N .. t*N + N - 1 of its run (N tokens per tile)."""
        pixels = images["pixel_values"]
        if input_ids is None:
            raise ValueError("InternVL's layout needs the prompt (each image's tiles are read from its tokens)")
        counts = self.tiles_per_image(input_ids, pixels.shape[0])
        return tiles_layout(counts, self.tokens_per_tile, images["pixel_values"].device)

    def expand_images(self, images: dict, input_ids: torch.Tensor, expand_size: int, context: dict | None = None) -> dict:
        """Every prompt's tiles `expand_size` times, the copies of a prompt one after another."""
        return self.expand_tiles(images, input_ids, expand_size)


class InternVLImageTextProcessor(StockProcessor):
    """What transformers' `InternVLProcessor` does for still images, without its video processor (which needs
    torchvision): a tokenizer and `GotOcr2ImageProcessorPil` cutting each image into tiles (`crop_to_patches`).
    Each `image_token` ("<IMG_CONTEXT>") in a prompt, one per image as the chat template writes it, becomes
    `<img>`, `image_seq_length` of it per tile of the next image, `</img>`. Videos come as lists of frames
    (`videos=[[frame, ...], ...]`), each `video_token` ("<video>") in a prompt for the next one: each frame is one
    tile (resized whole, as the stock video processor does; it also samples frames), written "FrameK: <img>...</img>"
    on a line of its own, so the model sees a video as one-tile images. Returns input_ids and attention_mask
    (PyTorch tensors, left-padded) and pixel_values (every image's tiles and every video's frames, in the order the
    prompts show them, as the stock processor merges them). `alias`, if given,
    is a shorter word that means the same (the tests' tiny models write "<image>")."""

    image_token, start_token, end_token = IMAGE_TOKENS[2], IMAGE_TOKENS[0], IMAGE_TOKENS[1]
    image_placeholder = IMAGE_TOKENS[2]
    video_token = video_placeholder = "<video>"

    def __init__(self, image_processor, tokenizer, image_seq_length: int = 256, chat_template: str | None = None,
                 alias: str | None = None):
        self.image_processor, self.tokenizer, self.alias = image_processor, tokenizer, alias
        self.image_seq_length = image_seq_length
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        missing = [t for t in IMAGE_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"the tokenizer has no {missing} token(s): not an InternVL tokenizer")
        self.tokenizer.padding_side = "left"

    @classmethod
    def from_pretrained(cls, path) -> InternVLImageTextProcessor:
        """From an InternVL "-hf" checkpoint folder: its tokenizer, preprocessor_config.json, image_seq_length
        from processor_config.json (256 without one) and its chat template (chat_template.jinja or .json). From a
        Qianfan-OCR folder, whose chat template writes an image as `image_placeholder_token` (processor_config.json;
        "<image>" without one), that word stands for an image (`alias`)."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        path = Path(path)
        settings, config = ({} if not (path / name).is_file() else json.loads((path / name).read_text())
                            for name in ("processor_config.json", "config.json"))
        alias = settings.get("image_placeholder_token", "<image>") if config.get("model_type") == "qianfan_ocr" else None
        return cls(GotOcr2ImageProcessorPil.from_pretrained(path), cls.read_tokenizer(path),
                   settings.get("image_seq_length", 256), cls.read_chat_template(path), alias=alias)

    def save_pretrained(self, path) -> None:
        """The tokenizer, preprocessor_config.json, processor_config.json and chat_template.jinja (if any)."""
        super().save_pretrained(path)
        (Path(path) / "processor_config.json").write_text(json.dumps({"image_seq_length": self.image_seq_length}))

    def __call__(self, images=None, text=(), videos=None, return_tensors="pt", padding=True):
        texts = [text] if isinstance(text, str) else list(text)
        if self.alias:
            texts = [t.replace(self.alias, self.image_token) for t in texts]
        images = list(images) if images is not None else []
        videos = [list(v) for v in videos] if videos is not None else []
        for token, given, kind in ((self.image_token, images, "images"), (self.video_token, videos, "videos")):
            wanted = sum(t.count(token) for t in texts)
            if wanted != len(given):
                raise ValueError(f"the prompts hold {wanted} {token} tokens for {len(given)} {kind}")
        if any(not v for v in videos):
            raise ValueError("a video must be a non-empty list of frames")
        tiles, image_tiles = [], iter([])
        if images:
            pixels = self.image_processor(images=images, crop_to_patches=True, return_tensors="pt")
            image_tiles = iter(pixels["pixel_values"].split([int(n) for n in pixels["num_patches"]]))
        frames = iter([self.image_processor(images=v, crop_to_patches=False, return_tensors="pt")["pixel_values"]
                       for v in videos])
        expanded = []
        for t in texts:  # each image's tiles, or each video's frames, in the order the prompts show them
            parts = re.split(f"({re.escape(self.image_token)}|{re.escape(self.video_token)})", t)
            for i in range(1, len(parts), 2):
                tiles.append(next(image_tiles) if parts[i] == self.image_token else next(frames))
                parts[i] = self._written(tiles[-1].shape[0], parts[i] == self.video_token)
            expanded.append("".join(parts))
        out = dict(self.tokenizer(expanded, return_tensors="pt", padding=True))
        return {**out, "pixel_values": torch.cat(tiles)} if tiles else out

    def _written(self, tiles: int, video: bool) -> str:
        """What stands in the prompt for an image of `tiles` tiles, or a video of that many frames (each frame an
        image of one tile, after "FrameK: ", one per line)."""
        one = self.start_token + self.image_token * self.image_seq_length * (1 if video else tiles) + self.end_token
        return "\n".join(f"Frame{k + 1}: {one}" for k in range(tiles)) if video else one
