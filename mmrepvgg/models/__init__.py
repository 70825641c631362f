from .rep_block import RepVGGBlock
from .repvgg import ARCH_SETTINGS, RepVGG, arch_channels, resolve_arch

__all__ = ['ARCH_SETTINGS', 'RepVGG', 'RepVGGBlock', 'arch_channels', 'resolve_arch']
