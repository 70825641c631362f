"""Numbers the checks rely on: what "fp32" means for fp32 tensors (IEEE arithmetic, or
on request TF32 (CUDA) / bf16 (CPU) products, switched for a block of code and back), the
precisions a model can run in, and the one way two model outputs are compared.

torch 2.14 runs cuDNN convolutions in TF32 by default, so a comparison meant to show fp32
rounding (fusion probes, export parity, a benchmark's fp32 reference) runs inside
``fp32_math(device, 'fp32')``. Only torch's current ``fp32_precision`` settings are used:
torch refuses to answer its legacy getters (``allow_tf32``,
``get_float32_matmul_precision()``) once those settings were mixed with the legacy API.
"""
import contextlib
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = ['PRECISIONS', 'fp32_math', 'fp32_math_flags', 'ieee_fp32', 'flatten_outputs',
           'output_error', 'OutputError']


#: The arithmetic a model can run in, the one meaning of "precision" across the package
#: (exported backends run a subset of it: mmrepvgg.deploy.backends.BACKEND_PRECISIONS).
#: ``fp32``: fp32 tensors and IEEE fp32 arithmetic (TF32 is switched off on CUDA, where
#: PyTorch enables it for convs by default). ``tf32``: fp32 tensors, convs and matmuls
#: multiplying in reduced precision: TF32 on CUDA, bf16 on CPU (oneDNN's fpmath mode, AMX
#: where the CPU has it). ``fp16`` / ``bf16`` cast model and input. ``amp`` is autocast
#: (fp16 on CUDA, bf16 on CPU) with fp32 weights.
PRECISIONS = ('fp32', 'tf32', 'fp16', 'bf16', 'amp')


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


def flatten_outputs(output: Any) -> list:
    """Every tensor in a model's output (tensors, lists, tuples, dicts, mmengine data
    elements), in a fixed order, so two models' outputs can be compared."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in flatten_outputs(item)]
    if isinstance(output, dict):
        return [t for key in sorted(output) for t in flatten_outputs(output[key])]
    if hasattr(output, 'to_dict'):  # mmengine data elements
        return flatten_outputs(output.to_dict())
    return []


class OutputError(NamedTuple):
    """How far one model output is from another: ``max_abs`` is max |output -
    reference| and ``scale`` max |reference|, over every tensor, in float64."""
    max_abs: float
    scale: float

    @property
    def relative(self) -> float:
        """``max_abs`` over the output scale (0 for an all-zero reference)."""
        return self.max_abs / self.scale if self.scale else 0.0


@torch.no_grad()
def output_error(output: Any, reference: Any) -> OutputError:
    """The one comparison of two model outputs (any nesting ``flatten_outputs`` reads,
    on any device): an :class:`OutputError`. Outputs that hold different numbers of
    tensors, or tensors of different shapes, are a ValueError."""
    out, ref = flatten_outputs(output), flatten_outputs(reference)
    if len(out) != len(ref) or not ref:
        raise ValueError(f'outputs hold {len(out)} and {len(ref)} tensors; '
                         'need the same number, at least one')
    for a, b in zip(out, ref):
        if a.shape != b.shape:
            raise ValueError(f'output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}')
    diff = max((a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()
               for a, b in zip(out, ref))
    scale = max(b.detach().cpu().double().abs().max().item() for b in ref)
    return OutputError(diff, scale)
