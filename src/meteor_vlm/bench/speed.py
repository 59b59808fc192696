"""Latency of several methods on the same inputs, interleaved so machine drift hits them all alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

__all__ = ["time_methods"]


def time_methods(
    run: Callable[[object], None], methods: Sequence[object], repeats: int = 5, warmup: int = 1
) -> list[dict]:
    """Median wall time of `run(method)` for each method, the methods taking turns in each round.

    Args:
        run: calls the model once under `method` (None = unpruned).
        methods: the methods to compare.
        repeats: timed rounds; warmup: untimed rounds first.
    Returns:
        one dict per method: {"median_ms", "times_ms"}.
    """
    times: list[list[float]] = [[] for _ in methods]
    with torch.no_grad():
        for r in range(warmup + repeats):
            for i, m in enumerate(methods):
                t0 = time.perf_counter()
                run(m)
                if r >= warmup:
                    times[i].append((time.perf_counter() - t0) * 1000)
    return [{"median_ms": statistics.median(t), "times_ms": t} for t in times]
