"""Whether an exported file computes what the torch module does: its runner against the
module on a probe, judged by fp32 rounding against a float64 reference."""
import torch
from torch import Tensor, nn

from ..numerics import flatten_outputs, ieee_fp32, output_error
from ..reparam import FUSION_MARGIN, copy_module, rounding_errors

__all__ = ['runner_parity']


@torch.no_grad()
def runner_parity(module: nn.Module, runner, probe: Tensor,
                  factor: float = FUSION_MARGIN) -> dict:
    """Run ``runner`` (a loaded ONNX file or package) on ``probe`` against ``module``.

    The reference is a float64 copy of ``module``; the runner's error against it must
    stay within ``factor`` times torch fp32's own error (at least a few fp32 epsilons of
    the output scale), as for fusion. Returns ``rounding_errors``' dict plus ``max_abs``
    and ``max_rel`` (runner vs torch fp32, absolute and over the output scale).
    """
    module.eval()  # not chained: some modules' train() returns None (mmdet's ResNet)
    with ieee_fp32(module):  # the fp32 baseline, not TF32
        torch_out = flatten_outputs(module(probe))
    reference = flatten_outputs(copy_module(module).double()(probe.double()))
    candidate = runner(probe)
    if len(candidate) != len(torch_out):
        raise ValueError(f'{runner.path} gives {len(candidate)} outputs, the module '
                         f'{len(torch_out)}')
    errors = rounding_errors(candidate, torch_out, reference, factor)
    against_fp32 = output_error(candidate, torch_out)
    errors['max_abs'], errors['max_rel'] = against_fp32.max_abs, against_fp32.relative
    return errors
