"""Stock transformers Qwen2-VL and Qwen2.5-VL (multimodal RoPE) under every method, inside the vision encoder
(whole 2x2 merge windows) and after it: the oracles the project's own model obeys (no-op == stock model,
drop == mask, batch == one by one, cached == uncached), with each kept token at its stock (temporal, height,
width) position, and windows dropped inside the encoder == the stock blocks run without them."""

import re

import pytest
import torch
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

import meteor_vlm as mv
from meteor_vlm.models.adapters import adapt

from .test_llava import assert_noop_is_the_stock_model
from .test_oracles import DropAt, DropWindows, check_batch_and_cache, masked_decoder_logits, survivors

PROMPTS = ["<image> what is in the image ?", "how many red circle are there ? <image> and <image> on the left",
           "<image> describe the shape ?"]
IMAGES = [1, 2, 1]
SIZES = [(48, 32), (30, 60), (40, 40), (64, 20)]  # each its own token count (6, 8, 4, 4 visual tokens)


@pytest.fixture(scope="module", params=["2", "2.5"], ids=["qwen2-vl", "qwen2.5-vl"])
def qwen(request):
    return mv.testing.tiny_qwen2_vl(seed=2, version=request.param)


@pytest.fixture(scope="module")
def pictures():
    return [im.resize(size) for im, size in zip(mv.testing.random_images(4, seed=8), SIZES)]


def qwen_inputs(processor, pictures, which=(0, 1, 2), same_size=False):
    starts = [sum(IMAGES[:i]) for i in range(len(IMAGES))]
    imgs = [pictures[s + j] for i in which for s in [starts[i]] for j in range(IMAGES[i])]
    if same_size:
        imgs = [im.resize((40, 40)) for im in imgs]
    return processor(images=imgs, text=[PROMPTS[i] for i in which])


def logits(model, inputs, method=None, **kw):
    with torch.no_grad(), (method(model) if method is not None else torch.no_grad()):
        return model(**inputs, use_cache=False, **kw).logits


def stock_reference(model, inputs, drop, layer):
    """The stock model's embeddings and multimodal RoPE positions, run layer by layer with the columns in `drop`
    masked as keys from `layer` on."""
    with torch.no_grad():
        ids = inputs["input_ids"]
        feats = torch.cat(model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        embeds = model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == model.config.image_token_id)[..., None].expand_as(embeds), feats)
        positions, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                                  attention_mask=inputs["attention_mask"])
    return masked_decoder_logits(model.model.language_model, model.lm_head, embeds, inputs["attention_mask"].bool(),
                                 drop, layer, positions=positions)


NOOPS = {"none": mv.NoPruning, "fastv": lambda: mv.FastV(layer=2, ratio=0.0),
         "pyramiddrop": lambda: mv.PyramidDrop(ratio=1.0), "dart": lambda: mv.DART(layer=2, ratio=0.0),
         "divprune": lambda: mv.DivPrune(keep=1.0), "sparsevlm": lambda: mv.SparseVLM(keep=(1.0, 1.0, 1.0)),
         "meteor-stage3": lambda: mv.Meteor.preset("stage3", lam=1e9),
         "meteor-stage1": lambda: mv.Meteor.preset("stage1", encoder_keep=1.0),
         "evoprune": lambda: mv.EvoPrune(keep=1.0), "visionzip": lambda: mv.VisionZip(keep=1.0)}


@pytest.mark.parametrize("make", list(NOOPS.values()), ids=list(NOOPS))
def test_pruning_nothing_equals_the_stock_model_and_the_block_restores_it(qwen, pictures, make):
    model, processor = qwen
    method = make()
    assert_noop_is_the_stock_model(model, qwen_inputs(processor, pictures), method, logits, logits)
    assert [s["images"] for s in method.stats] == IMAGES


@pytest.mark.parametrize("layer", [0, 3])
def test_dropping_at_llm_layer_equals_masking_keys_at_their_multimodal_positions(qwen, pictures, layer):
    model, processor = qwen
    inputs = qwen_inputs(processor, pictures, which=(0, 1))
    vis = inputs["input_ids"] == model.config.image_token_id
    drop = [vis[0].nonzero()[::3, 0].tolist(), vis[1].nonzero()[1::2, 0].tolist()]
    got = logits(model, inputs, lambda m: DropAt(layer, drop)(m))
    want = stock_reference(model, inputs, drop, layer)
    text = inputs["attention_mask"].bool() & ~vis
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)
    assert (got[text] - logits(model, inputs)[text]).abs().max() > 1e-3


@pytest.mark.parametrize("same_size", [True, False], ids=["same-size", "sizes-differ"])
def test_fusion_pruning_equals_masking_those_tokens_from_layer_0(qwen, pictures, same_size):
    """DivPrune before the LLM = the stock model with the other visual tokens masked from layer 0 on; images of
    different sizes each keep their share of their own tokens."""
    model, processor = qwen
    inputs = qwen_inputs(processor, pictures, same_size=same_size)
    method = mv.DivPrune(keep=0.5)
    got = logits(model, inputs, method)
    is_img = inputs["input_ids"] == model.config.image_token_id
    counts = (inputs["image_grid_thw"].prod(-1) // 4).tolist()  # visual tokens per image, 2x2 merged
    drop, image = [], 0
    for b, s in enumerate(method.stats):  # image i's token g is the g-th of its image tokens
        cols = is_img[b].nonzero()[:, 0].split(counts[image:image + s["images"]])
        drop.append([int(c[g]) for c, kept in zip(cols, s["kept_grid"]) for g in range(len(c)) if g not in kept["vision"]])
        assert [len(k["vision"]) for k in s["kept_grid"]] == [round(0.5 * len(c)) for c in cols]
        image += s["images"]
    assert all(drop)
    want = stock_reference(model, inputs, drop, 0)
    text = inputs["attention_mask"].bool() & ~is_img
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)


PRUNING = {"fastv": lambda: mv.FastV(layer=2, ratio=0.6), "pyramiddrop": lambda: mv.PyramidDrop(ratio=0.6),
           "dart": lambda: mv.DART(layer=2, ratio=0.6), "divprune": lambda: mv.DivPrune(keep=0.4),
           "sparsevlm": lambda: mv.SparseVLM(keep=(0.6, 0.4, 0.2), recycle=0.5, cluster=0.25),
           "meteor-stage3": lambda: mv.Meteor.preset("stage3", lam=3.0),
           "meteor-stage1+3": lambda: mv.Meteor.preset("stage1+3", encoder_keep=0.5, lam=3.0),
           "evoprune": lambda: mv.EvoPrune(keep=0.5), "tome": lambda: mv.ToMe(keep=0.5),
           "visionzip": lambda: mv.VisionZip(keep=0.5), "prumerge+": lambda: mv.PruMerge()}


@pytest.mark.parametrize("make", list(PRUNING.values()), ids=list(PRUNING))
def test_every_later_method_obeys_the_batch_and_cache_oracles(qwen, pictures, make):
    """Batch = one by one, cached generation = recomputation without the cache (the prompt's token types grown
    with text for the generated tokens, as the stock model reads them)."""
    model, processor = qwen
    method = make()

    def images_for(batch, ids):
        kinds = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(ids[:, batch["input_ids"].shape[1]:])], 1)
        return {"pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"], "mm_token_type_ids": kinds}

    check_batch_and_cache(model, method, lambda which: qwen_inputs(processor, pictures, which), images_for,
                          [*model.generation_config.suppress_tokens, processor.tokenizer.eos_token_id])


def test_bad_inputs_and_settings_are_refused(qwen, pictures):
    model, processor = qwen
    inputs = qwen_inputs(processor, pictures, which=(0,))
    with pytest.raises(ValueError, match="needs image_grid_thw"):
        logits(model, {k: v for k, v in inputs.items() if k != "image_grid_thw"}, mv.FastV())
    with pytest.raises(ValueError, match="encoder_tokens is a count for a fixed grid"):
        logits(model, inputs, mv.Meteor.preset("stage1", encoder_tokens=2))
    video = {**inputs, "image_grid_thw": inputs["image_grid_thw"] * torch.tensor([2, 1, 1])}
    with pytest.raises(ValueError, match="only still images"):
        logits(model, video, mv.ToMe(keep=0.5))
    assert "forward" not in vars(model)


def stock_blocks_without(visual, pixels, grid_thw):
    """One image's merged tokens from the stock encoder's own blocks and merger, the windows `survivors` drops at
    each block removed from the packed sequence (the stock attention windows of Qwen2.5-VL, as its
    get_vision_window_index lays them out, among those left): (kept window indices, (K, D) tokens)."""
    cfg, m = visual.config, visual.spatial_merge_size
    grid = torch.tensor([grid_thw])
    hidden = visual.patch_embed(pixels)
    cos, sin = visual.rotary_pos_emb(hidden, get_vision_position_ids(grid, m))
    alive = torch.arange(hidden.shape[0] // m**2)
    window = torch.zeros_like(alive)
    if hasattr(visual, "fullatt_block_indexes"):  # each window's stock attention window
        order, cu = get_vision_window_index(grid, m, cfg.window_size, cfg.patch_size)
        window[order] = torch.searchsorted(cu[1:] // m**2, torch.arange(len(order)), right=True)
    for b, block in enumerate(visual.blocks):
        windowed = hasattr(visual, "fullatt_block_indexes") and b not in visual.fullatt_block_indexes
        order = torch.argsort(window[alive], stable=True) if windowed else torch.arange(len(alive))
        sizes = torch.bincount(window[alive][order]) if windowed else torch.tensor([len(alive)])
        cu = torch.cat([torch.zeros(1), (sizes[sizes > 0] * m**2).cumsum(0)]).int()
        patch = (alive[order, None] * m**2 + torch.arange(m**2)).flatten()
        rows = (torch.arange(len(alive))[order, None] * m**2 + torch.arange(m**2)).flatten()
        out = hidden.clone()
        out[rows] = block(hidden[rows], cu_seqlens=cu, position_embeddings=(cos[patch], sin[patch]))
        kept = survivors(alive, b, 4)
        rows = (torch.searchsorted(alive, kept)[:, None] * m**2 + torch.arange(m**2)).flatten()
        hidden, alive = out[rows], kept
    return alive, visual.merger(hidden)


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_windows_dropped_inside_the_encoder_equal_the_stock_blocks_run_without_them(version, pictures):
    """After each block of a 3-block encoder (Qwen2.5-VL: the first two windowed) a test method drops whole merge
    windows: the tokens that leave it equal the stock blocks and merger run on the packed sequence with those
    windows removed (two images of one grid encoded together, two of others), and the logits equal the stock
    language model with the dropped windows' image tokens masked from layer 0 on."""
    model, processor = mv.testing.tiny_qwen2_vl(seed=4, version=version, vision_depth=3)
    imgs = [pictures[0], pictures[3].resize((48, 32)), pictures[1], pictures[2].resize((48, 48))]  # 3 x 3: 4 windows
    inputs = processor(images=imgs, text=["<image> <image> what is it ?", "<image> and <image> ?"])
    target = adapt(model)
    with torch.no_grad():
        tokens = target.encode_expert(0, {k: inputs[k] for k in ("pixel_values", "image_grid_thw")}, DropWindows(4))
        starts = [0, *inputs["image_grid_thw"].prod(-1).cumsum(0).tolist()]
        visual, embeds_at = model.model.visual, {}
        is_img = inputs["input_ids"] == model.config.image_token_id
        ib, it = is_img.nonzero(as_tuple=True)
        first = 0
        for i, g in enumerate(inputs["image_grid_thw"].tolist()):
            alive, want = stock_blocks_without(visual, inputs["pixel_values"][starts[i]:starts[i + 1]], g)
            got = tokens.features[i][tokens.mask[i]]
            assert tokens.grid_index[i][tokens.mask[i]].tolist() == alive.tolist()
            assert 0 < len(alive) < g[1] * g[2] // 4
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            for w, feat in zip(alive.tolist(), want):
                embeds_at[(int(ib[first + w]), int(it[first + w]))] = feat
            first += g[1] * g[2] // 4
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        for (r, c), feat in embeds_at.items():
            embeds[r, c] = feat
        drop = [[c for c in is_img[r].nonzero()[:, 0].tolist() if (r, c) not in embeds_at] for r in range(2)]
        positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                  inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
        want = masked_decoder_logits(model.model.language_model, model.lm_head, embeds, inputs["attention_mask"].bool(),
                                     drop, 0, positions=positions)
        got = logits(model, inputs, DropWindows(4))
    text = inputs["attention_mask"].bool() & ~is_img
    torch.testing.assert_close(got[text], want[text], atol=1e-5, rtol=1e-5)


def test_windowed_blocks_attend_within_their_windows_with_a_per_token_bias():
    """Qwen2.5-VL's windowed block attends in one padded batch of windows: the same as one dense SDPA with keys
    outside a query's window masked and the proportional bias added, on two images that kept different windows
    (uneven windows) and on whole ones (no padding)."""
    from meteor_vlm.models.qwen2_vl import Qwen2VLRunner

    model, _ = mv.testing.tiny_qwen2_vl(seed=1, version="2.5", vision_depth=3)
    runner = Qwen2VLRunner(model.model.visual, adapt(model).runners[0].spec, (1, 12, 12))  # 6 x 6 windows
    g = torch.Generator().manual_seed(0)
    for grid in (torch.tensor([[0, 1, 4, 7, 8, 20, 33], [2, 3, 9, 14, 15, 27, 35]]), torch.arange(36).expand(2, 36)):
        L = grid.shape[1] * 4
        q, k, v = (torch.randn(2, 4, L, 8, generator=g) for _ in range(3))
        bias = torch.rand(2, grid.shape[1], generator=g).log()
        groups = runner.attention_groups(0, grid)
        assert runner.attention_groups(2, grid) is None and len(set(groups[0].tolist())) > 2
        same = groups[:, :, None] == groups[:, None, :]
        dense = bias.repeat_interleave(4, 1)[:, None, None, :].masked_fill(~same[:, None], float("-inf"))
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=runner.blocks[0].attn.scaling)
        torch.testing.assert_close(runner._attend(0, q, k, v, bias, grid), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("block", [0, 1], ids=["windowed-in-2.5", "full"])
def test_proportional_attention_makes_a_merged_window_act_as_its_duplicates(qwen, block):
    """A block run with one window present three times (at its own grid position) equals, for every window, the
    block run on one copy with log(3) added to the attention logits of its four patches."""
    from meteor_vlm.models.qwen2_vl import Qwen2VLRunner

    model, _ = qwen
    runner = Qwen2VLRunner(model.model.visual, adapt(model).runners[0].spec, (1, 8, 8))  # 4 x 4 windows
    grid = torch.tensor([[0, 1, 5, 6, 10], [2, 3, 4, 9, 15]])
    x = torch.randn(2, 5, runner.window * runner.module.patch_embed.embed_dim, generator=torch.Generator().manual_seed(1))
    dup, dup_grid = torch.cat([x, x[:, 1:2].expand(-1, 2, -1)], 1), torch.cat([grid, grid[:, 1:2].expand(-1, 2)], 1)
    size = torch.ones(2, 5)
    size[:, 1] = 3
    with torch.no_grad():
        full = runner.run_block(block, dup, None, dup_grid)
        merged, plain = runner.run_block(block, x, size.log(), grid), runner.run_block(block, x, None, grid)
    torch.testing.assert_close(merged, full[:, :5], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, full[:, :5], atol=1e-3)


@pytest.mark.parametrize("keep", [0.5, 0.3])
def test_meteor_stage1_keeps_its_share_of_each_images_own_windows(qwen, pictures, keep):
    """Images of different grids in one batch: each keeps round(keep * its windows) after METEOR's stage 1."""
    model, processor = qwen
    inputs = qwen_inputs(processor, pictures)
    method = mv.Meteor.preset("stage1", encoder_keep=keep)
    logits(model, inputs, method)
    counts = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    kept = [len(tile["vision"]) for s in method.stats for tile in s["kept_grid"]]
    assert kept == [max(1, round(keep * n)) for n in counts] and len(set(counts)) > 1


def test_given_multimodal_position_ids_are_read_as_transformers_passes_them(qwen, pictures):
    """position_ids given as (3, B, T) (what the stock model computes) give the same logits as none given."""
    model, processor = qwen
    inputs = qwen_inputs(processor, pictures)
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                              attention_mask=inputs["attention_mask"])
    method = mv.FastV(layer=2, ratio=0.5)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits(model, inputs, method, position_ids=positions)[real], logits(model, inputs, method)[real],
                               atol=1e-5, rtol=0)


TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
            "<|vision_end|> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
            "{% if add_generation_prompt %} a{% endif %}")


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_meteor_ask_and_speed_run_a_qwen2_vl_checkpoint_folder(tmp_path, capsys, version):
    """A transformers Qwen2-VL / Qwen2.5-VL checkpoint folder (saved model, tokenizer, image processor, chat
    template) runs under `meteor ask` (the answer greedy generate gives on the chat template's prompt under
    the same method, a heatmap on the merged grid) and `meteor speed` (its prompts in the chat template too),
    with the processor read back from the folder giving the same inputs; ToMe merges windows inside its encoder."""
    from meteor_vlm.cli import main
    from meteor_vlm.models.qwen2_vl import Qwen2VLImageTextProcessor

    model, processor = mv.testing.tiny_qwen2_vl(seed=3, version=version)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    Qwen2VLImageTextProcessor(processor.image_processor, processor.tokenizer, TEMPLATE).save_pretrained(ckpt)
    loaded = Qwen2VLImageTextProcessor.from_pretrained(ckpt)
    picture = mv.testing.random_images(1, seed=9)[0].resize((48, 32))
    picture.save(tmp_path / "img.png")
    prompt = loaded.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                      {"type": "text", "text": "what is in the image ?"}]}])
    assert prompt == "<|vision_start|><|image_pad|><|vision_end|> what is in the image ? a"
    inputs = loaded(images=[picture], text=[prompt])
    mine = processor(images=[picture], text=["<image> what is in the image ? a"])
    assert inputs.keys() == mine.keys() and all(torch.equal(inputs[k], mine[k]) for k in inputs)
    assert int(inputs["mm_token_type_ids"].sum()) == 6  # 48 x 32 px: 6 x 4 patches of 8 px, 2 x 2 merged
    heat = tmp_path / "heat.png"
    assert main(["ask", str(tmp_path / "img.png"), "what is in the image ?", "--model", str(ckpt), "--method",
                 "fastv:k1-r0.5", "--max-new-tokens", "3", "--heatmap", str(heat)]) == 0
    out = capsys.readouterr().out
    with mv.FastV(layer=1, ratio=0.5)(model), torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    answer = processor.decode(want[0, inputs["input_ids"].shape[1]:]).strip()
    assert f"answer: {answer}\n" in out and "visual tokens: 6 from the experts" in out
    assert heat.is_file()
    from meteor_vlm.bench.speed import _prompts

    timed = _prompts(loaded, mv.synth.make_split(seed=1, per_family=1, image_size=64)[:2])["input_ids"]
    assert timed[:, -1].tolist() == [loaded.tokenizer.convert_tokens_to_ids("a")] * 2  # the chat template's turn end
    assert main(["speed", "--model", str(ckpt), "--samples", "1", "--new-tokens", "2", "--methods",
                 "unpruned,fastv:k1-r0.5"]) == 0
    assert "fastv:k1-r0.5" in capsys.readouterr().out
    assert main(["ask", str(tmp_path / "img.png"), "what ?", "--model", str(ckpt), "--method", "tome:keep0.5",
                 "--heatmap", str(heat)]) == 0
    assert "stage 1 (in the experts): 3" in capsys.readouterr().out
    with pytest.raises(ValueError, match=re.escape("hold 1 <|image_pad|> tokens for 2 images")):
        loaded(images=[picture, picture], text=[prompt])
