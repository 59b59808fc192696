"""The sample record, seeding, and the public entry points ``make_sample`` / ``make_split``."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Iterable

from PIL import Image

from .families import ASKERS, GENERATORS

FAMILIES: tuple[str, ...] = ("scenes", "pope", "counting", "ocr", "docs", "charts")

MIN_IMAGE_SIZE = 64


@dataclass(frozen=True)
class Sample:
    """One synthetic visual-QA example.

    ``index`` is the sample's position within its family's stream, so
    ``make_sample(s.family, s.index, seed, size)`` reproduces ``s``.  ``meta``
    holds ground truth used to build the question (objects, bars, text boxes...);
    its layout differs per family and it is meant for tests and analysis, not
    for models.
    """

    image: Image.Image = field(repr=False)
    question: str
    answer: str
    family: str
    index: int
    meta: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def _check_family(family: str) -> None:
    """Raise ValueError for a family name that is not one of FAMILIES."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid families are {', '.join(FAMILIES)}")


def _check_int(name: str, value: Any) -> None:
    """Raise TypeError unless ``value`` is a true integer (bool excluded)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def _check_image_size(image_size: Any) -> None:
    """Raise for an image size that is not an int of at least MIN_IMAGE_SIZE."""
    _check_int("image_size", image_size)
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")


def _rng(family: str, index: int, seed: int) -> random.Random:
    """A generator seeded from a stable hash of (family, index, seed), identical in every process."""
    # sha256 rather than hash(): str hashing is salted per process.
    digest = hashlib.sha256(f"meteor-vlm.synth|{family}|{seed}|{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def make_sample(family: str, index: int, seed: int, image_size: int = 336) -> Sample:
    """Generate sample ``index`` of ``family`` for ``seed``.

    The result is a pure function of (family, index, seed, image_size); the
    same (family, index, seed) at another ``image_size`` shows the same scene
    and asks the same question.  Raises ValueError for an unknown family, a
    negative index or an image_size below 64.
    """
    _check_family(family)
    _check_int("index", index)
    _check_int("seed", seed)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    _check_image_size(image_size)
    image, question, answer, meta = GENERATORS[family](_rng(family, index, seed), image_size, index)
    return Sample(image=image, question=question, answer=answer, family=family, index=index, meta=meta)


def make_split(
    seed: int, per_family: int, families: Iterable[str] = FAMILIES, image_size: int = 336
) -> list[Sample]:
    """Generate ``per_family`` samples of each family, interleaved round-robin.

    The order is ``[f0#0, f1#0, ..., f0#1, f1#1, ...]`` following ``families``;
    every sample's ``index`` is its position within its own family (0 ..
    per_family-1), so pope stays exactly balanced over any even ``per_family``.
    Raises ValueError for per_family < 1, an empty, duplicated or unknown
    family list, or image_size below 64.
    """
    _check_int("seed", seed)
    _check_int("per_family", per_family)
    if per_family < 1:
        raise ValueError(f"per_family must be >= 1, got {per_family}")
    if isinstance(families, str):
        raise ValueError(f"families must be a sequence of family names, not the string {families!r}")
    families = tuple(families)
    if not families:
        raise ValueError(f"families is empty; choose from {', '.join(FAMILIES)}")
    for family in families:
        _check_family(family)
    if len(set(families)) != len(families):
        raise ValueError(f"families contains duplicates: {families}")
    _check_image_size(image_size)
    return [make_sample(f, i, seed, image_size) for i in range(per_family) for f in families]


def question_kind(sample: Sample) -> str:
    """What a sample's question asks, for accuracy within a family: ``scenes`` color / relation /
    neighbor (the shape beside an object), ``charts`` value / tallest / compare, ``pope`` present or
    its negative's kind (adversarial / random); families with one kind of question (counting, ocr, docs)
    give their own name."""
    if "question_type" in sample.meta:
        return sample.meta["question_type"]
    if sample.family == "pope":
        return sample.meta["negative"] or "present"
    return sample.family


def more_questions(sample: Sample, k: int, seed: int = 0) -> list[tuple[str, str]]:
    """Up to ``k`` further (question, answer) pairs about ``sample``'s image, drawn like its own question
    from its ground truth (for training: several questions share one image's visual tokens).

    Deterministic in (sample, k, seed). OCR has a single question, so it gets none; counting asks about
    other shapes. Each turn's answer depends on the image alone: pope's "yes"/"no" (and adversarial/random
    negatives) are drawn afresh per turn, so no turn can be answered from the turns before it (answers
    that alternated let a model trained on these turns learn the pattern instead of looking).
    """
    _check_int("k", k)
    _check_int("seed", seed)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if sample.family == "ocr":
        return []
    rng = _rng(sample.family, sample.index, seed ^ 0x5EED)
    meta = dict(sample.meta, target=None) if sample.family == "counting" else sample.meta
    return [ASKERS[sample.family](rng, meta, rng.randrange(1 << 30))[:2] for _ in range(k)]
