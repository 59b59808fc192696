import numpy as np
import pytest
import torch
from PIL import Image

import meteor_vlm as mv

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    """The default tiny model with a rank table from calibration on random images."""
    model, processor = mv.testing.tiny_model(seed=0)
    model.config.rank_table = mv.calibrate(model, processor, mv.testing.random_images(4, seed=1), progress=False)
    return model, processor


@pytest.fixture(scope="session")
def images():
    return mv.testing.random_images(6, seed=3)


# random pictures of four aspects: InternVL cuts them into 1, 3, 3 and 5 tiles; Idefics3 and SmolVLM into 2x2 + 1,
# 2 + 1, 2 + 1 and 2x2 + 1
TILE_SIZES = [(32, 32), (64, 32), (40, 90), (50, 50)]


@pytest.fixture(scope="session")
def tile_pictures():
    rng = np.random.default_rng(4)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in TILE_SIZES]


def make_inputs(processor, images, prompts):
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)
