"""mmrepvgg: RepVGG backbones with structural re-parameterization for OpenMMLab.

Importing it registers the backbone, the blocks, ReparamHook and the CPU AMP optim
wrapper in the ``mmrepvgg`` scope. The public names below (and ``mmrepvgg.deploy``'s
``export_model`` / ``load_backend``, ``mmrepvgg.apis``'s ``train`` / ``test``) keep their
names across releases; docs/architecture.md says where everything else lives.
"""
import torch

from .version import __version__

# checkpoint/loading.py's allowlist needs (function, name) safe-global entries, new in
# torch 2.6.
if torch.__version__ < '2.6':
    raise ImportError(f'mmrepvgg needs torch >= 2.6, found torch {torch.__version__}; '
                      'install a newer torch build (CPU or CUDA) first')
from .checkpoint.fetch import load_file  # noqa: E402
from .checkpoint.loading import allow_mmengine_checkpoint_types  # noqa: E402
from .registry import HOOKS, MODELS  # noqa: E402  registries before the modules
from .models import QARepVGGBlock, RepVGG, RepVGGBlock  # noqa: E402
from .reparam import reparameterize  # noqa: E402
from .engine import ReparamHook  # noqa: E402

# Runner checkpoints (message hub: HistoryBuffer, numpy scalars) must load under
# torch's weights_only default in test and resume; allow exactly their types.
allow_mmengine_checkpoint_types()

__all__ = ['__version__', 'HOOKS', 'MODELS', 'QARepVGGBlock', 'RepVGG', 'RepVGGBlock',
           'ReparamHook', 'load_file', 'reparameterize', 'allow_mmengine_checkpoint_types']
