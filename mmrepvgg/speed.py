"""Inference-speed helpers shared by the package and ``tools/benchmark.py``.

* ``optimize_for_inference(model, example_input, ...)`` turns an eval-mode model (a fused
  RepVGG, a training-form one, a ResNet, a whole detector/segmentor forward) into a fast
  callable with one of the recipes in ``MODES``.
* ``count_conv_flops`` counts the multiply-accumulates of every conv and linear layer with
  forward hooks (the paper's "FLOPs" are these MACs; FLOP/s figures use 2 x MACs).
* ``peak_memory`` measures the memory one forward pass needs on CPU or CUDA.
* ``benchmark_interleaved`` times many candidates in one process, round-robin, so that a
  noisy machine slows all of them alike, and reports medians and quartiles.

Only torch is needed here (no mmcv.ops, mmdet or mmseg).
"""
import contextlib
import ctypes
import gc
import math
import os
import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .winograd import FASTEST_TILE, convert_to_winograd

#: Recipes, from plain to most optimised:
#: ``eager``          the module as it is, NCHW.
#: ``channels_last``  module and input in NHWC (oneDNN on CPU, tensor-core friendly on CUDA).
#: ``jit_freeze``     channels_last + ``torch.jit.trace`` + ``torch.jit.freeze`` +
#:                    ``torch.jit.optimize_for_inference``: BN folded into convs; on CPU
#:                    weights pre-packed for oneDNN and activations kept in its layout.
#: ``compile``        channels_last + ``torch.compile`` (inductor) with inductor's
#:                    ``freezing``: on CPU, pre-packed oneDNN convs with the ReLU fused in.
#: ``winograd``       ``compile`` after replacing every 3x3 stride-1 conv by a Winograd
#:                    one (``mmrepvgg.winograd``): fewer multiplications, minutes of
#:                    compiling (in every process: inductor's cache did not hit).
MODES = ('eager', 'channels_last', 'jit_freeze', 'compile', 'winograd')
#: ``fp32``: fp32 tensors and IEEE fp32 arithmetic (TF32 is switched off on CUDA, where
#: PyTorch enables it for convs by default). ``tf32``: fp32 tensors, convs and matmuls
#: multiplying in reduced precision: TF32 on CUDA, bf16 on CPU (oneDNN's fpmath mode, AMX
#: where the CPU has it). ``fp16`` / ``bf16`` cast model and input. ``amp`` is autocast
#: (fp16 on CUDA, bf16 on CPU) with fp32 weights.
PRECISIONS = ('fp32', 'tf32', 'fp16', 'bf16', 'amp')
#: What ``mode='auto'`` picks, per device type. CPU: ``compile`` was the fastest recipe
#: for every RepVGG variant (training and fused form) and both ResNets in fp32 with
#: tools/benchmark.py (docs/benchmark.md: B1g2 fused 1.12x faster than eager, ResNet-101
#: 1.39x), for 2-15 s of compiling. CUDA: channels_last + cudnn.benchmark, the usual
#: recipe; not yet measured in this project (no GPU so far). ``winograd`` is faster still
#: for a fused RepVGG on CPU (B1g2: 1.35x over ``compile``) but slower for ResNets and
#: takes minutes to compile, so it is never picked automatically.
AUTO_MODE = {'cpu': 'compile', 'cuda': 'channels_last'}


def resolve_device(device: Optional[Any] = None) -> torch.device:
    if device is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError('CUDA was asked for but torch.cuda.is_available() is False')
    return device


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class _Forward(nn.Module):
    """Makes ``model.<method>(x)`` the ``forward`` of a module, for tracing and compiling
    e.g. a segmentor's ``_forward`` or a detector's ``extract_feat``; ``extra_args`` follow
    the input (e.g. data samples)."""

    def __init__(self, model: nn.Module, method: str = 'forward', extra_args: tuple = ()):
        super().__init__()
        self.model, self.method, self.extra_args = model, method, tuple(extra_args)

    def forward(self, x: Tensor) -> Any:
        return getattr(self.model, self.method)(x, *self.extra_args)


def _amp_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == 'cuda' else torch.bfloat16


def _fp32_math_flags(device: torch.device) -> list:
    """The switches of reduced-precision arithmetic on fp32 tensors, new API only (torch
    refuses to mix it with the legacy ``allow_tf32`` flags)."""
    b = torch.backends
    if device.type == 'cuda':
        owners = [getattr(b.cudnn, 'conv', None), getattr(b.cuda, 'matmul', None)]
    else:
        owners = [getattr(b.mkldnn, 'conv', None), getattr(b.mkldnn, 'matmul', None)]
    return [o for o in owners if o is not None and hasattr(o, 'fp32_precision')]


@contextlib.contextmanager
def fp32_math(device: torch.device, precision: str):
    """Within: IEEE fp32 arithmetic for fp32 tensors, or for ``precision='tf32'`` TF32
    (CUDA) / bf16 (CPU) products. The previous settings come back on exit."""
    device = torch.device(device)
    fast = 'tf32' if device.type == 'cuda' else 'bf16'
    want = fast if precision == 'tf32' else 'ieee'
    owners = _fp32_math_flags(device)
    legacy = None
    if not owners and device.type == 'cuda':  # torch without the fp32_precision API
        legacy = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = (
            precision == 'tf32')
    elif not owners and precision == 'tf32':
        raise ValueError('precision tf32 on CPU needs torch.backends.mkldnn.conv.'
                         'fp32_precision (torch >= 2.9)')
    old = [o.fp32_precision for o in owners]
    try:
        for o in owners:
            o.fp32_precision = want
        yield
    finally:
        for o, value in zip(owners, old):
            o.fp32_precision = value
        if legacy is not None:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = legacy


def _cast_dtype(precision: str) -> Optional[torch.dtype]:
    return {'fp16': torch.float16, 'bf16': torch.bfloat16}.get(precision)


class InferenceRunner:
    """A model prepared by ``optimize_for_inference``: call it on a batch.

    ``prepare_input(x)`` puts a batch in the layout and dtype the runner wants, and
    ``run(prepared)`` only runs the model (what a benchmark should time); ``runner(x)`` does
    both. Gradients are off.
    """

    def __init__(self, fn: Callable, mode: str, precision: str, device: torch.device,
                 channels_last: bool, context: Callable[[], Any]):
        self.fn, self.mode, self.precision, self.device = fn, mode, precision, device
        self.channels_last = channels_last
        self._context = context
        #: seconds spent preparing, including the first (tracing / compiling) call
        self.prep_seconds = 0.0
        #: what deviated from the recipe, if anything
        self.note: Optional[str] = None

    def prepare_input(self, x: Tensor) -> Tensor:
        x = x.to(self.device)
        dtype = _cast_dtype(self.precision)
        if dtype is not None:
            x = x.to(dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def run(self, x: Tensor) -> Any:
        with torch.no_grad(), self._context():
            return self.fn(x)

    def __call__(self, x: Tensor) -> Any:
        return self.run(self.prepare_input(x))

    def __repr__(self) -> str:
        return (f'InferenceRunner(mode={self.mode!r}, precision={self.precision!r}, '
                f'device={str(self.device)!r}, channels_last={self.channels_last})')


def _compile_context() -> Any:
    """Inductor settings for inference: freeze parameters as constants, which lets it
    fold BN, pre-pack conv weights for oneDNN and fuse the pointwise ops into the convs."""
    import torch._inductor.config as inductor_config
    return inductor_config.patch(freezing=True)


def optimize_for_inference(model: nn.Module, example_input: Tensor,
                           device: Optional[Any] = None, mode: str = 'auto',
                           precision: str = 'fp32', method: str = 'forward',
                           extra_args: tuple = (), compile_mode: Optional[str] = None,
                           cudnn_benchmark: bool = True,
                           winograd_tile: int = FASTEST_TILE) -> InferenceRunner:
    """Prepare an eval-mode ``model`` for fast inference on ``device``.

    Args:
        model: the module; switched to eval mode and moved to ``device`` (and cast for
            ``fp16``/``bf16``) in place; ``mode='winograd'`` also replaces its 3x3
            stride-1 convs in place. Fuse a RepVGG first (``reparameterize``).
        example_input: a batch of the shape to be run (used to trace / compile / warm up).
        device: ``'cpu'``, ``'cuda'``...; None picks CUDA when available.
        mode: one of ``MODES``, or ``'auto'``: ``AUTO_MODE`` of the device type, and if
            that fails on this model the next simpler mode (with a warning).
        precision: one of ``PRECISIONS``.
        method: the model method to run (e.g. ``'_forward'`` or ``'extract_feat'``).
        extra_args: passed after the input to ``method``.
        compile_mode: ``torch.compile``'s ``mode`` (e.g. ``'max-autotune'``) for
            ``mode='compile'``.
        cudnn_benchmark: set ``torch.backends.cudnn.benchmark`` on CUDA.
        winograd_tile: output tile of ``mode='winograd'``: 4 (F(4x4,3x3), fastest) or 2
            (F(2x2,3x3), as accurate as a direct conv); see ``mmrepvgg.winograd``.

    Returns:
        An ``InferenceRunner``; ``runner(x)`` gives the model's output for ``x``. The first
        call has already been made (its time is in ``runner.prep_seconds``).
    """
    device = resolve_device(device)
    if precision not in PRECISIONS:
        raise ValueError(f'unknown precision {precision!r}; valid: {", ".join(PRECISIONS)}')
    if mode == 'auto':
        # The device's best recipe, falling back to simpler ones if it fails on this model
        # (e.g. a forward that torch.compile or tracing cannot handle).
        best = AUTO_MODE.get(device.type, 'eager')
        chain = list(MODES[:MODES.index(best) + 1])[::-1]
        for i, fallback in enumerate(chain):
            try:
                return optimize_for_inference(
                    model, example_input, device, fallback, precision, method, extra_args,
                    compile_mode, cudnn_benchmark, winograd_tile)
            except Exception as exc:  # noqa: BLE001
                if i == len(chain) - 1:
                    raise
                warnings.warn(f'optimize_for_inference: mode {fallback!r} failed '
                              f'({type(exc).__name__}: {exc}); trying {chain[i + 1]!r}')
    if mode not in MODES:
        raise ValueError(f'unknown mode {mode!r}; valid modes: {", ".join(MODES)}, auto')
    if precision == 'fp16' and device.type == 'cpu':
        warnings.warn('fp16 on CPU is slow or unsupported for many ops; prefer bf16 or amp')
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = cudnn_benchmark
    start = time.perf_counter()
    model.eval()
    model.to(device)
    dtype = _cast_dtype(precision)
    if dtype is not None:
        model.to(dtype)
    replaced = convert_to_winograd(model, winograd_tile) if mode == 'winograd' else None
    channels_last = mode != 'eager'
    if channels_last:
        model.to(memory_format=torch.channels_last)
    module = model if method == 'forward' and not extra_args else _Forward(
        model, method, extra_args)

    amp = precision == 'amp'

    @contextlib.contextmanager
    def autocast():  # and the arithmetic of fp32 tensors: entered around every call
        with fp32_math(device, precision):
            if amp:
                with torch.autocast(device.type, dtype=_amp_dtype(device)):
                    yield
            else:
                yield

    context = autocast
    runner = InferenceRunner(module, mode, precision, device, channels_last, context)
    x = runner.prepare_input(example_input)
    if mode == 'jit_freeze':
        with torch.no_grad(), autocast(), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # torch.jit is deprecated in favour of compile
            traced = torch.jit.trace(module, x, check_trace=False, strict=False)
            frozen = torch.jit.freeze(traced.eval())
            runner.fn = torch.jit.optimize_for_inference(frozen)
            try:
                runner.fn(x)
            except Exception as exc:  # noqa: BLE001  (torch.jit.Error is no RuntimeError)
                # On CPU this converts to oneDNN tensors, and some ops have no oneDNN
                # version for every shape (e.g. adaptive pooling to a size that does not
                # divide the input, as in PSPNet's pyramid): keep the frozen graph alone.
                runner.fn = torch.jit.freeze(traced)  # (the pass changed `frozen` in place)
                runner.note = ('jit.freeze only: optimize_for_inference failed '
                               f'({describe_error(exc)})')
        if runner.note:
            warnings.warn(f'optimize_for_inference: {runner.note}')
    elif mode in ('compile', 'winograd'):
        compiled = torch.compile(module, mode=compile_mode, dynamic=False)

        @contextlib.contextmanager
        def compile_context():
            with autocast(), _compile_context():
                yield

        runner.fn, runner._context = compiled, compile_context
        if replaced == 0:
            runner.note = 'no 3x3 stride-1 conv to compute with Winograd: same as compile'
    runner.run(x)  # trace / compile / pick algorithms now, not in the first timed call
    synchronize(device)
    runner.prep_seconds = time.perf_counter() - start
    return runner


# --------------------------------------------------------------------------- FLOPs
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
    is reported instead of stopping the run."""
    name: str
    setup: Callable[[], Callable[[], Any]]
    info: Dict[str, Any] = field(default_factory=dict)
    fn: Optional[Callable[[], Any]] = None
    times: List[float] = field(default_factory=list)
    prep_seconds: Optional[float] = None
    peak_memory: Optional[int] = None
    memory_method: Optional[str] = None
    error: Optional[str] = None

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


def describe_error(exc: BaseException, limit: int = 300) -> str:
    """One line for a report: the exception's first line and, when the message runs
    longer (TorchScript and dynamo put the cause last), its last line too."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ''
    if len(lines) > 1:
        text += ' ... ' + lines[-1]
    text = f'{type(exc).__name__}: {text}'
    return text if len(text) <= limit else text[:limit - 3] + '...'


def benchmark_interleaved(candidates: Sequence[Candidate], device: Any, repeats: int = 20,
                          warmup: int = 3, measure_memory: bool = True,
                          memory_repeats: int = 3,
                          log: Optional[Callable[[str], None]] = None) -> None:
    """Time every candidate in one process, interleaved.

    Each candidate is set up (its ``prep_seconds`` include the setup's first call), then
    ``warmup`` untimed rounds and ``repeats`` timed rounds run over all candidates in
    turn; the starting candidate rotates from round to round so that none always follows
    the same neighbour. Every call is bracketed by a device synchronisation. A candidate
    whose setup or call raises keeps the error and is skipped from then on. Finally the
    peak memory of one call of each is measured outside the timed rounds (the median of
    ``memory_repeats`` calls: on CPU the RSS-based figure moves with the allocator's state).
    """
    device = torch.device(device)
    log = log or (lambda msg: None)
    for cand in candidates:
        start = time.perf_counter()
        try:
            cand.fn = cand.setup()
            synchronize(device)
        except Exception as exc:  # noqa: BLE001  (reported per candidate)
            cand.error = describe_error(exc)
            log(f'  {cand.name}: setup failed: {cand.error}')
            continue
        cand.prep_seconds = time.perf_counter() - start
        log(f'  {cand.name}: ready in {cand.prep_seconds:.1f} s')
    live = [c for c in candidates if c.error is None]
    for rnd in range(warmup + repeats):
        shift = rnd % len(live) if live else 0
        for cand in live[shift:] + live[:shift]:
            if cand.error is not None:
                continue
            try:
                synchronize(device)
                start = time.perf_counter()
                out = cand.fn()
                synchronize(device)
                elapsed = time.perf_counter() - start
            except Exception as exc:  # noqa: BLE001
                cand.error = describe_error(exc)
                log(f'  {cand.name}: failed: {cand.error}')
                continue
            del out
            if rnd >= warmup:
                cand.times.append(elapsed)
        if rnd == warmup - 1 or rnd == warmup + repeats - 1 or (
                rnd >= warmup and (rnd - warmup + 1) % max(1, repeats // 4) == 0):
            log(f'  round {rnd + 1}/{warmup + repeats} done')
    if measure_memory:
        for cand in candidates:
            if cand.error is None:
                peaks = [peak_memory(cand.fn, device) for _ in range(max(1, memory_repeats))]
                cand.peak_memory = int(statistics.median(p for p, _ in peaks))
                cand.memory_method = peaks[0][1]


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def environment() -> Dict[str, Any]:
    """What a benchmark report should state about the machine and software."""
    info = {'torch': torch.__version__, 'threads': torch.get_num_threads(),
            'python': sys.version.split()[0], 'cpu_count': os.cpu_count()}
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    info['cpu'] = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    if hasattr(os, 'getloadavg'):
        info['loadavg'] = [round(v, 2) for v in os.getloadavg()]
    if torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name()
        info['cuda'] = torch.version.cuda
        info['cudnn'] = torch.backends.cudnn.version()
        flags = _fp32_math_flags(torch.device('cuda'))
        if flags:
            info['cuda_fp32_precision'] = {'conv': flags[0].fp32_precision,
                                           'matmul': flags[-1].fp32_precision}
        info['fp32_rows'] = 'IEEE fp32 (TF32 off); precision tf32 turns it on'
    info['mkldnn'] = torch.backends.mkldnn.is_available()
    return info
