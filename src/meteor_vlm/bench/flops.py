"""FLOPs of a forward pass, SDPA attention included (PyTorch's counter misses CPU SDPA by default)."""

from __future__ import annotations

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops"]

_REGISTERED = False


def _register_cpu_sdpa() -> None:
    """Teach FlopCounterMode the CPU SDPA kernel: the same 4*B*H*Lq*Lk*d formula as the other SDPA kernels."""
    global _REGISTERED
    if _REGISTERED:
        return
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op.default not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(op)
        def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    _REGISTERED = True


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: every count goes to the total ("Global") alone. The tracker
    hooks each module's call to attribute FLOPs to it, and its hooks fail on modules that take tensors it cannot
    follow (transformers' hub-kernel wrappers, such as Qwen3.5's causal convolution, under no_grad)."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs (multiply-add = 2) that `fn(*args, **kwargs)` performs, counting matmuls, convs and attention (the
    total only, not per module)."""
    _register_cpu_sdpa()
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with torch.no_grad(), counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())
