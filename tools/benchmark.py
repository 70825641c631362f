"""Inference speed and memory: RepVGG backbones (training and fused form), mmdet's ResNets
and whole models from config files, all timed in ONE process, interleaved round-robin.

  # RepVGG-B1g2 against ResNet-50/101 on CPU, each optimisation step shown
  python tools/benchmark.py --archs B1g2 --resnets 50,101 --batch-size 4 \\
      --input-size 224 224 --modes eager,channels_last,jit_freeze,compile
  # a whole segmentor, fused and not (configs of the project, or packaged ones)
  python tools/benchmark.py --archs none --resnets none --batch-size 1 --input-size 512 1024 \\
      --config mmseg::pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py
  # the models exported to ONNX, in ONNX Runtime and OpenVINO (CPU only), against torch
  python tools/benchmark.py --archs B1g2 --resnets 101 \\
      --modes eager,compile,onnxruntime,openvino,openvino-bf16
  # which engine to deploy a config's fused model with on this machine (--metric: each
  # form scored on the config's test data too, here the bundled mini data)
  python tools/benchmark.py --recommend configs/pspnet_repvgg_b1g2_cityscapes.py CKPT
  python tools/benchmark.py --recommend configs/pspnet_repvgg_b1g2_cityscapes.py CKPT \\
      --metric --mini [--qat QAT_CKPT]   # with a QAT fine-tune's INT8 file beside PTQ's
  # GPU: fp32 and AMP, results and a speed/accuracy plot
  python tools/benchmark.py --device cuda --batch-size 128 --precision fp32,amp \\
      --archs A0,A1,A2,B0,B1g4,B1g2,B1 --json out.json --plot out.png

Every candidate is a (model, mode, precision) triple; modes are the recipes of
mmrepvgg.deploy.optimize_for_inference and the backends of mmrepvgg.deploy.load_backend
(the model exported to ONNX and run by ONNX Runtime or OpenVINO), applied alike to every
model ("same treatment"), and the report also gives each model at its own best mode
("best of each").
Only torch, mmengine and mmcv's pure-Python parts are needed for the RepVGG rows; mmdet
(ResNet rows) and mmdet/mmseg (config rows) are imported only when asked for, and those
rows are skipped with a message when they cannot be imported.
"""
import argparse
import sys
from typing import Any, Dict, List, Optional, Sequence

from mmengine.config import DictAction

from mmrepvgg.benchmark.timing import log
from mmrepvgg.benchmark.models import BACKEND_MODES, QAT_MODES, RESNET_DEPTHS
from mmrepvgg.benchmark.plot import write_plot
from mmrepvgg.benchmark.report import format_report, write_json
from mmrepvgg.benchmark.run import BenchmarkOptions, run_benchmark
from mmrepvgg.benchmark.recommend import (DEFAULT_MAX_DROP, DEFAULT_METRIC_DROP, DEFAULT_TIME_LIMIT,
                                     format_recommendation, recommend)
from mmrepvgg.errors import run_command
from mmrepvgg.models import ARCH_SETTINGS
from mmrepvgg.numerics import PRECISIONS
from mmrepvgg.ops.inference import AUTO_MODE, MODES, resolve_device
from mmrepvgg.ops.winograd import FASTEST_TILE, TILES as WINOGRAD_TILES


# --------------------------------------------------------------------------- arguments
def _csv(value: str) -> List[str]:
    return [v.strip() for v in value.split(',') if v.strip()]


# The backend modes --modes takes; the QAT ones run a QAT file (--recommend --qat).
TIMED_BACKENDS = [m for m in BACKEND_MODES if m not in QAT_MODES]

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--archs', default='B1g2',
                        help='RepVGG variants, comma-separated, "all" or "none" '
                             f'(valid: {", ".join(ARCH_SETTINGS)}); default B1g2')
    parser.add_argument('--forms', default='train,fused',
                        help='RepVGG forms to time (backbones and --config models): train, '
                             'fused or both (default both)')
    parser.add_argument('--resnets', default='50,101',
                        help='mmdet ResNet depths, comma-separated, or "none" (default 50,101)')
    parser.add_argument('--config', action='append', default=[], metavar='CONFIG',
                        help='a whole model to time, e.g. configs/... or '
                             'mmseg::pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py '
                             '(repeatable); a model with RepVGG blocks is timed fused and not')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override entries of every --config before its model is built, '
                             'e.g. model.backbone.arch=A0')
    parser.add_argument('--forward', default='auto',
                        choices=['auto', '_forward', 'extract_feat'],
                        help='what to time of a config model: _forward (backbone, neck and '
                             'head tensors, no post-processing), extract_feat (backbone+neck) '
                             'or auto (_forward, else extract_feat)')
    parser.add_argument('--device', default=None,
                        help='cpu or cuda[:N] (default: cuda when available, else cpu)')
    parser.add_argument('--modes', default='eager,auto',
                        help=f'recipes, comma-separated, from {", ".join(MODES)}; "auto" is '
                             f'the default recipe of the device ({AUTO_MODE}); "all" for '
                             'every one of these; the backends '
                             f'{", ".join(TIMED_BACKENDS)} (CPU only; each sets its own '
                             'precision) time the model exported to ONNX (default eager,auto)')
    parser.add_argument('--precision', default='fp32',
                        help=f'comma-separated from {", ".join(PRECISIONS)} (amp: fp16 '
                             'autocast on CUDA, bf16 on CPU); default fp32')
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--input-size', type=int, nargs='+', default=[224, 224],
                        metavar=('H', 'W'), help='input height and width (one value: square)')
    parser.add_argument('--repeats', type=int, default=20,
                        help='timed rounds over all candidates (default 20)')
    parser.add_argument('--warmup', type=int, default=3,
                        help='untimed rounds before them (default 3)')
    parser.add_argument('--time-limit', type=float, default=None, metavar='SECONDS',
                        help='a candidate stops being timed once its calls (warm-up '
                             'included, set-up not) took this long, after at least one '
                             'timed run; default: no limit, with --recommend '
                             f'{DEFAULT_TIME_LIMIT:g}')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch.set_num_threads (default: torch\'s choice)')
    parser.add_argument('--baseline', default=None,
                        help='candidate the "x base" column compares with (a name as '
                             'printed, or a unique prefix); default the first row')
    parser.add_argument('--winograd-tile', default=FASTEST_TILE,
                        type=lambda v: v if v == 'auto' else int(v),
                        choices=('auto',) + WINOGRAD_TILES,
                        help='output tile of the winograd and winograd-aoti modes: auto '
                             '(per conv, from its feature-map size; strided convs with many '
                             'channels on small maps as one matmul), or 2 (as accurate as a '
                             f'direct conv), 4, 6, 7 (default: {FASTEST_TILE})')
    parser.add_argument('--compile-mode', default=None,
                        help="torch.compile mode for the compile recipe, e.g. max-autotune")
    parser.add_argument('--no-cudnn-benchmark', action='store_true',
                        help='leave torch.backends.cudnn.benchmark off on CUDA')
    parser.add_argument('--no-flush-denormal', action='store_true',
                        help='keep denormal floats on CPU (by default they are flushed to '
                             'zero, as random weights can underflow through deep stacks)')
    parser.add_argument('--no-memory', action='store_true', help='skip the memory pass')
    parser.add_argument('--one-at-a-time', action='store_true',
                        help='set up, time and release each candidate in turn instead of '
                             'interleaving them (memory holds one at a time: whole models '
                             'at full input size; --recommend always does)')
    parser.add_argument('--no-check', action='store_true',
                        help='skip comparing each candidate\'s output with eager fp32')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', default=None, metavar='PATH', help='write results as JSON')
    parser.add_argument('--plot', default=None, metavar='PATH',
                        help='write a PNG of backbone speed vs ImageNet top-1 (paper values)')
    parser.add_argument('--recommend', nargs='+', metavar=('CONFIG', 'CHECKPOINT'),
                        help='time every deployable form of CONFIG\'s fused model (random '
                             'weights, or CHECKPOINT\'s) on this CPU at its test input size, '
                             'a progress line per form on stderr, and name the fastest '
                             'within --max-drop, with its commands')
    parser.add_argument('--metric', action='store_true',
                        help='--recommend: also write and test each form as its commands '
                             'would, with the config\'s metric on its test data (needs '
                             'CHECKPOINT; --mini: the bundled mini data); the budget is then '
                             'in metric points from the eager fp32 model')
    parser.add_argument('--max-drop', type=float, default=None,
                        help='--recommend: the accuracy budget: the largest relative output '
                             f'difference from the fp32 model (default {DEFAULT_MAX_DROP:g}), '
                             'with --metric the largest metric drop in points (default '
                             f'{DEFAULT_METRIC_DROP:g})')
    parser.add_argument('--mini', action='store_true',
                        help='--recommend: the input size of the --mini test pipeline, and '
                             'with --metric its mini test data')
    parser.add_argument('--qat', metavar='QAT_CHECKPOINT',
                        help='--recommend: a quantization-aware fine-tune of CHECKPOINT '
                             '(tools/train.py --qat): its INT8 file joins the forms '
                             '(onnxruntime-qat, openvino-qat)')
    args = parser.parse_args(argv)
    if args.time_limit is not None and args.time_limit <= 0:
        parser.error(f'--time-limit takes seconds > 0, got {args.time_limit:g}')
    if args.recommend is not None:
        if len(args.recommend) > 2:
            parser.error(f'--recommend takes CONFIG [CHECKPOINT], got {args.recommend}')
        if args.max_drop is not None and args.max_drop < 0:
            parser.error(f'--max-drop must be >= 0, got {args.max_drop}')
        return args
    extra = [name for name in ('metric', 'mini', 'max_drop', 'qat') if getattr(args, name)]
    if extra:
        parser.error(f'--{extra[0].replace("_", "-")} is an option of --recommend')

    archs = _csv(args.archs)
    if archs == ['all']:
        archs = list(ARCH_SETTINGS)
    elif archs == ['none']:
        archs = []
    unknown = [a for a in archs if a not in ARCH_SETTINGS]
    if unknown:
        parser.error(f'unknown RepVGG arch {", ".join(map(repr, unknown))}; valid names: '
                     f'{", ".join(ARCH_SETTINGS)} (or "all", "none")')
    args.archs = archs
    args.forms = _csv(args.forms)
    if not args.forms or set(args.forms) - {'train', 'fused'}:
        parser.error(f'--forms takes train and/or fused, got {args.forms}')
    resnets = _csv(args.resnets)
    if resnets == ['none']:
        resnets = []
    try:
        args.resnets = [int(d) for d in resnets]
    except ValueError:
        parser.error(f'--resnets takes depths {RESNET_DEPTHS} or "none", got {resnets}')
    if set(args.resnets) - set(RESNET_DEPTHS):
        parser.error(f'--resnets takes depths {RESNET_DEPTHS} or "none", got {resnets}')
    try:
        args.device = resolve_device(args.device)
    except RuntimeError as exc:
        parser.error(str(exc))
    modes = _csv(args.modes)
    if modes == ['all']:
        modes = list(MODES)
    modes = [AUTO_MODE.get(args.device.type, 'eager') if m == 'auto' else m for m in modes]
    valid = list(MODES) + TIMED_BACKENDS
    bad = [m for m in modes if m not in valid]
    if bad or not modes:
        parser.error(f'unknown mode {bad}; valid modes: {", ".join(valid)}, auto, all')
    args.modes = list(dict.fromkeys(modes))
    args.precision = list(dict.fromkeys(_csv(args.precision)))
    bad = [p for p in args.precision if p not in PRECISIONS]
    if bad or not args.precision:
        parser.error(f'unknown precision {bad}; valid: {", ".join(PRECISIONS)}')
    if len(args.input_size) == 1:
        args.input_size = args.input_size * 2
    if len(args.input_size) != 2 or min(args.input_size) < 1:
        parser.error(f'--input-size takes H W, got {args.input_size}')
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error('--batch-size and --repeats must be >= 1, --warmup >= 0')
    if not (args.archs or args.resnets or args.config):
        parser.error('nothing to time: give --archs, --resnets or --config')
    return args


# --------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    command = 'python tools/benchmark.py ' + ' '.join(
        sys.argv[1:] if argv is None else list(argv))
    if args.recommend is not None:
        limit = DEFAULT_TIME_LIMIT if args.time_limit is None else args.time_limit
        result = recommend(*args.recommend, cfg_options=args.cfg_options, mini=args.mini,
                           max_drop=args.max_drop, repeats=min(args.repeats, 5),
                           warmup=min(args.warmup, 1), command=command, time_limit=limit,
                           metric=args.metric, qat=args.qat)
        print(format_recommendation(result))
        if args.json:
            write_json(args.json, result)
        return result
    options = {k: v for k, v in vars(args).items()
               if k not in ('recommend', 'max_drop', 'mini', 'metric', 'qat')}
    result = run_benchmark(BenchmarkOptions(**options), command)
    print(format_report(result))
    if args.plot:
        left_out = write_plot(args.plot, result['candidates'], result['environment'],
                              args.precision[0], args.batch_size, args.input_size)
        result['plot'] = args.plot
        if left_out:
            print(f'not in the plot (no top-1 in the paper): {", ".join(left_out)}')
        log(f'wrote {args.plot}')
    if args.json:
        write_json(args.json, result)
        log(f'wrote {args.json}')
    return result


if __name__ == '__main__':
    run_command(main)
