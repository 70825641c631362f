"""The stack imports, and OpenMMLab registries reach the plugin by its scoped names."""
import importlib

import pytest
import torch


@pytest.mark.parametrize('name', ['mmdet.models', 'mmseg.models', 'mmpretrain.models',
                                  'mmcv.ops'])
def test_stack_imports(name):
    importlib.import_module(name)


def test_torchvision_ops_load():
    from torchvision.ops import nms
    keep = nms(torch.tensor([[0., 0, 10, 10], [1, 1, 10, 10]]), torch.tensor([1., .9]), .5)
    assert keep.tolist() == [0]


@pytest.mark.parametrize('registry_module', ['mmdet.registry', 'mmseg.registry',
                                             'mmpretrain.registry'])
def test_scoped_name_builds_from_downstream_registry(registry_module):
    import mmrepvgg
    registry = importlib.import_module(registry_module)
    backbone = registry.MODELS.build(dict(type='mmrepvgg.RepVGG', arch='A0',
                                          out_indices=(3,)))
    assert isinstance(backbone, mmrepvgg.RepVGG)
    hook = registry.HOOKS.build(dict(type='mmrepvgg.ReparamHook'))
    assert isinstance(hook, mmrepvgg.ReparamHook)


def test_custom_imports_in_a_config(tmp_path):
    from mmengine.config import Config
    from mmseg.registry import MODELS
    cfg_file = tmp_path / 'cfg.py'
    cfg_file.write_text(
        "custom_imports = dict(imports=['mmrepvgg'], allow_failed_imports=False)\n"
        "backbone = dict(type='mmrepvgg.RepVGG', arch='B0', out_indices=(2, 3))\n")
    cfg = Config.fromfile(str(cfg_file))
    model = MODELS.build(cfg.backbone)
    assert model.out_channels == (256, 1280)


def test_plugin_registries_are_children_of_mmengine_roots():
    from mmengine.registry import HOOKS, MODELS

    import mmrepvgg
    assert mmrepvgg.MODELS.parent is MODELS and mmrepvgg.MODELS.scope == 'mmrepvgg'
    assert mmrepvgg.HOOKS.parent is HOOKS


def test_older_torch_is_refused_with_the_floor_named():
    import subprocess
    import sys
    code = ('import torch; from torch.torch_version import TorchVersion; '
            "torch.__version__ = TorchVersion('2.5.1'); import mmrepvgg")
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert 'mmrepvgg needs torch >= 2.6, found torch 2.5.1' in proc.stderr
