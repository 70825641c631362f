"""ReparamHook: evaluate the fused (deploy) form of a RepVGG model inside a runner."""
from typing import List, Optional

from mmengine.hooks import Hook
from mmengine.model import BaseAveragedModel, is_model_wrapper

from ...registry import HOOKS
from ...reparam import copy_module, format_report, fuse_and_report, reparameterize


def _averaged_models(runner) -> List[BaseAveragedModel]:
    """The averaged copies kept by EMA-style hooks (mmengine's EMAHook and any hook that
    holds its average in ``ema_model``): they swap their weights into the model for
    validation and test, so they must be fused and read alongside it."""
    return [hook.ema_model for hook in getattr(runner, 'hooks', ())
            if isinstance(getattr(hook, 'ema_model', None), BaseAveragedModel)]


@HOOKS.register_module()
class ReparamHook(Hook):
    """Fuse RepVGG blocks for testing, never for training.

    ``before_test`` fuses the runner's model in place, after the checkpoint is loaded.
    With ``fuse_val=True``, each validation during training runs on a fused copy, so the
    3-branch weights keep training while metrics reflect the deploy model.

    With an EMA hook (mmengine's ``EMAHook``) in the runner, the test fuses its averaged
    model as well, so the EMA swap exchanges fused weights with fused weights, and the
    fused copy validated with ``fuse_val=True`` holds the averaged weights, as the
    unfused validation would. Both hold whatever priority the EMA hook is given: every
    hook's ``before_test``/``before_val`` runs before any ``*_epoch`` swap.

    Args:
        probe: compare backbone outputs before/after fusion on a random input and log it.
        probe_size: side of that square input.
        fuse_val: validate a fused copy during training.
    """

    priority = 'HIGH'  # fuse before other hooks (e.g. visualization) see the test model

    def __init__(self, probe: bool = True, probe_size: int = 64, fuse_val: bool = False):
        self.probe, self.probe_size, self.fuse_val = probe, probe_size, fuse_val
        self._training_model = None

    def _log(self, runner, message: str, report: Optional[dict] = None) -> None:
        # A probe that moved beyond rounding means a block fused wrongly (e.g. a custom
        # block's switch_to_deploy): say so loudly, the metrics that follow are suspect.
        wrong = report is not None and not report.get('within_rounding', True)
        log = runner.logger.warning if wrong else runner.logger.info
        log(f'ReparamHook: {message}')

    def before_test(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        report = fuse_and_report(model, self.probe, self.probe_size)
        if not report['blocks']:
            runner.logger.warning(f'ReparamHook: {format_report(report)}')
            return
        self._log(runner, format_report(report), report)
        for averaged in _averaged_models(runner):
            # The EMA hook's copy was loaded from the same checkpoint; fused the same
            # way, its parameters line up one to one with the model's for the swap.
            reparameterize(averaged.module.eval(), inplace=True)
            self._log(runner, 'fused the EMA model too')

    def before_val(self, runner) -> None:
        if not self.fuse_val:
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        fused = copy_module(model)
        averaged = _averaged_models(runner)
        if averaged:
            # Unfused validation scores the EMA weights (swapped in before_val_epoch,
            # which acts on the training model, not on this copy): copy them in here.
            fused.load_state_dict(averaged[0].module.state_dict())
        report = fuse_and_report(fused, self.probe, self.probe_size)
        what = 'a fused copy of the EMA weights' if averaged else 'a fused copy'
        self._log(runner, f'validating {what}: {format_report(report)}', report)
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
