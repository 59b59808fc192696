"""How sure a bench comparison is: a paired, per-family bootstrap of one method against another
(a pruned setting against the unpruned model, or an ablation against the variant the paper prefers)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["paired_bootstrap"]


def paired_bootstrap(base: Sequence[int], other: Sequence[int], families: Sequence[str], resamples: int = 2000,
                     level: float = 0.95, seed: int = 0) -> dict:
    """Percentile intervals for `other` against `base`, both scored on the same samples.

    `base` and `other` hold one 0/1 (wrong/right) per sample and `families` each sample's family.
    Each resample draws, within every family, as many samples as it has, with replacement, and
    scores both methods on the same draw (paired), so the noise of which questions were drawn cancels
    out of the comparison. The average is over families, as the bench's is.

    Returns ``{"kept": [lo, hi]}``, the interval of other's average over base's (1.0 = no loss),
    ``{"difference": [lo, hi]}``, the interval of other's average minus base's, and
    ``{"delta": {family: [lo, hi]}}``, the interval of other's accuracy minus base's per family
    (differences as fractions: -0.02 = 2 points lost).
    """
    base_a, other_a = np.asarray(base, dtype=float), np.asarray(other, dtype=float)
    fam = np.asarray(families)
    if not (len(base_a) == len(other_a) == len(fam)) or len(fam) == 0:
        raise ValueError(f"base, other and families need one entry per sample: got {len(base_a)}, {len(other_a)}, {len(fam)}")
    if not set(np.unique(base_a)) | set(np.unique(other_a)) <= {0.0, 1.0}:
        raise ValueError("base and other hold one 0 (wrong) or 1 (right) per sample")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    names = list(dict.fromkeys(fam.tolist()))
    base_acc, other_acc = np.empty((resamples, len(names))), np.empty((resamples, len(names)))
    for j, f in enumerate(names):
        idx = np.flatnonzero(fam == f)
        draw = idx[rng.integers(0, len(idx), size=(resamples, len(idx)))]
        base_acc[:, j], other_acc[:, j] = base_a[draw].mean(1), other_a[draw].mean(1)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    kept = other_acc.mean(1) / np.maximum(base_acc.mean(1), 1e-12)
    return {
        "kept": [float(v) for v in np.percentile(kept, q)],
        "difference": [float(v) for v in np.percentile(other_acc.mean(1) - base_acc.mean(1), q)],
        "delta": {f: [float(v) for v in np.percentile(other_acc[:, j] - base_acc[:, j], q)] for j, f in enumerate(names)},
    }
