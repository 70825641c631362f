"""mmrepvgg: RepVGG backbones with structural re-parameterization for OpenMMLab.

Importing it registers the backbone, the blocks, ReparamHook, the CPU AMP optim wrapper
and the quantization-aware model (QATModel) in the ``mmrepvgg`` scope. The public names
below (and ``mmrepvgg.deploy``'s ``export_model`` / ``load_backend``, ``mmrepvgg.apis``'s
``train`` / ``test``) keep their names across releases; docs/architecture.md says where
everything else lives.
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
from .qat import QATModel  # noqa: E402

# Runner checkpoints (message hub: HistoryBuffer, numpy scalars) must load under
# torch's weights_only default in test and resume; allow exactly their types.
allow_mmengine_checkpoint_types()


def _serve_bundled_configs() -> None:
    """Let mmengine resolve ``mmrepvgg::repvgg/<name>.py`` (in ``_base_`` and
    ``mmengine.hub.get_config``) to the configs the package carries in ``.mim/configs``.

    mmengine 0.10 serves ``pkg::`` paths only for the keys of its ``MODULE2PACKAGE``, and
    finds the package's folder from the name it maps to: a pip distribution of that name
    is located through pip's metadata, which for an editable install points at
    site-packages rather than the checkout; a name no distribution has is located by
    importing it. ``mmrepvgg.version`` is such a name, so both kinds of install resolve
    to the folder this package was imported from.
    """
    from mmengine.config.utils import MODULE2PACKAGE
    MODULE2PACKAGE['mmrepvgg'] = 'mmrepvgg.version'


_serve_bundled_configs()

__all__ = ['__version__', 'HOOKS', 'MODELS', 'QARepVGGBlock', 'QATModel', 'RepVGG', 'RepVGGBlock',
           'ReparamHook', 'load_file', 'reparameterize', 'allow_mmengine_checkpoint_types']
