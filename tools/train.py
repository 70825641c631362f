"""Train any mmdet/mmseg config; the plugin is imported, so mmrepvgg types resolve."""
import argparse

from mmrepvgg.apis import train
from mmrepvgg.apis.config import DEFAULT_QAT_CALIB, add_runner_args
from mmrepvgg.errors import run_command


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
    parser.add_argument(
        '--qat', metavar='CHECKPOINT',
        help='quantization-aware fine-tuning of this trained checkpoint (training or '
             'fused form): the fused model with INT8 fake quantizers (NNCF), ranges '
             'calibrated first; set the fine-tune\'s schedule and learning rate with '
             '--cfg-options')
    parser.add_argument('--calib', type=int, default=DEFAULT_QAT_CALIB,
                        help='--qat: images that set the quantizers\' initial ranges')
    parser.add_argument('--calib-split', choices=('train', 'val', 'test'), default='train',
                        help='--qat: the dataloader they come from, read through the '
                             'test pipeline')
    add_runner_args(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    train(args.config, args.work_dir, args.cfg_options, args.launcher, args.mini,
          args.amp, args.resume, args.local_rank, args.qat, args.calib, args.calib_split)


if __name__ == '__main__':
    run_command(main)
