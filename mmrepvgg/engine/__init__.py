from .hooks import ReparamHook
from .optim_wrapper import CPUAmpOptimWrapper

__all__ = ['ReparamHook', 'CPUAmpOptimWrapper']
