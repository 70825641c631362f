"""Winograd convs compute the same convolution as F.conv2d (eager; compiled runs are in
test_speed.py through optimize_for_inference(mode='winograd'))."""
import contextlib
import copy
import re
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_within_growth, run_tools
from mmrepvgg import RepVGG, reparameterize
from mmrepvgg.ops import winograd_kernel
from mmrepvgg.ops.gemm_conv import GemmConv2d
from mmrepvgg.numerics import fp32_math
from mmrepvgg.ops import winograd
from mmrepvgg.ops.winograd import (BF16_PRODUCTS, BF16_TILES, FP16_TILES, MAX_WORST_CASE_ERROR,
                                   MIN_CHANNELS_PER_GROUP, TF32, TILES, WinogradConv2d,
                                   allowed_tiles, auto_tile, convert_to_winograd,
                                   error_growth, range_growth, tile_products, tile_refusal,
                                   transform_matrices, winograd_pays,
                                   winograd_unsupported_reason, worst_case_error)


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
    # fp64 rounding (eps 2.2e-16) over 72-term sums, even magnified by error_growth(4),
    # stays below 1e-11 of the output; a wrong transform is off by O(1)
    assert (out - expected).abs().max() < 1e-10 * expected.abs().max()


def test_error_growth_of_the_transforms():
    assert error_growth(2) == pytest.approx((8 / 3) ** 2)
    assert error_growth(4) == pytest.approx(16 ** 2)
    assert error_growth(4) < error_growth(6) < error_growth(7) < 1e4


@pytest.mark.parametrize('tile', TILES)
def test_transforms_are_the_1d_correlation(tile):
    # A^T [(G g) * (B^T d)] is the valid 1-D correlation of d with g, exactly (rationals)
    mats = transform_matrices(tile)
    g = [Fraction(k + 2, 3) for k in range(3)]
    d = [Fraction((-1) ** i * (i + 1), 7) for i in range(tile + 2)]
    gg = [sum(row[k] * g[k] for k in range(3)) for row in mats['G']]
    dd = [sum(row[i] * d[i] for i in range(tile + 2)) for row in mats['BT']]
    y = [sum(row[j] * gg[j] * dd[j] for j in range(tile + 2)) for row in mats['AT']]
    assert y == [sum(g[k] * d[i + k] for k in range(3)) for i in range(tile)]
    # the published F(4x4, 3x3) data transform (Lavin & Gray) comes out of the points
    if tile == 4:
        assert mats['BT'][0] == [4, 0, -5, 0, 1, 0]


@pytest.mark.parametrize('tile', TILES)
def test_channels_last_input_and_output(tile):
    conv = _conv(16, 16)
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64)
    conv32, x32 = _conv(16, 16, dtype=torch.float32), x.float()
    x32 = x32.contiguous(memory_format=torch.channels_last)
    out = WinogradConv2d(conv32, tile)(x32)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_within_growth(out, conv32(x32), conv(x), tile)


@pytest.mark.parametrize('tile', TILES)
def test_float32_accuracy(tile):
    conv = _conv(64, 64)
    x = torch.randn(2, 64, 14, 14, dtype=torch.float64)
    conv32 = _conv(64, 64, dtype=torch.float32)
    errors = assert_within_growth(WinogradConv2d(conv32, tile)(x.float()),
                                  conv32(x.float()), conv(x), tile)
    # and it is not vacuous: the direct conv itself rounds (a 576-term fp32 sum)
    assert errors['baseline_abs'] > 0


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
    with pytest.raises(ValueError, match=r'unknown Winograd tile 3; valid: \(2, 4, 6, 7\)'):
        WinogradConv2d(nn.Conv2d(4, 4, 3, padding=1), tile=3)
    # refused up front, even by a model with nothing to convert
    with pytest.raises(ValueError, match='unknown Winograd tile 3'):
        convert_to_winograd(nn.Sequential(nn.Linear(4, 4)), tile=3)


@pytest.mark.parametrize('tile', TILES)
def test_convert_a_fused_repvgg(randomize, tile):
    model = randomize(RepVGG('A0', out_indices=(1, 3)))
    model.eval()
    fused = reparameterize(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = copy.deepcopy(fused).double()(x.double())
        expected = fused(x)
        replaced = convert_to_winograd(fused, tile=tile)
        out = fused(x)
    # A0 has 2+4+14+1 blocks, one stride-2 block per stage: 17 stride-1 convs
    assert replaced == 17
    assert sum(isinstance(m, WinogradConv2d) for m in fused.modules()) == 17
    assert not any(winograd_unsupported_reason(m) is None for m in fused.modules())
    # every conv's error grows by at most error_growth(tile); the stack propagates the
    # Winograd and the direct convs' errors alike
    assert_within_growth(out, expected, reference, tile)
    assert convert_to_winograd(fused) == 0  # nothing left to convert


def test_auto_tile_counts_products_on_whole_tiles():
    # 14x14: F(2x2) 7x7 tiles of 16 = 784, F(4x4) 4x4 of 36 = 576, F(6x6) 3x3 of 64 = 576,
    # F(7x7) 2x2 of 81 = 324
    assert [tile_products(t, 14, 14) for t in TILES] == [784, 576, 576, 324]
    assert auto_tile(14, 14) == 7
    assert auto_tile(16, 16) == 4  # the tie with F(6x6) goes to the smaller tile
    assert auto_tile(56, 56) == 7  # 5184 against F(6x6)'s 6400 and F(4x4)'s 7056
    assert auto_tile(48, 48) == 6  # 4096 products: F(7x7)'s 3969 saves only 3%
    assert auto_tile(1, 3) == 2


def test_auto_converts_the_convs_where_winograd_pays(randomize):
    model = reparameterize(randomize(RepVGG('B1g2', out_indices=(3,))).eval())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())
        expected = model(x)
    with pytest.raises(ValueError, match='pass example_input'):
        convert_to_winograd(model, 'auto')
    direct = [m for m in model.modules() if winograd_unsupported_reason(m) is None]
    replaced = convert_to_winograd(model, 'auto', x)
    # B1g2's stride-1 convs: 3 + 5 + 15 (the last stage has none), all with enough
    # channels per group; and as one matmul, the strided convs into stages 3 (256 inputs,
    # a 4x4 output) and 4
    assert len(direct) == 23 and replaced == 25
    assert all(winograd_pays(m) == (min(m.in_channels, m.out_channels) // m.groups
                                    >= MIN_CHANNELS_PER_GROUP) for m in direct)
    assert all(winograd_pays(m) for m in direct)
    assert [m.in_channels for m in model.modules() if isinstance(m, GemmConv2d)] == [256, 512]
    tiles = {m.tile for m in model.modules() if isinstance(m, WinogradConv2d)}
    assert tiles == {auto_tile(8, 8)}  # a 64x64 input: 16x16, 8x8, 4x4 maps
    with torch.no_grad():
        out = model(x)
    assert_within_growth(out, expected, reference, max(tiles))


def test_auto_leaves_narrow_convs_direct():
    # a plain (ungrouped) stride-1 conv the matmul form could take too: below
    # MIN_CHANNELS_PER_GROUP it stays an nn.Conv2d under 'auto', and is converted at a
    # fixed tile
    narrow = MIN_CHANNELS_PER_GROUP // 2
    model = nn.Sequential(nn.Conv2d(narrow, narrow, 3, padding=1),
                          nn.Conv2d(narrow, MIN_CHANNELS_PER_GROUP, 3, padding=1),
                          nn.Conv2d(MIN_CHANNELS_PER_GROUP, MIN_CHANNELS_PER_GROUP, 3, padding=1))
    x = torch.randn(1, narrow, 14, 14)
    assert convert_to_winograd(model, 'auto', x) == 1
    assert [type(m) for m in model] == [nn.Conv2d, nn.Conv2d, WinogradConv2d]
    assert convert_to_winograd(model, 4) == 2


def test_repr_names_the_tile():
    text = repr(WinogradConv2d(nn.Conv2d(8, 16, 3, padding=1, groups=2), tile=4))
    assert text.startswith('WinogradConv2d(8, 16, tile=4, groups=2, bias=True, relu=False')


def test_matches_functional_conv_on_odd_channel_counts():
    conv = _conv(3, 5)
    x = torch.randn(1, 3, 5, 6, dtype=torch.float64)
    expected = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert torch.allclose(WinogradConv2d(conv, 4)(x), expected, atol=1e-10)


def test_check_tool_reports_each_tile_against_the_direct_convs():
    """tools/check_winograd.py (its check lives in the tool), in processes of its own."""
    small = ['--archs', 'A0', '--batch', '1', '--size', '32']
    passed, failed = run_tools(('check_winograd', *small, '--tiles', '2', '6', 'auto'),
                               ('check_winograd', *small, '--tiles', '6', '--limit', '1e-12'))
    assert passed.returncode == 0, (passed.stdout + passed.stderr)[-5000:]
    lines = passed.stdout.splitlines()
    assert lines[0].startswith('# ') and 'threads, batch 1, 32x32' in lines[0]
    direct, *rows = [line.split(' | ') for line in lines[3:]]
    assert (direct[1], direct[2], direct[3], direct[7]) == ('direct', '0', '0.00e+00', '0.0')
    assert [(r[1], r[2]) for r in rows] == [('2', '17'), ('6', '17'), ('auto', '17')]
    # within the default limit 1e-4 of the direct convs; not 0: other arithmetic
    assert all(0 < float(r[3]) <= 1e-4 for r in rows)
    # the transformed weights held: (tile+2)^2 / 9 times the converted convs' weights, so
    # tile 6's are (8/4)^2 = 4 times tile 2's (the same convs, the same panel padding)
    held = {r[1]: float(r[7]) for r in rows}
    assert held['2'] > 0 and held['6'] == pytest.approx(4 * held['2'], rel=0.01)
    assert failed.returncode == 1, (failed.stdout + failed.stderr)[-5000:]
    assert 'A0 tile 6' in failed.stderr


def test_check_tool_tabulates_one_conv_per_precision_and_tile():
    """tools/check_winograd.py --conv: each precision's tiles, allowed or refused, against
    float64 next to the direct conv in that precision."""
    (result,) = run_tools(('check_winograd', '--conv', '16', '8', '--tiles', '2', '7',
                           '--precisions', 'fp32', 'fp16', 'fp16-autocast', 'bf16'))
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    lines = result.stdout.splitlines()
    assert '16 -> 16 channels, 3x3, batch 1, 8x8' in lines[0]
    rows = [line.strip('| ').split(' | ') for line in lines[3:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ('fp32', '2', 'yes'), ('fp32', '7', 'yes'), ('fp16', '2', 'yes'),
        ('fp16', '7', 'refused'), ('fp16-autocast', '2', 'yes'),
        ('fp16-autocast', '7', 'refused'), ('bf16', '2', 'yes'), ('bf16', '7', 'refused')]
    for r in rows:
        tile, dtype = int(r[1]), PRECISION_DTYPES[r[0]]
        assert float(r[3]) == pytest.approx(worst_case_error(tile, dtype), rel=0.05)
        assert float(r[4]) > 0 and float(r[5]) > 0  # both round: not a vacuous ratio
        # within the bound the tests hold it to (float32's may sit on the floor of a few
        # ulps instead, which the exit status covers)
        if r[2] == 'yes' and r[0] != 'fp32':
            assert float(r[6]) <= error_growth(tile)


PRECISION_DTYPES = {'fp32': torch.float32, 'fp16': torch.float16,
                    'fp16-autocast': torch.float16, 'bf16': torch.bfloat16}


# -- the C++ kernel (mmrepvgg.ops.winograd_kernel): what WinogradConv2d calls on CPU
# float32. Built for this machine by the bootstrap; the tests need it built.
def _kernel_module(in_channels, out_channels, tile, groups=1, bias=True, relu=False):
    module = WinogradConv2d(_conv(in_channels, out_channels, groups, bias,
                                  dtype=torch.float32), tile, relu=relu)
    assert module.uses_kernel, winograd_kernel.load_error()
    return module


@pytest.fixture(params=[16, 8], ids=['16-float-vectors', '8-float-vectors'])
def vector_width(request):
    """Each product path of the kernel (AVX-512's 16-float vectors, AVX2's 8), where the
    kernel was built with it; the others are skipped, saying why."""
    width = request.param
    if not winograd_kernel.load_kernel():
        pytest.skip(f'the C++ Winograd kernel is not available: {winograd_kernel.load_error()}')
    if width not in winograd_kernel.vector_widths():
        pytest.skip(f'the {width}-float product path is not built on this CPU (the kernel '
                    'uses the widest vectors of the CPU it is built on; this one lacks '
                    'AVX-512F)')
    with winograd_kernel.use_vector_width(width):
        yield width


@pytest.mark.parametrize('tile', TILES)
@pytest.mark.parametrize('channels,groups,bias,relu,size', [
    ((16, 16), 1, True, False, (9, 9)),
    # output channels a group not a multiple of either weight panel (16 or 32 channels),
    # 4-7 rows of products (not a multiple of the 6 or 7-row register block), a 1x3 map
    ((12, 20), 2, False, True, (1, 3)),
    # more than 256 input channels a group (passes over the depth at either width), 70 =
    # 64 + 6 channels a group (two channel blocks in the transforms; panels 32 + 32 + 6),
    # 40 rows at tile 2 (blocks of 6 or 7 rows and fewer), odd map
    ((600, 140), 2, True, True, (7, 10)),
])
def test_kernel_computes_the_conv_within_the_rounding_bound(tile, channels, groups, bias,
                                                            relu, size, vector_width):
    module = _kernel_module(*channels, tile, groups, bias, relu)
    x = torch.randn(2, channels[0], *size, dtype=torch.float64)
    conv = _conv(*channels, groups, bias)
    conv32 = _conv(*channels, groups, bias, dtype=torch.float32)
    activation = F.relu if relu else (lambda t: t)
    with torch.no_grad():
        out = module(x.float())
        reference, direct = activation(conv(x)), activation(conv32(x.float()))
        # the torch-op form of the same module (the fallback), from the same weights
        fallback = activation(module._forward_torch(x.float()))
    assert out.shape == reference.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_within_growth(out, direct, reference, tile)
    assert_within_growth(fallback, direct, reference, tile)
    if relu:
        assert out.min() == 0


@pytest.mark.parametrize('tile', BF16_TILES)
def test_kernel_in_bfloat16_within_the_rounding_bound(tile):
    """A bfloat16 model's convs: bfloat16 products (torch's matmul), float32 transforms.
    Against float64 on the same bfloat16 inputs and weights, the error grows by at most
    error_growth(tile) over a direct bfloat16 conv's own."""
    module = _kernel_module(64, 48, tile, 2, True, relu=True)
    module.bfloat16()
    x = torch.randn(2, 64, 9, 11).bfloat16()
    weight = module.weight.unflatten(2, (3, 3))
    with torch.no_grad():
        out = module(x)
        direct = F.relu(F.conv2d(x, weight, module.bias, padding=1, groups=2))
        reference = F.relu(F.conv2d(x.double(), weight.double(), module.bias.double(),
                                    padding=1, groups=2))
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert_within_growth(out, direct, reference, tile)
    # bfloat16 rounding is not float32's: the fp32 kernel on the same values differs
    with torch.no_grad():
        assert not torch.equal(out.float(), module.float()(x.float()))


# -- reduced precision: which tiles each precision computes (mmrepvgg.ops.winograd's
# allowed_tiles), and what float16, bfloat16 and autocast compute with them.
def test_allowed_tiles_follow_the_worst_case_bound():
    # the bound: F(2x2) in bfloat16, 3 roundings of eps/2 = 2^-8 magnified by (8/3)^2
    assert MAX_WORST_CASE_ERROR == pytest.approx(3 * 2 ** -8 * (8 / 3) ** 2)
    assert worst_case_error(2, torch.bfloat16) == MAX_WORST_CASE_ERROR
    # F(4x4) in float16 (eps/2 = 2^-11): 3 x 2^-11 x 256 = 37.5%, far beyond it
    assert worst_case_error(4, torch.float16) == pytest.approx(0.375)
    # float32's F(7x7): 3 x 2^-24 x 4176 = 0.075%: every tile stays
    assert worst_case_error(7, torch.float32) < 1e-3
    assert allowed_tiles(torch.float32) == allowed_tiles(torch.float64) == TILES
    for precision in (torch.float16, torch.bfloat16, TF32, BF16_PRODUCTS):
        assert allowed_tiles(precision) == (2,)
    assert FP16_TILES == BF16_TILES == (2,)
    # range: F(2x2)'s transformed inputs reach 4x the input (two rows of 1, -1), products
    # stay within 9 C max|w| max|x|, transformed weights are no smaller; F(7x7)'s
    # point 3 makes its G row sum 3/350, its B^T rows sum to 250/9
    assert range_growth(2) == dict(input=4.0, products=1.0, kernel=1.0)
    assert range_growth(7)['kernel'] == pytest.approx((350 / 3) ** 2)
    assert range_growth(7)['input'] == pytest.approx((250 / 9) ** 2)
    assert tile_refusal(2, torch.float16) is None


def _conv_128():
    """The 128-channel 28x28 conv of a RepVGG stage, with nn.Conv2d's default init
    (weights up to 1/sqrt(9 x 128) = 0.029), on a unit-variance input."""
    torch.manual_seed(0)
    return nn.Conv2d(128, 128, 3, padding=1), torch.randn(1, 128, 28, 28)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('how', ['model', 'autocast'])
def test_reduced_precision_allowed_tiles_within_the_bound(dtype, how):
    """Each allowed tile against float64, within error_growth(tile) x a direct conv's own
    error in the same precision on the same data: a float16 / bfloat16 model (its
    weights and inputs rounded; the reference computes those in float64), and a float32
    model under CPU autocast (the reference: the float32 data in float64; autocast's
    rounding of them is part of both convs' error). float16 and autocast run the torch-op
    form with float16 matmuls, as on CUDA."""
    conv, x = _conv_128()
    if how == 'model':
        conv, x = conv.to(dtype), x.to(dtype)
        context = contextlib.nullcontext()
    else:
        context = torch.autocast('cpu', dtype=dtype)
    reference = copy.deepcopy(conv).double()(x.double()).detach()
    with torch.no_grad(), context:
        direct = conv(x)
        for tile in allowed_tiles(dtype):
            out = WinogradConv2d(conv, tile)(x)
            assert out.dtype == direct.dtype == dtype  # computed in it, not in float32
            assert_within_growth(out, direct, reference, tile)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_reduced_precision_refuses_the_other_tiles(dtype):
    refused = [t for t in TILES if t not in allowed_tiles(dtype)]
    assert refused == [4, 6, 7]
    name = str(dtype).replace('torch.', '')
    x = torch.randn(1, 8, 8, 8)
    for tile in refused:
        worst = f'{100 * worst_case_error(tile, dtype):.3g}%'
        message = (rf'F\({tile}x{tile}, 3x3\) in {name} is refused: .*worst-case error '
                   rf'is {re.escape(worst)} .*Tiles allowed in {name}: \(2,\)')
        with pytest.raises(ValueError, match=message):
            WinogradConv2d(nn.Conv2d(8, 8, 3, padding=1).to(dtype), tile)
        # a model: refused before any of its convs is replaced; a float32 model too when
        # its convs will run in that precision (dtype=, or converted under autocast)
        for model, kwargs, context in (
                (nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)).to(dtype), {}, None),
                (nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)), dict(dtype=dtype), None),
                (nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)), {},
                 torch.autocast('cpu', dtype=dtype))):
            with context or contextlib.nullcontext(), pytest.raises(ValueError,
                                                                    match=message):
                convert_to_winograd(model, tile, **kwargs)
            assert type(model[0]) is nn.Conv2d
        # a float32 module given float16 input outside autocast: refused, as F.conv2d does
        with pytest.raises(TypeError, match='does not match the weights'):
            WinogradConv2d(nn.Conv2d(8, 8, 3, padding=1), 2)(x.to(dtype))
        # converted in float32, then cast: refused at the forward, saying what to do
        module = WinogradConv2d(nn.Conv2d(8, 8, 3, padding=1), tile).to(dtype)
        with pytest.raises(ValueError, match=message + r".*converted with tile "
                                                       rf"{tile}: convert the model"):
            module(x.to(dtype))


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_autocast_computes_refused_tiles_directly(dtype):
    """Under autocast a float32 model's products would run in autocast's dtype: where it
    refuses the tile, the module computes the conv it replaced, as autocast runs it."""
    conv, x = _conv_128()
    module = WinogradConv2d(conv, 7, relu=True)
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
        out, expected = module(x), F.relu(conv(x))
    assert out.dtype == dtype and torch.equal(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # outside autocast: float32 Winograd again
        assert not torch.equal(module(x), F.relu(conv(x)))


def test_float16_tile_7_weights_fall_below_the_normal_range():
    """Why F(7x7) is refused in float16 beyond its rounding: at the point 3 the
    transformed weights are (3/350)^2 times the weights at most (range_growth), so for
    the weights of a 128-channel conv (below 0.03) that whole position of the
    transformed kernel lies below float16's smallest normal number, losing bits."""
    conv, _ = _conv_128()
    module = WinogradConv2d(conv.double(), 7)
    side, points = 9, list(winograd.POINTS[7])
    kernel = module.transformed_kernel().reshape(side, side, 128, 128)
    at_3 = kernel[points.index(3), points.index(3)].abs().max()
    assert at_3 <= conv.weight.abs().max() / range_growth(7)['kernel']
    assert at_3 < torch.finfo(torch.float16).tiny
    # F(2x2)'s smallest G row sums to 1: every position keeps the weights' magnitude
    kernel = WinogradConv2d(conv.double(), 2).transformed_kernel().reshape(16, -1)
    assert kernel.abs().amax(1).min() >= conv.weight.abs().max() / 4


def test_float16_tile_2_keeps_the_range_it_promises():
    """F(2x2)'s transformed inputs reach 4x the input (range_growth), so float16 inputs
    up to 65504 / 4 stay finite, with products no larger than 9 C max|w| max|x| (the
    weights here keep that below float16's largest)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1).half()
    with torch.no_grad():
        conv.weight.uniform_(-0.02, 0.02)
    limit = torch.finfo(torch.float16).max / range_growth(2)['input']
    x = (torch.rand(1, 16, 8, 8) * 2 - 1).sign() * limit * 0.97
    x = x.half()
    grow = range_growth(2)['products'] * 9 * 16 * float(conv.weight.detach().abs().max())
    assert grow * limit < torch.finfo(torch.float16).max
    with torch.no_grad():
        out, direct = WinogradConv2d(conv, 2)(x), conv(x)
        reference = copy.deepcopy(conv).double()(x.double())
    assert out.isfinite().all()
    assert_within_growth(out, direct, reference, 2)


def test_reduced_float32_matmuls_compute_refused_tiles_directly():
    """float32 tensors whose matmuls multiply in bfloat16 (CPU: oneDNN's fp32_precision
    'bf16'; CUDA's TF32 the same way): the torch-op form (as on CUDA, or without the C++
    kernel) would run its products there, so a refused tile computes the conv directly,
    with the same settings; an allowed one stays within its bound."""
    conv, x = _conv_128()
    reference = copy.deepcopy(conv).double()(x.double()).detach()
    modules = {tile: WinogradConv2d(conv, tile) for tile in (2, 7)}
    for module in modules.values():
        module.uses_kernel = False  # the torch-op form, as on CUDA
    with torch.no_grad(), fp32_math(torch.device('cpu'), 'tf32'):
        assert winograd._fp32_products('cpu') == 'bf16'
        direct = conv(x)
        assert torch.equal(modules[7](x), direct.contiguous(memory_format=torch.channels_last))
        assert_within_growth(modules[2](x), direct, reference, 2)
    assert winograd._fp32_products('cpu') == 'ieee'


def test_cuda_tf32_matmuls_are_read_without_a_gpu():
    # torch's CUDA matmul setting is readable on any machine: what a CUDA forward checks
    old = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = 'tf32'
        assert winograd._fp32_products('cuda') == 'tf32'
        torch.backends.cuda.matmul.fp32_precision = 'ieee'
        assert winograd._fp32_products('cuda') == 'ieee'
    finally:
        torch.backends.cuda.matmul.fp32_precision = old
    assert tile_refusal(7, TF32) and tile_refusal(2, TF32) is None


@pytest.mark.parametrize('how', ['bfloat16 model', 'float16 model', 'dtype=float16',
                                 'dtype=TF32', 'under float16 autocast'])
def test_auto_takes_the_allowed_tile(randomize, how):
    model = reparameterize(randomize(RepVGG('A0', out_indices=(3,))).eval())
    x = torch.randn(1, 3, 64, 64)
    fp32 = copy.deepcopy(model)
    convert_to_winograd(fp32, 'auto', x)
    # float32 takes larger tiles on these maps: the restriction is not vacuous
    assert max(m.tile for m in fp32.modules() if isinstance(m, WinogradConv2d)) > 2
    kwargs, context = {}, contextlib.nullcontext()
    if how.endswith('model'):
        dtype = torch.bfloat16 if how.startswith('bfloat16') else torch.float16
        model, x = model.to(dtype), x.to(dtype)
    elif how.startswith('dtype='):
        kwargs = dict(dtype=torch.float16 if how == 'dtype=float16' else TF32)
    else:
        context = torch.autocast('cpu', dtype=torch.float16)
    with context:
        convert_to_winograd(model, 'auto', x, **kwargs)
    assert {m.tile for m in model.modules() if isinstance(m, WinogradConv2d)} == {2}


def test_kernel_keeps_the_weights_at_their_size_and_transforms_them_once(vector_width):
    conv = _conv(32, 48, 2, bias=False, dtype=torch.float32)
    module = _kernel_module(32, 48, 6, 2, bias=False)
    # what a state dict (and a package) holds: the 3x3 weights, not (6+2)^2 / 9 times them
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == {
        'weight': (48, 16, 9)}
    x = torch.randn(1, 32, 12, 12)
    before = winograd_kernel.transformed_bytes()
    with torch.no_grad():
        first = module(x)
        grown = winograd_kernel.transformed_bytes() - before
        # 64 positions x 2 groups x 16 inputs x 24 outputs padded to whole panels
        panel = 2 * vector_width
        assert grown == 64 * 2 * 16 * (-(-24 // panel) * panel) * 4
        assert torch.equal(module(x), first)
        assert winograd_kernel.transformed_bytes() - before == grown  # kept, not redone
        module.weight.mul_(2)  # a write to the weights: transformed again
        assert torch.allclose(module(x), 2 * first, rtol=1e-5, atol=1e-5 * first.abs().max())
        assert torch.allclose(first, conv(x), rtol=1e-4, atol=1e-4 * first.abs().max())
    del module  # freed with the weights (at the kernel's next call or count)
    assert winograd_kernel.transformed_bytes() == before


def test_torch_form_keeps_its_kernel_only_where_the_cpp_kernel_does_not_run():
    """Moved to a dtype (or device, e.g. CUDA) the C++ kernel does not take, the module
    keeps the transformed kernel as a buffer for its torch ops instead of transforming the
    weights at every call; back where the C++ kernel runs, the buffer goes."""
    module = _kernel_module(16, 24, 4, 2)
    assert module.kernel is None
    x = torch.randn(1, 16, 9, 9, dtype=torch.float64)
    conv = _conv(16, 24, 2)
    module.double()
    assert module.kernel.dtype == torch.float64 and module.kernel.shape == (36 * 2, 8, 12)
    assert torch.equal(module.kernel, module.transformed_kernel())
    with torch.no_grad():
        out, expected = module(x), conv(x)
    # as in test_exact_in_float64: fp64 rounding, even magnified, far below 1e-10
    assert (out - expected).abs().max() < 1e-10 * expected.abs().max()
    module.float()
    assert module.kernel is None


def test_kernel_refuses_weights_that_do_not_fit_naming_shapes():
    module = _kernel_module(16, 32, 4)
    op = torch.ops.mmrepvgg.winograd_conv3x3
    matrices = (module.kernel_transform, module.input_transform, module.output_transform)
    x = torch.randn(1, 8, 6, 6)  # 8 channels, built for 16
    with pytest.raises(RuntimeError, match=r'does not fit input \[1, 8, 6, 6\]'):
        op(x, module.weight, module.bias, *matrices, 1, False)
    with pytest.raises(RuntimeError, match=r'transforms must be float32 \[S, S\] and \[m, S\]'):
        op(torch.randn(1, 16, 6, 6), module.weight, None, module.kernel_transform,
           module.output_transform, module.input_transform, 1, False)
    with pytest.raises(RuntimeError, match=r'weight must be a contiguous \[out, in/groups, 9\] '
                                           r'tensor .* of the input\'s dtype BFloat16'):
        op(torch.randn(1, 16, 6, 6).bfloat16(), module.weight, None, *matrices, 1, False)
    with pytest.raises(RuntimeError, match=r'input must be a 4-D float32 or bfloat16 CPU tensor'):
        op(torch.randn(1, 16, 6, 6).double(), module.weight, None, *matrices, 1, False)
    with pytest.raises(RuntimeError, match=r'kernel_transform must be a contiguous float64 \[6, 3\]'):
        op(torch.randn(1, 16, 6, 6), module.weight, None, module.kernel_transform.float(),
           *matrices[1:], 1, False)
    with pytest.raises(RuntimeError, match=r'32 floats per vector is not compiled in'):
        torch.ops.mmrepvgg.winograd_set_vector_width(32)


def test_conversion_moves_a_blocks_relu_into_its_conv(randomize):
    model = reparameterize(randomize(RepVGG('A0', out_indices=(3,))).eval())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        convert_to_winograd(model, 2)
        out = model(x)
    convs = [m for m in model.modules() if isinstance(m, WinogradConv2d)]
    assert len(convs) == 17 and all(c.relu for c in convs)
    assert all(isinstance(b.act, nn.Identity) == isinstance(b.fused, WinogradConv2d)
               for b in model.modules() if hasattr(b, 'fused'))
    assert torch.allclose(out[0], expected[0], rtol=1e-4, atol=1e-4 * expected[0].abs().max())


FALLBACK = """
import sys, torch
from torch import nn
from mmrepvgg.ops import winograd_kernel
from mmrepvgg.ops.winograd import WinogradConv2d
torch.manual_seed(0)
conv = nn.Conv2d(8, 8, 3, padding=1).eval()
module = WinogradConv2d(conv, 4)
x = torch.randn(1, 8, 8, 8)
assert not module.uses_kernel and module.kernel.shape == (36, 8, 8)
print(winograd_kernel.load_error())
with torch.no_grad():
    print(float((module(x) - conv(x)).abs().max() / conv(x).abs().max()))
"""


def test_without_the_kernel_torch_ops_compute_the_conv():
    import os
    import subprocess
    import sys
    env = dict(os.environ, **{winograd_kernel.DISABLE_ENV: '1'})
    result = subprocess.run([sys.executable, '-c', FALLBACK], env=env, capture_output=True,
                            text=True, timeout=300, check=True)
    reason, error = result.stdout.split('\n')[:2]
    assert winograd_kernel.DISABLE_ENV in reason
    # fp32 F(4x4) on an 8-channel conv: within error_growth(4) x a few ulps of the output
    assert float(error) < error_growth(4) * 1e-6


def test_vector_width_from_the_environment():
    import os
    import subprocess
    import sys
    if not winograd_kernel.load_kernel():
        pytest.skip(f'the C++ Winograd kernel is not available: {winograd_kernel.load_error()}')
    narrowest = winograd_kernel.vector_widths()[-1]
    script = ('import torch; from mmrepvgg.ops import winograd_kernel as k; k.load_kernel(); '
              'print(torch.ops.mmrepvgg.winograd_set_vector_width(0))')
    for value, expected in ((str(narrowest), f'{narrowest}\n'), ('32', None)):
        env = dict(os.environ, **{winograd_kernel.WIDTH_ENV: value})
        result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                                text=True, timeout=300)
        if expected:
            assert result.stdout == expected, result.stderr[-3000:]
        else:
            assert result.returncode != 0
            assert f"{winograd_kernel.WIDTH_ENV}='32': the Winograd op here is built with" \
                in result.stderr
