"""CPUAmpOptimWrapper: ``--amp`` on a machine without an accelerator.

mmengine 0.10's ``AmpOptimWrapper`` asserts CUDA, NPU, MLU or MUSA in ``__init__``, so no
setting of it trains on CPU. This subclass of the plain ``OptimWrapper`` adds only what
mixed precision needs there: the forward pass and the loss run under CPU autocast in
bfloat16. No loss scaler: bfloat16 keeps float32's 8-bit exponent, so gradients that
float32 represents do not underflow (float16's 5-bit exponent is why CUDA AMP scales).
"""
from contextlib import contextmanager

import torch
from mmengine.optim import OptimWrapper
from mmengine.runner.amp import autocast
from torch import nn

from ..registry import OPTIM_WRAPPERS


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose ``optim_context`` adds CPU bfloat16 autocast.

    Everything else (gradient accumulation, clipping, state dict) is ``OptimWrapper``'s,
    so a checkpoint holds the same optimizer state as a float32 run.
    """

    @contextmanager
    def optim_context(self, model: nn.Module):
        with super().optim_context(model), \
                autocast(device_type='cpu', dtype=torch.bfloat16):
            yield
