"""A conv computed as one matrix product over its patches (an inference-speed option).

oneDNN's direct CPU convs run far below the machine's matmul rate on strided convs with
many channels and few output positions, such as a RepVGG's last conv (RepVGG-B1g2:
512 -> 2048 channels, stride 2, a 14x14 map at 224 pixels; batch 4 on 2 AVX2 cores,
78 ms direct, 31 ms as one matmul). ``GemmConv2d`` gathers the patches of an NHWC view
(one strided slice per kernel tap, concatenated over channels) and multiplies them by
the kernel laid out [taps x in, out] once, by torch's matmul (MKL or oneDNN in eager,
inductor's choice when compiled). On large maps the patches cost more memory traffic
than the direct conv saves, so ``convert_to_winograd(tile='auto')`` only takes the convs
``gemm_pays`` accepts.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: ``gemm_pays``: output positions per image at most this (measured, batch 4, 2 AVX2 cores:
#: 512 -> 2048 channels to 7x7 31 ms against 78 direct; 256 -> 512 to 14x14 15.1 against
#: 16.5 alone but 18-19 against 17 inside RepVGG-B1g2; 128 -> 256 to 28x28 20.3 against
#: 15.0) ...
GEMM_MAX_POSITIONS = 64
#: ... and at least this many input channels (3 -> 64 to 112x112: 5.7 against 2.1 ms).
GEMM_MIN_CHANNELS = 256


def gemm_unsupported_reason(conv: nn.Module) -> Optional[str]:
    """Why ``conv`` cannot be computed by ``GemmConv2d`` (None when it can)."""
    if type(conv) is not nn.Conv2d:
        return f'{type(conv).__name__} is not a plain nn.Conv2d'
    for name, wanted in dict(groups=1, dilation=(1, 1), padding_mode='zeros').items():
        if getattr(conv, name) != wanted:
            return f'{name}={getattr(conv, name)!r} (the matmul form needs {wanted!r})'
    if isinstance(conv.padding, str):
        return f'padding={conv.padding!r} (the matmul form needs explicit padding)'
    return None


def output_size(conv: nn.Conv2d, height: int, width: int) -> tuple:
    """(H, W) of ``conv``'s output on a ``height`` x ``width`` input (dilation 1)."""
    return tuple((size + 2 * pad - kernel) // stride + 1 for size, pad, kernel, stride in
                 zip((height, width), conv.padding, conv.kernel_size, conv.stride))


def gemm_pays(conv: nn.Module, input_size: Sequence[int]) -> bool:
    """Whether ``convert_to_winograd(tile='auto')`` computes ``conv`` on an input of
    ``input_size`` (H, W) as one matmul: a strided conv (Winograd takes the others) with
    at least ``GEMM_MIN_CHANNELS`` inputs and at most ``GEMM_MAX_POSITIONS`` outputs."""
    if gemm_unsupported_reason(conv) is not None or conv.stride == (1, 1):
        return False
    height, width = output_size(conv, *input_size)
    return conv.in_channels >= GEMM_MIN_CHANNELS and height * width <= GEMM_MAX_POSITIONS


class GemmConv2d(nn.Module):
    """``conv`` (groups 1, dilation 1, zero padding; any kernel size, stride and padding)
    computed as one matrix product over its patches. Works on NCHW tensors of any memory
    format and returns a channels_last one. Holds the kernel as buffer ``weight``,
    [kh * kw * in, out] (tap-major, as the patches are gathered), and ``bias`` as given.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        reason = gemm_unsupported_reason(conv)
        if reason:
            raise ValueError(f'cannot compute this conv as one matmul: {reason}')
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        weight = conv.weight.detach().permute(2, 3, 1, 0)  # kh, kw, in, out
        self.register_buffer('weight', weight.reshape(-1, self.out_channels).contiguous())
        self.register_buffer('bias', None if conv.bias is None else conv.bias.detach().clone())

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
                f'stride={self.stride}, padding={self.padding}, bias={self.bias is not None}')

    def forward(self, x: Tensor) -> Tensor:
        n, height, width = x.shape[0], x.shape[2], x.shape[3]
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        out_h, out_w = output_size(self, height, width)
        x = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # NHWC, padded
        patches = torch.cat([x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw]
                             for i in range(kh) for j in range(kw)], dim=-1)
        patches = patches.reshape(n * out_h * out_w, -1)
        y = (torch.mm(patches, self.weight) if self.bias is None
             else torch.addmm(self.bias, patches, self.weight))
        return y.view(n, out_h, out_w, self.out_channels).permute(0, 3, 1, 2)
