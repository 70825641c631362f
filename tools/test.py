"""Test any mmdet/mmseg config; --deploy evaluates the fused (re-parameterized) model
(--mode/--precision: its network prepared by an inference recipe in torch, e.g.
torch.compile in bf16), --backend an exported file of it (tools/export.py): ONNX in ONNX
Runtime or OpenVINO, or an AOTInductor package (.pt2) with --backend aoti."""
import argparse

from mmrepvgg.apis import test
from mmrepvgg.apis.config import add_runner_args
from mmrepvgg.deploy.backends import BACKENDS
from mmrepvgg.errors import run_command
from mmrepvgg.ops.inference import MODES


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test a detector or segmentor')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint (training or fused): a file, a URL or '
                                           'a model-zoo name such as open-mmlab://...; '
                                           'with --backend, the exported file')
    parser.add_argument(
        '--deploy', action='store_true',
        help='evaluate the fused model: a training checkpoint is fused after loading, a '
             'fused one is loaded into a model built in deploy form')
    parser.add_argument(
        '--backend', choices=BACKENDS,
        help='run the exported network (CHECKPOINT: an ONNX file of tools/export.py, or '
             'for aoti its .pt2 package) in this backend on CPU; the rest of the model, and '
             'the evaluation, stay torch')
    parser.add_argument('--mode', choices=MODES,
                        help='run the network (what tools/export.py exports) in torch with '
                             'this recipe of mmrepvgg.deploy.optimize_for_inference, '
                             'prepared for the test pipeline\'s image size (default: the '
                             'model as built); with --deploy, the fused network')
    parser.add_argument('--precision', choices=('fp32', 'bf16'), default='fp32',
                        help='arithmetic: of the backend (bf16: OpenVINO), or without '
                             '--backend of the network in torch (as --mode eager, unless '
                             '--mode says otherwise); default fp32')
    parser.add_argument('--out', help='mmdet: pickle of the raw results; '
                                      'mmseg: folder for the predicted maps')
    parser.add_argument('--show', action='store_true', help='show predictions in a window')
    parser.add_argument('--show-dir', help='folder for drawn predictions')
    parser.add_argument('--wait-time', type=float, default=2, help='seconds per --show')
    add_runner_args(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return test(args.config, args.checkpoint, args.deploy, args.backend, args.precision,
                args.out, args.show, args.show_dir, args.wait_time, args.work_dir,
                args.cfg_options, args.launcher, args.mini, args.local_rank, mode=args.mode)


if __name__ == '__main__':
    run_command(main)
