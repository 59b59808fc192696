"""The project's oracles, run on a user's own model: `mv.verify(model, processor)`, `meteor verify --model PATH`.

The test suite proves the runtime on tiny random configs of every supported architecture; a real checkpoint may
differ from them in a way no tiny config has (a decoder setting, a dtype, a processor). `verify` asks the same
questions of the model at hand, on a few synthetic samples written through its processor (and chat template):

- pruning nothing (`NoPruning`) gives the logits of the unmodified model, on a left-padded batch;
- under each method, the batch gives each prompt's logits as that prompt alone does (at its last token);
- under each method, greedy `generate` with the KV cache gives the logits and tokens of `generate` without it.

Each check compares logits: the largest difference against a tolerance relative to the largest logit (float32:
1e-3 of it; bfloat16 and float16: 5e-2), and, for generation, whether the tokens are the same. Nothing is timed.
Verify in float32 where the model fits: in half precision the runtime and the stock model round differently (the
encoders' order of operations differs), and a mixture-of-experts decoder can amplify those last bits by routing a
token to other experts, beyond the half-precision bound, without any bug.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import synth
from .bench.accuracy import inputs_to_model, make_method, resolve_methods

__all__ = ["verify", "DEFAULT_METHODS", "format_checks"]

DEFAULT_METHODS = ("fastv:k2-r0.5", "meteor:e0.5-l50")  # one that prunes in the LLM, one before it and in it
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def _inputs(model, processor, samples, video_frames: int = 0) -> dict:
    """The batch's inputs through the processor and its chat template (`meteor speed`'s prompts: with `video_frames`,
    each question asked of a video of that many frames of its image)."""
    from .bench.speed import _prompts

    return inputs_to_model(model, _prompts(processor, samples, video_frames))


def _row(check: str, method: str, diff: float, scale: float, tol: float, detail: str = "", same: bool = True) -> dict:
    bound = tol * max(1.0, scale)
    return {"check": check, "method": method, "max_diff": diff, "bound": bound, "passed": diff <= bound and same,
            "detail": detail}


def _real_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits.float()[mask.bool()]


def _last_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, V) each row's logits at its last real token (the last column under left padding, wherever under right)."""
    last = mask.long().cumsum(1).argmax(1)  # the first column where the count of real tokens is reached
    return logits[torch.arange(len(last), device=logits.device), last].float()


def _number(x: float | None) -> str:
    return "" if x is None else f"{x:.2e}"


@torch.no_grad()
def verify(model, processor, methods: Sequence[str] = DEFAULT_METHODS, samples: int = 3, new_tokens: int = 4,
           seed: int = synth.EVAL_SEED, image_size: int | None = None, tolerance: float | None = None,
           video_frames: int = 0) -> list[dict]:
    """Run the oracles on `model` (the project's model or a stock transformers VLM the adapters take) and its
    `processor`; returns one row per check: check, method, max_diff (the largest logit difference), bound (the
    tolerance times the largest logit, at least 1), passed, detail.

    methods: `meteor methods` names (default: FastV at layer 2 keeping half the visual tokens, and METEOR's stages 1
    and 3 at half the encoder's tokens). A method the model refuses (a `ValueError`, e.g. a stage that needs two
    experts) gives a row that is neither passed nor failed (passed None) with the reason. samples: prompts in the
    batch (at least 2, from different families, so their lengths differ and the batch is padded); new_tokens: the
    greedy steps compared; image_size: the synthetic images' side (default: what `meteor speed` draws for the
    processor, 336 px for one it cannot read that from); tolerance: the relative bound (default by the model's dtype:
    float32 1e-3, half precision 5e-2); video_frames: ask each question of a video of that many frames of its image
    instead (as `meteor speed --video`: the models whose processors here take videos).
    """
    from .bench.speed import _image_side
    from .methods import NoPruning

    if samples < 2:
        raise ValueError(f"samples must be >= 2 (a batch to compare with its prompts alone), got {samples}")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    if video_frames < 0:
        raise ValueError(f"video_frames must be >= 0, got {video_frames}")
    names = resolve_methods(list(methods))
    tol = TOLERANCE.get(model.dtype, 5e-2) if tolerance is None else tolerance
    if image_size is None:
        try:
            image_size = _image_side(processor)
        except AttributeError:  # a processor without the image processor `meteor speed` reads the side from
            image_size = 336
    per = -(-samples // len(synth.FAMILIES))
    drawn = synth.make_split(seed=seed, per_family=per, image_size=image_size)[:samples]
    batch = _inputs(model, processor, drawn, video_frames)
    mask = batch["attention_mask"]
    rows = []

    stock = model(**batch, use_cache=False).logits
    with NoPruning()(model):
        same = model(**batch, use_cache=False).logits
    ref = _real_logits(stock, mask)
    rows.append(_row("pruning nothing = the unmodified model", "unpruned",
                     (_real_logits(same, mask) - ref).abs().max().item(), ref.abs().max().item(), tol,
                     f"{int(mask.sum())} tokens in a batch of {samples}, padded to {mask.shape[1]}"
                     + (f"; a video of {video_frames} frames each" if video_frames else "")))

    alone_inputs = [_inputs(model, processor, [s], video_frames) for s in drawn]
    steps = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                 output_logits=True)
    for name in names:
        method = make_method(name)
        try:
            with method(model):
                last = _last_logits(model(**batch, use_cache=False).logits, mask)
                alone = torch.cat([_last_logits(model(**a, use_cache=False).logits, a["attention_mask"])
                                   for a in alone_inputs])
                stats = method.stats[:samples]
                cached = model.generate(**batch, **steps)
                uncached = model.generate(**batch, **steps, use_cache=False)
        except ValueError as e:
            rows.append({"check": "refused", "method": name, "max_diff": None, "bound": None, "passed": None,
                         "detail": str(e)})
            continue
        kept = sum(s["layer_avg_tokens"] for s in stats) / max(1, sum(s["encoder_tokens"] for s in stats))
        rows.append(_row("batch = each prompt alone", name, (last - alone).abs().max().item(), alone.abs().max().item(),
                         tol, f"{kept:.0%} of the visual tokens kept (layer-averaged)"))
        with_cache, without = torch.stack(cached.logits).float(), torch.stack(uncached.logits).float()
        tokens_same = torch.equal(cached.sequences, uncached.sequences)
        rows.append(_row("cached generate = uncached", name, (with_cache - without).abs().max().item(),
                         without.abs().max().item(), tol,
                         f"{new_tokens} greedy steps, tokens {'the same' if tokens_same else 'DIFFER'}", tokens_same))
    return rows


def format_checks(rows: list[dict]) -> str:
    """The rows of `verify` as a table, and a last line: how many passed, failed or were refused."""
    head = ("check", "method", "max diff", "bound", "result", "detail")
    cells = [head]
    for r in rows:
        result = "refused" if r["passed"] is None else "pass" if r["passed"] else "FAIL"
        cells.append((r["check"], r["method"], _number(r["max_diff"]), _number(r["bound"]), result, r["detail"]))
    widths = [max(len(c[i]) for c in cells) for i in range(len(head) - 1)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(head) - 1)) + "  " + c[-1] for c in cells]
    failed = sum(r["passed"] is False for r in rows)
    refused = sum(r["passed"] is None for r in rows)
    passed = len(rows) - failed - refused
    lines.append(f"\n{passed} passed, {failed} failed, {refused} refused")
    return "\n".join(lines)
