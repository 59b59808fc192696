"""`meteor bench`: methods x budgets on the synthetic benchmark - tokens, accuracy, FLOPs, latency."""

from __future__ import annotations

import re
import statistics
import string
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import synth
from ..models.vlm import _OUTPUT_CACHE
from ..methods import DART, DivPrune, EvoPrune, FastV, Meteor, NoPruning, PruMerge, PyramidDrop, SparseVLM, ToMe, VisionZip
from .flops import count_flops
from .speed import _sync, stock_prompt
from .stats import paired_bootstrap

__all__ = ["method_catalog", "resolve_methods", "run_bench", "counted_objects_kept", "paper_order_pairs", "inputs_to_model", "DEMO_METHODS", "NAME_PATTERNS"]


def method_catalog() -> dict[str, Callable[[], object]]:
    """Every method setting the bench knows, by the name that appears in results.json's `method` field."""
    cat: dict[str, Callable[[], object]] = {"unpruned": NoPruning}
    for p in Meteor.presets():
        cat[f"meteor:{p}"] = lambda p=p: Meteor.preset(p)
    # ablations of PAPER.md, each stage alone at a matched budget
    for alloc in ("rank", "average", "rank-reverse"):
        cat[f"alloc:{alloc}"] = lambda a=alloc: Meteor(allocation=a, fusion=False, llm=False, encoder_keep=0.25)
    for strat in ("cooperative", "separate", "random"):
        cat[f"fusion:{strat}"] = lambda s=strat: Meteor(encoder=False, llm=False, fusion_keep=0.25, fusion_strategy=s)
    cat["stage3:adaptive"] = lambda: _stage3_alone("adaptive")
    cat["stage3:fixed"] = lambda: _stage3_alone("fixed")  # ratios matched at run time
    return cat


def _stage3_alone(budget: str, lam: float = 50.0) -> Meteor:
    """The stage-3 ablation: stage 3 alone, adaptive or fixed (the paper's lambda by default)."""
    return Meteor(encoder=False, fusion=False, lam=lam, budget=budget)


DEMO_METHODS = (
    "unpruned",
    "meteor:paper-312",
    "meteor:paper-242",
    "meteor:paper-126",
    "meteor:e0.5-f0.5-l200",  # exactly 25% of the tokens (half per expert, half at fusion): the target's budget
    "meteor:stage3-l15",  # stage 3 alone, about 21% of the tokens on the default model
    "meteor:e1-f0.5-l30",  # stages 2 and 3 (experts whole), about 15% of the tokens on the default model
    "meteor:e0.35-l50-act-ms",  # stages 1 and 3 (no fusion pruning; open scores -act and -ms), about 15% too
    "alloc:rank",
    "alloc:average",
    "alloc:rank-reverse",
    "fusion:cooperative",
    "fusion:separate",
    "fusion:random",
    "stage3:adaptive",
    "stage3:fixed",
)


# the ablations' variants, best first, in the order PAPER.md reports them (Tables 1 and 2 of 002)
PAPER_ORDERS = (
    ("alloc:rank", "alloc:average", "alloc:rank-reverse"),
    ("fusion:cooperative", "fusion:separate", "fusion:random"),
)


def paper_order_pairs(names: list[str]) -> list[tuple[str, str]]:
    """The (better, worse) pairs whose order PAPER.md claims, among the names of one run.

    Within an ablation, each variant present is paired with the one just before it in the paper's order
    (rank > average > rank-reverse; cooperative > separate > random); a fixed-ratio stage 3 is paired with
    its adaptive twin of the same lambda (Table 3 of 002), when the run has it.
    """
    pairs = []
    for order in PAPER_ORDERS:
        present = [n for n in order if n in names]
        pairs += list(zip(present, present[1:]))
    for n in names:
        twin = n.replace("stage3:fixed", "stage3:adaptive")
        if n.startswith("stage3:fixed") and twin in names:
            pairs.append((twin, n))
    return pairs


@dataclass(frozen=True)
class NamePattern:
    """A family of bench names with settings in them: the pattern, the method a match stands for, how the
    name reads (`usage`), what it runs (`help`), and an example name (all three printed by `meteor methods`)."""

    pattern: re.Pattern
    make: Callable
    usage: str
    help: str
    example: str


NAME_PATTERNS = (
    NamePattern(re.compile(r"^meteor:e([0-9.]+)-f([0-9.]+)-l([0-9.]+)(-act)?(-ms)?$"),
                lambda e, f, lam, act, ms: Meteor(encoder_keep=float(e), fusion_keep=float(f), lam=float(lam),
                                                  cnn_score=_cnn_score(act), nocls_score=_nocls_score(ms)),
                "meteor:e<encoder_keep>-f<fusion_keep>-l<lambda>[-act][-ms]",
                "all three stages at a chosen budget; -act: a CNN expert keeps its cells of largest activation norm "
                "(cnn_score='activation') instead of those least like its mean cell; -ms: an expert without CLS "
                "drops the tokens most like its mean token at every pruning point (nocls_score='mean-similarity') "
                "instead of keeping the most attended at the later ones", "meteor:e0.5-f0.6-l100"),
    NamePattern(re.compile(r"^meteor:e([0-9.]+)-l([0-9.]+)(-act)?(-ms)?$"),
                lambda e, lam, act, ms: Meteor(fusion=False, encoder_keep=float(e), lam=float(lam),
                                               cnn_score=_cnn_score(act), nocls_score=_nocls_score(ms)),
                "meteor:e<encoder_keep>-l<lambda>[-act][-ms]",
                "stages 1 and 3 at a chosen budget, no fusion stage (a model with one vision encoder, e.g. a LLaVA)",
                "meteor:e0.333-l50"),
    NamePattern(re.compile(r"^meteor:e([0-9.]+)-f([0-9.]+)(-act)?(-ms)?$"),
                lambda e, f, act, ms: Meteor(llm=False, encoder_keep=float(e), fusion_keep=float(f),
                                             cnn_score=_cnn_score(act), nocls_score=_nocls_score(ms)),
                "meteor:e<encoder_keep>-f<fusion_keep>[-act][-ms]",
                "stages 1 and 2 at a chosen budget, no stage 3 (what the LLM receives is what every layer sees)",
                "meteor:e0.5-f0.5-ms"),
    NamePattern(re.compile(r"^meteor:stage3-l([0-9.]+)$"), lambda lam: _stage3_alone("adaptive", float(lam)),
                "meteor:stage3-l<lambda>",
                "METEOR's stage 3 alone at a chosen lambda: the experts and the fusion run whole, the LLM drops "
                "tokens by its text-guided scores (the same method as stage3:adaptive-l<lambda>)", "meteor:stage3-l15"),
    NamePattern(re.compile(r"^alloc:(rank|average|rank-reverse)(?=-)(-act)?(-ms)?$"),
                lambda alloc, act, ms: method_catalog()[f"alloc:{alloc}"]().with_(cnn_score=_cnn_score(act),
                                                                                  nocls_score=_nocls_score(ms)),
                "alloc:<allocation>[-act][-ms]",
                "the stage-1 ablation (that allocation, 25% of the tokens) with a CNN expert pruned by activation norm "
                "(-act) and experts without CLS by mean similarity at every point (-ms)", "alloc:rank-act"),
    NamePattern(re.compile(r"^stage3:(adaptive|fixed)-l([0-9.]+)$"), lambda budget, lam: _stage3_alone(budget, float(lam)),
                "stage3:adaptive-l<lambda>, stage3:fixed-l<lambda>",
                "the stage-3 ablation at another lambda (default 50; the fixed ratios are matched at run time to "
                "the adaptive method of the same lambda)", "stage3:fixed-l10"),
    NamePattern(re.compile(r"^fastv:k([0-9]+)-r([0-9.]+)$"), lambda k, r: FastV(layer=int(k), ratio=float(r)),
                "fastv:k<layer>-r<ratio>", "FastV: drop that share of the visual tokens before that LLM layer",
                "fastv:k1-r0.875"),
    NamePattern(re.compile(r"^pyramiddrop:r([0-9.]+)$"), lambda r: PyramidDrop(ratio=float(r)),
                "pyramiddrop:r<ratio>",
                "PyramidDrop: keep that share of the previous stage's visual tokens at 8/16/24 of 32 layers",
                "pyramiddrop:r0.5"),
    NamePattern(re.compile(r"^dart:k([0-9]+)-r([0-9.]+)$"), lambda k, r: DART(layer=int(k), ratio=float(r)),
                "dart:k<layer>-r<ratio>",
                "DART: before that LLM layer, drop that share, keeping the tokens least duplicated with 4 + 4 "
                "key-norm pivots", "dart:k1-r0.875"),
    NamePattern(re.compile(r"^divprune:keep([0-9.]+)$"), lambda keep: DivPrune(keep=float(keep)),
                "divprune:keep<share>", "DivPrune: keep that share of the projected tokens by greedy max-min diversity",
                "divprune:keep0.23"),
    NamePattern(re.compile(r"^visionzip:keep([0-9.]+)$"), lambda keep: VisionZip(keep=float(keep)),
                "visionzip:keep<share>",
                "VisionZip: each expert hands on that share of its tokens, dominant ones and 10/64 of them merged "
                "contextual ones", "visionzip:keep0.23"),
    NamePattern(re.compile(r"^evoprune:keep([0-9.]+)(-rank)?$"),
                lambda keep, rank: EvoPrune(keep=float(keep), allocation="rank" if rank else "same"),
                "evoprune:keep<share>[-rank]",
                "EvoPrune: inside each expert, at the ends of its thirds, keep important, non-redundant, diverse "
                "tokens and merge the rest into them, down to that share; -rank splits that share of all tokens "
                "over the experts by METEOR's rank allocation", "evoprune:keep0.23-rank"),
    NamePattern(re.compile(r"^tome:keep([0-9.]+)$"), lambda keep: ToMe(keep=float(keep)),
                "tome:keep<share>",
                "ToMe: in every block of each expert, between attention and MLP, merge the most similar tokens "
                "(bipartite matching on keys, proportional attention) down to that share", "tome:keep0.23"),
    NamePattern(re.compile(r"^tome:r([0-9]+)$"), lambda r: ToMe(r=int(r)),
                "tome:r<tokens>",
                "ToMe with its own schedule: that many tokens merged in every block of each ViT expert (at most half "
                "of those left); CNN experts untouched", "tome:r8"),
    NamePattern(re.compile(r"^prumerge:uniform([0-9.]+)(?:-n([0-9.]+))?(-cnnmix)?$"),
                lambda uniform, n, cnnmix: PruMerge(uniform=float(uniform), cnn_mix=bool(cnnmix),
                                                    **({} if n is None else {"neighbours": float(n)})),
                "prumerge:uniform<share>[-n<share>][-cnnmix]",
                "PruMerge+: each expert keeps its attention outliers (interquartile rule: a count per image) and "
                "that share of its grid spread evenly, each kept token taking in its nearest neighbours; uniform0 "
                "is PruMerge; -n sets the neighbours' share (32/576 by default), -cnnmix mixes the CNN's kept "
                "tokens too (equal weights)", "prumerge:uniform0.2"),
    NamePattern(re.compile(r"^sparsevlm:k([0-9.]+(?:-[0-9.]+)*)(?:-r([0-9.]+))?$"),
                lambda keep, r: SparseVLM(keep=tuple(float(k) for k in keep.split("-")),
                                          **({} if r is None else {"recycle": float(r)})),
                "sparsevlm:k<share>-<share>-<share>[-r<share>]",
                "SparseVLM: text raters' attention keeps those shares of the visual tokens from 3/7/16 of 32 "
                "layers on (scaled), 30% of the dropped ones recycled into merged tokens (-r sets that share); "
                "its 192-of-576 setting is k0.52-0.35-0.19", "sparsevlm:k0.52-0.35-0.19"),
)


def _cnn_score(act: str | None) -> str:
    return "activation" if act else "mean-similarity"


def _nocls_score(ms: str | None) -> str:
    return "mean-similarity" if ms else "received-attention"


def budget_method(name: str):
    """The method a bench name with settings stands for (one of `NAME_PATTERNS`, listed with what each runs by
    `meteor methods`), or None."""
    for p in NAME_PATTERNS:
        m = p.pattern.match(name)
        if m is not None:
            return p.make(*m.groups())
    return None


def make_method(name: str):
    """The method a bench name stands for (catalog name or budget name)."""
    cat = method_catalog()
    return cat[name]() if name in cat else budget_method(name)


def build_methods(model, names: list[str], encoded: list[dict]) -> dict:
    """The method objects of a run, by name; a fixed-ratio stage 3 keeps, per layer, its adaptive twin's
    average share over the run's inputs `encoded` (`_matched_fixed`)."""
    methods = {n: make_method(n) for n in names}
    for n in methods:
        if n.startswith("stage3:fixed"):
            twin = n.replace("fixed", "adaptive")
            methods[n] = _matched_fixed(model, encoded, methods.get(twin) or make_method(twin))
    return methods


def resolve_methods(names: list[str]) -> list[str]:
    """Check method names against the catalog and the budget patterns (ValueError listing the known ones)."""
    cat = method_catalog()
    bad = [n for n in names if n not in cat and not any(p.pattern.match(n) for p in NAME_PATTERNS)]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; known: {list(cat)}, or names with settings: "
                         + ", ".join(p.usage for p in NAME_PATTERNS) + " (`meteor methods` says what each runs)")
    if not names:
        raise ValueError("no method given")
    return names


def _predict(model, inputs) -> torch.Tensor:
    return model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].argmax(-1)


def _greedy(model, logits: torch.Tensor) -> torch.Tensor:
    """argmax of (B, V) logits as greedy `generate` takes it: the generation config's suppress_tokens never win."""
    suppress = getattr(getattr(model, "generation_config", None), "suppress_tokens", None) or []
    if suppress:
        logits = logits.clone()
        logits[:, suppress] = float("-inf")
    return logits.argmax(-1)


def ends_after_prefill(model, inputs, out, eos_id: int) -> bool:
    """What `answer_ends` says, read from `out`, the output of a cached prefill of `inputs` (batch 1, under the same
    method), with one decode step on its cache instead of a second prefill: greedy generation's first token is the
    prefill's last argmax (suppress_tokens masked), and the answer ends when that token is not `eos_id` and the next
    one is."""
    first = _greedy(model, out.logits[:, -1])
    if int(first[0]) == eos_id:
        return False
    mask = inputs["attention_mask"]
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    nxt = model(input_ids=first[:, None], attention_mask=mask, past_key_values=getattr(out, _OUTPUT_CACHE),
                use_cache=True, logits_to_keep=1)
    return int(_greedy(model, nxt.logits[:, -1])[0]) == eos_id


def answer_ends(model, inputs, eos_id: int) -> bool:
    """Whether greedy generation (KV cache, the active pruning method) stops right after the one-word
    answer: its second token is `eos_id`. Answers are one word; a model that runs on ("red circle
    square ...") is wrong as generated text even when its first word is right."""
    new = model.generate(**inputs, max_new_tokens=2, do_sample=False, eos_token_id=eos_id,
                         pad_token_id=eos_id)[0, inputs["input_ids"].shape[1] :]
    return len(new) >= 2 and int(new[0]) != eos_id and int(new[1]) == eos_id


# what a stock VLM is asked after each synthetic question, and how many tokens its reply may take
SHORT_ANSWER = " Answer with a single word or number."
ANSWER_TOKENS = 6
NUMBER_WORDS = dict(zip("zero one two three four five six seven eight nine ten eleven twelve".split(),
                        map(str, range(13))))


def first_word(reply: str) -> str:
    """The first word of a stock VLM's free-text reply, written as the synthetic answers are: lowercased, without the
    punctuation around it, a number word as its digits ("Three." -> "3", "Yes, it is." -> "yes")."""
    words = reply.strip().lower().split()
    word = words[0].strip(string.punctuation) if words else ""
    return NUMBER_WORDS.get(word, word)


def stock_inputs(processor, sample) -> dict:
    """A stock VLM's inputs for one synthetic sample: its question and `SHORT_ANSWER` in the processor's chat template
    (`speed.stock_prompt`), with the sample's image."""
    return dict(processor(images=[sample.image], text=[stock_prompt(processor, sample.question + SHORT_ANSWER)],
                          return_tensors="pt"))


@torch.no_grad()
def run_bench(model, processor, names: list[str], per_family: int = 10, seed: int = synth.EVAL_SEED,
              image_size: int = 336, flops_samples: int = 6, progress: bool = True) -> list[dict]:
    """Run each named method on the same held-out samples, one sample at a time, methods interleaved.

    On a stock transformers VLM (any processor but the project's) each question is asked through the processor's
    chat template with "Answer with a single word or number." after it (`stock_inputs`), the reply is greedy
    `generate` of up to `ANSWER_TOKENS` tokens under the method, and its first word (`first_word`) is the answer;
    ends is then the share of replies that are that one word. `image_size`: the synthetic images' side (`meteor
    bench` draws them at `speed._image_side` of the processor).

    Returns one row per method: method, tokens (layer-averaged visual tokens), tokens_share (of the
    unpruned count), stage1_tokens, fusion_tokens, accuracy {family: acc, "average": mean over
    families} of the first answer word, accuracy_by_kind and samples_by_kind {"family/kind": ...} per
    kind of question (`synth.question_kind`; e.g. scenes/neighbor, whose answer is a shape), counted_kept (how
    many of the objects counting questions count enter the LLM, `counted_objects_kept`), ends
    (share of answers that stop after that word, see `answer_ends`), tflops (per sample), latency_ms (median per sample, batch 1, the prefill that
    gives the first word), correct ("1"/"0" per sample, in `synth.make_split` order). When "unpruned" is
    among the names, every other row also has kept (its average over the unpruned one), kept_ci95 and
    delta_ci95 ({family: [lo, hi]}, accuracy minus the unpruned one's): 95% intervals of a paired,
    per-family bootstrap (`stats.paired_bootstrap`). The worse variant of each pair whose order the paper
    claims (`paper_order_pairs`) has ablation {against (the paper's better variant), difference (its average
    minus that one's), difference_ci95, verdict}: "holds" when the interval lies below 0, "reversed" above
    it, "tie" when it holds 0.
    """
    from ..models.processor import MultiEncoderProcessor
    from ..train import encode_samples  # the prompt format the model was trained with

    resolve_methods(names)
    stock = not isinstance(processor, MultiEncoderProcessor)
    samples = synth.make_split(seed, per_family, image_size=image_size)
    if stock:
        encoded = [inputs_to_model(model, stock_inputs(processor, s)) for s in samples]
    else:
        encoded = [inputs_to_model(model, encode_samples(processor, [s], with_answers=False)) for s in samples]
    methods = build_methods(model, names, encoded)
    model.eval()
    times = {n: [] for n in names}
    stats = {n: [] for n in names}
    ends = {n: 0 for n in names}
    eos_id = processor.tokenizer.eos_token_id
    asked: Counter = Counter()  # "family/kind" -> samples; per family, their sum
    right = {n: Counter() for n in names}  # "family/kind" -> correct answers
    hits = {n: [] for n in names}  # 1 / 0 per sample, in sample order
    for s, inputs in tqdm(list(zip(samples, encoded)), desc="bench", disable=not progress):
        kind = f"{s.family}/{synth.question_kind(s)}"
        asked[kind] += 1
        for n in names:
            m = methods[n]
            with m(model):
                t0 = time.perf_counter()
                out = model(**inputs, use_cache=True, logits_to_keep=1)  # the prefill that gives the first word
                pred = out.logits[:, -1].argmax(-1)
                _sync(pred.device)  # on a GPU the reading waits for the queued work
                times[n].append((time.perf_counter() - t0) * 1000)
                prefill = list(m.stats)
                if stock:  # untimed: the reply, greedy, and its first word
                    reply = model.generate(**inputs, max_new_tokens=ANSWER_TOKENS, do_sample=False)
                    reply = processor.tokenizer.decode(reply[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                    word = first_word(reply)
                    ends[n] += int(len(reply.split()) == 1)
                else:
                    # untimed: does the generated answer stop after its word? (one decode step on the prefill's cache)
                    ends[n] += int(ends_after_prefill(model, inputs, out, eos_id))
                    word = processor.tokenizer.convert_ids_to_tokens(int(pred[0]))
            stats[n].extend(prefill)
            hits[n].append(int(synth.is_correct(word, s.answer)))
            right[n][kind] += hits[n][-1]
    flop_inputs = encoded[:: max(1, len(encoded) // max(1, flops_samples))][:flops_samples]
    counts = _by_family(asked)
    rows = []
    for n in names:
        m = methods[n]

        def one(inp, m=m):
            with m(model):
                _predict(model, inp)

        flops = statistics.mean(count_flops(one, inp) for inp in flop_inputs)
        correct = _by_family(right[n])
        acc = {f: correct[f] / counts[f] for f in synth.FAMILIES if counts[f]}
        acc["average"] = sum(acc.values()) / len(acc)
        st = stats[n]
        rows.append(
            {
                "method": n,
                "tokens": statistics.mean(x["layer_avg_tokens"] for x in st),
                "stage1_tokens": statistics.mean(x["stage1_tokens"] for x in st),
                "fusion_tokens": statistics.mean(x["fusion_tokens"] for x in st),
                "encoder_tokens": statistics.mean(x["encoder_tokens"] for x in st),
                "accuracy": acc,
                "accuracy_by_kind": {k: right[n][k] / c for k, c in sorted(asked.items())},
                "samples_by_kind": dict(sorted(asked.items())),
                "ends": ends[n] / len(samples),
                "tflops": flops / 1e12,
                "latency_ms": statistics.median(times[n]),
                "settings": m.settings() if hasattr(m, "settings") else {},
                "correct": "".join(map(str, hits[n])),
            }
        )
        if (counted := counted_objects_kept(model, samples, st)) is not None:
            rows[-1]["counted_kept"] = counted
    base = next((r for r in rows if r["method"] == "unpruned"), None)
    ref = base["tokens"] if base else rows[0]["encoder_tokens"]
    families = [s.family for s in samples]
    for r in rows:
        r["tokens_share"] = r["tokens"] / ref
        if base is not None and r is not base:  # how sure the comparison with the unpruned model is
            ci = paired_bootstrap(hits["unpruned"], hits[r["method"]], families)
            r["kept"] = r["accuracy"]["average"] / max(base["accuracy"]["average"], 1e-12)
            r["kept_ci95"], r["delta_ci95"] = ci["kept"], ci["delta"]
    by_name = {r["method"]: r for r in rows}
    for better, worse in paper_order_pairs(names):  # does the paper's order hold, and how sure is it?
        ci = paired_bootstrap(hits[better], hits[worse], families)["difference"]
        diff = by_name[worse]["accuracy"]["average"] - by_name[better]["accuracy"]["average"]
        verdict = "holds" if ci[1] < 0 else "reversed" if ci[0] > 0 else "tie"
        by_name[worse]["ablation"] = {"against": better, "difference": diff, "difference_ci95": ci, "verdict": verdict}
    return rows


def counted_objects_kept(model, samples, stats: list[dict]) -> dict | None:
    """Of the objects counting questions count, how many still enter the LLM (after stages 1 and 2).

    Each counted object (a shape the question names) holds one cell of each expert's token grid, the one with its
    centre (where the embedded models' grounding names its shape, so the cell a count reads). Over the counting
    samples among `samples` (`stats`: one `method.stats` entry per sample, in the same order): {"any": the share of
    counted objects whose centre cell enters the LLM in at least one expert, expert name: the share of them whose centre
    cell of that expert's grid enters it, "objects": how many were counted}. None when no sample counts anything or
    the model's experts have no fixed grid (the tokens' cells are not known)."""
    from ..train import point_cell

    runners = getattr(model, "runners", None)
    if not runners or not all(r.fixed_grid for r in runners) or len(stats) != len(samples):
        return None
    names, grids = [r.spec.name for r in runners], [r.grid() for r in runners]
    kept = Counter()
    total = 0
    for s, st in zip(samples, stats):
        if s.family != "counting":
            continue
        entered = st["llm_grid"][0] if st.get("llm_grid") else {}
        cells = [set(entered.get(n, ())) for n in names]
        for o in s.meta["objects"]:
            if o["shape"] != s.meta["target"]:
                continue
            total += 1
            alive = [point_cell(o["x"], o["y"], g) in c for g, c in zip(grids, cells)]
            kept["any"] += any(alive)
            for n, a in zip(names, alive):
                kept[n] += a
    if not total:
        return None
    return {"any": kept["any"] / total, **{n: kept[n] / total for n in names}, "objects": total}


def inputs_to_model(model, inputs: dict) -> dict:
    """Processor outputs on the model's device, floating ones (pixels) in its dtype."""
    dtype, device = model.dtype, model.device
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


def _by_family(per_kind: Counter) -> Counter:
    """Sums over each family's kinds: {"family/kind": x} -> {family: x}."""
    out: Counter = Counter()
    for k, v in per_kind.items():
        out[k.split("/")[0]] += v
    return out


def _matched_fixed(model, encoded, adaptive: Meteor) -> Meteor:
    """A fixed-ratio stage 3 keeping, at each layer, the adaptive method's mean share of the LLM's input."""
    with adaptive(model):
        for inputs in encoded:
            _predict(model, inputs)
    layers = sorted(adaptive._plan["llm"])
    shares = []
    for layer in layers:
        shares.append(statistics.mean(s["stage3"][layer] / s["fusion_tokens"] for s in adaptive.stats))
    return adaptive.with_(budget="fixed", fixed_keep=tuple(shares))
