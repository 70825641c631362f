"""Winograd convolution for the fused model's 3x3 convs (an inference-speed option).

A fused RepVGG is a stack of 3x3 convs, and a 3x3 conv can be computed with fewer
multiplications by Winograd's minimal filtering F(m x m, 3 x 3) (Lavin & Gray 2016): each
(m+2)x(m+2) input tile and the kernel go to a transformed domain where the convolution is
an element-wise product, which over channels is one matrix product per tile position.
F(2x2, 3x3) needs 16 products for 4 outputs instead of 36 (2.25x fewer), F(4x4, 3x3) 36
for 16 instead of 144 (4x). The paper credits RepVGG's speed on GPUs to this (cuDNN picks
Winograd for 3x3 convs); oneDNN's CPU convs in torch are direct, so here it is written in
torch ops: ``torch.compile`` fuses the tile transforms into one loop each and the products
go to batched matmuls.

* ``WinogradConv2d(conv, tile)`` computes ``conv`` (3x3, stride 1, dilation 1, padding 1,
  any groups, zero padding) this way. Eager it is *slower* than ``F.conv2d`` (every
  transform step is a pass over memory); it pays off compiled, which is how
  ``mmrepvgg.deploy.optimize_for_inference(mode='winograd')`` uses it.
* ``convert_to_winograd(model, tile)`` replaces every such conv of a model, in place.

Accuracy: tile 2 computes in fp32 as accurately as a direct conv (the transforms are exact
small-integer sums; measured relative error per conv ~6e-7 against an fp64 reference,
the same as ``F.conv2d``). Tile 4 multiplies by fractions such as 1/6 and 1/24 and loses
about 4 bits (~1e-5 per conv): faster, use when that is acceptable.
"""
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Transform matrices of F(m x m, 3 x 3): output = A^T [(G g G^T) * (B^T d B)] A for a
# 3x3 kernel g and an (m+2)x(m+2) input tile d. Interpolation points 0, 1, -1 (m=2) and
# 0, 1, -1, 2, -2 (m=4), plus the point at infinity.
_TRANSFORMS = {
    2: dict(
        BT=[[1, 0, -1, 0],
            [0, 1, 1, 0],
            [0, -1, 1, 0],
            [0, 1, 0, -1]],
        G=[[1, 0, 0],
           [1 / 2, 1 / 2, 1 / 2],
           [1 / 2, -1 / 2, 1 / 2],
           [0, 0, 1]],
        AT=[[1, 1, 1, 0],
            [0, 1, -1, -1]]),
    4: dict(
        BT=[[4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1]],
        G=[[1 / 4, 0, 0],
           [-1 / 6, -1 / 6, -1 / 6],
           [-1 / 6, 1 / 6, -1 / 6],
           [1 / 24, 1 / 12, 1 / 6],
           [1 / 24, -1 / 12, 1 / 6],
           [0, 0, 1]],
        AT=[[1, 1, 1, 1, 1, 0],
            [0, 1, -1, 2, -2, 0],
            [0, 1, 1, 4, 4, 0],
            [0, 1, -1, 8, -8, 1]]),
}
TILES = tuple(_TRANSFORMS)
#: The tile of ``optimize_for_inference(mode='winograd')``: 4x fewer products than direct.
FASTEST_TILE = 4


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


def _apply_separably(matrix: Sequence[Sequence[float]], rows: List[Tensor],
                     columns_of: Callable[[Tensor], List[Tensor]]) -> List[Tensor]:
    """``matrix`` applied over tile rows (``rows``: one tensor per row tap), then over tile
    columns of each result (``columns_of``): the (u, v) terms of M d M^T, u-major."""
    out = []
    for part in (_combine(coef, rows) for coef in matrix):
        out += [_combine(coef, columns_of(part)) for coef in matrix]
    return out


def _check_tile(tile: int) -> None:
    if tile not in _TRANSFORMS:
        raise ValueError(f'unknown Winograd tile {tile!r}; valid: {TILES}')


class WinogradConv2d(nn.Module):
    """``conv`` (3x3, stride 1, dilation 1, padding 1, zero padding, any groups) computed
    with Winograd F(tile x tile, 3 x 3). Works on NCHW tensors of any memory format and
    returns a channels_last one; fastest under ``torch.compile`` on channels_last input.

    The transformed kernel is computed once, in float64, and kept as buffer ``kernel``
    (shape ``(tile+2)^2 * groups, in/groups, out/groups``); ``bias`` as given.
    """

    def __init__(self, conv: nn.Conv2d, tile: int = 2):
        super().__init__()
        reason = winograd_unsupported_reason(conv)
        if reason:
            raise ValueError(f'cannot compute this conv with Winograd: {reason}')
        _check_tile(tile)
        self.tile, self.groups = tile, conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        mats = _TRANSFORMS[tile]
        self._input_transform = mats['BT']
        self._output_transform = mats['AT']
        g = torch.tensor(mats['G'], dtype=torch.float64, device=conv.weight.device)
        weight = conv.weight.detach().to(torch.float64)
        # (G w G^T) for every (out, in) pair, laid out for one matmul per (tile position,
        # group): [position, group] x [in/groups, out/groups].
        side, out_per_group = tile + 2, self.out_channels // self.groups
        kernel = torch.einsum('uk,oikj,vj->uvio', g, weight, g)
        kernel = kernel.reshape(side * side, weight.shape[1], self.groups, out_per_group)
        kernel = kernel.permute(0, 2, 1, 3).reshape(side * side * self.groups,
                                                    weight.shape[1], out_per_group)
        self.register_buffer('kernel', kernel.to(conv.weight.dtype).contiguous())
        bias = None if conv.bias is None else conv.bias.detach().clone()
        self.register_buffer('bias', bias)

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, tile={self.tile}, '
                f'groups={self.groups}, bias={self.bias is not None}')

    def forward(self, x: Tensor) -> Tensor:
        n, channels, height, width = x.shape
        m, side, groups = self.tile, self.tile + 2, self.groups
        rows, cols = -(-height // m), -(-width // m)  # tiles per column / row
        # NHWC view; pad 1 on top/left, and bottom/right up to whole tiles.
        x = F.pad(x.permute(0, 2, 3, 1),
                  (0, 0, 1, cols * m + 1 - width, 1, rows * m + 1 - height))
        # Input transform B^T d B, separably: over tile rows, then tile columns.
        transformed = _apply_separably(
            self._input_transform, [x[:, i:i + m * rows:m] for i in range(side)],
            lambda part: [part[:, :, j:j + m * cols:m] for j in range(side)])
        tiles = n * rows * cols
        v = torch.stack(transformed).reshape(side * side, tiles, groups,
                                             channels // groups)
        v = v.transpose(1, 2).reshape(side * side * groups, tiles, channels // groups)
        # One matmul per (tile position, group) over the input channels.
        prod = torch.bmm(v, self.kernel)
        prod = prod.reshape(side, side, groups, tiles, -1).permute(0, 1, 3, 2, 4)
        prod = prod.reshape(side, side, n, rows, cols, self.out_channels)
        # Output transform A^T M A, separably.
        outputs = _apply_separably(self._output_transform, list(prod), list)
        y = torch.stack(outputs).reshape(m, m, n, rows, cols, self.out_channels)
        y = y.permute(2, 3, 0, 4, 1, 5).reshape(n, rows * m, cols * m, self.out_channels)
        y = y[:, :height, :width]
        if self.bias is not None:
            y = y + self.bias
        return y.permute(0, 3, 1, 2)


def convert_to_winograd(model: nn.Module, tile: int = 2) -> int:
    """Replace, in place, every conv of ``model`` that ``WinogradConv2d`` can compute.
    Returns how many were replaced. Call on an eval-mode model (e.g. a fused RepVGG);
    the replacements hold buffers, not parameters, so they do not train."""
    _check_tile(tile)
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children()
               if winograd_unsupported_reason(child) is None]
    for parent, name, child in targets:
        setattr(parent, name, WinogradConv2d(child, tile))
    return len(targets)
