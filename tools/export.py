"""Export the fused network of a config to ONNX, or compile it into an AOTInductor
package, checked against torch before it is kept.

  python tools/export.py CONFIG CHECKPOINT OUTPUT.onnx [--shape H W] [--batch N]
                         [--dynamic] [--opset K] [--part model|backbone]
  python tools/export.py CONFIG CHECKPOINT OUTPUT.pt2 --format aoti [--winograd [TILE]]
                         [--shape H W] [--batch N] [--part model|backbone]

CHECKPOINT: training or fused form, a path or a URL (a training one is fused first); with
--part backbone also a backbone release file (official, mmpretrain, timm).
Segmentors export whole (per-pixel class logits out), detectors their dense part
(feature maps and dense-head outputs; box decoding, NMS and RoI heads stay in mmdet's
Python, run by tools/test.py --backend). A two-stage detector's RoI-head weights go
beside the file as OUTPUT.torch.pth.

--format aoti compiles the network once (torch.export + AOTInductor, tens of seconds;
--winograd convs are calls of the C++ Winograd op) into a package that any process with
the same torch loads in seconds (tools/test.py CONFIG OUTPUT.pt2 --backend aoti); it
takes exactly the --batch/--shape it was compiled for.
"""
import argparse

from mmrepvgg.apis.deploy import add_export_option, export
from mmrepvgg.deploy import DEFAULT_OPSET, FORMATS
from mmrepvgg.errors import run_command
from mmrepvgg.ops.winograd import MIN_CHANNELS_PER_GROUP, TILES
from mmrepvgg.reparam import format_report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export the fused network to ONNX or an AOTInductor package')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint (training or fused form): a file or '
                                           'a URL; --part backbone also takes a backbone '
                                           'release file')
    parser.add_argument('output', help='the file to write: .onnx, or .pt2 for --format aoti')
    parser.add_argument('--format', choices=FORMATS, default='onnx',
                        help='onnx (default), or aoti: an AOTInductor package compiled for '
                             'this CPU and torch release')
    parser.add_argument('--winograd', nargs='?', const='auto', metavar='TILE',
                        help='aoti: compute the 3x3 stride-1 convs with Winograd '
                             f'F(TILE x TILE, 3 x 3), TILE one of {", ".join(map(str, TILES))} '
                             'or auto (default: per conv, from its feature-map size)')
    add_export_option(parser, '--shape',
                      help='input size (default: the test pipeline\'s resize scale)')
    parser.add_argument('--batch', type=int, default=1, help='batch size (default 1)')
    add_export_option(parser, '--dynamic', help='batch, height and width as dynamic axes')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET,
                        help=f'ONNX opset (default {DEFAULT_OPSET})')
    add_export_option(parser, '--part',
                      help='model: the network up to its dense head (default); '
                           'backbone: the backbone alone')
    parser.add_argument('--no-check', action='store_true',
                        help='skip the comparison with torch (ONNX: in ONNX Runtime)')
    add_export_option(parser, '--cfg-options')
    add_export_option(parser, '--mini',
                      help='take the default --shape from the mini-data test pipeline')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    report = export(args.config, args.checkpoint, args.output, args.format, args.winograd,
                    args.shape, args.batch, args.dynamic, args.opset, args.part,
                    not args.no_check, args.cfg_options, args.mini)
    shape = report['shape']
    if report['fusion'] is not None:
        print(f'[export] {format_report(report["fusion"])}')
    shown = 'x'.join('N' if d is None and i == 0 else ('?' if d is None else str(d))
                     for i, d in enumerate(report['input_shape']))
    outputs = (f'{len(report["output_names"])} outputs ({", ".join(report["output_names"][:6])}'
               f'{", ..." if len(report["output_names"]) > 6 else ""})')
    if args.format == 'onnx':
        print(f'[export] {report["kind"]} network, input {shown}, {outputs}, opset '
              f'{report["opset"]}')
        print('[export] ONNX nodes: ' + ', '.join(f'{k} {v}' for k, v in
                                                  report['node_types'].items()))
        runner = 'ONNX Runtime'
    else:
        convs = report.get('winograd')
        print(f'[export] {report["kind"]} network, input {shown}, {outputs}; '
              + ('Winograd convs: ' + ', '.join(f'{n} of tile {t}' for t, n in convs.items())
                 if convs else 'direct convs')
              + (f'; {report["matmul_convs"]} strided convs as one matmul'
                 if report.get('matmul_convs') else ''))
        if convs == {}:
            print('[export] --winograd: no conv qualified (Winograd takes 3x3 stride-1 '
                  'undilated convs; tile auto only those with >= '
                  f'{MIN_CHANNELS_PER_GROUP} channels per group)')
        print(f'[export] prepared in {report["export_s"] + report["compile_s"]:.1f} s '
              f'(torch.export {report["export_s"]:.1f} s, AOTInductor compile '
              f'{report["compile_s"]:.1f} s); the package loads in {report["load_s"]:.1f} s')
        if 'winograd_vs_direct' in report:
            print(f'[export] Winograd package vs the direct-conv fused network: max rel '
                  f'{report["winograd_vs_direct"]:.3g}')
        runner = 'the package'
    parity = report['parity']
    if report.get('quantizers'):
        counts = report['quantizers']
        print(f'[export] INT8 (QDQ) from the QAT checkpoint: {counts["weights"]} weight and '
              f'{counts["activations"]} activation quantizers; quantized ops: '
              + ', '.join(f'{k} {v}' for k, v in report['quantized_ops'].items()))
    if parity is not None and 'file_sqnr_db' in parity:
        print(f'[export] {runner} vs the fake-quantized torch model on a {args.batch}x3x'
              f'{shape[0]}x{shape[1]} probe: SQNR {parity["file_sqnr_db"]:.1f} dB (the torch '
              f'model vs its float network: {parity["quantization_sqnr_db"]:.1f} dB)')
    elif parity is not None:
        print(f'[export] {runner} vs torch on a {args.batch}x3x{shape[0]}x{shape[1]} '
              f'probe: max abs {parity["max_abs"]:.3g}, max rel {parity["max_rel"]:.3g} '
              f'(vs float64: {runner} {parity["candidate_abs"]:.3g}, torch fp32 '
              f'{parity["baseline_abs"]:.3g}, bound {parity["bound"]:.3g})')
    written = [args.output] + ([report['torch_part']] if report['torch_part'] else [])
    print(f'[export] wrote {", ".join(written)}')
    return report


if __name__ == '__main__':
    run_command(main)
