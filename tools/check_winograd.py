"""Print, per RepVGG variant and Winograd tile, how far the fused network computed with
Winograd convs is from the same network with direct convs.

    python tools/check_winograd.py [--archs B1g2 ...] [--tiles 2 4 6 7 auto] [--batch 4]
                                   [--size 224] [--limit 1e-4] [--seed 0] [--repeats 3]
    python tools/check_winograd.py --conv 128 28 [--precisions fp16 fp16-autocast bf16 ...]
                                   [--tiles 2 4 6 7] [--batch 1] [--seed 0]

The network is the fused backbone (batch norms with random statistics first, all four
stages' outputs); every conv Winograd can compute is replaced (``auto``: those where it
pays, each with its own tile; see ``mmrepvgg.ops.winograd``). Columns, each the
largest absolute difference over the largest output:

* vs direct: against the direct-conv fused network in fp32 (what a user compares);
* vs fp64: against the fused network run in float64, next to the direct convs' own fp32
  error.

Eager torch computes the same arithmetic as the compiled package (inductor reorders
sums, within fp32 rounding). Exits with status 1 if a row is further than --limit from
the direct convs.

``--conv CHANNELS SIZE`` checks one CHANNELS -> CHANNELS 3x3 conv (nn.Conv2d's default
init) on a SIZE x SIZE unit-variance input instead, per precision (``--precisions``:
``fp32``, ``fp16``/``bf16``, a model cast to that dtype, and ``fp16-autocast``/
``bf16-autocast``, a float32 model under autocast; ``--device cuda`` for a GPU) and
tile, against the conv in
float64 (on the cast data for a cast model; on the float32 data under autocast, whose
rounding of them is part of the error). Columns: whether the precision allows the tile
(``mmrepvgg.ops.winograd.allowed_tiles``) and its worst-case error
(``worst_case_error``); the largest difference from float64 over the largest output, of
the Winograd conv (a refused tile computed anyway with the torch-op form, as CUDA runs
it) and of the direct conv in the same precision; their ratio, and ``error_growth``,
which an allowed tile's ratio must stay within (else exit status 1).

Memory and time, per tile: the transformed weights the C++ op holds once the network has
run (``Winograd MB``, next to the fused weights' own size: (tile+2)^2 / 9 times those of
the convs it computes), and the median of --repeats eager calls (``ms``; indicative:
``tools/benchmark.py --modes winograd-aoti --winograd-tile T`` times the package).
"""
import argparse
import contextlib
import copy
import statistics
import sys
import time

import torch
from torch import nn

from mmrepvgg import RepVGG, reparameterize
from mmrepvgg.env import cpu_info
from mmrepvgg.errors import run_command
from mmrepvgg.numerics import flatten_outputs, fp32_math, output_error
from mmrepvgg.ops.winograd import (TILES, WinogradConv2d, allowed_tiles, convert_to_winograd,
                                   error_growth, worst_case_error)
from mmrepvgg.ops.winograd_kernel import load_kernel, transformed_bytes, vector_widths
from mmrepvgg.models import ARCH_SETTINGS
from mmrepvgg.reparam import randomize_norm_stats, rounding_errors

#: --precisions: name -> (dtype, under autocast)
PRECISIONS = {'fp32': (torch.float32, False), 'fp16': (torch.float16, False),
              'fp16-autocast': (torch.float16, True), 'bf16': (torch.bfloat16, False),
              'bf16-autocast': (torch.bfloat16, True)}


def _median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def check(arch, tiles, x, seed, repeats=3):
    """Rows (tile, convs replaced, vs direct, vs fp64, direct vs fp64, weights MB,
    Winograd MB, ms) for ``arch``; the first row (tile ``direct``) is the direct-conv
    network's."""
    model = reparameterize(randomize_norm_stats(RepVGG(arch), seed).eval())
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    direct = flatten_outputs(model(x))
    reference = flatten_outputs(copy.deepcopy(model).double()(x.double()))
    direct_error = output_error(direct, reference).relative
    rows = [('direct', 0, 0.0, direct_error, direct_error, weights, 0.0,
             _median_ms(lambda: model(x), repeats))]
    for tile in tiles:
        winograd = copy.deepcopy(model)
        replaced = convert_to_winograd(winograd, tile, x)
        held = transformed_bytes()
        out = flatten_outputs(winograd(x))
        held = (transformed_bytes() - held) / 2**20
        ms = _median_ms(lambda: winograd(x), repeats)
        rows.append((tile, replaced, output_error(out, direct).relative,
                     output_error(out, reference).relative, direct_error, weights, held, ms))
        winograd = None  # and with it the weights the op transformed
    return rows


@torch.no_grad()
def check_conv(channels, size, precisions, tiles, seed, batch=1, device='cpu'):
    """Rows (precision, tile, allowed, worst case, vs fp64, direct vs fp64, ratio,
    error_growth, within) for one ``channels`` -> ``channels`` 3x3 conv on a ``size`` x
    ``size`` map, on ``device`` (float32 in IEEE arithmetic: no TF32)."""
    torch.manual_seed(seed)
    conv32 = nn.Conv2d(channels, channels, 3, padding=1).to(device)
    x32 = torch.randn(batch, channels, size, size).to(device)
    with fp32_math(torch.device(device), 'fp32'):
        return _conv_rows(conv32, x32, precisions, tiles)


def _conv_rows(conv32, x32, precisions, tiles):
    rows = []
    for name in precisions:
        dtype, autocast = PRECISIONS[name]
        conv, x = (conv32, x32) if autocast else (copy.deepcopy(conv32).to(dtype),
                                                  x32.to(dtype))
        reference = copy.deepcopy(conv).double()(x.double())
        context = (torch.autocast(x32.device.type, dtype=dtype) if autocast
                   else contextlib.nullcontext())
        allowed = allowed_tiles(dtype)
        with context:
            direct = conv(x)
            for tile in tiles:
                if tile in allowed:
                    out = WinogradConv2d(conv, tile)(x)
                else:  # refused: what it would compute, by the torch-op form
                    out = WinogradConv2d(conv32, tile).to(conv.weight.dtype)._forward_torch(
                        x, dtype)
                errors = rounding_errors(out, direct, reference, factor=error_growth(tile))
                scale = errors['output_scale']
                rows.append((name, tile, tile in allowed, worst_case_error(tile, dtype),
                             errors['candidate_abs'] / scale, errors['baseline_abs'] / scale,
                             errors['margin'], error_growth(tile),
                             errors['within'] or tile not in allowed))
    return rows


def main_conv(args):
    channels, size = args.conv
    tiles = [int(t) for t in args.tiles if t != 'auto']
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith('cuda')
             else f'{cpu_info()[0]}, {torch.get_num_threads()} threads')
    print(f'# {where}, torch {torch.__version__}; {channels} -> {channels} channels, 3x3, '
          f'batch {args.batch}, {size}x{size}, seed {args.seed}')
    print('| precision | tile | allowed | worst case | vs fp64 | direct vs fp64 | ratio '
          '| error_growth |\n|---|---|---|---|---|---|---|---|')
    failed = []
    for (name, tile, allowed, worst, error, direct, ratio, growth,
         within) in check_conv(channels, size, args.precisions, tiles, args.seed, args.batch,
                                args.device):
        print(f'| {name} | {tile} | {"yes" if allowed else "refused"} | {worst:.2g} | '
              f'{error:.2e} | {direct:.2e} | {ratio:.1f} | {growth:.0f} |', flush=True)
        if not within:
            failed.append(f'{name} tile {tile}: {ratio:.3g}x the direct conv\'s error '
                          f'> error_growth {growth:.3g}')
    if failed:
        print('Winograd check failed:\n' + '\n'.join(failed), file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--archs', nargs='+', default=['B1g2'], choices=list(ARCH_SETTINGS))
    parser.add_argument('--tiles', nargs='+', default=[*map(str, TILES), 'auto'],
                        choices=[*map(str, TILES), 'auto'])
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--size', type=int, default=224, help='input side (pixels)')
    parser.add_argument('--limit', type=float, default=1e-4,
                        help='largest allowed difference from the direct convs, relative')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--repeats', type=int, default=3, help='timed eager calls per tile')
    parser.add_argument('--conv', type=int, nargs=2, metavar=('CHANNELS', 'SIZE'),
                        help='check one 3x3 conv per precision instead of a network')
    parser.add_argument('--precisions', nargs='+', choices=list(PRECISIONS),
                        default=['fp32', 'fp16', 'fp16-autocast', 'bf16', 'bf16-autocast'],
                        help='with --conv: the precisions to compute it in')
    parser.add_argument('--device', default='cpu',
                        help="with --conv: where to compute it ('cuda': the torch-op form "
                             'and autocast there)')
    args = parser.parse_args(argv)
    if args.conv:
        if args.batch == parser.get_default('batch'):
            args.batch = 1
        return main_conv(args)
    tiles = [t if t == 'auto' else int(t) for t in args.tiles]
    torch.manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size)
    print(f'# {cpu_info()[0]}, {torch.get_num_threads()} threads, batch {args.batch}, '
          f'{args.size}x{args.size}; Winograd op products: '
          f'{vector_widths()[0] if load_kernel() else "torch ops"}-float vectors')
    print(f'| arch | tile | convs | vs direct (max {args.limit:g}) | vs fp64 | direct vs fp64 '
          '| weights MB | Winograd MB | ms |\n|---|---|---|---|---|---|---|---|---|')
    failed = []
    for arch in args.archs:
        for (tile, replaced, vs_direct, vs_fp64, direct_error, weights, held,
             ms) in check(arch, tiles, x, args.seed, args.repeats):
            print(f'| {arch} | {tile} | {replaced} | {vs_direct:.2e} | {vs_fp64:.2e} | '
                  f'{direct_error:.2e} | {weights:.1f} | {held:.1f} | {ms:.1f} |', flush=True)
            if vs_direct > args.limit:
                failed.append(f'{arch} tile {tile}: {vs_direct:.3g} > {args.limit:g}')
    if failed:
        print('Winograd check failed:\n' + '\n'.join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    run_command(main)
