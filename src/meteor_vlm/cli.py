"""The `meteor` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _load(model_arg: str):
    """(model, processor) from 'tiny' (random tiny model, calibrated on synthetic images) or a local path."""
    import meteor_vlm as mv

    if model_arg == "tiny":
        model, processor = mv.testing.tiny_model(seed=0)
        model.config.rank_table = mv.calibrate(model, processor, _synthetic_images(8, seed=1), progress=False)
        return model, processor
    path = Path(model_arg)
    if not path.is_dir():
        raise SystemExit(f"error: model directory not found: {path}")
    return mv.MultiEncoderVLM.from_pretrained(path).eval(), mv.MultiEncoderProcessor.from_pretrained(path)


def _synthetic_images(n: int, seed: int):
    from . import synth

    per = max(1, -(-n // len(synth.FAMILIES)))
    return [s.image for s in synth.make_split(seed=seed, per_family=per, image_size=128)][:n]


def _format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    cells = [[h for _, h in columns]] + [[str(r[k]) for k, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_calibrate(args) -> int:
    import meteor_vlm as mv

    model, processor = _load(args.model)
    if args.images:
        folder = Path(args.images)
        if not folder.is_dir():
            raise SystemExit(f"error: image folder not found: {folder}")
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[: args.limit]
        if not images:
            raise SystemExit(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    else:
        images = _synthetic_images(args.synthetic, seed=args.seed)
    table = mv.calibrate(model, processor, images, batch_size=args.batch_size, rtol=args.rtol)
    mv.save_rank_table(table, args.out)
    print(json.dumps(table, indent=2))
    print(f"rank table of {len(images)} images written to {args.out}")
    if args.write_config:
        if args.model == "tiny":
            raise SystemExit("error: --write-config needs a model directory")
        model.config.rank_table = table
        model.config.save_pretrained(args.model)
        print(f"rank table stored in {args.model}/config.json")
    return 0


def cmd_demo(args) -> int:
    import meteor_vlm as mv
    from meteor_vlm import synth
    from meteor_vlm.bench import count_flops, time_methods

    model, processor = _load(args.model)
    samples = synth.make_split(seed=args.seed, per_family=1, image_size=128)[: args.samples]
    inputs = processor(
        images=[s.image for s in samples], text=[processor.format_prompt(s.question) for s in samples], return_tensors="pt", padding=True
    )
    methods = [("unpruned", mv.NoPruning())] + [(f"meteor:{p}", mv.Meteor.preset(p)) for p in mv.Meteor.presets()]

    def run(method):
        with method(model):
            model(**inputs, use_cache=False)

    rows = []
    for name, method in methods:
        flops = count_flops(run, method)
        s = method.summary()
        rows.append({"method": name, **s, "gflops": flops / 1e9})
    timing = time_methods(run, [m for _, m in methods], repeats=args.repeats)
    base = rows[0]
    for row, t in zip(rows, timing):
        row["latency_ms"] = t["median_ms"]
        row.update(
            stage1=f"{row['stage1_tokens']:.0f}",
            fusion=f"{row['fusion_tokens']:.0f}",
            layer_avg=f"{row['layer_avg_tokens']:.1f}",
            share=f"{row['layer_avg_tokens'] / base['layer_avg_tokens']:.0%}",
            gflops_s=f"{row['gflops']:.3f} ({row['gflops'] / base['gflops']:.0%})",
            latency=f"{t['median_ms']:.1f} ({t['median_ms'] / timing[0]['median_ms']:.2f}x)",
        )
    print(f"model: {args.model}  samples: {len(samples)} (batch)  experts: {', '.join(model.expert_names)}")
    print(f"unpruned visual tokens per image: {base['encoder_tokens']:.0f} from the experts, "
          f"{base['fusion_tokens']:.0f} into the LLM ({model.num_llm_layers} layers)\n")
    cols = [("method", "method"), ("stage1", "after stage 1"), ("fusion", "after stage 2"), ("layer_avg", "LLM layer-avg"),
            ("share", "share"), ("gflops_s", "GFLOPs"), ("latency", f"median ms ({args.repeats} interleaved)")]
    print(_format_table(rows, cols))
    if args.model == "tiny":
        print("\nThe tiny model has random weights: this shows token counts, FLOPs and latency, not accuracy.")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        keep = ("method", "encoder_tokens", "stage1_tokens", "fusion_tokens", "layer_avg_tokens", "gflops", "latency_ms")
        (out / "demo.json").write_text(json.dumps({"model": args.model, "rows": [{k: r[k] for k in keep} for r in rows]}, indent=2))
        print(f"written {out / 'demo.json'}")
    return 0


def cmd_presets(args) -> int:
    import meteor_vlm as mv

    for name in mv.Meteor.presets():
        print(f"{name:18s} {mv.Meteor.PRESETS[name]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meteor", description="Visual-token pruning for vision-language models.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="token counts, FLOPs and latency of METEOR's presets against the unpruned model")
    d.add_argument("--model", default="tiny", help="'tiny' (random tiny model) or a local model directory")
    d.add_argument("--samples", type=int, default=6, help="synthetic samples in the batch")
    d.add_argument("--repeats", type=int, default=5, help="timed rounds (methods interleaved)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", help="folder for demo.json")
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("calibrate", help="feature-rank table for METEOR's stage-1 allocation")
    c.add_argument("--model", default="tiny", help="'tiny' or a local model directory")
    c.add_argument("--images", help="folder of sample images (default: synthetic images)")
    c.add_argument("--synthetic", type=int, default=32, help="synthetic images when --images is not given")
    c.add_argument("--limit", type=int, default=None, help="use at most this many images from --images")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--rtol", type=float, default=1e-2, help="relative singular-value threshold for the rank")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default="rank_table.json")
    c.add_argument("--write-config", action="store_true", help="also store the table in the model's config.json")
    c.set_defaults(fn=cmd_calibrate)

    s = sub.add_parser("presets", help="list METEOR's presets")
    s.set_defaults(fn=cmd_presets)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        return args.fn(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
