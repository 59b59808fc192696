"""The `meteor` command, called in-process."""

import json

import pytest

from meteor_vlm import has_default
from meteor_vlm.cli import main


def test_calibrate_writes_a_rank_table(tmp_path, capsys):
    out = tmp_path / "ranks.json"
    assert main(["calibrate", "--synthetic", "4", "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert set(table["experts"]) == {"clip", "pix2struct", "convnext"} and table["images"] == 4


def test_calibrate_on_a_missing_folder_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match="image folder not found"):
        main(["calibrate", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "r.json")])


@pytest.mark.parametrize("command", ["bench", "speed"])
@pytest.mark.parametrize("config", [None, {"model_type": "bert"}], ids=["no-config", "unknown-type"])
def test_a_folder_that_is_no_model_fails_clearly(tmp_path, capsys, command, config):
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    assert main([command, "--model", str(tmp_path), "--samples", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is not a model folder" in err and "Traceback" not in err
    assert ("no config.json" if config is None else "'bert'") in err


@pytest.mark.parametrize("command", ["demo", "bench", "speed", "train"])
def test_out_on_a_file_is_refused_before_any_work(tmp_path, capsys, command):
    taken = tmp_path / "results.png"
    taken.write_text("not a folder")
    with pytest.raises(SystemExit) as stop:
        main([command, "--out", str(taken)])
    assert stop.value.code == 2 and f"{taken} is a file, not a folder" in capsys.readouterr().err


def test_demo_prints_the_table_and_writes_json(tmp_path, capsys):
    assert main(["demo", "--model", "tiny", "--samples", "2", "--repeats", "1", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "meteor:paper-242" in text and "unpruned" in text
    rows = json.loads((tmp_path / "demo.json").read_text())["rows"]
    base, pruned = rows[0], next(r for r in rows if r["method"] == "meteor:paper-242")
    assert pruned["layer_avg_tokens"] < base["layer_avg_tokens"] and pruned["gflops"] < base["gflops"]


def test_probe_checkpoint_prints_one_row_per_family_for_words_and_glyphs(tmp_path, capsys):
    import meteor_vlm as mv
    from meteor_vlm import synth
    from meteor_vlm import train as tr

    tok = tr.build_tokenizer()
    cfg = mv.testing.tiny_config(tokenizer=tok, num_layers=2)
    mv.MultiEncoderVLM(cfg).save_pretrained(tmp_path)
    mv.MultiEncoderProcessor(tok, cfg.expert_specs, tr.PROMPT_TEMPLATE).save_pretrained(tmp_path)
    assert main(["probe", "--checkpoint", str(tmp_path), "--samples", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    n = len(synth.FAMILIES) + 2
    assert len(lines) == 2 * n and "words" in lines[0] and "glyphs" in lines[n]
    for table in (lines[2:n], lines[n + 2 :]):
        assert [ln.split()[0] for ln in table] == list(synth.FAMILIES)


@pytest.mark.skipif(not has_default(), reason="this install has no embedded model")
def test_demo_on_the_embedded_model_runs_every_demo_method(tmp_path, capsys):
    from meteor_vlm.bench.accuracy import DEMO_METHODS

    assert main(["demo", "--samples-per-family", "1", "--out", str(tmp_path)]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert list(rows) == list(DEMO_METHODS)
    assert rows["unpruned"]["tokens_share"] == 1.0
    for name in ("meteor:paper-312", "meteor:paper-242", "meteor:paper-126"):
        assert rows[name]["tokens"] < rows["unpruned"]["tokens"] and rows[name]["tflops"] < rows["unpruned"]["tflops"]
    # each ablation variant is compared with the one the paper ranks above it, and the comparison is printed
    assert {n: r["ablation"]["against"] for n, r in rows.items() if "ablation" in r} == {
        "alloc:average": "alloc:rank", "alloc:rank-reverse": "alloc:average", "fusion:separate": "fusion:cooperative",
        "fusion:random": "fusion:separate", "stage3:fixed": "stage3:adaptive"}
    out = capsys.readouterr().out
    assert "meteor:paper-126" in out and "fusion:random vs fusion:separate: " in out


def test_train_passes_every_option_into_the_config(tmp_path, monkeypatch):
    from meteor_vlm import train as tr

    seen = {}
    monkeypatch.setattr(tr, "train", lambda cfg, resume: seen.update(cfg=cfg, resume=resume) or tmp_path)
    argv = ["train", "--out", str(tmp_path), "--seed", "3", "--vision-steps", "0", "--word-steps", "7", "--steps", "5",
            "--vision-lr", "1e-4", "--word-lr", "2e-4", "--lr", "3e-4", "--batch-size", "4", "--eval-every", "9",
            "--llm-mix", "docs=2", "--full-background-steps", "6", "--background", "0-1.25", "--cnn", "efficientnet_lite", "--projector-norm", "none", "--mixed-batches", "--centre-token", "--rope-theta", "5e5", "--extra-questions", "11", "--no-describe",
            "--llm-width", "192", "--llm-layers", "10", "--lookup-hint", "0.25", "--lookup-layers", "2,6", "--word-experts", "cnn, hires", "--no-resume"]
    assert main(argv) == 0
    cfg = seen["cfg"]
    assert (cfg.seed, cfg.vision_steps, cfg.word_steps, cfg.steps) == (3, 0, 7, 5)
    assert (cfg.vision_lr, cfg.word_lr, cfg.lr, cfg.batch_size, cfg.eval_every) == (1e-4, 2e-4, 3e-4, 4, 9)
    assert cfg.llm_mix == {"docs": 2} and cfg.full_background_steps == 6 and cfg.cnn == "efficientnet_lite" and cfg.projector_norm is None
    assert cfg.one_family_batches is False and cfg.background == (0.0, 1.25) and cfg.centre_token is True
    assert cfg.rope_theta == 5e5 and cfg.extra_questions == 11 and cfg.describe is False
    assert (cfg.llm_width, cfg.llm_layers) == (192, 10) and (cfg.lookup_hint, cfg.lookup_layers) == (0.25, (2, 6))
    assert cfg.word_experts == ("cnn", "hires") and seen["resume"] is False
    assert main(argv[:-1] + ["--word-lr", "5e-4"]) == 0 and seen["cfg"].word_lr == 5e-4 and seen["resume"] is True
    assert main([a for a in argv[:-1] if a != "--mixed-batches"]) == 0 and seen["cfg"].one_family_batches is True
    assert main([a for a in argv[:-1] if a != "--centre-token"]) == 0 and seen["cfg"].centre_token is False
    assert main(argv[:-1] + ["--background", "0.3"]) == 0 and seen["cfg"].background == 0.3
    assert main([a for a in argv[:-1] if a not in ("--rope-theta", "5e5")]) == 0 and seen["cfg"].rope_theta == 10000.0
    assert main([a for a in argv[:-1] if a not in ("--extra-questions", "11", "--no-describe")]) == 0
    assert seen["cfg"].extra_questions == 4 and seen["cfg"].describe is True
    assert main([a for a in argv[:-1] if a not in ("--llm-width", "192", "--llm-layers", "10")]) == 0
    assert (seen["cfg"].llm_width, seen["cfg"].llm_layers) == (128, 8)
    assert main([a for a in argv[:-1] if a not in ("--lookup-hint", "0.25", "--lookup-layers", "2,6")]) == 0
    assert (seen["cfg"].lookup_hint, seen["cfg"].lookup_layers) == (0.0, (3, 5))
    assert main([a for a in argv[:-1] if a not in ("--word-experts", "cnn, hires")]) == 0 and seen["cfg"].word_experts is None
    with pytest.raises(SystemExit):
        main(argv[:-1] + ["--word-experts", " , "])
    for bad in ("", "2,x"):
        with pytest.raises(SystemExit):
            main(argv[:-1] + ["--lookup-layers", bad])
    for bad in ("1-0", "-1", "a-b", "0.5-"):
        with pytest.raises(SystemExit):
            main(argv[:-1] + ["--background", bad])


@pytest.mark.skipif(not has_default(), reason="this install has no embedded model")
def test_probe_llm_prints_accuracy_fed_perfect_and_own_tokens_at_three_background_shares(capsys, monkeypatch):
    """`meteor probe --checkpoint --llm` on the embedded model: one row per (tokens, background share), each family's
    accuracy and their average, as `train.llm_report` gives them; its row of the model's own tokens with every
    background token is the model's plain held-out accuracy (no feed attached), and its perfect rows never run an
    expert (an expert broken leaves the LLM's logits on them as they were, not on its own tokens)."""
    import torch

    import meteor_vlm as mv
    from meteor_vlm import synth
    from meteor_vlm import train as tr
    from meteor_vlm.default import DEFAULT_DIR

    report, reported = tr.llm_report, []  # the rows the command computed, kept to check what it prints

    def keep(*args, **kwargs):
        reported.append(report(*args, **kwargs))
        return reported[-1]
    monkeypatch.setattr(tr, "llm_report", keep)
    assert main(["probe", "--checkpoint", str(DEFAULT_DIR), "--samples", "2", "--llm"]) == 0
    monkeypatch.undo()
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["tokens", "background", *synth.FAMILIES, "average"]
    assert [ln.split()[:2] for ln in lines[2:]] == [[t, b] for t in ("perfect", "own") for b in ("all", "0.1", "none")]
    model, processor = mv.load_default()
    rows = reported[0]
    for line, row in zip(lines[2:], rows):
        assert [float(x) for x in line.split()[2:]] == [round(row["accuracy"][n], 2) for n in [*synth.FAMILIES, "average"]]
    assert rows[3]["accuracy"] == tr.evaluate(model, processor, per_family=2) and rows[3]["accuracy"]["average"] > 0
    seen = []  # what each evaluation ran under: pixels or not, and the background share the LLM saw

    def spy(model, processor, *args, pixels=True, **kwargs):
        thin = model._pruning_method
        seen.append((pixels, 1.0 if thin is None else thin.share) + ((thin.experts,) if thin is not None and thin.experts else ()))
        return {n: 0.0 for n in [*synth.FAMILIES, "average"]}
    monkeypatch.setattr(tr, "evaluate", spy)
    tr.llm_report(model, processor, per_family=1)
    assert seen == [(pixels, share) for pixels in (False, True) for share in (1.0, 0.1, 0.0)]
    seen.clear()  # --experts: every row sees the named expert's tokens only
    cnn = (model.expert_names.index("cnn"),)
    tr.llm_report(model, processor, per_family=1, experts=("cnn",))
    assert seen == [(pixels, share, cnn) for pixels in (False, True) for share in (1.0, 0.1, 0.0)]
    seen.clear()
    assert main(["probe", "--checkpoint", str(DEFAULT_DIR), "--samples", "1", "--llm", "--experts", "cnn"]) == 0
    assert len(seen) == 6 and all(s[2:] == (cnn,) for s in seen) and "only the tokens of cnn" in capsys.readouterr().out
    monkeypatch.undo()
    sample = synth.make_split(tr.EVAL_SEED, 1)[:1]
    for source in tr.LLM_FEEDS:
        with tr.token_feed(model, processor.tokenizer, source=source) as feed, torch.no_grad():
            feed[:] = sample
            inputs = tr.encode_samples(processor, sample, with_answers=False, pixels=source == "experts")
            before = model(**inputs).logits
            saved = [p.clone() for p in model.experts[0].parameters()]
            for p in model.experts[0].parameters():
                p.mul_(0)
            assert torch.equal(model(**inputs).logits, before) == (source == "words")
            for p, v in zip(model.experts[0].parameters(), saved):
                p.copy_(v)
    assert main(["probe", "--llm", "--samples", "1"]) == 2
    assert "--llm needs --checkpoint" in capsys.readouterr().err
    assert main(["probe", "--lookups", "--samples", "1"]) == 2
    assert "--lookups needs --checkpoint" in capsys.readouterr().err
    assert main(["probe", "--checkpoint", str(DEFAULT_DIR), "--llm", "--lookups"]) == 2
    assert "one at a time" in capsys.readouterr().err
    assert main(["probe", "--checkpoint", str(DEFAULT_DIR), "--experts", "cnn"]) == 2
    assert "--experts goes with --llm" in capsys.readouterr().err


def test_probe_lookups_prints_the_report(capsys, monkeypatch):
    """meteor probe --checkpoint PATH --lookups prints lookup_report's rows: a family, its even share, then
    per layer the best head and its share, as computed."""
    from meteor_vlm import synth
    from meteor_vlm import train as tr
    from meteor_vlm.default import DEFAULT_DIR

    reported = []
    report = tr.lookup_report
    monkeypatch.setattr(tr, "lookup_report", lambda *a, **k: reported.append(report(*a, **k)) or reported[-1])
    assert main(["probe", "--checkpoint", str(DEFAULT_DIR), "--samples", "2", "--lookups"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [ln.split()[0] for ln in lines] == [f for f in synth.FAMILIES if f != "ocr"]
    for line, (fam, row) in zip(lines, reported[0].items()):
        want = [fam, "even", f"{row['uniform']:.2f}"] + [x for layer, head, share in row["layers"]
                                                          for x in (f"L{layer}", f"h{head}", f"{share:.2f}")]
        assert line.split() == want
    assert [layer for layer, _, _ in reported[0]["docs"]["layers"]] == list(range(1, 8))


def test_embedded_models_are_named_and_an_unknown_name_is_refused(monkeypatch):
    """`--model` takes each embedded model by its name ('default', which is 'cnn-words', and 'all-words'), loading
    that folder and not the other; a name that is not one of them is refused with the names listed."""
    import meteor_vlm as mv
    from meteor_vlm import cli

    loaded = []
    monkeypatch.setattr(mv, "load_default", lambda name="default": loaded.append(name) or ("model", "processor"))
    assert all(cli._load(n) == ("model", "processor") for n in ("cnn-words", "default", "all-words"))
    assert loaded == ["cnn-words", "default", "all-words"]
    monkeypatch.undo()
    assert mv.default.EMBEDDED["cnn-words"] == mv.default.EMBEDDED["default"] != mv.default.EMBEDDED["all-words"]
    for call in (mv.load_default, mv.has_default):
        with pytest.raises(ValueError, match="default, cnn-words, all-words"):
            call("cnn_words")
