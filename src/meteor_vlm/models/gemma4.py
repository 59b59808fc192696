"""Pruning on a stock transformers Gemma 4 (`Gemma4ForConditionalGeneration`: Gemma 4 E2B, E4B, 26B A4B, 31B), on
images and videos.

Gemma 4 encodes each image at its own aspect ratio: the processor resizes it to a grid of patches (the patch budget
`max_soft_tokens` * k^2, sides divisible by k patches) and hands on its patches row by row with their (x, y) places,
padded to the budget. The ViT adds learned x and y position embeddings and rotates queries and keys by both
coordinates (2D RoPE); after its last block every k x k window of patches is averaged into one visual token (k =
`pooling_kernel_size`, 3: up to 280 tokens by default), scaled, and brought into the LLM's width by an RMS norm and
one matrix. Inside the ViT a token is therefore a whole window (`Gemma4Runner`, PaddleOCR-VL's kind of runner:
images of one grid batched together), so stage-1 methods keep, drop or merge whole windows, and what leaves the tower
is what the pooling would have made of the kept windows. In the prompt each image is `<|image>`, one `<|image|>` per
visual token, `<image|>`; each kept token keeps its own column and RoPE position. A video is its frames, each
encoded as an image (with the video's smaller budget) and written as one between its time and the next frame's.

Its decoder adds to Gemma 3's what the shared runtime follows (`runtime.prefill` / `decode`): per-layer embeddings
(E2B, E4B: each token's own input to every layer, `DecoderParts.layer_inputs`, which leaves with its token), the last
layers reusing the keys and values of the last earlier layer of their kind (`DecoderParts.kv_sources`: dropping a
token after that layer masks it there from then on), full-attention layers with wider heads that rotate part of
each head, and an image's tokens seeing each other both ways on the sliding layers only (`use_bidirectional_attention
"vision"`, given `mm_token_type_ids`). Its audio is refused while a method is attached. Inside
`with method(model)` this one instance's `forward`, `prepare_inputs_for_generation` and
`_expand_inputs_for_generation` are replaced (`adapters.StockAdapter`).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from transformers import Gemma4ForConditionalGeneration

from . import runtime
from .adapters import Layout, StockAdapter, StockProcessor, encode_by_grid, items_in_prompt_order
from .experts import ExpertRunner, ExpertSpec
from .paddleocr_vl import PaddleOCRRunner
from .vlm import fuse_and_prune, run_expert

__all__ = ["Gemma4Adapter", "Gemma4Runner", "Gemma4ImageTextProcessor", "gemma4_adapter", "PROMPT_TOKENS",
           "VIDEO_TOKEN"]

EXPERT = "vision"
PROMPT_TOKENS = ("<|image>", "<image|>", "<|image|>")  # an image's (or frame's) start, its end, one visual token
VIDEO_TOKEN = "<|video|>"  # one visual token of a video frame


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
    """What the methods and the runtime need to know about one Gemma 4, on images and videos.

    Attributes read by methods' `setup`: runners (one, "vision"; each batch is encoded by one runner per grid),
    expert_names, num_llm_layers, config (fusion "post", text_config, rank_table: the model config's `rank_table`
    attribute if it has one). The images come as the processor gives them: pixel_values (num_images, max_patches,
    3*p*p), each image's patches row-major and padding after them, image_position_ids (num_images, max_patches, 2)
    their (x, y) (-1 on padding); the videos as pixel_values_videos and video_position_ids (every video's frames, one
    after another, each frame as an image) and num_frames_per_video; and mm_token_type_ids (B, T) (1 on image tokens,
    2 on video tokens), which, on a model with `use_bidirectional_attention` "vision", make each image's (and each
    frame's) tokens see each other both ways on the sliding layers. The encoder's tiles are every image, then every
    video's frames (`VisualTokens` rows in that order), each on its own grid; a video is one item of its frames, which
    the prompt shows one after another with their times between them. In `stats`, "images" counts a sample's images and
    videos; `kept_grid` has an entry per image and per frame.
    """

    IMAGE_INPUTS = ("pixel_values", "image_position_ids", "pixel_values_videos", "video_position_ids",
                    "num_frames_per_video", "mm_token_type_ids")
    PIXEL_INPUTS = ("pixel_values", "pixel_values_videos")
    PER_IMAGE_INPUTS = ("pixel_values", "image_position_ids", "pixel_values_videos", "video_position_ids",
                        "num_frames_per_video")
    VIDEO_INPUTS_REFUSED = ("input_features", "input_features_mask")  # audio
    _KINDS = (("pixel_values", "image_position_ids"), ("pixel_values_videos", "video_position_ids"))

    def __init__(self, model):
        text = model.config.text_config
        if getattr(text, "use_bidirectional_attention", None) == "all":
            raise ValueError("a Gemma 4 whose every token sees every other (use_bidirectional_attention 'all') is no "
                             "causal LM: not supported")
        tower = model.model.vision_tower
        if tower is None:
            raise ValueError("this Gemma 4 has no vision tower")
        self._locate(model, [Gemma4Runner(tower, ExpertSpec(EXPERT, Gemma4Runner.kind, 0, {}))])
        self.video_token_id = model.config.video_token_id

    def _grids_of(self, pixels: torch.Tensor, where: torch.Tensor | None, name: str) -> torch.Tensor:
        """(n, 3) each image's (or frame's) (1, rows, cols) of patches, read from its position ids `where`; ValueError
        where they do not fit the pixels or are not a whole grid, row-major, of whole pooling windows."""
        if where is None:
            raise ValueError(f"Gemma 4 needs {name}_position_ids with its pixels (its processor returns both)")
        if pixels.dim() != 3 or where.shape != (*pixels.shape[:2], 2):
            raise ValueError(f"{name} pixels (n, patches, 3*p*p) and {name}_position_ids (n, patches, 2) as the "
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
                raise ValueError(f"an {name}'s {name}_position_ids are not a row-major grid of whole {k}x{k} windows "
                                 "followed by padding, as Gemma 4's processor gives them")
            grids.append((1, h, w))
        return torch.tensor(grids, dtype=torch.long, device=where.device).view(-1, 3)

    def _tiles(self, images: dict) -> tuple[torch.Tensor, list[int], int]:
        """(tiles, 3) the grids of every image, then every video's frames; the item of each (images, then videos);
        and how many items are images."""
        grids, item, first_video = [], [], 0
        if images.get("pixel_values") is not None:
            grids.append(self._grids_of(images["pixel_values"], images.get("image_position_ids"), "image"))
            first_video = len(grids[0])
            item += list(range(first_video))
        if images.get("pixel_values_videos") is not None:
            frames = images.get("num_frames_per_video")
            if frames is None:
                raise ValueError("Gemma 4 needs num_frames_per_video with pixel_values_videos (its processor returns "
                                 "both)")
            grids.append(self._grids_of(images["pixel_values_videos"], images.get("video_position_ids"), "video"))
            frames = torch.as_tensor(frames).view(-1).tolist()
            if sum(frames) != len(grids[-1]) or min(frames, default=1) < 1:
                raise ValueError(f"num_frames_per_video {frames} does not split the {len(grids[-1])} frames given")
            item += [first_video + v for v, f in enumerate(frames) for _ in range(f)]
        if not grids:
            raise ValueError("Gemma 4 needs pixel_values or pixel_values_videos")
        return torch.cat(grids), item, first_video

    def _counts(self, grids: torch.Tensor) -> list[int]:
        return (grids.prod(-1) // self.runners[0].window).tolist()

    def image_grid(self, images: dict, k: int) -> tuple[int, int]:
        """(rows, cols) of tile k's visual tokens (its pooling windows), as the processor resized it."""
        _, h, w = self._tiles(images)[0][k].tolist()
        return h // self.runners[0].merge, w // self.runners[0].merge

    def encoder_tokens(self, images: dict) -> list[int]:
        """The pooled visual tokens of each tile (image, or video frame)."""
        return self._counts(self._tiles(images)[0])

    def encode_expert(self, index: int, images: dict, method):
        """The tower's kept windows of every image, then every video frame, with the method's stage-1 pruning, tiles
        of one grid encoded together: (tiles, most tokens, k*k*D), empty slots after a tile's last token."""
        grids = self._tiles(images)[0]
        tower = self.runners[0].module
        pixels = torch.cat([images[k].to(tower.dtype) for k, _ in self._KINDS if images.get(k) is not None])

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
        """Every image's and video frame's kept windows, projected into the LLM's width, then stage 2."""
        tokens = self.encode_expert(0, images, method)
        return fuse_and_prune([tokens], [self.project(tokens.features)], self.expert_names, method)

    def layout(self, images: dict, input_ids: torch.Tensor | None = None) -> Layout:
        """Each item (an image, or a video: its frames one after another) at its place in the prompts, where images
        and videos may come in any order (the prompt's image and video tokens tell); a tile's token g at its offset
        in its item's span. ValueError where the prompts' visual tokens do not split into the items given."""
        grids, item, first_video = self._tiles(images)
        counts = self._counts(grids)
        dev = grids.device
        per_item = [0] * (max(item) + 1)
        offset = []
        for tile, it in enumerate(item):
            offset.append(per_item[it])
            per_item[it] += counts[tile]
        order = list(range(len(per_item)))
        if first_video < len(per_item):  # videos: the prompts say where each image and video comes
            if input_ids is None:
                raise ValueError("with videos, Gemma 4's layout needs the prompt (where each image and video comes)")
            is_video = (input_ids[self.visual_columns(input_ids, images)] == self.video_token_id).tolist()
            order = items_in_prompt_order(is_video, per_item, first_video)
        place = torch.empty(len(order), dtype=torch.long, device=dev)
        place[torch.tensor(order, device=dev)] = torch.arange(len(order), device=dev)
        n = max(counts)
        grid = torch.arange(n, device=dev).expand(len(counts), n)
        slot = torch.where(grid < torch.tensor(counts, device=dev)[:, None],
                           grid + torch.tensor(offset, device=dev)[:, None], -1)
        return Layout(place[torch.tensor(item, device=dev)], slot, torch.tensor(per_item, device=dev)[order])

    def expand_images(self, images: dict, input_ids: torch.Tensor, expand_size: int, context: dict | None = None) -> dict:
        """Every prompt's images and videos `expand_size` times, the copies of a prompt one after another."""
        layout = self.layout({**images, **(context or {})}, input_ids)
        span = layout.span
        rows = self.visual_columns(input_ids, images).nonzero(as_tuple=True)[0][span.cumsum(0) - span]
        order = runtime.images_for_expanded_rows(rows, input_ids.shape[0], expand_size)  # item places, prompt order
        _, item, first_video = self._tiles(images)
        item_at = torch.empty_like(span)
        item_at[layout.tile_image] = torch.tensor(item, device=span.device)  # the item at each place
        items = item_at[order].tolist()
        out = {}
        if images.get("pixel_values") is not None:
            index = [i for i in items if i < first_video]
            out["pixel_values"], out["image_position_ids"] = (images["pixel_values"][index],
                                                              images["image_position_ids"][index])
        if images.get("pixel_values_videos") is not None:
            frames = torch.as_tensor(images["num_frames_per_video"]).view(-1)
            starts = [0, *frames.cumsum(0).tolist()]
            videos = [i - first_video for i in items if i >= first_video]
            index = [f for v in videos for f in range(starts[v], starts[v + 1])]
            out["pixel_values_videos"], out["video_position_ids"] = (images["pixel_values_videos"][index],
                                                                     images["video_position_ids"][index])
            out["num_frames_per_video"] = frames[videos]
        return out

    def attention_blocks(self, input_ids: torch.Tensor, images: dict) -> torch.Tensor | None:
        """Each run of image or video tokens (mm_token_type_ids 1 or 2: an image, a video frame) its own block, on a
        model whose images see themselves both ways (`use_bidirectional_attention` "vision"; the runtime applies the
        blocks on its sliding layers only, as the stock model does); None otherwise or without mm_token_type_ids (the
        stock model is then causal everywhere)."""
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
    """What transformers' `Gemma4Processor` (which needs torchvision, for its video processor) does for images and
    for videos given as frames: a tokenizer and `Gemma4ImageProcessorPil`. Each `<|image|>` in a prompt (one per image,
    as the chat template writes it) becomes `<|image>`, one `<|image|>` per pooled visual token of the next image,
    `<image|>`; each `<|video|>` becomes, for each frame of the next video, its time ("mm:ss", frame k at k / `fps`
    seconds; 24 fps where not given, as the stock processor assumes) and `<|image>`, one `<|video|>` per visual token
    of the frame, `<image|>`, the frames separated by spaces. A video is a list of frames (PIL images of one size),
    already sampled: each is sized by the image processor with the video budget (`video_soft_tokens`, 70 as the stock
    video processor's). Returns input_ids and attention_mask (PyTorch tensors, left-padded; `return_tensors` and
    `padding` are accepted for a processor's call signature), pixel_values and image_position_ids,
    pixel_values_videos, video_position_ids and num_frames_per_video, and mm_token_type_ids (1 on image tokens, 2 on
    video tokens)."""

    boi_token, eoi_token, image_token = PROMPT_TOKENS
    video_token = VIDEO_TOKEN

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None, video_soft_tokens: int = 70):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.video_soft_tokens = video_soft_tokens
        vocab = tokenizer.get_vocab()
        missing = [t for t in PROMPT_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer has no {missing} token(s): not a Gemma 4 tokenizer")
        self.image_token_id, self.video_token_id = vocab[self.image_token], vocab.get(self.video_token)
        self.tokenizer.padding_side = "left"

    @classmethod
    def from_pretrained(cls, path) -> Gemma4ImageTextProcessor:
        """From a Gemma 4 checkpoint folder: its tokenizer, image processor config, chat template, and the video
        processor's budget of visual tokens per frame where the folder has its config."""
        import json
        from pathlib import Path

        from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

        video = Path(path) / "video_preprocessor_config.json"
        budget = json.loads(video.read_text()).get("max_soft_tokens", 70) if video.is_file() else 70
        return cls(Gemma4ImageProcessorPil.from_pretrained(path), cls.read_tokenizer(path), cls.read_chat_template(path),
                   video_soft_tokens=budget)

    def save_pretrained(self, path) -> None:
        """As `StockProcessor.save_pretrained`, and the video budget in video_preprocessor_config.json."""
        import json
        from pathlib import Path

        super().save_pretrained(path)
        (Path(path) / "video_preprocessor_config.json").write_text(json.dumps({"max_soft_tokens": self.video_soft_tokens}))

    def __call__(self, images=None, text=(), videos=None, return_tensors="pt", padding=True, fps=None):
        texts = [text] if isinstance(text, str) else list(text)
        images = list(images) if images is not None else []
        videos = [list(v) for v in videos] if videos is not None else []
        if videos and self.video_token_id is None:
            raise ValueError(f"the tokenizer has no {self.video_token!r} token: it takes no videos")
        for token, given, kind in ((self.image_token, images, "images"), (self.video_token, videos, "videos")):
            wanted = sum(t.count(token) for t in texts)
            if wanted != len(given):
                raise ValueError(f"the prompts hold {wanted} {token} tokens for {len(given)} {kind}")
        if any(not v or len({f.size for f in v}) != 1 for v in videos):
            raise ValueError("a video must be a non-empty list of frames of one size")
        out = {}
        if images:
            pixels = self.image_processor(images=images, return_tensors="pt")
            counts = iter(pixels.pop("num_soft_tokens_per_image").tolist())
            out.update(pixels)
            texts = [self._expand(t, self.image_token, lambda: self._one(self.image_token, next(counts))) for t in texts]
        if videos:
            frames = self.image_processor(images=[f for v in videos for f in v], return_tensors="pt",
                                          max_soft_tokens=self.video_soft_tokens)
            per_frame = frames["num_soft_tokens_per_image"].tolist()
            firsts = torch.tensor([0, *[len(v) for v in videos]]).cumsum(0)[:-1].tolist()
            counts = iter(per_frame[i] for i in firsts)  # a video's frames share a size, so a count
            lengths = iter([len(v) for v in videos])
            rate = 24.0 if fps is None else float(fps)
            texts = [self._expand(t, self.video_token, lambda: self.written_video(next(lengths), next(counts), rate))
                     for t in texts]
            out.update(pixel_values_videos=frames["pixel_values"], video_position_ids=frames["image_position_ids"],
                       num_frames_per_video=torch.tensor([len(v) for v in videos]))
        enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        ids = enc["input_ids"]
        types = (ids == self.image_token_id).long()
        if self.video_token_id is not None:
            types = types + 2 * (ids == self.video_token_id).long()
        return {"input_ids": ids, "attention_mask": enc["attention_mask"], **out, "mm_token_type_ids": types}

    def _one(self, token: str, n: int) -> str:
        return f"{self.boi_token}{token * n}{self.eoi_token}"

    def written_video(self, frames: int, n: int, fps: float) -> str:
        """What stands in a prompt for a video of `frames` frames of `n` visual tokens each, sampled at `fps`."""
        times = [k / fps for k in range(frames)]
        return " ".join(f"{int(t // 60):02d}:{int(t % 60):02d} {self._one(self.video_token, n)}" for t in times)

    @staticmethod
    def _expand(text: str, token: str, written) -> str:
        parts = text.split(token)
        return parts[0] + "".join(written() + p for p in parts[1:])
