"""ReparamHook: evaluate the fused (deploy) form of a RepVGG model inside a runner."""
import copy
from typing import Optional

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from torch import nn

from ..registry import HOOKS
from ..reparam import (count_parameters, count_unfused, max_output_difference,
                       reparameterize)


def _probe_target(model: nn.Module) -> nn.Module:
    """The part of a detector/segmentor/classifier whose outputs we compare on a probe."""
    return getattr(model, 'backbone', model)


def _probe_input(module: nn.Module, size: int) -> Optional[torch.Tensor]:
    first_conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        return None
    return torch.randn(1, first_conv.in_channels, size, size,
                       device=first_conv.weight.device, dtype=first_conv.weight.dtype)


def fuse_and_report(model: nn.Module, probe: bool = True, probe_size: int = 64) -> dict:
    """Fuse ``model`` in place (after switching it to eval) and say what changed."""
    model.eval()
    report = dict(blocks=count_unfused(model), params_before=count_parameters(model))
    target = _probe_target(model)
    reference = copy.deepcopy(target) if probe and report['blocks'] else None
    reparameterize(model, inplace=True)
    report['params_after'] = count_parameters(model)
    if reference is not None:
        x = _probe_input(target, probe_size)
        report['max_diff'] = (max_output_difference(reference, target, x)
                              if x is not None else None)
    return report


def format_report(report: dict) -> str:
    if not report['blocks']:
        return 'nothing to fuse: the model has no re-parameterizable block in training form'
    text = (f"fused {report['blocks']} blocks; parameters {report['params_before']:,} -> "
            f"{report['params_after']:,}")
    if report.get('max_diff') is not None:
        text += f"; max output difference on a probe input {report['max_diff']:.3g}"
    return text


@HOOKS.register_module()
class ReparamHook(Hook):
    """Fuse RepVGG blocks for testing, never for training.

    ``before_test`` fuses the runner's model in place, after the checkpoint is loaded.
    With ``fuse_val=True``, each validation during training runs on a fused copy, so the
    3-branch weights keep training while metrics reflect the deploy model.

    Args:
        probe: compare backbone outputs before/after fusion on a random input and log it.
        probe_size: side of that square input.
        fuse_val: validate a fused copy during training.
    """

    priority = 'HIGH'  # fuse before other hooks (e.g. visualization) see the test model

    def __init__(self, probe: bool = True, probe_size: int = 64, fuse_val: bool = False):
        self.probe, self.probe_size, self.fuse_val = probe, probe_size, fuse_val
        self._training_model = None

    def _log(self, runner, message: str) -> None:
        runner.logger.info(f'ReparamHook: {message}')

    def before_test(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        report = fuse_and_report(model, self.probe, self.probe_size)
        if not report['blocks']:
            runner.logger.warning(f'ReparamHook: {format_report(report)}')
        else:
            self._log(runner, format_report(report))

    def before_val(self, runner) -> None:
        if not self.fuse_val:
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        fused = copy.deepcopy(model)
        report = fuse_and_report(fused, self.probe, self.probe_size)
        self._log(runner, f'validating a fused copy: {format_report(report)}')
        # The val loop calls runner.model.val_step; point it at the copy until
        # after_val_epoch.
        self._training_model, runner.model = runner.model, fused

    def after_val_epoch(self, runner, metrics=None) -> None:
        # Hand the training model back before lower-priority hooks act on the metrics:
        # CheckpointHook(save_best=...) saves runner.model here, and must save the
        # training form (with its optimizer state), not the fused copy.
        self._restore_training_model(runner)

    def after_val(self, runner) -> None:
        self._restore_training_model(runner)

    def _restore_training_model(self, runner) -> None:
        if self._training_model is not None:
            runner.model, self._training_model = self._training_model, None
