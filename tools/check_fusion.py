"""Print, per RepVGG variant, training and deploy parameter counts and the fusion error.

    python tools/check_fusion.py [--archs A0 B1g2 ...] [--size 64] [--seed 0]

Batch norms get random statistics first (the default init would hide fusion bugs).
fp32: max |fused - 3-branch| over max |output|; fp64: max abs difference, fused in fp64.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from mmrepvgg import RepVGG  # noqa: E402
from mmrepvgg.models import ARCH_SETTINGS  # noqa: E402
from mmrepvgg.reparam import (count_parameters, fusion_errors,  # noqa: E402
                              randomize_norm_stats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--archs', nargs='+', default=list(ARCH_SETTINGS))
    parser.add_argument('--size', type=int, default=64, help='probe side (pixels)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    probe = torch.randn(1, 3, args.size, args.size)
    print(f'| arch | training params (M) | deploy params (M) | fp32 relative | '
          f'fp64 absolute |\n|---|---|---|---|---|')
    for arch in args.archs:
        model = randomize_norm_stats(RepVGG(arch), args.seed).eval()
        deploy_params = count_parameters(RepVGG(arch, deploy=True))
        errors = fusion_errors(model, probe)
        print(f'| {arch} | {count_parameters(model) / 1e6:.2f} | {deploy_params / 1e6:.2f} | '
              f'{errors["fp32_relative"]:.2e} | {errors["fp64_absolute"]:.2e} |', flush=True)


if __name__ == '__main__':
    main()
