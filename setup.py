import os
import os.path as osp
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = osp.dirname(osp.abspath(__file__))
PACKAGE = 'mmrepvgg'

# What the package carries under mmrepvgg/.mim, as OpenMMLab packages do: the repository's
# folder (the source, edited here) -> its place under .mim. The configs go into a folder
# of their own, as mmengine's `mmrepvgg::<folder>/<name>.py` wants one; their relative
# `_base_` paths (./_base_/...) resolve the same there.
MIM_FOLDERS = {'configs': 'configs/repvgg', 'tools': 'tools'}
# mmengine reads .mim/model-index.yml (the index of a package's model metafiles) before it
# falls back to .mim/configs/<path> for a `pkg::` config, and fails if the file is absent.
# No config here has a metafile (no released weights): the index imports none.
MODEL_INDEX = ('# The index of model metafiles that mmengine and mim read; the configs '
               'have none.\nImport: []\n')
_SKIP = shutil.ignore_patterns('__pycache__', '*.pyc')


def read_version():
    namespace = {}
    with open(osp.join(HERE, PACKAGE, 'version.py')) as f:
        exec(f.read(), namespace)
    return namespace['__version__']


def _remove(path):
    if osp.islink(path) or osp.isfile(path):
        os.remove(path)
    elif osp.isdir(path):
        shutil.rmtree(path)


class BuildWithMim(build_py):
    """build_py, then the configs and tools under mmrepvgg/.mim: copied into the build
    (wheels, and wheels built from an sdist, whose MANIFEST.in carries the folders), or
    for an editable install linked in the checkout, so edits to configs/ and tools/ are
    what the installed package serves. The checkout's own mmrepvgg/.mim is never written
    by a wheel build."""

    def run(self):
        if not self.editable_mode:
            # from scratch: a module moved or deleted since the last build in this tree's
            # build/ must not ship again
            _remove(osp.join(self.build_lib, PACKAGE))
        super().run()
        if self.editable_mode:
            self._link_in_checkout()
        else:
            self._copy_into(osp.join(self.build_lib, PACKAGE, '.mim'))

    def _copy_into(self, mim):
        _remove(mim)
        for source, place in MIM_FOLDERS.items():
            shutil.copytree(osp.join(HERE, source), osp.join(mim, place), ignore=_SKIP)
        with open(osp.join(mim, 'model-index.yml'), 'w') as f:
            f.write(MODEL_INDEX)

    def _link_in_checkout(self):
        mim = osp.join(HERE, PACKAGE, '.mim')
        for source, place in MIM_FOLDERS.items():
            link = osp.join(mim, place)
            target = osp.relpath(osp.join(HERE, source), osp.dirname(link))
            if osp.islink(link) and os.readlink(link) == target:
                continue
            _remove(link)
            os.makedirs(osp.dirname(link), exist_ok=True)
            os.symlink(target, link)
        with open(osp.join(mim, 'model-index.yml'), 'w') as f:
            f.write(MODEL_INDEX)


DEPLOY = ['onnx>=1.16', 'onnxscript>=0.3', 'onnxruntime>=1.20', 'openvino>=2024.4',
          'nncf>=3.4,<3.5']

setup(
    name=PACKAGE,
    version=read_version(),
    description='RepVGG backbones with structural re-parameterization for '
                'OpenMMLab detection and segmentation',
    packages=find_packages(include=[PACKAGE, f'{PACKAGE}.*']),
    # the C++ Winograd kernel is compiled on the user's machine, from its source
    package_data={'mmrepvgg.ops': ['csrc/*.cpp', 'csrc/*.h'], 'mmrepvgg.testing': ['configs/*.py']},
    cmdclass={'build_py': BuildWithMim},
    # torch >= 2.6 alone would allow 3.9; the package uses Python 3.10 (zip(strict=True)),
    # and the torch, ONNX and OpenVINO releases it is tested with need 3.10 too.
    python_requires='>=3.10',
    install_requires=[
        # Users bring their own CUDA build of torch: a floor only. 2.6 is the first
        # torch whose safe-globals allowlist takes (function, name) entries, which the
        # weights-only loading of mmengine's runner checkpoints needs
        # (mmrepvgg/checkpoint/loading.py).
        'torch>=2.6',
        'mmengine>=0.10,<1',
        # mmdet 3.3 and mmseg 1.2 refuse mmcv >= 2.2 at import.
        'mmcv>=2.0.0rc4,<2.2',
    ],
    extras_require={
        'det': ['mmdet>=3.0,<3.4'],
        'seg': ['mmsegmentation>=1.0,<1.3'],
        # Only needed to read mmpretrain checkpoints' model zoo or use its classifiers;
        # the loader maps mmpretrain key layouts without importing it.
        'pretrain': ['mmpretrain>=1.0,<1.3'],
        # ONNX export (torch's torch.export-based exporter needs onnxscript), the CPU
        # backends tools/test.py --backend and tools/benchmark.py run, and NNCF for
        # quantization-aware fine-tuning (tools/train.py --qat).
        'deploy': DEPLOY,
        'all': ['mmdet>=3.0,<3.4', 'mmsegmentation>=1.0,<1.3', 'mmpretrain>=1.0,<1.3']
               + DEPLOY,
        'tests': ['pytest'],
    },
    zip_safe=False,
)
