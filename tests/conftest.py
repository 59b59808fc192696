import pytest
import torch

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


def make_inputs(processor, images, prompts):
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)
