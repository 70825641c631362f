"""The C++ Winograd kernel (``csrc/winograd_conv.cpp``): the op
``torch.ops.mmrepvgg.winograd_conv3x3`` that ``WinogradConv2d`` calls on CPU float32.

Compiled by ``torch.utils.cpp_extension`` for this machine's CPU (``-march=native``) the
first time it is asked for, then loaded from the build cache (``tools/bootstrap.sh``
builds it once, through ``main()``).
Where no C++ compiler works, ``load_kernel()`` returns False with the reason in
``load_error()``, and ``WinogradConv2d`` falls back to its torch-op form.

The op takes a conv's 3x3 weights as they are and transforms them itself on first use,
keeping the transformed weights while the weight tensor lives: packages and checkpoints
hold the weights at their own size. Its products use the widest vectors the build CPU
has (``vector_widths()``).

The op is registered with a fake (meta) implementation too, so ``torch.export`` traces
it and AOTInductor packages call it; a process that loads such a package must have
loaded the kernel first (``PackageRunner`` does).
"""
import os
import os.path as osp
import sys
from contextlib import contextmanager
from typing import Iterator, List, Optional

import torch
from torch import Tensor

from ..env import Check, tools_on_path, torch_build_id

__all__ = ['OP_NAME', 'OP_VERSION', 'load_kernel', 'load_error', 'winograd_check', 'vector_widths',
           'use_vector_width', 'transformed_bytes']

OP_NAME = 'mmrepvgg::winograd_conv3x3'
#: The op's interface generation, recorded in packages that call it: 2 takes the 3x3
#: weights and transforms them itself on first use (1 took weights transformed in Python).
OP_VERSION = 2
_CSRC = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc')
_SOURCE = osp.join(_CSRC, 'winograd_conv.cpp')  # includes the other files of csrc/
#: Environment variable that turns the kernel off (``WinogradConv2d`` then uses torch ops).
DISABLE_ENV = 'MMREPVGG_NO_WINOGRAD_KERNEL'
#: Environment variable that picks the products' vector width (floats, one of
#: ``vector_widths()``) for the process instead of the widest: on CPUs that split 512-bit
#: operations in two (AMD Zen 4), 8 can be as fast (docs/benchmark.md).
WIDTH_ENV = 'MMREPVGG_WINOGRAD_VECTOR_WIDTH'
_state = dict(loaded=False, error=None)


def vector_widths() -> List[int]:
    """The product paths the loaded kernel was compiled with, as floats per vector, widest
    first: ``[16, 8]`` where the build CPU has AVX-512, else ``[8]`` (AVX2)."""
    return list(torch.ops.mmrepvgg.winograd_vector_widths())


@contextmanager
def use_vector_width(width: int) -> Iterator[None]:
    """Within the block, the kernel's products use ``width`` floats per vector (one of
    ``vector_widths()``; 0 the widest), process-wide; for comparing the paths."""
    previous = torch.ops.mmrepvgg.winograd_set_vector_width(width)
    try:
        yield
    finally:
        torch.ops.mmrepvgg.winograd_set_vector_width(previous)


def transformed_bytes() -> int:
    """Bytes the kernel holds in transformed weights, for the weight tensors still alive:
    what Winograd costs in memory on top of the weights ((tile+2)^2 / 9 times theirs, plus
    the zero padding of each group's output channels to whole panels); 0 where the
    kernel is not loaded."""
    if not _state['loaded']:
        return 0
    return int(torch.ops.mmrepvgg.winograd_transformed_bytes())


_NAME = 'mmrepvgg_winograd'


def _build_directory() -> str:
    """Where the library is built: torch's extension cache (``TORCH_EXTENSIONS_DIR``, else
    ~/.cache/torch_extensions), a folder per torch build (version and CUDA flavour: a
    torch replaced by another build gets a library built against it), which the library
    links against."""
    root = (os.environ.get('TORCH_EXTENSIONS_DIR')
            or osp.join(osp.expanduser('~'), '.cache', 'torch_extensions'))
    # built for this CPU (-march=native): the instruction set is part of the folder's name
    isa = torch.backends.cpu.get_cpu_capability().lower()
    folder = osp.join(root, f'{_NAME}_torch{torch_build_id()}_{isa}'.replace('+', '_'))
    os.makedirs(folder, exist_ok=True)
    return folder


def _register_fake() -> None:
    @torch.library.register_fake(OP_NAME)
    def _(input: Tensor, weight: Tensor, bias: Optional[Tensor], kernel_transform: Tensor,
          input_transform: Tensor, output_transform: Tensor, groups: int,
          relu: bool) -> Tensor:
        n, _, height, width = input.shape
        out = torch.empty(n, weight.shape[0], height, width, dtype=input.dtype,
                          device=input.device)
        return out.contiguous(memory_format=torch.channels_last)


def load_kernel(verbose: bool = False) -> bool:
    """Build (first time) and load the kernel; True when the op is available. Never raises
    for a failed build: the reason is kept in ``load_error()``."""
    if _state['loaded']:
        return True
    if _state['error'] is not None:
        return False
    if os.environ.get(DISABLE_ENV):
        _state['error'] = f'turned off by {DISABLE_ENV}'
        return False
    try:
        folder = _build_directory()
        library = osp.join(folder, _NAME + '.so')
        newest_source = max(osp.getmtime(osp.join(_CSRC, f)) for f in os.listdir(_CSRC))
        if osp.isfile(library) and osp.getmtime(library) >= newest_source:
            torch.ops.load_library(library)  # built: skip the build system's checks (~2 s)
        else:
            from torch.utils.cpp_extension import load
            print(f'building the C++ Winograd op for this CPU into {folder} (once, about '
                  'half a minute)', file=sys.stderr)
            # torch finds ninja only on PATH: a virtual environment's own (beside this
            # python) is there only while it is activated
            with tools_on_path():
                load(name=_NAME, sources=[_SOURCE], build_directory=folder,
                     extra_cflags=['-O3', '-march=native', '-fopenmp'],
                     extra_ldflags=['-fopenmp'], is_python_module=False, verbose=verbose)
        _register_fake()
    except Exception as err:  # a missing compiler or headers: fall back, say why
        last_line = (str(err).strip().splitlines() or [''])[-1]
        _state['error'] = f'{type(err).__name__}: {last_line}'
        return False
    _state['loaded'] = True
    width = os.environ.get(WIDTH_ENV)
    if width:
        if width.strip() not in [str(w) for w in vector_widths()]:
            raise ValueError(f'{WIDTH_ENV}={width!r}: the Winograd op here is built with '
                             f'{", ".join(map(str, vector_widths()))}-float vectors')
        torch.ops.mmrepvgg.winograd_set_vector_width(int(width))
    return True


def load_error() -> Optional[str]:
    """Why ``load_kernel()`` failed, or None."""
    return _state['error']



def winograd_check() -> Check:
    """Whether the C++ Winograd op builds and loads here, as a verdict of
    ``mmrepvgg.env.environment_checks``' kind."""
    built = load_kernel()
    return Check('Winograd op built', built, 'loaded' if built else (
        f'{load_error()}; Winograd convs fall back to torch ops'))

def main(verbose: bool = False) -> int:
    """Build/load the op and say so; the exit status for the bootstrap (0: loaded)."""
    ok = load_kernel(verbose)
    print(f'Winograd kernel: loaded ({_build_directory()})' if ok
          else f'Winograd kernel: not available: {load_error()}')
    return 0 if ok else 1
