"""Stage-1 calibration: the feature rank of each expert at each pruning point, averaged over images."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from . import ops
from .methods.base import EncoderPoint, PruningMethod

__all__ = ["calibrate", "save_rank_table", "load_rank_table"]


@dataclass
class _RankProbe(PruningMethod):
    """Observes stage-1 points without pruning and records each image's feature rank there."""

    name: ClassVar[str] = "rank-probe"
    rtol: float = 1e-2
    ranks: dict = field(default_factory=lambda: defaultdict(list))

    def prune_encoder(self, ctx: EncoderPoint):
        for sample in ctx.patches:
            self.ranks[(ctx.expert, ctx.point)].append(ops.feature_rank(sample, self.rtol))
        return None


@torch.no_grad()
def calibrate(model, processor, images, batch_size: int = 8, rtol: float = 1e-2, progress: bool = True) -> dict:
    """Rank table for METEOR's rank-guided allocation.

    Args:
        model: a MultiEncoderVLM; processor: its MultiEncoderProcessor.
        images: a sequence of PIL images or image paths (the paper used 0.1% of its instruction data).
        batch_size: images per forward; rtol: relative singular-value threshold of `ops.feature_rank`.
    Returns:
        {"experts": {name: [r1, r2, r3]}, "rtol": rtol, "images": n} where r_b is the mean rank of the
        expert's patch tokens at pruning point b (None where the expert does not prune, e.g. a CNN's
        first two points).
    """
    images = list(images)
    if not images:
        raise ValueError("calibration needs at least one image")
    probe = _RankProbe(rtol=rtol)
    for start in tqdm(range(0, len(images), batch_size), desc="calibrate", disable=not progress):
        batch = images[start : start + batch_size]
        pixels = {}
        for spec in processor.experts:
            pixels[spec.name] = torch.stack([processor.preprocess(im, spec) for im in batch]).to(model.device, model.dtype)
        model.encode_images(pixels, probe)
    table = {name: [None, None, None] for name in model.expert_names}
    for (name, point), values in probe.ranks.items():
        table[name][point] = sum(values) / len(values)
    return {"experts": table, "rtol": rtol, "images": len(images)}


def save_rank_table(table: dict, path) -> None:
    """Write a rank table as JSON."""
    Path(path).write_text(json.dumps(table, indent=2))


def load_rank_table(path) -> dict:
    """Read a rank table written by `save_rank_table` / `meteor calibrate`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"rank table not found: {path}")
    return json.loads(path.read_text())
