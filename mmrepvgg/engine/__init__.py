"""When to fuse inside a runner (ReparamHook), and the bfloat16 autocast wrapper of
``--amp`` on CPU."""
from .hooks import ReparamHook
from .optim_wrapper import CPUAmpOptimWrapper

__all__ = ['ReparamHook', 'CPUAmpOptimWrapper']
