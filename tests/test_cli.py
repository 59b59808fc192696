"""The `meteor` command, called in-process."""

import json

import pytest

from meteor_vlm.cli import main


def test_calibrate_writes_a_rank_table(tmp_path, capsys):
    out = tmp_path / "ranks.json"
    assert main(["calibrate", "--synthetic", "4", "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert set(table["experts"]) == {"clip", "pix2struct", "convnext"} and table["images"] == 4


def test_calibrate_on_a_missing_folder_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match="image folder not found"):
        main(["calibrate", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "r.json")])


def test_demo_prints_the_table_and_writes_json(tmp_path, capsys):
    assert main(["demo", "--samples", "2", "--repeats", "1", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "meteor:paper-242" in text and "unpruned" in text
    rows = json.loads((tmp_path / "demo.json").read_text())["rows"]
    base, pruned = rows[0], next(r for r in rows if r["method"] == "meteor:paper-242")
    assert pruned["layer_avg_tokens"] < base["layer_avg_tokens"] and pruned["gflops"] < base["gflops"]
