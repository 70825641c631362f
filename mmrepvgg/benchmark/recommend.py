"""Which engine to deploy a config's fused model with, on this machine: every form the
project can write that this CPU can run, timed one after another (each set up, timed
and released, so that memory holds one form) at the config's test input size (each
form's runs bounded in time), each with its output
difference from the fp32 model and, with ``metric``, the config's own metric on its test
data; and the fastest form within an accuracy budget, with the commands that write and
test it."""
import importlib.util
import os
import os.path as osp
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from ..apis.config import load_config, scope_of
from ..apis.deploy import DEFAULT_CALIB
from ..deploy.export import config_input_shape
from ..env import cpu_info
from ..errors import InputError, MMRepVGGError, UsageError
from ..reproduce.experiments import config_stem, reference_for
from ..reproduce.preflight import data_problems
from ..testing.mini_data import DEFAULT_NUM_VAL
from .deploy_steps import Step, form_commands, form_steps, run_steps
from .models import BACKEND_MODES
from .report import format_table
from .run import BenchmarkOptions, run_benchmark
from .timing import Candidate, Progress, log

__all__ = ['FORMS', 'QAT_FORMS', 'DEFAULT_MAX_DROP', 'DEFAULT_METRIC_DROP', 'DEFAULT_TIME_LIMIT',
           'cpu_class', 'recommend', 'format_recommendation']

#: (benchmark mode, precision): every form of the fused model this project can deploy on
#: a CPU, from plain to most specialised (``winograd bf16``: Winograd convs with bfloat16
#: products, in ``torch.compile``; the packages are fp32).
FORMS = (('eager', 'fp32'), ('compile', 'fp32'), ('winograd-aoti', 'fp32'),
         ('onnxruntime', 'fp32'), ('openvino', 'fp32'), ('eager', 'bf16'),
         ('compile', 'bf16'), ('winograd', 'bf16'), ('openvino-bf16', 'bf16'),
         ('onnxruntime-int8', 'int8'), ('openvino-int8', 'int8'))
#: The forms a QAT checkpoint adds (``qat``): its INT8 file in each backend.
QAT_FORMS = (('onnxruntime-qat', 'int8'), ('openvino-qat', 'int8'))
#: The accuracy budget by default: the relative output difference from the fp32 model,
#: or with ``metric`` the drop in the config's metric, in points (OpenMMLab's benchmark
#: lists accept 0.5).
DEFAULT_MAX_DROP = 1e-3
DEFAULT_METRIC_DROP = 0.5
#: Seconds of calls (warm-up and timed, not set-up) after which a form's timing stops:
#: a full-size input, seconds per call on a small CPU, still takes minutes in all.
DEFAULT_TIME_LIMIT = 30.0
#: What a form's set-up does besides building the model: worth a line before it starts.
_SETUP_WORK = {'compile': 'torch.compile', 'winograd-aoti': 'torch.export and AOTInductor '
               'compile', 'onnxruntime': 'ONNX export', 'openvino': 'ONNX export, OpenVINO '
               'compile', 'openvino-bf16': 'ONNX export, OpenVINO compile',
               'onnxruntime-int8': 'ONNX export, INT8 quantization',
               'openvino-int8': 'ONNX export, INT8 quantization, OpenVINO compile',
               'openvino-qat': 'OpenVINO compile'}


def cpu_class() -> str:
    """The widest vector/matrix extension of this CPU: AMX, AVX-512, AVX2 or older."""
    flags = cpu_info()[1]
    if {'amx_bf16', 'amx_tile'} & flags:
        return 'AMX'
    if 'avx512f' in flags:
        extra = [name for flag, name in (('avx512_bf16', 'BF16'), ('avx512_vnni', 'VNNI'))
                 if flag in flags]
        return 'AVX-512' + (f' ({", ".join(extra)})' if extra else '')
    return 'AVX2' if 'avx2' in flags else 'pre-AVX2 or unknown'


def _form(mode: str, precision: str) -> str:
    return f'{mode} {precision}'


def _runs(count: int) -> str:
    return f'{count} run' + ('' if count == 1 else 's')


def _rel_text(rel: Optional[float]) -> str:
    return '-' if rel is None else f'{rel:.1e}'


class _FormProgress(Progress):
    """A line per form on stderr, numbered as mmengine's progress bar counts: before a
    slow set-up starts, and when the form's timing ends (or failed)."""

    def __init__(self):
        super().__init__(log)
        self.total = self.started = self.finished = 0

    def start(self, candidates: Sequence[Candidate]) -> None:
        self.total = len(candidates)

    def _line(self, count: int, cand: Candidate, text: str) -> None:
        self.log(f'[{count}/{self.total}] {_form(cand.info["mode"], cand.info["precision"])}'
                 f': {text}')

    def setting_up(self, cand: Candidate) -> None:
        self.started += 1
        work = _SETUP_WORK.get(cand.info['mode'])
        if work:
            self._line(self.started, cand, f'setting up ({work})...')

    def ready(self, cand: Candidate) -> None:
        if cand.error is not None:
            self.finished += 1
            self._line(self.finished, cand, f'setup failed: {cand.error}')

    def done(self, cand: Candidate) -> None:
        self.finished += 1
        if cand.error is not None:
            self._line(self.finished, cand, f'failed: {cand.error}')
            return
        stats = cand.stats()
        cut = ', time limit reached' if cand.time_limited else ''
        self._line(self.finished, cand,
                   f'{stats["median"] * 1e3:.1f} ms (median of {_runs(stats["n"])}{cut}), rel '
                   f'diff {_rel_text(cand.info.get("rel_diff"))}, set up in '
                   f'{cand.prep_seconds:.1f} s')


def _metric_of(cfg, config: str, checkpoint: Optional[str], mini: bool):
    """(name, scale to points) of the config's headline metric, after checking that it
    can be scored: trained weights and the test data are there."""
    reference = reference_for(config_stem(config), scope_of(cfg))
    if not reference.metric:
        raise UsageError(f'--metric scores mmseg and mmdet configs (mIoU, coco/bbox_mAP); '
                         f'{osp.basename(config)} is of scope {scope_of(cfg)!r}')
    if checkpoint is None:
        raise UsageError('--metric scores trained weights: give CHECKPOINT after CONFIG')
    problems = data_problems(cfg, mini, splits=('test_dataloader',))
    if problems:
        hint = '' if mini else '; or score on the bundled mini data with --mini'
        raise InputError('--metric needs the config\'s test data: ' + '; '.join(problems)
                         + hint)
    return reference.metric, reference.scale


def _calibration_size(cfg, mini: bool) -> Optional[int]:
    """``--calib`` of the INT8 forms' quantize step: the test set's size where it holds
    fewer images than the tool's default, else None (the default). Data that is not here
    to count: the size of the mini data tools/make_mini_data.py writes, or None."""
    if data_problems(cfg, splits=('test_dataloader',)):
        size = DEFAULT_NUM_VAL if mini else DEFAULT_CALIB
    else:
        from mmengine.registry import DATASETS, init_default_scope
        init_default_scope(scope_of(cfg))
        size = len(DATASETS.build(cfg.test_dataloader.dataset))
    return size if size < DEFAULT_CALIB else None


def _available(forms: Sequence[tuple], left_out: Dict[str, str]) -> List[tuple]:
    """The forms whose runtime is installed; the others into ``left_out``."""
    runnable = []
    for mode, precision in forms:
        module = BACKEND_MODES.get(mode, ('',))[0]
        if module in ('onnxruntime', 'openvino') and importlib.util.find_spec(module) is None:
            left_out[_form(mode, precision)] = f'{module} is not installed (the deploy extra)'
        else:
            runnable.append((mode, precision))
    return runnable


def _time_forms(config, checkpoint, cfg_options, shape, runnable, repeats, warmup,
                time_limit, command, qat_file: Optional[str] = None) -> Dict[str, Any]:
    """One benchmark run of the fused model over the forms of ``runnable``, one form at a
    time (at a config's full test size the forms together outgrow a 24 GB machine), a
    progress line per form."""
    modes = list(dict.fromkeys(m for m, _ in runnable))
    precisions = list(dict.fromkeys(p for m, p in runnable if m not in BACKEND_MODES))
    options = BenchmarkOptions(
        archs=(), forms=('fused',), resnets=(), config=[config], cfg_options=cfg_options,
        checkpoint=checkpoint, device='cpu', modes=modes, precision=precisions or ['fp32'],
        batch_size=1, input_size=list(shape), repeats=repeats, warmup=warmup,
        time_limit=time_limit, no_memory=True, pairs=list(runnable), one_at_a_time=True,
        qat_file=qat_file)
    return run_benchmark(options, command, progress=_FormProgress())


class _Scorer:
    """Scores forms as their commands would, in this process (a file two forms share,
    the ONNX export, is written once)."""

    def __init__(self, config: str, checkpoint: str, cfg_options: Optional[dict],
                 mini: bool, steps: Callable[[str, str], List[Step]], metric: str,
                 scale: float, qat: Optional[str] = None):
        self.config, self.checkpoint, self.cfg_options = config, checkpoint, cfg_options
        self.mini, self.steps, self.metric, self.scale = mini, steps, metric, scale
        self.qat = qat
        self.done: set = set()

    def __call__(self, form: tuple, count: str, folder: str) -> Union[float, str]:
        """The form's metric in points, its files in ``folder``, or why it could not be
        scored (a failed step is the form's, as a failed timing is: the other forms
        still count)."""
        start = time.perf_counter()
        log(f'{count} {_form(*form)}: scoring...')
        try:
            metrics = run_steps(self.steps(*form), self.config, self.checkpoint, folder,
                                self.done, self.cfg_options, self.mini, self.qat)
            if self.metric not in metrics:
                raise KeyError(f'the test gave no {self.metric} (it gave '
                               f'{", ".join(metrics)})')
            score = float(metrics[self.metric]) * self.scale
        except Exception as exc:  # noqa: BLE001  (the form is scored as failed, with its cause)
            why = f'{type(exc).__name__}: {exc}'
            log(f'{count} {_form(*form)}: scoring failed: {why}')
            return why
        log(f'{count} {_form(*form)}: {self.metric} {score:.2f}, scored in '
            f'{time.perf_counter() - start:.1f} s')
        return score


def _score_forms(rows: List[dict], scorer: _Scorer) -> float:
    """Each row's ``metric`` (in points) and ``drop`` from the eager fp32 form, or its
    ``metric_error``. Returns the eager fp32 metric (scored also when that form was not
    timed)."""
    forms = [(r['mode'], r['precision']) for r in rows]
    if ('eager', 'fp32') not in forms:
        forms.insert(0, ('eager', 'fp32'))
    log(f'scoring {len(forms)} forms with {scorer.metric} on the '
        f'{"mini " if scorer.mini else ""}test data, as their commands would...')
    with tempfile.TemporaryDirectory(prefix='mmrepvgg-recommend-') as folder:
        scores = {form: scorer(form, f'[{n}/{len(forms)}]', folder)
                  for n, form in enumerate(forms, 1)}
    base = scores[('eager', 'fp32')]
    if not isinstance(base, float):
        raise MMRepVGGError(f'--metric: the eager fp32 model, which the drops are measured '
                         f'from, could not be scored: {base}')
    for row in rows:
        score = scores[(row['mode'], row['precision'])]
        scored = isinstance(score, float)
        row.update(metric=score if scored else None, drop=base - score if scored else None,
                   metric_error=None if scored else score)
    return base


#: What a row keeps of the benchmark's measure of its rounding (mmrepvgg.benchmark.run
#: ._record_error): its error and the fp32 reference's, both against float64, and the scale.
_ROUNDING_KEYS = ('fp64_abs_diff', 'reference_fp64_abs_diff', 'output_scale')


def _rows(result: Dict[str, Any], left_out: Dict[str, str], commands) -> List[dict]:
    """The timed forms (the run timed only those asked for), fastest first, with their
    speed-up over eager fp32."""
    rows = []
    for row in result['candidates']:
        form = (row['mode'], row['precision'])
        if row.get('median_ms') is None:
            left_out[_form(*form)] = row.get('error') or 'failed'
            continue
        rows.append(dict(mode=form[0], precision=form[1], ms=row['median_ms'],
                         runs=row['runs'], time_limited=row['time_limited'],
                         setup_s=row['prep_s'], rel_diff=row.get('rel_diff'),
                         **{k: row.get(k) for k in _ROUNDING_KEYS},
                         commands=commands(*form)))
    rows.sort(key=lambda r: r['ms'])
    base = next((r['ms'] for r in rows if (r['mode'], r['precision']) == ('eager', 'fp32')),
                None)
    for row in rows:
        row['speedup'] = base / row['ms'] if base else None
    return rows


def _within(row: dict, max_drop: float, metric: bool) -> bool:
    value = row.get('drop') if metric else row['rel_diff']
    return value is not None and value <= max_drop


def recommend(config: str, checkpoint: Optional[str] = None,
              cfg_options: Optional[dict] = None, mini: bool = False,
              max_drop: Optional[float] = None, forms: Sequence[tuple] = FORMS,
              repeats: int = 5, warmup: int = 1, command: str = '',
              time_limit: Optional[float] = DEFAULT_TIME_LIMIT,
              metric: bool = False, qat: Optional[str] = None) -> Dict[str, Any]:
    """Time every form in ``forms`` this machine can run, for the config's fused model at
    its test input size, batch 1, on the CPU: ``warmup`` and up to ``repeats`` timed
    runs, stopped once its calls took ``time_limit`` seconds. Each form's ``rel_diff``
    is its largest output difference from the fp32 training-form model over that
    model's largest output; with ``metric``, each form is also written and tested as its
    commands would (``metric``, in points, and ``drop`` from the eager fp32 form).

    ``qat``: a QAT fine-tune of ``checkpoint`` (``tools/train.py --qat``); its INT8 file
    joins the forms (:data:`QAT_FORMS`), timed and scored beside the post-training ones.

    ``max_drop``: the budget, in ``rel_diff`` or, with ``metric``, in metric points
    (default :data:`DEFAULT_MAX_DROP` or :data:`DEFAULT_METRIC_DROP`). Returns the rows
    (fastest first), the forms left out and why, the machine, and ``recommended``: the
    fastest row within the budget (None if none).
    """
    if max_drop is None:
        max_drop = DEFAULT_METRIC_DROP if metric else DEFAULT_MAX_DROP
    cfg = load_config(config, cfg_options=cfg_options, mini=mini)
    shape = config_input_shape(cfg)
    if shape is None:
        raise UsageError('the config\'s test pipeline gives no image size to time at')
    metric_name, scale = _metric_of(cfg, config, checkpoint, mini) if metric else (None, 1)
    left_out: Dict[str, str] = {}
    if qat:
        forms = list(forms) + [f for f in QAT_FORMS if f not in forms]
    runnable = _available(forms, left_out)
    calib = _calibration_size(cfg, mini) if any(p == 'int8' for _, p in runnable) else None
    with tempfile.TemporaryDirectory(prefix='mmrepvgg-recommend-') as folder:
        qat_file = _qat_file(config, qat, shape, cfg_options, folder) if qat else None
        result = _time_forms(config, checkpoint, cfg_options, shape, runnable, repeats,
                             warmup, time_limit, command, qat_file)

    def steps(mode, precision):
        return form_steps(mode, precision, shape, calib)

    def commands(mode, precision):
        return _with_program_note(mode, precision, form_commands(
            steps(mode, precision), config, checkpoint or 'CHECKPOINT', mini, cfg_options,
            qat))
    rows = _rows(result, left_out, commands)
    base_metric = (_score_forms(rows, _Scorer(config, checkpoint, cfg_options, mini, steps,
                                              metric_name, scale, qat))
                   if metric else None)
    for row in rows:
        row['within'] = _within(row, max_drop, metric)
    env = result['environment']
    machine = dict(cpu=env.get('cpu'), cpu_class=cpu_class(), cores=os.cpu_count(),
                   threads=env.get('threads'), torch=torch.__version__,
                   backends=env.get('backends') or {})
    return dict(config=config, checkpoint=checkpoint, input=[1, 3, *shape], mini=mini,
                max_drop=max_drop, repeats=repeats, warmup=warmup, time_limit=time_limit,
                metric=metric_name, base_metric=base_metric, machine=machine, rows=rows,
                left_out=left_out, recommended=next((r for r in rows if r['within']), None))


def _qat_file(config: str, qat: str, shape, cfg_options: Optional[dict], folder: str) -> str:
    """The INT8 file of the QAT checkpoint ``qat`` at the timed input size, in ``folder``
    (``tools/export.py``'s export, from the one read of the file); a checkpoint that is
    not one is refused."""
    from ..checkpoint.fetch import fetch_and_load
    from ..deploy.onnx_export import ExportFailure
    from ..qat import export_qat, is_qat_state
    try:
        state = fetch_and_load(qat)[1]
    except (OSError, ValueError) as err:
        raise InputError(f'error: --qat: {err}') from err
    if not is_qat_state(state):
        raise UsageError(f'--qat {qat} holds no quantizers: give the checkpoint of a '
                         'quantization-aware fine-tune (tools/train.py --qat)')
    path = osp.join(folder, 'model_qat.onnx')
    log(f'exporting the QAT checkpoint {qat} to INT8 ONNX for its forms...')
    try:
        export_qat(config, state, path, list(shape), cfg_options=cfg_options,
                   source=osp.basename(qat))
    except (OSError, ValueError, KeyError, ExportFailure) as err:
        raise InputError(f'error: --qat: {err}') from err
    return path


def _with_program_note(mode: str, precision: str, commands: List[str]) -> List[str]:
    """A torch form is deployed in a program: say the call, as a shell comment."""
    if mode in BACKEND_MODES:
        return commands
    return commands[:-1] + [
        f'{commands[-1]}  # in a program: mmrepvgg.deploy.optimize_for_inference(model, '
        f"example, mode='{mode}', precision='{precision}')"]


def _header(result: Dict[str, Any]) -> List[str]:
    m = result['machine']
    libs = ', '.join(f'{k} {v}' for k, v in m['backends'].items())
    limit = (f', at most {result["time_limit"]:g} s of runs per form'
             if result['time_limit'] is not None else '')
    if result['metric']:
        data = 'mini ' if result['mini'] else ''
        budget = (f'{result["metric"]} drop <= {result["max_drop"]:g} points from eager fp32 '
                  f'({result["base_metric"]:.2f} on the {data}test data)')
    else:
        budget = f'relative output difference <= {result["max_drop"]:g}'
    return [f'# {m["cpu"]} ({m["cpu_class"]}), {m["cores"]} cores, {m["threads"]} threads; '
            f'torch {m["torch"]}' + (f', {libs}' if libs else ''),
            f'# {osp.basename(result["config"])}, fused, input '
            f'{"x".join(map(str, result["input"]))}; median of up to {result["repeats"]} '
            f'timed runs after {result["warmup"]} warm-up{limit}',
            f'# accuracy budget: {budget}']


def _columns(metric: Optional[str]) -> List[tuple]:
    def number(key, spec):
        return lambda r: '-' if r.get(key) is None else format(r[key], spec)
    columns = [('form', lambda r: _form(r['mode'], r['precision']), True),
               ('ms', number('ms', '.1f'), False), ('runs', number('runs', 'd'), False),
               ('x eager', number('speedup', '.2f'), False),
               ('setup s', number('setup_s', '.1f'), False),
               ('rel diff', lambda r: _rel_text(r['rel_diff']), False)]
    if metric:
        columns += [(metric, number('metric', '.2f'), False),
                    ('drop', number('drop', '.2f'), False)]
    return columns + [('within', lambda r: 'yes' if r['within'] else 'no', True)]


def format_recommendation(result: Dict[str, Any]) -> str:
    """The table (machine first, fastest form first) and the one-line recommendation."""
    lines = _header(result) + [format_table(result['rows'], _columns(result['metric']))]
    for row in result['rows']:
        if row.get('metric_error'):
            lines.append(f'{_form(row["mode"], row["precision"])}: not scored: '
                         f'{row["metric_error"]}')
    for form, why in result['left_out'].items():
        lines.append(f'{form}: not timed: {why}')
    best = result['recommended']
    if best is None:
        lines.append('recommended: none within the budget; raise --max-drop')
    else:
        speed = '' if best['speedup'] is None else f', {best["speedup"]:.2f}x eager fp32'
        lines.append(f'recommended: {_form(best["mode"], best["precision"])} '
                     f'({best["ms"]:.1f} ms{speed}): ' + ' && '.join(best['commands']))
    return '\n'.join(lines)
