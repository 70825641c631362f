"""The RepVGG backbone (arch table, stages, strides and dilations), its blocks and the
fusion maths."""
from .rep_block import BLOCKS, QARepVGGBlock, RepVGGBlock
from .repvgg import ARCH_SETTINGS, RepVGG, arch_channels, resolve_arch

__all__ = ['ARCH_SETTINGS', 'BLOCKS', 'QARepVGGBlock', 'RepVGG', 'RepVGGBlock',
           'arch_channels', 'resolve_arch']
