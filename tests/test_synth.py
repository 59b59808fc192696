"""Tests for meteor_vlm.synth: determinism, vocabulary, ground truth against pixels, balance, errors."""

from __future__ import annotations

import collections
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from meteor_vlm import synth
from meteor_vlm.synth._draw import COLORS

SEED = 1234


def _digest(sample: synth.Sample) -> str:
    """Stable fingerprint of a sample's pixels and QA."""
    h = hashlib.sha256(sample.image.tobytes())
    h.update(f"{sample.question}|{sample.answer}".encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def split() -> list[synth.Sample]:
    return synth.make_split(SEED, per_family=40)


def _by_family(samples, family):
    return [s for s in samples if s.family == family]


def _mask(image) -> np.ndarray:
    """Pixels of drawn objects: backgrounds are pale (all channels > 200), object colours are not."""
    return np.asarray(image).min(axis=2) < 150


def _components(mask: np.ndarray, min_pixels: int = 20) -> int:
    """Number of 4-connected components of ``mask`` with at least ``min_pixels`` pixels."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    count = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        count += size >= min_pixels
    return count


def _center_rgb(sample, obj) -> tuple[int, int, int]:
    size = sample.image.size[0]
    return sample.image.getpixel((int(obj["x"] * size), int(obj["y"] * size)))


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("family", synth.FAMILIES)
def test_same_inputs_give_identical_samples(family):
    a = synth.make_sample(family, 7, SEED)
    b = synth.make_sample(family, 7, SEED)
    assert a.image.mode == "RGB" and a.image.size == (336, 336)
    assert a.image.tobytes() == b.image.tobytes()
    assert (a.question, a.answer, a.family, a.index) == (b.question, b.answer, family, 7)
    assert a.meta == b.meta


@pytest.mark.parametrize("family", synth.FAMILIES)
def test_different_seed_or_index_gives_different_samples(family):
    base = [_digest(synth.make_sample(family, i, SEED)) for i in range(5)]
    other_seed = [_digest(synth.make_sample(family, i, SEED + 1)) for i in range(5)]
    assert len(set(base)) == 5
    assert all(x != y for x, y in zip(base, other_seed))


def test_samples_are_stable_across_processes():
    code = (
        "from meteor_vlm import synth; import hashlib;"
        "print(hashlib.sha256(b''.join(synth.make_sample(f, 3, 99, 96).image.tobytes()"
        " + synth.make_sample(f, 3, 99, 96).question.encode() for f in synth.FAMILIES)).hexdigest())"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = hashlib.sha256(
        b"".join(
            synth.make_sample(f, 3, 99, 96).image.tobytes() + synth.make_sample(f, 3, 99, 96).question.encode()
            for f in synth.FAMILIES
        )
    ).hexdigest()
    assert out.stdout.strip() == here


@pytest.mark.parametrize("family", synth.FAMILIES)
def test_same_sample_at_another_size_is_the_same_scene(family):
    small = synth.make_sample(family, 5, SEED, image_size=168)
    large = synth.make_sample(family, 5, SEED, image_size=336)
    assert small.image.size == (168, 168)
    assert (small.question, small.answer) == (large.question, large.answer)
    if "objects" in large.meta:
        assert small.meta["objects"] == large.meta["objects"]


def test_split_is_interleaved_with_per_family_indices():
    samples = synth.make_split(3, per_family=2, families=("ocr", "pope"), image_size=64)
    assert [(s.family, s.index) for s in samples] == [("ocr", 0), ("pope", 0), ("ocr", 1), ("pope", 1)]
    assert samples[3].image.tobytes() == synth.make_sample("pope", 1, 3, 64).image.tobytes()
    assert all(s.image.size == (64, 64) for s in samples)


# --------------------------------------------------------------------------- vocabulary and answers


def test_vocabulary_is_small_sorted_and_covers_the_split(split):
    vocab = synth.vocabulary()
    assert vocab == sorted(set(vocab))
    assert "?" in vocab and "yes" in vocab and "no" in vocab
    assert all(tok == tok.lower() and tok.strip() == tok and tok for tok in vocab)
    assert len(vocab) <= 400
    vocab_set = set(vocab)
    for s in split:
        assert s.question.endswith(" ?") and s.question == s.question.lower()
        assert s.question.split() == synth.tokenize(s.question)
        assert set(s.question.split()) <= vocab_set, s.question
        assert s.answer in vocab_set and s.answer.split() == [s.answer]


def test_normalize_and_is_correct():
    assert synth.normalize_answer("  Yes.  ") == "yes"
    assert synth.normalize_answer("RED!?") == "red"
    assert synth.is_correct("Circle.", "circle")
    assert synth.is_correct(" 7 ", "7")
    assert not synth.is_correct("circles", "circle")
    assert not synth.is_correct("", "no")


def test_answers_are_balanced_within_each_family():
    samples = synth.make_split(SEED + 7, per_family=120, image_size=64)
    for family in synth.FAMILIES:
        answers = collections.Counter(s.answer for s in _by_family(samples, family))
        top, n = answers.most_common(1)[0]
        if family == "pope":
            assert answers == {"yes": 60, "no": 60}
        else:
            assert n / 120 <= 0.3, (family, top, n)


# --------------------------------------------------------------------------- ground truth per family


def test_scenes_answers_follow_the_drawn_objects(split):
    kinds = set()
    for s in _by_family(split, "scenes"):
        objects = s.meta["objects"]
        assert 2 <= len(objects) <= 5
        assert len({o["shape"] for o in objects}) == len(objects)
        for o in objects:
            assert _center_rgb(s, o) == COLORS[o["color"]]
        by_ref = {f"{o['color']} {o['shape']}": o for o in objects}
        words = s.question.split()
        kind = s.meta["question_type"]
        kinds.add(kind)
        if kind == "color":
            (obj,) = [o for o in objects if o["shape"] == words[4]]
            assert s.answer == obj["color"]
        elif kind == "relation":
            a, b = by_ref[" ".join(words[2:4])], by_ref[" ".join(words[7:9])]
            left = a["x"] < b["x"]
            assert s.answer == ("yes" if left == (words[4] == "left") else "no")
        else:
            ref = by_ref[" ".join(words[6:8])]
            side = [o for o in objects if (o["x"] < ref["x"]) == (words[3] == "left") and o is not ref]
            assert len(side) == 1 and s.answer == side[0]["shape"]
    assert kinds == {"color", "relation", "neighbor"}


def test_question_kind_names_what_each_question_asks(split):
    """Read from the question's own words, not from the meta the kind is taken from."""
    expected = {"scenes": {"color", "relation", "neighbor"}, "pope": {"present", "adversarial", "random"},
                "counting": {"counting"}, "ocr": {"ocr"}, "docs": {"docs"}, "charts": {"value", "tallest", "compare"}}
    seen = {f: set() for f in synth.FAMILIES}
    for s in split:
        kind = synth.question_kind(s)
        seen[s.family].add(kind)
        words = s.question.split()
        if s.family == "scenes":  # "what color is the X", "is the A B left of ...", "what shape is left of ..."
            assert kind == {"color": "color", "shape": "neighbor"}.get(words[1], "relation")
        if s.family == "pope":
            assert (kind == "present") == (s.answer == "yes")
        if s.family == "charts":
            assert (kind == "compare") == (s.answer in ("yes", "no"))
            assert (kind == "value") == s.answer.isdigit()
    assert seen == expected


def test_pope_is_balanced_and_has_adversarial_negatives(split):
    pope = _by_family(split, "pope")
    assert len(pope) == 40
    assert [s.answer for s in pope] == ["yes", "no"] * 20
    adversarial = 0
    for s in pope:
        present = {(o["color"], o["shape"]) for o in s.meta["objects"]}
        query = (s.meta["query"]["color"], s.meta["query"]["shape"])
        assert s.question.split()[3:5] == list(query)
        assert (query in present) == (s.answer == "yes")
        if s.meta["negative"] == "adversarial":
            adversarial += 1
            assert any(c == query[0] or sh == query[1] for c, sh in present)
        elif s.meta["negative"] == "random":
            assert all(c != query[0] and sh != query[1] for c, sh in present)
        for o in s.meta["objects"]:
            assert _center_rgb(s, o) == COLORS[o["color"]]
    assert adversarial == 10


def test_counting_answer_matches_the_drawn_shapes(split):
    counting = _by_family(split, "counting")
    for s in counting:
        objects = s.meta["objects"]
        target = s.meta["target"]
        assert s.question == f"how many {target}s are there ?"
        assert int(s.answer) == sum(o["shape"] == target for o in objects)
        assert 0 <= int(s.answer) <= 9
    assert len({s.answer for s in counting}) >= 8
    # Pixel check on a few images: one blob per object, each centre painted in its colour.
    for s in counting[:4]:
        assert _components(_mask(s.image)) == len(s.meta["objects"])
        for o in s.meta["objects"]:
            assert _center_rgb(s, o) == COLORS[o["color"]]


def test_chart_bars_measured_in_pixels_match_values(split):
    charts = _by_family(split, "charts")
    assert {s.meta["question_type"] for s in charts} == {"value", "tallest", "compare"}
    for s in charts:
        pixels = np.asarray(s.image)
        bars = s.meta["bars"]
        assert 3 <= len(bars) <= 6
        heights = []
        for bar in bars:
            column = pixels[: bar["base"], (bar["x0"] + bar["x1"]) // 2]
            heights.append(int((column == COLORS[bar["color"]]).all(axis=1).sum()))
        values = [b["value"] for b in bars]
        unit = (bars[0]["base"] - bars[0]["top"]) / values[0]
        for h, v in zip(heights, values):
            assert abs(h - v * unit) <= 3, (heights, values)
        # Bar order by measured height agrees with the value order.
        for i in range(len(bars)):
            for j in range(len(bars)):
                if values[i] > values[j]:
                    assert heights[i] > heights[j]
        labels = [b["label"] for b in bars]
        words = s.question.split()
        if s.meta["question_type"] == "value":
            assert s.answer == str(values[labels.index(words[5])])
        elif s.meta["question_type"] == "tallest":
            assert s.answer == labels[int(np.argmax(heights))]
        else:
            a, b = heights[labels.index(words[1])], heights[labels.index(words[4])]
            assert s.answer == ("yes" if a > b else "no")


@pytest.mark.parametrize("size", [336, 672])
def test_ocr_word_is_small_and_drawn(size):
    for i in range(10):
        s = synth.make_sample("ocr", i, SEED, image_size=size)
        x0, y0, x1, y1 = s.meta["text_box"]
        assert s.answer == s.meta["word"] and s.question == "what word is written in the image ?"
        # Small text: at 1/3 resolution the glyphs are about 5 px tall, too small to read.
        assert size / 60 < y1 - y0 < size / 22
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        ink = np.asarray(s.image.crop((x0, y0, x1, y1))).min(axis=2) < 110
        assert ink.mean() > 0.1


def test_docs_answer_is_the_value_of_the_asked_key(split):
    for s in _by_family(split, "docs"):
        lines = s.meta["lines"]
        assert 4 <= len(lines) <= 8
        key = s.question.split()[3]
        (line,) = [ln for ln in lines if ln["key"] == key]
        assert s.answer == line["value"]
        boxes = sorted(ln["box"] for ln in lines)
        for x0, y0, x1, y1 in boxes:
            assert y1 - y0 < 336 / 22 and 0 <= x0 and x1 <= 336 and 0 <= y0 and y1 <= 336
        tops = sorted((ln["box"][1], ln["box"][3]) for ln in lines)
        assert all(prev[1] < nxt[0] for prev, nxt in zip(tops, tops[1:]))


def test_docs_key_and_value_boxes_hold_their_ink(split):
    """Pixel oracle: each line's key box and value box lie in its text box (to rounding), key left of value, both
    inked; every inked column of the line outside them is the colon's (narrower than one character)."""
    for s in _by_family(split, "docs"):
        img = np.asarray(s.image).min(axis=2)
        for ln in s.meta["lines"]:
            x0, y0, x1, y1 = ln["box"]
            (kx0, ky0, kx1, ky1), (vx0, vy0, vx1, vy1) = ln["key_box"], ln["value_box"]
            assert x0 - 3 <= kx0 < kx1 < vx0 < vx1 <= x1 + 3  # glyph boxes round outwards
            assert y0 - 3 <= min(ky0, vy0) and max(ky1, vy1) <= y1 + 3
            for bx0, by0, bx1, by1 in (ln["key_box"], ln["value_box"]):
                assert (img[by0:by1, bx0:bx1] < 160).mean() > 0.1
            columns = (img[y0:y1, x0:x1] < 160).any(axis=0).nonzero()[0] + x0
            outside = [c for c in columns if not (kx0 <= c < kx1 or vx0 <= c < vx1)]
            assert 0 < len(outside) < s.meta["font_px"] / 2


def _answer_from_truth(s: synth.Sample, question: str) -> str:
    """Answer to one of s's family's questions, read from the ground truth alone."""
    words = question.split()
    if s.family == "pope":
        present = {(o["color"], o["shape"]) for o in s.meta["objects"]}
        return "yes" if (words[3], words[4]) in present else "no"
    if s.family == "counting":
        return str(sum(o["shape"] + "s" == words[2] for o in s.meta["objects"]))
    if s.family == "docs":
        return {ln["key"]: ln["value"] for ln in s.meta["lines"]}[words[3]]
    if s.family == "charts":
        values = {b["label"]: b["value"] for b in s.meta["bars"]}
        if words[:2] == ["which", "bar"]:
            return max(values, key=values.get)
        if words[0] == "is":
            return "yes" if values[words[1]] > values[words[4]] else "no"
        return str(values[words[5]])
    objects = {o["shape"]: o for o in s.meta["objects"]}  # scenes: shapes are distinct
    if words[:2] == ["what", "color"]:
        return objects[words[4]]["color"]
    if words[0] == "is":
        a, b = objects[words[3]], objects[words[8]]
        return "yes" if (a["x"] < b["x"]) == (words[4] == "left") else "no"
    ref = objects[words[7]]["x"]
    side = [o for o in objects.values() if (o["x"] < ref if words[3] == "left" else o["x"] > ref)]
    assert len(side) == 1
    return side[0]["shape"]


@pytest.mark.parametrize("family", synth.FAMILIES)
def test_more_questions_are_answered_by_the_ground_truth(family):
    asked = collections.Counter()
    for i in range(12):
        s = synth.make_sample(family, i, SEED, image_size=96)
        more = synth.more_questions(s, 5, seed=2)
        assert more == synth.more_questions(s, 5, seed=2)
        assert _answer_from_truth(s, s.question) == s.answer if family != "ocr" else s.answer == s.meta["word"]
        if family == "ocr":
            assert more == []
            continue
        assert len(more) == 5 and more != synth.more_questions(s, 5, seed=3)
        for q, a in more:
            assert a == _answer_from_truth(s, q), (q, a)
            assert set(q.split()) | {a} <= set(synth.vocabulary())
            asked[a] += 1
    assert family == "ocr" or len(asked) >= 2


def test_more_pope_answers_cannot_be_told_from_the_turns_before():
    """Each turn's yes/no is a fair draw given the image: it agrees with the turn before about half the time
    (answers that alternated let the LLM learn the pattern and never look at the image)."""
    same, yes, n = 0, 0, 0
    for i in range(200):
        s = synth.make_sample("pope", i, SEED, image_size=64)
        answers = [s.answer] + [a for _, a in synth.more_questions(s, 4, seed=1)]
        same += sum(a == b for a, b in zip(answers, answers[1:]))
        yes += answers[1:].count("yes")
        n += 4
    assert 0.4 < same / n < 0.6 and 0.4 < yes / n < 0.6, (same / n, yes / n)


def test_more_questions_rejects_bad_k():
    s = synth.make_sample("pope", 0, SEED, image_size=96)
    assert synth.more_questions(s, 0) == []
    with pytest.raises(ValueError, match="k must be"):
        synth.more_questions(s, -1)


# --------------------------------------------------------------------------- errors


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="unknown family 'gqa'.*scenes, pope, counting, ocr, docs, charts"):
        synth.make_sample("gqa", 0, 0)
    with pytest.raises(ValueError, match="index must be >= 0"):
        synth.make_sample("scenes", -1, 0)
    with pytest.raises(ValueError, match="image_size must be >= 64"):
        synth.make_sample("scenes", 0, 0, image_size=63)
    with pytest.raises(ValueError, match="per_family must be >= 1"):
        synth.make_split(0, per_family=0)
    with pytest.raises(ValueError, match="unknown family 'tables'"):
        synth.make_split(0, per_family=1, families=("ocr", "tables"))
    with pytest.raises(ValueError, match="image_size must be >= 64"):
        synth.make_split(0, per_family=1, image_size=32)
    with pytest.raises(TypeError, match="index must be an int"):
        synth.make_sample("ocr", 1.5, 0)
