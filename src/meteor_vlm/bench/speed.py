"""Latency of several methods on the same inputs, interleaved so machine drift hits them all alike."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

__all__ = ["time_methods", "part_timer", "profile_methods", "kv_cache_bytes", "greedy_steps"]


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kv_cache_bytes(cache) -> int:
    """Bytes a transformers DynamicCache holds in keys and values, summed over layers (padding included), and in
    the convolution and recurrent states of its linear-attention layers (Qwen3.5's: as large whatever the prompt)."""
    total = 0
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            total += layer.keys.nbytes + layer.values.nbytes
        for states in (getattr(layer, "conv_states", None), getattr(layer, "recurrent_states", None)):
            total += sum(t.nbytes for t in (states or {}).values() if t is not None)
    return total


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


def greedy_steps(model, logits: torch.Tensor, cache, attention_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding after a prefill, one forward per token against its cache, as `generate()` does it
    (suppressed tokens included) without its bookkeeping: what `meteor speed` times as decoding.

    Args:
        logits: (B, T', V) the prefill's logits (only the last column is read); cache: the prefill's cache;
        attention_mask: (B, T) the prompt's mask; steps: forwards to run.
    Returns:
        (B, steps + 1) the tokens chosen: the prefill's and one per step.
    """
    suppress = list(getattr(model.generation_config, "suppress_tokens", None) or [])  # as generate() does

    def pick(logits):
        last = logits[:, -1].clone()
        last[:, suppress] = float("-inf")
        return last.argmax(-1, keepdim=True)

    ids = [pick(logits)]
    for _ in range(steps):
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        out = model(input_ids=ids[-1], attention_mask=attention_mask, cache=cache, use_cache=True,
                    logits_to_keep=1)
        ids.append(pick(out.logits))
    return torch.cat(ids, dim=1)


@contextmanager
def part_timer(model) -> Iterator[dict]:
    """Wall time spent in each vision expert (with its stage-1 pruning) and in the LLM's decoder layers.

    model: a MultiEncoderVLM, or the `LlavaAdapter` a method runs on (its one expert is the tower).

    Yields a dict that fills as the model runs: {"experts": {name: ms}, "llm_layers": ms}. The experts are
    timed by wrapping this model instance's `encode_expert`, the layers by forward hooks on each decoder
    layer; both are removed on exit, whatever happens inside. What is neither (projectors, fusion and its
    pruning, stage 3's scoring between layers, embedding, the LM head) is the caller's total minus these.
    """
    times: dict = {"experts": {n: 0.0 for n in model.expert_names}, "llm_layers": 0.0}
    names = model.expert_names
    inner = model.encode_expert
    device = model.device  # on a GPU each reading waits for the queued work, so it is charged where it ran

    def encode_expert(index, pixel_values, method):
        _sync(device)
        t0 = time.perf_counter()
        out = inner(index, pixel_values, method)
        _sync(device)
        times["experts"][names[index]] += (time.perf_counter() - t0) * 1000
        return out

    start: list[float] = []

    def pre(module, args, kwargs):
        _sync(device)
        start.append(time.perf_counter())

    def post(module, args, kwargs, output):
        _sync(device)
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
                    seed: int | None = None, batch_size: int = 1, progress: bool = True,
                    video_frames: int = 0) -> list[dict]:
    """Where the time and memory of one request go, per method: prefill split by part, decoding per new
    token, and the KV cache the prefill leaves.

    Runs `samples` held-out synthetic samples (families in turn) in batches of `batch_size` (left-padded),
    the methods interleaved on each batch (after one untimed warm-up round). Per method, medians over the
    batches: prefill_ms (the forward that gives the first token; prefill_tflops: its FLOPs, mean over the
    batches, counted in an untimed run just before), its parts experts_ms {expert: ms} (each expert with its
    stage-1 pruning), llm_layers_ms (the decoder layers) and other_ms (the rest: projectors, fusion and its
    pruning, stage 3's scoring, embedding, head); decode_ms_per_token (the mean of the `new_tokens` - 1
    greedy steps after the prefill, each a forward of one token against its cache); kv_cache_mb (keys and
    values the prefill cached, read from the cache itself); peak_mb (on a GPU: the most memory the prefill
    allocated beyond what was allocated before it; None on CPU); tokens (layer-averaged visual tokens, mean
    over samples). With `video_frames` (a Qwen2-VL / Qwen2.5-VL / Qwen3-VL / GLM-4.1V / LLaVA-OneVision / InternVL
    processor), each sample's question is asked of a video of that many frames instead of its image
    (`sample_video`).
    """
    from .. import synth
    from ..models.adapters import adapt
    from .accuracy import build_methods, inputs_to_model, resolve_methods
    from .flops import count_flops

    resolve_methods(list(names))
    seed = synth.EVAL_SEED if seed is None else seed
    if samples < 1 or new_tokens < 2 or batch_size < 1:
        raise ValueError(f"need samples >= 1, new_tokens >= 2 and batch_size >= 1, got {samples}, {new_tokens} and {batch_size}")
    target = adapt(model)  # the model, or a stock VLM's adapter: the methods attach to it, its parts are timed
    per_family = -(-samples // len(synth.FAMILIES))
    split = synth.make_split(seed, per_family, image_size=_image_side(processor))[:samples]  # the families in turn
    device = model.device
    encoded = [inputs_to_model(model, _prompts(processor, split[i:i + batch_size], video_frames))
               for i in range(0, samples, batch_size)]
    methods = build_methods(model, list(names), encoded)  # a fixed stage 3 matched to its twin, as in the bench
    keys = ("prefill", "flops", "other", "llm", "decode", "tokens", "kv", "peak")
    rec = {n: {**{k: [] for k in keys}, **{e: [] for e in target.expert_names}} for n in names}
    model.eval()
    cuda = device.type == "cuda"

    def clock() -> float:
        _sync(device)
        return time.perf_counter()

    with torch.no_grad():
        for i, inputs in enumerate(tqdm([encoded[0]] + encoded, desc="speed", disable=not progress)):
            for n in names:
                m = methods[n]
                with m(target):
                    if i:  # untimed, and a warm-up of the timed run that follows
                        flops = count_flops(model, **inputs, use_cache=True, logits_to_keep=1)
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(device)
                        before = torch.cuda.memory_allocated(device)
                    with part_timer(target) as parts:
                        t0 = clock()
                        out = model(**inputs, use_cache=True, logits_to_keep=1)
                        prefill = (clock() - t0) * 1000
                    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if cuda else None
                    cache = out.cache if "cache" in out else out.past_key_values  # `cache` from transformers 5.24
                    kv = kv_cache_bytes(cache) / 2**20
                    tokens = [s["layer_avg_tokens"] for s in m.stats[-len(inputs["input_ids"]):]]  # this prefill's
                    t0 = clock()
                    greedy_steps(model, out.logits, cache, inputs["attention_mask"], new_tokens - 1)
                    decode = (clock() - t0) * 1000 / (new_tokens - 1)
                    del out, cache
                if i == 0:  # warm-up
                    continue
                r = rec[n]
                r["prefill"].append(prefill)
                r["flops"].append(flops)
                r["llm"].append(parts["llm_layers"])
                r["other"].append(prefill - parts["llm_layers"] - sum(parts["experts"].values()))
                r["decode"].append(decode)
                r["tokens"] += tokens
                r["kv"].append(kv)
                r["peak"].append(peak)
                for e, ms in parts["experts"].items():
                    r[e].append(ms)
    med = statistics.median
    rows = []
    for n in names:
        r = rec[n]
        rows.append({"method": n, "tokens": statistics.mean(r["tokens"]), "prefill_ms": med(r["prefill"]),
                     "prefill_tflops": statistics.mean(r["flops"]) / 1e12,
                     "experts_ms": {e: med(r[e]) for e in target.expert_names}, "llm_layers_ms": med(r["llm"]),
                     "other_ms": med(r["other"]), "decode_ms_per_token": med(r["decode"]),
                     "kv_cache_mb": med(r["kv"]), "peak_mb": med(r["peak"]) if cuda else None})
    return rows


QWEN_SIDE = 672  # 24 x 24 merged tokens of 28 px: LLaVA-1.5's 576 image tokens


def image_placeholder(processor) -> str:
    """What stands for one image in a prompt written by hand for a stock VLM's processor."""
    return getattr(processor, "image_placeholder", None) or getattr(processor, "image_token", "<image>")


def stock_prompt(processor, question: str, video: bool = False) -> str:
    """A stock VLM's prompt for one image (or `video`) and `question`: its processor's chat template, or
    "<placeholder> question" for a processor without one."""
    if getattr(processor, "chat_template", None):
        turn = [{"role": "user", "content": [{"type": "video" if video else "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(turn, add_generation_prompt=True)
    video_placeholder = getattr(processor, "video_placeholder", None) or getattr(processor, "video_token", "<video>")
    return f"{video_placeholder if video else image_placeholder(processor)} {question}"


VIDEO_SIDE = 336  # a frame of 12 x 12 merged tokens of 28 px: 8 frames (4 temporal patches) hold QWEN_SIDE's 576


def sample_video(image, frames: int, side: int = VIDEO_SIDE) -> list:
    """`frames` frames of a synthetic sample's image scaled to `side` px, each shifted 8 px further right (wrapping
    round): a video whose frames differ a little, as consecutive frames do."""
    from PIL import ImageChops

    base = image.resize((side, side))
    return [ImageChops.offset(base, 8 * k, 0) for k in range(frames)]


def _image_side(processor) -> int:
    """Side of the synthetic images to draw for a processor: its largest input size (for LLaVA-NeXT's tiles, the
    side of its largest square grid, so a square image fills it as a large photo would), at least 128; for
    Qwen2-VL, which takes any size, QWEN_SIDE (its processor may still resize within its min and max pixels), and
    for Gemma 4 (which resizes every image to its budget of visual tokens); for
    InternVL, two tiles a side (2 x 2 tiles and a thumbnail); for Idefics3 and SmolVLM, the longest side their
    processor scales an image to; for Gemma 3, the side it resizes every image to (Mistral 3: the longest it takes);
    for LLaVA-OneVision, at most
    the largest square grid of tiles within its `vision_aspect_ratio` budget (3 x 3 for "anyres_max_9"), where it
    does not interpolate the patches."""
    sizes = getattr(processor, "experts", None)
    if sizes:
        return max(128, max(s.image_size for s in sizes))
    if hasattr(processor.image_processor, "merge_size") or hasattr(processor.image_processor, "max_soft_tokens"):
        return QWEN_SIDE  # Gemma 4's too takes any size (and resizes it to its budget of visual tokens)
    if hasattr(processor.image_processor, "max_patches"):  # InternVL's tiles: a square image of two tiles a side
        return max(128, 2 * processor.image_processor.size["height"])
    if hasattr(processor.image_processor, "max_image_size"):  # Idefics3 / SmolVLM: the side it scales images to
        return max(128, processor.image_processor.size["longest_edge"])
    grids = getattr(processor.image_processor, "image_grid_pinpoints", None)
    crop = getattr(processor.image_processor, "crop_size", None) or processor.image_processor.size  # Gemma 3: size
    side = max(min(g) for g in grids) if grids else crop.get("height") or crop["longest_edge"]  # Mistral 3: its longest
    budget = getattr(processor, "vision_aspect_ratio", None)  # LLaVA-OneVision: no more tiles than it interpolates
    if budget:
        side = min(side, math.isqrt(int(budget.removeprefix("anyres_max_"))) * processor.image_processor.size["height"])
    return max(128, side)


def _prompts(processor, samples, video_frames: int = 0) -> dict:
    """The model's inputs for synthetic samples' questions (no answers): the project's processor and prompt
    template, or a stock VLM processor's `stock_prompt` (its chat template where it has one); with
    `video_frames`, each question asked of a `sample_video` of its image (the project's Qwen-VL, GLM-4.1V,
    LLaVA-OneVision, LLaVA-NeXT-Video, InternVL and Gemma 4 processors only)."""
    from ..models.gemma4 import Gemma4ImageTextProcessor
    from ..models.internvl import InternVLImageTextProcessor
    from ..models.llava import LlavaNextVideoImageTextProcessor, LlavaOnevisionImageTextProcessor
    from ..models.processor import MultiEncoderProcessor
    from ..models.qwen2_vl import Qwen2VLImageTextProcessor
    from ..train import encode_samples

    if video_frames:
        onevision = isinstance(processor, (LlavaOnevisionImageTextProcessor, LlavaNextVideoImageTextProcessor))
        takes = (Qwen2VLImageTextProcessor, InternVLImageTextProcessor, Gemma4ImageTextProcessor)
        if not (onevision or isinstance(processor, takes)):
            raise ValueError("videos run on a Qwen2-VL / Qwen2.5-VL / Qwen3-VL / GLM-4.1V / LLaVA-OneVision / "
                             f"LLaVA-NeXT-Video / InternVL / Gemma 4 model only, not with a {type(processor).__name__}")
        return dict(processor(videos=[sample_video(s.image, video_frames) for s in samples],
                              text=[stock_prompt(processor, s.question, video=True) for s in samples],
                              **(dict(return_tensors="pt", padding=True) if onevision else {})))
    if isinstance(processor, MultiEncoderProcessor):
        return encode_samples(processor, samples, with_answers=False)
    text = [stock_prompt(processor, s.question) for s in samples]
    try:
        return dict(processor(images=[s.image for s in samples], text=text, return_tensors="pt", padding=True))
    except ValueError:  # a processor that takes a batch's images as one list per prompt (Gemma 3's)
        if len(samples) == 1:
            raise
    return dict(processor(images=[[s.image] for s in samples], text=text, return_tensors="pt", padding=True))
