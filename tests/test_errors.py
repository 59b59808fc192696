"""Bad input raises ValueError naming the problem."""

import pytest
import torch

import meteor_vlm as mv

from .conftest import make_inputs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lam=-1.0), "lambda must be >= 0"),
        (dict(lam=(50.0, -2.0, 1.0)), "lambda must be >= 0"),
        (dict(encoder_keep=1.5), r"encoder_keep must be a ratio in \[0, 1\]"),
        (dict(fusion_keep=-0.1), r"fusion_keep must be a ratio in \[0, 1\]"),
        (dict(fixed_keep=(0.5, 2.0, 0.1)), r"fixed_keep must be a ratio in \[0, 1\]"),
        (dict(allocation="rankish"), "unknown allocation"),
        (dict(fusion_strategy="magic"), "unknown fusion_strategy"),
        (dict(top_heads=0), "top_heads must be >= 1"),
        (dict(fusion_tokens=0), "fusion_tokens must be a positive int"),
    ],
)
def test_invalid_settings_raise_when_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mv.Meteor(**kwargs)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="unknown METEOR preset 'paper-999'.*paper-242"):
        mv.Meteor.preset("paper-999")
    assert "paper-242" in mv.Meteor.presets()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=(2, 9)), r"LLM layer\(s\) \[9\] past the model's depth \(6 layers"),
        (dict(encoder_tokens=10_000), "encoder budget 10000 is larger than the tokens available"),
        (dict(encoder=False, fusion_tokens=500), "fusion budget 500 is larger than the tokens available"),
        (dict(top_heads=9), "top_heads=9 but the LLM has 8 heads"),
        (dict(lam=(1.0, 2.0)), "2 lambda values for 3 pruning layers"),
        (dict(rank_table={"experts": {"clip": [1, 1, 1]}}), "no entry for experts"),
    ],
)
def test_settings_that_do_not_fit_the_model_raise_when_attached(tiny, kwargs, message):
    model, _ = tiny
    method = mv.Meteor(**kwargs)
    with pytest.raises(ValueError, match=message):
        with method(model):
            pass
    assert model._pruning_method is None


def test_missing_rank_table_is_explained(images):
    model, _ = mv.testing.tiny_model(seed=5)
    with pytest.raises(ValueError, match="needs a rank table.*meteor calibrate"):
        with mv.Meteor()(model):
            pass
    with mv.Meteor(allocation="average")(model):  # equal split needs no table
        pass


def test_image_count_must_match_placeholders(tiny, images):
    model, processor = tiny
    with pytest.raises(ValueError, match="prompt 0 has 2 <image> placeholders but 1 images"):
        processor(images=[images[0]], text=["<image> <image> what ?"])
    inputs = make_inputs(processor, [images[0]], ["what ?"])
    inputs["pixel_values_clip"] = inputs["pixel_values_clip"].repeat(2, 1, 1, 1)
    with pytest.raises(ValueError, match="same number of images"):
        model(**inputs)
    for k in [k for k in inputs if k.startswith("pixel_values_")]:
        inputs[k] = inputs[k].repeat(2, 1, 1, 1)[:2]
    with pytest.raises(ValueError, match="1 image placeholders but 2 images"):
        model(**inputs)


def test_unsupported_model_class():
    with pytest.raises(ValueError, match="unsupported model class Linear"):
        with mv.Meteor()(torch.nn.Linear(2, 2)):
            pass


def test_stage_that_needs_sequence_fusion_is_refused_on_channel_fusion():
    model, _ = mv.testing.tiny_model(seed=0, fusion="pre")
    with pytest.raises(ValueError, match="stage 1 .* needs post-projection fusion"):
        with mv.Meteor(allocation="average")(model):
            pass
    with mv.Meteor.preset("stage3")(model):  # stage 3 alone works on any fusion
        pass


def test_unreadable_image_file(tmp_path, tiny):
    _, processor = tiny
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        processor(images=[str(bad)], text=["what ?"])
    with pytest.raises(ValueError, match="image file not found"):
        processor(images=[str(tmp_path / "missing.png")], text=["what ?"])


def test_a_decoder_config_with_sliding_layers_but_no_window_is_refused():
    from transformers import Gemma3TextConfig, Gemma3TextModel

    from meteor_vlm.models.runtime import DecoderParts

    small = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8)
    windowless = Gemma3TextModel(Gemma3TextConfig(**small))
    windowless.config.sliding_window = None
    with pytest.raises(ValueError, match="sliding-window layers but no sliding_window"):
        DecoderParts.of_backbone(windowless, torch.nn.Identity())
    parts = DecoderParts.of_backbone(Gemma3TextModel(Gemma3TextConfig(**small, sliding_window=5)), torch.nn.Identity())
    assert [parts.window(i) for i in range(2)] == [5, 5]  # Gemma 3's default pattern: local layers first


def test_a_static_cache_is_refused_with_a_clear_error(images):
    """generate with cache_implementation="static" (fixed-length layers) under a method: a ValueError naming it, not
    a shape error inside attention; the default cache still works."""
    model, processor = mv.testing.tiny_llava(seed=1)
    inputs = dict(processor(images=[images[0]], text=["<image> what is in the image ?"], return_tensors="pt"))
    with mv.NoPruning()(model), torch.no_grad():
        with pytest.raises(ValueError, match="StaticCache .* cannot hold a pruned prompt"):
            model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
        assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.parametrize("asked", ["output_attentions", "output_hidden_states"])
def test_per_layer_outputs_are_refused_not_answered_with_none(tiny, images, asked):
    """The runtime collects no per-layer hidden states or attention maps: asking for them (in a forward or through
    generate) is a clear error on the project's model, pruned or not, and on a stock VLM under a method; False is
    what generate passes by default and runs."""
    model, processor = tiny
    inputs = make_inputs(processor, [images[0]], ["what ?"])
    llava, llava_processor = mv.testing.tiny_llava(seed=0)
    llava_inputs = llava_processor(images=[images[0]], text=["<image> what ?"], return_tensors="pt")
    for target, given, method in [(model, inputs, None), (model, inputs, mv.FastV(layer=2, ratio=0.5)),
                                  (llava, llava_inputs, mv.FastV(layer=2, ratio=0.5))]:
        with method(target) if method is not None else torch.no_grad(), torch.no_grad():
            assert target(**given, **{asked: False}).logits.shape[1] == given["input_ids"].shape[1]
            with pytest.raises(ValueError, match=f"{asked} is not supported by .*logits and the cache only"):
                target(**given, **{asked: True})
            with pytest.raises(ValueError, match=f"{asked} is not supported"):
                target.generate(**given, max_new_tokens=2, return_dict_in_generate=True, **{asked: True})


def test_position_ids_are_refused_by_the_projects_model_not_ignored(tiny, images):
    """The project's model places its tokens itself, so position_ids given to it are an error (they used to be
    dropped without a word); generate never passes them."""
    model, processor = tiny
    inputs = make_inputs(processor, [images[0]], ["what ?"])
    with pytest.raises(ValueError, match="position_ids are not taken"):
        model(**inputs, position_ids=torch.arange(inputs["input_ids"].shape[1])[None])
    assert model.generate(**inputs, max_new_tokens=2, min_new_tokens=2).shape[1] == inputs["input_ids"].shape[1] + 2
