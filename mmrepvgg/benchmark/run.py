"""A benchmark run: every (model, mode, precision) made a candidate (a copy of the model
prepared by ``optimize_for_inference``, or exported to ONNX / an AOTInductor package /
INT8 and loaded by ``load_backend``), all timed in one process, interleaved round-robin,
and the result (the rows, comparisons and environment ``tools/benchmark.py`` prints and
writes as JSON) returned.

:func:`run_benchmark` does all of it from :class:`BenchmarkOptions`; the steps are
callable on their own (:func:`make_candidates`, :func:`find_baseline`, ...).
"""
import copy
import datetime
import importlib
import os.path as osp
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..deploy import export_module, load_backend, package_module, quantize_onnx
from ..deploy.backends import openvino_bf16_problem
from ..errors import UsageError
from ..numerics import output_error
from ..ops.inference import optimize_for_inference, resolve_device
from ..ops.winograd import FASTEST_TILE, convert_to_winograd
from ..ops.winograd_kernel import transformed_bytes
from .models import (BACKEND_MODES, QAT_MODES, ModelSpec, config_specs, prepare_specs,
                               repvgg_specs, resnet_specs)
from .report import comparisons, result_rows
from .timing import (MEMORY_METHODS, Candidate, Progress, benchmark_interleaved,
                        environment, log, matmul_peak, ratio)

__all__ = ['BenchmarkOptions', 'run_benchmark', 'make_candidates', 'find_baseline',
           'backend_versions', 'openvino_bf16_note']


@dataclass
class BenchmarkOptions:
    """What to time and how: the options of ``tools/benchmark.py``, already checked and
    resolved (``modes`` are names of ``mmrepvgg.ops.MODES`` or ``BACKEND_MODES``; the tool
    turns its 'auto' and 'all' into these). The fields are the keys of the result's
    ``args``; ``json`` and ``plot`` are only recorded there (the caller writes them)."""
    archs: Sequence[str] = ('B1g2',)
    forms: Sequence[str] = ('train', 'fused')
    resnets: Sequence[int] = (50, 101)
    config: Sequence[str] = ()
    cfg_options: Optional[dict] = None  # merged over every config
    checkpoint: Optional[str] = None    # weights of the (one) config's model, else random
    forward: str = 'auto'
    device: Any = None           # resolved: cuda when available, else cpu
    modes: Sequence[str] = ('eager',)
    precision: Sequence[str] = ('fp32',)
    batch_size: int = 4
    input_size: Sequence[int] = (224, 224)
    repeats: int = 20
    warmup: int = 3
    time_limit: Optional[float] = None  # seconds of calls per candidate, then it stops
    threads: Optional[int] = None
    baseline: Optional[str] = None
    winograd_tile: Union[str, int] = FASTEST_TILE
    compile_mode: Optional[str] = None
    no_cudnn_benchmark: bool = False
    no_flush_denormal: bool = False
    no_memory: bool = False
    no_check: bool = False
    # only these (mode, precision) pairs of modes x precision (None: all of them)
    pairs: Optional[Sequence[Tuple[str, str]]] = None
    one_at_a_time: bool = False  # set up, time, release each candidate in turn
    qat_file: Optional[str] = None  # the INT8 file the *-qat modes run (QAT_MODES)
    seed: int = 0
    json: Optional[str] = None
    plot: Optional[str] = None

    def __post_init__(self):
        self.device = resolve_device(self.device)


def _record_error(info: Dict[str, Any], output: Any, spec: ModelSpec,
                  exported: bool = False) -> None:
    """How far ``output`` (a run of ``spec``'s model, or with ``exported`` of its exported
    network) is from the eager fp32 output of the spec's reference (the training form
    for a fused model, else the spec itself), into ``info``: ``max_abs_diff`` (max
    |output - reference|), ``output_scale`` (the reference's largest value) and
    ``rel_diff`` (the first over the second). Where the models also ran in float64:
    ``fp64_abs_diff`` (this output against the reference in float64),
    ``reference_fp64_abs_diff`` (the reference's own fp32 output against the same) and,
    for a fused model, ``fusion_fp64_abs_diff`` (its fp32 weights computed in float64
    against the same: what fusion itself changed, free of any kernel's rounding). All are
    computed here, in the process and thread count that ran the row: the numbers a check
    of this row must use. None where the two hold no comparable tensors."""
    ref = spec.reference or spec
    fp32, exact = ((ref.exported_output, ref.exact_exported_output) if exported
                   else (ref.output, ref.exact_output))
    own_exact = spec.exact_exported_output if exported else spec.exact_output
    keys = ('max_abs_diff', 'output_scale', 'rel_diff', 'fp64_abs_diff',
            'reference_fp64_abs_diff', 'fusion_fp64_abs_diff')
    info.update(dict.fromkeys(keys))
    try:
        error = output_error(output, fp32)
    except ValueError:
        return
    info.update(max_abs_diff=error.max_abs, output_scale=error.scale,
                rel_diff=error.relative)
    if exact is not None:
        info['fp64_abs_diff'] = output_error(output, exact).max_abs
        info['reference_fp64_abs_diff'] = output_error(fp32, exact).max_abs
        if spec.reference is not None and own_exact is not None:
            info['fusion_fp64_abs_diff'] = output_error(own_exact, exact).max_abs


def _torch_setup(cand: Candidate, spec: ModelSpec, inputs: torch.Tensor,
                 recipe: Dict[str, Any]) -> Callable[[], Callable[[], Any]]:
    """A copy of the spec's model prepared by ``optimize_for_inference(**recipe)``."""
    def setup():
        runner = optimize_for_inference(
            copy.deepcopy(spec.model), inputs, method=spec.method,
            extra_args=spec.extra_args(inputs.shape[0]), **recipe)
        cand.info['first_call_s'] = round(runner.prep_seconds, 3)
        if runner.note:
            cand.info['note'] = runner.note
        prepared = runner.prepare_input(inputs)
        ref = spec.reference or spec
        if ref.output is not None:
            _record_error(cand.info, runner.run(prepared), spec)
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
    # the first call transforms the Winograd convs' weights (held from then on in memory)
    held = transformed_bytes() if winograd is not None else 0
    first = time.perf_counter()
    runner(inputs)
    cand.info.update(export_s=round(times['export_s'], 3),
                     compile_s=round(times['compile_s'], 3),
                     load_s=round(runner.load_seconds, 3),
                     first_call_s=round(time.perf_counter() - first, 3),
                     file_mb=round(osp.getsize(path) / 2**20, 1),
                     prep_total_s=round(time.perf_counter() - start, 3))
    if winograd is not None:
        cand.info['winograd_mb'] = round((transformed_bytes() - held) / 2**20, 1)
    return runner


def _onnx_file(cand: Candidate, spec: ModelSpec, inputs: torch.Tensor, precision: str,
               folder: str) -> str:
    """The spec's network exported to ONNX in ``folder`` (and quantized, for int8): once
    per run, shared by every backend that runs the same file (at a config's full test
    size an export takes minutes); the candidate that wrote it records the seconds."""
    stem = osp.join(folder, re.sub(r'[^\w.-]', '_', spec.key))
    path = stem + '.onnx'
    if not osp.isfile(path):
        start = time.perf_counter()
        network = spec.exported_network(copy.deepcopy(spec.model))
        export_module(network, inputs, path, dynamic=False,
                      metadata={'mmrepvgg.part': spec.kind})
        cand.info['export_s'] = round(time.perf_counter() - start, 3)
    if precision != 'int8':
        return path
    int8 = stem + '_int8.onnx'
    if not osp.isfile(int8):
        start = time.perf_counter()
        quantize_onnx(path, int8, list(inputs.split(1)))
        cand.info['quantize_s'] = round(time.perf_counter() - start, 3)
    return int8


def _backend_setup(cand: Candidate, spec: ModelSpec, backend: str, precision: str,
                   inputs: torch.Tensor, folder: Optional[str],
                   winograd=None, given: Optional[str] = None
                   ) -> Callable[[], Callable[[], Any]]:
    """The spec's network exported to ONNX (in ``folder``, which the run keeps until its
    end; None: a temporary folder of the candidate's own), or the ``given`` file, and
    compiled by ``backend``, or compiled into an AOTInductor package and loaded (all
    set-up time); what is timed is the runner's call alone."""
    def setup():
        if folder is None:
            with tempfile.TemporaryDirectory(prefix='mmrepvgg-benchmark-') as own:
                return set_up(own)
        return set_up(folder)

    def set_up(where: str):
        if spec.export_error:
            raise ValueError(spec.export_error)
        if backend == 'aoti':
            network = spec.exported_network(copy.deepcopy(spec.model))
            with tempfile.TemporaryDirectory(dir=where) as package_folder:
                runner = _package_setup(cand, network, inputs, winograd, package_folder)
            return _checked_call(cand, spec, runner, inputs)
        path = given or _onnx_file(cand, spec, inputs, precision, where)
        start = time.perf_counter()
        # an int8 file is run as given: its QDQ nodes carry the arithmetic
        runner = load_backend(path, backend, 'fp32' if precision == 'int8' else precision,
                              threads=torch.get_num_threads())
        cand.info['compile_s'] = round(time.perf_counter() - start, 3)
        return _checked_call(cand, spec, runner, inputs)
    return setup


def _checked_call(cand: Candidate, spec: ModelSpec, runner, inputs: torch.Tensor):
    """The timed call of a loaded file, after recording how far its output is from the
    eager fp32 one of its reference."""
    output = runner(inputs)
    ref = spec.reference or spec
    if ref.exported_output is not None:
        _record_error(cand.info, output, spec, exported=True)
    return lambda: runner(inputs)


def make_candidates(specs: Sequence[ModelSpec], modes: Sequence[str],
                    precisions: Sequence[str], inputs: torch.Tensor, device: Any,
                    compile_mode: Optional[str] = None, cudnn_benchmark: bool = True,
                    winograd_tile: Union[str, int] = FASTEST_TILE,
                    pairs: Optional[Sequence[Tuple[str, str]]] = None,
                    folder: Optional[str] = None,
                    qat_file: Optional[str] = None) -> List[Candidate]:
    """Every (model, mode, precision) to time, or with ``pairs`` those of its (mode,
    precision) pairs. A backend mode sets its own precision, so it gives one row per
    model; off the CPU its rows are marked ``skipped``. ``compile_mode``,
    ``cudnn_benchmark`` and ``winograd_tile`` go to ``optimize_for_inference`` (the tile
    also to the winograd-aoti mode). ``folder``: where the backend modes write their
    files, one export per model shared by its rows (kept by the caller until the
    candidates are set up; None: each candidate exports into a folder of its own).
    ``qat_file``: the INT8 file the *-qat modes run (of a config's model; without it they
    are skipped)."""
    device = torch.device(device)
    candidates = []
    for precision in precisions:
        for mode in modes:
            backend = BACKEND_MODES.get(mode)
            if backend and precision != precisions[0]:
                continue
            row_precision = backend[1] if backend else precision
            if pairs is not None and (mode, row_precision) not in pairs:
                continue
            for spec in specs:
                name = f'{spec.key} @{mode}' + (
                    f' {row_precision}' if len(precisions) > 1 else '')
                cand = Candidate(name=name, setup=None, info=dict(
                    model=spec.label, form=spec.form, kind=spec.kind, mode=mode,
                    precision=row_precision, key=spec.key, **spec.info))
                if not backend:
                    cand.setup = _torch_setup(cand, spec, inputs, dict(
                        device=device, mode=mode, precision=precision,
                        compile_mode=compile_mode, cudnn_benchmark=cudnn_benchmark,
                        winograd_tile=winograd_tile))
                elif device.type != 'cpu':
                    cand.info['skipped'] = f'{mode} runs on the CPU only'
                elif mode in QAT_MODES and (qat_file is None or spec.kind == 'backbone'):
                    cand.info['skipped'] = (f'{mode} runs the INT8 file of a QAT checkpoint '
                                            'of a config\'s model (--recommend ... --qat)')
                else:
                    cand.info.update(spec.exported_info)
                    cand.setup = _backend_setup(
                        cand, spec, *backend, inputs, folder,
                        winograd_tile if mode == 'winograd-aoti' else None,
                        qat_file if mode in QAT_MODES else None)
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
    """What to say when OpenVINO cannot compute in bf16 here (it falls back to fp32 then),
    or None."""
    problem = openvino_bf16_problem()
    return None if problem is None else (f'openvino-bf16: {problem}, so these rows '
                                         'computed in fp32')


def find_baseline(candidates: Sequence[Candidate], name: Optional[str]) -> Candidate:
    """The candidate named ``name`` (or the only one it prefixes); by default the first
    one timed. A name that matches none or several ends the run with the names."""
    if name is None:
        timed = [c for c in candidates if c.error is None and c.times]
        return (timed or list(candidates))[0]
    exact = [c for c in candidates if c.name == name]
    if exact:
        return exact[0]
    prefix = [c for c in candidates if c.name.startswith(name)]
    if len(prefix) == 1:
        return prefix[0]
    raise UsageError(f'--baseline {name!r} matches {len(prefix)} candidates; names: '
                     + ', '.join(repr(c.name) for c in candidates))


def _configure_torch(options: BenchmarkOptions) -> None:
    """The process-wide settings of a run: threads, denormals, dynamo's graph cache."""
    if options.threads:
        torch.set_num_threads(options.threads)
    if options.device.type == 'cpu' and not options.no_flush_denormal:
        torch.set_flush_denormal(True)
    # Many module instances share one forward code object; let dynamo keep a graph for each.
    if 'compile' in options.modes:
        import torch._dynamo.config as dynamo_config
        limit = 'recompile_limit' if hasattr(dynamo_config, 'recompile_limit') \
            else 'cache_size_limit'
        setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 64))
    warnings.filterwarnings('ignore', category=FutureWarning)


def run_benchmark(options: BenchmarkOptions, command: str = '',
                  progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Build the models, time every candidate and compare them (progress on stderr;
    ``progress`` replaces the per-candidate lines, see :class:`Progress`).

    Returns the result ``tools/benchmark.py`` writes as JSON: ``command`` (as given),
    ``environment``, ``args`` (the options), ``baseline`` (the name of the candidate the
    speed-ups are relative to), ``memory_method``, ``candidates`` (one row each),
    ``comparisons`` and ``skipped`` (the messages of the models left out).
    """
    _configure_torch(options)
    device = options.device
    env = environment()
    env['date'] = datetime.datetime.now().isoformat(timespec='seconds')
    env['device'] = str(device)
    backend_modes = [m for m in options.modes if m in BACKEND_MODES]
    on_cpu = device.type == 'cpu'
    env['backends'] = backend_versions(backend_modes)

    skipped: List[str] = []
    log('building models...')
    specs = repvgg_specs(options.archs, options.forms, options.seed)
    specs += resnet_specs(options.resnets, options.seed, skipped)
    specs += config_specs(options.config, options.forward, options.input_size, options.seed,
                          skipped, options.forms, options.cfg_options, options.checkpoint)
    if not specs:
        raise UsageError('nothing left to time: ' + '; '.join(skipped))
    gen = torch.Generator().manual_seed(options.seed)
    inputs = torch.randn(options.batch_size, 3, *options.input_size, generator=gen)
    prepare_specs(specs, inputs, device, check=not options.no_check,
                  exported=bool(backend_modes) and on_cpu)
    files = tempfile.TemporaryDirectory(prefix='mmrepvgg-benchmark-')
    candidates = make_candidates(specs, options.modes, options.precision, inputs, device,
                                 compile_mode=options.compile_mode,
                                 cudnn_benchmark=not options.no_cudnn_benchmark,
                                 winograd_tile=options.winograd_tile, pairs=options.pairs,
                                 folder=files.name, qat_file=options.qat_file)
    if backend_modes and not on_cpu:
        msg = (f'skipped the {", ".join(backend_modes)} rows: ONNX Runtime and OpenVINO run '
               f'on the CPU here, this run is on {device} (time them with --device cpu)')
        log(msg)
        skipped.append(msg)
    timed = [c for c in candidates if 'skipped' not in c.info]
    limit = (f' (a candidate stops after {options.time_limit:g} s of calls)'
             if options.time_limit is not None else '')
    if options.one_at_a_time:
        log(f'{len(timed)} candidates, one at a time: each set up, then {options.warmup} '
            f'warm-up and {options.repeats} timed calls{limit}, then released...')
    else:
        log(f'setting up {len(timed)} candidates, then {options.warmup} warm-up and '
            f'{options.repeats} timed rounds over all of them{limit}...')
    with files:  # the exported files, shared by the candidates that run them
        benchmark_interleaved(timed, device, repeats=options.repeats, warmup=options.warmup,
                              measure_memory=not options.no_memory, log=log,
                              time_limit=options.time_limit, progress=progress,
                              one_at_a_time=options.one_at_a_time)
    env['loadavg_end'] = environment().get('loadavg')

    baseline = find_baseline(candidates, options.baseline)
    rows = result_rows(candidates, options.batch_size, baseline)
    peak = env['matmul_peak'] = matmul_peak(device)
    for row in rows:
        row['x_peak'] = ratio(row['tflops'], peak['tflops'])
    # the backend modes add the precisions they set (openvino-bf16: bf16)
    precisions = list(dict.fromkeys(list(options.precision) + [r['precision'] for r in rows]))
    comp = comparisons(rows, precisions, options.modes)
    methods = sorted({r['memory_method'] for r in rows if r['memory_method']})
    bf16_note = openvino_bf16_note() if 'openvino-bf16' in backend_modes and on_cpu else None
    if bf16_note:
        env['openvino_bf16'] = bf16_note
    args = {f.name: getattr(options, f.name) for f in fields(options)}
    return dict(command=command, environment=env, args={
        k: (str(v) if isinstance(v, torch.device) else v) for k, v in args.items()},
        baseline=baseline.name, memory_method={m: MEMORY_METHODS[m] for m in methods},
        candidates=rows, comparisons=comp, skipped=skipped)
