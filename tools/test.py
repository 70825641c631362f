"""Test any mmdet/mmseg config; --deploy evaluates the fused (re-parameterized) model,
--backend an exported file of it (tools/export.py): ONNX in ONNX Runtime or OpenVINO, or
an AOTInductor package (.pt2) with --backend aoti."""
import argparse
import os.path as osp
import sys

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout

import mmrepvgg  # noqa: E402,F401  registers the plugin's modules
from mmrepvgg.deploy.backends import BACKENDS  # noqa: E402
from mmrepvgg.engine.cli import (add_common_args, apply_deploy,  # noqa: E402
                                 apply_test_args, attach_backend, build_runner,
                                 finish_distributed, load_config, resolve_checkpoint)


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
    parser.add_argument('--precision', choices=('fp32', 'bf16'), default='fp32',
                        help='backend arithmetic (bf16: OpenVINO; default fp32)')
    parser.add_argument('--out', help='mmdet: pickle of the raw results; '
                                      'mmseg: folder for the predicted maps')
    parser.add_argument('--show', action='store_true', help='show predictions in a window')
    parser.add_argument('--show-dir', help='folder for drawn predictions')
    parser.add_argument('--wait-time', type=float, default=2, help='seconds per --show')
    add_common_args(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args, osp.join(REPO, 'configs', '_base_', 'mini'))
    if args.backend:
        if args.deploy:
            raise SystemExit('--deploy fuses a checkpoint; an exported file is fused '
                             'already: drop --deploy')
        checkpoint = None  # the runner loads nothing: the weights are in the file
    else:
        # A URL is downloaded once: the form check and the runner read the same file.
        checkpoint = resolve_checkpoint(args.checkpoint)
        cfg = apply_deploy(cfg, checkpoint, args.deploy)
    cfg = apply_test_args(cfg, checkpoint, args.out, args.show, args.show_dir,
                          args.wait_time)
    runner = build_runner(cfg)
    if args.backend:
        attach_backend(runner, args.checkpoint, args.backend, args.precision)
    metrics = runner.test()
    finish_distributed()
    return metrics


if __name__ == '__main__':
    main()
