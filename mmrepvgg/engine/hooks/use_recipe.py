"""UseRecipe: test a model whose network runs with an inference recipe (tools/test.py
--mode / --precision)."""
from mmengine.hooks import Hook

from ...registry import HOOKS


@HOOKS.register_module()
class UseRecipe(Hook):
    """Run the network (the part ``tools/export.py`` would export) with an inference
    recipe, prepared at the start of the test epoch: after the checkpoint is loaded
    (``before_run``), fused (ReparamHook, ``before_test``) and any EMA weights swapped in
    (``before_test_epoch``, at a higher priority than this hook's LOWEST)."""

    def __init__(self, mode: str, precision: str, input_shape: list):
        self.mode, self.precision, self.input_shape = mode, precision, input_shape

    def before_test_epoch(self, runner) -> None:
        import torch
        from mmengine.model import is_model_wrapper

        from ...deploy import use_recipe
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        example = torch.randn(*self.input_shape, generator=torch.Generator().manual_seed(0))
        prepared = use_recipe(model, example, self.mode, self.precision)
        runner.logger.info(f'testing the network with the {self.mode} recipe in '
                           f'{self.precision} (prepared in {prepared.prep_seconds:.1f} s '
                           f'for {"x".join(map(str, self.input_shape))}); the rest of the '
                           'model runs as built')
