"""Deterministic, seeded synthetic visual-QA samples in six benchmark-like families.

Families: ``scenes`` (GQA-like attributes and relations), ``pope`` (balanced
existence probes with adversarial negatives), ``counting`` (0-9 instances),
``ocr`` (one small word among clutter), ``docs`` (key-value pages) and
``charts`` (bar charts).  The first three are answerable from a low-resolution
view; the last three need the full-resolution image because their text is
about 15 px tall at 336 px, 5 px in a 112 px view.

Questions are lowercase and end with the separate token ``"?"``; answers are a
single token.  Both are covered by :func:`vocabulary`.

>>> from meteor_vlm import synth
>>> s = synth.make_sample("counting", 0, seed=1)
>>> s.image.size, s.question.endswith(" ?")
((336, 336), True)
"""

from ._lexicon import is_correct, normalize_answer, tokenize, vocabulary
from .core import FAMILIES, MIN_IMAGE_SIZE, Sample, make_sample, make_split, more_questions, question_kind

EVAL_SEED = 90_001  # the held-out split: training streams must use other seeds

__all__ = [
    "EVAL_SEED",
    "FAMILIES",
    "MIN_IMAGE_SIZE",
    "Sample",
    "is_correct",
    "make_sample",
    "make_split",
    "more_questions",
    "normalize_answer",
    "question_kind",
    "tokenize",
    "vocabulary",
]
