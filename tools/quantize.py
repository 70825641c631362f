"""Quantize an exported network to static INT8 (QDQ), calibrated on the config's data.

  python tools/quantize.py CONFIG MODEL OUTPUT.onnx [--calib N] [--method M]
                           [--split test|val|train] [--per-tensor] [--reduce-range]
                           [--part model|backbone] [--dynamic] [--shape H W]
                           [--mini] [--cfg-options ...]

MODEL is an fp32 .onnx file of tools/export.py, or a checkpoint (training or fused, a
whole model or, with --part backbone, a backbone release file), exported first as
tools/export.py would with the same --part, --dynamic and --shape (a detector always
with --dynamic). The N calibration images are the first of the --split dataset (default
test; train keeps them apart from the evaluation images), read through the config's test
pipeline and its data preprocessor, as in tools/test.py.
Evaluate the result like any exported model:

  python tools/test.py CONFIG OUTPUT.onnx --backend onnxruntime   (or openvino)
"""
import argparse
import os.path as osp
import sys
import tempfile

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout

import mmrepvgg  # noqa: E402,F401  registers the plugin's modules
from mmengine.config import DictAction  # noqa: E402
from mmrepvgg.deploy import (PARTS, ExportFailure, config_input_shape,  # noqa: E402
                             export_model)
from mmrepvgg.deploy.quantize import METHODS, calibration_inputs, quantize_onnx  # noqa: E402
from mmrepvgg.engine.cli import load_config, scope_of  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Quantize an exported ONNX file to INT8')
    parser.add_argument('config', help='the config the file was exported from')
    parser.add_argument('model', help='fp32 ONNX file written by tools/export.py, or a '
                                      'checkpoint to export first')
    parser.add_argument('output', help='the INT8 ONNX file to write')
    parser.add_argument('--calib', type=int, default=32,
                        help='number of calibration images (default 32)')
    parser.add_argument('--method', choices=METHODS, default='minmax',
                        help='how activation ranges are chosen (default minmax)')
    parser.add_argument('--split', choices=('test', 'val', 'train'), default='test',
                        help='the dataset the images come from, read through the test '
                             'pipeline (default test)')
    parser.add_argument('--per-tensor', action='store_true',
                        help='one scale per weight tensor instead of per output channel')
    parser.add_argument('--reduce-range', action='store_true',
                        help='7-bit weights (CPUs without VNNI: avoids u8s8 saturation)')
    parser.add_argument('--part', choices=PARTS, default='model',
                        help='MODEL a checkpoint: the part to export (as tools/export.py)')
    parser.add_argument('--dynamic', action='store_true',
                        help='MODEL a checkpoint: export with dynamic batch, height, width '
                             '(always for detectors)')
    parser.add_argument('--shape', nargs=2, type=int, metavar=('H', 'W'),
                        help='MODEL a checkpoint: export input size (default: the test '
                             'pipeline\'s)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, as in tools/test.py')
    parser.add_argument('--mini', action='store_true',
                        help='calibrate on the synthetic mini dataset (as tools/test.py)')
    parser.set_defaults(launcher='none', work_dir=None, local_rank=0)  # for load_config
    return parser.parse_args(argv)


def quantize(args, onnx_file, images):
    return quantize_onnx(onnx_file, args.output, images, args.method,
                         per_channel=not args.per_tensor, reduce_range=args.reduce_range,
                         info=dict(config=osp.basename(args.config), split=args.split))


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args, osp.join(REPO, 'configs', '_base_', 'mini'))
    try:
        images = calibration_inputs(cfg, args.calib, args.split)
        if args.model.endswith('.onnx'):
            report = quantize(args, args.model, images)
        else:  # a checkpoint: exported beside the output, removed once quantized
            shape = args.shape or config_input_shape(cfg)
            if shape is None:
                raise SystemExit('the config\'s test pipeline gives no image size: pass '
                                 '--shape H W')
            with tempfile.TemporaryDirectory(dir=osp.dirname(osp.abspath(args.output)),
                                             prefix='.export-') as folder:
                onnx_file = osp.join(folder, 'fp32.onnx')
                # a detector's test images differ in size: its export takes any size
                dynamic = args.dynamic or scope_of(cfg) == 'mmdet'
                export_model(args.config, args.model, onnx_file, shape, 1, dynamic,
                             part=args.part, cfg_options=args.cfg_options)
                print(f'[quantize] exported {args.model} ({args.part}, input 1x3x{shape[0]}x'
                      f'{shape[1]}{", dynamic" if dynamic else ""}) to quantize it')
                report = quantize(args, onnx_file, images)
    except (OSError, ValueError, ExportFailure) as err:
        raise SystemExit(f'error: {err}')
    shape = 'x'.join(map(str, images[0].shape[1:]))
    print(f'[quantize] calibrated on {len(images)} {args.split} images ({shape}), '
          f'{args.method}; weights {report["settings"]["weights"]}, activations uint8 per '
          f'tensor')
    print('[quantize] quantized ops: ' + ', '.join(f'{k} {v}' for k, v in
                                                   report['quantized_ops'].items()))
    print(f'[quantize] output SQNR vs the fp32 file on the calibration images: '
          f'{report["sqnr_db"]:.1f} dB')
    written = [args.output] + ([report['torch_part']] if report['torch_part'] else [])
    print(f'[quantize] wrote {", ".join(written)}')
    return report


if __name__ == '__main__':
    main()
