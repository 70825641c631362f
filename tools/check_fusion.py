"""Print, per RepVGG variant and block, training and deploy parameter counts and the
fusion error.

    python tools/check_fusion.py [--archs A0 B1g2 ...] [--blocks repvgg qa] [--size 64]
                                 [--seed 0]

Batch norms get random statistics first (the default init would hide fusion bugs). The
reference is the training form in fp64; errors are max absolute differences from it over
its largest output (``mmrepvgg.reparam.fusion_errors``):

* training fp32: the training form's own fp32 rounding;
* fused fp32: the fused model as deployed (mostly its conv kernels' rounding);
* fused weights: the fused fp32 weights run in fp64, the error fusion itself adds;
* margin: fused weights over training fp32; the check allows FUSION_MARGIN (or a few
  fp32 eps of the output scale, whichever is larger);
* fp64 absolute: the fusion done in fp64 (exact algebra leaves only fp64 rounding).

Exits with status 1 if a variant fails the check.
"""
import argparse
import sys

import torch

from mmrepvgg import RepVGG
from mmrepvgg.errors import run_command
from mmrepvgg.models import ARCH_SETTINGS, BLOCKS
from mmrepvgg.reparam import (FUSION_MARGIN, assert_fusion_exact,
                              count_parameters, fusion_errors, randomize_norm_stats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--archs', nargs='+', default=list(ARCH_SETTINGS))
    parser.add_argument('--blocks', nargs='+', default=['repvgg'], choices=list(BLOCKS),
                        help='training-form blocks to check (default repvgg)')
    parser.add_argument('--size', type=int, default=64, help='probe side (pixels)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    probe = torch.randn(1, 3, args.size, args.size)
    print(f'| arch | block | training params (M) | deploy params (M) | training fp32 | '
          f'fused fp32 | fused weights | margin (max {FUSION_MARGIN:g}) | fp64 absolute |\n'
          '|---|---|---|---|---|---|---|---|---|')
    failed = []
    for arch in args.archs:
        for block in args.blocks:
            failed += check(arch, block, probe, args.seed)
    if failed:
        print('fusion check failed:\n' + '\n'.join(failed), file=sys.stderr)
        return 1
    return 0


def check(arch, block, probe, seed):
    """Print one table row; the failure message in a list, or an empty list."""
    model = randomize_norm_stats(RepVGG(arch, block=block), seed).eval()
    deploy_params = count_parameters(RepVGG(arch, deploy=True))
    errors = fusion_errors(model, probe)
    print(f'| {arch} | {block} | {count_parameters(model) / 1e6:.2f} | '
          f'{deploy_params / 1e6:.2f} | '
          f'{errors["train_fp32_rel"]:.2e} | {errors["fused_fp32_rel"]:.2e} | '
          f'{errors["fused_weights_rel"]:.2e} | {errors["margin"]:.2f} | '
          f'{errors["fp64_abs"]:.1e} |', flush=True)
    try:
        assert_fusion_exact(errors)
    except AssertionError as exc:
        return [f'{arch} ({block} block): {exc}']
    return []


if __name__ == '__main__':
    run_command(main)
