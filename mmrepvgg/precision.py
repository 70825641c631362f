"""What "fp32" means for fp32 tensors: IEEE arithmetic, or on request TF32 (CUDA) / bf16
(CPU) products, switched for a block of code and switched back after.

torch 2.14 runs cuDNN convolutions in TF32 by default, so a comparison meant to show fp32
rounding (fusion probes, export parity, a benchmark's fp32 reference) runs inside
``fp32_math(device, 'fp32')``. Only torch's current ``fp32_precision`` settings are used:
torch refuses to answer its legacy getters (``allow_tf32``,
``get_float32_matmul_precision()``) once those settings were mixed with the legacy API.
"""
import contextlib

import torch
from torch import nn

__all__ = ['fp32_math', 'fp32_math_flags', 'ieee_fp32']


def fp32_math_flags(device: torch.device) -> list:
    """The switches of reduced-precision arithmetic on fp32 tensors, new API only (torch
    refuses to mix it with the legacy ``allow_tf32`` flags)."""
    b = torch.backends
    if device.type == 'cuda':
        owners = [getattr(b.cudnn, 'conv', None), getattr(b.cuda, 'matmul', None)]
    else:
        owners = [getattr(b.mkldnn, 'conv', None), getattr(b.mkldnn, 'matmul', None)]
    return [o for o in owners if o is not None and hasattr(o, 'fp32_precision')]


@contextlib.contextmanager
def fp32_math(device: torch.device, precision: str):
    """Within: IEEE fp32 arithmetic for fp32 tensors, or for ``precision='tf32'`` TF32
    (CUDA) / bf16 (CPU) products. The previous settings come back on exit."""
    device = torch.device(device)
    fast = 'tf32' if device.type == 'cuda' else 'bf16'
    want = fast if precision == 'tf32' else 'ieee'
    owners = fp32_math_flags(device)
    legacy = None
    if not owners and device.type == 'cuda':  # torch without the fp32_precision API
        legacy = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = (
            precision == 'tf32')
    elif not owners and precision == 'tf32':
        raise ValueError('precision tf32 on CPU needs torch.backends.mkldnn.conv.'
                         'fp32_precision (torch >= 2.9)')
    old = [o.fp32_precision for o in owners]
    try:
        for o in owners:
            o.fp32_precision = want
        yield
    finally:
        for o, value in zip(owners, old):
            o.fp32_precision = value
        if legacy is not None:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = legacy


def ieee_fp32(module: nn.Module):
    """IEEE fp32 arithmetic on the device ``module``'s weights live on."""
    param = next(module.parameters(), None)
    return fp32_math(param.device if param is not None else torch.device('cpu'), 'fp32')
