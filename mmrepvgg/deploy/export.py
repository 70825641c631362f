"""Export the fused network of a config, checked against torch before it is kept.

* :func:`export_model`: a config and a checkpoint (training or fused form, path or URL)
  to the part ``mmrepvgg.deploy.parts`` cuts out, as an ONNX file
  (``mmrepvgg.deploy.onnx_export``) or compiled into an AOTInductor package
  (``mmrepvgg.deploy.aoti``), optionally with Winograd convs
  (``mmrepvgg.ops.winograd``); what stays in Python and has weights (a two-stage
  detector's RoI head) goes beside it.

Nothing half-written is ever left at the output path: files are written to temporary
names beside it and renamed once they passed the check.
"""
import json
import os.path as osp
from collections import Counter
from typing import Callable, Dict, Optional, Sequence

import torch

from ..convert import load_fused_model
from ..fileio import save_atomic, sha256_file, staged_files
from ..numerics import flatten_outputs, output_error
from ..ops.gemm_conv import GemmConv2d
from ..ops.winograd import TileChoice, WinogradConv2d, convert_to_winograd
from ..reparam import FUSION_MARGIN
from . import onnx_export
from .aoti import PACKAGE_SUFFIX, PackageRunner, package_module
from .backends import load_backend
from .parity import runner_parity
from .parts import ExportedPart

__all__ = ['FORMATS', 'export_model', 'export_part', 'torch_part_path',
           'config_input_shape']

#: What ``tools/export.py --format`` writes, and the suffix its output must have.
FORMATS = {'onnx': '.onnx', 'aoti': PACKAGE_SUFFIX}
#: The largest stride of the feature maps MMLab backbones give (RepVGG's and ResNet's
#: last stage, FPN levels below P6): sizes that are multiples of it always line up.
FEATURE_STRIDE = 32


def config_input_shape(cfg) -> Optional[list]:
    """(H, W) of the config's test images: the test pipeline's Resize scale, padded to
    the data preprocessor's size divisor (None when the pipeline does not say)."""
    pipeline = cfg.get('test_dataloader', {}).get('dataset', {}).get('pipeline', [])
    scale = next((t.get('scale') for t in pipeline
                  if t.get('type') in ('Resize', 'mmdet.Resize', 'mmseg.Resize')
                  and t.get('scale')), None)
    if not scale or not isinstance(scale, (tuple, list)):
        return None
    divisor = cfg.model.get('data_preprocessor', {}).get('pad_size_divisor', 1) or 1
    return [-(-int(s) // divisor) * divisor for s in (scale[1], scale[0])]  # (W, H) -> H, W


def torch_part_path(path: str) -> str:
    """Where the weights of the Python part go: ``model.onnx`` / ``model.pt2`` ->
    ``model.torch.pth``."""
    for suffix in FORMATS.values():
        if path.endswith(suffix):
            return path[:-len(suffix)] + '.torch.pth'
    return path + '.torch.pth'


def _shape_hint(shape: Sequence[int]) -> str:
    """What to try when the network failed on an input of ``shape``."""
    fit = [max(FEATURE_STRIDE, -(-s // FEATURE_STRIDE) * FEATURE_STRIDE) for s in shape]
    return (f'try sizes that are multiples of the feature stride {FEATURE_STRIDE}, e.g. '
            f'--shape {fit[0]} {fit[1]}')


def _check_request(output: str, shape: Sequence[int], fmt: str, dynamic: bool,
                   winograd: Optional[TileChoice]) -> None:
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f'shape must be two positive sizes H W, got {tuple(shape)}')
    if fmt not in FORMATS:
        raise ValueError(f'unknown format {fmt!r}; valid: {", ".join(FORMATS)}')
    if not output.endswith(FORMATS[fmt]):
        raise ValueError(f'a {fmt} export is written to a {FORMATS[fmt]} file, got {output}')
    if fmt == 'aoti' and dynamic:
        raise ValueError('an AOTInductor package is compiled for one input shape: drop '
                         '--dynamic and give --batch/--shape')
    if fmt != 'aoti' and winograd is not None:
        raise ValueError('Winograd convs are compiled into AOTInductor packages: use '
                         '--format aoti')


def export_model(config: str, checkpoint: str, output: str, shape: Sequence[int],
                 batch: int = 1, dynamic: bool = False,
                 opset: int = onnx_export.DEFAULT_OPSET, part: str = 'model',
                 cfg_options: Optional[dict] = None, check: bool = True, seed: int = 0,
                 format: str = 'onnx', winograd: Optional[TileChoice] = None,
                 loaded: Optional[tuple] = None) -> dict:
    """Export the fused network of ``config`` with ``checkpoint``'s weights to ``output``.

    ``checkpoint`` may be a training or a fused (deploy) checkpoint, a path or a URL; a
    training one is fused after loading. With ``part='backbone'`` it may also be a
    backbone release file (official, mmpretrain, timm); for the whole model such a file
    is refused with a message saying what it holds. ``shape`` is the input (H, W) of the probe and,
    without ``dynamic``, of the file. ``format``: ``'onnx'`` (a ``.onnx`` file) or
    ``'aoti'`` (an AOTInductor package, ``.pt2``, for one input shape). ``winograd``
    (``aoti`` only): compute the 3x3 stride-1 convs with Winograd tiles of this size, or
    ``'auto'`` (per conv, from its feature map). With ``check``, the file is run
    (ONNX Runtime / the loaded package) against the torch model and kept only if it
    passes. ``loaded``: what ``fetch_and_load(checkpoint)`` gave already (not read
    again).

    Returns a report: ``kind`` (segmentor, single_stage, two_stage, backbone),
    ``output_names``, ``fusion`` (the fusion report, or None for a fused checkpoint),
    ``parity`` (see :func:`runner_parity`), ``torch_part`` (the weights file written
    beside, or None), ``input_shape``; ONNX: ``node_types`` (op -> count), ``opset``;
    AOTInductor: ``export_s``, ``compile_s``, ``load_s``, ``winograd`` (tile -> number of
    convs) and ``winograd_vs_direct`` (the package's largest difference from the
    direct-conv fused network, over its largest output).

    Raises:
        ValueError: bad input (shape the network cannot take, output equal to the
            checkpoint, parity failure: nothing is written then).
        ExportFailure: the ONNX exporter could not write the network.
    """
    _check_request(output, shape, format, dynamic, winograd)
    cfg, model, fusion = load_fused_model(config, checkpoint, cfg_options, avoid=output,
                                          part=part, loaded=loaded)
    return export_part(ExportedPart(model.eval(), part), config, output, shape, batch,
                       dynamic, opset, check, seed, format, winograd, dict(fusion=fusion))


def export_part(exported: ExportedPart, config: str, output: str, shape: Sequence[int],
                batch: int = 1, dynamic: bool = False,
                opset: int = onnx_export.DEFAULT_OPSET, check: bool = True, seed: int = 0,
                format: str = 'onnx', winograd: Optional[TileChoice] = None,
                report: Optional[dict] = None, parity: Callable = runner_parity,
                translations: Optional[dict] = None,
                metadata: Optional[Dict[str, str]] = None,
                rewrite: Optional[Callable] = None) -> dict:
    """Write the network ``exported`` (see :func:`export_model`, whose report it returns,
    updating ``report``). ``parity(exported, runner, probe)`` judges the written file
    (a dict with ``within`` and, where it fails, ``reason``); ``translations`` go to the
    ONNX exporter; ``metadata`` joins the file's own; ``rewrite(proto)`` changes the
    ONNX graph in place before the file is judged."""
    _check_request(output, shape, format, dynamic, winograd)
    torch.manual_seed(seed)
    probe = torch.randn(batch, 3, *shape)
    try:
        with torch.no_grad():
            direct_out = flatten_outputs(exported(probe))
    except Exception as err:  # noqa: BLE001 - shape errors from any layer
        raise ValueError(f'the network cannot take a {batch}x3x{shape[0]}x{shape[1]} input '
                         f'({type(err).__name__}: {str(err)[:200]}); '
                         f'{_shape_hint(shape)}') from err
    metadata = dict(exported.describe(), **(metadata or {}), **{
        'mmrepvgg.config': osp.basename(config),
        'mmrepvgg.input_shape': json.dumps([None if dynamic else batch, 3]
                                           + ([None, None] if dynamic else list(shape)))})
    report = dict(report or {}, kind=exported.kind, output_names=exported.output_names(),
                  input_shape=json.loads(metadata['mmrepvgg.input_shape']))
    if winograd is not None:
        convert_to_winograd(exported, winograd, probe)
        tiles = Counter(str(m.tile) for m in exported.modules()
                        if isinstance(m, WinogradConv2d))
        report['winograd'] = dict(sorted(tiles.items()))
        report['matmul_convs'] = sum(isinstance(m, GemmConv2d) for m in exported.modules())
        metadata['mmrepvgg.winograd'] = json.dumps(report['winograd'])
    torch_state = exported.torch_state()
    side = torch_part_path(output) if torch_state else None
    with staged_files() as (stage, publish):
        if side:
            side_tmp = stage(side, '.pth')
            save_atomic(dict(meta=dict(config=osp.basename(config), kind=exported.kind),
                             state_dict=torch_state), side_tmp)
            metadata.update({'mmrepvgg.torch_part': osp.basename(side),
                             'mmrepvgg.torch_part_sha256': sha256_file(side_tmp)})
        tmp = stage(output, FORMATS[format])
        if format == 'onnx':
            onnx_export.export_module(exported, probe, tmp, dynamic, opset,
                                      exported.output_names(), metadata, translations,
                                      rewrite)
            runner = load_backend(tmp, 'onnxruntime') if check else None
        else:
            metadata['mmrepvgg.output_names'] = json.dumps(exported.output_names())
            report.update(package_module(exported, probe, tmp, metadata))
            runner = PackageRunner(tmp)
            report['load_s'] = runner.load_seconds
            if winograd is not None:
                report['winograd_vs_direct'] = output_error(runner(probe), direct_out).relative
        report['parity'] = None
        if check:
            verdict = report['parity'] = parity(exported, runner, probe)
            if not verdict['within']:
                raise ValueError(f'the exported network disagrees with the torch model: '
                                 f'{verdict.get("reason") or _parity_reason(verdict)}. '
                                 'Nothing was written.')
        del runner
        if format == 'onnx':
            report.update(_onnx_summary(tmp))
        publish(*([side] if side else []), output)
    report['torch_part'] = side
    return report


def _parity_reason(parity: dict) -> str:
    return (f'max abs difference {parity["max_abs"]:.3g} (relative {parity["max_rel"]:.3g}); '
            f'its error against float64 {parity["candidate_abs"]:.3g} exceeds '
            f'{parity["bound"]:.3g} ({FUSION_MARGIN:g}x torch fp32\'s own '
            f'{parity["baseline_abs"]:.3g})')


def _onnx_summary(path: str) -> dict:
    """Node types (op -> count) and the opset of the ONNX file ``path``."""
    import onnx
    proto = onnx.load(path)
    node_types = dict(Counter(n.op_type for n in proto.graph.node).most_common())
    opset = max((o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')),
                default=None)
    return dict(node_types=node_types, opset=opset)
