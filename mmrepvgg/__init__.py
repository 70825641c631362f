"""mmrepvgg: RepVGG backbones with structural re-parameterization for OpenMMLab."""
import torch

from .version import __version__

# compat.py's allowlist needs (function, name) safe-global entries, new in torch 2.6.
if torch.__version__ < '2.6':
    raise ImportError(f'mmrepvgg needs torch >= 2.6, found torch {torch.__version__}; '
                      'install a newer torch build (CPU or CUDA) first')
from .compat import allow_mmengine_checkpoint_types  # noqa: E402
from .fetch import load_file  # noqa: E402
from .registry import HOOKS, MODELS  # noqa: E402  registries before the modules
from .models import QARepVGGBlock, RepVGG, RepVGGBlock  # noqa: E402
from .reparam import reparameterize  # noqa: E402
from .engine import ReparamHook  # noqa: E402

# Runner checkpoints (message hub: HistoryBuffer, numpy scalars) must load under
# torch's weights_only default in test and resume; allow exactly their types.
allow_mmengine_checkpoint_types()

__all__ = ['__version__', 'HOOKS', 'MODELS', 'QARepVGGBlock', 'RepVGG', 'RepVGGBlock',
           'ReparamHook', 'load_file',
           'reparameterize', 'allow_mmengine_checkpoint_types']
