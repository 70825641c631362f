import os

import pytest


def pytest_configure(config):
    # Under pytest-xdist every worker is a process of its own: one torch thread each, so
    # the workers share the cores instead of each spreading over all of them.
    # MMREPVGG_TEST_THREADS sets another count (make test-isa runs the workers at 2 while
    # the processes they start run at 1: the numbers must not depend on either).
    threads = os.environ.get('MMREPVGG_TEST_THREADS')
    if threads or os.environ.get('PYTEST_XDIST_WORKER'):
        import torch
        torch.set_num_threads(int(threads or 1))


#: What pins the arithmetic a CPU runs (see Makefile's test-isa): the instruction sets
#: oneDNN and ATen may use, the Winograd op's vector width, the thread count. A test that
#: starts a process to compare its numbers with its own passes these on.
CPU_CLASS_VARIABLES = ('DNNL_MAX_CPU_ISA', 'ONEDNN_MAX_CPU_ISA', 'ATEN_CPU_CAPABILITY',
                       'MMREPVGG_WINOGRAD_VECTOR_WIDTH', 'OMP_NUM_THREADS')


#: Files a test wrote that are larger than this are deleted when it ends.
LARGE_OUTPUT_BYTES = 1 << 20


@pytest.fixture(autouse=True)
def drop_large_outputs(request):
    """Delete the checkpoints and exported models a test wrote into its ``tmp_path`` once
    it ends. Full-size models make files of hundreds of MB, and a session that kept them
    all would fill a small disk (18 GB at the last count); the small files (configs,
    logs) stay, as mmengine's global visualizer and logger may still refer to them."""
    yield
    path = request.node.funcargs.get('tmp_path')
    if path is None:
        return
    for root, _, files in os.walk(path):
        for name in files:
            file = os.path.join(root, name)
            try:
                if not os.path.islink(file) and os.path.getsize(file) > LARGE_OUTPUT_BYTES:
                    os.remove(file)
            except OSError:  # already gone, or held open: leave it
                pass


@pytest.fixture
def cpu_class_env():
    """The variables of CPU_CLASS_VARIABLES this process runs under."""
    return {k: os.environ[k] for k in CPU_CLASS_VARIABLES if k in os.environ}


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
    from helpers import train_seg
    return train_seg(mini_root, tmp_path_factory)


@pytest.fixture(scope='session')
def det(mini_root, tmp_path_factory):
    """Faster R-CNN RepVGG-A0 after one training iteration."""
    from helpers import train_det
    return train_det(mini_root, tmp_path_factory)


@pytest.fixture(scope='session')
def qat(seg, tmp_path_factory):
    """A two-iteration QAT fine-tune of ``seg``'s checkpoint, and its INT8 ONNX file."""
    from helpers import train_qat
    return train_qat(seg, tmp_path_factory)
