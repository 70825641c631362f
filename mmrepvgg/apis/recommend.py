"""Which engine to deploy a config's fused model with, on this machine: every form the
project can write that this CPU can run, timed in one interleaved benchmark run at the
config's test input size, each with its output difference from the fp32 model, and the
fastest form within an accuracy budget, with the commands that write and test it."""
import importlib.util
import json
import os
import os.path as osp
import shlex
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..deploy.export import config_input_shape
from ..env import cpu_info
from .benchmark_run import BenchmarkOptions, run_benchmark
from .config import load_config

__all__ = ['FORMS', 'cpu_class', 'recommend', 'format_recommendation']

#: (benchmark mode, precision): every form of the fused model this project can deploy on
#: a CPU, from plain to most specialised.
FORMS = (('eager', 'fp32'), ('compile', 'fp32'), ('winograd-aoti', 'fp32'),
         ('onnxruntime', 'fp32'), ('openvino', 'fp32'), ('eager', 'bf16'),
         ('compile', 'bf16'), ('openvino-bf16', 'bf16'), ('onnxruntime-int8', 'int8'),
         ('openvino-int8', 'int8'))
_NEEDS = {'onnxruntime': 'onnxruntime', 'onnxruntime-int8': 'onnxruntime',
          'openvino': 'openvino', 'openvino-bf16': 'openvino', 'openvino-int8': 'openvino'}
_DEFAULT_BUDGET = 1e-3


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


def _option_text(cfg_options: Optional[dict]) -> str:
    """``cfg_options`` back as the ``--cfg-options`` of a command line."""
    if not cfg_options:
        return ''
    pairs = [f'{k}={json.dumps(v, separators=(",", ":")) if isinstance(v, (list, tuple)) else v}'
             for k, v in cfg_options.items()]
    return ' --cfg-options ' + ' '.join(shlex.quote(p) for p in pairs)


def _commands(mode: str, precision: str, config: str, checkpoint: str, shape: Sequence[int],
              mini: bool, cfg_options: Optional[dict]) -> List[str]:
    """The commands that write this form and score it with the config's own metric."""
    q = shlex.quote
    tail = (' --mini' if mini else '') + _option_text(cfg_options)
    test = f'python tools/test.py {q(config)}'
    export = f'python tools/export.py {q(config)} {q(checkpoint)}'
    size = f' --shape {shape[0]} {shape[1]}'
    if mode == 'winograd-aoti':
        return [f'{export} model.pt2 --format aoti --winograd{size}{tail}',
                f'{test} model.pt2 --backend aoti{tail}']
    if mode in _NEEDS:
        backend = _NEEDS[mode]
        files = [f'{export} model.onnx{tail}']
        onnx = 'model.onnx'
        if precision == 'int8':
            files.append(f'python tools/quantize.py {q(config)} model.onnx model_int8.onnx'
                         f'{tail}')
            onnx = 'model_int8.onnx'
        bf16 = ' --precision bf16' if precision == 'bf16' else ''
        return files + [f'{test} {onnx} --backend {backend}{bf16}{tail}']
    recipe = '' if mode == 'eager' else f", mode='{mode}'"
    recipe += '' if precision == 'fp32' else f", precision='{precision}'"
    return [f'{test} {q(checkpoint)} --deploy{tail}  (the fused model in PyTorch; in a '
            f'program: mmrepvgg.deploy.optimize_for_inference(model, example{recipe}))']


def recommend(config: str, checkpoint: Optional[str] = None,
              cfg_options: Optional[dict] = None, mini: bool = False,
              max_drop: float = _DEFAULT_BUDGET, forms: Sequence[tuple] = FORMS,
              repeats: int = 5, warmup: int = 1, command: str = '') -> Dict[str, Any]:
    """Time every form in ``forms`` this machine can run, for the config's fused model at
    its test input size, batch 1, on the CPU; each form's ``rel_diff`` is its largest
    output difference from the fp32 training-form model over that model's largest output.
    Returns the rows (fastest first), the forms left out and why, the machine, and
    ``recommended``: the fastest row with ``rel_diff <= max_drop`` (None if none)."""
    cfg = load_config(config, cfg_options=cfg_options, mini=mini)
    shape = config_input_shape(cfg)
    if shape is None:
        raise SystemExit('the config\'s test pipeline gives no image size to time at')
    left_out = {}
    runnable = []
    for mode, precision in forms:
        module = _NEEDS.get(mode)
        if module and importlib.util.find_spec(module) is None:
            left_out[f'{mode} {precision}'] = f'{module} is not installed (the deploy extra)'
        else:
            runnable.append((mode, precision))
    modes = list(dict.fromkeys(m for m, _ in runnable))
    precisions = list(dict.fromkeys(p for m, p in runnable if m in ('eager', 'compile')))
    options = BenchmarkOptions(
        archs=(), forms=('fused',), resnets=(), config=[config], cfg_options=cfg_options,
        checkpoint=checkpoint, device='cpu', modes=modes, precision=precisions or ['fp32'],
        batch_size=1, input_size=list(shape), repeats=repeats, warmup=warmup, no_memory=True)
    result = run_benchmark(options, command)
    wanted = set(runnable)
    rows = []
    for row in result['candidates']:
        if (row['mode'], row['precision']) not in wanted:
            continue
        if row.get('median_ms') is None:
            left_out[f'{row["mode"]} {row["precision"]}'] = row.get('error') or 'failed'
            continue
        rel = row.get('rel_diff')
        rows.append(dict(mode=row['mode'], precision=row['precision'], ms=row['median_ms'],
                         rel_diff=rel, within=rel is not None and rel <= max_drop,
                         commands=_commands(row['mode'], row['precision'], config,
                                            checkpoint or 'CHECKPOINT', shape, mini,
                                            cfg_options)))
    rows.sort(key=lambda r: r['ms'])
    base = next((r['ms'] for r in rows if (r['mode'], r['precision']) == ('eager', 'fp32')),
                None)
    for row in rows:
        row['speedup'] = base / row['ms'] if base else None
    env = result['environment']
    machine = dict(cpu=env.get('cpu'), cpu_class=cpu_class(), cores=os.cpu_count(),
                   threads=env.get('threads'), torch=torch.__version__,
                   backends=env.get('backends') or {})
    return dict(config=config, checkpoint=checkpoint, input=[1, 3, *shape],
                max_drop=max_drop, machine=machine, rows=rows, left_out=left_out,
                recommended=next((r for r in rows if r['within']), None))


def format_recommendation(result: Dict[str, Any]) -> str:
    """The table (machine first, fastest form first) and the one-line recommendation."""
    m = result['machine']
    libs = ', '.join(f'{k} {v}' for k, v in m['backends'].items())
    lines = [f'# {m["cpu"]} ({m["cpu_class"]}), {m["cores"]} cores, {m["threads"]} threads; '
             f'torch {m["torch"]}' + (f', {libs}' if libs else ''),
             f'# {osp.basename(result["config"])}, fused, input '
             f'{"x".join(map(str, result["input"]))}; accuracy budget: relative output '
             f'difference <= {result["max_drop"]:g}',
             f'{"form":<28} {"ms":>9} {"x eager":>8} {"rel diff":>9}  within']
    for r in result['rows']:
        rel = '-' if r['rel_diff'] is None else f'{r["rel_diff"]:.1e}'
        speed = '-' if r['speedup'] is None else f'{r["speedup"]:.2f}'
        lines.append(f'{r["mode"] + " " + r["precision"]:<28} {r["ms"]:>9.1f} {speed:>8} '
                     f'{rel:>9}  {"yes" if r["within"] else "no"}')
    for form, why in result['left_out'].items():
        lines.append(f'{form:<28} not timed: {why}')
    best = result['recommended']
    if best is None:
        lines.append('recommended: none within the budget; raise --max-drop')
    else:
        lines.append(f'recommended: {best["mode"]} {best["precision"]} ({best["ms"]:.1f} ms, '
                     f'{best["speedup"]:.2f}x eager fp32): ' + ' && '.join(best['commands']))
    return '\n'.join(lines)
