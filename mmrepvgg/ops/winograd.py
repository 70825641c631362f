"""Winograd convolution for the fused model's 3x3 convs (an inference-speed option).

A fused RepVGG is a stack of 3x3 convs, and a 3x3 conv can be computed with fewer
multiplications by Winograd's minimal filtering F(m x m, 3 x 3) (Lavin & Gray 2016): each
(m+2)x(m+2) input tile and the kernel go to a transformed domain where the convolution is
an element-wise product, which over channels is one matrix product per tile position.
F(2x2, 3x3) needs 16 products for 4 outputs instead of 36 (2.25x fewer), F(4x4, 3x3) 36
for 16 (4x), F(6x6, 3x3) 64 for 36 (5.06x), F(7x7, 3x3) 81 for 49 (5.44x), when the
feature map splits into whole tiles; the transformed kernel is (m+2)^2 / 9 times the
conv's weights (4x for F(4x4), 9x for F(7x7)), and at small batches reading it is a good
part of the time. The paper credits RepVGG's speed on GPUs to this (cuDNN picks Winograd
for 3x3 convs); oneDNN's CPU convs in torch are direct, so here it is a C++ op
(``csrc/winograd_conv.cpp``: both transforms and the products in one call, the products
by a register-blocked kernel on weights it transforms and packs on first use) that eager, ``torch.compile`` and
AOTInductor packages all call. Where the op cannot be built (no C++ compiler) and off the
CPU, the same is computed with torch ops: each transform two passes (tile rows, then
tile columns) that inductor turns into one vectorised loop each, products by ``bmm``.

* ``WinogradConv2d(conv, tile)`` computes ``conv`` (3x3, stride 1, dilation 1, padding 1,
  any groups, zero padding) this way; ``optimize_for_inference(mode='winograd')`` and
  ``tools/export.py --format aoti --winograd`` use it.
* ``convert_to_winograd(model, tile, example_input)`` replaces every such conv of a model,
  in place; ``tile='auto'`` picks each conv's tile from the size of its feature map
  (``auto_tile``), which needs ``example_input``.

The transforms come from the interpolation points (``POINTS``) by the Toom-Cook
construction, exactly in rational arithmetic; the kernel transform is applied once, in
float64, when the model is first run (not stored: a package holds the 3x3 weights). Accuracy in fp32: tile 2 is as accurate as a direct conv (its transforms are
exact small-integer sums); tiles 4 and 6 multiply by fractions and powers of 2 and lose
a few bits (~1e-5 relative per conv, tests/test_winograd.py bounds it), tile 7 a few more
(about 10x tile 6's error). Reduced precisions (float16, bfloat16, autocast, TF32
matmuls) get only the tiles whose worst-case error stays within a bound derived from
the transforms (``allowed_tiles``, ``tile_refusal``): the transforms run in float32, the
transformed tiles, weights and their products are rounded to the reduced precision, and
``error_growth(tile)`` magnifies those roundings (256x at tile 4, 4176x at tile 7); in
float16, tile 7's transformed weights also fall below its normal range. In float16,
bfloat16 and TF32 that leaves tile 2, which ``tile='auto'`` takes; a tile asked for
outside the allowed ones is refused with its worst-case error.
"""
import functools
import math
from fractions import Fraction
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gemm_conv import GemmConv2d, gemm_pays, gemm_unsupported_reason
from .winograd_kernel import load_kernel

#: Interpolation points of F(m x m, 3 x 3) per output tile m (plus the point at infinity):
#: the usual small ones, whose powers stay near 1 in magnitude. Tile 7 (the one that splits
#: 14x14, 28x28 and 56x56 maps into whole tiles) needs eight; among the sets of 0, +-1 and
#: five of +-1/4, +-1/3, +-1/2, +-2/3, +-3/4, +-4/3, +-3/2, +-2, +-3, this one had about
#: a third of the fp32 error of the dyadic 0, +-1, +-2, +-1/2, -3/2 (random 128-channel
#: convs against float64; the rounding of its non-dyadic input-transform entries included).
POINTS = {2: (0, 1, -1),
          4: (0, 1, -1, 2, -2),
          6: (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2)),
          7: (0, 1, -1, Fraction(1, 2), Fraction(-1, 2), 3, Fraction(4, 3), Fraction(-4, 3))}
TILES = tuple(POINTS)
#: The tile of ``optimize_for_inference(mode='winograd')``: per conv, ``auto_tile``.
FASTEST_TILE = 'auto'
TileChoice = Union[int, str]
#: The dtypes the C++ kernel computes (on CPU): float32, and bfloat16, whose products run
#: as bfloat16 matmuls (oneDNN: AVX512-BF16 or AMX where the CPU has them).
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _polynomial(roots: Sequence[Fraction], length: int) -> List[Fraction]:
    """Coefficients, lowest power first, of prod (x - root), padded to ``length``."""
    coefficients = [Fraction(1)]
    for root in roots:
        shifted = [Fraction(0)] + coefficients
        for i in range(len(coefficients)):
            shifted[i] -= root * coefficients[i]
        coefficients = shifted
    return coefficients + [Fraction(0)] * (length - len(coefficients))


def transform_matrices(tile: int, kernel_size: int = 3) -> Dict[str, List[List[Fraction]]]:
    """``AT``, ``G``, ``BT`` of F(tile, kernel_size), exact: 1-D output
    ``AT [(G g) * (BT d)]`` for kernel g and input d of length tile + kernel_size - 1.

    Toom-Cook on points p_j and infinity: ``AT`` evaluates at the points (rows p_j^i),
    ``G`` evaluates the kernel scaled by 1 / prod_{l != j} (p_j - p_l), ``BT``'s rows are
    the coefficients of prod_{l != j} (x - p_l) (the last row: of prod_l (x - p_l)).
    """
    _check_tile(tile)
    points = [Fraction(p) for p in POINTS[tile]]
    side = tile + kernel_size - 1
    at = [[p ** i for p in points] + [Fraction(int(i == tile - 1))] for i in range(tile)]
    g, bt = [], []
    for j, p in enumerate(points):
        others = points[:j] + points[j + 1:]
        scale = Fraction(1)
        for q in others:
            scale *= p - q
        g.append([p ** k / scale for k in range(kernel_size)])
        bt.append(_polynomial(others, side))
    g.append([Fraction(0)] * (kernel_size - 1) + [Fraction(1)])
    bt.append(_polynomial(points, side))
    return dict(AT=at, G=g, BT=bt)


def _check_tile(tile) -> None:
    if tile not in POINTS:
        raise ValueError(f'unknown Winograd tile {tile!r}; valid: {TILES}')


#: ``tile='auto'`` takes a larger tile only when it saves more than this fraction of the
#: products: a larger tile is less accurate and gives its matmuls fewer rows (measured
#: on RepVGG-B1g2's 28x28 and 56x56 maps, where F(6x6) saves 9%, it was no faster).
LARGER_TILE_GAIN = 0.15
#: ``tile='auto'`` leaves a conv direct when it has fewer input or output channels per
#: group than this: its matrix products are too small to pay for the transforms
#: (measured with the C++ op, batch 4, 2 AVX2 cores, 56x56 maps, F(7x7) against oneDNN's
#: direct conv: 64 channels per group 10.6 ms against 13.2, 48 channels 3.6 against 4.4,
#: but 128 channels in 4 groups of 32 11.6 against 9.8).
MIN_CHANNELS_PER_GROUP = 48


def tile_products(tile: int, height: int, width: int) -> int:
    """Products per (input, output) channel pair of F(tile x tile, 3 x 3) on a
    ``height`` x ``width`` map padded to whole tiles (a direct conv needs 9 H W)."""
    return -(-height // tile) * -(-width // tile) * (tile + 2) ** 2


@functools.lru_cache(maxsize=None)
def error_growth(tile: int) -> float:
    """How much F(tile x tile, 3x3) can magnify rounding errors over a direct 3x3 conv.

    Winograd rounds the transformed tiles, whose entries are bounded by
    |A^T| (|G| |g| |G|^T (.) |B^T| |d| |B|) |A| where a direct conv's are bounded by
    sum |g||d|; with every |g| = |d| = 1 that is, per axis (the transforms are
    separable), max(|A^T| (|G| 1 (.) |B^T| 1)) against 3, squared for two axes:
    (8/3)^2 = 7.1 for tile 2, (48/3)^2 = 256 for tile 4 (the fractions of G and the
    powers of 2 in A^T), 509 for tile 6, 4176 for tile 7. Worst cases: random data
    stays well below.
    """
    m = transform_matrices(tile)
    g = [sum(abs(c) for c in row) for row in m['G']]
    bt = [sum(abs(c) for c in row) for row in m['BT']]
    per_axis = max(sum(abs(a) * gj * bj for a, gj, bj in zip(row, g, bt)) for row in m['AT'])
    return float(per_axis / 3) ** 2


@functools.lru_cache(maxsize=None)
def range_growth(tile: int) -> Dict[str, float]:
    """How far F(tile x tile, 3x3) moves magnitudes, from its transforms' row sums:

    * ``input``: the transformed input tiles reach this multiple of the input's largest
      value ((max row sum of |B^T|)^2);
    * ``products``: their products summed over channels, this multiple of the largest
      output a conv of weights and inputs of those magnitudes can have
      (9 C max|w| max|x| for C input channels);
    * ``kernel``: the transformed weights at the point whose row of G sums smallest are
      this many times smaller than the weights (1 / (min row sum of |G|)^2).
    """
    m = transform_matrices(tile)
    g = [sum(abs(c) for c in row) for row in m['G']]
    bt = [sum(abs(c) for c in row) for row in m['BT']]
    return dict(input=float(max(bt)) ** 2,
                products=float(max(a * b for a, b in zip(g, bt))) ** 2 / 9,
                kernel=1 / float(min(g)) ** 2)


class Arithmetic(NamedTuple):
    """The number format Winograd's products are rounded to: machine epsilon and the
    normal range (largest finite and smallest normal magnitude)."""
    name: str
    eps: float
    max: float
    tiny: float


def arithmetic(dtype: torch.dtype) -> Arithmetic:
    """The ``Arithmetic`` of a floating-point dtype."""
    info = torch.finfo(dtype)
    return Arithmetic(str(dtype).replace('torch.', ''), info.eps, info.max, info.tiny)


_FP32 = torch.finfo(torch.float32)
#: float32 tensors multiplied with TF32's 10-bit fraction (``torch.backends.cuda.matmul.
#: fp32_precision = 'tf32'``, ``torch.set_float32_matmul_precision('high')``): float32's
#: range, float16's precision.
TF32 = Arithmetic('TF32 (float32 tensors)', 2.0 ** -10, _FP32.max, _FP32.tiny)
#: float32 tensors multiplied in bfloat16 (oneDNN, ``torch.backends.mkldnn.matmul.
#: fp32_precision = 'bf16'``).
BF16_PRODUCTS = Arithmetic('bfloat16 products (float32 tensors)',
                           torch.finfo(torch.bfloat16).eps, _FP32.max, _FP32.tiny)


def worst_case_error(tile: int, precision: Union[torch.dtype, Arithmetic]) -> float:
    """The largest error F(tile x tile, 3x3) can make when its products run in
    ``precision``, relative to the largest output a conv of weights and inputs of those
    magnitudes can have (9 C max|w| max|x|): the transformed input tiles, the
    transformed weights and their products over channels are each rounded to it (eps / 2
    each), and ``error_growth(tile)`` magnifies all three (the float32 transforms' own
    rounding is negligible next to them). A direct conv summing in float32 rounds once:
    eps / 2."""
    precision = _as_arithmetic(precision)
    return 3 * precision.eps / 2 * error_growth(tile)


#: The worst-case error (``worst_case_error``) a Winograd conv may have in any precision:
#: F(2x2)'s in bfloat16 (7.1 x 3 roundings of 2^-8 = 8.3% of the largest output; measured:
#: about twice a direct bfloat16 conv's error), the tile bfloat16 models compute with. A
#: tile beyond it in a precision is refused there: in float16, TF32 and bfloat16 that
#: leaves F(2x2) (F(4x4) would reach 37% in float16, 300% in bfloat16); float32 keeps
#: every tile (F(7x7): 0.075%).
MAX_WORST_CASE_ERROR = 3 * torch.finfo(torch.bfloat16).eps / 2 * error_growth(2)


def _as_arithmetic(precision: Union[torch.dtype, Arithmetic]) -> Arithmetic:
    return precision if isinstance(precision, Arithmetic) else arithmetic(precision)


def _range_binades(tile: int) -> float:
    """How many binades (powers of 2) F(tile) spreads the values it rounds over, beyond
    the data's own: up by the larger of its input and product growth, down by the
    transformed weights' shrink."""
    grow = range_growth(tile)
    return math.log2(max(grow['input'], grow['products'])) + math.log2(grow['kernel'])


def _refusal_reasons(tile: int, precision: Arithmetic) -> List[str]:
    reasons = []
    error = worst_case_error(tile, precision)
    if error > MAX_WORST_CASE_ERROR:
        reasons.append(
            f'its transforms magnify rounding errors up to {error_growth(tile):.0f}x, so its '
            f'worst-case error is {100 * error:.3g}% of the conv\'s largest possible output (3 '
            f'roundings of eps/2 = {50 * precision.eps:.2g}% each; a direct conv rounds once), '
            f'beyond the {100 * MAX_WORST_CASE_ERROR:.2g}% every Winograd conv here is held to '
            '(F(2x2) in bfloat16)')
    # The normal range is shared by the data (weights ~1e-3..1, activations up to
    # ~1e3) and the transforms' spread: a tile may take at most half of it.
    binades = math.log2(precision.max / precision.tiny)
    spread = _range_binades(tile)
    if spread > binades / 2:
        grow = range_growth(tile)
        reasons.append(
            f'its transforms spread values over {spread:.1f} of the {binades:.0f} binades '
            f'of {precision.name}\'s normal range (at most half may go to them): '
            f'transformed inputs overflow {precision.max:.5g} for inputs above '
            f'{precision.max / grow["input"]:.3g}, transformed weights fall below '
            f'{precision.tiny:.2g} (losing bits) for weights under '
            f'{precision.tiny * grow["kernel"]:.2g}')
    return reasons


def allowed_tiles(precision: Union[torch.dtype, Arithmetic]) -> tuple:
    """The tiles Winograd computes in ``precision`` (a dtype, ``TF32`` or
    ``BF16_PRODUCTS``): those whose worst-case error stays within
    ``MAX_WORST_CASE_ERROR`` and whose transforms take at most half of the format's
    normal range. float32 and float64: all of ``TILES``; float16, bfloat16, TF32: (2,)."""
    precision = _as_arithmetic(precision)
    return tuple(t for t in TILES if not _refusal_reasons(t, precision))


def tile_refusal(tile: int, precision: Union[torch.dtype, Arithmetic]) -> Optional[str]:
    """Why F(tile x tile, 3x3) is refused in ``precision`` (None when it is allowed)."""
    precision = _as_arithmetic(precision)
    reasons = _refusal_reasons(tile, precision)
    if not reasons:
        return None
    return (f'Winograd F({tile}x{tile}, 3x3) in {precision.name} is refused: '
            + '; and '.join(reasons)
            + f'. Tiles allowed in {precision.name}: {allowed_tiles(precision)}')


#: ``tile_refusal`` of every tile in the precisions a forward can meet, looked up by
#: (tile, dtype or Arithmetic): a dict lookup, which ``torch.compile`` folds.
_REFUSALS = {(t, p): tile_refusal(t, p) for t in TILES
             for p in (torch.float64, torch.float32, torch.float16, torch.bfloat16,
                       TF32, BF16_PRODUCTS)}
#: The tiles ``tile='auto'`` chooses from for a bfloat16 model (``allowed_tiles``): only
#: F(2x2), whose transforms are small-integer sums (``tools/check_winograd.py --conv 128
#: 28``: 0.53% of the largest output against 0.28% for a direct bfloat16 conv; F(4x4)
#: 8.1%).
BF16_TILES = allowed_tiles(torch.bfloat16)
#: The same for float16: F(4x4) would reach 37% in the worst case (float16's 2^-11 x 3 x
#: 256), F(7x7)'s transformed weights fall below float16's normal range.
FP16_TILES = allowed_tiles(torch.float16)


@torch.compiler.assume_constant_result
def _fp32_products(device_type: str) -> str:
    """How torch multiplies float32 matrices on ``device_type`` now: 'tf32', 'bf16' or
    'ieee' (torch's fp32_precision settings, 'none' meaning IEEE). ``torch.compile``
    takes the value at compile time (it cannot read these settings in a graph)."""
    backend = {'cuda': 'cuda', 'cpu': 'mkldnn'}.get(device_type)
    if backend is None:
        return 'ieee'
    try:
        value = torch._C._get_fp32_precision_getter(backend, 'matmul')
    except (AttributeError, RuntimeError):  # a torch without the fp32_precision API
        if device_type == 'cuda' and torch.backends.cuda.matmul.allow_tf32:
            return 'tf32'
        return 'ieee'
    return value if value in ('tf32', 'bf16') else 'ieee'


def auto_tile(height: int, width: int, tiles: Sequence[int] = TILES) -> int:
    """The tile ``tile='auto'`` gives a conv on a ``height`` x ``width`` map, of
    ``tiles``: the one with the fewest products, unless a smaller one needs at most
    ``LARGER_TILE_GAIN`` more (e.g. 7 for 14x14 and 56x56 maps, 6 for 48x48)."""
    fewest = min(tile_products(t, height, width) for t in tiles)
    return min(t for t in tiles
               if tile_products(t, height, width) <= fewest * (1 + LARGER_TILE_GAIN))


def winograd_pays(conv: nn.Conv2d) -> bool:
    """Whether ``tile='auto'`` computes ``conv`` with Winograd (see
    ``MIN_CHANNELS_PER_GROUP``)."""
    return min(conv.in_channels, conv.out_channels) // conv.groups >= MIN_CHANNELS_PER_GROUP


def winograd_unsupported_reason(conv: nn.Module) -> Optional[str]:
    """Why ``conv`` cannot be computed by ``WinogradConv2d`` (None when it can)."""
    if type(conv) is not nn.Conv2d:
        return f'{type(conv).__name__} is not a plain nn.Conv2d'
    wanted = dict(kernel_size=(3, 3), stride=(1, 1), dilation=(1, 1), padding=(1, 1),
                  padding_mode='zeros')
    for name, value in wanted.items():
        if getattr(conv, name) != value:
            return f'{name}={getattr(conv, name)!r} (Winograd here needs {value!r})'
    return None


def _combine(coefficients: Sequence[float], terms: List[Tensor]) -> Tensor:
    """sum(c * t), skipping zero coefficients and multiplications by +-1."""
    total = None
    for c, term in zip(coefficients, terms):
        if c == 0:
            continue
        term = term if c == 1 else -term if c == -1 else term * c
        total = term if total is None else total + term
    return total


def _transform(matrix: Sequence[Sequence[float]], taps: List[Tensor], dim: int) -> Tensor:
    """``matrix`` applied over one tile axis: row k of it combines the taps (one tensor
    per tile position along that axis) into slice k of the result's new axis ``dim``.
    One pass: inductor fuses the combinations into one loop writing the stacked result."""
    return torch.stack([_combine(row, taps) for row in matrix], dim)


class WinogradConv2d(nn.Module):
    """``conv`` (3x3, stride 1, dilation 1, padding 1, zero padding, any groups) computed
    with Winograd F(tile x tile, 3 x 3), then the ReLU when ``relu``. Works on NCHW tensors
    of any memory format and returns a channels_last one.

    On CPU float32 and bfloat16 (``KERNEL_DTYPES``) it calls the C++ kernel
    (``mmrepvgg.ops.winograd_kernel``; one op,
    which ``torch.export`` and AOTInductor keep as a call); where that kernel cannot be
    built, and on other devices and dtypes, it computes the same with torch ops, which are
    fast only under ``torch.compile``. ``uses_kernel`` says which.

    Precision: the products run in the input's dtype (float16, bfloat16: transforms in
    float32, the transformed tiles and weights rounded to it for the matmuls), and only
    the tiles ``allowed_tiles`` gives that precision are computed: a conv in a dtype that
    refuses its tile is a ValueError, at construction and at a forward that meets one
    (e.g. a model cast to float16 after its conversion). Precisions chosen at run time
    fall back instead: under ``torch.autocast`` the products would run in autocast's
    dtype, and with float32 matmuls in TF32 or bfloat16 (torch's fp32_precision
    settings) in those; where that precision refuses the tile, the module computes its
    conv directly (``F.conv2d``, as the conv it replaced would have run there). A compiled
    module keeps the matmul setting it was compiled under.

    Buffers: ``weight``, the conv's 3x3 kernels as ``[out, in/groups, 9]`` (3-D, so that
    converting a module to channels_last leaves it alone), and ``bias``: a package or a
    state dict holds the weights at their own size. The C++ kernel transforms them (G w
    G^T, in float64) on its first call and keeps the result while ``weight`` lives; the
    torch-op form uses ``transformed_kernel()``, kept as buffer ``kernel`` while the
    module's device or dtype leave it to the torch ops (no C++ kernel, CUDA, float16).
    """

    def __init__(self, conv: nn.Conv2d, tile: int = 4, relu: bool = False):
        super().__init__()
        reason = winograd_unsupported_reason(conv)
        if reason:
            raise ValueError(f'cannot compute this conv with Winograd: {reason}')
        _check_tile(tile)
        refusal = tile_refusal(tile, conv.weight.dtype)
        if refusal:
            raise ValueError(refusal)
        self.tile, self.groups, self.relu = tile, conv.groups, relu
        # the C++ kernel, where it builds, computes float32 on CPU; else torch ops do
        self.uses_kernel = load_kernel()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        exact = transform_matrices(tile)
        # the data transforms' entries: dyadic rationals (exact in fp32), except tile 7's
        self._input_transform = [[float(c) for c in row] for row in exact['BT']]
        self._output_transform = [[float(c) for c in row] for row in exact['AT']]
        self._kernel_transform = [[float(c) for c in row] for row in exact['G']]
        for name, dtype in self._MATRICES.items():  # as tensors, for the C++ kernel
            self.register_buffer(name, torch.tensor(getattr(self, '_' + name), dtype=dtype),
                                 persistent=False)
        weight = conv.weight.detach()
        self.register_buffer('weight', weight.reshape(weight.shape[0], weight.shape[1], 9)
                             .clone(memory_format=torch.contiguous_format))
        self.register_buffer('kernel', None, persistent=False)
        self._keep_torch_kernel()
        bias = None if conv.bias is None else conv.bias.detach().clone()
        self.register_buffer('bias', bias)

    #: The transform matrices' dtypes in the C++ kernel's interface: G is applied in
    #: float64, the data transforms in float32, whatever the model's dtype.
    _MATRICES = dict(input_transform=torch.float32, output_transform=torch.float32,
                     kernel_transform=torch.float64)

    def _apply(self, fn, recurse=True):
        """``module.to(...)``/``.bfloat16()`` etc. move the matrices but keep their dtypes,
        and keep the torch-op form's kernel where the C++ kernel will not run."""
        super()._apply(fn, recurse)
        for name, dtype in self._MATRICES.items():
            current = getattr(self, name)
            if current.dtype != dtype:  # from the exact values: no double rounding
                setattr(self, name, torch.tensor(getattr(self, '_' + name), dtype=dtype,
                                                 device=current.device))
        self._keep_torch_kernel()
        return self

    def _keep_torch_kernel(self) -> None:
        """Buffer ``kernel`` (``transformed_kernel()``) exactly when the weights' device or
        dtype leave the forward to the torch ops (no C++ kernel, another device or dtype):
        transformed once, not at every call."""
        kernel_runs = (self.uses_kernel and self.weight.device.type == 'cpu'
                       and self.weight.dtype in KERNEL_DTYPES)
        if kernel_runs:
            self.kernel = None
        elif self.kernel is None:
            self.kernel = self.transformed_kernel()

    def transformed_kernel(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """(G w G^T) for every (out, in) pair, computed in float64 and rounded once to
        ``dtype`` (default: the weights'), laid out for one matmul per (tile position,
        group): ``[(tile+2)^2 * groups, in/groups, out/groups]``."""
        side, per_group = self.tile + 2, self.out_channels // self.groups
        g = self.kernel_transform.to(self.weight.device)
        weight = self.weight.to(torch.float64).unflatten(2, (3, 3))
        kernel = torch.einsum('uk,oikj,vj->uvio', g, weight, g)
        kernel = kernel.reshape(side * side, weight.shape[1], self.groups, per_group)
        kernel = kernel.permute(0, 2, 1, 3).reshape(side * side * self.groups,
                                                    weight.shape[1], per_group)
        return kernel.to(dtype or self.weight.dtype).contiguous()

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, tile={self.tile}, '
                f'groups={self.groups}, bias={self.bias is not None}, relu={self.relu}, '
                f'uses_kernel={self.uses_kernel}')

    def forward(self, x: Tensor) -> Tensor:
        device = x.device.type
        autocast = (x.is_floating_point() and x.dtype != torch.float64
                    and torch.is_autocast_enabled(device))
        settings = autocast  # the precision comes from run-time settings, not the model
        if autocast:  # torch.bmm would run in autocast's dtype
            products = precision = torch.get_autocast_dtype(device)
        else:
            if x.dtype != self.weight.dtype:  # as F.conv2d: no silent cast
                raise TypeError(f'input dtype {x.dtype} does not match the weights\' '
                                f'{self.weight.dtype}: cast the module, or run it under '
                                'torch.autocast')
            if self.uses_kernel and device == 'cpu' and x.dtype in KERNEL_DTYPES:
                refusal = _REFUSALS.get((self.tile, x.dtype))
                if refusal:
                    raise ValueError(self._refused(refusal))
                # (its float32 products are its own, IEEE; bfloat16's torch's matmul)
                return torch.ops.mmrepvgg.winograd_conv3x3(
                    x, self.weight, self.bias, self.kernel_transform, self.input_transform,
                    self.output_transform, self.groups, self.relu)
            products = precision = x.dtype
            if x.dtype == torch.float32:
                mode = _fp32_products(device)
                settings = mode != 'ieee'
                precision = {'tf32': TF32, 'bf16': BF16_PRODUCTS}.get(mode, x.dtype)
        refusal = _REFUSALS.get((self.tile, precision))
        if refusal:
            if settings:
                return self._forward_direct(x)
            raise ValueError(self._refused(refusal))
        y = self._forward_torch(x, products)
        return y.relu() if self.relu else y

    def _refused(self, refusal: str) -> str:
        return (f'{refusal}. This conv was converted with tile {self.tile}: convert the '
                "model in the dtype it runs in (tile='auto' takes an allowed tile)")

    def _forward_direct(self, x: Tensor) -> Tensor:
        """The conv, computed directly: where the precision chosen at run time (autocast,
        TF32 or bfloat16 float32 matmuls) refuses the tile."""
        y = F.conv2d(x, self.weight.unflatten(2, (3, 3)), self.bias, padding=1,
                     groups=self.groups)
        y = y.relu() if self.relu else y
        return y.contiguous(memory_format=torch.channels_last)

    def _forward_torch(self, x: Tensor, products: Optional[torch.dtype] = None) -> Tensor:
        """The torch-op form, its matmuls in ``products`` (default: the input's dtype).
        The transforms run in float32 at least: a float16 or bfloat16 conv rounds only
        the matmuls' operands and results to its dtype, as the C++ kernel does for
        bfloat16 (float16 sums inside the transforms would also overflow sooner)."""
        products = x.dtype if products is None else products
        compute = torch.promote_types(x.dtype, torch.float32)
        x = x.to(compute)
        n, channels, height, width = x.shape
        m, side, groups = self.tile, self.tile + 2, self.groups
        rows, cols = -(-height // m), -(-width // m)  # tiles per column / row
        # NHWC view; pad 1 on top/left, and bottom/right up to whole tiles.
        x = F.pad(x.permute(0, 2, 3, 1),
                  (0, 0, 1, cols * m + 1 - width, 1, rows * m + 1 - height))
        # Input transform B^T d B: over tile rows, then over tile columns.
        bt = self._input_transform
        v = _transform(bt, [x[:, i:i + m * rows:m] for i in range(side)], 0)
        v = _transform(bt, [v[:, :, :, j:j + m * cols:m] for j in range(side)], 1)
        tiles = n * rows * cols  # v: [row pos, column pos, n, rows, cols, channels]
        v = v.reshape(side * side, tiles, groups, channels // groups)
        v = v.transpose(1, 2).reshape(side * side * groups, tiles, channels // groups)
        # One matmul per (tile position, group) over the input channels.
        kernel = (self.transformed_kernel(products) if self.kernel is None
                  else self.kernel.to(products))
        prod = torch.bmm(v.to(products), kernel).to(compute)
        prod = prod.reshape(side * side, groups, tiles, -1).transpose(1, 2)
        prod = prod.reshape(side, side, n, rows, cols, self.out_channels)
        # Output transform A^T M A: over tile rows, then over tile columns.
        at = self._output_transform
        y = _transform(at, list(prod), 0)
        y = _transform(at, [y[:, j] for j in range(side)], 1)
        y = y.permute(2, 3, 0, 4, 1, 5).reshape(n, rows * m, cols * m, self.out_channels)
        y = y[:, :height, :width]
        if self.bias is not None:
            y = y + self.bias.to(compute)
        return y.permute(0, 3, 1, 2).to(products)


def _input_sizes(model: nn.Module, convs: Sequence[nn.Module],
                 example_input: Tensor) -> Dict[int, tuple]:
    """(H, W) of each conv's input on ``example_input``, by id of the conv."""
    sizes: Dict[int, tuple] = {}

    def record(module, args):
        sizes.setdefault(id(module), tuple(args[0].shape[-2:]))

    hooks = [conv.register_forward_pre_hook(record) for conv in convs]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def convert_to_winograd(model: nn.Module, tile: TileChoice = 4,
                        example_input: Optional[Tensor] = None,
                        dtype: Union[torch.dtype, Arithmetic, None] = None) -> int:
    """Replace, in place, every conv of ``model`` that ``WinogradConv2d`` can compute.
    Returns how many convs were replaced. Call on an eval-mode model (e.g. a fused
    RepVGG); the replacements hold buffers, not parameters, so they do not train.

    ``tile``: one of ``TILES`` for every conv, or ``'auto'``: per conv, ``auto_tile`` of
    the feature map it gets on ``example_input`` (a batch of the size to be run), among
    the tiles its precision allows (``allowed_tiles``: only F(2x2) in float16 and
    bfloat16), for the
    convs where Winograd pays (``winograd_pays``); ``'auto'`` also computes the strided
    convs where one matmul beats the direct conv as a ``GemmConv2d`` (``gemm_pays``). The
    others, and any conv that input does not reach, keep their direct form. A fused
    RepVGG block's ReLU moves into its Winograd conv (the block's ``act`` becomes an
    ``nn.Identity``).

    ``dtype``: the precision the convs' products will run in when it is not their
    weights' dtype, e.g. ``torch.float16`` for a float32 model that will run under
    float16 autocast, or ``TF32`` for one whose float32 matmuls will run in TF32 (the
    torch-op form on CUDA); by default the weights' dtype, or autocast's dtype when this
    is called under ``torch.autocast`` (matmul settings are read at the forward, not
    here). A tile that precision refuses is a ValueError (``tile_refusal``: its
    worst-case error and the allowed tiles), raised before any conv is replaced.
    """
    auto = tile == 'auto'
    if not auto:
        _check_tile(tile)
    elif example_input is None:
        raise ValueError("tile='auto' picks each conv's tile from its feature-map size: "
                         'pass example_input, a batch of the size to be run')

    def winograd_takes(conv: nn.Module) -> bool:  # with tile 'auto', only where it pays
        return winograd_unsupported_reason(conv) is None and (not auto or winograd_pays(conv))

    def precision(conv: nn.Module):  # the one the products will run in
        if dtype is not None:
            return dtype
        device = conv.weight.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return conv.weight.dtype

    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children()
               if winograd_takes(child) or (auto and gemm_unsupported_reason(child) is None)]
    if not auto:  # refuse before replacing any conv
        for _, _, child in targets:
            refusal = tile_refusal(tile, precision(child))
            if refusal:
                raise ValueError(refusal)
    sizes = _input_sizes(model, [child for _, _, child in targets],
                         example_input) if auto else {}
    replaced = 0
    for parent, name, child in targets:
        if auto and id(child) not in sizes:
            continue
        if winograd_takes(child):
            relu = _relu_follows(parent, name)
            chosen = (auto_tile(*sizes[id(child)], allowed_tiles(precision(child))) if auto
                      else tile)
            setattr(parent, name, WinogradConv2d(child, chosen, relu=relu))
            if relu:  # computed by the conv's output transform now
                parent.act = nn.Identity()
        elif gemm_pays(child, sizes[id(child)]):
            setattr(parent, name, GemmConv2d(child))
        else:
            continue
        replaced += 1
    return replaced


def _relu_follows(parent: nn.Module, name: str) -> bool:
    """Whether ``parent.<name>`` is a fused RepVGG block's conv followed directly by its
    ReLU (no squeeze-excite between): the ReLU can then be applied in the conv's output
    transform, saving a pass over the feature map."""
    from ..models.rep_block import RepVGGBlock
    return (isinstance(parent, RepVGGBlock) and name == 'fused' and parent.se is None
            and type(parent.act) is nn.ReLU)
