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

from mmrepvgg.apis.deploy import DEFAULT_CALIB, add_export_option, quantize
from mmrepvgg.deploy.quantize import METHODS
from mmrepvgg.errors import run_command


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Quantize an exported ONNX file to INT8')
    parser.add_argument('config', help='the config the file was exported from')
    parser.add_argument('model', help='fp32 ONNX file written by tools/export.py, or a '
                                      'checkpoint to export first')
    parser.add_argument('output', help='the INT8 ONNX file to write')
    parser.add_argument('--calib', type=int, default=DEFAULT_CALIB,
                        help=f'number of calibration images (default {DEFAULT_CALIB})')
    parser.add_argument('--method', choices=METHODS, default='minmax',
                        help='how activation ranges are chosen (default minmax)')
    parser.add_argument('--split', choices=('test', 'val', 'train'), default='test',
                        help='the dataset the images come from, read through the test '
                             'pipeline (default test)')
    parser.add_argument('--per-tensor', action='store_true',
                        help='one scale per weight tensor instead of per output channel')
    parser.add_argument('--reduce-range', action='store_true',
                        help='7-bit weights (CPUs without VNNI: avoids u8s8 saturation)')
    add_export_option(parser, '--part',
                      help='MODEL a checkpoint: the part to export (as tools/export.py)')
    add_export_option(parser, '--dynamic',
                      help='MODEL a checkpoint: export with dynamic batch, height, width '
                           '(always for detectors)')
    add_export_option(parser, '--shape',
                      help='MODEL a checkpoint: export input size (default: the test '
                           'pipeline\'s)')
    add_export_option(parser, '--cfg-options')
    add_export_option(parser, '--mini',
                      help='calibrate on the synthetic mini dataset (as tools/test.py)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    report = quantize(args.config, args.model, args.output, args.calib, args.method,
                      args.split, not args.per_tensor, args.reduce_range, args.part,
                      args.dynamic, args.shape, args.cfg_options, args.mini)
    images = report['images']
    print(f'[quantize] calibrated on {images["count"]} {args.split} images ({images["size"]}), '
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
    run_command(main)
