"""The measuring harness of the benchmark (``mmrepvgg.benchmark.run``,
``tools/benchmark.py``): MAC counts, peak memory of one call, interleaved timing, what a
report states about the machine, and the progress messages on stderr.

* ``count_conv_flops`` counts the multiply-accumulates of every conv and linear layer with
  forward hooks (the paper's "FLOPs" are these MACs; FLOP/s figures use 2 x MACs).
* ``peak_memory`` measures the memory one forward pass needs on CPU or CUDA.
* ``benchmark_interleaved`` times many candidates in one process, round-robin, so that a
  noisy machine slows all of them alike, and reports medians and quartiles.

Only torch is needed here (no mmcv.ops, mmdet or mmseg).
"""
import ctypes
import gc
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..env import cpu_info
from ..numerics import fp32_math, fp32_math_flags
from ..ops.inference import describe_error, synchronize


# --------------------------------------------------------------------------- FLOPs
# Not mmengine.analysis: its FlopAnalyzer counts batch norms too (ResNet-101 at 1x3x224x224:
# 7,831,821,312 against 7,799,357,440 conv MACs; fused B1g2 8,807,694,336 in both).
@torch.no_grad()
def count_conv_flops(model: nn.Module, example_input: Tensor,
                     forward: Optional[Callable] = None) -> Dict[str, int]:
    """Multiply-accumulates of every ``nn.Conv2d`` and ``nn.Linear`` in one forward pass.

    Counted analytically from each layer's output shape with forward hooks (norms,
    activations, additions and pooling are not counted). Returns ``{'macs': ...,
    'flops': 2 * macs, 'convs': number of layer calls}`` for the whole batch.
    """
    total = {'macs': 0, 'convs': 0}

    def conv_hook(module, inputs, output):
        k = module.kernel_size[0] * module.kernel_size[1]
        total['macs'] += output.numel() * (module.in_channels // module.groups) * k
        total['convs'] += 1

    def linear_hook(module, inputs, output):
        total['macs'] += output.numel() * module.in_features
        total['convs'] += 1

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        (forward or model)(example_input)
    finally:
        for h in handles:
            h.remove()
    return {'macs': total['macs'], 'flops': 2 * total['macs'], 'convs': total['convs']}


# --------------------------------------------------------------------------- memory
def _proc_status_bytes(key: str) -> Optional[int]:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS, so that RSS starts from a clean base."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


#: How ``peak_memory`` measures, per device type, for reports.
MEMORY_METHODS = {
    'cuda': 'torch.cuda.max_memory_allocated() minus memory allocated before the call',
    'cpu': ('peak resident set size of the process during one call minus its RSS before '
            '(Linux VmHWM, reset through /proc/self/clear_refs; freed heap trimmed first): '
            'activations, workspaces and any per-call weight reorders, not the weights '
            'already held'),
    'cpu-fallback': ('growth of resource.getrusage().ru_maxrss during one call: a lower '
                     'bound, and 0 for any call that needs less than an earlier peak'),
}


def peak_memory(fn: Callable[[], Any], device: torch.device) -> Tuple[Optional[int], str]:
    """Extra memory one call of ``fn()`` needs, in bytes, and the method used (a key of
    ``MEMORY_METHODS``). The call's output is dropped afterwards."""
    device = torch.device(device)
    gc.collect()
    if device.type == 'cuda':
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak, 'cuda'
    _malloc_trim()
    if sys.platform.startswith('linux') and _reset_peak_rss():
        base = _proc_status_bytes('VmRSS')
        out = fn()
        peak = _proc_status_bytes('VmHWM')
        del out
        if base is not None and peak is not None:
            return max(peak - base, 0), 'cpu'
    # ru_maxrss is in KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == 'darwin' else 1024
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del out
    return (peak - base) * scale, 'cpu-fallback'


# --------------------------------------------------------------------------- timing
@dataclass
class Candidate:
    """One thing to time: ``setup()`` returns the callable to time (``fn()`` runs one
    batch); it is called lazily by ``benchmark_interleaved`` so that a failing candidate
    is reported instead of stopping the run. ``time_limited``: its timed runs were cut
    short by the run's time limit."""
    name: str
    setup: Callable[[], Callable[[], Any]]
    info: Dict[str, Any] = field(default_factory=dict)
    fn: Optional[Callable[[], Any]] = None
    times: List[float] = field(default_factory=list)
    prep_seconds: Optional[float] = None
    peak_memory: Optional[int] = None
    memory_method: Optional[str] = None
    error: Optional[str] = None
    time_limited: bool = False

    def stats(self) -> Dict[str, Optional[float]]:
        return summarize(self.times)


def summarize(times: Sequence[float]) -> Dict[str, Optional[float]]:
    """Median, quartiles and IQR (seconds) of a list of timings."""
    if not times:
        return dict(median=None, q1=None, q3=None, iqr=None, min=None, n=0)
    data = sorted(times)
    if len(data) >= 2:
        q1, _, q3 = statistics.quantiles(data, n=4, method='inclusive')
    else:
        q1 = q3 = data[0]
    return dict(median=statistics.median(data), q1=q1, q3=q3, iqr=q3 - q1, min=data[0],
                n=len(data))


class Progress:
    """What ``benchmark_interleaved`` says as it goes, through ``log``: a line when a
    candidate is ready (or its setup failed), when a call fails, and every few rounds.
    A caller that shows candidates its own way overrides the methods."""

    def __init__(self, log: Optional[Callable[[str], None]] = None):
        self.log = log or (lambda msg: None)

    def start(self, candidates: Sequence[Candidate]) -> None:
        """Before any set-up: the candidates to come."""

    def setting_up(self, cand: Candidate) -> None:
        """Before ``cand.setup()``: nothing by default (setups are quick or say so)."""

    def ready(self, cand: Candidate) -> None:
        """After ``cand.setup()``; ``cand.error`` is set if it failed."""
        if cand.error is not None:
            self.log(f'  {cand.name}: setup failed: {cand.error}')
        else:
            self.log(f'  {cand.name}: ready in {cand.prep_seconds:.1f} s')

    def done(self, cand: Candidate) -> None:
        """``cand`` is timed: all its rounds ran, the time limit cut them, or a call
        failed (``cand.error``)."""
        if cand.error is not None:
            self.log(f'  {cand.name}: failed: {cand.error}')


def _set_up(cand: Candidate, device: torch.device, progress: Progress) -> None:
    """``cand.fn`` from its setup, or ``cand.error``; ``prep_seconds`` include the
    setup's first call."""
    progress.setting_up(cand)
    start = time.perf_counter()
    try:
        cand.fn = cand.setup()
        synchronize(device)
    except Exception as exc:  # noqa: BLE001  (reported per candidate)
        cand.error = describe_error(exc)
    else:
        cand.prep_seconds = time.perf_counter() - start
    progress.ready(cand)


def _timed_call(cand: Candidate, device: torch.device) -> Optional[float]:
    """Seconds of one call of ``cand.fn``, bracketed by device synchronisation; None
    (and ``cand.error``) if it raised."""
    try:
        synchronize(device)
        start = time.perf_counter()
        out = cand.fn()
        synchronize(device)
        elapsed = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001
        cand.error = describe_error(exc)
        return None
    del out
    return elapsed


def _over_limit(cand: Candidate, spent: float, time_limit: Optional[float]) -> bool:
    """Whether ``cand`` has spent its time (and has the one timed run it must have)."""
    return (time_limit is not None and cand.error is None and bool(cand.times)
            and spent >= time_limit)


def benchmark_interleaved(candidates: Sequence[Candidate], device: Any, repeats: int = 20,
                          warmup: int = 3, measure_memory: bool = True,
                          memory_repeats: int = 3,
                          log: Optional[Callable[[str], None]] = None,
                          time_limit: Optional[float] = None,
                          progress: Optional[Progress] = None,
                          one_at_a_time: bool = False) -> None:
    """Time every candidate in one process, interleaved.

    Each candidate is set up (its ``prep_seconds`` include the setup's first call), then
    ``warmup`` untimed rounds and ``repeats`` timed rounds run over all candidates in
    turn; the starting candidate rotates from round to round so that none always follows
    the same neighbour. Every call is bracketed by a device synchronisation. A candidate
    whose setup or call raises keeps the error and is skipped from then on. With
    ``time_limit`` (seconds), a candidate whose calls (warm-up included, not its setup)
    add up to it leaves the rounds once it has one timed run (``time_limited``): a slow
    model costs a bounded time. Finally the peak memory of one call of each is measured
    outside the timed rounds (the median of ``memory_repeats`` calls: on CPU the
    RSS-based figure moves with the allocator's state).

    ``one_at_a_time``: set up, time and release each candidate in turn instead, so that
    memory holds one at a time (at a whole model's full input size, a dozen prepared
    forms need more than a small machine has); the timings are then not interleaved.

    ``progress`` hears of each candidate as it is set up and as it is done; by default
    the lines go to ``log``.
    """
    device = torch.device(device)
    progress = progress or Progress(log)
    progress.start(candidates)
    for group in [[c] for c in candidates] if one_at_a_time else [list(candidates)]:
        for cand in group:
            _set_up(cand, device, progress)
        _run_rounds(group, device, warmup, repeats, time_limit, progress)
        if measure_memory:
            for cand in group:
                if cand.error is None:
                    peaks = [peak_memory(cand.fn, device)
                             for _ in range(max(1, memory_repeats))]
                    cand.peak_memory = int(statistics.median(p for p, _ in peaks))
                    cand.memory_method = peaks[0][1]
        if one_at_a_time:
            for cand in group:
                cand.fn = None  # the prepared model, runner and buffers go with it


def _run_rounds(candidates: Sequence[Candidate], device: torch.device, warmup: int,
                repeats: int, time_limit: Optional[float], progress: Progress) -> None:
    """The warm-up and timed rounds of ``benchmark_interleaved`` over ``candidates``."""
    live = [c for c in candidates if c.error is None]
    spent = {id(c): 0.0 for c in live}
    rounds = warmup + repeats
    for rnd in range(rounds):
        shift = rnd % len(live) if live else 0
        for cand in live[shift:] + live[:shift]:
            elapsed = _timed_call(cand, device)
            if elapsed is None:
                continue
            spent[id(cand)] += elapsed
            if rnd >= warmup:
                cand.times.append(elapsed)
        last = rnd == rounds - 1
        for cand in list(live):
            cand.time_limited = not last and _over_limit(cand, spent[id(cand)], time_limit)
            if last or cand.error is not None or cand.time_limited:
                live.remove(cand)
                progress.done(cand)
        if rnd == warmup - 1 or rnd == rounds - 1 or (
                rnd >= warmup and (rnd - warmup + 1) % max(1, repeats // 4) == 0):
            progress.log(f'  round {rnd + 1}/{rounds} done')
        if not live:
            break


def log(msg: str) -> None:
    """A progress message of the benchmark, on stderr (stdout holds the report)."""
    print(msg, file=sys.stderr, flush=True)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def environment() -> Dict[str, Any]:
    """What a benchmark report should state about the machine and software."""
    info = {'torch': torch.__version__, 'threads': torch.get_num_threads(),
            'python': sys.version.split()[0], 'cpu_count': os.cpu_count()}
    model = cpu_info()[0]
    if model is not None:
        info['cpu'] = model
    if hasattr(os, 'getloadavg'):
        info['loadavg'] = [round(v, 2) for v in os.getloadavg()]
    if torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name()
        info['cuda'] = torch.version.cuda
        info['cudnn'] = torch.backends.cudnn.version()
        flags = fp32_math_flags(torch.device('cuda'))
        if flags:
            info['cuda_fp32_precision'] = {'conv': flags[0].fp32_precision,
                                           'matmul': flags[-1].fp32_precision}
        info['fp32_rows'] = 'IEEE fp32 (TF32 off); precision tf32 turns it on'
    info['mkldnn'] = torch.backends.mkldnn.is_available()
    return info


def matmul_peak(device: torch.device, sizes: Sequence[int] = (1024, 2048, 3072),
                repeats: int = 5) -> Dict[str, Any]:
    """The machine's measured fp32 matrix-multiply rate: the best TFLOP/s of ``torch.mm``
    on square fp32 matrices (IEEE arithmetic) over ``sizes``, best of ``repeats`` calls
    each. What a direct convolution can at most reach, and what an effective rate of
    fewer-multiplication algorithms (Winograd) is compared with."""
    best = dict(tflops=0.0, size=None)
    with fp32_math(device, 'fp32'), torch.no_grad():
        for n in sizes:
            a = torch.randn(n, n, device=device)
            b = torch.randn(n, n, device=device)
            torch.mm(a, b)  # warm-up: thread pool, allocations
            for _ in range(repeats):
                synchronize(device)
                start = time.perf_counter()
                torch.mm(a, b)
                synchronize(device)
                rate = 2 * n ** 3 / (time.perf_counter() - start) / 1e12
                if rate > best['tflops']:
                    best = dict(tflops=rate, size=n)
    return best
