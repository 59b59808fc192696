"""Pruning on a stock transformers Idefics3 or SmolVLM (`Idefics3ForConditionalGeneration`,
`SmolVLMForConditionalGeneration`: Idefics3-8B-Llama3, SmolVLM and SmolVLM2).

Both cut an image into square tiles (rows x cols of them, then the whole image shrunk to one tile; a small image is
that last tile alone), encode each with a SigLIP ViT without CLS, and fold every s x s window of patches into one
visual token (the connector's pixel shuffle, s = `scale_factor`: 2 on Idefics3, 169 tokens per 364 px tile; 4 on
SmolVLM, 64 per 512 px tile) before one linear projection. Inside the ViT a token is therefore a whole window
(`Idefics3Runner`: its s*s patches side by side), so stage-1 methods keep, drop or merge whole windows between its
blocks, and what leaves the tower is exactly what the pixel shuffle would have made of the kept windows. In the
prompt each tile is a run of image tokens between text tokens (`<fake_token_around_image>`, `<row_1_col_1>` ...
`<global-img>`); each kept token takes its own column (and RoPE position), as on LLaVA. An image's tiles end with
its whole-image tile, whose run follows the `<global-img>` tag: that is how the adapter groups the tiles into
images (`stats` count images; `kept_grid` has an entry per tile). Inside
`with method(model)` this one instance's `forward`, `prepare_inputs_for_generation` and
`_expand_inputs_for_generation` are replaced (`adapters.StockAdapter`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration

from .adapters import Layout, StockAdapter, StockProcessor, token_runs
from .experts import ExpertSpec, PixelShuffleWindows, _ViTRunner
from .vlm import fuse_and_prune, run_expert

__all__ = ["Idefics3Adapter", "Idefics3Runner", "idefics3_adapter", "load_processor", "CLASSES", "PROMPT_TOKENS"]

EXPERT = "vision"
# the tokens Idefics3Processor writes around and between tiles: an image's frame, one visual token, the end of a
# turn, the whole-image tile's tag and each tile's place (up to 6 x 6)
PROMPT_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                 *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))
CLASSES = (Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration)


def idefics3_adapter(model) -> Idefics3Adapter | None:
    """The adapter for a transformers Idefics3ForConditionalGeneration or SmolVLMForConditionalGeneration, or None
    for any other model."""
    return Idefics3Adapter(model) if type(model) in CLASSES else None


class Idefics3Runner(PixelShuffleWindows, _ViTRunner):
    """Idefics3's (and SmolVLM's) SigLIP ViT walked block by block, one token per pixel-shuffle window: tokens are
    (B, N, s*s*D), the N = (g/s)^2 windows of the g x g patch grid of a full tile in row-major order, each holding
    its s x s patches row by row. The blocks are SigLIP's, run on the kept windows' patches; `finalize` applies the
    tower's final norm to each patch and hands on the windows as the pixel shuffle would have."""

    kind, has_cls = "idefics3", False

    def __init__(self, tower, spec: ExpertSpec, scale: int):
        super().__init__(tower, spec)
        self.scale, self.window = scale, scale * scale

    def grid(self) -> tuple[int, int]:
        g = self.module.config.image_size // self.module.config.patch_size // self.scale
        return g, g

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(T, 3, S, S) full tiles -> (T, N, s*s*D): the tower's patch and position embeddings (every patch real)."""
        p = self.module.config.patch_size
        T, _, H, W = pixel_values.shape
        every = torch.ones(T, H // p, W // p, dtype=torch.bool, device=pixel_values.device)
        return self._pack(self.module.embeddings(pixel_values, patch_attention_mask=every))

    def run_attention(self, i, x, bias=None, grid=None):
        h, keys = _ViTRunner.run_attention(self, i, self._unpack(x), self._patch_bias(bias))
        return self._pack(h, window_major=True), keys

    def run_mlp(self, i, x):
        return self._pack(_ViTRunner.run_mlp(self, i, self._unpack(x)), window_major=True)

    def run_block(self, i, x, bias=None, grid=None):
        return self._pack(_ViTRunner.run_block(self, i, self._unpack(x), self._patch_bias(bias)), window_major=True)

    def query_key(self, i, x, grid=None):
        return _ViTRunner.query_key(self, i, self._unpack(x))

    def finalize(self, x):
        B, N, _ = x.shape
        return self.module.post_layernorm(x.reshape(B, N, self.window, -1)).reshape(B, N, -1)


class Idefics3Adapter(StockAdapter):
    """What the methods and the runtime need to know about one Idefics3 or SmolVLM (images; SmolVLM2's videos reach
    it as their frames, each a whole-image tile after its timestamp, so each frame is an image here).

    Attributes read by methods' `setup`: runners (one, "vision", walking each tile), expert_names, num_llm_layers,
    config (fusion "post", text_config, rank_table: the model config's `rank_table` attribute if it has one). The
    images come as the processor gives them: pixel_values (B, max_tiles, 3, S, S), a sample's tiles first and
    all-zero tiles after them where it has fewer, and pixel_attention_mask (B, max_tiles, S, S).
    """

    IMAGE_INPUTS = ("pixel_values", "pixel_attention_mask")
    PER_IMAGE_INPUTS = ()  # indexed by sample: generate repeats them with their rows
    WHOLE_IMAGE_TILE = -1  # an image's last tile shows all of it

    def __init__(self, model):
        cfg = model.config
        tower = model.model.vision_model
        spec = ExpertSpec(EXPERT, Idefics3Runner.kind, tower.config.image_size, {})
        self._locate(model, [Idefics3Runner(tower, spec, cfg.scale_factor)], language_model=model.model.text_model)

    @property
    def tokens_per_tile(self) -> int:
        return self.runners[0].num_patches

    def _real_tiles(self, images: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B * max_tiles, 3, S, S) the pixels as given and (B * max_tiles,) bool, which tiles are real (the model's
        rule: a tile that is all zeros is padding). ValueError for tiles of another size than the tower's, or with
        padded patches (images padded to a common size, not cut into tiles)."""
        pixels = images["pixel_values"]
        if pixels.dim() != 5:
            raise ValueError(f"pixel_values must be (batch, tiles, 3, height, width) as the processor gives them, "
                             f"got shape {tuple(pixels.shape)}")
        H, W = pixels.shape[-2:]
        side = self.runners[0].module.config.image_size
        if H != side or W != side:
            raise ValueError(f"tiles of {H}x{W} px: pruning needs the tower's {side}x{side} tiles (the processor's "
                             "max_image_size; its tiles always have it when it splits images)")
        flat = pixels.flatten(0, 1)
        real = (flat != 0).flatten(1).any(1)
        mask = images.get("pixel_attention_mask")
        if mask is not None:
            p = self.runners[0].module.config.patch_size
            patch_seen = mask.flatten(0, 1)[real].reshape(-1, H // p, p, W // p, p).bool().any(4).any(2)
            if not bool(patch_seen.all()):
                raise ValueError("pixel_attention_mask pads some patches of a tile: only whole tiles are supported "
                                 "(padded images, as without image splitting at mixed sizes, are not)")
        return flat, real

    def tiles(self, images: dict) -> torch.Tensor:
        """(T, 3, S, S) every sample's real tiles, one sample after another."""
        flat, real = self._real_tiles(images)
        return flat[real]

    def tile_counts(self, images: dict) -> torch.Tensor:
        """(B,) how many real tiles each sample has (its pixels are not copied)."""
        return self._real_tiles(images)[1].view(images["pixel_values"].shape[:2]).sum(1)

    def encode_expert(self, index: int, pixel_values: torch.Tensor, method):
        """The tower (expert 0) block by block on (T, 3, S, S) tiles, with stage-1 pruning."""
        runner = self.runners[index]
        return run_expert(runner, index, pixel_values.to(runner.module.dtype), method)

    def encode_images(self, images: dict, method):
        """Every tile's kept windows, projected into the LLM's width, then stage 2."""
        tokens = self.encode_expert(0, self.tiles(images), method)
        projected = self.model.model.connector.modality_projection(tokens.features)
        return fuse_and_prune([tokens], [projected], self.expert_names, method)

    def encoder_tokens(self, images: dict) -> list[int]:
        """The unpruned visual tokens of each tile."""
        return [self.tokens_per_tile] * int(self.tile_counts(images).sum())

    def layout(self, images: dict, input_ids: torch.Tensor | None = None) -> Layout:
        """Tile k (over the batch) is the k-th run of image tokens, N (tokens_per_tile) long, and an image's tiles
        end with the one that shows all of it: the run after the tag (`<global-img>`) that comes before every
        prompt's last run. ValueError unless every run is N tokens, each prompt has a run per tile of its sample,
        and the prompts agree on that tag."""
        if input_ids is None:
            raise ValueError("Idefics3's layout needs the prompt (each tile's place is read from its tokens)")
        counts = self.tile_counts(images)
        n, dev = self.tokens_per_tile, counts.device
        per_prompt = (input_ids == self.image_token_id).sum(1).tolist()
        rows, starts, ends, last = token_runs(input_ids, self.image_token_id)
        runs = (ends - starts).tolist()
        if any(r != n for r in runs) or per_prompt != (counts * n).tolist():
            raise ValueError(f"the prompts' image-token runs {runs} (per prompt {per_prompt} tokens) are "
                             f"not one run of {n} tokens per tile of the {counts.tolist()} tiles given per sample")
        tag = input_ids[rows, (starts - 1).clamp_min(0)]  # the token before each run
        tags = sorted(set(tag[last].tolist()))
        if len(tags) > 1:
            raise ValueError(f"the prompts' last image-token runs follow different tokens {tags}: each image should "
                             "end with its whole-image tile, as the processor writes it")
        ends_image = tag == tag[last][0] if len(tag) else tag.bool()
        tile_image = torch.cumsum(ends_image.long(), 0) - ends_image.long()  # the image each tile belongs to
        per_image = torch.bincount(tile_image, minlength=int(ends_image.sum()))
        first = torch.cumsum(per_image, 0) - per_image
        within = torch.arange(len(tile_image), device=dev) - first[tile_image]
        slot = within[:, None] * n + torch.arange(n, device=dev)
        return Layout(tile_image, slot, per_image * n)


def load_processor(path):
    """transformers' `Idefics3Processor` for an Idefics3 or SmolVLM checkpoint folder: its tokenizer, its image
    processor (the PIL one where torchvision is missing), image_seq_len from processor_config.json (169 without it)
    and its chat template. SmolVLM's own processor would also need a video processor (torchvision); for still
    images the two write the same prompts."""
    from transformers import AutoImageProcessor, AutoTokenizer, Idefics3Processor

    path = Path(path)
    length = 169
    if (path / "processor_config.json").is_file():
        length = json.loads((path / "processor_config.json").read_text()).get("image_seq_len", length)
    return Idefics3Processor(AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                             image_seq_len=length, chat_template=StockProcessor.read_chat_template(path))
