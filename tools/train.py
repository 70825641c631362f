"""Train any mmdet/mmseg config; the plugin is imported, so mmrepvgg types resolve."""
import argparse
import os.path as osp
import sys

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout

import mmrepvgg  # noqa: E402,F401  registers the plugin's modules
from mmrepvgg.engine.cli import (add_common_args, apply_train_args,  # noqa: E402
                                 build_runner, finish_distributed, load_config)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a detector or segmentor')
    parser.add_argument('config', help='config file')
    parser.add_argument('--amp', action='store_true',
                        help='mixed-precision training: float16 with a dynamic loss scale '
                             'on CUDA, bfloat16 autocast on CPU')
    parser.add_argument(
        '--resume', nargs='?', const='auto', metavar='CHECKPOINT',
        help='resume from CHECKPOINT, or from the latest checkpoint in the work dir '
             'when no path is given')
    add_common_args(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args, osp.join(REPO, 'configs', '_base_', 'mini'))
    cfg = apply_train_args(cfg, args.amp, args.resume)
    build_runner(cfg).train()
    finish_distributed()


if __name__ == '__main__':
    main()
