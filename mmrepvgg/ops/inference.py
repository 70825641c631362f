"""Inference recipes: an eval-mode torch model made fast to call, on CPU or CUDA.

* ``optimize_for_inference(model, example_input, ...)`` turns an eval-mode model (a fused
  RepVGG, a training-form one, a ResNet, a whole detector/segmentor forward) into a fast
  callable with one of the recipes in ``MODES``; ``InferenceRunner`` is what it returns.

Only torch is needed here (no mmcv.ops, mmdet or mmseg). ``tools/benchmark.py`` times
these recipes against each other and against the exported backends.
"""
import contextlib
import time
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..numerics import PRECISIONS, fp32_math
from .winograd import FASTEST_TILE, TF32, TileChoice, convert_to_winograd

#: Recipes, from plain to most optimised:
#: ``eager``          the module as it is, NCHW.
#: ``channels_last``  module and input in NHWC (oneDNN on CPU, tensor-core friendly on CUDA).
#: ``jit_freeze``     channels_last + ``torch.jit.trace`` + ``torch.jit.freeze`` +
#:                    ``torch.jit.optimize_for_inference``: BN folded into convs; on CPU
#:                    weights pre-packed for oneDNN and activations kept in its layout.
#: ``compile``        channels_last + ``torch.compile`` (inductor) with inductor's
#:                    ``freezing``: on CPU, pre-packed oneDNN convs with the ReLU fused in.
#: ``winograd``       ``compile`` after replacing every 3x3 stride-1 conv by a Winograd
#:                    one (``mmrepvgg.ops.winograd``; on CPU a call of its C++ op),
#:                    and with tile ``auto`` strided convs with many channels on small
#:                    maps by one matmul: fewer multiplications, seconds of compiling
#:                    (``tools/export.py --format aoti --winograd`` compiles it once
#:                    into a package).
MODES = ('eager', 'channels_last', 'jit_freeze', 'compile', 'winograd')
#: What ``mode='auto'`` picks, per device type. CPU: ``compile`` was the fastest recipe
#: for every RepVGG variant (training and fused form) and both ResNets in fp32 with
#: tools/benchmark.py (docs/benchmark.md: B1g2 fused 1.12x faster than eager, ResNet-101
#: 1.39x), for 2-15 s of compiling. CUDA: channels_last + cudnn.benchmark, the usual
#: recipe; not yet measured in this project (no GPU so far). ``winograd`` is faster still
#: for a fused RepVGG on CPU (B1g2: 1.98x over ``compile``, docs/benchmark.md section 1b)
#: but rounds differently from a direct conv (within ~1e-5 relative per conv), so it is
#: asked for, never picked automatically.
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
                           winograd_tile: TileChoice = FASTEST_TILE) -> InferenceRunner:
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
        winograd_tile: output tile of ``mode='winograd'``: ``'auto'`` (per conv, from its
            feature-map size on ``example_input``; it also computes strided convs with
            many channels on small maps as one matmul), 2, 4, 6 or 7 (F(2x2,3x3) is as
            accurate as a direct conv); see ``mmrepvgg.ops.winograd``.

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
    module = model if method == 'forward' and not extra_args else _Forward(
        model, method, extra_args)
    replaced = None
    if mode == 'winograd':
        probe = example_input.to(device, dtype or example_input.dtype)
        # the tiles allowed are those of the arithmetic the products will run in: amp's
        # dtype, or reduced float32 matmuls (TF32 on CUDA, bf16 products on the CPU)
        products = {'amp': _amp_dtype(device),
                    'tf32': TF32 if device.type == 'cuda' else torch.bfloat16}
        replaced = convert_to_winograd(module, winograd_tile, probe,
                                       dtype=products.get(precision))
    channels_last = mode != 'eager'
    if channels_last:
        model.to(memory_format=torch.channels_last)

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
            runner.note = ('no conv computed with Winograd or as one matmul (none is 3x3 '
                           "stride-1, or with tile 'auto' none has the channels to pay): "
                           'same as compile')
    runner.run(x)  # trace / compile / pick algorithms now, not in the first timed call
    synchronize(device)
    runner.prep_seconds = time.perf_counter() - start
    return runner


def describe_error(exc: BaseException, limit: int = 300) -> str:
    """One line for a report: the exception's first line and, when the message runs
    longer (TorchScript and dynamo put the cause last), its last line too."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ''
    if len(lines) > 1:
        text += ' ... ' + lines[-1]
    text = f'{type(exc).__name__}: {text}'
    return text if len(text) <= limit else text[:limit - 3] + '...'
