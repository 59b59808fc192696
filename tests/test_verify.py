"""`mv.verify` / `meteor verify`: the oracles asked of a user's model pass where the runtime is right and fail where
it is not (a runtime bug planted in each of the three checks: the embedding scale it must apply, the batch and the
cache)."""

import pytest

import meteor_vlm as mv
from meteor_vlm.models import runtime
from meteor_vlm.oracles import format_checks, verify

CHECKS = ["pruning nothing = the unmodified model", "batch = each prompt alone", "cached generate = uncached"]


@pytest.fixture(scope="module")
def granite_vision():
    """A LLaVA-NeXT with a Granite decoder (its input embeddings scaled by 12, which the runtime must follow)."""
    return mv.testing.tiny_llava(seed=2, tower="siglip", anyres=True, feature_layers=[-2, -4, -1], decoder="granite")


def results(rows: list[dict]) -> dict:
    return {(r["check"], r["method"]): r["passed"] for r in rows}


def test_every_check_passes_on_a_stock_vlm_and_on_the_projects_model(granite_vision):
    rows = mv.verify(*granite_vision, methods=["fastv:k2-r0.5", "meteor:e0.5-l50"])
    assert [r["check"] for r in rows] == [CHECKS[0], *CHECKS[1:] * 2]
    assert all(r["passed"] for r in rows) and all(r["max_diff"] <= r["bound"] for r in rows)
    assert "5 passed, 0 failed, 0 refused" in format_checks(rows)
    model, processor = mv.testing.tiny_model(seed=0)
    model.config.rank_table = mv.calibrate(model, processor, mv.testing.random_images(2), progress=False)
    rows = verify(model, processor, methods=["meteor:paper-242"], samples=2, new_tokens=2)
    assert all(r["passed"] for r in rows) and len(rows) == 3


def test_a_processor_that_takes_each_prompts_images_as_a_list_gets_them_so():
    """Gemma 3's processor refuses a batch's images as one flat list: the prompts `verify` writes (`meteor speed`'s)
    hand them one list per prompt."""
    rows = mv.verify(*mv.testing.tiny_gemma3(seed=2), methods=["fastv:k1-r0.5"], samples=2, new_tokens=1)
    assert len(rows) == 3 and all(r["passed"] for r in rows)


def test_a_processor_that_pads_on_the_right_is_compared_at_each_prompts_last_token(granite_vision):
    model, processor = granite_vision
    processor.tokenizer.padding_side = "right"
    try:
        rows = mv.verify(model, processor, methods=["fastv:k2-r0.5"], new_tokens=2)
    finally:
        processor.tokenizer.padding_side = "left"
    assert len(rows) == 3 and all(r["passed"] for r in rows)


def test_videos_are_checked_where_the_processor_takes_them():
    """`video_frames`: each question asked of a video of its image (a Qwen2.5-VL: temporal patches, its multimodal
    positions); every check passes, and the first says it ran on videos."""
    model, processor = mv.testing.tiny_qwen2_vl(seed=2, version="2.5")
    rows = mv.verify(model, processor, methods=["tome:keep0.5"], new_tokens=2, video_frames=4, image_size=64)
    assert len(rows) == 3 and all(r["passed"] for r in rows) and "a video of 4 frames each" in rows[0]["detail"]
    inputs = mv.oracles._inputs(model, processor, mv.synth.make_split(seed=1, per_family=1, image_size=64)[:2], 4)
    assert "pixel_values_videos" in inputs and "pixel_values" not in inputs


def test_a_runtime_without_the_decoders_embedding_scale_fails_the_first_check(granite_vision, monkeypatch):
    monkeypatch.setattr(runtime.DecoderParts, "scaled", lambda self, embeds: embeds)
    rows = verify(*granite_vision, methods=["fastv:k2-r0.5"])
    assert results(rows)[(CHECKS[0], "unpruned")] is False
    assert rows[0]["max_diff"] > rows[0]["bound"]
    assert "FAIL" in format_checks(rows) and "failed, 0 refused" in format_checks(rows)


def test_a_runtime_whose_batch_leaks_between_prompts_fails_the_batch_check(granite_vision, monkeypatch):
    prefill = runtime.prefill

    def leaking(parts, embeds, *args, **kwargs):  # each prompt gets a little of the batch's mean
        return prefill(parts, embeds + 0.1 * embeds.mean(0, keepdim=True), *args, **kwargs)

    monkeypatch.setattr(runtime, "prefill", leaking)
    rows = verify(*granite_vision, methods=["fastv:k2-r0.5"])
    assert results(rows)[(CHECKS[1], "fastv:k2-r0.5")] is False


def test_a_runtime_whose_decoding_drifts_from_the_prefill_fails_the_cache_check(granite_vision, monkeypatch):
    decode = runtime.decode_new_tokens
    monkeypatch.setattr(runtime, "decode_new_tokens", lambda *a, **k: decode(*a, **k) * 1.05)
    rows = verify(*granite_vision, methods=["fastv:k2-r0.5"])
    got = results(rows)
    assert got[(CHECKS[0], "unpruned")] and got[(CHECKS[1], "fastv:k2-r0.5")]
    assert got[(CHECKS[2], "fastv:k2-r0.5")] is False


def test_a_method_the_model_refuses_is_reported_not_failed(granite_vision):
    rows = verify(*granite_vision, methods=["meteor:paper-242"], samples=2, new_tokens=1)
    assert rows[-1]["check"] == "refused" and rows[-1]["passed"] is None
    assert "needs at least two experts" in rows[-1]["detail"]
    assert "1 passed, 0 failed, 1 refused" in format_checks(rows)


def test_bad_settings_get_clear_errors(granite_vision):
    with pytest.raises(ValueError, match="samples must be >= 2"):
        verify(*granite_vision, samples=1)
    with pytest.raises(ValueError, match="new_tokens must be >= 1"):
        verify(*granite_vision, new_tokens=0)
    with pytest.raises(ValueError, match="unknown method"):
        verify(*granite_vision, methods=["fastv:nope"])
    with pytest.raises(ValueError, match="video_frames must be >= 0"):
        verify(*granite_vision, video_frames=-1)
    with pytest.raises(ValueError, match="videos run on"):  # a LLaVA-NeXT's processor takes none here
        verify(*granite_vision, video_frames=2)


def test_meteor_verify_runs_a_checkpoint_folder_and_says_so_in_its_exit_status(tmp_path, capsys, granite_vision,
                                                                              monkeypatch):
    from meteor_vlm.cli import main

    model, processor = granite_vision
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    ckpt = str(tmp_path / "ckpt")
    assert main(["verify", "--model", ckpt, "--samples", "2", "--new-tokens", "2", "--methods", "fastv:k2-r0.5"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in CHECKS) and "3 passed, 0 failed, 0 refused" in out
    monkeypatch.setattr(runtime.DecoderParts, "scaled", lambda self, embeds: embeds)
    assert main(["verify", "--model", ckpt, "--samples", "2", "--new-tokens", "2", "--methods", "fastv:k2-r0.5"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert main(["verify", "--model", ckpt, "--samples", "1"]) == 2
    assert "samples must be >= 2" in capsys.readouterr().err


def test_meteor_verify_loads_a_folder_whose_decoder_has_no_sdpa(tmp_path, capsys):
    """An InternVL with a GPT-OSS decoder (InternVL3.5-GPT-OSS's kind): transformers refuses to load it with SDPA, so
    the commands load it with its own attention (eager for the decoder), and every check passes."""
    from meteor_vlm.cli import main

    model, processor = mv.testing.tiny_internvl(seed=2, decoder="gpt_oss")
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    assert main(["verify", "--model", str(tmp_path / "ckpt"), "--samples", "2", "--new-tokens", "2", "--methods",
                 "fastv:k1-r0.5"]) == 0
    assert "3 passed, 0 failed, 0 refused" in capsys.readouterr().out


def test_a_stock_vlm_whose_decoder_no_test_covers_is_pointed_to_verify():
    """A LLaVA with an OLMo 2 decoder (post-norm, q/k norms over all heads: the runtime scores it, but no oracle suite
    runs on it): attaching a method warns that its decoder is untested and names `meteor verify`, which passes here."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from meteor_vlm.models.runtime import TESTED_DECODERS, UntestedDecoderWarning

    base, processor = mv.testing.tiny_llava(seed=1)
    t = base.config.text_config
    text = AutoConfig.for_model("olmo2", vocab_size=t.vocab_size, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                                pad_token_id=t.pad_token_id, bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id)
    config = type(base.config)(vision_config=base.config.vision_config, text_config=text,
                               image_token_id=base.config.image_token_id, vision_feature_layer=-2,
                               vision_feature_select_strategy="default")
    config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(config).eval()
    assert "olmo2" not in TESTED_DECODERS and "llama" in TESTED_DECODERS
    with pytest.warns(UntestedDecoderWarning, match="'olmo2' decoder is not among those .*meteor verify"):
        rows = mv.verify(model, processor, methods=["fastv:k1-r0.5"], samples=2, new_tokens=1)
    assert len(rows) == 3 and all(r["passed"] for r in rows)
