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
import copy
import datetime
import importlib
import json
import os
import os.path as osp
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mmrepvgg.deploy import (ExportedPart, export_module, load_backend,  # noqa: E402
                             package_module, quantize_onnx)
from mmrepvgg.deploy.inference import (AUTO_MODE, MODES, PRECISIONS,  # noqa: E402
                                       optimize_for_inference, resolve_device)
from mmrepvgg.deploy.winograd import FASTEST_TILE, TILES as WINOGRAD_TILES  # noqa: E402
from mmrepvgg.deploy.winograd import convert_to_winograd  # noqa: E402
from mmrepvgg.models import ARCH_SETTINGS, RepVGG  # noqa: E402
from mmrepvgg.reparam import (count_unfused, flatten_outputs, fusable_modules,  # noqa: E402
                              randomize_norm_stats, reparameterize)
from tools.benchmark_harness import (MEMORY_METHODS, Candidate,  # noqa: E402
                                     benchmark_interleaved, count_conv_flops, environment,
                                     matmul_peak, ratio)

#: ImageNet top-1 of the paper's table (RepVGG paper, 120 epochs; ResNets as reported there).
PAPER_TOP1 = {'RepVGG-A0': 72.41, 'RepVGG-A1': 74.46, 'RepVGG-A2': 76.48,
              'RepVGG-B0': 75.14, 'RepVGG-B1g4': 77.58, 'RepVGG-B1g2': 77.78,
              'RepVGG-B1': 78.37, 'RepVGG-B2g4': 78.50, 'RepVGG-B2': 78.78,
              'ResNet-50': 76.31, 'ResNet-101': 77.21}
RESNET_DEPTHS = (18, 34, 50, 101, 152)
#: Modes that export the model to ONNX and run the file outside torch, on the CPU:
#: mode -> (backend, precision) of mmrepvgg.deploy.load_backend; int8: the file quantized
#: by mmrepvgg.deploy.quantize_onnx first (static QDQ, calibrated on the benchmark input:
#: the ranges change the numbers, not the work).
#: ``aoti``: the network compiled into an AOTInductor package (mmrepvgg.deploy.aoti) and
#: loaded back; ``winograd-aoti``: the same with Winograd convs (--winograd-tile).
BACKEND_MODES = {'onnxruntime': ('onnxruntime', 'fp32'), 'openvino': ('openvino', 'fp32'),
                 'openvino-bf16': ('openvino', 'bf16'),
                 'onnxruntime-int8': ('onnxruntime', 'int8'),
                 'openvino-int8': ('openvino', 'int8'),
                 'aoti': ('aoti', 'fp32'), 'winograd-aoti': ('aoti', 'fp32')}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- arguments
def _csv(value: str) -> List[str]:
    return [v.strip() for v in value.split(',') if v.strip()]


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
                             f'{", ".join(BACKEND_MODES)} (CPU only; each sets its own '
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
    parser.add_argument('--no-check', action='store_true',
                        help='skip comparing each candidate\'s output with eager fp32')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', default=None, metavar='PATH', help='write results as JSON')
    parser.add_argument('--plot', default=None, metavar='PATH',
                        help='write a PNG of backbone speed vs ImageNet top-1 (paper values)')
    args = parser.parse_args(argv)

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
    valid = list(MODES) + list(BACKEND_MODES)
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


# --------------------------------------------------------------------------- models
@dataclass
class ModelSpec:
    """A model to time under every mode and precision, built once on CPU in fp32."""
    label: str             # e.g. RepVGG-B1g2, ResNet-101, a config's name
    form: str              # train / fused for re-parameterizable models, '' otherwise
    kind: str              # backbone / model
    model: nn.Module
    method: str = 'forward'
    extra_args: Callable[[int], tuple] = lambda batch: ()
    reference: Optional['ModelSpec'] = None   # whose eager output this one must match
    info: Dict[str, Any] = field(default_factory=dict)
    output: Any = None     # eager fp32 output on the benchmark input
    # The same for the network the backend modes export, and what it runs where that is
    # not `method` (a whole model's ExportedPart); why it cannot be exported, if so.
    exported_output: Any = None
    exported_info: Dict[str, Any] = field(default_factory=dict)
    export_error: Optional[str] = None

    @property
    def key(self) -> str:
        return f'{self.label}/{self.form}' if self.form else self.label

    def exported_network(self, model: nn.Module) -> nn.Module:
        """What the backend modes export of ``model`` (this spec's model or a copy): a
        backbone as it is, a whole model's dense part (one batch in, flat tensors out)."""
        return model if self.kind == 'backbone' else ExportedPart(model)


def repvgg_specs(archs: Sequence[str], forms: Sequence[str], seed: int) -> List[ModelSpec]:
    specs = []
    for arch in archs:
        torch.manual_seed(seed)
        train = RepVGG(arch=arch)
        train.eval()
        randomize_norm_stats(train, seed)
        label = f'RepVGG-{arch}'
        train_spec = ModelSpec(label, 'train', 'backbone', train)
        if 'train' in forms:
            specs.append(train_spec)
        if 'fused' in forms:
            specs.append(ModelSpec(label, 'fused', 'backbone', reparameterize(train),
                                   reference=train_spec))
    return specs


def resnet_specs(depths: Sequence[int], seed: int, skipped: List[str]) -> List[ModelSpec]:
    if not depths:
        return []
    try:
        from mmdet.models.backbones import ResNet
    except Exception as exc:  # noqa: BLE001  (ImportError, or mmcv.ops failing to load)
        msg = (f'skipped ResNet-{",".join(map(str, depths))}: mmdet is not importable '
               f'({type(exc).__name__}: {exc}); install mmdet for the ResNet rows')
        log(msg)
        skipped.append(msg)
        return []
    specs = []
    for depth in depths:
        torch.manual_seed(seed)
        model = ResNet(depth=depth)
        model.eval()  # mmdet's ResNet.train() returns None: no chaining
        randomize_norm_stats(model, seed)
        specs.append(ModelSpec(f'ResNet-{depth}', '', 'backbone', model))
    return specs


def _load_config(path: str):
    from mmengine.config import Config
    if '::' in path and not osp.exists(path):
        from mmengine.hub import get_config
        return get_config(path)
    return Config.fromfile(path)


def _dummy_data_samples(scope: str, batch: int, height: int, width: int) -> Optional[list]:
    meta = dict(img_shape=(height, width), ori_shape=(height, width),
                pad_shape=(height, width), batch_input_shape=(height, width),
                scale_factor=(1.0, 1.0))
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample as Sample
    elif scope == 'mmseg':
        from mmseg.structures import SegDataSample as Sample
    else:
        return None
    return [Sample(metainfo=meta) for _ in range(batch)]


def config_specs(paths: Sequence[str], forward: str, input_size: Sequence[int], seed: int,
                 skipped: List[str], forms: Sequence[str] = ('train', 'fused')
                 ) -> List[ModelSpec]:
    specs = []
    height, width = input_size
    for path in paths:
        label = osp.splitext(osp.basename(path.split('::')[-1]))[0]
        try:
            from mmengine.model import revert_sync_batchnorm
            from mmengine.registry import MODELS, init_default_scope

            import mmrepvgg  # noqa: F401  registers type='mmrepvgg.RepVGG'
            cfg = _load_config(path)
            scope = cfg.get('default_scope', None) or 'mmdet'
            init_default_scope(scope)
            torch.manual_seed(seed)
            model = revert_sync_batchnorm(MODELS.build(cfg.model))
            model.eval()
        except Exception as exc:  # noqa: BLE001
            msg = (f'skipped {path}: could not build the model ({type(exc).__name__}: '
                   f'{str(exc).splitlines()[0] if str(exc) else ""}); whole-model rows '
                   'need mmdet or mmseg (whichever the config uses)')
            log(msg)
            skipped.append(msg)
            continue
        randomize_norm_stats(model, seed)
        # What to time: the tensor forward, or backbone+neck when it needs more than tensors
        # (e.g. a two-stage detector's proposals) and cannot run on a dummy batch.
        choices = {'_forward': [('_forward', True)], 'extract_feat': [('extract_feat', False)],
                   'auto': [('_forward', True), ('extract_feat', False)]}[forward]
        probe = torch.randn(1, 3, height, width)
        method, extra, errors = None, None, []
        for name, with_samples in choices:
            def extra_fn(batch, with_samples=with_samples):
                if not with_samples:
                    return ()
                samples = _dummy_data_samples(scope, batch, height, width)
                return () if samples is None else (samples,)
            try:
                with torch.no_grad():
                    getattr(model, name)(probe, *extra_fn(1))
                method, extra = name, extra_fn
                break
            except Exception as exc:  # noqa: BLE001
                errors.append(f'{name}: {type(exc).__name__}: {exc}'.splitlines()[0])
        if method is None:
            msg = f'skipped {path}: no forward ran on a dummy batch ({"; ".join(errors)})'
            log(msg)
            skipped.append(msg)
            continue
        if errors:
            log(f'{label}: timing {method} ({"; ".join(errors)})')
        info = dict(config=path, method=method, scope=scope)
        if not fusable_modules(model):
            specs.append(ModelSpec(label, '', 'model', model, method, extra, info=info))
            continue
        train = ModelSpec(label, 'train', 'model', model, method, extra, info=info)
        fused = reparameterize(model)
        info_fused = dict(info, unfused_left=count_unfused(fused))
        specs += [train] if 'train' in forms else []
        if 'fused' in forms:
            specs.append(ModelSpec(label, 'fused', 'model', fused, method, extra,
                                   reference=train, info=info_fused))
    return specs


# --------------------------------------------------------------------------- candidates
def _max_difference(a: Any, b: Any) -> Optional[float]:
    ta, tb = flatten_outputs(a), flatten_outputs(b)
    if not ta or len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return None
    return max((x.detach().double().cpu() - y.detach().double().cpu()).abs().max().item()
               for x, y in zip(ta, tb))


@torch.no_grad()
def _eager_pass(model: nn.Module, forward: Callable, inputs: torch.Tensor,
                check: bool) -> tuple:
    """The MAC counts of ``forward(inputs)`` and, with ``check``, its outputs on CPU."""
    counts = count_conv_flops(model, inputs, forward=forward)
    output = [t.detach().cpu() for t in flatten_outputs(forward(inputs))] if check else None
    return dict(macs_per_image=counts['macs'] / inputs.shape[0],
                flops_per_batch=counts['flops']), output


def prepare_specs(specs: Sequence[ModelSpec], inputs: torch.Tensor, device: torch.device,
                  check: bool, exported: bool = False) -> None:
    """One eager fp32 forward of each spec on the device: FLOPs, and the reference output;
    with ``exported``, also of the network the backend modes export. A spec's reference
    (the training form of a fused model) gets its pass even when it is not timed."""
    untimed = [s.reference for s in specs if s.reference is not None
               and all(s.reference is not t for t in specs)]
    for spec in list(specs) + list({id(r): r for r in untimed}.values()):
        model = copy.deepcopy(spec.model).to(device)
        model.eval()
        fwd = getattr(model, spec.method)
        extra = spec.extra_args(inputs.shape[0])
        macs, spec.output = _eager_pass(model, lambda x: fwd(x, *extra), inputs.to(device),
                                        check)
        spec.info.update(macs, params=sum(p.numel() for p in spec.model.parameters()))
        if exported and spec.kind == 'backbone':
            spec.exported_output = spec.output
        elif exported:
            try:
                network = spec.exported_network(model)
            except ValueError as exc:  # a model type mmrepvgg.deploy.parts cannot cut
                spec.export_error = str(exc)
            else:
                macs, spec.exported_output = _eager_pass(network, network, inputs.to(device),
                                                         check)
                spec.exported_info = dict(macs, method=f'ExportedPart ({network.kind})')
        del model


def _torch_setup(cand: Candidate, spec: ModelSpec, mode: str, precision: str,
                 inputs: torch.Tensor, args) -> Callable[[], Callable[[], Any]]:
    """A copy of the spec's model prepared by ``optimize_for_inference``."""
    def setup():
        runner = optimize_for_inference(
            copy.deepcopy(spec.model), inputs, args.device, mode, precision,
            method=spec.method, extra_args=spec.extra_args(inputs.shape[0]),
            compile_mode=args.compile_mode, cudnn_benchmark=not args.no_cudnn_benchmark,
            winograd_tile=args.winograd_tile)
        cand.info['first_call_s'] = round(runner.prep_seconds, 3)
        if runner.note:
            cand.info['note'] = runner.note
        prepared = runner.prepare_input(inputs)
        ref = spec.reference or spec
        if ref.output is not None:
            cand.info['max_abs_diff'] = _max_difference(runner.run(prepared), ref.output)
        return lambda: runner.run(prepared)
    return setup


def _package_setup(cand: Candidate, network: nn.Module, inputs: torch.Tensor,
                   winograd, folder: str):
    """``network`` compiled into an AOTInductor package in ``folder`` and loaded back."""
    start = time.perf_counter()
    if winograd is not None:
        convert_to_winograd(network, winograd, inputs)
    path = osp.join(folder, 'network.pt2')
    times = package_module(network, inputs, path, metadata={'mmrepvgg.part': 'benchmark'})
    runner = load_backend(path, 'aoti', threads=torch.get_num_threads())
    cand.info.update(export_s=round(times['export_s'], 3),
                     compile_s=round(times['compile_s'], 3),
                     load_s=round(runner.load_seconds, 3),
                     prep_total_s=round(time.perf_counter() - start, 3))
    return runner


def _backend_setup(cand: Candidate, spec: ModelSpec, backend: str, precision: str,
                   inputs: torch.Tensor, winograd=None) -> Callable[[], Callable[[], Any]]:
    """The spec's network exported to a temporary ONNX file and compiled by ``backend``,
    or compiled into an AOTInductor package and loaded (all set-up time); what is timed is
    the runner's call alone."""
    def setup():
        if spec.export_error:
            raise ValueError(spec.export_error)
        network = spec.exported_network(copy.deepcopy(spec.model))
        with tempfile.TemporaryDirectory(prefix='mmrepvgg-benchmark-') as folder:
            if backend == 'aoti':
                runner = _package_setup(cand, network, inputs, winograd, folder)
                return _checked_call(cand, spec, runner, inputs)
            path = osp.join(folder, 'network.onnx')
            start = time.perf_counter()
            export_module(network, inputs, path, dynamic=False,
                          metadata={'mmrepvgg.part': spec.kind})
            exported = ready = time.perf_counter()
            run_precision = precision
            if precision == 'int8':
                int8 = osp.join(folder, 'network_int8.onnx')
                quantize_onnx(path, int8, list(inputs.split(1)))
                ready = time.perf_counter()
                cand.info['quantize_s'] = round(ready - exported, 3)
                path, run_precision = int8, 'fp32'
            runner = load_backend(path, backend, run_precision,
                                  threads=torch.get_num_threads())
            cand.info.update(export_s=round(exported - start, 3),
                             compile_s=round(time.perf_counter() - ready, 3))
        return _checked_call(cand, spec, runner, inputs)
    return setup


def _checked_call(cand: Candidate, spec: ModelSpec, runner, inputs: torch.Tensor):
    """The timed call of a loaded file, after recording how far its output is from the
    eager fp32 one of its reference."""
    output = runner(inputs)
    ref = spec.reference or spec
    if ref.exported_output is not None:
        cand.info['max_abs_diff'] = _max_difference(output, ref.exported_output)
    return lambda: runner(inputs)


def make_candidates(specs: Sequence[ModelSpec], modes: Sequence[str],
                    precisions: Sequence[str], inputs: torch.Tensor, args) -> List[Candidate]:
    """Every (model, mode, precision) to time. A backend mode sets its own precision, so
    it gives one row per model; off the CPU its rows are marked ``skipped``."""
    candidates = []
    for precision in precisions:
        for mode in modes:
            backend = BACKEND_MODES.get(mode)
            if backend and precision != precisions[0]:
                continue
            row_precision = backend[1] if backend else precision
            for spec in specs:
                name = f'{spec.key} @{mode}' + (
                    f' {row_precision}' if len(precisions) > 1 else '')
                cand = Candidate(name=name, setup=None, info=dict(
                    model=spec.label, form=spec.form, kind=spec.kind, mode=mode,
                    precision=row_precision, key=spec.key, **spec.info))
                if not backend:
                    cand.setup = _torch_setup(cand, spec, mode, precision, inputs, args)
                elif args.device.type != 'cpu':
                    cand.info['skipped'] = f'{mode} runs on the CPU only'
                else:
                    cand.info.update(spec.exported_info)
                    cand.setup = _backend_setup(
                        cand, spec, *backend, inputs,
                        args.winograd_tile if mode == 'winograd-aoti' else None)
                candidates.append(cand)
    return candidates


def backend_versions(modes: Sequence[str]) -> Dict[str, str]:
    """The version of each runtime the backend modes among ``modes`` use."""
    versions = {}
    for backend in dict.fromkeys(BACKEND_MODES[m][0] for m in modes if m in BACKEND_MODES):
        try:
            versions[backend] = (torch.__version__ if backend == 'aoti' else
                                 importlib.import_module(backend).__version__)
        except ImportError:
            versions[backend] = 'not installed'
    return versions


def openvino_bf16_note() -> Optional[str]:
    """What to say when OpenVINO cannot compute in bf16 on this CPU (it falls back to
    fp32 then), or None."""
    try:
        import openvino
        capabilities = openvino.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES')
    except Exception:  # noqa: BLE001  (not installed: the rows say so)
        return None
    if 'BF16' in capabilities:
        return None
    return (f'openvino-bf16: OpenVINO lists no BF16 among this CPU\'s capabilities '
            f'({", ".join(capabilities)}), so these rows computed in fp32')


# --------------------------------------------------------------------------- report
def _fmt(value: Optional[float], spec: str = '.1f', none: str = '-') -> str:
    return none if value is None else format(value, spec)


def result_rows(candidates: Sequence[Candidate], batch: int,
                baseline: Optional[Candidate]) -> List[Dict[str, Any]]:
    base = baseline.stats()['median'] if baseline is not None else None
    rows = []
    for cand in candidates:
        st = cand.stats()
        med = st['median']
        flops = cand.info.get('flops_per_batch')
        rows.append(dict(
            name=cand.name, **{k: v for k, v in cand.info.items()},
            median_ms=None if med is None else med * 1e3,
            q1_ms=None if st['q1'] is None else st['q1'] * 1e3,
            q3_ms=None if st['q3'] is None else st['q3'] * 1e3,
            iqr_ms=None if st['iqr'] is None else st['iqr'] * 1e3,
            min_ms=None if st['min'] is None else st['min'] * 1e3,
            images_per_s=None if med is None else batch / med,
            speedup_vs_baseline=ratio(base, med),
            tflops=None if med is None or not flops else flops / med / 1e12,
            peak_memory_mb=None if cand.peak_memory is None else cand.peak_memory / 2**20,
            memory_method=cand.memory_method, prep_s=cand.prep_seconds,
            times_ms=[t * 1e3 for t in cand.times], error=cand.error))
    return rows


def format_table(rows: Sequence[Dict[str, Any]], columns: Sequence[tuple]) -> str:
    cells = [[title for title, _, _ in columns]]
    for row in rows:
        cells.append([fmt(row) for _, fmt, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for n, r in enumerate(cells):
        lines.append('  '.join(c.ljust(w) if left else c.rjust(w)
                               for c, w, (_, _, left) in zip(r, widths, columns)).rstrip())
        if n == 0:
            lines.append('  '.join('-' * w for w in widths))
    return '\n'.join(lines)


MAIN_COLUMNS = (
    ('candidate', lambda r: r['name'], True),
    ('ms/batch', lambda r: 'FAILED' if r['error'] else 'skipped' if r.get('skipped')
     else _fmt(r['median_ms']), False),
    ('IQR', lambda r: _fmt(r['iqr_ms']), False),
    ('min', lambda r: _fmt(r['min_ms']), False),
    ('img/s', lambda r: _fmt(r['images_per_s']), False),
    ('x base', lambda r: _fmt(r['speedup_vs_baseline'], '.2f'), False),
    ('GMAC/img', lambda r: _fmt(r.get('macs_per_image') and r['macs_per_image'] / 1e9,
                                '.2f'), False),
    ('TFLOP/s', lambda r: _fmt(r['tflops'], '.3f'), False),
    ('peak MB', lambda r: _fmt(r['peak_memory_mb'], '.0f'), False),
    ('x peak', lambda r: _fmt(r.get('x_peak'), '.2f'), False),
    ('prep s', lambda r: _fmt(r['prep_s'], '.1f'), False),
    ('load s', lambda r: _fmt(r.get('load_s'), '.1f'), False),
    ('max|diff|', lambda r: _fmt(r.get('max_abs_diff'), '.1e'), False),
)


def _median(row) -> Optional[float]:
    return None if row['error'] else row['median_ms']


def comparisons(rows: Sequence[Dict[str, Any]], precisions: Sequence[str],
                modes: Sequence[str]) -> Dict[str, Any]:
    """Fused vs training form and vs every ResNet: per mode (same treatment) and each at
    its fastest mode (best of each)."""
    by = {(r['key'], r['mode'], r['precision']): r for r in rows}
    keys = list(dict.fromkeys(r['key'] for r in rows))
    labels = list(dict.fromkeys(r['model'] for r in rows if r['form'] == 'fused'))
    kinds = {r['key']: r['kind'] for r in rows}
    # what a fused model is compared with: models of its kind that have no RepVGG blocks
    # (the ResNets for a backbone, e.g. a ResNet PSPNet for a RepVGG PSPNet)
    plain = [k for k in keys if '/' not in k]
    out = {'same_treatment': [], 'best_of_each': [], 'best_mode': {}, 'deployed_vs_eager': []}

    def compare(label, pick, precision, mode_name):
        fused, train = pick(f'{label}/fused'), pick(f'{label}/train')
        if fused is None:
            return None
        resnets = [k for k in plain if kinds[k] == fused['kind']]
        entry = dict(model=label, kind=fused['kind'], precision=precision, mode=mode_name,
                     fused_ms=_median(fused), fused_mode=fused['mode'])
        if train is not None:
            entry.update(train_ms=_median(train), train_mode=train['mode'],
                         speedup_vs_train=ratio(_median(train), _median(fused)))
        for res in resnets:
            other = pick(res)
            if other is not None:
                entry[f'time_vs_{res}'] = ratio(_median(fused), _median(other))
                entry[f'{res}_ms'] = _median(other)
                entry[f'{res}_mode'] = other['mode']
        return entry

    for precision in precisions:
        for mode in modes:
            def pick(key, mode=mode, precision=precision):
                row = by.get((key, mode, precision))
                return row if row is not None and _median(row) is not None else None
            for label in labels:
                entry = compare(label, pick, precision, mode)
                if entry:
                    out['same_treatment'].append(entry)
        best = {}
        for key in keys:
            timed = [r for r in rows if r['key'] == key and r['precision'] == precision
                     and _median(r) is not None]
            if timed:
                best[key] = min(timed, key=_median)
                out['best_mode'][f'{key} {precision}'] = best[key]['mode']
        for label in labels:
            entry = compare(label, best.get, precision, 'best')
            if entry:
                out['best_of_each'].append(entry)
        # What deploying gains over running the models as they come (eager, fp32): the
        # fused model at its fastest mode against every other model in eager fp32.
        if 'eager' in modes and 'fp32' in precisions:
            def deployed(key, best=best):
                if key.endswith('/fused'):
                    return best.get(key)
                row = by.get((key, 'eager', 'fp32'))
                return row if row is not None and _median(row) is not None else None
            for label in labels:
                entry = compare(label, deployed, precision, 'deployed')
                if entry:
                    out['deployed_vs_eager'].append(entry)
    return out


def format_comparisons(comp: Dict[str, Any]) -> str:
    lines = []

    def describe(e, with_modes):
        def at(prefix):
            return f' @{e[prefix + "_mode"]}' if with_modes else ''
        parts = [f'{e["model"]}: fused{at("fused")} {_fmt(e["fused_ms"])} ms']
        if 'train_ms' in e:
            parts.append(f'train{at("train")} {_fmt(e["train_ms"])} ms -> fused speed-up '
                         f'{_fmt(e["speedup_vs_train"], ".2f")}x')
        for key in [k for k in e if k.startswith('time_vs_')]:
            res = key[len('time_vs_'):]
            parts.append(f'{res}{at(res)} {_fmt(e[res + "_ms"])} ms -> fused takes '
                         f'{_fmt(e[key], ".2f")}x its time')
        return '; '.join(parts)

    if comp['same_treatment']:
        lines.append('Same treatment (every model under the same mode):')
        for e in comp['same_treatment']:
            lines.append(f'  [{e["mode"]} {e["precision"]}] {describe(e, False)}')
    if comp['best_mode']:
        lines.append('Best of each (every model at its own fastest mode):')
        for key, mode in comp['best_mode'].items():
            lines.append(f'  fastest mode of {key}: {mode}')
        for e in comp['best_of_each']:
            lines.append(f'  [{e["precision"]}] {describe(e, True)}')
    if comp['deployed_vs_eager']:
        lines.append('Deployed vs as-is (fused at its fastest mode of the given precision; '
                     'every other model in eager fp32):')
        for e in comp['deployed_vs_eager']:
            lines.append(f'  [fused {e["precision"]}] {describe(e, True)}')
    return '\n'.join(lines)


def write_plot(path: str, rows: Sequence[Dict[str, Any]], comp: Dict[str, Any],
               env: Dict[str, Any], args) -> List[str]:
    """Backbone images/s (each at its fastest mode) against the paper's ImageNet top-1."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    precision = args.precision[0]
    points, left_out = {}, []
    for r in rows:
        if r['kind'] != 'backbone' or r['precision'] != precision or _median(r) is None:
            continue
        if r['model'] not in PAPER_TOP1:
            left_out.append(r['model'])
            continue
        series = 'ResNet' if r['model'].startswith('ResNet') else r['form']
        key = (series, r['model'])
        eager = r['mode'] == 'eager'
        best = points.get(key, {})
        if 'best' not in best or r['images_per_s'] > best['best']['images_per_s']:
            best['best'] = r
        if eager:
            best['eager'] = r
        points[key] = best
    styles = {'fused': dict(marker='o', color='tab:red', label='RepVGG fused'),
              'train': dict(marker='o', color='tab:blue', mfc='none',
                            label='RepVGG training form'),
              'ResNet': dict(marker='s', color='tab:gray', label='ResNet (mmdet)')}
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    modes_used = set()
    for series, style in styles.items():
        pts = sorted(((PAPER_TOP1[m], v['best']) for (s, m), v in points.items()
                      if s == series), key=lambda p: p[0])
        if not pts:
            continue
        xs = [p[1]['images_per_s'] for p in pts]
        ys = [p[0] for p in pts]
        ax.plot(xs, ys, linestyle='-' if series != 'ResNet' else 'none', **style)
        if series != 'train':  # (a training-form point sits left of its fused point)
            for x, y, (_, r) in zip(xs, ys, pts):
                ax.annotate(r['model'].replace('RepVGG-', ''), (x, y),
                            textcoords='offset points', xytext=(5, -3), fontsize=8)
        modes_used.update(p[1]['mode'] for p in pts)
        eager = [(PAPER_TOP1[m], v['eager']) for (s, m), v in points.items()
                 if s == series and 'eager' in v and v['eager'] is not v['best']]
        if eager:
            ax.plot([e[1]['images_per_s'] for e in eager], [e[0] for e in eager],
                    linestyle='none', marker=style['marker'], color=style['color'],
                    alpha=0.35, mfc='none', label=f'{style["label"]}, eager')
    ax.set_xlabel(f'images/s ({env.get("cpu") if args.device.type == "cpu" else env.get("gpu")}'
                  f', batch {args.batch_size}, {args.input_size[0]}x{args.input_size[1]}, '
                  f'{precision}, {env["threads"]} threads)', fontsize=8)
    ax.set_ylabel('ImageNet top-1 (%, paper)')
    ax.set_title('RepVGG vs ResNet backbones: measured speed, accuracy from the paper\n'
                 f'solid markers: each model at its fastest mode ({", ".join(sorted(modes_used))})'
                 '; faint: eager', fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='lower left')
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return sorted(set(left_out))


def find_baseline(candidates: Sequence[Candidate], name: Optional[str]) -> Candidate:
    if name is None:
        timed = [c for c in candidates if c.error is None and c.times]
        return (timed or list(candidates))[0]
    exact = [c for c in candidates if c.name == name]
    if exact:
        return exact[0]
    prefix = [c for c in candidates if c.name.startswith(name)]
    if len(prefix) == 1:
        return prefix[0]
    raise SystemExit(f'--baseline {name!r} matches {len(prefix)} candidates; names: '
                     + ', '.join(repr(c.name) for c in candidates))


# --------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.type == 'cpu' and not args.no_flush_denormal:
        torch.set_flush_denormal(True)
    # Many module instances share one forward code object; let dynamo keep a graph for each.
    if 'compile' in args.modes:
        import torch._dynamo.config as dynamo_config
        limit = 'recompile_limit' if hasattr(dynamo_config, 'recompile_limit') \
            else 'cache_size_limit'
        setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 64))
    warnings.filterwarnings('ignore', category=FutureWarning)
    env = environment()
    env['date'] = datetime.datetime.now().isoformat(timespec='seconds')
    env['device'] = str(args.device)
    backend_modes = [m for m in args.modes if m in BACKEND_MODES]
    on_cpu = args.device.type == 'cpu'
    env['backends'] = backend_versions(backend_modes)
    command = 'python tools/benchmark.py ' + ' '.join(
        sys.argv[1:] if argv is None else list(argv))

    skipped: List[str] = []
    log('building models...')
    specs = repvgg_specs(args.archs, args.forms, args.seed)
    specs += resnet_specs(args.resnets, args.seed, skipped)
    specs += config_specs(args.config, args.forward, args.input_size, args.seed, skipped,
                          args.forms)
    if not specs:
        raise SystemExit('nothing left to time: ' + '; '.join(skipped))
    gen = torch.Generator().manual_seed(args.seed)
    inputs = torch.randn(args.batch_size, 3, *args.input_size, generator=gen)
    prepare_specs(specs, inputs, args.device, check=not args.no_check,
                  exported=bool(backend_modes) and on_cpu)
    candidates = make_candidates(specs, args.modes, args.precision, inputs, args)
    if backend_modes and not on_cpu:
        msg = (f'skipped the {", ".join(backend_modes)} rows: ONNX Runtime and OpenVINO run '
               f'on the CPU here, this run is on {args.device} (time them with --device cpu)')
        log(msg)
        skipped.append(msg)
    timed = [c for c in candidates if 'skipped' not in c.info]
    log(f'setting up {len(timed)} candidates, then {args.warmup} warm-up and '
        f'{args.repeats} timed rounds over all of them...')
    benchmark_interleaved(timed, args.device, repeats=args.repeats, warmup=args.warmup,
                          measure_memory=not args.no_memory, log=log)
    env['loadavg_end'] = environment().get('loadavg')

    baseline = find_baseline(candidates, args.baseline)
    rows = result_rows(candidates, args.batch_size, baseline)
    peak = env['matmul_peak'] = matmul_peak(args.device)
    for row in rows:
        row['x_peak'] = ratio(row['tflops'], peak['tflops'])
    # the backend modes add the precisions they set (openvino-bf16: bf16)
    precisions = list(dict.fromkeys(list(args.precision) + [r['precision'] for r in rows]))
    comp = comparisons(rows, precisions, args.modes)
    methods = sorted({r['memory_method'] for r in rows if r['memory_method']})

    header = (f'# {command}\n# {env["date"]}  device {env["device"]}'
              f'{" (" + env["gpu"] + ")" if args.device.type == "cuda" else ""}  '
              f'cpu {env.get("cpu")} x{env["cpu_count"]}  torch {env["torch"]}'
              + ''.join(f'  {name} {version}' for name, version in env['backends'].items())
              + f'  threads {env["threads"]}  load avg {env.get("loadavg")} -> '
              f'{env.get("loadavg_end")}\n'
              f'# batch {args.batch_size}, input {args.input_size[0]}x{args.input_size[1]}, '
              f'{args.warmup} warm-up + {args.repeats} timed rounds, interleaved; medians; '
              f'x base = speed relative to {baseline.name!r}; fp32 matmul peak '
              f'{peak["tflops"]:.3f} TFLOP/s (torch.mm {peak["size"]}x{peak["size"]})')
    print(header)
    print(format_table(rows, MAIN_COLUMNS))
    print('GMAC/img: conv+linear multiply-accumulates per image (the paper\'s "FLOPs"); '
          'TFLOP/s = 2 x MACs per batch / median time.')
    for m in methods:
        print(f'peak MB: {MEMORY_METHODS[m]}.')
    print('prep s: build + optimise + first call (tracing/compiling); max|diff|: against the '
          'eager fp32 output (fused rows: against the training form).')
    exported_rows = [r for r in rows if r['mode'] in BACKEND_MODES and not r.get('skipped')]
    onnx_modes = [m for m in backend_modes if BACKEND_MODES[m][0] != 'aoti']
    if any(r['mode'] in onnx_modes for r in exported_rows):
        print(f'{"/".join(onnx_modes)} rows: the eval-mode network exported to ONNX '
              '(mmrepvgg.deploy.export_module, static shape) and run on the CPU by '
              f'mmrepvgg.deploy.load_backend with {env["threads"]} threads; ms/batch is the '
              'runner\'s call, numpy conversion of input and outputs included; prep s: '
              'export + compile + first call.')
    if any(BACKEND_MODES[r['mode']][0] == 'aoti' for r in exported_rows):
        print('aoti/winograd-aoti rows: the eval-mode network compiled into an AOTInductor '
              'package (mmrepvgg.deploy.package_module: torch.export + '
              'aoti_compile_and_package, frozen weights, NHWC; winograd-aoti with Winograd '
              f'convs, tile {args.winograd_tile}) and loaded back by '
              'mmrepvgg.deploy.load_backend; prep s: conversion + export + compile + load + '
              'first call, paid once per package; load s: loading the package file, what '
              'a process that uses it pays.')
    if any(r['precision'] == 'int8' for r in exported_rows):
        print('int8 rows: the exported file quantized to static INT8 first '
              '(mmrepvgg.deploy.quantize_onnx, QDQ, int8 weights per channel, uint8 '
              'activations calibrated on the benchmark input; prep s includes it); '
              'max|diff| there is quantization error, not a check.')
    if any(r['kind'] == 'model' for r in exported_rows):
        print('Whole models in those rows run mmrepvgg.deploy.ExportedPart (the dense part: '
              'a segmentor to its resized logits, a detector to its dense or RPN head), '
              'whatever --forward times in torch; GMAC/img and max|diff| are of that part.')
    bf16_note = openvino_bf16_note() if 'openvino-bf16' in backend_modes and on_cpu else None
    if bf16_note:
        env['openvino_bf16'] = bf16_note
        print(bf16_note)
    for r in rows:
        if r['error']:
            print(f'FAILED {r["name"]}: {r["error"]}')
        elif r.get('note'):
            print(f'note {r["name"]}: {r["note"].split(" (")[0]}')
    if any(r['kind'] == 'model' and r.get('scope') == 'mmdet' and r.get('method') == '_forward'
           for r in rows):
        print('detectors: _forward runs the RPN and RoI heads on proposals, which move with '
              'tiny score changes; max|diff| of those rows is not a fusion check.')
    for msg in skipped:
        print(msg)
    text = format_comparisons(comp)
    if text:
        print(text)

    result = dict(command=command, environment=env, args={
        k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()},
        baseline=baseline.name, memory_method={m: MEMORY_METHODS[m] for m in methods},
        candidates=rows, comparisons=comp, skipped=skipped)
    if args.plot:
        left_out = write_plot(args.plot, rows, comp, env, args)
        result['plot'] = args.plot
        if left_out:
            print(f'not in the plot (no top-1 in the paper): {", ".join(left_out)}')
        log(f'wrote {args.plot}')
    if args.json:
        os.makedirs(osp.dirname(osp.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1)
        log(f'wrote {args.json}')
    return result


if __name__ == '__main__':
    main()
