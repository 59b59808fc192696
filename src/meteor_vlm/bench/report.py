"""Bench results: printed table, results.json, results.csv, Pareto plot."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import synth
from .stats import paired_bootstrap

__all__ = ["format_table", "format_kinds", "format_counted", "format_ablations", "write_results", "reading", "compare_rows"]

_SHORT = {"scenes": "scene", "pope": "pope", "counting": "count", "ocr": "ocr", "docs": "docs", "charts": "chart"}


def format_table(rows: list[dict]) -> str:
    """Plain-text table: method, tokens and share, accuracy per family and average, the share of the unpruned
    average kept with its 95% interval (when the run has the unpruned model), answers that end, TFLOPs,
    latency."""
    fams = [f for f in synth.FAMILIES if f in rows[0]["accuracy"]]
    with_kept = any("kept" in r for r in rows)
    head = (["method", "tokens", "share"] + [_SHORT[f] for f in fams] + ["avg"]
            + (["kept [95% CI]"] if with_kept else []) + ["ends", "GFLOPs", "ms"])
    body = []
    for r in rows:
        body.append(
            [r["method"], f"{r['tokens']:.1f}", f"{r['tokens_share']:.0%}"]
            + [f"{100 * r['accuracy'][f]:.1f}" for f in fams]
            + [f"{100 * r['accuracy']['average']:.1f}"]
            + ([_kept(r)] if with_kept else [])
            + [f"{r['ends']:.0%}", f"{1000 * r['tflops']:.2f}", f"{r['latency_ms']:.1f}"]
        )
    return _render([head] + body)


def _kept(r: dict) -> str:
    """"98.8% [97.3, 100.2]": the unpruned average kept and its 95% interval; "" for the unpruned row."""
    if "kept" not in r:
        return ""
    lo, hi = r["kept_ci95"]
    return f"{r['kept']:.1%} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _render(cells: list[list[str]]) -> str:
    """Rows of cells as aligned text: the first column left-aligned, the others right; a rule under the head."""
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_kinds(rows: list[dict]) -> str:
    """Plain-text table of accuracy per kind of question (`synth.question_kind`), for the families that
    ask more than one kind (scenes, pope, charts); the header gives each kind's number of samples."""
    counts = rows[0]["samples_by_kind"]
    kinds = [k for k in counts if k.split("/")[0] != k.split("/")[1]]  # one-kind families: "docs/docs"
    if not kinds:
        return "no family in this run asks more than one kind of question"
    head = ["method"] + [f"{_SHORT[k.split('/')[0]]}/{k.split('/')[1]} ({counts[k]})" for k in kinds]
    return _render([head] + [[r["method"]] + [f"{100 * r['accuracy_by_kind'][k]:.1f}" for k in kinds] for r in rows])


def format_counted(rows: list[dict]) -> str:
    """Plain-text table of `counted_kept`: per method, the share of the objects counting questions count whose
    centre cell enters the LLM (after stages 1 and 2) from at least one expert, and from each expert's grid; "" when no row
    has it."""
    with_counted = [r for r in rows if "counted_kept" in r]
    if not with_counted:
        return ""
    experts = [k for k in with_counted[0]["counted_kept"] if k not in ("any", "objects")]
    head = ["method", f"any expert ({with_counted[0]['counted_kept']['objects']} objects)", *experts]
    return _render([head] + [[r["method"]] + [f"{100 * r['counted_kept'][k]:.1f}" for k in ["any", *experts]]
                             for r in with_counted])


def reading(rows: list[dict]) -> str:
    """One line: the best METEOR setting at <= 25% of the tokens against the unpruned model. Of settings with the same
    average the one with fewer tokens is picked, and the line names the others. When there is more than one such
    setting the line says how many it was picked from: a best-of-k pick on the same samples it reports leans high,
    so a setting's figure is fairer read from a split it was not picked on."""
    base = next((r for r in rows if r["method"] == "unpruned"), None)
    cands = [r for r in rows if r["method"].startswith("meteor:") and r["tokens_share"] <= 0.25]
    if base is None or not cands:
        return "no unpruned baseline or no METEOR setting at <= 25% of the tokens in this run"
    best = max(cands, key=lambda r: (r["accuracy"]["average"], -r["tokens_share"]))
    tied = [r["method"] for r in cands if r is not best and r["accuracy"]["average"] == best["accuracy"]["average"]]
    if base["accuracy"]["average"] == 0:  # a share of nothing would read as a loss (0%) or a gain (inf)
        return (f"the unpruned model answers none of these questions, so there is no accuracy to keep "
                f"({best['method']}: {100 * best['accuracy']['average']:.1f}%); train the model or run more samples")
    kept = best["accuracy"]["average"] / base["accuracy"]["average"]
    worst = min(
        (100 * (best["accuracy"][f] - base["accuracy"][f]), f) for f in base["accuracy"] if f != "average"
    )
    ci = f", 95% CI {100 * best['kept_ci95'][0]:.1f}-{100 * best['kept_ci95'][1]:.1f}%" if "kept_ci95" in best else ""
    wci = ""
    if "delta_ci95" in best:
        lo, hi = best["delta_ci95"][worst[1]]
        wci = f" [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return (
        f"{best['method']} keeps {best['tokens']:.0f} of {base['tokens']:.0f} visual tokens ({best['tokens_share']:.0%}), "
        f"{kept:.1%} of the unpruned accuracy{ci} ({100 * best['accuracy']['average']:.1f} vs "
        f"{100 * base['accuracy']['average']:.1f}; worst family {worst[1]} {worst[0]:+.1f} points{wci}), "
        f"{best['tflops'] / base['tflops']:.0%} of the FLOPs, {best['latency_ms'] / base['latency_ms']:.2f}x the latency"
        + (f"; tied on accuracy with {', '.join(tied)}, at more tokens" if tied else "")
        + (f"; the best of {len(cands)} METEOR settings at <= 25% on these same samples, so it leans high"
           if len(cands) > 1 else "")
    )


def format_ablations(rows: list[dict]) -> str:
    """One line per ablation pair of the run (`accuracy.paper_order_pairs`): the worse variant's average minus
    the better one's in points, its 95% interval, and whether the paper's order holds; "" when there is none."""
    lines = []
    for r in rows:
        a = r.get("ablation")
        if a is None:
            continue
        lo, hi = a["difference_ci95"]
        lines.append(f"{r['method']} vs {a['against']}: {100 * a['difference']:+.1f} points [{100 * lo:+.1f}, "
                     f"{100 * hi:+.1f}]: " + {"holds": "the paper's order holds",
                                              "reversed": "the paper's order is reversed",
                                              "tie": "a tie (the interval holds 0)"}[a["verdict"]])
    return "\n".join(lines)


def compare_rows(results: dict | Sequence[dict], base: str, other: str) -> dict:
    """Two rows of a bench's results.json against each other, after the fact: `other`'s average and
    per-family accuracy minus `base`'s, with the paired bootstrap's 95% intervals (`stats.paired_bootstrap`,
    as the bench computes them), from the per-sample answers the file keeps (`correct`, in
    `synth.make_split` order: families in turn).

    `results` may also be a list of results (benches of the same families on different splits, e.g. seeds):
    the two rows' answers are then pooled, each family's accuracy counted over all its questions, and the
    bootstrap resamples within each family across the splits (two results of the same seed are refused: the same
    questions twice). One results dict gives exactly the bench's own intervals.

    Returns {"base", "other", "questions", "difference", "difference_ci95", "kept", "kept_ci95",
    "delta": {family: difference}, "delta_ci95": {family: [lo, hi]}} (differences as fractions: -0.02 = 2
    points lost; kept: other's average over base's).
    """
    runs = [results] if isinstance(results, dict) else list(results)
    if not runs:
        raise ValueError("no results to compare")
    seeds = [res.get("seed") for res in runs]
    twice = sorted({x for x in seeds if x is not None and seeds.count(x) > 1})
    if twice:
        raise ValueError(f"these results share a split (seed {twice}): pooling them would count its questions twice")
    a: list[int] = []
    b: list[int] = []
    families: list[str] = []
    fams: list[str] | None = None
    for res in runs:
        rows = {r["method"]: r for r in res["rows"]}
        missing = [n for n in (base, other) if n not in rows]
        if missing:
            raise ValueError(f"no row {missing} in these results; rows: {list(rows)}")
        ra, rb = rows[base]["correct"], rows[other]["correct"]
        these = [f for f in synth.FAMILIES if f in rows[base]["accuracy"]]
        if fams is not None and these != fams:
            raise ValueError(f"pooled results must hold the same families: {fams} and {these}")
        fams = these
        if len(ra) != len(rb) or len(ra) != len(fams) * res["samples_per_family"]:
            raise ValueError(f"the rows hold {len(ra)} and {len(rb)} answers, not {len(fams)} families x "
                             f"{res['samples_per_family']} samples")
        a += [int(c) for c in ra]
        b += [int(c) for c in rb]
        families += [fams[i % len(fams)] for i in range(len(ra))]
    ci = paired_bootstrap(a, b, families)
    fam, a_arr, b_arr = np.asarray(families), np.asarray(a), np.asarray(b)
    acc_a = {f: float(a_arr[fam == f].mean()) for f in fams}
    acc_b = {f: float(b_arr[fam == f].mean()) for f in fams}
    avg_a, avg_b = float(np.mean(list(acc_a.values()))), float(np.mean(list(acc_b.values())))
    return {"base": base, "other": other, "questions": len(a), "difference": avg_b - avg_a,
            "difference_ci95": ci["difference"], "kept": avg_b / max(avg_a, 1e-12), "kept_ci95": ci["kept"],
            "delta": {f: acc_b[f] - acc_a[f] for f in fams}, "delta_ci95": ci["delta"]}


def write_results(rows: list[dict], out, meta: dict) -> list[Path]:
    """results.json, results.csv and pareto.png under `out`; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.csv", out / "pareto.png"]
    paths[0].write_text(json.dumps({**meta, "rows": rows}, indent=2))
    fams = [f for f in rows[0]["accuracy"]]
    with paths[1].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "tokens", "tokens_share", *[f"acc_{k}" for k in fams], "kept", "kept_lo95", "kept_hi95",
                    "ablation_against", "ablation_diff", "ablation_lo95", "ablation_hi95", "ends", "tflops", "latency_ms",
                    "counted_kept_any"])
        for r in rows:
            ci = [f"{v:.4f}" for v in [r["kept"], *r["kept_ci95"]]] if "kept" in r else ["", "", ""]
            a = r.get("ablation")
            ab = [a["against"], *(f"{v:.4f}" for v in [a["difference"], *a["difference_ci95"]])] if a else [""] * 4
            w.writerow([r["method"], f"{r['tokens']:.2f}", f"{r['tokens_share']:.4f}",
                        *[f"{r['accuracy'][k]:.4f}" for k in fams], *ci, *ab, f"{r['ends']:.4f}", f"{r['tflops']:.6f}",
                        f"{r['latency_ms']:.2f}", f"{r['counted_kept']['any']:.4f}" if "counted_kept" in r else ""])
    _plot(rows, paths[2])
    return paths


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "tokens", "layer-averaged visual tokens"), (axes[1], "latency_ms", "median latency per sample (ms)")):
        for r in rows:
            group = r["method"].split(":")[0]
            marker = {"unpruned": "*", "meteor": "o", "alloc": "s", "fusion": "^", "stage3": "D"}.get(group, "x")
            ax.scatter(r[key], 100 * r["accuracy"]["average"], marker=marker, s=60)
            ax.annotate(r["method"], (r[key], 100 * r["accuracy"]["average"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("average accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("accuracy vs tokens and vs latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
