"""Pruning on a stock transformers Gemma 3 (`Gemma3ForConditionalGeneration`: Gemma 3 4B/12B/27B and their kin).

Gemma 3 encodes each image (896 px, or each pan-and-scan crop) with a SigLIP ViT without CLS and averages every
k x k window of its 64 x 64 patches into one visual token (k = 4: 256 tokens), which an RMS norm and one matrix
bring into the LLM's width. Inside the ViT a token is therefore a whole window (`Gemma3Runner`: its k*k patches
side by side), so stage-1 methods keep, drop or merge whole windows between its blocks, and what leaves the tower
is exactly what the pooling would have made of the kept windows. In the prompt each image is `<start_of_image>`,
one `<image_soft_token>` per visual token, `<end_of_image>`; each kept token takes its own column and RoPE
position, as on LLaVA.

Its decoder differs from a Llama in ways the shared runtime (`runtime.prefill` / `decode`) follows: most layers
attend within a sliding window (`DecoderParts.layer_types`), local and global layers rotate at different RoPE
bases, and, when the processor's `token_type_ids` are given, an image's tokens see each other both ways
(`attention_blocks`); pruned tokens leave those blocks and windows as they leave the causal mask. Inside
`with method(model)` this one instance's `forward`, `prepare_inputs_for_generation` and
`_expand_inputs_for_generation` are replaced (`adapters.StockAdapter`).
"""

from __future__ import annotations

import torch
from transformers import Gemma3ForConditionalGeneration

from .adapters import Layout, StockAdapter
from .experts import ExpertSpec
from .idefics3 import Idefics3Runner
from .vlm import fuse_and_prune, run_expert

__all__ = ["Gemma3Adapter", "Gemma3Runner", "gemma3_adapter", "PROMPT_TOKENS"]

EXPERT = "vision"
PROMPT_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")  # an image's start, end, one token


def gemma3_adapter(model) -> Gemma3Adapter | None:
    """The adapter for a transformers Gemma3ForConditionalGeneration, or None for any other model."""
    return Gemma3Adapter(model) if type(model) is Gemma3ForConditionalGeneration else None


class Gemma3Runner(Idefics3Runner):
    """Gemma 3's SigLIP ViT walked block by block, one token per pooling window: tokens are (B, N, k*k*D), the
    N = (g/k)^2 windows of the g x g patch grid in row-major order, each holding its k x k patches row by row. The
    blocks are SigLIP's, run on the kept windows' patches; `finalize` applies the tower's final norm to each
    patch (the projector averages each window's patches)."""

    kind = "gemma3"

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, N, k*k*D): the tower's patch and position embeddings."""
        return self._pack(self.module.embeddings(pixel_values))


class Gemma3Adapter(StockAdapter):
    """What the methods and the runtime need to know about one Gemma 3 (images, and pan-and-scan crops, each an
    image of its own in the prompt).

    Attributes read by methods' `setup`: runners (one, "vision"), expert_names, num_llm_layers, config (fusion
    "post", text_config, rank_table: the model config's `rank_table` attribute if it has one). The images come as
    the processor gives them: pixel_values (num_images, 3, S, S), and token_type_ids (B, T) (1 on image tokens),
    which make each image's tokens attend to each other both ways, as in the stock model.
    """

    IMAGE_INPUTS = ("pixel_values", "token_type_ids")
    PER_IMAGE_INPUTS = ("pixel_values",)

    def __init__(self, model):
        projector = model.model.multi_modal_projector
        tower = model.model.vision_tower
        tower = getattr(tower, "vision_model", tower)  # SiglipVisionModel wraps its transformer in older transformers
        spec = ExpertSpec(EXPERT, Gemma3Runner.kind, tower.config.image_size, {})
        self._locate(model, [Gemma3Runner(tower, spec, projector.kernel_size)])

    @property
    def tokens_per_image(self) -> int:
        return self.runners[0].num_patches

    def images_of(self, images: dict) -> torch.Tensor:
        """(num_images, 3, S, S) the pixels; ValueError for another shape or size than the tower's."""
        pixels = images["pixel_values"]
        side = self.runners[0].module.config.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, side, side):
            raise ValueError(f"pixel_values must be (images, 3, {side}, {side}) as the processor gives them, "
                             f"got shape {tuple(pixels.shape)}")
        return pixels

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(..., N, k*k*D) kept windows -> (..., N, text width): each window's patches averaged (the model's pooling),
        its RMS norm and projection."""
        projector = self.model.model.multi_modal_projector
        pooled = features.unflatten(-1, (self.runners[0].window, -1)).mean(-2)
        return projector.mm_soft_emb_norm(pooled) @ projector.mm_input_projection_weight

    def encode_expert(self, index: int, pixel_values: torch.Tensor, method):
        """The tower (expert 0) block by block on (num_images, 3, S, S) images, with stage-1 pruning."""
        runner = self.runners[index]
        return run_expert(runner, index, pixel_values.to(runner.module.dtype), method)

    def encode_images(self, images: dict, method):
        """Every image's kept windows, projected into the LLM's width, then stage 2."""
        tokens = self.encode_expert(0, self.images_of(images), method)
        return fuse_and_prune([tokens], [self.project(tokens.features)], self.expert_names, method)

    def encoder_tokens(self, images: dict) -> list[int]:
        """The unpruned visual tokens of each image."""
        return [self.tokens_per_image] * len(self.images_of(images))

    def layout(self, images: dict, input_ids: torch.Tensor | None = None) -> Layout:
        """Image k's window g at offset g of the k-th run of image tokens."""
        n, count = self.tokens_per_image, len(self.images_of(images))
        dev = images["pixel_values"].device
        return Layout(torch.arange(count, device=dev), torch.arange(n, device=dev).expand(count, n),
                      torch.full((count,), n, device=dev))

    def attention_blocks(self, input_ids: torch.Tensor, images: dict) -> torch.Tensor | None:
        """Each run of image tokens (token_type_ids 1) its own block, numbered within its prompt, as the stock model
        reads them; None without token_type_ids (the stock model is then causal everywhere)."""
        types = images.get("token_type_ids")
        if types is None:
            return None
        if types.shape != input_ids.shape:
            raise ValueError(f"token_type_ids {tuple(types.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
        image = types == 1
        starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
        return torch.where(image, starts.long().cumsum(1) - 1, -1)
