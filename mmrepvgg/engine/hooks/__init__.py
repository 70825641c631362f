"""The plugin's runner hooks, one registered hook per file."""
from .load_read_checkpoint import LoadReadCheckpoint
from .reparam_hook import ReparamHook
from .use_recipe import UseRecipe

__all__ = ['LoadReadCheckpoint', 'ReparamHook', 'UseRecipe']
