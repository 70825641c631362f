"""The fused network compiled once into an AOTInductor package (``.pt2``) and run from it.

``torch.compile`` pays its compiling (and the model its building and conversion) in every
process; an AOTInductor package holds the compiled code and the frozen weights in one
file that a fresh process loads in seconds.

* :func:`package_module`: ``torch.export`` + ``torch._inductor.aoti_compile_and_package``
  of an eval-mode module for one input shape (weights frozen into the code, NHWC
  activations), metadata recorded in the package.
* :func:`read_package_metadata`: that metadata, read from the archive without loading
  any of its code.
* :class:`PackageRunner` (``load_backend(path, 'aoti')``): loads a package after checking
  it was built by this torch version for an instruction set this CPU has (and loading
  the C++ Winograd kernel first when the package calls it), and refuses
  inputs of another shape than the one it was compiled for (the compiled code would
  read out of bounds rather than fail).
"""
import json
import os
import os.path as osp
import time
import zipfile
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ..ops.winograd_kernel import OP_NAME, OP_VERSION, load_error, load_kernel

__all__ = ['PACKAGE_SUFFIX', 'package_module', 'read_package_metadata', 'PackageRunner']

PACKAGE_SUFFIX = '.pt2'
#: Metadata keys the package records about how it was built.
TORCH_KEY = 'mmrepvgg.torch_version'
SHAPE_KEY = 'mmrepvgg.input_shape'
#: Set when the compiled code calls the C++ Winograd kernel, which a loading process
#: must then have loaded (``mmrepvgg.ops.winograd_kernel``): the op and its interface
#: generation (``OP_VERSION``).
KERNEL_KEY = 'mmrepvgg.winograd_kernel'
_KERNEL_VALUE = f'{OP_NAME} v{OP_VERSION}'
# Written by AOTInductor itself: the vector instruction set its kernels were built for.
_ISA_KEY = 'AOTI_CPU_ISA'
_DEVICE_KEY = 'AOTI_DEVICE_KEY'


class _ChannelsLastInput(nn.Module):
    """The network on NHWC activations: oneDNN's convs and the Winograd transforms are
    fastest on channels_last; converting the input inside the graph keeps the package's
    interface a plain NCHW batch."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: Tensor):
        return self.network(x.contiguous(memory_format=torch.channels_last))


def _torch_version(version: str) -> str:
    """The release, without the build tag (``2.14.1+cu130`` -> ``2.14.1``): CPU and CUDA
    builds of one release compile the same code."""
    return version.split('+')[0]


def package_module(module: nn.Module, example_input: Tensor, path: str,
                   metadata: Optional[Dict[str, str]] = None) -> Dict[str, float]:
    """Compile eval-mode ``module`` for ``example_input``'s shape into the AOTInductor
    package ``path`` (must end with ``.pt2``; written where given: callers stage it).

    Returns the seconds spent: ``export_s`` (``torch.export``) and ``compile_s``
    (inductor code generation and the C++ compiler).
    """
    if not path.endswith(PACKAGE_SUFFIX):
        raise ValueError(f'an AOTInductor package path must end with {PACKAGE_SUFFIX}, '
                         f'got {path}')
    module.eval()  # not chained: some modules' train() returns None (mmdet's ResNet)
    module.to(memory_format=torch.channels_last)
    wrapped = _ChannelsLastInput(module).eval()
    meta = {TORCH_KEY: torch.__version__,
            SHAPE_KEY: json.dumps(list(example_input.shape)),
            'mmrepvgg.threads': str(torch.get_num_threads())}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(wrapped, (example_input,), strict=False)
    exported = time.perf_counter()
    if any(node.op == 'call_function' and str(node.target).startswith('mmrepvgg.')
           for node in program.graph.nodes):
        meta[KERNEL_KEY] = _KERNEL_VALUE
    torch._inductor.aoti_compile_and_package(
        program, package_path=path,
        inductor_configs={'freezing': True, 'aot_inductor.metadata': meta})
    return dict(export_s=exported - start, compile_s=time.perf_counter() - exported)


def read_package_metadata(path: str) -> Dict[str, str]:
    """The metadata of the AOTInductor package ``path`` (ours and AOTInductor's own),
    read from the archive: no code of it is loaded."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'AOTInductor package not found: {path}')
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith('wrapper_metadata.json')]
            if not names:
                raise ValueError('it holds no compiled model')
            return json.loads(archive.read(names[0]))
    except (zipfile.BadZipFile, ValueError, KeyError) as err:
        raise ValueError(f'{path} is not an AOTInductor package ({err}); give a file '
                         'written by tools/export.py --format aoti') from err


def _cpu_instruction_sets() -> List[str]:
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list
    return [str(isa).lower() for isa in valid_vec_isa_list()]


def check_package_compatible(path: str, metadata: Dict[str, str]) -> None:
    """Refuse a package this process cannot run: built by another torch release, for
    another device, or with vector instructions this CPU lacks (it would crash)."""
    built = metadata.get(TORCH_KEY)
    if built is None:
        raise ValueError(f'{path} was not written by tools/export.py --format aoti (it does '
                         'not say which torch built it): export it again')
    if _torch_version(built) != _torch_version(torch.__version__):
        raise ValueError(f'{osp.basename(path)} was compiled by torch {built}; this is torch '
                         f'{torch.__version__}. Compiled packages run only under the torch '
                         'release that built them: export it again with this torch')
    device = metadata.get(_DEVICE_KEY, 'cpu')
    if device != 'cpu':
        raise ValueError(f'{osp.basename(path)} was compiled for {device}; it runs here on '
                         'the CPU only')
    kernel = metadata.get(KERNEL_KEY)
    if kernel and kernel != _KERNEL_VALUE:
        raise ValueError(f'{osp.basename(path)} calls the Winograd op as an earlier version '
                         f'of mmrepvgg defined it ({kernel}; this one has {_KERNEL_VALUE}): '
                         'export it again')
    isa = metadata.get(_ISA_KEY, '').lower()
    available = _cpu_instruction_sets()
    if isa and isa != 'invalid_vec_isa' and isa not in available:
        raise ValueError(f'{osp.basename(path)} was compiled for {isa.upper()}, which this '
                         f'CPU lacks (it has: {", ".join(available).upper() or "none"}): '
                         'export it again on this kind of CPU')


class PackageRunner:
    """A compiled AOTInductor package: ``runner(x)`` -> list of output tensors, with the
    same attributes as :class:`mmrepvgg.deploy.backends.BackendRunner` (``backend`` is
    ``'aoti'``; ``load_seconds`` says how long loading took). ``threads`` sets torch's
    intra-op threads, process-wide: the package's oneDNN and MKL calls use them."""

    quantized = False

    def __init__(self, path: str, precision: str = 'fp32', threads: Optional[int] = None):
        if precision != 'fp32':
            raise ValueError(f'aoti runs fp32, not {precision!r}')
        path = os.fspath(path)
        self.metadata = read_package_metadata(path)
        check_package_compatible(path, self.metadata)
        shape = self.metadata.get(SHAPE_KEY)
        self.input_shape = json.loads(shape) if shape else None
        self.path, self.backend, self.precision = path, 'aoti', precision
        self.precision_used, self.threads = precision, threads
        self.output_names = json.loads(self.metadata.get('mmrepvgg.output_names', '[]'))
        if threads:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        if self.metadata.get(KERNEL_KEY) and not load_kernel():
            raise RuntimeError(f'{osp.basename(path)} calls the C++ Winograd kernel, which '
                               f'could not be loaded here ({load_error()}); export it '
                               'again without --winograd, or where a C++ compiler works')
        self._run = torch._inductor.aoti_load_package(path)
        self.load_seconds = time.perf_counter() - start

    def check_input(self, x: Tensor) -> None:
        """Raise ``ValueError`` when ``x`` is not of the shape the package was built for."""
        if self.input_shape is not None and list(x.shape) != self.input_shape:
            raise ValueError(
                f'{osp.basename(self.path)} was compiled for inputs of shape '
                f'{"x".join(map(str, self.input_shape))}, got {"x".join(map(str, x.shape))}: '
                'export it again with --batch/--shape matching this data')

    def __call__(self, x: Tensor) -> List[Tensor]:
        self.check_input(x)
        with torch.no_grad():
            outputs = self._run(x.detach().to('cpu', torch.float32).contiguous())
        return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]

    def __repr__(self) -> str:
        return f'PackageRunner({osp.basename(self.path)!r})'
