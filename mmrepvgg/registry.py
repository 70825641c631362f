"""The plugin's registries: children of mmengine's roots under the scope ``mmrepvgg``.

Being children of the roots is what lets an mmdet, mmseg or mmpretrain config reach our
modules as ``type='mmrepvgg.RepVGG'`` once ``custom_imports`` has imported the package.
"""
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmrepvgg',
                  locations=['mmrepvgg.models', 'mmrepvgg.qat'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='mmrepvgg',
                 locations=['mmrepvgg.engine'])
OPTIM_WRAPPERS = Registry('optim_wrapper', parent=MMENGINE_OPTIM_WRAPPERS,
                          scope='mmrepvgg', locations=['mmrepvgg.engine'])
