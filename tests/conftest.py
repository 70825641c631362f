import os
import sys

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo's tools/ are imported by some tests


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every batch norm non-trivial statistics and affine parameters.

    Default init (mean 0, var 1, weight 1, bias 0) makes the identity branch a plain copy
    and would hide fusion bugs; the ranges keep activations bounded through deep stacks.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(t, low, high):
        return (torch.rand(t.shape, generator=gen, dtype=torch.float64) * (high - low)
                + low).to(t.dtype)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.copy_(uniform(m.running_mean, -0.2, 0.2))
                m.running_var.copy_(uniform(m.running_var, 0.5, 1.5))
                if m.weight is not None:
                    m.weight.copy_(uniform(m.weight, 0.3, 0.8))
                    m.bias.copy_(uniform(m.bias, -0.2, 0.2))
    return model


@pytest.fixture
def randomize():
    return randomize_norms


@pytest.fixture(scope='session')
def mini_root(tmp_path_factory):
    """A folder holding data/mini_cityscapes and data/mini_coco as `--mini` expects them
    (relative to the working directory): run tools with this as cwd."""
    from tools.make_mini_data import make_cityscapes, make_coco
    root = tmp_path_factory.mktemp('mini')
    make_cityscapes(str(root / 'data' / 'mini_cityscapes'), num_train=4, num_val=2)
    make_coco(str(root / 'data' / 'mini_coco'), num_train=4, num_val=2)
    return root
