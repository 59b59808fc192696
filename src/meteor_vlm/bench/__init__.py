"""Measuring methods: FLOPs, latency (interleaved, medians), token counts."""

from .flops import count_flops
from .speed import time_methods

__all__ = ["count_flops", "time_methods"]
