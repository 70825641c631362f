"""Model-wide structural re-parameterization, and a check that it kept the outputs."""
import copy
from typing import Any, Callable, Optional

import torch
from mmengine.model import is_model_wrapper
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _can_fuse(module: nn.Module) -> bool:
    return callable(getattr(module, 'switch_to_deploy', None))


def fusable_modules(model: nn.Module) -> list:
    """Modules that fuse themselves (``switch_to_deploy``) and contain no other such
    module: the blocks, not the backbones that hold them."""
    found = [m for m in model.modules() if _can_fuse(m)]
    return [m for m in found if not any(_can_fuse(c) for c in m.modules() if c is not m)]


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fuse every re-parameterizable module anywhere in ``model``.

    Works on a backbone, a detector or segmentor, or one inside DDP or an EMA wrapper
    (``inplace=False`` copies the wrapped module and returns the fused copy). Any module
    with a ``switch_to_deploy()`` method is asked to fuse itself, innermost first, so
    blocks from other packages (e.g. mmpretrain's) are fused too. Idempotent. The model
    must be in eval mode: fusion folds batch-norm running statistics.
    """
    if not inplace:
        model = copy.deepcopy(model.module if is_model_wrapper(model) else model)
    leaves = fusable_modules(model)
    leaf_ids = {id(m) for m in leaves}
    # Innermost first: a backbone's own switch_to_deploy then only updates its flag.
    outer = [m for m in reversed(list(model.modules()))
             if _can_fuse(m) and id(m) not in leaf_ids]
    for module in leaves + outer:
        module.switch_to_deploy()
    return model


def count_unfused(model: nn.Module) -> int:
    """How many fusable blocks are still in training form."""
    return sum(not getattr(m, 'deploy', False) for m in fusable_modules(model))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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


@torch.no_grad()
def max_output_difference(reference: nn.Module, candidate: nn.Module, probe: torch.Tensor,
                          forward: Optional[Callable] = None) -> float:
    """Largest absolute difference between two models' outputs on ``probe``.

    ``forward(model, probe)`` can pick what to compare (e.g. a detector's backbone+neck);
    by default the models are called on the probe.
    """
    forward = forward or (lambda m, x: m(x))
    ref, out = flatten_outputs(forward(reference, probe)), flatten_outputs(forward(candidate, probe))
    if len(ref) != len(out) or not ref:
        raise ValueError(f'models gave {len(ref)} and {len(out)} output tensors on the probe')
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(ref, out))


@torch.no_grad()
def randomize_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial statistics and affine parameters, in place.

    For checking fusion: the default init (mean 0, var 1, weight 1, bias 0) makes the
    identity branch a plain copy and hides bugs. The ranges keep activations bounded
    through deep stacks.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(t, low, high):
        return (torch.rand(t.shape, generator=gen, dtype=torch.float64) * (high - low)
                + low).to(t.dtype)

    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.copy_(uniform(m.running_mean, -0.2, 0.2))
            m.running_var.copy_(uniform(m.running_var, 0.5, 1.5))
            if m.weight is not None:
                m.weight.copy_(uniform(m.weight, 0.3, 0.8))
                m.bias.copy_(uniform(m.bias, -0.2, 0.2))
    return model


def fusion_errors(model: nn.Module, probe: torch.Tensor) -> dict:
    """Fuse an eval-mode model in float32 and in float64 and measure both against the
    training form: max abs difference over max abs output (fp32), max abs (fp64)."""
    model = model.eval()
    reference = flatten_outputs(model(probe))
    scale = max(t.abs().max().item() for t in reference)
    fp32 = max_output_difference(model, reparameterize(model), probe) / scale
    model64 = copy.deepcopy(model).double()
    fp64 = max_output_difference(model64, reparameterize(model64), probe.double())
    return dict(fp32_relative=fp32, fp64_absolute=fp64)
