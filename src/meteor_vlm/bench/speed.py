"""Latency of several methods on the same inputs, interleaved so machine drift hits them all alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

__all__ = ["time_methods", "part_timer", "profile_methods"]


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


@contextmanager
def part_timer(model) -> Iterator[dict]:
    """Wall time spent in each vision expert (with its stage-1 pruning) and in the LLM's decoder layers.

    Yields a dict that fills as the model runs: {"experts": {name: ms}, "llm_layers": ms}. The experts are
    timed by wrapping this model instance's `encode_expert`, the layers by forward hooks on each decoder
    layer; both are removed on exit, whatever happens inside. What is neither (projectors, fusion and its
    pruning, stage 3's scoring between layers, embedding, the LM head) is the caller's total minus these.
    """
    times: dict = {"experts": {n: 0.0 for n in model.expert_names}, "llm_layers": 0.0}
    names = model.expert_names
    inner = model.encode_expert

    def encode_expert(index, pixel_values, method):
        t0 = time.perf_counter()
        out = inner(index, pixel_values, method)
        times["experts"][names[index]] += (time.perf_counter() - t0) * 1000
        return out

    start: list[float] = []

    def pre(module, args, kwargs):
        start.append(time.perf_counter())

    def post(module, args, kwargs, output):
        times["llm_layers"] += (time.perf_counter() - start.pop()) * 1000

    handles = []
    try:
        model.encode_expert = encode_expert
        for layer in model.decoder.layers:
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.register_forward_hook(post, with_kwargs=True))
        yield times
    finally:
        del model.encode_expert  # the class's method again
        for h in handles:
            h.remove()


def profile_methods(model, processor, names: Sequence[str], samples: int = 12, new_tokens: int = 8,
                    seed: int | None = None, progress: bool = True) -> list[dict]:
    """Where the time of one request goes, per method: prefill split by part, and decoding per new token.

    Runs `samples` held-out synthetic samples (families in turn) one at a time, batch 1, the methods
    interleaved on each sample (after one untimed warm-up round). Per method, medians over the samples:
    prefill_ms (the forward that gives the first token), its parts experts_ms {expert: ms} (each expert with
    its stage-1 pruning), llm_layers_ms (the decoder layers) and other_ms (the rest: projectors, fusion and
    its pruning, stage 3's scoring, embedding, head); decode_ms_per_token (greedy generation of
    `new_tokens` tokens, minus one token's, over new_tokens - 1); tokens (layer-averaged visual tokens).
    """
    from .. import synth
    from ..train import encode_samples
    from .accuracy import build_methods, resolve_methods

    resolve_methods(list(names))
    seed = synth.EVAL_SEED if seed is None else seed
    if samples < 1 or new_tokens < 2:
        raise ValueError(f"need samples >= 1 and new_tokens >= 2, got {samples} and {new_tokens}")
    size = max(128, max(s.image_size for s in processor.experts))
    per_family = -(-samples // len(synth.FAMILIES))
    split = synth.make_split(seed, per_family, image_size=size)[:samples]  # make_split gives the families in turn
    encoded = [encode_samples(processor, [s], with_answers=False) for s in split]
    methods = build_methods(model, list(names), encoded)  # a fixed stage 3 matched to its twin, as in the bench
    eos = processor.tokenizer.eos_token_id
    rec = {n: {"prefill": [], "other": [], "llm": [], "decode": [], "tokens": [], **{e: [] for e in model.expert_names}}
           for n in names}
    model.eval()

    def generate(inputs, n):
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=eos)

    with torch.no_grad():
        for i, inputs in enumerate(tqdm([encoded[0]] + encoded, desc="speed", disable=not progress)):
            for n in names:
                m = methods[n]
                with m(model), part_timer(model) as parts:
                    t0 = time.perf_counter()
                    model(**inputs, use_cache=False, logits_to_keep=1)
                    prefill = (time.perf_counter() - t0) * 1000
                    tokens = m.stats[-1]["layer_avg_tokens"]
                with m(model):
                    t0 = time.perf_counter()
                    generate(inputs, 1)
                    one = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    generate(inputs, new_tokens)
                    many = time.perf_counter() - t0
                if i == 0:  # warm-up
                    continue
                r = rec[n]
                r["prefill"].append(prefill)
                r["llm"].append(parts["llm_layers"])
                r["other"].append(prefill - parts["llm_layers"] - sum(parts["experts"].values()))
                r["decode"].append((many - one) * 1000 / (new_tokens - 1))
                r["tokens"].append(tokens)
                for e, ms in parts["experts"].items():
                    r[e].append(ms)
    med = statistics.median
    rows = []
    for n in names:
        r = rec[n]
        rows.append({"method": n, "tokens": statistics.mean(r["tokens"]), "prefill_ms": med(r["prefill"]),
                     "experts_ms": {e: med(r[e]) for e in model.expert_names}, "llm_layers_ms": med(r["llm"]),
                     "other_ms": med(r["other"]), "decode_ms_per_token": med(r["decode"])})
    return rows
