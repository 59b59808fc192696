"""Training the embedded default model from scratch on the synthetic benchmark (`meteor train`).

Data is generated on the fly from (seed, step), so a run is reproducible and can resume from any
checkpoint without storing a dataset. Evaluation uses a split from a seed never used in training.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import synth
from .synth import EVAL_SEED
from .models.experts import ExpertSpec
from .models.processor import MultiEncoderProcessor, build_word_tokenizer
from .models.vlm import MultiEncoderVLM, MultiEncoderVLMConfig

__all__ = ["TrainConfig", "default_model_config", "build_tokenizer", "train", "evaluate", "EVAL_SEED"]

PROMPT_WORDS = ("answer", ":", "describe")


def build_tokenizer():
    """Word-level tokenizer over the synthetic benchmark's vocabulary (plus the prompt's words)."""
    return build_word_tokenizer(list(synth.vocabulary()) + list(PROMPT_WORDS))


def default_model_config(tokenizer, image_size: int = 336) -> MultiEncoderVLMConfig:
    """The embedded model's architecture: three experts of different kinds and resolutions + an 8-layer Llama.

    - ``lowres``: CLIP-style ViT with CLS at image_size/3 (patch 14): 64 patches;
    - ``hires``: Pix2Struct patch ViT at full resolution (patch 16): 441 patches, reads small text;
    - ``cnn``: ConvNeXt at image_size*2/3 (stride 16): 196 tokens.
    701 visual tokens per image before pruning.
    """
    low, cnn = image_size // 3, image_size * 2 // 3
    experts = [
        ExpertSpec("lowres", "clip", low, dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                                               num_attention_heads=4, image_size=low, patch_size=14)),
        ExpertSpec("hires", "pix2struct", image_size, dict(hidden_size=96, d_kv=24, d_ff=192, num_hidden_layers=3,
                                                           num_attention_heads=4, patch_embed_hidden_size=3 * 16 * 16,
                                                           seq_len=image_size // 16 + 2), patch_size=16),
        ExpertSpec("cnn", "convnext", cnn, dict(num_channels=3, hidden_sizes=[32, 64, 96], depths=[1, 1, 2], num_stages=3)),
    ]
    text = dict(
        model_type="llama", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=320, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, rope_theta=10000.0,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return MultiEncoderVLMConfig(
        experts=experts, text_config=text, fusion="post", image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_norm="batch",
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


PROMPT_TEMPLATE = "{prompt} answer :"


@dataclass
class TrainConfig:
    """Settings of `meteor train` (all saved with the checkpoint)."""

    out: str = "runs/default"
    seed: int = 1
    steps: int = 1600
    batch_size: int = 16
    lr: float = 1.5e-3
    min_lr: float = 5e-5
    warmup: int = 100
    weight_decay: float = 0.05
    image_size: int = 336
    bf16: bool = True
    eval_every: int = 400
    eval_per_family: int = 50
    save_every: int = 250
    max_minutes: float | None = None
    describe: bool = True


def make_batch(processor, cfg: TrainConfig, step: int, with_answers: bool = True, seed: int | None = None):
    """Batch `step` of the training stream: families in turn, samples drawn from (seed, family, index)."""
    seed = cfg.seed if seed is None else seed
    samples = []
    for i in range(cfg.batch_size):
        k = step * cfg.batch_size + i
        fam = synth.FAMILIES[k % len(synth.FAMILIES)]
        samples.append(synth.make_sample(fam, k // len(synth.FAMILIES), seed, cfg.image_size))
    return samples, encode_samples(processor, samples, with_answers, describe=cfg.describe)


def describe_sample(sample) -> str:
    """Everything the image shows, as words: a dense training target read from the sample's ground truth."""
    meta = sample.meta
    if "objects" in meta:  # scenes, pope, counting: objects left to right
        return " ".join(f"{o['color']} {o['shape']}" for o in sorted(meta["objects"], key=lambda o: o["x"]))
    if "word" in meta:
        return meta["word"]
    if "lines" in meta:
        return " ".join(f"{line['key']} {line['value']}" for line in meta["lines"])
    if "bars" in meta:
        return " ".join(f"{b['label']} {b['value']}" for b in meta["bars"])
    return sample.answer


def encode_samples(processor, samples, with_answers: bool, describe: bool = False):
    """Processor inputs for samples; with answers, `labels` mark everything after the prompt.

    With `describe`, the sequence goes on after the answer's </s> with "describe : <contents> </s>":
    causal attention keeps the question and answer exactly as at test time, while the description
    supervises many more tokens per image at no extra visual cost.
    """
    eos = processor.tokenizer.eos_token
    prompts = [processor.format_prompt(s.question) for s in samples]
    if with_answers:
        suffixes = [f" {s.answer} {eos}" + (f" describe : {describe_sample(s)} {eos}" if describe else "") for s in samples]
    else:
        suffixes = ["" for _ in samples]
    inputs = processor(images=[s.image for s in samples], text=[p + x for p, x in zip(prompts, suffixes)],
                       return_tensors="pt", padding=True)
    if with_answers:
        labels = torch.full_like(inputs["input_ids"], -100)
        T = labels.shape[1]
        for b, x in enumerate(suffixes):  # left padding: the suffix is the last n columns
            n = len(processor.tokenizer(x.strip(), add_special_tokens=False)["input_ids"])
            labels[b, T - n :] = inputs["input_ids"][b, T - n :]
        inputs["labels"] = labels
    return inputs


@torch.no_grad()
def answer_ids(model, inputs) -> torch.Tensor:
    """Greedy first answer token per sample (answers are one token), from a single prefill."""
    return model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].argmax(-1)


@torch.no_grad()
def evaluate(model, processor, per_family: int = 50, seed: int = EVAL_SEED, image_size: int = 336,
             batch_size: int = 16, method=None, progress: bool = False) -> dict:
    """Exact-match accuracy per family and on average, on a held-out split."""
    samples = synth.make_split(seed, per_family, image_size=image_size)
    correct = {f: 0 for f in synth.FAMILIES}
    total = {f: 0 for f in synth.FAMILIES}
    model.eval()
    for start in tqdm(range(0, len(samples), batch_size), desc="eval", disable=not progress):
        batch = samples[start : start + batch_size]
        inputs = encode_samples(processor, batch, with_answers=False)
        if method is not None:
            with method(model):
                pred = answer_ids(model, inputs)
        else:
            pred = answer_ids(model, inputs)
        words = processor.tokenizer.convert_ids_to_tokens(pred.tolist())
        for s, w in zip(batch, words):
            total[s.family] += 1
            correct[s.family] += int(synth.is_correct(w, s.answer))
    acc = {f: correct[f] / total[f] for f in synth.FAMILIES if total[f]}
    acc["average"] = sum(acc.values()) / len(acc)
    return acc


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def train(cfg: TrainConfig, resume: bool = True) -> Path:
    """Train (or resume) the embedded model; returns the folder of the final checkpoint."""
    out = Path(cfg.out)
    ckpt = out / "checkpoint"
    log_path = out / "log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    torch.manual_seed(cfg.seed)
    if resume and (ckpt / "trainer.pt").is_file():
        model = MultiEncoderVLM.from_pretrained(ckpt)
        processor = MultiEncoderProcessor.from_pretrained(ckpt)
        state = torch.load(ckpt / "trainer.pt", weights_only=False)
        start = state["step"]
    else:
        model = MultiEncoderVLM(default_model_config(tokenizer, cfg.image_size))
        processor = MultiEncoderProcessor(tokenizer, model.config.expert_specs, PROMPT_TEMPLATE)
        state, start = None, 0
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    t0 = time.time()
    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train")
    step = start
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        _, inputs = make_batch(processor, cfg, step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = model(**inputs, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        record = {"step": step + 1, "loss": loss.item(), "lr": _lr(cfg, step), "minutes": (time.time() - t0) / 60}
        done = step + 1 == cfg.steps or (cfg.max_minutes is not None and record["minutes"] >= cfg.max_minutes)
        if (step + 1) % cfg.eval_every == 0 or done:
            record["eval"] = evaluate(model, processor, cfg.eval_per_family, image_size=cfg.image_size)
            model.train()
            tqdm.write(json.dumps(record))
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if (step + 1) % cfg.save_every == 0 or done:
            _save(model, processor, opt, step + 1, ckpt)
        if done:
            break
    return ckpt


def _save(model, processor, opt, step: int, ckpt: Path) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    torch.save({"step": step, "optimizer": opt.state_dict()}, ckpt / "trainer.pt")


def export(ckpt, dest=None, seed: int = 1, calibration_images: int = 60) -> Path:
    """Calibrate the trained model's rank table and write a clean copy (no optimizer state).

    dest None = the package's embedded default folder.
    """
    from .calibration import calibrate
    from .default import DEFAULT_DIR

    dest = Path(dest) if dest is not None else DEFAULT_DIR
    model = MultiEncoderVLM.from_pretrained(ckpt).eval()
    processor = MultiEncoderProcessor.from_pretrained(ckpt)
    per = -(-calibration_images // len(synth.FAMILIES))
    # calibration images come from the training stream's seed, never from the held-out split
    images = [s.image for s in synth.make_split(seed, per, image_size=max(e.image_size for e in processor.experts))]
    model.config.rank_table = calibrate(model, processor, images[:calibration_images])
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return dest


def memorization_probe(family: str = "ocr", samples: int = 12, steps: int = 100, lr: float = 1.5e-3,
                       seed: int = 7, report_every: int = 25, config=None) -> list[dict]:
    """Can the recipe fit a few fixed images? The quickest check that the vision path learns at all.

    Trains a fresh model on `samples` fixed images of one family (one question type, different answers)
    and reports the loss and the gradient norm reaching the experts, projectors and LLM. A loss stuck at
    ln(number of distinct answers) / 2 means the model answers from the prior and ignores the image.
    """
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    cfg = config or default_model_config(tokenizer)
    model = MultiEncoderVLM(cfg).train()
    processor = MultiEncoderProcessor(tokenizer, cfg.expert_specs, PROMPT_TEMPLATE)
    size = max(128, max(e.image_size for e in processor.experts))
    fixed = [synth.make_sample(family, i, seed, size) for i in range(samples)]
    inputs = encode_samples(processor, fixed, with_answers=True, describe=False)
    opt = torch.optim.AdamW(model.parameters(), lr)
    parts = {"experts": model.experts, "projectors": model.projectors, "llm": model.language_model}
    out = []
    for step in tqdm(range(steps), desc="probe"):
        loss = model(**inputs, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if (step + 1) % report_every == 0 or step + 1 == steps:
            grads = {k: float(sum(p.grad.norm() ** 2 for p in m.parameters() if p.grad is not None) ** 0.5)
                     for k, m in parts.items()}
            out.append({"step": step + 1, "loss": loss.item(), "grad_norm": grads})
        opt.step()
    out.append({"chance_loss": math.log(len({s.answer for s in fixed})) / 2})
    return out
