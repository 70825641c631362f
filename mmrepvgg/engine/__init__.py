from .hooks import ReparamHook

__all__ = ['ReparamHook']
