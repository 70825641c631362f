"""The benchmark's report: the timed candidates as rows (what the JSON result holds),
the table and notes ``tools/benchmark.py`` prints, the comparisons of each fused model
with its training form and with the plain models (same treatment, best of each,
deployed vs as-is), and the JSON file."""
import json
from typing import Any, Dict, List, Optional, Sequence

from ..fileio import write_text_atomic
from .models import BACKEND_MODES
from .timing import Candidate, ratio

__all__ = ['MAIN_COLUMNS', 'result_rows', 'median_ms', 'format_table', 'comparisons',
           'format_comparisons', 'format_report', 'write_json']


def _fmt(value: Optional[float], spec: str = '.1f', none: str = '-') -> str:
    return none if value is None else format(value, spec)


def result_rows(candidates: Sequence[Candidate], batch: int,
                baseline: Optional[Candidate]) -> List[Dict[str, Any]]:
    """One row per candidate: its info, timings in ms (``runs`` of them, fewer than asked
    where ``time_limited``), images/s, speed relative to ``baseline``, TFLOP/s, peak
    memory, set-up time and error."""
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
            times_ms=[t * 1e3 for t in cand.times], runs=st['n'],
            time_limited=cand.time_limited, error=cand.error))
    return rows


def format_table(rows: Sequence[Dict[str, Any]], columns: Sequence[tuple]) -> str:
    """``rows`` as aligned text columns: ``columns`` are (title, row -> str, left)."""
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
    ('1st call s', lambda r: _fmt(r.get('first_call_s'), '.2f'), False),
    ('file MB', lambda r: _fmt(r.get('file_mb'), '.0f'), False),
    ('Winograd MB', lambda r: _fmt(r.get('winograd_mb'), '.0f'), False),
    ('max|diff|', lambda r: _fmt(r.get('max_abs_diff'), '.1e'), False),
    ('vs fp64', lambda r: _fmt(r.get('fp64_abs_diff'), '.1e'), False),
)


def median_ms(row: Dict[str, Any]) -> Optional[float]:
    """A row's median time in ms; None where it failed or was not timed."""
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
                     fused_ms=median_ms(fused), fused_mode=fused['mode'])
        if train is not None:
            entry.update(train_ms=median_ms(train), train_mode=train['mode'],
                         speedup_vs_train=ratio(median_ms(train), median_ms(fused)))
        for res in resnets:
            other = pick(res)
            if other is not None:
                entry[f'time_vs_{res}'] = ratio(median_ms(fused), median_ms(other))
                entry[f'{res}_ms'] = median_ms(other)
                entry[f'{res}_mode'] = other['mode']
        return entry

    for precision in precisions:
        for mode in modes:
            def pick(key, mode=mode, precision=precision):
                row = by.get((key, mode, precision))
                return row if row is not None and median_ms(row) is not None else None
            for label in labels:
                entry = compare(label, pick, precision, mode)
                if entry:
                    out['same_treatment'].append(entry)
        best = {}
        for key in keys:
            timed = [r for r in rows if r['key'] == key and r['precision'] == precision
                     and median_ms(r) is not None]
            if timed:
                best[key] = min(timed, key=median_ms)
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
                return row if row is not None and median_ms(row) is not None else None
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


def _header(result: Dict[str, Any]) -> str:
    env, args = result['environment'], result['args']
    peak = env['matmul_peak']
    on_cuda = args['device'].split(':')[0] == 'cuda'
    height, width = args['input_size']
    return (f'# {result["command"]}\n# {env["date"]}  device {env["device"]}'
            f'{" (" + env["gpu"] + ")" if on_cuda else ""}  '
            f'cpu {env.get("cpu")} x{env["cpu_count"]}  torch {env["torch"]}'
            + ''.join(f'  {name} {version}' for name, version in env['backends'].items())
            + f'  threads {env["threads"]}  load avg {env.get("loadavg")} -> '
            f'{env.get("loadavg_end")}\n'
            f'# batch {args["batch_size"]}, input {height}x{width}, '
            f'{args["warmup"]} warm-up + {args["repeats"]} timed rounds, interleaved; '
            f'medians; x base = speed relative to {result["baseline"]!r}; fp32 matmul peak '
            f'{peak["tflops"]:.3f} TFLOP/s (torch.mm {peak["size"]}x{peak["size"]})')


def _backend_notes(result: Dict[str, Any]) -> List[str]:
    """What the rows of the backend modes measured, for the modes that have rows."""
    env, args, rows = result['environment'], result['args'], result['candidates']
    backend_modes = [m for m in args['modes'] if m in BACKEND_MODES]
    exported_rows = [r for r in rows if r['mode'] in BACKEND_MODES and not r.get('skipped')]
    onnx_modes = [m for m in backend_modes if BACKEND_MODES[m][0] != 'aoti']
    lines = []
    if any(r['mode'] in onnx_modes for r in exported_rows):
        lines.append(
            f'{"/".join(onnx_modes)} rows: the eval-mode network exported to ONNX '
            '(mmrepvgg.deploy.export_module, static shape) and run on the CPU by '
            f'mmrepvgg.deploy.load_backend with {env["threads"]} threads; ms/batch is the '
            'runner\'s call, numpy conversion of input and outputs included; prep s: '
            'export + compile + first call (one export per model, and one INT8 '
            'quantization, shared by its rows: counted in the first row set up).')
    if any(BACKEND_MODES[r['mode']][0] == 'aoti' for r in exported_rows):
        lines.append(
            'aoti/winograd-aoti rows: the eval-mode network compiled into an AOTInductor '
            'package (mmrepvgg.deploy.package_module: torch.export + '
            'aoti_compile_and_package, frozen weights, NHWC; winograd-aoti with Winograd '
            f'convs, tile {args["winograd_tile"]}) and loaded back by '
            'mmrepvgg.deploy.load_backend; prep s: conversion + export + compile + load + '
            'first call, paid once per package; load s and 1st call s: loading the '
            'package file and its first call, what a process that uses it pays (the '
            'first call transforms the Winograd convs\' weights); file MB: the package; '
            'Winograd MB: the transformed weights held in memory from the first call on.')
    if any(r['precision'] == 'int8' for r in exported_rows):
        lines.append(
            'int8 rows: the exported file quantized to static INT8 first '
            '(mmrepvgg.deploy.quantize_onnx, QDQ, int8 weights per channel, uint8 '
            'activations calibrated on the benchmark input; prep s includes it); '
            'max|diff| there is quantization error, not a check.')
    if any(r['kind'] == 'model' for r in exported_rows):
        lines.append(
            'Whole models in those rows run mmrepvgg.deploy.ExportedPart (the dense part: '
            'a segmentor to its resized logits, a detector to its dense or RPN head), '
            'whatever --forward times in torch; GMAC/img and max|diff| are of that part.')
    if env.get('openvino_bf16'):
        lines.append(env['openvino_bf16'])
    return lines


def format_report(result: Dict[str, Any]) -> str:
    """What ``tools/benchmark.py`` prints of a result of
    :func:`mmrepvgg.benchmark.run.run_benchmark`: the machine and settings, the
    table, what its columns and rows measured, failures, skipped models and the
    comparisons."""
    rows = result['candidates']
    lines = [_header(result), format_table(rows, MAIN_COLUMNS),
             'GMAC/img: conv+linear multiply-accumulates per image (the paper\'s "FLOPs"); '
             'TFLOP/s = 2 x MACs per batch / median time.']
    lines += [f'peak MB: {method}.' for method in result['memory_method'].values()]
    lines.append('prep s: build + optimise + first call (tracing/compiling); max|diff|: '
                 'against the eager fp32 output (fused rows: against the training form); '
                 'vs fp64: the same against that model run in float64.')
    lines += _backend_notes(result)
    for r in rows:
        if r['error']:
            lines.append(f'FAILED {r["name"]}: {r["error"]}')
        elif r.get('note'):
            lines.append(f'note {r["name"]}: {r["note"].split(" (")[0]}')
        if r.get('time_limited'):
            lines.append(f'time limit {r["name"]}: the median of {r["runs"]} runs '
                         '(--time-limit cut the rest)')
    if any(r['kind'] == 'model' and r.get('scope') == 'mmdet' and r.get('method') == '_forward'
           for r in rows):
        lines.append('detectors: _forward runs the RPN and RoI heads on proposals, which '
                     'move with tiny score changes; max|diff| of those rows is not a fusion '
                     'check.')
    lines += result['skipped']
    text = format_comparisons(result['comparisons'])
    if text:
        lines.append(text)
    return '\n'.join(lines)


def write_json(path: str, result: Dict[str, Any]) -> None:
    """``result`` as an indented JSON file (its folder made where missing)."""
    write_text_atomic(path, json.dumps(result, indent=1))
