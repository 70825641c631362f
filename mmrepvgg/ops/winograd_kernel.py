"""The C++ Winograd kernel (``csrc/winograd_conv.cpp``): the op
``torch.ops.mmrepvgg.winograd_conv3x3`` that ``WinogradConv2d`` calls on CPU float32.

Compiled by ``torch.utils.cpp_extension`` for this machine's CPU (``-march=native``) the
first time it is asked for, then loaded from the build cache (``tools/bootstrap.sh``
builds it once, through ``main()``).
Where no C++ compiler works, ``load_kernel()`` returns False with the reason in
``load_error()``, and ``WinogradConv2d`` falls back to its torch-op form.

The op is registered with a fake (meta) implementation too, so ``torch.export`` traces
it and AOTInductor packages call it; a process that loads such a package must have
loaded the kernel first (``PackageRunner`` does).
"""
import os
import os.path as osp
import sys
from typing import Optional

import torch
from torch import Tensor

__all__ = ['OP_NAME', 'PANEL', 'load_kernel', 'load_error', 'pack_kernel', 'unpack_kernel']

OP_NAME = 'mmrepvgg::winograd_conv3x3'
_SOURCE = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc', 'winograd_conv.cpp')
#: Environment variable that turns the kernel off (``WinogradConv2d`` then uses torch ops).
DISABLE_ENV = 'MMREPVGG_NO_WINOGRAD_KERNEL'
_state = dict(loaded=False, error=None)
#: Output channels per weight panel of the kernel's matrix products (``kPanel`` in C++).
PANEL = 16


def pack_kernel(kernel: Tensor) -> Tensor:
    """Transformed weights ``[positions, in, out]`` -> the kernel's packed layout
    ``[positions * panels, in, PANEL]``: panels of ``PANEL`` output channels (the last one
    zero-padded), each stored input-channel-major so that it streams contiguously (3-D,
    so that converting a module to channels_last leaves it alone)."""
    positions, depth, out = kernel.shape
    panels = -(-out // PANEL)
    padded = torch.nn.functional.pad(kernel, (0, panels * PANEL - out))
    packed = padded.reshape(positions, depth, panels, PANEL).transpose(1, 2)
    return packed.reshape(positions * panels, depth, PANEL)


def unpack_kernel(packed: Tensor, positions: int, out: int) -> Tensor:
    """The inverse of ``pack_kernel``: ``[positions, in, out]``."""
    depth = packed.shape[1]
    panels = packed.shape[0] // positions
    unpacked = packed.reshape(positions, panels, depth, PANEL).transpose(1, 2)
    return unpacked.reshape(positions, depth, panels * PANEL)[..., :out]


_NAME = 'mmrepvgg_winograd'


def _build_directory() -> str:
    """Where the library is built: torch's extension cache (``TORCH_EXTENSIONS_DIR``, else
    ~/.cache/torch_extensions), a folder per torch build, which the library links against."""
    root = (os.environ.get('TORCH_EXTENSIONS_DIR')
            or osp.join(osp.expanduser('~'), '.cache', 'torch_extensions'))
    # built for this CPU (-march=native): the instruction set is part of the folder's name
    isa = torch.backends.cpu.get_cpu_capability().lower()
    folder = osp.join(root, f'{_NAME}_torch{torch.__version__}_{isa}'.replace('+', '_'))
    os.makedirs(folder, exist_ok=True)
    return folder


def _register_fake() -> None:
    @torch.library.register_fake(OP_NAME)
    def _(input: Tensor, kernel: Tensor, bias: Optional[Tensor], input_transform: Tensor,
          output_transform: Tensor, groups: int, out_channels: int, relu: bool) -> Tensor:
        n, _, height, width = input.shape
        out = torch.empty(n, out_channels, height, width, dtype=input.dtype,
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
        if osp.isfile(library) and osp.getmtime(library) >= osp.getmtime(_SOURCE):
            torch.ops.load_library(library)  # built: skip the build system's checks (~2 s)
        else:
            from torch.utils.cpp_extension import load
            print(f'building the C++ Winograd op for this CPU into {folder} (once, about '
                  'half a minute)', file=sys.stderr)
            load(name=_NAME, sources=[_SOURCE], build_directory=folder,
                 extra_cflags=['-O3', '-march=native', '-fopenmp'],
                 extra_ldflags=['-fopenmp'], is_python_module=False, verbose=verbose)
        _register_fake()
    except Exception as err:  # a missing compiler or headers: fall back, say why
        last_line = (str(err).strip().splitlines() or [''])[-1]
        _state['error'] = f'{type(err).__name__}: {last_line}'
        return False
    _state['loaded'] = True
    return True


def load_error() -> Optional[str]:
    """Why ``load_kernel()`` failed, or None."""
    return _state['error']


def main(verbose: bool = False) -> int:
    """Build/load the op and say so; the exit status for the bootstrap (0: loaded)."""
    ok = load_kernel(verbose)
    print(f'Winograd kernel: loaded ({_build_directory()})' if ok
          else f'Winograd kernel: not available: {load_error()}')
    return 0 if ok else 1
