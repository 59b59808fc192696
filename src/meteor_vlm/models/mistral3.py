"""Pruning on a stock transformers Mistral 3 (`Mistral3ForConditionalGeneration`: Mistral Small 3.1 / 3.2 and their
kin), and on a LLaVA with a Pixtral tower (`LlavaForConditionalGeneration`: Pixtral-12B), the same without the merge.

Mistral 3 encodes each image at its own size (its longer side at most 1540 px, both sides multiples of 28) with a
Pixtral ViT: 14 px patches, 2D axial RoPE, each image attending within itself, no final norm. Its projector RMS-norms
each patch, concatenates every 2x2 window of patches (channel by channel, as `unfold` orders them) and merges it
into one visual token before a two-layer MLP. Inside the ViT a token is therefore a whole window
(`Mistral3Runner`: its four patches side by side), so stage-1 methods keep, drop or merge whole windows, and what
leaves the tower is exactly what the projector would have made of the kept windows. In the prompt an image is its
rows of `[IMG]` tokens, each row ended by `[IMG_BREAK]` and the last by `[IMG_END]` (ordinary text tokens here);
each kept token takes its own `[IMG]` column and RoPE position, as on LLaVA. Transformers' `PixtralProcessor`
needs torchvision, so `PixtralImageTextProcessor` writes the same inputs from its PIL image processor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LightOnOcrForConditionalGeneration, LlavaForConditionalGeneration, Mistral3ForConditionalGeneration
from transformers.models.pixtral.modeling_pixtral import apply_rotary_pos_emb

from .adapters import Layout, StockAdapter, StockProcessor, encode_by_grid, one_run_per_item, tower_depth
from .experts import ExpertRunner, ExpertSpec
from .vlm import VisualTokens, fuse_and_prune, run_expert

__all__ = ["Mistral3Adapter", "LlavaPixtralAdapter", "LightOnOcrAdapter", "Mistral3Runner", "PixtralImageTextProcessor",
           "mistral3_adapter", "IMAGE_TOKENS"]

EXPERT = "vision"
IMAGE_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")  # one visual token, a row's end, the image's end


def mistral3_adapter(model) -> Mistral3Adapter | None:
    """The adapter for a transformers Mistral3ForConditionalGeneration, a LightOnOcrForConditionalGeneration, or a
    LlavaForConditionalGeneration with a Pixtral tower; None for any other model."""
    if type(model) is Mistral3ForConditionalGeneration:
        return Mistral3Adapter(model)
    if type(model) is LightOnOcrForConditionalGeneration:
        return LightOnOcrAdapter(model)
    if type(model) is LlavaForConditionalGeneration and model.config.vision_config.model_type == "pixtral":
        return LlavaPixtralAdapter(model)
    return None


class Mistral3Runner(ExpertRunner):
    """The Pixtral ViT walked block by block over images of one patch grid (rows x cols patches; None: the runner
    only describes the tower, as the adapter's `runners` entry). A token is one m x m merge window holding its
    patches row by row, side by side: tokens are (B, N, m*m*D), N = rows*cols / m^2, row-major over the merged
    grid, so a token's grid index is its visual token's offset among the image's `[IMG]` tokens. The blocks run on
    the kept windows' patches, each image a row of batched SDPA, each patch with its own 2D rotary position."""

    kind, has_cls = "pixtral", False

    def __init__(self, tower, spec: ExpertSpec, merge: int, depth: int, grid: tuple[int, int] | None = None):
        super().__init__(tower, spec)
        self.merge, self.window = merge, merge * merge
        self._blocks = tower.transformer.layers[:depth]
        self.patch_grid = grid
        self.fixed_grid = grid is not None
        self._rotary: dict = {}

    @property
    def blocks(self):
        return self._blocks

    @property
    def out_dim(self) -> int:
        return self.module.config.hidden_size * self.window

    def grid(self) -> tuple[int, int]:
        if self.patch_grid is None:
            raise ValueError("Mistral 3's vision tower has no fixed grid: each image has its own (image_sizes)")
        rows, cols = self.patch_grid
        return rows // self.merge, cols // self.merge

    def _window_patches(self) -> torch.Tensor:
        """(N, m*m) each window's patches, as indices into the row-major patch grid."""
        rows, cols = self.patch_grid
        m = self.merge
        index = torch.arange(rows * cols).view(rows // m, m, cols // m, m).permute(0, 2, 1, 3)
        return index.reshape(-1, self.window)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images of this grid's size -> (B, N, m*m*D): the patch convolution and the pre-norm."""
        x = self.module.patch_conv(pixel_values.to(self.module.patch_conv.weight.dtype)).flatten(2).transpose(1, 2)
        x = self.module.ln_pre(x)
        order = self._window_patches().to(x.device).flatten()
        return x[:, order].reshape(x.shape[0], -1, self.window * x.shape[-1])

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1] * self.window, -1)

    def _tokens(self, h: torch.Tensor) -> torch.Tensor:
        return h.reshape(h.shape[0], h.shape[1] // self.window, -1)

    def _rotation(self, grid: torch.Tensor, like: torch.Tensor):
        """(cos, sin), (B, L, d) each: the axial rotary embedding of the patches of the windows in `grid` (B, N)."""
        if grid.device not in self._rotary:
            rows, cols = self.patch_grid
            ids = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).view(-1, 2)
            self._rotary[grid.device] = self.module.patch_positional_embedding(like, ids.to(grid.device))
        patches = self._window_patches().to(grid.device)[grid].flatten(1)  # (B, L) row-major patch indices
        return tuple(f[patches].to(like.dtype) for f in self._rotary[grid.device])

    def _qkv(self, i: int, h: torch.Tensor, grid: torch.Tensor):
        """Block i's rotated queries and keys and its values for the (B, L, D) patches h: (B, H, L, d) each."""
        attn = self.blocks[i].attention
        n = self.blocks[i].attention_norm(h)
        q, k, v = (self._split_heads(p(n), attn.num_heads) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = apply_rotary_pos_emb(q, k, *self._rotation(grid, h), unsqueeze_dim=1)  # the tower's own rotation
        return q, k, v

    def run_attention(self, i, x, bias=None, grid=None):
        block, h = self.blocks[i], self._patches(x)
        q, k, v = self._qkv(i, h, grid)
        mask = None if bias is None else bias.repeat_interleave(self.window, 1)[:, None, None, :].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=block.attention.scaling)
        return self._tokens(h + block.attention.o_proj(out.transpose(1, 2).flatten(2))), k

    def run_mlp(self, i, x):
        block, h = self.blocks[i], self._patches(x)
        return self._tokens(h + block.feed_forward(block.ffn_norm(h)))

    def run_block(self, i, x, bias=None, grid=None):
        return self.run_mlp(i, self.run_attention(i, x, bias, grid)[0])

    def query_key(self, i, x, grid=None):
        q, k, _ = self._qkv(i, self._patches(x), grid)
        return q, k, self.blocks[i].attention.scaling

    def finalize(self, x):
        return x  # the tower has no final norm; the projector norms and merges each window


class Mistral3Adapter(StockAdapter):
    """What the methods and the runtime need to know about one `Mistral3ForConditionalGeneration`. `runners` holds
    the tower's `Mistral3Runner` without a grid; each batch is encoded by one runner per image size. The images come
    as the processor gives them: pixel_values (num_images, 3, H, W), each padded at its bottom and right to the
    batch's largest, and image_sizes (num_images, 2), each image's own."""

    IMAGE_INPUTS = ("pixel_values", "image_sizes")
    PER_IMAGE_INPUTS = ("pixel_values", "image_sizes")
    TOWER, PROJECTOR = "vision_tower", "multi_modal_projector"  # where the model keeps them

    def __init__(self, model):
        self._setup(model, model.config.spatial_merge_size)

    @property
    def projector(self):
        return getattr(self.model.model, self.PROJECTOR)

    def _setup(self, model, merge: int) -> None:
        tower = getattr(model.model, self.TOWER)
        depth = tower_depth(getattr(model.config, "vision_feature_layer", -1), tower.config.num_hidden_layers)
        spec = ExpertSpec(EXPERT, Mistral3Runner.kind, 0, {})
        self._locate(model, [Mistral3Runner(tower, spec, merge, depth)])
        self.patch = tower.config.patch_size

    def _grids(self, images: dict) -> torch.Tensor:
        """(num_images, 2) each image's patch grid; ValueError without image_sizes or for sizes the merge cannot
        fold."""
        sizes = images.get("image_sizes")
        if sizes is None:
            raise ValueError("Mistral 3 needs image_sizes with pixel_values (its processor returns both)")
        grids = torch.as_tensor(sizes).long() // self.patch
        if bool((grids % self.runners[0].merge).any()) or len(grids) != len(images["pixel_values"]):
            raise ValueError(f"image_sizes {torch.as_tensor(sizes).tolist()} must give each of the "
                             f"{len(images['pixel_values'])} images a grid of {self.patch * self.runners[0].merge} px "
                             "windows")
        return grids

    def image_grid(self, images: dict, k: int) -> tuple[int, int]:
        """(rows, cols) of image k's visual tokens (its merged grid), as the processor resized it."""
        rows, cols = (self._grids(images)[k] // self.runners[0].merge).tolist()
        return rows, cols

    def _counts(self, grids: torch.Tensor) -> list[int]:
        return (grids.prod(-1) // self.runners[0].window).tolist()

    def encoder_tokens(self, images: dict) -> list[int]:
        """The merged visual tokens of each image."""
        return self._counts(self._grids(images))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(..., N, m*m*D) kept windows -> (..., N, text width): each patch RMS-normed, the window's patches
        concatenated channel by channel (the merger's unfold order) and merged, then the MLP."""
        projector = self.projector
        window = self.runners[0].window
        patches = projector.norm(features.unflatten(-1, (window, -1)))
        merged = projector.patch_merger.merging_layer(patches.transpose(-1, -2).flatten(-2))
        return projector.linear_2(projector.act(projector.linear_1(merged)))

    def encode_expert(self, index: int, images: dict, method) -> VisualTokens:
        """The tower's kept windows of every image (grouped by size, each group one runner), with the method's
        stage-1 pruning: (num_images, most windows, m*m*D), empty slots after an image's last window."""
        grids = self._grids(images)
        described = self.runners[0]

        def encode(g, members):
            rows, cols = g
            runner = Mistral3Runner(described.module, described.spec, described.merge, len(described.blocks), g)
            batch = images["pixel_values"][members][:, :, : rows * self.patch, : cols * self.patch]
            return run_expert(runner, index, batch, method)

        return encode_by_grid(grids, self._counts(grids), encode)

    def encode_images(self, images: dict, method):
        """Every image's kept windows, projected into the LLM's width, then stage 2."""
        tokens = self.encode_expert(0, images, method)
        return fuse_and_prune([tokens], [self.project(tokens.features)], self.expert_names, method)

    def layout(self, images: dict, input_ids: torch.Tensor | None = None) -> Layout:
        """Image k's window g at offset g among its `[IMG]` tokens (the row breaks are text)."""
        return one_run_per_item(self._counts(self._grids(images)), images["pixel_values"].device)


class LlavaPixtralAdapter(Mistral3Adapter):
    """A `LlavaForConditionalGeneration` with a Pixtral tower (Pixtral-12B): Mistral 3's tower and prompt without the
    merge, each patch one visual token (`[IMG]` per patch, each row ended by `[IMG_BREAK]`) through LLaVA's
    two-layer projector. ValueError for a select strategy other than "full" (every patch)."""

    def __init__(self, model):
        if model.config.vision_feature_select_strategy != "full":
            raise ValueError(f"vision_feature_select_strategy={model.config.vision_feature_select_strategy!r} with a "
                             "Pixtral tower is not supported (only 'full': every patch)")
        self._setup(model, 1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)


class LightOnOcrAdapter(Mistral3Adapter):
    """A `LightOnOcrForConditionalGeneration` (LightOnOCR): Mistral 3's tower and projector, kept under other names
    (`vision_encoder`, `vision_projection`), read whole, in front of a Qwen3 decoder. Its prompts write an image
    as one image token per window, without row breaks (`PixtralImageTextProcessor(row_breaks=False)`)."""

    TOWER, PROJECTOR = "vision_encoder", "vision_projection"


class PixtralImageTextProcessor(StockProcessor):
    """What transformers' `PixtralProcessor` does for still images, without torchvision: its PIL image processor
    (`PixtralImageProcessorPil`, each image resized to fit `size["longest_edge"]` with sides in multiples of
    patch_size * spatial_merge_size, padded to the batch's largest) and each `[IMG]` of the text expanded into the
    image's rows of `[IMG]` tokens, each row ended by `[IMG_BREAK]` and the last by `[IMG_END]`. Returns input_ids,
    attention_mask (left padding), pixel_values and image_sizes. Without `row_breaks` (LightOnOCR's
    `LightOnOcrProcessor`), each `image_token` becomes one of it per visual token and nothing else; `image_token`
    is the word that stands for an image in the text and for each of its visual tokens after ("[IMG]" by default;
    a LightOnOCR tokenizer's own `image_token` in `from_pretrained`)."""

    def __init__(self, image_processor, tokenizer, patch_size: int = 14, spatial_merge_size: int = 2,
                 chat_template: str | None = None, row_breaks: bool = True, image_token: str = IMAGE_TOKENS[0]):
        self.image_processor, self.tokenizer, self.chat_template = image_processor, tokenizer, chat_template
        self.patch_size, self.spatial_merge_size = patch_size, spatial_merge_size
        self.image_token, self.row_breaks = image_token, row_breaks

    @classmethod
    def from_pretrained(cls, path) -> PixtralImageTextProcessor:
        """The processor of a Mistral 3 checkpoint folder (processor_config.json's patch and merge sizes); of a
        LightOnOCR one (config.json's model_type "lighton_ocr"), without row breaks and with its tokenizer's image
        token."""
        from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

        path = Path(path)
        extra, config = ({} if not (path / name).is_file() else json.loads((path / name).read_text())
                         for name in ("processor_config.json", "config.json"))
        tokenizer = cls.read_tokenizer(path)
        lighton = config.get("model_type") == "lighton_ocr"
        token = (getattr(tokenizer, "image_token", None) or IMAGE_TOKENS[0]) if lighton else IMAGE_TOKENS[0]
        return cls(PixtralImageProcessorPil.from_pretrained(path), tokenizer, extra.get("patch_size", 14),
                   extra.get("spatial_merge_size", 2), cls.read_chat_template(path), row_breaks=not lighton,
                   image_token=token)

    def save_pretrained(self, path) -> None:
        super().save_pretrained(path)
        (Path(path) / "processor_config.json").write_text(json.dumps(
            {"processor_class": "PixtralProcessor", "patch_size": self.patch_size,
             "spatial_merge_size": self.spatial_merge_size}, indent=2))

    def __call__(self, images=None, text=(), return_tensors="pt", padding=True):
        texts = [text] if isinstance(text, str) else list(text)
        out = {}
        if images:
            flat = [im for group in images for im in (group if isinstance(group, (list, tuple)) else [group])]
            side = self.patch_size * self.spatial_merge_size
            pixels = self.image_processor(flat, patch_size={"height": side, "width": side}, return_tensors="pt")
            out = {"pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"]}
            rows = (pixels["image_sizes"] // side).tolist()
            expanded, k = [], 0
            for t in texts:
                parts = t.split(self.image_token)
                pieces = [parts[0]]
                for part in parts[1:]:
                    if k >= len(rows):
                        raise ValueError(f"the prompts hold more {self.image_token} than the {len(rows)} image(s) given")
                    h, w = rows[k]
                    k += 1
                    if not self.row_breaks:
                        pieces.append(self.image_token * (h * w) + part)
                        continue
                    pieces.append(" ".join([" ".join([IMAGE_TOKENS[0]] * w + [IMAGE_TOKENS[1]])] * h)[: -len(IMAGE_TOKENS[1])]
                                  + IMAGE_TOKENS[2] + part)
                expanded.append("".join(pieces))
            if k != len(rows):
                raise ValueError(f"the prompts hold {k} {self.image_token} but {len(rows)} image(s) were given")
            texts = expanded
        encoded = self.tokenizer(texts, return_tensors=return_tensors, padding=padding)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], **out}
