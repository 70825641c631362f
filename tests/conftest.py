import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo's tools/ are imported by some tests


@pytest.fixture
def randomize():
    from mmrepvgg.reparam import randomize_norm_stats
    return randomize_norm_stats


@pytest.fixture(scope='session')
def mini_root(tmp_path_factory):
    """A folder holding data/mini_cityscapes and data/mini_coco as `--mini` expects them
    (relative to the working directory): run tools with this as cwd."""
    from tools.make_mini_data import make_cityscapes, make_coco
    root = tmp_path_factory.mktemp('mini')
    make_cityscapes(str(root / 'data' / 'mini_cityscapes'), num_train=4, num_val=2)
    make_coco(str(root / 'data' / 'mini_coco'), num_train=4, num_val=2)
    return root
