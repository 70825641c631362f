"""Export a fused model to ONNX and check the file against torch before keeping it.

* :func:`export_module`: any module, one image batch in, tensors out, written with
  torch's ``torch.export``-based ONNX exporter (it handles PSPNet's adaptive pooling to
  bins that do not divide the feature map, which the TorchScript exporter refuses).
* :func:`onnx_parity`: the file in ONNX Runtime against the torch module on a probe, held
  to the bound of the fusion check (``mmrepvgg.reparam.rounding_errors``): its fp32 error
  against a float64 run of the module within a few times torch's own fp32 error.

``mmrepvgg.deploy.export.export_model`` uses both for a config and a checkpoint.
"""
import contextlib
import io
import os
import os.path as osp
import re
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..fileio import temporary_beside
from ..reparam import FUSION_MARGIN
from .parity import runner_parity

__all__ = ['DEFAULT_OPSET', 'export_module', 'onnx_parity', 'ExportFailure']

#: The opset torch's exporter writes natively (lower ones go through onnx's converter).
DEFAULT_OPSET = 18
INPUT_NAME = 'input'


class ExportFailure(RuntimeError):
    """The exporter could not write the network (the message names module and op)."""


# torch's exporter colours parts of its messages for terminals
_ANSI_COLOUR = re.compile(r'\x1b\[[0-9;]*m')
_OP_PATTERN = re.compile(r'\b(?:aten|torch\.ops\.[A-Za-z_]\w*|[A-Za-z_]\w*)(?:::|\.)'
                         r'([A-Za-z_]\w*)(?:\.(?:default|Tensor|Scalar|int|out)\b)?')


def _op_owners(module: nn.Module, x: Tensor, message: str) -> List[str]:
    """``'op in module.path'`` for each op named in an exporter error, found by running
    ``module`` once under a dispatch mode that records which submodule called what."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.module_tracker import ModuleTracker
    names = {m.group(1) for m in _OP_PATTERN.finditer(message)} - {'default'}
    if not names:
        return []
    found: Dict[str, str] = {}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            op = func.overloadpacket.__name__
            if op in names and op not in found:
                # the innermost module: the longest name among those running now
                found[op] = max(tracker.parents, key=len)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), ModuleTracker() as tracker, Record():
        try:
            module(x)
        except Exception:  # noqa: BLE001 - only the calls seen before matter
            pass
    return [f'{op} in {owner}' for op, owner in sorted(found.items())]


def export_module(module: nn.Module, example_input: Tensor, path: str, dynamic: bool = False,
                  opset: int = DEFAULT_OPSET, output_names: Optional[Sequence[str]] = None,
                  metadata: Optional[Dict[str, str]] = None,
                  translations: Optional[dict] = None,
                  rewrite: Optional[Callable] = None) -> None:
    """Write ``module`` (eval mode, one NCHW input, tensors out) as ONNX to ``path``.

    ``dynamic`` makes batch, height and width dynamic axes; otherwise the file takes
    ``example_input``'s shape only. ``metadata`` goes into the file's metadata properties.
    ``translations``: ONNX functions for custom ops (the exporter's
    ``custom_translation_table``); ``rewrite(proto)`` changes the written graph in place.
    Writes a temporary file and renames it, so ``path`` is either the full file or
    untouched.

    Raises:
        ExportFailure: the exporter failed; the message names the ops it could not
            handle and the modules that called them, where it can tell.
    """
    import onnx
    module.eval()  # not chained: some modules' train() returns None (mmdet's ResNet)
    tmp = temporary_beside(path, '.onnx')
    kwargs = {}
    if dynamic:
        dim = torch.export.Dim.DYNAMIC
        kwargs['dynamic_shapes'] = ({0: dim, 2: dim, 3: dim},)
    if translations:
        kwargs['custom_translation_table'] = translations
    log = io.StringIO()
    try:
        try:
            # The exporter reports progress on stdout and warns about every decomposition.
            with contextlib.redirect_stdout(log), warnings.catch_warnings(), \
                    torch.no_grad():
                warnings.simplefilter('ignore')
                torch.onnx.export(module, (example_input,), tmp, dynamo=True,
                                  opset_version=opset, input_names=[INPUT_NAME],
                                  output_names=list(output_names or []) or None,
                                  external_data=False, **kwargs)
        except Exception as err:  # torch.export, decomposition or translation errors
            text = _ANSI_COLOUR.sub('', f'{type(err).__name__}: {err}')
            owners = _op_owners(module, example_input, text)
            where = (f' (unsupported: {"; ".join(owners)})' if owners else '')
            first = next((line for line in text.splitlines() if line.strip()), text)
            raise ExportFailure(f'the ONNX exporter could not write {type(module).__name__}'
                                f'{where}: {first[:400]}') from err
        if metadata or rewrite is not None:
            proto = onnx.load(tmp)
            if rewrite is not None:
                rewrite(proto)
            for key, value in (metadata or {}).items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, str(value)
            onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


def onnx_parity(module: nn.Module, onnx_path: str, probe: Tensor,
                factor: float = FUSION_MARGIN) -> dict:
    """Run ``onnx_path`` in ONNX Runtime on ``probe`` and compare it with ``module``
    (``mmrepvgg.deploy.parity.runner_parity``: within ``factor`` times torch fp32's own
    error against float64)."""
    from .backends import load_backend
    return runner_parity(module, load_backend(onnx_path, 'onnxruntime'), probe, factor)
