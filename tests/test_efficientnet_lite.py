"""EfficientNet-Lite0's trunk: shapes, the expert runner, and its ImageNet weights."""

import pytest
import torch

import meteor_vlm as mv
from meteor_vlm.models import efficientnet_lite as lite
from meteor_vlm.models.experts import ExpertSpec, build_expert, runner_for


@pytest.mark.parametrize("blocks,stride,channels", [(1, 2, 16), (5, 8, 40), (11, 16, 112), (16, 32, 320)])
def test_trunk_stride_and_width_follow_the_block_table(blocks, stride, channels):
    spec = ExpertSpec("cnn", "efficientnet_lite", 64, dict(num_blocks=blocks))
    model = build_expert(spec).eval()
    runner = runner_for(model, spec)
    with torch.no_grad():
        fmap = model(torch.randn(2, 3, 64, 64))
        tokens = runner.finalize(runner.embed(torch.randn(2, 3, 64, 64)))
    assert fmap.shape == (2, channels, 64 // stride, 64 // stride)
    assert runner.grid() == (64 // stride,) * 2 and tokens.shape == (2, (64 // stride) ** 2, runner.out_dim)
    with pytest.raises(ValueError, match="num_blocks"):
        lite.EfficientNetLiteConfig(num_blocks=17)


def test_tokens_are_the_feature_map_in_row_major_order():
    """Token r * cols + c of the runner is the feature map's cell (r, c): pruning keeps the grid's meaning."""
    spec = ExpertSpec("cnn", "efficientnet_lite", 64, dict(num_blocks=5))
    model = build_expert(spec).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fmap, tokens = model(x)[0], runner_for(model, spec).embed(x)[0]
    for r, c in [(0, 0), (0, 7), (3, 5), (7, 7)]:
        torch.testing.assert_close(tokens[r * 8 + c], fmap[:, r, c])


def test_imagenet_weights_load_into_every_tensor_and_survive_a_vlm_round_trip(tmp_path):
    pytest.importorskip(lite.WEIGHTS_PACKAGE.replace("-", "_"))  # installed by the test extra
    state = torch.load(lite.lite0_weights_path(), map_location="cpu", weights_only=True)
    model = lite.load_lite0_imagenet(lite.EfficientNetLiteModel(lite.EfficientNetLiteConfig(num_blocks=16)))
    mine = model.state_dict()
    used = [k for k in state if not k.startswith(("_conv_head", "_bn1", "_fc"))]  # the head is not built
    assert len(used) == len(mine)
    for k in used:  # every stored tensor landed in the parameter of the same role
        torch.testing.assert_close(mine[".".join(p.lstrip("_") for p in k.split("."))], state[k])
    # A truncated trunk takes its share; a model built from config keeps what was loaded after save/load.
    cfg = mv.testing.tiny_config(experts=("clip", "efficientnet_lite"), num_layers=2)
    vlm = mv.MultiEncoderVLM(cfg)
    lite.load_lite0_imagenet(vlm.experts[1])
    vlm.save_pretrained(tmp_path)
    again = mv.MultiEncoderVLM.from_pretrained(tmp_path)
    torch.testing.assert_close(again.experts[1].blocks[4].project_conv.weight, state["_blocks.4._project_conv.weight"])


def test_running_statistics_catch_up_with_training():
    """Batch norm's running statistics must follow the batches within tens of steps, or a trunk trained
    briefly sees different features at inference (with TF's momentum 0.01 a fresh trunk's inference
    tokens were useless after 300 steps). After 150 training-mode passes over one batch, inference mode
    gives what training mode gives (momentum 0.01 leaves ~20% of the initial statistics: error ~1)."""
    torch.manual_seed(0)
    model = lite.EfficientNetLiteModel(lite.EfficientNetLiteConfig(num_blocks=5))
    x = torch.randn(8, 3, 32, 32) * 0.5 + 0.3
    model.train()
    with torch.no_grad():
        for _ in range(150):
            batch_stats = model(x)
        model.eval()
        running = model(x)
    err = (running - batch_stats).norm() / batch_stats.norm()
    assert err < 0.05, float(err)
