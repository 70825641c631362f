"""Export the fused network of a config to ONNX, checked against torch in ONNX Runtime.

  python tools/export.py CONFIG CHECKPOINT OUTPUT.onnx [--shape H W] [--batch N]
                         [--dynamic] [--opset K] [--part model|backbone]

CHECKPOINT: training or fused form, a path or a URL (a training one is fused first).
Segmentors export whole (per-pixel class logits out), detectors their dense part
(feature maps and dense-head outputs; box decoding, NMS and RoI heads stay in mmdet's
Python, run by tools/test.py --backend). A two-stage detector's RoI-head weights go
beside the ONNX file as OUTPUT.torch.pth.
"""
import argparse
import os.path as osp
import sys

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout

import mmrepvgg  # noqa: E402,F401  registers the plugin's modules
from mmrepvgg.deploy import DEFAULT_OPSET, PARTS, ExportFailure, export_model  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmrepvgg.engine.cli import load_config  # noqa: E402
from mmrepvgg.engine.hooks import format_report  # noqa: E402


def test_input_shape(cfg):
    """(H, W) of the config's test images: the test pipeline's Resize scale, padded to
    the data preprocessor's size divisor (None when the pipeline does not say)."""
    pipeline = cfg.get('test_dataloader', {}).get('dataset', {}).get('pipeline', [])
    scale = next((t.get('scale') for t in pipeline
                  if t.get('type') in ('Resize', 'mmdet.Resize', 'mmseg.Resize')
                  and t.get('scale')), None)
    if not scale or not isinstance(scale, (tuple, list)):
        return None
    divisor = cfg.model.get('data_preprocessor', {}).get('pad_size_divisor', 1) or 1
    return [-(-int(s) // divisor) * divisor for s in (scale[1], scale[0])]  # (W, H) -> H, W


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Export the fused network to ONNX')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint (training or fused form): a file or '
                                           'a URL')
    parser.add_argument('output', help='the ONNX file to write')
    parser.add_argument('--shape', nargs=2, type=int, metavar=('H', 'W'),
                        help='input size (default: the test pipeline\'s resize scale)')
    parser.add_argument('--batch', type=int, default=1, help='batch size (default 1)')
    parser.add_argument('--dynamic', action='store_true',
                        help='batch, height and width as dynamic axes')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET,
                        help=f'ONNX opset (default {DEFAULT_OPSET})')
    parser.add_argument('--part', choices=PARTS, default='model',
                        help='model: the network up to its dense head (default); '
                             'backbone: the backbone alone')
    parser.add_argument('--no-check', action='store_true',
                        help='skip the ONNX Runtime comparison with torch')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, as in tools/test.py')
    parser.add_argument('--mini', action='store_true',
                        help='take the default --shape from the mini-data test pipeline')
    parser.set_defaults(launcher='none', work_dir=None, local_rank=0)  # for load_config
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.output.endswith('.onnx'):
        raise SystemExit(f'OUTPUT must end with .onnx, got {args.output}')
    cfg = load_config(args, osp.join(REPO, 'configs', '_base_', 'mini'))
    shape = args.shape or test_input_shape(cfg)
    if shape is None:
        raise SystemExit('the config\'s test pipeline gives no image size: pass --shape H W')
    try:
        report = export_model(args.config, args.checkpoint, args.output, shape, args.batch,
                              args.dynamic, args.opset, args.part, args.cfg_options,
                              check=not args.no_check)
    except (OSError, ValueError, KeyError, ExportFailure) as err:
        raise SystemExit(f'error: {err}')
    if report['fusion'] is not None:
        print(f'[export] {format_report(report["fusion"])}')
    shown = 'x'.join('N' if d is None and i == 0 else ('?' if d is None else str(d))
                     for i, d in enumerate(report['input_shape']))
    print(f'[export] {report["kind"]} network, input {shown}, {len(report["output_names"])} '
          f'outputs ({", ".join(report["output_names"][:6])}'
          f'{", ..." if len(report["output_names"]) > 6 else ""}), opset {report["opset"]}')
    print('[export] ONNX nodes: ' + ', '.join(f'{k} {v}' for k, v in
                                              report['node_types'].items()))
    parity = report['parity']
    if parity is not None:
        print(f'[export] ONNX Runtime vs torch on a {args.batch}x3x{shape[0]}x{shape[1]} '
              f'probe: max abs {parity["max_abs"]:.3g}, max rel {parity["max_rel"]:.3g} '
              f'(vs float64: ONNX Runtime {parity["candidate_abs"]:.3g}, torch fp32 '
              f'{parity["baseline_abs"]:.3g}, bound {parity["bound"]:.3g})')
    written = [args.output] + ([report['torch_part']] if report['torch_part'] else [])
    print(f'[export] wrote {", ".join(written)}')
    return report


if __name__ == '__main__':
    main()
