"""The multi-encoder VLM: expert kinds, fusion modes, LLM classes, save/load, stats, calibration."""

import json

import pytest
import torch

import meteor_vlm as mv
from meteor_vlm import ops
from meteor_vlm.methods import scaled_llm_layers
from meteor_vlm.models.adapters import adapt

from .conftest import make_inputs
from .test_oracles import right_padded


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(experts=("clip", "siglip", "pix2struct", "convnext")),
        dict(experts=("siglip", "efficientnet_lite"), llm="qwen2"),
        dict(experts=("clip", "pix2struct", "convnext"), fusion="pre"),
        dict(projector="vocab"),
    ],
    ids=["four-experts", "qwen2", "channel-fusion", "vocab-projector"],
)
def test_variants_run_generate_and_noop_equals_unmodified(kwargs, images):
    model, processor = mv.testing.tiny_model(seed=1, **kwargs)
    inputs = make_inputs(processor, [images[0], [images[1], images[2]]], ["what ?", "how many circle ?"])
    with torch.no_grad():
        base = model(**inputs, use_cache=False).logits
        with mv.NoPruning()(model):
            same = model(**inputs, use_cache=False).logits
        real = inputs["attention_mask"].bool()
        torch.testing.assert_close(same[real], base[real], atol=1e-5, rtol=0)
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert not (out[:, inputs["input_ids"].shape[1] :] == model.config.image_token_id).any()


def test_meteor_runs_on_every_expert_kind(images):
    model, processor = mv.testing.tiny_model(seed=2, experts=("clip", "siglip", "pix2struct", "convnext", "efficientnet_lite"))
    model.config.rank_table = mv.calibrate(model, processor, images[:2], progress=False)
    inputs = make_inputs(processor, [images[0], images[1]], ["what ?", "how many ?"])
    method = mv.Meteor.preset("paper-242")
    with method(model), torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    s = method.stats[0]
    plan = method._plan["encoder"]
    assert s["stage1"] == {name: steps[-1] for name, steps in plan.items()}
    assert s["stage1_tokens"] < s["encoder_tokens"]
    assert s["fusion_tokens"] == method._plan["fusion"]
    counts = s["tokens_per_layer"]
    assert counts == sorted(counts, reverse=True) and counts[0] == s["fusion_tokens"]
    assert s["layer_avg_tokens"] == sum(counts) / len(counts)


def test_save_and_load_round_trip(tiny, images, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = mv.MultiEncoderVLM.from_pretrained(tmp_path).eval()
    proc2 = mv.MultiEncoderProcessor.from_pretrained(tmp_path)
    inputs = make_inputs(processor, [images[0]], ["what is in the image ?"])
    inputs2 = make_inputs(proc2, [images[0]], ["what is in the image ?"])
    assert all(torch.equal(inputs[k], inputs2[k]) for k in inputs)
    assert loaded.config.rank_table == model.config.rank_table
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs2, use_cache=False).logits, model(**inputs, use_cache=False).logits)
    assert "model.safetensors" in {p.name for p in tmp_path.iterdir()}


def test_rank_allocation_follows_the_rank_table(tiny):
    model, _ = tiny
    table = {"experts": {"clip": [4, 4, 4], "pix2struct": [12, 12, 12], "convnext": [None, None, 8]}}
    plans = {}
    for alloc in ("rank", "average", "rank-reverse"):
        m = mv.Meteor(allocation=alloc, rank_table=table, encoder_tokens=24, fusion=False, llm=False)
        with m(model):
            plans[alloc] = {n: p[-1] for n, p in m._plan["encoder"].items()}
        assert sum(plans[alloc].values()) == 24
    # final point: weights 4 / 12 / 8 over 24 tokens (each keeps >= 1): rank favours pix2struct, reverse clip
    assert plans["rank"]["pix2struct"] > plans["average"]["pix2struct"] > plans["rank-reverse"]["pix2struct"]
    assert plans["rank"]["clip"] < plans["rank-reverse"]["clip"]
    assert plans["average"] == {"clip": 8, "pix2struct": 8, "convnext": 8}


def test_fusion_strategies_keep_k_in_order(tiny, images):
    model, processor = tiny
    inputs = make_inputs(processor, [images[0]], ["what ?"])
    for strategy in ("cooperative", "separate", "random"):
        m = mv.Meteor(encoder=False, llm=False, fusion_tokens=20, fusion_strategy=strategy)
        captured = {}
        orig = m.prune_fusion

        def spy(ctx, orig=orig):
            idx = orig(ctx)
            captured["idx"] = idx
            captured["ids"] = ctx.expert_ids
            return idx

        m.prune_fusion = spy
        with m(model), torch.no_grad():
            model(**inputs, use_cache=False)
        idx = captured["idx"]
        assert idx.shape == (1, 20) and torch.all(idx[:, 1:] > idx[:, :-1])  # grouped by expert, spatial order
        if strategy == "separate":  # each expert keeps its proportional share
            kept = torch.bincount(captured["ids"][idx[0]], minlength=3).tolist()
            assert kept == mv.ops.allocate_budget(20, [16, 36, 16], [16, 36, 16])


def test_calibrate_table_and_cli_json(tiny, images, tmp_path):
    model, processor = tiny
    table = mv.calibrate(model, processor, images[:3], progress=False)
    assert set(table["experts"]) == set(model.expert_names)
    assert table["experts"]["convnext"][:2] == [None, None] and table["experts"]["convnext"][2] > 0
    assert all(r is not None and r > 0 for r in table["experts"]["clip"])
    mv.save_rank_table(table, tmp_path / "ranks.json")
    assert mv.load_rank_table(tmp_path / "ranks.json") == json.loads(json.dumps(table))


def test_scaled_llm_layers():
    assert scaled_llm_layers(32) == (4, 12, 20)
    assert scaled_llm_layers(6) == (1, 2, 4)
    assert scaled_llm_layers(16) == (2, 6, 10)


@pytest.mark.parametrize("kind", ["clip", "siglip", "pix2struct", "llava-clip", "llava-siglip"])
def test_a_block_split_at_its_mlp_is_the_block(kind):
    """run_attention then run_mlp equal run_block (with and without a per-key bias), and the keys caught
    from the attention are the block's own keys (query_key), for every ViT runner and LLaVA's towers."""
    if kind.startswith("llava"):
        runner = adapt(mv.testing.tiny_llava(seed=0, tower=kind[len("llava-"):])[0]).runners[0]
    else:
        model, _ = mv.testing.tiny_model(seed=0, experts=(kind, "clip") if kind != "clip" else ("clip", "siglip"))
        runner = model.runners[0]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # fresh norms are all alike (ones, zeros): make each its own
        for module in runner.module.modules():
            if "LayerNorm" in type(module).__name__:
                for p in module.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
    x = torch.randn(2, 7, runner.out_dim, generator=gen)
    bias = torch.rand(2, 7, generator=gen).log1p()
    for i in range(runner.num_blocks):
        for b in (None, bias):
            with torch.no_grad():
                half, keys = runner.run_attention(i, x, b)
                torch.testing.assert_close(runner.run_mlp(i, half), runner.run_block(i, x, b), atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(keys, runner.query_key(i, x)[1])
        assert not torch.allclose(half, runner.run_block(i, x), atol=1e-3)  # the MLP half does something


@pytest.mark.parametrize("kind", ["clip", "siglip", "pix2struct", "convnext", "efficientnet_lite"])
def test_every_fresh_expert_sees_the_image(kind, images):
    """A model built from a config must not start blind: different images give different features."""
    model, processor = mv.testing.tiny_model(seed=0, experts=(kind, "clip") if kind != "clip" else ("clip", "siglip"))
    pixels = processor(images=[images[0], images[1]], text=["a", "b"])
    name = model.expert_names[0]
    with torch.no_grad():
        feats = model.encode_expert(0, pixels[f"pixel_values_{name}"], None).features
    assert (feats[0] - feats[1]).abs().mean() > 1e-2 * feats.abs().mean()
    proj = model.projectors[0].fc1.weight
    assert abs(proj.std().item() - 0.02) < 0.005  # the projector got our init, not PyTorch's default


def test_projector_batch_norm_is_a_fixed_map_at_inference(images):
    """With projector_norm='batch', eval mode uses running statistics: a batch equals its samples alone."""
    model, processor = mv.testing.tiny_model(seed=3, projector_norm="batch")
    inputs = make_inputs(processor, [images[0], images[1]], ["what ?", "how many circle are there ?"])
    model.train()
    with torch.no_grad():
        model(**inputs, use_cache=False)  # one training-mode pass moves the running statistics
    model.eval()
    assert model.projectors[0].norm.running_mean.abs().sum() > 0
    with torch.no_grad():
        batch = model(**inputs, use_cache=False).logits
        alone = model(**make_inputs(processor, [images[1]], ["how many circle are there ?"]), use_cache=False).logits[0]
    torch.testing.assert_close(batch[1, -alone.shape[0] :], alone, atol=1e-4, rtol=1e-4)


def test_splice_equals_a_token_by_token_reference(tiny, images):
    """Each placeholder becomes its image's tokens, in order; padding leaves the rows, which are left-padded to the
    longest again (the same prompts padded on the right give the same rows)."""
    model, processor = tiny
    left = make_inputs(processor, [images[0], [images[1], images[2]], images[3]],
                       ["what is it ?", "<image> and <image> ?", "how many circle are there in the image ?"])
    for inputs in (left, right_padded(left)):
        with torch.no_grad():
            visual = model.encode_images({k[len("pixel_values_"):]: v for k, v in inputs.items()
                                          if k.startswith("pixel_")})
            embeds, valid, is_vis, text_col, vis_index, positions = model._splice(inputs["input_ids"],
                                                                                  inputs["attention_mask"], visual)
            text_emb = model.get_input_embeddings()(inputs["input_ids"])
        n_vis, image, widths = visual.features.shape[1], 0, []
        for b in range(inputs["input_ids"].shape[0]):
            rows = []  # (embedding, vis_index) per expanded column of a real token, built token by token
            ends = []  # the expanded column each input column reads: its own, or for padding the one before it
            for t, tok in enumerate(inputs["input_ids"][b].tolist()):
                if not inputs["attention_mask"][b, t]:
                    ends.append(len(rows) - 1)
                elif tok == model.config.image_token_id:
                    rows += [(visual.features[image, j], image * n_vis + j) for j in range(n_vis)]
                    ends.append(len(rows) - 1)
                    image += 1
                else:
                    rows.append((text_emb[b, t], -1))
                    ends.append(len(rows) - 1)
            pad = embeds.shape[1] - len(rows)
            assert not valid[b, :pad].any() and not is_vis[b, :pad].any() and (embeds[b, :pad] == 0).all()
            for j, (e, idx) in enumerate(rows):  # unpruned, every token takes the next RoPE position
                assert torch.equal(embeds[b, pad + j], e)
                assert (bool(valid[b, pad + j]), bool(is_vis[b, pad + j]), int(vis_index[b, pad + j])) == (
                    True, idx >= 0, idx)
                assert int(positions[b, pad + j]) == j
            assert text_col[b].tolist() == [e + pad for e in ends]
            widths.append(len(rows))
        assert image == visual.features.shape[0]
        assert embeds.shape[1] == max(widths), "the longest row has no padding"


def test_vocab_projector_hides_its_hidden_ids_from_the_llm(tmp_path):
    """With projector_hidden_ids, a token mixes the other words only, renormalised (oracle: the softmax of
    the classifier's logits over the kept columns); the classifier itself still scores every word, and
    the ids survive save/load. Bad ids fail clearly."""
    from meteor_vlm.models.vlm import VocabProjector

    hidden = [1, 4, 5]
    model, _ = mv.testing.tiny_model(seed=2, projector="vocab", projector_hidden_ids=hidden)
    proj = model.projectors[0]
    words = model.get_input_embeddings().weight
    V = words.shape[0]
    kept = torch.tensor([i for i in range(V) if i not in hidden])
    x = torch.randn(2, 3, proj.fc1.in_features)
    cells = torch.tensor([[0, 2, 1], [3, 3, 0]])
    with torch.no_grad():
        logits = proj.word_logits(x)
        assert logits.shape[-1] == V  # the grounding loss still sees the hidden words
        want = logits[..., kept].softmax(-1) @ words[kept] + proj.position.weight[cells]
        torch.testing.assert_close(proj(x, cells, words), want, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path)
    loaded = mv.MultiEncoderVLM.from_pretrained(tmp_path)
    assert loaded.config.projector_hidden_ids == hidden
    assert all(p.hidden_ids == hidden for p in loaded.projectors)
    with pytest.raises(ValueError, match="hidden_ids must lie"):
        VocabProjector(8, 16, 10, 4, hidden_ids=[10])
    with pytest.raises(ValueError, match="whole vocabulary"):
        VocabProjector(8, 16, 3, 4, hidden_ids=[0, 1, 2])
    with pytest.raises(ValueError, match="needs projector='vocab'"):
        mv.testing.tiny_config(projector_hidden_ids=[1])


def test_vocab_projector_mixes_word_embeddings_at_each_tokens_own_cell(images):
    """A VocabProjector token = softmax(classifier) @ input embeddings + the embedding of its grid cell;
    a CNN pruned at its output must get the cell embeddings of the cells it kept, not of 0..K-1."""
    from dataclasses import dataclass

    from meteor_vlm.methods.base import PruningMethod

    model, processor = mv.testing.tiny_model(seed=4, projector="vocab")
    inputs = make_inputs(processor, [images[0], images[1]], ["what ?", "what ?"])
    pixels = mv.models.vlm.expert_pixels(inputs)
    cnn = model.expert_names.index("convnext")
    keep = torch.tensor([[5, 1, 9], [0, 15, 7]])

    @dataclass
    class KeepCells(PruningMethod):
        def prune_encoder(self, ctx):
            return keep if ctx.expert == "convnext" else None

    with torch.no_grad():
        full = model.encode_images(pixels)
        pruned = model.encode_images(pixels, KeepCells())
    on_cnn = full.expert[0] == cnn
    expected = full.features[:, on_cnn].gather(1, keep[..., None].expand(-1, -1, full.features.shape[-1]))
    got = pruned.features[:, pruned.expert[0] == cnn]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the formula itself, on one expert's raw features
    proj = model.projectors[cnn]
    x = torch.randn(2, 4, proj.fc1.in_features)
    cells = torch.tensor([[3, 0, 2, 1], [1, 1, 0, 3]])
    words = model.get_input_embeddings().weight
    want = proj.word_logits(x).softmax(-1) @ words + proj.position.weight[cells]
    torch.testing.assert_close(proj(x, cells, words), want, atol=1e-5, rtol=0)


def test_meteor_cnn_activation_score_keeps_the_cnn_cells_of_largest_norm(tiny, images):
    """cnn_score="activation": at its output the CNN keeps its planned count of cells, those whose trunk
    features (before the ConvNeXt's output LayerNorm, which leaves every cell the same norm) have the
    largest norm, in grid order, and the transformer experts keep what they keep by default; the default
    ranks the CNN's output cells by cosine similarity to their mean cell, dropping the most similar. Bench
    names with -act build it; an unknown score is refused."""
    from meteor_vlm.bench.accuracy import make_method

    model, processor = tiny
    inputs = make_inputs(processor, [images[0], images[1]], ["what ?", "what ?"])
    pixels = mv.models.vlm.expert_pixels(inputs)
    cnn = model.expert_names.index("convnext")
    act = mv.Meteor(fusion=False, llm=False, encoder_keep=0.3, cnn_score="activation")
    plain = act.with_(cnn_score="mean-similarity")
    got = {}
    with torch.no_grad():
        full = model.encode_expert(cnn, pixels["convnext"], None)
        for m in (act, plain):
            with m(model):
                got[m.cnn_score] = [model.encode_expert(i, pixels[n], m) for i, n in enumerate(model.expert_names)]
        runner = model.runners[cnn]  # the trunk's feature map, one row per cell
        trunk = runner.module.encoder(runner.module.embeddings(pixels["convnext"])).last_hidden_state.flatten(2).mT
    x = full.features
    k = got["activation"][cnn].grid_index.shape[1]
    assert 0 < k < x.shape[1] and got["mean-similarity"][cnn].grid_index.shape[1] == k
    by_norm = torch.sqrt((trunk.double() ** 2).sum(-1)).topk(k, dim=1).indices.sort(1).values
    assert got["activation"][cnn].grid_index.tolist() == by_norm.tolist()
    torch.testing.assert_close(got["activation"][cnn].features, x.gather(1, by_norm[..., None].expand(-1, -1, x.shape[-1])))
    sim = torch.nn.functional.cosine_similarity(x, x.mean(1, keepdim=True).expand_as(x), dim=-1)
    by_sim = sim.topk(k, dim=1, largest=False).indices.sort(1).values
    assert got["mean-similarity"][cnn].grid_index.tolist() == by_sim.tolist() != by_norm.tolist()
    for i in range(len(model.expert_names)):
        if i != cnn:
            assert got["activation"][i].grid_index.tolist() == got["mean-similarity"][i].grid_index.tolist()
            torch.testing.assert_close(got["activation"][i].features, got["mean-similarity"][i].features)
    assert make_method("meteor:e0.5-f0.5-l200-act").cnn_score == "activation"
    assert make_method("meteor:e0.5-f0.5-l200").cnn_score == "mean-similarity"
    assert make_method("meteor:e0.3-l50-act").cnn_score == "activation"
    stage1 = make_method("alloc:rank-reverse-act")
    assert (stage1.allocation, stage1.cnn_score, stage1.fusion, stage1.llm) == ("rank-reverse", "activation", False, False)
    assert stage1.settings() == {**make_method("alloc:rank-reverse").settings(), "cnn_score": "activation"}
    with pytest.raises(ValueError, match="unknown cnn_score"):
        mv.Meteor(cnn_score="norm")


def test_meteor_nocls_score_ranks_an_expert_without_cls_by_mean_similarity_at_every_point(tiny, images):
    """nocls_score="mean-similarity": at each pruning point of the expert without CLS (Pix2Struct) the kept tokens
    are those least like the mean of the tokens there; by default, from the second point on, those that receive the
    most attention. The two differ where they see the same tokens (the second point), and the expert with CLS keeps
    the same tokens under both. Bench names with -ms build it; an unknown score is refused."""
    from meteor_vlm.bench.accuracy import make_method

    model, processor = tiny
    pixels = mv.models.vlm.expert_pixels(make_inputs(processor, [images[0], images[1]], ["what ?", "what ?"]))
    seen = {}

    class Recorded(mv.Meteor):
        def prune_encoder(self, ctx):
            out = super().prune_encoder(ctx)
            score = ctx.received_attention() if ctx.block is not None and not ctx.has_cls else None
            seen.setdefault(self.nocls_score, []).append((ctx.expert, ctx.point, ctx.patches, score, out))
            return out

    for nocls in ("received-attention", "mean-similarity"):
        method = Recorded(fusion=False, llm=False, encoder_keep=0.3, nocls_score=nocls)
        with torch.no_grad(), method(model):
            for i, name in enumerate(model.expert_names):
                model.encode_expert(i, pixels[name], method)
    points = {nocls: {(e, p): (x, a, out) for e, p, x, a, out in rec} for nocls, rec in seen.items()}
    later = [key for key in points["mean-similarity"] if key[0] == "pix2struct" and key[1] > 0]
    assert len(later) == 2
    for key in later:
        x, _, out = points["mean-similarity"][key]
        want = ops.topk_indices(ops.mean_similarity(x), out.shape[1], largest=False)
        assert out.tolist() == want.tolist()
        _, received, out = points["received-attention"][key]
        assert out.tolist() == ops.topk_indices(received, out.shape[1]).tolist()
    first = ("pix2struct", 1)
    torch.testing.assert_close(points["mean-similarity"][first][0], points["received-attention"][first][0])
    assert points["mean-similarity"][first][2].tolist() != points["received-attention"][first][2].tolist()
    for key, (_, _, out) in points["mean-similarity"].items():
        if key[0] == "clip":
            assert out.tolist() == points["received-attention"][key][2].tolist()
    assert make_method("meteor:e0.5-f0.5-l200-ms").nocls_score == "mean-similarity"
    assert make_method("meteor:e0.5-f0.5-l200-act-ms").settings() == {
        **make_method("meteor:e0.5-f0.5-l200").settings(), "cnn_score": "activation", "nocls_score": "mean-similarity"}
    assert make_method("meteor:e0.5-f0.5-l200").nocls_score == "received-attention"
    assert make_method("alloc:rank-ms").settings() == {**make_method("alloc:rank").settings(),
                                                       "nocls_score": "mean-similarity"}
    with pytest.raises(ValueError, match="unknown nocls_score"):
        mv.Meteor(nocls_score="attention")


def test_settings_name_the_method_and_rebuild_it():
    """A results row's `settings` are the method's name and constructor fields, nothing else: every bench name's
    method, rebuilt from its settings, has the same settings (class constants such as Meteor's PRESETS are not
    settings)."""
    from meteor_vlm.bench.accuracy import NAME_PATTERNS, make_method, method_catalog

    names = list(method_catalog()) + [p.example for p in NAME_PATTERNS]
    for name in names:
        method = make_method(name)
        settings = method.settings()
        assert settings["name"] == method.name and "PRESETS" not in settings, name
        rebuilt = type(method)(**{k: v for k, v in settings.items() if k != "name"})
        assert rebuilt.settings() == settings, name


@pytest.mark.parametrize("method", [None, lambda: mv.Meteor.preset("paper-242", allocation="average")])
def test_a_bfloat16_model_takes_the_processors_float32_pixels(tiny, images, method):
    """Loaded in bfloat16, the model casts the pixels it is given to each expert's dtype, as stock VLMs do: float32
    pixels (what the processor returns) give the logits of pixels cast beforehand, pruned or not."""
    import copy

    model = copy.deepcopy(tiny[0]).to(torch.bfloat16)
    inputs = make_inputs(tiny[1], [images[0], images[1]], ["what ?", "how many circle are there ?"])
    cast = {k: v.to(torch.bfloat16) if k.startswith("pixel_values_") else v for k, v in inputs.items()}
    assert all(v.dtype == torch.float32 for k, v in inputs.items() if k.startswith("pixel_values_"))
    with method()(model) if method else torch.no_grad(), torch.no_grad():
        got, want = model(**inputs).logits, model(**cast).logits
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_the_testing_module_exports_every_tiny_model():
    """`from meteor_vlm.testing import *` brings every tiny model builder (they are public: README examples and
    users' own tests call them)."""
    builders = {n for n in dir(mv.testing) if n.startswith("tiny_") and callable(getattr(mv.testing, n))}
    assert len(builders) >= 13 and builders <= set(mv.testing.__all__)
