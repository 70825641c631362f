import os

import pytest


def pytest_configure(config):
    # Under pytest-xdist every worker is a process of its own: one torch thread each, so
    # the workers share the cores instead of each spreading over all of them.
    if os.environ.get('PYTEST_XDIST_WORKER'):
        import torch
        torch.set_num_threads(1)


@pytest.fixture
def randomize():
    from mmrepvgg.reparam import randomize_norm_stats
    return randomize_norm_stats


@pytest.fixture(scope='session')
def mini_root(tmp_path_factory):
    """A folder holding data/mini_cityscapes and data/mini_coco as `--mini` expects them
    (relative to the working directory): run tools with this as cwd."""
    from mmrepvgg.testing import make_cityscapes, make_coco
    root = tmp_path_factory.mktemp('mini')
    make_cityscapes(str(root / 'data' / 'mini_cityscapes'), num_train=4, num_val=2)
    make_coco(str(root / 'data' / 'mini_coco'), num_train=4, num_val=2)
    return root


# One training per task for the whole session: every test module that needs a trained
# checkpoint shares these (they only read the files; a test that writes copies them).
@pytest.fixture(scope='session')
def seg(mini_root, tmp_path_factory):
    """PSPNet RepVGG-A0 after one training iteration, and its fused conversion."""
    from test_tools import train_seg
    return train_seg(mini_root, tmp_path_factory)


@pytest.fixture(scope='session')
def det(mini_root, tmp_path_factory):
    """Faster R-CNN RepVGG-A0 after one training iteration."""
    from test_tools import train_det
    return train_det(mini_root, tmp_path_factory)
