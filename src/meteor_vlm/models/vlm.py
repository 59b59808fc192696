"""The multi-encoder VLM: several vision experts, a projector per expert (or EAGLE's channel fusion),
and a transformers Llama/Qwen2 decoder, as one `PreTrainedModel` with generate / save / load.

Data flows one way: images -> experts (stage 1) -> projectors -> fusion (stage 2) -> LLM (stage 3).
The prompt holds one image placeholder token per image; the model splices each image's visual
tokens in its place, so the number of visual tokens may change with pruning.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .. import ops
from ..methods.base import EncoderMerge, EncoderPoint, FusionPoint, PruningMethod
from . import runtime
from .experts import ExpertSpec, build_expert, runner_for

# transformers 5.24 renamed the outputs' and generate's `past_key_values` to `cache`; the model takes both
_OUTPUT_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

__all__ = ["MultiEncoderVLMConfig", "MultiEncoderVLM", "VisualTokens", "FUSIONS", "VISUAL_POSITIONS", "expert_pixels"]

PIXEL_PREFIX = "pixel_values_"


def expert_pixels(inputs) -> dict:
    """{expert name: pixel values} from processor outputs / forward kwargs (keys pixel_values_<expert>)."""
    return {k[len(PIXEL_PREFIX) :]: v for k, v in inputs.items() if k.startswith(PIXEL_PREFIX)}

FUSIONS = ("post", "pre")
PROJECTORS = ("mlp", "vocab")
VISUAL_POSITIONS = ("original", "compact")


def _check_blocks(blocks, runner) -> list[int]:
    """A method's `encoder_blocks` answer, checked against the expert it is for."""
    blocks = list(blocks)
    if sorted(set(blocks)) != blocks or any(not 0 <= b < runner.num_blocks for b in blocks):
        raise ValueError(f"encoder blocks must be distinct, increasing and within expert {runner.spec.name!r}'s "
                         f"{runner.num_blocks} blocks, got {blocks}")
    return blocks


def check_visual_positions(value: str) -> None:
    if value not in VISUAL_POSITIONS:
        raise ValueError(f"unknown visual_positions {value!r}; choose one of {VISUAL_POSITIONS}")


def run_expert(runner, index: int, pixel_values: torch.Tensor, method: PruningMethod | None) -> VisualTokens:
    """Run one expert (its `ExpertRunner`, the `index`-th of the model) block by block on (num_images, 3, S, S)
    pixels, letting the method drop or merge patch tokens (stage 1) after its chosen blocks, or between their
    attention and MLP (`merges_within_block`). Returns its tokens before projection."""
    x = runner.embed(pixel_values)
    B = x.shape[0]
    grid = torch.arange(runner.num_patches, device=x.device).expand(B, -1)
    size = torch.ones(grid.shape, device=x.device)
    chosen = None if method is None or not runner.is_transformer else method.encoder_blocks(runner.num_blocks)
    points = runner.pruning_points() if chosen is None else _check_blocks(chosen, runner)
    proportional = method is not None and method.proportional_attention
    within = method is not None and method.merges_within_block
    valid = None
    taps = []
    for i in range(runner.num_blocks):
        x_in = x
        bias = None
        if proportional and bool((size != 1).any()):  # log(size) for every key; CLS stands for itself
            bias = size.log() if not runner.has_cls else torch.cat([torch.zeros_like(size[:, :1]), size.log()], 1)
        if method is None or i not in points:
            x = runner.run_block(i, x, bias, grid)
            _tap(runner, i, x, grid, taps)
            continue
        keys = None
        if within:  # the method acts between the block's attention and its MLP
            x, keys = runner.run_attention(i, x, bias, grid)
        else:
            x = runner.run_block(i, x, bias, grid)
        ctx = EncoderPoint(runner.spec.name, index, runner.kind, points.index(i), i, x, x_in, runner.has_cls, runner,
                           size, keys, grid)
        x, grid, size, valid = apply_encoder_keep(method.prune_encoder(ctx), x, grid, size, runner.has_cls)
        if valid is not None and i != runner.num_blocks - 1:
            raise ValueError(f"expert {runner.spec.name!r}, block {i}: a different token count per image (-1 in "
                             "the keep indices) is only possible after the expert's last block")
        if within:
            x = runner.run_mlp(i, x)
        _tap(runner, i, x, grid, taps)
    feats = runner.finalize(x)
    if method is not None and runner.num_blocks == 0:  # a CNN is pruned once, at its output
        ctx = EncoderPoint(runner.spec.name, index, runner.kind, 2, None, feats, None, False, runner, size, trunk=x)
        feats, grid, size, valid = apply_encoder_keep(method.prune_encoder(ctx), feats, grid, size, False)
    return VisualTokens(feats, torch.full(grid.shape, index, dtype=torch.long, device=feats.device), grid, size,
                        valid=valid, taps=taps or None)


def _tap(runner, i: int, x: torch.Tensor, grid: torch.Tensor, taps: list) -> None:
    """The runner's tap of block i's output (`ExpertRunner.tap`), with the grid index of each of its tokens."""
    tapped = runner.tap(i, x)
    if tapped is not None:
        taps.append((tapped, grid))


def apply_encoder_keep(answer, x, grid, size, has_cls):
    """A stage-1 answer (keep indices, an EncoderMerge or None) applied to the tokens x (CLS first when
    has_cls) and to each patch token's grid position and merged size (B, N). Returns them with valid:
    None, or (B, N') bool where the answer kept fewer tokens in some images (-1 slots)."""
    if answer is None:
        return x, grid, size, None
    merge = answer if isinstance(answer, EncoderMerge) else None
    idx = merge.keep if merge is not None else answer
    if idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"stage-1 keep indices must be (B, K), got {tuple(idx.shape)}")
    valid = idx >= 0
    idx = idx.clamp_min(0)
    patches = x[:, 1:] if has_cls else x
    out, new_grid, new_size = ops.gather_tokens(patches, idx), grid.gather(1, idx), size.gather(1, idx)
    if merge is not None:
        if merge.merged.shape[:2] != merge.at.shape or merge.group.shape != grid.shape:
            raise ValueError("an EncoderMerge needs merged (B, M, D), at (B, M) and group (B, N_patches)")
        merged_size = torch.zeros(merge.at.shape, device=size.device).scatter_add_(
            1, merge.group.clamp_min(0), size * (merge.group >= 0))
        out = torch.cat([out, merge.merged.to(out.dtype)], 1)
        new_grid = torch.cat([new_grid, grid.gather(1, merge.at.clamp_min(0))], 1)
        new_size = torch.cat([new_size, merged_size], 1)
        valid = torch.cat([valid, merge.at >= 0], 1)
    full = bool(valid.all())
    if merge is not None or not full:
        # every token at its place in the grid, the empty slots after them
        order = torch.where(valid, new_grid, new_grid.new_tensor(torch.iinfo(torch.long).max)).argsort(dim=1, stable=True)
        out, new_grid, new_size = ops.gather_tokens(out, order), new_grid.gather(1, order), new_size.gather(1, order)
        valid = valid.gather(1, order)
    if has_cls:  # CLS is not a patch: always kept, in front
        out = torch.cat([x[:, :1], out], 1)
    return out, new_grid, new_size, None if full else valid


def fuse_and_prune(per_expert: list[VisualTokens], projected: list[torch.Tensor], names: list[str],
                   method: PruningMethod | None) -> VisualTokens:
    """Post-projection fusion then stage 2: the experts' projected tokens (num_images, N_e, D) concatenated
    along the sequence, with their provenance, and the method's `prune_fusion` answer applied. Where the images
    hold different token counts (empty slots), `prune_fusion` sees each image alone, its real tokens only, and
    the images keep their own counts."""
    padded = any(v.valid is not None for v in per_expert)
    fused = VisualTokens(
        torch.cat(projected, 1),
        torch.cat([v.expert for v in per_expert], 1),
        torch.cat([v.grid_index for v in per_expert], 1),
        torch.cat([v.size for v in per_expert], 1),
        {n: v.mask.sum(1).tolist() for n, v in zip(names, per_expert)},
        torch.cat([v.mask for v in per_expert], 1) if padded else None,
    )
    if method is None:
        return fused
    if not padded:
        idx = method.prune_fusion(FusionPoint(fused.features, fused.expert[0], names))
        return fused if idx is None else fused.select(idx)
    slots = [m.nonzero()[:, 0] for m in fused.mask]  # each image's real tokens
    answers = [method.prune_fusion(FusionPoint(fused.features[i, s][None], fused.expert[i, s], names))
               for i, s in enumerate(slots)]
    if all(a is None for a in answers):
        return fused
    kept = [s if a is None else s[a[0]] for s, a in zip(slots, answers)]
    idx = torch.nn.utils.rnn.pad_sequence(kept, batch_first=True, padding_value=-1)
    out = fused.select(idx.clamp_min(0))
    out.valid = out.mask & (idx >= 0)
    return out


class MultiEncoderVLMConfig(PretrainedConfig):
    """Configuration of a MultiEncoderVLM.

    Args:
        experts: list of ExpertSpec dicts (name, kind, image_size, config, patch_size, image_mean, image_std).
        text_config: the decoder's config (a LlamaConfig / Qwen2Config or its dict with `model_type`).
        fusion: "post" (METEOR: one projector per expert, sequence concatenation) or "pre" (EAGLE:
            features resized to a common grid, channel concatenation, one projector).
        fusion_grid: side of the common grid for "pre" fusion.
        image_token_id: id of the image placeholder token in the tokenizer.
        projector_norm: None, or "batch" to standardise each expert channel (BatchNorm over images and
            tokens) before its projector. Experts trained from scratch start with features dominated by
            an image-independent component; without this the LLM never learns to use them.
        projector: "mlp" (LLaVA-1.5: a two-layer MLP into the LLM's width) or "vocab" (each token becomes a
            distribution over the LLM's vocabulary that mixes its input-embedding rows, plus a learned
            embedding of its grid cell; post fusion only). See `VocabProjector`.
        rank_table: stage-1 feature ranks from `meteor calibrate` ({"experts": {name: [r1, r2, r3]}, ...}).
        projector_hidden_ids: vocabulary ids a "vocab" projector still predicts (its classifier is trained on
            them) but never passes on: each token's distribution is renormalised over the other words. The
            embedded model hides its per-character glyph targets, which help the experts learn to read but,
            mixed into a text cell, dilute the word the LLM has to find there.
        visual_positions: RoPE positions of the visual tokens that stages 1 and 2 keep. "original" (default):
            the positions they have in the unpruned sequence, and the text after an image where it would be
            unpruned, as for tokens dropped inside the LLM (so fusion pruning equals masking those tokens
            from LLM layer 0 on). "compact": consecutive positions, the pruned sequence numbered as if it
            were the whole one (what implementations that shorten the LLM's input usually do).
    """

    model_type = "meteor_multi_encoder_vlm"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        experts: list[dict] | None = None,
        text_config: dict | PretrainedConfig | None = None,
        fusion: str = "post",
        fusion_grid: int | None = None,
        image_token_id: int | None = None,
        projector_norm: str | None = None,
        projector: str = "mlp",
        rank_table: dict | None = None,
        projector_hidden_ids: list[int] | None = None,
        visual_positions: str = "original",
        **kwargs,
    ):
        self.experts = [e.to_dict() if isinstance(e, ExpertSpec) else dict(e) for e in (experts or [])]
        if text_config is None:
            text_config = {"model_type": "llama"}
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config = AutoConfig.for_model(text_config.pop("model_type", "llama"), **text_config)
        self.text_config = text_config
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose one of {FUSIONS}")
        self.fusion = fusion
        self.fusion_grid = fusion_grid
        self.image_token_id = image_token_id
        if projector_norm not in (None, "batch"):
            raise ValueError(f"unknown projector_norm {projector_norm!r}; choose None or 'batch'")
        self.projector_norm = projector_norm
        if projector not in PROJECTORS:
            raise ValueError(f"unknown projector {projector!r}; choose one of {PROJECTORS}")
        if projector == "vocab" and fusion != "post":
            raise ValueError("projector='vocab' needs fusion='post' (one projector per expert)")
        self.projector = projector
        self.rank_table = rank_table
        if projector_hidden_ids and projector != "vocab":
            raise ValueError("projector_hidden_ids needs projector='vocab'")
        self.projector_hidden_ids = sorted(int(i) for i in projector_hidden_ids) if projector_hidden_ids else None
        check_visual_positions(visual_positions)
        self.visual_positions = visual_positions
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def expert_specs(self) -> list[ExpertSpec]:
        return [ExpertSpec.from_dict(e) for e in self.experts]


@dataclass
class VisualTokens:
    """Visual tokens of a batch of images, with provenance.

    features: (B, N, D); expert: (B, N) long expert index of each token (-1 after channel fusion);
    grid_index: (B, N) long flat position in that expert's grid; size: (B, N) tokens merged into each;
    valid: (B, N) bool, False on the empty slots of images that kept fewer tokens than others (a method
    that keeps a different count per image), or None when every slot holds a token.
    """

    features: torch.Tensor
    expert: torch.Tensor
    grid_index: torch.Tensor
    size: torch.Tensor
    stage1: dict[str, list[int]] | None = None  # per expert: patch tokens it handed to fusion, per image
    valid: torch.Tensor | None = None
    # what the expert's runner tapped off its blocks (Qwen3-VL's DeepStack), in block order: (features (B, N_i, D'),
    # grid index (B, N_i)) of the tokens at that block's output, after any pruning there; set by `run_expert` (and
    # by adapters that align them with the tokens kept), not carried by `select`
    taps: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def mask(self) -> torch.Tensor:
        """(B, N) bool: `valid`, or all True."""
        if self.valid is not None:
            return self.valid
        return torch.ones(self.grid_index.shape, dtype=torch.bool, device=self.grid_index.device)

    def select(self, idx: torch.Tensor) -> VisualTokens:
        """Keep tokens idx (B, K) (same count per image), in the given order."""
        return VisualTokens(
            ops.gather_tokens(self.features, idx),
            self.expert.gather(1, idx),
            self.grid_index.gather(1, idx),
            self.size.gather(1, idx),
            self.stage1,
            None if self.valid is None else self.valid.gather(1, idx),
        )


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over all tokens of all images, per channel: (B, N, D) in and out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class Projector(nn.Module):
    """Two-layer MLP from an expert's width to the LLM's (LLaVA-1.5 style), optionally standardising its input."""

    def __init__(self, in_dim: int, out_dim: int, norm: str | None = None):
        super().__init__()
        self.norm = TokenBatchNorm(in_dim) if norm == "batch" else nn.Identity()
        self.fc1, self.act, self.fc2 = nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class VocabProjector(nn.Module):
    """Projects an expert's tokens onto the LLM's own word embeddings ("visual words").

    A two-layer MLP classifies every token over the LLM's vocabulary; the token becomes the
    probability-weighted mix of the input-embedding rows, plus a learned embedding of its grid cell.
    Question words and the visual tokens that show them then start in the same place, so a small LLM
    trained from scratch learns to bind them quickly, and the classifier can be trained on its own
    against per-cell word labels (`meteor_vlm.train.Grounding`). The embedded default model uses it.
    """

    def __init__(self, in_dim: int, width: int, vocab_size: int, cells: int, norm: str | None = None,
                 hidden_ids: list[int] | None = None):
        super().__init__()
        self.norm = TokenBatchNorm(in_dim) if norm == "batch" else nn.Identity()
        self.fc1, self.act, self.fc2 = nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, vocab_size)
        self.position = nn.Embedding(cells, width)
        self.hidden_ids = sorted(set(int(i) for i in hidden_ids or ()))  # from the config, not the checkpoint
        if self.hidden_ids and (self.hidden_ids[0] < 0 or self.hidden_ids[-1] >= vocab_size):
            raise ValueError(f"hidden_ids must lie in [0, {vocab_size}), got {self.hidden_ids[0]}..{self.hidden_ids[-1]}")
        if len(self.hidden_ids) >= vocab_size:
            raise ValueError("hidden_ids hides the whole vocabulary")

    def word_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, in_dim) expert tokens -> (B, N, V) vocabulary logits."""
        return self.fc2(self.act(self.fc1(self.norm(x))))

    def forward(self, x: torch.Tensor, grid_index: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """x (B, N, in_dim), grid_index (B, N) cell of each token, words (V, D) input embeddings -> (B, N, D)."""
        logits = self.word_logits(x).float()
        if self.hidden_ids:
            logits = logits.index_fill(-1, torch.tensor(self.hidden_ids, device=logits.device), float("-inf"))
        probs = logits.softmax(-1)
        return (probs @ words.float()).to(words.dtype) + self.position(grid_index)


class MultiEncoderVLM(PreTrainedModel, GenerationMixin):
    """A multi-encoder vision-language model with hooks for token pruning at every stage.

    Inputs (as `MultiEncoderProcessor` returns them): input_ids (B, T) with one image placeholder per
    image, attention_mask (B, T) (padding on either side), and `pixel_values_<expert>` (num_images, 3, S, S)
    for each expert, images in prompt order.
    """

    config_class = MultiEncoderVLMConfig
    base_model_prefix = "vlm"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = []

    def __init__(self, config: MultiEncoderVLMConfig):
        super().__init__(config)
        specs = config.expert_specs
        if not specs:
            raise ValueError("a MultiEncoderVLM needs at least one expert")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"expert names must be unique, got {names}")
        if config.image_token_id is None:
            raise ValueError("config.image_token_id is required (the image placeholder token)")
        self.experts = nn.ModuleList([build_expert(s) for s in specs])
        self.runners = [runner_for(m, s) for m, s in zip(self.experts, specs)]
        text_config = config.text_config
        text_config._attn_implementation = "sdpa"
        self.language_model = AutoModelForCausalLM.from_config(text_config)
        width = text_config.hidden_size
        if config.projector == "vocab":
            vocab = text_config.vocab_size
            self.projectors = nn.ModuleList(
                [VocabProjector(r.out_dim, width, vocab, r.num_patches, config.projector_norm,
                                config.projector_hidden_ids) for r in self.runners]
            )
        elif config.fusion == "post":
            self.projectors = nn.ModuleList([Projector(r.out_dim, width, config.projector_norm) for r in self.runners])
        else:
            if not config.fusion_grid:
                raise ValueError("pre-projection fusion needs config.fusion_grid")
            self.projectors = nn.ModuleList([Projector(sum(r.out_dim for r in self.runners), width, config.projector_norm)])
        self._pruning_method: PruningMethod | None = None
        self.post_init()
        for projector in self.projectors:  # post_init does not run _init_weights on a model built from a config
            self._init_weights(projector)
        if self.generation_config is not None:  # a generated placeholder would be read as an image next time
            self.generation_config.suppress_tokens = [config.image_token_id]

    def _init_weights(self, module):
        if isinstance(module, (Projector, VocabProjector)):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            for lin in (module.fc1, module.fc2):
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)
            if isinstance(module, VocabProjector):
                nn.init.normal_(module.position.weight, std=std)

    # ---- plumbing ---------------------------------------------------------------------------
    @property
    def expert_names(self) -> list[str]:
        return [r.spec.name for r in self.runners]

    @property
    def decoder(self) -> runtime.DecoderParts:
        return runtime.DecoderParts.of(self.language_model)

    @property
    def num_llm_layers(self) -> int:
        return self.config.text_config.num_hidden_layers

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    # ---- vision: stage 1 and 2 --------------------------------------------------------------
    def encode_expert(self, index: int, pixel_values: torch.Tensor, method: PruningMethod | None) -> VisualTokens:
        """Run one expert block by block, letting the method drop patch tokens (stage 1). The pixels are cast to the
        expert's dtype (a model loaded in bfloat16 takes the processor's float32 pixels, as stock VLMs do)."""
        runner = self.runners[index]
        dtype = next(runner.module.parameters()).dtype
        return run_expert(runner, index, pixel_values.to(dtype), method)

    def encode_images(self, pixel_values: dict[str, torch.Tensor], method: PruningMethod | None = None) -> VisualTokens:
        """Images -> fused visual tokens in the LLM's width, (num_images, N, D), after stages 1 and 2."""
        missing = [n for n in self.expert_names if n not in pixel_values]
        if missing:
            raise ValueError(f"missing pixel values for experts {missing} (keys pixel_values_<expert>)")
        counts = {n: int(p.shape[0]) for n, p in pixel_values.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"every expert needs the same number of images, got {counts}")
        per_expert = [self.encode_expert(i, pixel_values[n], method) for i, n in enumerate(self.expert_names)]
        if self.config.fusion == "pre":
            fused = self._channel_fusion(per_expert)
            fused.stage1 = {n: v.mask.sum(1).tolist() for n, v in zip(self.expert_names, per_expert)}
            return fused
        projected = [self._project(i, v) for i, v in enumerate(per_expert)]
        return fuse_and_prune(per_expert, projected, self.expert_names, method)

    def _project(self, index: int, tokens: VisualTokens) -> torch.Tensor:
        """One expert's (stage-1 surviving) tokens in the LLM's width."""
        projector = self.projectors[index]
        if isinstance(projector, VocabProjector):
            return projector(tokens.features, tokens.grid_index, self.get_input_embeddings().weight)
        return projector(tokens.features)

    def _channel_fusion(self, per_expert: list[VisualTokens]) -> VisualTokens:
        g = self.config.fusion_grid
        maps = []
        for runner, v in zip(self.runners, per_expert):
            h, w = runner.grid()
            if v.features.shape[1] != h * w:
                raise ValueError("pre-projection (channel) fusion needs every expert's full grid: stage-1 pruning is not possible")
            fmap = v.features.transpose(1, 2).reshape(v.features.shape[0], -1, h, w)
            maps.append(F.interpolate(fmap, size=(g, g), mode="bilinear", align_corners=False))
        fused = torch.cat(maps, 1).flatten(2).transpose(1, 2)
        B = fused.shape[0]
        return VisualTokens(
            self.projectors[0](fused),
            torch.full((B, g * g), -1, dtype=torch.long, device=fused.device),
            torch.arange(g * g, device=fused.device).expand(B, -1),
            torch.ones(B, g * g, device=fused.device),
        )

    # ---- splicing -----------------------------------------------------------------------------
    def _splice(self, input_ids, attention_mask, visual: VisualTokens | None):
        """Replace each placeholder with its image's tokens; padding leaves the rows, left-padded again.

        Returns embeds (B, L, D), valid (B, L), is_visual (B, L), text_col (B, T) the expanded column of
        each input column (for a placeholder: its image's last visual token), vis_index (B, L): for a
        visual column, image * N + token index into `visual` (-1 elsewhere), and positions (B, L): the
        RoPE position of each column (`config.visual_positions`; 0 on padding).
        """
        B, T = input_ids.shape
        is_img = input_ids == self.config.image_token_id
        n_images = int(is_img.sum())
        have = 0 if visual is None else visual.features.shape[0]
        if n_images != have:
            raise ValueError(f"the prompts hold {n_images} image placeholders but {have} images were given")
        text_emb = self.get_input_embeddings()(input_ids.masked_fill(is_img, 0))
        dev = input_ids.device
        mask = attention_mask.bool()
        ib, it = is_img.nonzero(as_tuple=True)  # row-major: the order images are given in
        lens = mask.long()  # expanded width of each input column: padding (left or right) leaves the sequence
        if visual is not None:
            lens[ib, it] = visual.mask.sum(1)
        cum = lens.cumsum(1)
        L = int(cum[:, -1].max())
        start = (L - cum[:, -1:]) + cum - lens  # first expanded column of each input column (left padded)
        text_col = start + lens - 1  # a padding column reads as the column before it
        embeds = text_emb.new_zeros(B, L, text_emb.shape[-1])
        valid = torch.zeros(B, L, dtype=torch.bool, device=dev)
        is_vis = torch.zeros_like(valid)
        vis_index = torch.full((B, L), -1, dtype=torch.long, device=dev)
        tb, tt = (~is_img & mask).nonzero(as_tuple=True)
        embeds[tb, start[tb, tt]] = text_emb[tb, tt]
        valid[tb, start[tb, tt]] = True
        if visual is None:
            return embeds, valid, is_vis, text_col, vis_index, runtime.positions_from_mask(valid)
        n_vis = visual.features.shape[1]
        vis_mask = visual.mask
        vi, vj = vis_mask.nonzero(as_tuple=True)  # image, slot of each visual token (empty slots left out)
        rank = vis_mask.long().cumsum(1) - 1
        rows = ib[vi]
        cols = start[rows, it[vi]] + rank[vi, vj]
        embeds[rows, cols] = visual.features[vi, vj].to(embeds.dtype)
        valid[rows, cols] = mask[rows, it[vi]]
        is_vis[rows, cols] = True
        vis_index[rows, cols] = vi * n_vis + vj
        check_visual_positions(self.config.visual_positions)
        if self.config.visual_positions == "compact":
            return embeds, valid, is_vis, text_col, vis_index, runtime.positions_from_mask(valid)
        # "original": an image spans its unpruned token count; each kept token sits at its unpruned offset
        full, offset = self._unpruned_offsets(visual)
        width = torch.where(is_img, full, 1) * mask.long()
        first = width.cumsum(1) - width  # position of each input column's first token
        positions = torch.zeros(B, L, dtype=torch.long, device=dev)
        positions[tb, start[tb, tt]] = first[tb, tt]
        positions[rows, cols] = first[rows, it[vi]] + offset[vi, vj]
        return embeds, valid, is_vis, text_col, vis_index, positions.masked_fill(~valid, 0)

    def _unpruned_offsets(self, visual: VisualTokens) -> tuple[int, torch.Tensor]:
        """Tokens per image before any pruning, and each kept token's (num_images, N) offset among them."""
        if self.config.fusion == "pre":
            return self.config.fusion_grid**2, visual.grid_index
        sizes = torch.tensor([0] + [r.num_patches for r in self.runners], device=visual.grid_index.device)
        starts = sizes.cumsum(0)
        return int(starts[-1]), starts[visual.expert.clamp_min(0)] + visual.grid_index

    # ---- forward --------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        query_positions: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        cache=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits aligned with `input_ids` (B, T, V); a placeholder's column predicts the token after its image.

        Args:
            input_ids, attention_mask: the prompt (padded on the left, as the processor pads, or on the right),
                one placeholder per image.
            pixel_values_<expert>: (num_images, 3, S, S) per expert (prefill only).
            past_key_values (or `cache`, its name from transformers 5.24): a DynamicCache; the first call
                fills it (prefill), later calls decode.
            labels: (B, T) next-token targets aligned with input_ids (-100 to ignore).
            logits_to_keep: compute logits only for the last n columns (0 = all).
            query_positions: (B,) input column of the text query for stage 3 (default: the last column).
                Pass it when re-running a longer sequence without cache so decisions match the prompt's.
        """
        past_key_values = cache if cache is not None else past_key_values  # cache: the name from transformers 5.24
        pixel_values = expert_pixels(kwargs)
        runtime.refuse_layer_outputs(kwargs, "MultiEncoderVLM")
        unknown = [k for k in kwargs if not k.startswith(PIXEL_PREFIX) and kwargs[k] is not None]
        unknown = [k for k in unknown if k not in ("cache_position", "output_attentions", "output_hidden_states")]
        if "position_ids" in unknown:
            raise ValueError("position_ids are not taken: the model places its tokens itself (config.visual_positions; "
                             "the running count of real tokens for text)")
        if unknown:
            raise ValueError(f"unexpected inputs {unknown}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.bool()
        use_cache = getattr(self.config.text_config, "use_cache", True) if use_cache is None else use_cache
        method = self._pruning_method
        parts = self.decoder
        state = runtime.get_state(past_key_values)

        if state is not None:  # decoding against a filled (maybe pruned) cache
            if pixel_values:
                raise ValueError("images can only be given with the first (prefill) call, not with a filled cache")
            hidden = runtime.decode_new_tokens(parts, input_ids, attention_mask, past_key_values)
        else:
            if use_cache and past_key_values is None:
                from transformers import DynamicCache

                past_key_values = DynamicCache(config=self.config.text_config)
            cache = past_key_values if use_cache else None
            visual = self.encode_images(pixel_values, method) if pixel_values else None
            embeds, valid, is_vis, text_col, vis_index, positions = self._splice(input_ids, attention_mask, visual)
            qpos = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
            if query_positions is not None:
                qpos = torch.as_tensor(query_positions, device=input_ids.device).long().expand_as(qpos)
            query_col = text_col.gather(1, qpos[:, None])[:, 0]
            layers = method.llm_layers(self.num_llm_layers) if method is not None else set()
            hook = method.prune_llm if method is not None else None
            hidden, cols, kept = runtime.prefill(parts, embeds, valid, is_vis, query_col, cache, layers, hook,
                                                 positions)
            if method is not None:
                survivors = torch.where(cols >= 0, vis_index.gather(1, cols.clamp_min(0)), -1)
                method.stats.extend(self._stats(is_vis & valid, visual, kept, input_ids, survivors))
            # output for each input column: the last token still present at or before its expanded column
            hidden = runtime.at_columns(hidden, cols, text_col)
            if cache is not None:
                runtime.get_state(cache).seen = input_ids.shape[1]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.language_model.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_OUTPUT_CACHE: past_key_values if use_cache else None})

    def _stats(self, vis_valid, visual, kept, input_ids, survivors) -> list[dict]:
        """Per-sample token counts of the prefill that just ran (`prefill_stats`)."""
        owner = (input_ids == self.config.image_token_id).nonzero(as_tuple=True)[0].tolist()
        unpruned = sum(r.num_patches for r in self.runners)
        return prefill_stats(owner, vis_valid, visual, kept, survivors, self.num_llm_layers, unpruned, self.expert_names)

    @contextlib.contextmanager
    def pruning(self, method: PruningMethod):
        """Run `method` on this model inside the block (what `with method(model)` does once set up)."""
        previous = self._pruning_method
        self._pruning_method = method
        try:
            yield
        finally:
            self._pruning_method = previous

    # ---- generation -----------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, cache=None, **kwargs):
        inputs = runtime.generation_inputs(input_ids, cache if cache is not None else past_key_values, attention_mask,
                                           kwargs, lambda k: k.startswith(PIXEL_PREFIX))
        inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # beams / num_return_sequences repeat each prompt's row; its images (one placeholder each) must follow it as
        # a group, not be repeated one by one in place (a prompt with two images would get the wrong ones)
        pixels = {k: model_kwargs.pop(k) for k in list(model_kwargs) if k.startswith(PIXEL_PREFIX)}
        model_kwargs = runtime.prompt_query(input_ids, model_kwargs)
        ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)
        if pixels and expand_size > 1:
            rows = (input_ids == self.config.image_token_id).nonzero(as_tuple=True)[0]
            order = runtime.images_for_expanded_rows(rows, input_ids.shape[0], expand_size)
            pixels = {k: v[order] for k, v in pixels.items()}
        return ids, {**model_kwargs, **pixels}

    def _validate_model_kwargs(self, model_kwargs):
        # per-expert pixel keys are named after the experts, so no fixed signature can list them
        rest = {k: v for k, v in model_kwargs.items() if not k.startswith("pixel_values_") and k != "query_positions"}
        super()._validate_model_kwargs(rest)


def prefill_stats(owner: list[int], vis_valid: torch.Tensor, visual: VisualTokens | None, kept: dict,
                  survivors: torch.Tensor, num_layers: int, unpruned: int | list[int], expert_names: list[str],
                  image_owner: list[int] | None = None) -> list[dict]:
    """Per-sample token counts of a prefill (what `method.stats` holds), for any adapted model.

    owner: the sample each image belongs to, in image order; vis_valid: (B, L) the visual columns that
    entered the LLM; visual: the images' tokens after stages 1-2 (None without images); kept: {layer: (B,)
    visual tokens kept from that layer on}; survivors: (B, T') for each column of the last layer, its
    token's index image * N + j into `visual` (-1 for text and padding); unpruned: patch tokens per image (one
    count for all, or a list in image order); image_owner: where `owner` lists tiles rather than images
    (LLaVA-NeXT), the sample of each image, which `images` counts.

    encoder_tokens: patch tokens the experts produce unpruned; stage1: per expert, tokens left after
    stage 1; fusion_tokens: after stage 2 (= visual tokens entering the LLM); stage3: {layer: kept};
    tokens_per_layer / layer_avg_tokens: visual tokens each LLM layer saw, and their mean ("242*").
    Counts are summed over the sample's images. kept_grid: per image (per tile where owner lists tiles),
    {expert: grid cells of the tokens that reached the last LLM layer}, {} where none did (what
    `meteor ask --heatmap` draws); llm_grid: the same for the tokens that entered the LLM (after stages 1 and 2).
    """
    llm_in = vis_valid.sum(1).tolist()
    out = []
    for b in range(vis_valid.shape[0]):
        images = (owner if image_owner is None else image_owner).count(b)
        encoder = unpruned * images if isinstance(unpruned, int) else sum(n for n, o in zip(unpruned, owner) if o == b)
        drops = {layer: int(n[b]) for layer, n in kept.items()}
        counts = ops.tokens_per_layer(num_layers, llm_in[b], drops)
        stage1 = {n: sum(c for c, o in zip(per_image, owner) if o == b)
                  for n, per_image in (visual.stage1 or {}).items()} if visual is not None else {}
        owned = [i for i, o in enumerate(owner) if o == b]
        kept_grid = _kept_grid(visual, survivors[b], expert_names, owned) if visual is not None else []
        # what entered the LLM: what reached its last layer, unless LLM layers pruned
        entered = _entered(visual, owned) if kept and visual is not None else None
        llm_grid = kept_grid if entered is None else _kept_grid(visual, entered, expert_names, owned)
        out.append(
            {
                "images": images,
                "encoder_tokens": encoder,
                "stage1": stage1,
                "stage1_tokens": sum(stage1.values()),
                "fusion_tokens": llm_in[b],
                "stage3": drops,
                "tokens_per_layer": counts,
                "layer_avg_tokens": ops.layer_averaged_tokens(counts),
                "kept_grid": kept_grid,
                "llm_grid": llm_grid,
            }
        )
    return out


def _entered(visual: VisualTokens, owned: list[int]) -> torch.Tensor:
    """Indices image * N + j (as `survivors` gives them) of every token of images `owned` that entered the LLM."""
    n_vis = visual.features.shape[1]
    rows = torch.tensor(owned, dtype=torch.long, device=visual.mask.device)
    image, j = visual.mask[rows].nonzero(as_tuple=True)
    return rows[image] * n_vis + j


def _kept_grid(visual: VisualTokens, survivors: torch.Tensor, expert_names: list[str],
               owned: list[int]) -> list[dict[str, list[int]]]:
    """Per image (or tile) of the sample (`owned`, ascending indices into `visual`): {expert: grid cells of the
    tokens that reached the last LLM layer}, {} for one none of whose tokens did."""
    n_vis = visual.features.shape[1]
    idx = survivors[survivors >= 0]
    image, j = idx // n_vis, idx % n_vis
    # gathered once: indexing the tensors token by token cost ~160 ms per prefill at 10k tokens (one CPU thread)
    experts, cells = visual.expert[image, j].tolist(), visual.grid_index[image, j].tolist()
    names = [*expert_names, "fused"]  # expert -1: a token mixed from several experts
    out: dict[int, dict[str, list[int]]] = {i: {} for i in owned}
    for i, e, cell in zip(image.tolist(), experts, cells):
        out[i].setdefault(names[e], []).append(cell)
    return list(out.values())
