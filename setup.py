import os.path as osp

from setuptools import find_packages, setup


def read_version():
    namespace = {}
    with open(osp.join(osp.dirname(__file__), 'mmrepvgg', 'version.py')) as f:
        exec(f.read(), namespace)
    return namespace['__version__']


DEPLOY = ['onnx>=1.16', 'onnxscript>=0.3', 'onnxruntime>=1.20', 'openvino>=2024.4']

setup(
    name='mmrepvgg',
    version=read_version(),
    description='RepVGG backbones with structural re-parameterization for '
                'OpenMMLab detection and segmentation',
    packages=find_packages(include=['mmrepvgg', 'mmrepvgg.*']),
    # the C++ Winograd kernel is compiled on the user's machine, from its source
    package_data={'mmrepvgg.ops': ['csrc/*.cpp', 'csrc/*.h'], 'mmrepvgg.testing': ['configs/*.py']},
    python_requires='>=3.8',
    install_requires=[
        # Users bring their own CUDA build of torch: a floor only. 2.6 is the first
        # torch whose safe-globals allowlist takes (function, name) entries, which the
        # weights-only loading of mmengine's runner checkpoints needs (compat.py).
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
        # ONNX export (torch's torch.export-based exporter needs onnxscript) and the CPU
        # backends tools/test.py --backend and tools/benchmark.py run.
        'deploy': DEPLOY,
        'all': ['mmdet>=3.0,<3.4', 'mmsegmentation>=1.0,<1.3', 'mmpretrain>=1.0,<1.3']
               + DEPLOY,
        'tests': ['pytest'],
    },
    zip_safe=False,
)
