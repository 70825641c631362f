"""CPU kernels and inference recipes for a fused network: Winograd convolution (Python,
and the C++ op with its loader), strided convs as one matmul, and
``optimize_for_inference``'s recipes (channels_last, TorchScript freezing, compile)."""
from .gemm_conv import GemmConv2d
from .inference import AUTO_MODE, MODES, InferenceRunner, optimize_for_inference
from .winograd import FASTEST_TILE, TILES, WinogradConv2d, convert_to_winograd

__all__ = ['AUTO_MODE', 'FASTEST_TILE', 'GemmConv2d', 'InferenceRunner', 'MODES', 'TILES',
           'WinogradConv2d', 'convert_to_winograd', 'optimize_for_inference']
