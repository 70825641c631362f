"""mmrepvgg: RepVGG backbones with structural re-parameterization for OpenMMLab."""
from .version import __version__
from .compat import allow_mmengine_checkpoint_types
from .registry import HOOKS, MODELS  # registries before the modules that register
from .models import RepVGG, RepVGGBlock
from .reparam import reparameterize
from .engine import ReparamHook

# Runner checkpoints (message hub: HistoryBuffer, numpy scalars) must load under
# torch's weights_only default in test and resume; allow exactly their types.
allow_mmengine_checkpoint_types()

__all__ = ['__version__', 'HOOKS', 'MODELS', 'RepVGG', 'RepVGGBlock', 'ReparamHook',
           'reparameterize', 'allow_mmengine_checkpoint_types']
