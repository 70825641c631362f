"""Model-wide structural re-parameterization, and a check that it kept the outputs."""
import copy
import math
from typing import Any, Callable, Optional

import torch
from mmengine.model import is_model_wrapper
from torch import nn

from .models.fusion import is_batch_norm
from .numerics import ieee_fp32, output_error


def _can_fuse(module: nn.Module) -> bool:
    return callable(getattr(module, 'switch_to_deploy', None))


def fusable_modules(model: nn.Module) -> list:
    """Modules that fuse themselves (``switch_to_deploy``) and contain no other such
    module: the blocks, not the backbones that hold them."""
    found = [m for m in model.modules() if _can_fuse(m)]
    return [m for m in found if not any(_can_fuse(c) for c in m.modules() if c is not m)]


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that shares its process groups: mmcv's SyncBatchNorm
    holds one, which cannot be copied (a fused or float64 copy never syncs anyway)."""
    groups = {id(m.group): m.group for m in module.modules()
              if is_batch_norm(m) and getattr(m, 'group', None) is not None}
    return copy.deepcopy(module, memo=groups)


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fuse every re-parameterizable module anywhere in ``model``.

    Works on a backbone, a detector or segmentor, or one inside DDP or an EMA wrapper
    (``inplace=False`` copies the wrapped module and returns the fused copy). Any module
    with a ``switch_to_deploy()`` method is asked to fuse itself, innermost first, so
    blocks from other packages (e.g. mmpretrain's) are fused too. Idempotent. The model
    must be in eval mode: fusion folds batch-norm running statistics.
    """
    if not inplace:
        model = copy_module(model.module if is_model_wrapper(model) else model)
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


@torch.no_grad()
def max_output_difference(reference: nn.Module, candidate: nn.Module, probe: torch.Tensor,
                          forward: Optional[Callable] = None) -> float:
    """Largest absolute difference between two models' outputs on ``probe``.

    ``forward(model, probe)`` can pick what to compare (e.g. a detector's backbone+neck);
    by default the models are called on the probe.
    """
    forward = forward or (lambda m, x: m(x))
    with ieee_fp32(reference):  # a TF32 default would hide a fusion error
        return output_error(forward(candidate, probe), forward(reference, probe))[0]


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
        if is_batch_norm(m):
            m.running_mean.copy_(uniform(m.running_mean, -0.2, 0.2))
            m.running_var.copy_(uniform(m.running_var, 0.5, 1.5))
            if m.weight is not None:
                m.weight.copy_(uniform(m.weight, 0.3, 0.8))
                m.bias.copy_(uniform(m.bias, -0.2, 0.2))
    return model


#: How much error fusion itself may add, as a multiple of the training form's own fp32
#: rounding error (both against an fp64 reference). Fusion rounds each folded kernel
#: and bias to fp32 once (half an ulp per weight), which moves the outputs by less than
#: the training form's fp32 arithmetic does (0.04-0.3x for every variant, 32 and 64 px
#: probes, tools/check_fusion.py); a wrong fusion is off by orders of magnitude more.
FUSION_MARGIN = 4.0
#: The least any fp32 result can be held to: this many fp32 epsilons of the largest
#: reference output (an fp32 result carries at least half an ulp of rounding, and a
#: network whose training form happens to round exactly, e.g. a tiny one, still gives
#: its fused form a few ulps).
FLOOR_EPS = 4.0
#: fp64 fused vs fp64 training form, absolute: fusion in fp64 leaves only fp64 rounding
#: (~1e-15 here); an algebraic mistake shows as 1e-8 or more.
FP64_FUSION_TOLERANCE = 1e-10


def rounding_bound(own_error: float, scale: float, factor: float = FUSION_MARGIN) -> float:
    """The error a second fp32 computation of the same function may show: ``factor``
    times ``own_error`` (a reference computation's fp32 error against fp64), and never
    less than ``FLOOR_EPS`` fp32 epsilons of ``scale`` (the largest output)."""
    return max(factor * own_error, FLOOR_EPS * torch.finfo(torch.float32).eps * scale)


def rounding_errors(candidate: Any, baseline: Any, reference: Any,
                    factor: float = FUSION_MARGIN) -> dict:
    """Compare two low-precision computations of one function with its fp64 output.

    ``baseline`` is the plain computation (e.g. the training form, a direct conv, eager
    mode), ``candidate`` the rewritten one, ``reference`` the fp64 output; any nesting
    ``flatten_outputs`` reads. Returns ``output_scale`` (largest reference output),
    ``baseline_abs`` and ``candidate_abs`` (max absolute errors against the reference),
    ``margin`` (candidate over baseline error; inf when only the baseline is exact),
    ``bound`` (``rounding_bound(baseline_abs, output_scale, factor)``) and ``within``
    (``candidate_abs <= bound``).
    """
    baseline_abs, scale = output_error(baseline, reference)
    candidate_abs, _ = output_error(candidate, reference)
    if baseline_abs > 0:
        margin = candidate_abs / baseline_abs
    else:
        margin = 0.0 if candidate_abs == 0 else math.inf
    bound = rounding_bound(baseline_abs, scale, factor)
    return dict(output_scale=scale, baseline_abs=baseline_abs, candidate_abs=candidate_abs,
                margin=margin, bound=bound, within=candidate_abs <= bound)


@torch.no_grad()
def fused_weight_errors(model: nn.Module, fused: nn.Module, probe: torch.Tensor,
                        forward: Optional[Callable] = None, reference: Any = None) -> dict:
    """How far the fp32 ``fused`` form of the fp32 eval-mode ``model`` moves its outputs
    on ``probe``, against a float64 copy of ``model`` (the reference). Returned (abs: max
    absolute difference from the reference):

    * ``output_scale``: the largest reference output;
    * ``train_fp32_abs``: ``model``'s own fp32 rounding error;
    * ``fused_fp32_abs``: the fused fp32 model's error, as deployed. Mostly its conv
      kernels' arithmetic rounding, which depends on the machine: the identity branch's
      term, added once at the end in the training form, sits inside a long fp32
      accumulation in the fused conv (3-14x the training form's error on an AMD EPYC);
    * ``fused_weights_abs``: the fused model's fp32 weights evaluated in fp64: the error
      fusion itself adds (folding rounds each kernel and bias to fp32), free of any
      kernel's arithmetic;
    * ``margin``: ``fused_weights_abs`` over ``train_fp32_abs`` (inf when only the
      training form is exact);
    * ``fp32_bound``: what ``fused_weights_abs`` may reach: ``rounding_bound`` of the
      training form's error (``FUSION_MARGIN`` times it, at least ``FLOOR_EPS`` fp32
      epsilons of the output scale); ``within``: it does.

    ``forward(model, x)`` picks what to compare (default ``model(x)``); ``reference``,
    the float64 copy's output, is computed unless given.
    """
    forward = forward or (lambda m, x: m(x))
    probe64 = probe.double()
    if reference is None:
        reference = forward(copy_module(model).double(), probe64)
    with ieee_fp32(model):  # fp32 rounding is the yardstick: not TF32's
        train = forward(model, probe)
        fused_fp32_abs, _ = output_error(forward(fused, probe), reference)
    weights = rounding_errors(forward(copy_module(fused).double(), probe64), train,
                              reference)
    return dict(output_scale=weights['output_scale'], train_fp32_abs=weights['baseline_abs'],
                fused_fp32_abs=fused_fp32_abs, fused_weights_abs=weights['candidate_abs'],
                margin=weights['margin'], fp32_bound=weights['bound'],
                within=weights['within'])


@torch.no_grad()
def fusion_errors(model: nn.Module, probe: torch.Tensor,
                  forward: Optional[Callable] = None,
                  fuse: Callable[[nn.Module], nn.Module] = reparameterize) -> dict:
    """Measure how exactly fusion keeps an eval-mode fp32 model's outputs on ``probe``.

    Everything ``fused_weight_errors`` returns for ``fuse(model)``, the absolute errors
    also relative to ``output_scale`` (``*_rel``), and:

    * ``fp64_abs``: the fusion done in fp64 (``fuse`` of a float64 copy) against the
      float64 training form: only fp64 rounding when the fusion is algebraically exact
      (``FP64_FUSION_TOLERANCE``);
    * ``exact``: both checks hold (``assert_fusion_exact`` says which did not).

    ``fuse(model)`` returns the fused copy (default ``reparameterize``); ``forward(model,
    x)`` picks what to compare (default ``model(x)``). ``model`` itself is not changed.
    """
    forward = forward or (lambda m, x: m(x))
    model = model.eval()
    model64, probe64 = copy_module(model).double(), probe.double()
    reference = forward(model64, probe64)
    errors = fused_weight_errors(model, fuse(model), probe, forward, reference)
    errors['fp64_abs'], _ = output_error(forward(fuse(model64), probe64), reference)
    scale = errors['output_scale']
    for name in ('train_fp32', 'fused_fp32', 'fused_weights'):
        error = errors[f'{name}_abs']  # all-zero outputs: only an exact result is not off
        errors[f'{name}_rel'] = error / scale if scale else (0.0 if error == 0 else math.inf)
    errors['exact'] = errors.pop('within') and errors['fp64_abs'] <= FP64_FUSION_TOLERANCE
    return errors


def assert_fusion_exact(errors: dict) -> None:
    """Raise ``AssertionError`` saying which check failed when ``fusion_errors`` did not
    find the fusion exact."""
    problems = []
    if not errors['fused_weights_abs'] <= errors['fp32_bound']:
        problems.append(
            f'the fused fp32 weights move the outputs by {errors["fused_weights_abs"]:.3e}, '
            f'more than {errors["fp32_bound"]:.3e} ({FUSION_MARGIN:g}x the training '
            f'form\'s own fp32 error {errors["train_fp32_abs"]:.3e}, at least '
            f'{FLOOR_EPS:g} fp32 eps of the output scale {errors["output_scale"]:.3e}); '
            f'margin {errors["margin"]:.2f}')
    if not errors['fp64_abs'] <= FP64_FUSION_TOLERANCE:
        problems.append(f'fused in fp64 the outputs move by {errors["fp64_abs"]:.3e} '
                        f'(> {FP64_FUSION_TOLERANCE:g}): the fusion is not exact algebra')
    if problems:
        raise AssertionError('; '.join(problems))


# ---------------------------------------------------------------- fusing and reporting
def _probe_target(model: nn.Module) -> nn.Module:
    """The part of a detector/segmentor/classifier whose outputs we compare on a probe."""
    return getattr(model, 'backbone', model)


def _probe_input(module: nn.Module, size: int, seed: int = 0) -> Optional[torch.Tensor]:
    first_conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        return None
    # A private generator: probing must not shift the run's own random stream (a
    # validation with fuse_val=True would otherwise change the next training batches).
    gen = torch.Generator().manual_seed(seed)
    probe = torch.randn(1, first_conv.in_channels, size, size, generator=gen)
    return probe.to(device=first_conv.weight.device, dtype=first_conv.weight.dtype)


def fuse_and_report(model: nn.Module, probe: bool = True, probe_size: int = 64) -> dict:
    """Fuse ``model`` in place (after switching it to eval) and say what changed.

    With ``probe``, the backbone's outputs on a random input are compared before and
    after: ``max_diff`` between the two fp32 forms, and (``fused_weight_errors``)
    whether the fused weights stay within fp32 rounding of a float64 reference.
    """
    model.eval()
    report = dict(blocks=count_unfused(model), params_before=count_parameters(model))
    target = _probe_target(model)
    reference = copy_module(target) if probe and report['blocks'] else None
    # Drawn before fusing: a fused block registers its conv last (after e.g. SE's), so
    # only the training form's first conv reliably reads the input.
    x = _probe_input(reference, probe_size) if reference is not None else None
    reparameterize(model, inplace=True)
    report['params_after'] = count_parameters(model)
    if x is not None:
        errors = fused_weight_errors(reference, target, x)
        report.update(max_diff=max_output_difference(reference, target, x),
                      fused_weights_error=errors['fused_weights_abs'],
                      own_error=errors['train_fp32_abs'], within_rounding=errors['within'])
    return report


def format_report(report: dict) -> str:
    if not report['blocks']:
        return 'nothing to fuse: the model has no re-parameterizable block in training form'
    text = (f"fused {report['blocks']} blocks; parameters {report['params_before']:,} -> "
            f"{report['params_after']:,}")
    if 'max_diff' in report:
        verdict = ('within fp32 rounding' if report['within_rounding'] else
                   'MORE than fp32 rounding explains')
        text += (f"; max output difference on a probe input {report['max_diff']:.3g}, "
                 f"{verdict} (from a float64 reference: fused weights "
                 f"{report['fused_weights_error']:.3g}, 3-branch fp32 {report['own_error']:.3g})")
    return text
