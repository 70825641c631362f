"""Winograd convs compute the same convolution as F.conv2d (eager; compiled runs are in
test_speed.py through optimize_for_inference(mode='winograd'))."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmrepvgg import RepVGG, reparameterize
from mmrepvgg.winograd import (TILES, WinogradConv2d, convert_to_winograd,
                               winograd_unsupported_reason)


def _conv(in_channels, out_channels, groups=1, bias=True, dtype=torch.float64):
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, groups=groups, bias=bias)
    with torch.no_grad():
        conv.weight.normal_(0, 1)
        if bias:
            conv.bias.normal_(0, 1)
    return conv.to(dtype)


@pytest.mark.parametrize('tile', TILES)
@pytest.mark.parametrize('groups,bias', [(1, True), (2, False), (4, True)])
@pytest.mark.parametrize('size', [(8, 8), (7, 10), (1, 3)])
def test_exact_in_float64(tile, groups, bias, size):
    # the transforms are exact algebra: in float64 only rounding separates the two
    conv = _conv(8, 12, groups, bias)
    x = torch.randn(2, 8, *size, dtype=torch.float64)
    expected = conv(x)
    out = WinogradConv2d(conv, tile)(x)
    assert out.shape == expected.shape
    assert (out - expected).abs().max() < 1e-10 * expected.abs().max()


def test_channels_last_input_and_output():
    conv = _conv(16, 16, dtype=torch.float32)
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    out = WinogradConv2d(conv, 2)(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('tile,bound', [(2, 2e-6), (4, 1e-4)])
def test_float32_accuracy(tile, bound):
    # tile 2 is as accurate as a direct fp32 conv; tile 4 loses a few bits
    conv = _conv(64, 64)
    x = torch.randn(2, 64, 14, 14, dtype=torch.float64)
    reference = conv(x)
    conv32 = conv.float()
    direct = conv32(x.float()).double()
    out = WinogradConv2d(conv32, tile)(x.float()).double()
    scale = reference.abs().max()
    direct_error = (direct - reference).abs().max() / scale
    error = (out - reference).abs().max() / scale
    assert error < bound, (tile, error.item(), direct_error.item())
    if tile == 2:
        assert error < 3 * direct_error


@pytest.mark.parametrize('conv,message', [
    (nn.Conv2d(4, 4, 3, stride=2, padding=1), 'stride=(2, 2)'),
    (nn.Conv2d(4, 4, 3, padding=2, dilation=2), 'dilation=(2, 2)'),
    (nn.Conv2d(4, 4, 1), 'kernel_size=(1, 1)'),
    (nn.Conv2d(4, 4, 3, padding=0), 'padding=(0, 0)'),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode='reflect'), "padding_mode='reflect'"),
    (nn.Linear(4, 4), 'Linear is not a plain nn.Conv2d'),
])
def test_unsupported_convs_say_why(conv, message):
    assert message in winograd_unsupported_reason(conv)
    with pytest.raises(ValueError, match='cannot compute this conv with Winograd'):
        WinogradConv2d(conv)


def test_unknown_tile_lists_valid_ones():
    with pytest.raises(ValueError, match=r'unknown Winograd tile 3; valid: \(2, 4\)'):
        WinogradConv2d(nn.Conv2d(4, 4, 3, padding=1), tile=3)
    # refused up front, even by a model with nothing to convert
    with pytest.raises(ValueError, match='unknown Winograd tile 3'):
        convert_to_winograd(nn.Sequential(nn.Linear(4, 4)), tile=3)


def test_convert_a_fused_repvgg(randomize):
    model = randomize(RepVGG('A0', out_indices=(1, 3)))
    model.eval()
    fused = reparameterize(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = fused(x)
        replaced = convert_to_winograd(fused, tile=2)
        out = fused(x)
    # A0 has 2+4+14+1 blocks, one stride-2 block per stage: 17 stride-1 convs
    assert replaced == 17
    assert sum(isinstance(m, WinogradConv2d) for m in fused.modules()) == 17
    assert not any(winograd_unsupported_reason(m) is None for m in fused.modules())
    for a, b in zip(out, expected):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert convert_to_winograd(fused) == 0  # nothing left to convert


def test_repr_names_the_tile():
    text = repr(WinogradConv2d(nn.Conv2d(8, 16, 3, padding=1, groups=2), tile=4))
    assert 'WinogradConv2d(8, 16, tile=4, groups=2, bias=True)' == text


def test_matches_functional_conv_on_odd_channel_counts():
    conv = _conv(3, 5)
    x = torch.randn(1, 3, 5, 6, dtype=torch.float64)
    expected = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert torch.allclose(WinogradConv2d(conv, 4)(x), expected, atol=1e-10)
