"""How a trained model survives INT8: metrics of every form, feature SQNR, weight ranges.

  python tools/quantization_report.py CONFIG CHECKPOINT --work-dir DIR [--calib N]
      [--split train] [--methods minmax percentile entropy] [--backends onnxruntime]
      [--mini] [--cfg-options ...] [--json OUT.json]

For one trained checkpoint, with the config's own runner, data and metric throughout
(tools/test.py, tools/export.py and tools/quantize.py, run in this process):

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
import os
import os.path as osp
import sys

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout

import torch  # noqa: E402

import mmrepvgg  # noqa: E402,F401
from mmrepvgg.convert import load_fused_model  # noqa: E402
from mmrepvgg.deploy import load_backend  # noqa: E402
from mmrepvgg.deploy.quantize import (METHODS, calibration_inputs, quantize_onnx,  # noqa: E402
                                      sqnr_db)
from mmrepvgg.engine.cli import load_config  # noqa: E402
from mmrepvgg.models.rep_block import RepVGGBlock  # noqa: E402
from tools import export as export_tool  # noqa: E402
from tools import test as test_tool  # noqa: E402


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
    parser.add_argument('--cfg-options', nargs='+', default=[],
                        help='key=value overrides, as in tools/test.py')
    parser.add_argument('--json', help='write the results here as well')
    return parser.parse_args(argv)


def weight_ranges(backbone: torch.nn.Module) -> list:
    """(block name, max |w| / std) of each fused conv kernel of a RepVGG backbone."""
    rows = []
    for name, block in backbone.named_modules():
        if isinstance(block, RepVGGBlock) and block.fused is not None:
            kernel = block.fused.weight.detach().double()
            rows.append((name, float(kernel.abs().max() / kernel.std())))
    return rows


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    work = lambda *names: osp.join(args.work_dir, *names)  # noqa: E731
    common = (['--mini'] if args.mini else []) + (
        ['--cfg-options', *args.cfg_options] if args.cfg_options else [])

    def test(path, name, *extra):
        metrics = test_tool.main([args.config, path, '--work-dir', work('logs', name),
                                  *extra, *common])
        return {k: float(v) for k, v in metrics.items()}

    results = dict(config=args.config, checkpoint=args.checkpoint, calib=args.calib,
                   split=args.split, metrics={}, sqnr_db={}, weight_ranges=[])
    metrics = results['metrics']
    metrics['torch fp32'] = test(args.checkpoint, 'torch')
    metrics['torch fused fp32'] = test(args.checkpoint, 'deploy', '--deploy')
    export_tool.main([args.config, args.checkpoint, work('model.onnx'), *common])
    export_tool.main([args.config, args.checkpoint, work('backbone.onnx'), '--part',
                      'backbone', *common])
    for backend in args.backends:
        metrics[f'{backend} fp32'] = test(work('model.onnx'), f'{backend}_fp32', '--backend',
                                          backend)

    cfg = load_config(argparse.Namespace(config=args.config, mini=args.mini,
                                         cfg_options=_options(args.cfg_options),
                                         launcher='none', work_dir=None, local_rank=0),
                      osp.join(REPO, 'configs', '_base_', 'mini'))
    calib = calibration_inputs(cfg, args.calib, args.split)
    probe = calibration_inputs(cfg, args.sqnr_images, 'test')
    fp32_backbone = load_backend(work('backbone.onnx'))
    reference = [fp32_backbone(x) for x in probe]
    for method in args.methods:
        int8_file = work(f'model_int8_{method}.onnx')
        quantize_onnx(work('model.onnx'), int8_file, calib, method)
        for backend in args.backends:
            metrics[f'{backend} int8 {method}'] = test(int8_file, f'{backend}_{method}',
                                                       '--backend', backend)
        backbone_file = work(f'backbone_int8_{method}.onnx')
        quantize_onnx(work('backbone.onnx'), backbone_file, calib, method)
        int8_backbone = load_backend(backbone_file)
        quantized = [int8_backbone(x) for x in probe]
        stages = len(reference[0])
        results['sqnr_db'][method] = dict(
            {f'stage {i + 1 + 4 - stages}': sqnr_db([r[i] for r in reference],
                                                    [q[i] for q in quantized])
             for i in range(stages)},
            all=sqnr_db([t for r in reference for t in r], [t for q in quantized for t in q]))

    _, model, _ = load_fused_model(args.config, args.checkpoint, _options(args.cfg_options))
    results['weight_ranges'] = weight_ranges(model.backbone)
    print_report(results)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
    return results


def _options(pairs):
    """--cfg-options as the dict mmengine's DictAction would make of them."""
    if not pairs:
        return None
    from mmengine.config import DictAction
    namespace = argparse.Namespace()
    DictAction(option_strings=[], dest='options')(None, namespace, pairs)
    return namespace.options


def print_report(results: dict) -> None:
    metrics = results['metrics']
    keys = list(next(iter(metrics.values())))
    print(f'| form | {" | ".join(keys)} |\n|---|' + '---|' * len(keys))
    for form, values in metrics.items():
        print(f'| {form} | ' + ' | '.join(f'{values[k]:.2f}' for k in keys) + ' |')
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
    main()
