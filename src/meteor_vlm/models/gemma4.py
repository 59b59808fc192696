"""Pruning on a stock transformers Gemma 4 (`Gemma4ForConditionalGeneration`: Gemma 4 E2B, E4B, 26B A4B, 31B), on
images.

Gemma 4 encodes each image at its own aspect ratio: the processor resizes it to a grid of patches (the patch budget
`max_soft_tokens` * k^2, sides divisible by k patches) and hands on its patches row by row with their (x, y) places,
padded to the budget. The ViT adds learned x and y position embeddings and rotates queries and keys by both
coordinates (2D RoPE); after its last block every k x k window of patches is averaged into one visual token (k =
`pooling_kernel_size`, 3: up to 280 tokens by default), scaled, and brought into the LLM's width by an RMS norm and
one matrix. Inside the ViT a token is therefore a whole window (`Gemma4Runner`, PaddleOCR-VL's kind of runner:
images of one grid batched together), so stage-1 methods keep, drop or merge whole windows, and what leaves the tower
is what the pooling would have made of the kept windows. In the prompt each image is `<|image>`, one `<|image|>` per
visual token, `<image|>`; each kept token keeps its own column and RoPE position.

Its decoder adds to Gemma 3's what the shared runtime follows (`runtime.prefill` / `decode`): per-layer embeddings
(E2B, E4B: each token's own input to every layer, `DecoderParts.layer_inputs`, which leaves with its token), the last
layers reusing the keys and values of the last earlier layer of their kind (`DecoderParts.kv_sources`: dropping a
token after that layer masks it there from then on), full-attention layers with wider heads that rotate part of
each head, and an image's tokens seeing each other both ways on the sliding layers only (`use_bidirectional_attention
"vision"`, given `mm_token_type_ids`). Its videos and audio are refused while a method is attached. Inside
`with method(model)` this one instance's `forward`, `prepare_inputs_for_generation` and
`_expand_inputs_for_generation` are replaced (`adapters.StockAdapter`).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from transformers import Gemma4ForConditionalGeneration

from .adapters import StockAdapter, StockProcessor, encode_by_grid, one_run_per_item
from .experts import ExpertRunner, ExpertSpec
from .paddleocr_vl import PaddleOCRRunner
from .vlm import fuse_and_prune, run_expert

__all__ = ["Gemma4Adapter", "Gemma4Runner", "Gemma4ImageTextProcessor", "gemma4_adapter", "PROMPT_TOKENS"]

EXPERT = "vision"
PROMPT_TOKENS = ("<|image>", "<image|>", "<|image|>")  # an image's start, its end, one visual token


def gemma4_adapter(model) -> Gemma4Adapter | None:
    """The adapter for a transformers Gemma4ForConditionalGeneration, or None for any other model."""
    return Gemma4Adapter(model) if type(model) is Gemma4ForConditionalGeneration else None


class Gemma4Runner(PaddleOCRRunner):
    """Gemma 4's ViT (`model.vision_tower`) walked block by block over the images of one grid (`grid_thw` (1, h, w),
    in patches). A token is one k x k pooling window, its patches row by row side by side: tokens are (B, N, k*k*D),
    the windows row-major, so a token's grid index is its visual token's offset in the image's span. The blocks
    (Gemma's four norms around attention and MLP; per-head q, k, v norms; 2D RoPE; softmax scale 1) run on the kept
    windows' patches, each image a row of batched SDPA. Without grid_thw the runner only describes the encoder."""

    kind = "gemma4"

    def __init__(self, tower, spec: ExpertSpec, grid_thw: tuple[int, int, int] | None = None):
        ExpertRunner.__init__(self, tower, spec)
        self._setup(tower.config.pooling_kernel_size, grid_thw)

    @property
    def blocks(self):
        return self.module.encoder.layers

    @property
    def rotary_pos_emb(self):
        return self.module.encoder.rotary_emb

    def _positions(self, device) -> torch.Tensor:
        """(h*w, 2) each patch's (x, y), row-major, as the processor gives them."""
        _, h, w = self.grid_thw
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        return torch.stack([xs.flatten(), ys.flatten()], -1)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, h*w, 3*p*p) each image's real patches, row-major -> (B, N, k*k*D): the patch projection and the x and y
        position embeddings."""
        B, P = pixel_values.shape[:2]
        positions = self._positions(pixel_values.device).expand(B, P, 2)
        x = self.module.patch_embedder(pixel_values, positions, torch.zeros(B, P, dtype=torch.bool,
                                                                           device=pixel_values.device))
        return x[:, self._window_patches(x.device).flatten()].reshape(B, P // self.window, -1)

    def _rotation(self, grid: torch.Tensor, like: torch.Tensor):
        """(cos, sin), (B, L, d) each: the 2D rotary embedding of the patches of the windows in `grid` (B, N)."""
        if grid.device not in self._rotary:
            self._rotary[grid.device] = tuple(f[0] for f in self.rotary_pos_emb(like, self._positions(grid.device)[None]))
        patches = self._window_patches(grid.device)[grid].flatten(1)
        return tuple(f[patches].to(like.dtype) for f in self._rotary[grid.device])

    def _qkv(self, i: int, h: torch.Tensor, grid: torch.Tensor):
        """Block i's normed, rotated queries and keys and its normed values for the (B, L, D) patches h."""
        attn = self.blocks[i].self_attn
        n = self.blocks[i].input_layernorm(h)
        B, L, _ = n.shape
        cos, sin = self._rotation(grid, h)
        rotate = sys.modules[type(attn).__module__].apply_multidimensional_rope  # the tower's own rotation
        two = cos.new_zeros(1, 1, 2)  # only its last size (two coordinates) is read
        q = rotate(attn.q_norm(attn.q_proj(n).view(B, L, -1, attn.head_dim)), cos, sin, two)
        k = rotate(attn.k_norm(attn.k_proj(n).view(B, L, -1, attn.head_dim)), cos, sin, two)
        v = attn.v_norm(attn.v_proj(n).view(B, L, -1, attn.head_dim))
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def run_attention(self, i, x, bias=None, grid=None):
        block, h = self.blocks[i], self._patches(x)
        q, k, v = self._qkv(i, h, grid)
        mask = None if bias is None else bias.repeat_interleave(self.window, 1)[:, None, None, :].to(q.dtype)
        k_rep = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        out = F.scaled_dot_product_attention(q, k_rep, v, attn_mask=mask, scale=block.self_attn.scaling)
        out = block.self_attn.o_proj(out.transpose(1, 2).flatten(2))
        return self._tokens(h + block.post_attention_layernorm(out)), k

    def run_mlp(self, i, x):
        block, h = self.blocks[i], self._patches(x)
        return self._tokens(h + block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(h))))

    def query_key(self, i, x, grid=None):
        q, k, _ = self._qkv(i, self._patches(x), grid)
        return q, k.repeat_interleave(q.shape[1] // k.shape[1], dim=1), self.blocks[i].self_attn.scaling

    def finalize(self, x):
        """The kept windows as they are: the tower has no final norm (the pooling and projection come after)."""
        return x


class Gemma4Adapter(StockAdapter):
    """What the methods and the runtime need to know about one Gemma 4, on images.

    Attributes read by methods' `setup`: runners (one, "vision"; each batch is encoded by one runner per grid),
    expert_names, num_llm_layers, config (fusion "post", text_config, rank_table: the model config's `rank_table`
    attribute if it has one). The images come as the processor gives them: pixel_values (num_images, max_patches,
    3*p*p), each image's patches row-major and padding after them, image_position_ids (num_images, max_patches, 2)
    their (x, y) (-1 on padding), and mm_token_type_ids (B, T) (1 on image tokens), which, on a model with
    `use_bidirectional_attention` "vision", make each image's tokens see each other both ways on the sliding layers.
    """

    IMAGE_INPUTS = ("pixel_values", "image_position_ids", "mm_token_type_ids")
    PER_IMAGE_INPUTS = ("pixel_values", "image_position_ids")
    VIDEO_INPUTS_REFUSED = ("pixel_values_videos", "video_position_ids", "num_frames_per_video", "input_features",
                            "input_features_mask")

    def __init__(self, model):
        text = model.config.text_config
        if getattr(text, "use_bidirectional_attention", None) == "all":
            raise ValueError("a Gemma 4 whose every token sees every other (use_bidirectional_attention 'all') is no "
                             "causal LM: not supported")
        tower = model.model.vision_tower
        if tower is None:
            raise ValueError("this Gemma 4 has no vision tower")
        self._locate(model, [Gemma4Runner(tower, ExpertSpec(EXPERT, Gemma4Runner.kind, 0, {}))])

    def _grids(self, images: dict) -> torch.Tensor:
        """(images, 3) each image's (1, rows, cols) of patches, read from image_position_ids; ValueError where they do
        not fit the pixels or are not a whole grid, row-major, of whole pooling windows."""
        pixels, where = images["pixel_values"], images.get("image_position_ids")
        if where is None:
            raise ValueError("Gemma 4 needs image_position_ids with pixel_values (its processor returns both)")
        if pixels.dim() != 3 or where.shape != (*pixels.shape[:2], 2):
            raise ValueError(f"pixel_values (images, patches, 3*p*p) and image_position_ids (images, patches, 2) as the "
                             f"processor gives them, got shapes {tuple(pixels.shape)} and {tuple(where.shape)}")
        k = self.runners[0].module.config.pooling_kernel_size
        grids = []
        for pos in where:
            real = (pos >= 0).all(-1)
            n = int(real.sum())
            w, h = (int(pos[:n, 0].max()) + 1, int(pos[:n, 1].max()) + 1) if n else (0, 0)
            ys, xs = torch.meshgrid(torch.arange(h, device=pos.device), torch.arange(w, device=pos.device), indexing="ij")
            if (n == 0 or n != h * w or not bool(real[:n].all()) or h % k or w % k
                    or not torch.equal(pos[:n], torch.stack([xs.flatten(), ys.flatten()], -1))):
                raise ValueError(f"an image's image_position_ids are not a row-major grid of whole {k}x{k} windows "
                                 "followed by padding, as Gemma 4's processor gives them")
            grids.append((1, h, w))
        return torch.tensor(grids, device=where.device)

    def _counts(self, grids: torch.Tensor) -> list[int]:
        return (grids.prod(-1) // self.runners[0].window).tolist()

    def image_grid(self, images: dict, k: int) -> tuple[int, int]:
        """(rows, cols) of image k's visual tokens (its pooling windows), as the processor resized it."""
        _, h, w = self._grids(images)[k].tolist()
        return h // self.runners[0].merge, w // self.runners[0].merge

    def encoder_tokens(self, images: dict) -> list[int]:
        """The pooled visual tokens of each image."""
        return self._counts(self._grids(images))

    def encode_expert(self, index: int, images: dict, method):
        """The tower's kept windows of every image, with the method's stage-1 pruning, images of one grid encoded
        together: (images, most tokens, k*k*D), empty slots after an image's last token."""
        grids = self._grids(images)
        tower = self.runners[0].module
        pixels = images["pixel_values"].to(tower.dtype)

        def encode(g, members):
            batch = torch.stack([pixels[i, : g[1] * g[2]] for i in members])
            return run_expert(Gemma4Runner(tower, self.runners[0].spec, g), index, batch, method)

        return encode_by_grid(grids, self._counts(grids), encode)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(..., N, k*k*D) kept windows -> (..., N, text width): each window's patches averaged and scaled as the
        tower's pooler does (in float32), standardised where the tower is, then the model's embedder."""
        tower = self.runners[0].module
        pooled = features.unflatten(-1, (self.runners[0].window, -1)).float().mean(-2) * tower.config.hidden_size**0.5
        if tower.config.standardize:
            pooled = (pooled - tower.std_bias.float()) * tower.std_scale.float()
        return self.model.model.embed_vision(pooled.to(features.dtype))

    def encode_images(self, images: dict, method):
        """Every image's kept windows, projected into the LLM's width, then stage 2."""
        tokens = self.encode_expert(0, images, method)
        return fuse_and_prune([tokens], [self.project(tokens.features)], self.expert_names, method)

    def layout(self, images: dict, input_ids: torch.Tensor | None = None):
        """Image k's token g at offset g of the k-th run of image tokens."""
        return one_run_per_item(self.encoder_tokens(images), images["pixel_values"].device)

    def attention_blocks(self, input_ids: torch.Tensor, images: dict) -> torch.Tensor | None:
        """Each run of image tokens (mm_token_type_ids 1) its own block, on a model whose images see themselves both
        ways (`use_bidirectional_attention` "vision"; the runtime applies the blocks on its sliding layers only, as the
        stock model does); None otherwise or without mm_token_type_ids (the stock model is then causal everywhere)."""
        types = images.get("mm_token_type_ids")
        if types is None or self.config.text_config.use_bidirectional_attention != "vision":
            return None
        if types.shape != input_ids.shape:
            raise ValueError(f"mm_token_type_ids {tuple(types.shape)} must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}")
        image = (types == 1) | (types == 2)
        starts = image & ~F.pad(image, (1, 0))[:, :-1]
        return torch.where(image, starts.long().cumsum(1) - 1, -1)


class Gemma4ImageTextProcessor(StockProcessor):
    """What transformers' `Gemma4Processor` (which needs torchvision, for videos) does for images: a tokenizer and
    `Gemma4ImageProcessorPil`; each `<|image|>` in a prompt (one per image, as the chat template writes it) becomes
    `<|image>`, one `<|image|>` per pooled visual token of the next image, `<image|>`. Returns input_ids and
    attention_mask (PyTorch tensors, left-padded; `return_tensors` and `padding` are accepted for a processor's call
    signature), pixel_values, image_position_ids and mm_token_type_ids (1 on image tokens). Videos are refused."""

    boi_token, eoi_token, image_token = PROMPT_TOKENS

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        vocab = tokenizer.get_vocab()
        missing = [t for t in PROMPT_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer has no {missing} token(s): not a Gemma 4 tokenizer")
        self.image_token_id = vocab[self.image_token]
        self.tokenizer.padding_side = "left"

    @classmethod
    def from_pretrained(cls, path) -> Gemma4ImageTextProcessor:
        """From a Gemma 4 checkpoint folder: its tokenizer, preprocessor_config.json (or processor_config.json) and
        chat template."""
        from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

        return cls(Gemma4ImageProcessorPil.from_pretrained(path), cls.read_tokenizer(path), cls.read_chat_template(path))

    def __call__(self, images=None, text=(), videos=None, return_tensors="pt", padding=True):
        if videos:
            raise ValueError("Gemma4ImageTextProcessor takes images only")
        texts = [text] if isinstance(text, str) else list(text)
        images = list(images) if images is not None else []
        wanted = sum(t.count(self.image_token) for t in texts)
        if wanted != len(images):
            raise ValueError(f"the prompts hold {wanted} {self.image_token} tokens for {len(images)} images")
        out = {}
        if images:
            pixels = self.image_processor(images=images, return_tensors="pt")
            counts = iter(pixels.pop("num_soft_tokens_per_image").tolist())
            out.update(pixels)
            texts = [self._expand(t, counts) for t in texts]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], **out,
               "mm_token_type_ids": (enc["input_ids"] == self.image_token_id).long()}
        return out

    def _expand(self, text: str, counts) -> str:
        parts = text.split(self.image_token)
        return parts[0] + "".join(f"{self.boi_token}{self.image_token * next(counts)}{self.eoi_token}{p}"
                                  for p in parts[1:])
