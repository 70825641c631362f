"""How a trained model survives INT8: metrics of every form, feature SQNR, weight ranges.

  python tools/quantization_report.py CONFIG CHECKPOINT --work-dir DIR [--calib N]
      [--split train] [--methods minmax percentile entropy] [--backends onnxruntime]
      [--mini] [--cfg-options ...] [--json OUT.json]

For one trained checkpoint, with the config's own runner, data and metric throughout
(what tools/test.py, tools/export.py and tools/quantize.py do, in this process):

* the metric of the training form in torch, of the fused form (--deploy), of the fused
  fp32 ONNX file, and of its INT8 forms, one per calibration method and backend;
* the SQNR (dB) of the INT8 backbone's stage outputs against fp32, on the test images
  (the backbone exported alone and quantized with the same calibration images);
* per fused backbone conv, max |w| / std of its kernel: the spread a per-channel int8
  grid has to cover.

Speed is measured by tools/benchmark.py (--modes onnxruntime,onnxruntime-int8,...).
"""
import argparse
import json

from mmengine.config import DictAction

from mmrepvgg.benchmark.quantization_report import quantization_study
from mmrepvgg.deploy.quantize import METHODS
from mmrepvgg.errors import run_command
from mmrepvgg.fileio import write_text_atomic


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint', help='training-form checkpoint')
    parser.add_argument('--work-dir', required=True, help='where the files and logs go')
    parser.add_argument('--calib', type=int, default=16, help='calibration images')
    parser.add_argument('--split', default='train', choices=('train', 'val', 'test'),
                        help='where the calibration images come from (default train: '
                             'apart from the evaluation images)')
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS)
    parser.add_argument('--backends', nargs='+', default=['onnxruntime'],
                        choices=('onnxruntime', 'openvino'))
    parser.add_argument('--sqnr-images', type=int, default=8,
                        help='test images the feature SQNR is computed on')
    parser.add_argument('--mini', action='store_true')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='key=value overrides, as in tools/test.py')
    parser.add_argument('--qat', metavar='QAT_CHECKPOINT',
                        help='a quantization-aware fine-tune of CHECKPOINT (tools/train.py '
                             '--qat): its metric in torch and as an INT8 file, side by side')
    parser.add_argument('--repeats', type=int, default=20,
                        help='timed calls of each file in each backend (interleaved)')
    parser.add_argument('--json', help='write the results here as well')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    results = quantization_study(args.config, args.checkpoint, args.work_dir, args.calib,
                                 args.split, args.methods, args.backends, args.sqnr_images,
                                 args.mini, args.cfg_options, args.qat, args.repeats)
    print_report(results)
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=1))
    return results


def print_report(results: dict) -> None:
    metrics = results['metrics']
    keys = list(next(iter(metrics.values())))
    print(f'| form | {" | ".join(keys)} |\n|---|' + '---|' * len(keys))
    for form, values in metrics.items():
        print(f'| {form} | ' + ' | '.join(f'{values[k]:.2f}' for k in keys) + ' |')
    if results.get('timing'):
        print('\nms per test image (median, one interleaved run): ' + ', '.join(
            f'{name} {ms:.1f}' if ms is not None else f'{name} failed'
            for name, ms in results['timing'].items()))
    print(f'\nINT8 backbone outputs vs fp32, SQNR (dB), calibrated on {results["calib"]} '
          f'{results["split"]} images:')
    stages = list(next(iter(results['sqnr_db'].values()))) if results['sqnr_db'] else []
    print(f'| method | {" | ".join(stages)} |\n|---|' + '---|' * len(stages))
    for method, values in results['sqnr_db'].items():
        print(f'| {method} | ' + ' | '.join(f'{values[s]:.1f}' for s in stages) + ' |')
    ranges = [r for _, r in results['weight_ranges']]
    if ranges:
        print('\nfused kernels, max |w| / std per layer: '
              + ', '.join(f'{r:.1f}' for r in ranges)
              + f' (median {sorted(ranges)[len(ranges) // 2]:.1f}, max {max(ranges):.1f})')


if __name__ == '__main__':
    run_command(main)
