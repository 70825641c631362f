"""GemmConv2d computes the same convolution as nn.Conv2d, as one matmul over its patches;
convert_to_winograd(tile='auto') uses it where gemm_pays."""
import pytest
import torch
from torch import nn

from mmrepvgg.ops.gemm_conv import (GEMM_MAX_POSITIONS, GEMM_MIN_CHANNELS, GemmConv2d,
                                       gemm_pays, gemm_unsupported_reason)
from mmrepvgg.reparam import rounding_errors


def _conv(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=True,
          dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                     bias=bias).to(dtype)


@pytest.mark.parametrize('kernel_size,stride,padding', [(3, 2, 1), (3, 1, 1), (1, 1, 0),
                                                        (3, (2, 1), 0), (5, 3, 2)])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('size', [(7, 7), (8, 11), (1, 4)])
def test_exact_in_float64(kernel_size, stride, padding, bias, size):
    if min(size) + 2 * padding < kernel_size:
        pytest.skip('no output position')
    conv = _conv(6, 10, kernel_size, stride, padding, bias)
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    expected = conv(x)
    out = GemmConv2d(conv)(x)
    assert out.shape == expected.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    # the same products, summed in another order: fp64 rounding apart
    assert (out - expected).abs().max() < 1e-12 * expected.abs().max()


def test_float32_within_a_direct_convs_rounding():
    conv = _conv(64, 96, dtype=torch.float32)
    x = torch.randn(2, 64, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = conv.double()(x.double())
        direct = conv.float()(x)
        out = GemmConv2d(conv)(x)
    # a 576-term dot product either way; another summation order rounds alike
    errors = rounding_errors(out, direct, reference)
    assert errors['within'], errors


@pytest.mark.parametrize('conv,message', [
    (nn.Conv2d(4, 4, 3, groups=2), 'groups=2'),
    (nn.Conv2d(4, 4, 3, dilation=2), 'dilation=(2, 2)'),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode='reflect'), "padding_mode='reflect'"),
    (nn.Conv2d(4, 4, 3, padding='same'), "padding='same'"),
    (nn.Linear(4, 4), 'Linear is not a plain nn.Conv2d'),
])
def test_unsupported_convs_say_why(conv, message):
    assert message in gemm_unsupported_reason(conv)
    with pytest.raises(ValueError, match='cannot compute this conv as one matmul'):
        GemmConv2d(conv)


def test_pays_for_strided_convs_with_many_channels_on_small_maps():
    wide = nn.Conv2d(GEMM_MIN_CHANNELS, 64, 3, stride=2, padding=1)
    assert gemm_pays(wide, (14, 14))  # 7x7 outputs
    side = int(GEMM_MAX_POSITIONS ** 0.5)
    assert gemm_pays(wide, (2 * side, 2 * side))
    assert not gemm_pays(wide, (2 * side + 2, 2 * side + 2))  # one row and column more
    assert not gemm_pays(nn.Conv2d(GEMM_MIN_CHANNELS - 1, 64, 3, stride=2, padding=1),
                         (14, 14))
    # stride-1 convs are Winograd's; grouped ones the matmul form does not compute
    assert not gemm_pays(nn.Conv2d(GEMM_MIN_CHANNELS, 64, 3, padding=1), (7, 7))
    assert not gemm_pays(nn.Conv2d(GEMM_MIN_CHANNELS, 64, 3, stride=2, padding=1, groups=2),
                         (14, 14))


def test_repr_and_buffers():
    module = GemmConv2d(_conv(8, 16, dtype=torch.float32))
    assert repr(module).startswith('GemmConv2d(8, 16, kernel_size=(3, 3), stride=(2, 2)')
    assert module.weight.shape == (9 * 8, 16)
    assert not list(module.parameters())  # buffers: an inference form, it does not train
