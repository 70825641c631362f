"""Export a fused model to ONNX and check the file against torch before keeping it.

* :func:`export_module`: any module, one image batch in, tensors out, written with
  torch's ``torch.export``-based ONNX exporter (it handles PSPNet's adaptive pooling to
  bins that do not divide the feature map, which the TorchScript exporter refuses).
* :func:`onnx_parity`: the file in ONNX Runtime against the torch module on a probe, held
  to the bound of the fusion check (``mmrepvgg.reparam.rounding_errors``): its fp32 error
  against a float64 run of the module within a few times torch's own fp32 error.
* :func:`export_model`: a config and a checkpoint (training or fused form, path or URL)
  to a checked ONNX file of the part ``mmrepvgg.deploy.parts`` cuts out; what stays in
  Python and has weights (a two-stage detector's RoI head) goes beside it.

Nothing half-written is ever left at the output path: files are written to temporary
names beside it and renamed once they passed the check.
"""
import contextlib
import copy
import hashlib
import io
import json
import os
import os.path as osp
import re
import warnings
from collections import Counter
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..convert import load_fused_model, save_atomic, staged_files, temporary_beside
from ..reparam import FUSION_MARGIN, flatten_outputs, rounding_errors
from .parts import ExportedPart

__all__ = ['DEFAULT_OPSET', 'export_module', 'onnx_parity', 'export_model',
           'torch_part_path', 'ExportFailure']

#: The opset torch's exporter writes natively (lower ones go through onnx's converter).
DEFAULT_OPSET = 18
INPUT_NAME = 'input'


class ExportFailure(RuntimeError):
    """The exporter could not write the network (the message names module and op)."""


def torch_part_path(onnx_path: str) -> str:
    """Where the weights of the Python part go: ``model.onnx`` -> ``model.torch.pth``."""
    stem = onnx_path[:-5] if onnx_path.endswith('.onnx') else onnx_path
    return stem + '.torch.pth'


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
                  metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``module`` (eval mode, one NCHW input, tensors out) as ONNX to ``path``.

    ``dynamic`` makes batch, height and width dynamic axes; otherwise the file takes
    ``example_input``'s shape only. ``metadata`` goes into the file's metadata properties.
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
        if metadata:
            proto = onnx.load(tmp)
            for key, value in metadata.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, str(value)
            onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


@torch.no_grad()
def onnx_parity(module: nn.Module, onnx_path: str, probe: Tensor,
                factor: float = FUSION_MARGIN) -> dict:
    """Run ``onnx_path`` in ONNX Runtime on ``probe`` and compare it with ``module``.

    The reference is a float64 copy of ``module``; ONNX Runtime's error against it must
    stay within ``factor`` times torch fp32's own error (at least a few fp32 epsilons of
    the output scale), as for fusion. Returns ``rounding_errors``' dict plus ``max_abs``
    and ``max_rel`` (ONNX Runtime vs torch fp32, absolute and over the output scale).
    """
    from .backends import load_backend
    module.eval()  # not chained: some modules' train() returns None (mmdet's ResNet)
    torch_out = flatten_outputs(module(probe))
    reference = flatten_outputs(copy.deepcopy(module).double()(probe.double()))
    onnx_out = load_backend(onnx_path, 'onnxruntime')(probe)
    if len(onnx_out) != len(torch_out):
        raise ValueError(f'{onnx_path} gives {len(onnx_out)} outputs, the module '
                         f'{len(torch_out)}')
    errors = rounding_errors(onnx_out, torch_out, reference, factor)
    errors['max_abs'] = max((a.double() - b.double()).abs().max().item()
                            for a, b in zip(onnx_out, torch_out))
    errors['max_rel'] = errors['max_abs'] / errors['output_scale'] \
        if errors['output_scale'] else 0.0
    return errors


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


#: The largest stride of the feature maps MMLab backbones give (RepVGG's and ResNet's
#: last stage, FPN levels below P6): sizes that are multiples of it always line up.
FEATURE_STRIDE = 32


def _shape_hint(shape: Sequence[int]) -> str:
    """What to try when the network failed on an input of ``shape``."""
    fit = [max(FEATURE_STRIDE, -(-s // FEATURE_STRIDE) * FEATURE_STRIDE) for s in shape]
    return (f'try sizes that are multiples of the feature stride {FEATURE_STRIDE}, e.g. '
            f'--shape {fit[0]} {fit[1]}')


def export_model(config: str, checkpoint: str, output: str, shape: Sequence[int],
                 batch: int = 1, dynamic: bool = False, opset: int = DEFAULT_OPSET,
                 part: str = 'model', cfg_options: Optional[dict] = None,
                 check: bool = True, seed: int = 0) -> dict:
    """Export the fused network of ``config`` with ``checkpoint``'s weights to ``output``.

    ``checkpoint`` may be a training or a fused (deploy) checkpoint, a path or a URL; a
    training one is fused after loading. ``shape`` is the input (H, W) of the probe and,
    without ``dynamic``, of the file. With ``check``, the file is compared with the torch
    model in ONNX Runtime (:func:`onnx_parity`) and kept only if it passes.

    Returns a report: ``kind`` (segmentor, single_stage, two_stage, backbone),
    ``output_names``, ``fusion`` (the fusion report, or None for a fused checkpoint),
    ``parity`` (see :func:`onnx_parity`), ``node_types`` (ONNX op -> count), ``torch_part``
    (the weights file written beside the ONNX one, or None).

    Raises:
        ValueError: bad input (shape the network cannot take, output equal to the
            checkpoint, parity failure: nothing is written then).
        ExportFailure: the exporter could not write the network.
    """
    import onnx
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f'shape must be two positive sizes H W, got {tuple(shape)}')
    cfg, model, fusion = load_fused_model(config, checkpoint, cfg_options, avoid=output)
    exported = ExportedPart(model.eval(), part)
    torch.manual_seed(seed)
    probe = torch.randn(batch, 3, *shape)
    try:
        with torch.no_grad():
            exported(probe)
    except Exception as err:  # noqa: BLE001 - shape errors from any layer
        raise ValueError(f'the network cannot take a {batch}x3x{shape[0]}x{shape[1]} input '
                         f'({type(err).__name__}: {str(err)[:200]}); '
                         f'{_shape_hint(shape)}') from err
    metadata = dict(exported.describe(), **{
        'mmrepvgg.config': osp.basename(config),
        'mmrepvgg.input_shape': json.dumps([None if dynamic else batch, 3]
                                           + ([None, None] if dynamic else list(shape)))})
    torch_state = exported.torch_state()
    side = torch_part_path(output) if torch_state else None
    with staged_files() as (stage, publish):
        if side:
            side_tmp = stage(side, '.pth')
            save_atomic(dict(meta=dict(config=osp.basename(config), kind=exported.kind),
                             state_dict=torch_state), side_tmp)
            metadata.update({'mmrepvgg.torch_part': osp.basename(side),
                             'mmrepvgg.torch_part_sha256': _sha256(side_tmp)})
        onnx_tmp = stage(output, '.onnx')
        export_module(exported, probe, onnx_tmp, dynamic, opset, exported.output_names(),
                      metadata)
        parity = None
        if check:
            parity = onnx_parity(exported, onnx_tmp, probe)
            if not parity['within']:
                raise ValueError(
                    f'the ONNX file disagrees with the torch model: max abs difference '
                    f'{parity["max_abs"]:.3g} (relative {parity["max_rel"]:.3g}); its error '
                    f'against float64 {parity["candidate_abs"]:.3g} exceeds '
                    f'{parity["bound"]:.3g} ({FUSION_MARGIN:g}x torch fp32\'s own '
                    f'{parity["baseline_abs"]:.3g}). Nothing was written.')
        proto = onnx.load(onnx_tmp)
        node_types = dict(Counter(n.op_type for n in proto.graph.node).most_common())
        opset_written = max((o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')),
                            default=None)
        del proto
        publish(*([side] if side else []), output)
    return dict(kind=exported.kind, output_names=exported.output_names(), fusion=fusion,
                parity=parity, node_types=node_types, torch_part=side, opset=opset_written,
                input_shape=json.loads(metadata['mmrepvgg.input_shape']))
