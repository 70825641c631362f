"""The stack imports, the plugin registers its modules when it is imported, and
OpenMMLab registries reach them by their scoped names."""
import importlib
import json
import subprocess
import sys

import pytest
import torch

# A config that names the plugin's backbone and imports the plugin for it.
PLUGIN_CONFIG = ("custom_imports = dict(imports=['mmrepvgg'], allow_failed_imports=False)\n"
                 "backbone = dict(type='mmrepvgg.RepVGG', arch='B0', out_indices=(2, 3))\n")

# In a fresh interpreter: the OpenMMLab stack imports without the plugin; then the plugin
# is imported the way a config gets it (its custom_imports, or mmengine importing
# `mmrepvgg.registry` for a scoped name it does not know yet), and the registries of
# mmdet, mmseg and mmpretrain resolve the plugin's names.
PLUGIN_IN_A_FRESH_PROCESS = """
import importlib, json, sys
for name in ('mmdet.models', 'mmseg.models', 'mmpretrain.models', 'mmcv.ops'):
    importlib.import_module(name)
out = dict(stack_imports_plugin='mmrepvgg' in sys.modules)
def registered():  # what the registries hold, without asking them for anything
    from mmrepvgg import registry
    return {r.name: sorted(r.module_dict) for r in
            (registry.MODELS, registry.HOOKS, registry.OPTIM_WRAPPERS)}
backbone = dict(type='mmrepvgg.RepVGG', arch='B0', out_indices=(2, 3))
if sys.argv[1] == 'custom_imports':
    from mmengine.config import Config
    cfg = Config.fromfile(sys.argv[2])
    out['config_imports_plugin'] = 'mmrepvgg' in sys.modules
    out['registered'] = registered()
    backbone = cfg.backbone
from mmseg.registry import MODELS
model = MODELS.build(backbone)
out.setdefault('registered', registered())
from mmrepvgg import registry
out['built'] = [type(model).__module__, type(model).__name__, list(model.out_channels)]
out['resolved'] = {}
for package in ('mmdet', 'mmseg', 'mmpretrain'):
    down = importlib.import_module(package + '.registry')
    for name, up in (('MODELS', registry.MODELS), ('HOOKS', registry.HOOKS),
                     ('OPTIM_WRAPPERS', registry.OPTIM_WRAPPERS)):
        for key, cls in up.module_dict.items():
            found = getattr(down, name).get('mmrepvgg.' + key)
            out['resolved'][package + ' ' + name + ' mmrepvgg.' + key] = found is cls
print(json.dumps(out))
"""


@pytest.mark.parametrize('how', ['custom_imports', 'scoped_name'])
def test_importing_the_plugin_registers_its_modules_for_the_stack(how, tmp_path):
    cfg_file = tmp_path / 'cfg.py'
    cfg_file.write_text(PLUGIN_CONFIG)
    proc = subprocess.run([sys.executable, '-c', PLUGIN_IN_A_FRESH_PROCESS, how,
                           str(cfg_file)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out['stack_imports_plugin'] is False
    if how == 'custom_imports':
        assert out['config_imports_plugin'] is True
    # importing mmrepvgg registered all of its modules (not only the one asked for)
    assert out['registered'] == {
        'model': ['QATModel', 'RepVGG'],
        'hook': ['LoadReadCheckpoint', 'ReparamHook', 'UseRecipe'],
        'optim_wrapper': ['CPUAmpOptimWrapper']}
    assert out['built'] == ['mmrepvgg.models.repvgg', 'RepVGG', [256, 1280]]
    assert len(out['resolved']) == 3 * 6 and all(out['resolved'].values()), out['resolved']


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
    cfg_file.write_text(PLUGIN_CONFIG)
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
