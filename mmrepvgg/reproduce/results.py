"""The tables of a reproduction (``DIR/results.md``, ``DIR/results.json``): per task, each
experiment's metric unfused and fused beside the published number, the difference and
whether it is within tolerance, the speeds, and each RepVGG - ResNet gap beside the
paper's; plus what each experiment's ``result.json`` records about its environment: the
facts of the machine that ran its training, which that machine wrote itself
(:func:`record_environment`, ``<step work dir>/environment.json``)."""
import json
import os
import os.path as osp
import platform
import socket
import statistics
import subprocess
import time
from typing import Dict, List, Optional, Sequence

import torch

from ..apis.config import checkout_root
from ..env import cpu_info, driver_version
from ..fileio import write_text_atomic
from ..version import __version__
from .experiments import PAIRS, reference_for

__all__ = ['git_commit', 'machine_facts', 'record_environment', 'read_environment',
           'environment_summary', 'metrics_line', 'write_results']

#: The file a step's machine writes into the step's work dir.
ENVIRONMENT_FILE = 'environment.json'
_SLURM = ('SLURM_JOB_ID', 'SLURM_JOB_NODELIST', 'SLURM_NNODES', 'SLURM_NTASKS')

_TITLES = {'mmseg': 'Segmentation', 'mmdet': 'Detection'}


def git_commit() -> Optional[str]:
    """The commit of the repository mmrepvgg is imported from, '+dirty' with uncommitted
    changes; None for an installed wheel (its version is in the environment facts)."""
    root = checkout_root()
    if root is None or not osp.exists(osp.join(root, '.git')):
        return None
    try:
        commit = subprocess.run(['git', '-C', root, 'rev-parse', 'HEAD'],
                                capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(['git', '-C', root, 'status', '--porcelain', '-uno'],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode:
        return None
    return commit.stdout.strip() + ('+dirty' if dirty.stdout.strip() else '')


def _mmcv_facts() -> Dict[str, Optional[str]]:
    try:
        from importlib.metadata import version
        found = version('mmcv')
    except Exception:  # noqa: BLE001 - not installed (mmcv-lite has another name)
        return dict(mmcv=None, mmcv_ops_cuda=None)
    try:
        from mmcv.ops import get_compiling_cuda_version
        ops = get_compiling_cuda_version()  # 'not available': CPU ops only
    except Exception as err:  # noqa: BLE001 - ops not built: say why
        ops = f'mmcv.ops does not import: {type(err).__name__}'
    return dict(mmcv=found, mmcv_ops_cuda=ops)


def machine_facts() -> dict:
    """What decides a result on the machine running this process: its host (slurm's node
    name inside a job), Python, mmrepvgg's version, torch and its CUDA, the GPUs torch can
    use, the NVIDIA driver, mmcv and the CUDA its ops were built for, the CPU, the slurm
    job."""
    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
    slurm = {k.lower(): os.environ[k] for k in _SLURM if k in os.environ}
    return dict(host=os.environ.get('SLURMD_NODENAME') or socket.gethostname(),
                python=platform.python_version(), mmrepvgg=__version__,
                torch=torch.__version__,
                cuda=torch.version.cuda if cuda else None, torch_cuda_build=torch.version.cuda,
                gpu=', '.join(names) or None, gpus_visible=count,
                driver=driver_version(), **_mmcv_facts(), cpu=cpu_info()[0],
                slurm=slurm or None, recorded=time.strftime('%Y-%m-%dT%H:%M:%S'))


def record_environment(path: str, facts: Optional[dict] = None) -> dict:
    """Write ``facts`` (default: this machine's) to ``path`` as JSON, whole or not at all."""
    facts = machine_facts() if facts is None else facts
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    write_text_atomic(path, json.dumps(facts, indent=1))
    return facts


def read_environment(folder: str) -> Optional[dict]:
    """The facts a step's machine recorded in ``folder``; None if it recorded none."""
    path = osp.join(folder, ENVIRONMENT_FILE)
    try:
        with open(path) as f:
            facts = json.load(f)
    except (OSError, ValueError):
        return None
    return facts if isinstance(facts, dict) else None


def environment_summary(plan, machine: Optional[dict] = None,
                        source: Optional[str] = None) -> dict:
    """What decides a result besides the code: the facts of ``machine`` (recorded on the
    machine that trained; ``source`` says which step recorded them) and the run's split.
    Without a record the machine's facts are left empty rather than guessed."""
    cfg = plan.cfg
    randomness = cfg.get('randomness') or {}
    facts = dict(machine or {})
    base = dict(host=None, python=None, torch=None, cuda=None, gpu=None, driver=None,
                mmcv=None, mmcv_ops_cuda=None, cpu=None)
    base.update(facts)
    base['recorded_by'] = source if machine else (
        'nothing: no step recorded its machine (a training from an older version, or a '
        'node that could not write its environment.json)')
    base.update(gpus=plan.procs if plan.cuda else 0, processes=plan.procs,
                launcher=plan.launcher, images_per_gpu=plan.per_gpu,
                batch=plan.procs * plan.per_gpu, learning_rate=plan.learning_rate,
                seed=randomness.get('seed'),
                deterministic=bool(randomness.get('deterministic', False)),
                cfg_options=plan.cfg_options)
    return base


def metrics_line(metrics: Optional[Dict[str, float]]) -> str:
    if not metrics:
        return 'no metrics'
    return ', '.join(f'{k} {v:.4g}' for k, v in list(metrics.items())[:3])


def _values(results: Sequence[dict], step: str, metric: str, scale: float) -> List[float]:
    return [r['metrics'][step][metric] * scale for r in results
            if metric in (r.get('metrics', {}).get(step) or {})]


def _mean(values: List[float]) -> Optional[float]:
    return statistics.fmean(values) if values else None


def _shown(values: List[float]) -> str:
    if not values:
        return '-'
    if len(values) == 1:
        return f'{values[0]:.2f}'
    return f'{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})'


def _status(results: Sequence[dict]) -> str:
    for r in results:
        for step, entry in r.get('steps', {}).items():
            if entry.get('status') in ('failed', 'blocked'):
                return (f'{step} {entry["status"]}: '
                        + (entry.get('log') or entry.get('reason', '')))
    done = all(e.get('status') in ('done', 'skipped')
               for r in results for e in r.get('steps', {}).values())
    return 'done' if done and results and results[0].get('steps') else 'pending'


def _speed(results: Sequence[dict]) -> Dict[str, float]:
    """Median ms of the deployed form (fused RepVGG, or the network as it is) per part and
    precision, from the first result that was timed."""
    for r in results:
        rows = (r.get('speed') or {}).get('rows') or []
        if rows:
            out = {}
            for row in rows:
                if row['ms'] is None or '/train' in row['name'] and any(
                        '/fused' in o['name'] and o['part'] == row['part'] for o in rows):
                    continue
                out[f'{row["part"]} {row["precision"]}'] = row['ms']
            return out
    return {}


def _speed_setting(results: Sequence[dict]) -> Optional[str]:
    """Where and at what size the speeds were taken: 'device: part batch B HxW, ...'."""
    for r in results:
        speed = r.get('speed') or {}
        if speed.get('rows'):
            parts = {row['part']: f'{row["part"]} batch {row["batch"]} '
                     f'{"x".join(map(str, row["input"]))}' for row in speed['rows']}
            return f'{speed.get("device")}: {", ".join(parts.values())}'
    return None


def _row(stem: str, scope: str, results: Sequence[dict], tolerance: float) -> dict:
    ref = reference_for(stem, scope)
    test = _values(results, 'test', ref.metric, ref.scale)
    deploy = _values(results, 'deploy', ref.metric, ref.scale)
    mean = _mean(test)
    diff = None if mean is None or ref.value is None else mean - ref.value
    return dict(config=stem, task=scope, metric=ref.metric, pair=PAIRS.get(stem),
                unfused=test, fused=deploy, mean_unfused=mean, mean_fused=_mean(deploy),
                reference=ref.value, reference_source=ref.source, difference=diff,
                within_tolerance=None if diff is None else abs(diff) <= tolerance,
                speed_ms=_speed(results), speed_setting=_speed_setting(results),
                status=_status(results))


def _gaps(rows: Dict[str, dict]) -> List[dict]:
    gaps = []
    for stem, row in rows.items():
        pair = rows.get(row['pair']) if row['pair'] else None
        if pair is None:
            continue
        measured = (None if row['mean_unfused'] is None or pair['mean_unfused'] is None
                    else row['mean_unfused'] - pair['mean_unfused'])
        paper = (None if row['reference'] is None or pair['reference'] is None or
                 row['reference_source'] != pair['reference_source']
                 else row['reference'] - pair['reference'])
        gaps.append(dict(repvgg=stem, resnet=row['pair'], reproduced=measured,
                         published=paper))
    return gaps


def _fmt(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return '-'
    return f'{value:+.2f}' if signed else f'{value:.2f}'


def _markdown(tables: Dict[str, dict], tolerance: float) -> str:
    lines = ['# Reproduction results', '',
             f'Unfused: `tools/test.py`; fused: the same checkpoint with `--deploy`. '
             f'Difference: unfused - published; within tolerance: |difference| <= '
             f'{tolerance}. Speed: median ms per batch of the deployed form (fused RepVGG), '
             'from `tools/benchmark.py`.', '']
    for scope, table in tables.items():
        rows = table['rows']
        parts = sorted({k for r in rows.values() for k in r['speed_ms']})
        lines += [f'## {_TITLES.get(scope, scope)} ({scope})', '',
                  '| config | metric | unfused | fused | published | difference | within '
                  + ''.join(f'| {p} ms ' for p in parts) + '| status |',
                  '|---' * (7 + len(parts)) + '|---|']
        for stem, r in rows.items():
            within = {True: 'yes', False: 'no', None: '-'}[r['within_tolerance']]
            lines.append(
                f'| {stem} | {r["metric"]} | {_shown(r["unfused"])} | {_shown(r["fused"])} | '
                f'{_fmt(r["reference"])} | {_fmt(r["difference"], True)} | {within} '
                + ''.join(f'| {_fmt(r["speed_ms"].get(p))} ' for p in parts)
                + f'| {r["status"]} |')
        sources = sorted({f'{r["config"]}: {r["reference_source"]}' for r in rows.values()})
        settings = sorted({r['speed_setting'] for r in rows.values() if r['speed_setting']})
        lines += ['', 'Published numbers: ' + '; '.join(sources) + '.', '']
        lines += ['Speeds measured on ' + '; '.join(settings) + '.', ''] if settings else []
        if table['gaps']:
            lines += ['| RepVGG | ResNet | reproduced gap | published gap |',
                      '|---|---|---|---|']
            lines += [f'| {g["repvgg"]} | {g["resnet"]} | {_fmt(g["reproduced"], True)} | '
                      f'{_fmt(g["published"], True)} |' for g in table['gaps']]
            lines.append('')
    return '\n'.join(lines)


def write_results(work_dir: str, results: Sequence[dict], plans: Sequence,
                  tolerance: float) -> dict:
    """Rewrite ``results.md`` and ``results.json`` under ``work_dir`` from every
    experiment's result (seeds of one config pooled: mean and spread)."""
    by_stem: Dict[str, list] = {}
    scopes: Dict[str, str] = {}
    for result, plan in zip(results, plans):
        by_stem.setdefault(plan.stem, []).append(result)
        scopes[plan.stem] = plan.scope
    tables: Dict[str, dict] = {}
    for stem, group in by_stem.items():
        table = tables.setdefault(scopes[stem], dict(rows={}, gaps=[]))
        table['rows'][stem] = _row(stem, scopes[stem], group, tolerance)
    for table in tables.values():
        table['gaps'] = _gaps(table['rows'])
    write_text_atomic(osp.join(work_dir, 'results.md'), _markdown(tables, tolerance))
    write_text_atomic(osp.join(work_dir, 'results.json'),
                      json.dumps(dict(tolerance=tolerance, tables=tables), indent=1))
    return tables
