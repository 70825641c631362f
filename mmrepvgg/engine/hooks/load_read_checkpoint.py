"""LoadReadCheckpoint: load a checkpoint object that was already read (tools/test.py
reads a file once, to check its form, and the model gets that same object)."""
from typing import Any

from mmengine.hooks import Hook

from ...registry import HOOKS


@HOOKS.register_module()
class LoadReadCheckpoint(Hook):
    """Load an already-read checkpoint at the point mmengine's runner would load its
    ``load_from`` (after every other hook's ``before_run``, e.g. EMAHook's), with the
    steps of ``Runner.load_checkpoint``: the ``after_load_checkpoint`` hooks, then the
    weights, ``module.`` prefixes dropped. mmengine loads only from a file name; this
    spares a second read of a file that was just read to check its form."""

    def __init__(self, checkpoint: Any, source: str):
        self.checkpoint, self.source = checkpoint, source

    def before_run(self, runner) -> None:
        from mmengine.model import is_model_wrapper
        from mmengine.runner.checkpoint import _load_checkpoint_to_model
        runner.call_hook('after_load_checkpoint', checkpoint=self.checkpoint)
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        _load_checkpoint_to_model(model, self.checkpoint, strict=False,
                                  revise_keys=[(r'^module.', '')])
        # mmengine has no public way to load an object it did not read: its loading
        # function is private, and so is the flag that keeps Runner.load_or_resume from
        # loading load_from again (tests/test_engine_hooks.py pins both).
        runner._has_loaded = True
        runner.logger.info(f'Load checkpoint from {self.source}')
        self.checkpoint = None  # the weights are in the model now
