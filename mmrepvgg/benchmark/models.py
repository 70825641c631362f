"""What the benchmark times: each model (RepVGG backbones in training and fused form,
mmdet's ResNets, whole models from config files) as a :class:`ModelSpec`, built once on
CPU in fp32, with its MAC count and eager fp32 reference output; and the modes that run
the model outside torch (:data:`BACKEND_MODES`).

mmdet (ResNet rows) and mmdet/mmseg (config rows) are imported only when asked for; rows
that cannot be built are skipped with a message instead.
"""
import copy
import os.path as osp
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..deploy import ExportedPart
from ..models import RepVGG
from ..numerics import flatten_outputs, fp32_math
from ..reparam import (copy_module, count_unfused, fusable_modules, randomize_norm_stats,
                       reparameterize)
from .timing import count_conv_flops, log

__all__ = ['BACKEND_MODES', 'QAT_MODES', 'RESNET_DEPTHS', 'ModelSpec', 'repvgg_specs', 'resnet_specs',
           'config_specs', 'prepare_specs']

RESNET_DEPTHS = (18, 34, 50, 101, 152)
#: Modes that export the model to ONNX and run the file outside torch, on the CPU:
#: mode -> (backend, precision) of mmrepvgg.deploy.load_backend; int8: the file quantized
#: by mmrepvgg.deploy.quantize_onnx first (static QDQ, calibrated on the benchmark input:
#: the ranges change the numbers, not the work).
#: ``aoti``: the network compiled into an AOTInductor package (mmrepvgg.deploy.aoti) and
#: loaded back; ``winograd-aoti``: the same with Winograd convs (--winograd-tile).
#: ``*-qat``: the INT8 file of a quantization-aware fine-tune of the model (given to the
#: run, see BenchmarkOptions.qat_file), run as it is.
BACKEND_MODES = {'onnxruntime': ('onnxruntime', 'fp32'), 'openvino': ('openvino', 'fp32'),
                 'openvino-bf16': ('openvino', 'bf16'),
                 'onnxruntime-int8': ('onnxruntime', 'int8'),
                 'openvino-int8': ('openvino', 'int8'),
                 'onnxruntime-qat': ('onnxruntime', 'int8'),
                 'openvino-qat': ('openvino', 'int8'),
                 'aoti': ('aoti', 'fp32'), 'winograd-aoti': ('aoti', 'fp32')}

#: The backend modes that run a QAT fine-tune's INT8 file.
QAT_MODES = ('onnxruntime-qat', 'openvino-qat')

@dataclass
class ModelSpec:
    """A model to time under every mode and precision, built once on CPU in fp32."""
    label: str             # e.g. RepVGG-B1g2, ResNet-101, a config's name
    form: str              # train / fused for re-parameterizable models, '' otherwise
    kind: str              # backbone / model
    model: nn.Module
    method: str = 'forward'
    extra_args: Callable[[int], tuple] = lambda batch: ()
    reference: Optional['ModelSpec'] = None   # whose eager output this one must match
    info: Dict[str, Any] = field(default_factory=dict)
    output: Any = None     # eager fp32 output on the benchmark input
    # The same computed in float64 (None: not checked, or the model cannot run in fp64):
    # what each row's own rounding is measured against, in the process that timed it.
    exact_output: Any = None
    # The same for the network the backend modes export, and what it runs where that is
    # not `method` (a whole model's ExportedPart); why it cannot be exported, if so.
    exported_output: Any = None
    exact_exported_output: Any = None
    exported_info: Dict[str, Any] = field(default_factory=dict)
    export_error: Optional[str] = None

    @property
    def key(self) -> str:
        return f'{self.label}/{self.form}' if self.form else self.label

    def exported_network(self, model: nn.Module) -> nn.Module:
        """What the backend modes export of ``model`` (this spec's model or a copy): a
        backbone as it is, a whole model's dense part (one batch in, flat tensors out)."""
        return model if self.kind == 'backbone' else ExportedPart(model)


def repvgg_specs(archs: Sequence[str], forms: Sequence[str], seed: int) -> List[ModelSpec]:
    specs = []
    for arch in archs:
        torch.manual_seed(seed)
        train = RepVGG(arch=arch)
        train.eval()
        randomize_norm_stats(train, seed)
        label = f'RepVGG-{arch}'
        train_spec = ModelSpec(label, 'train', 'backbone', train)
        if 'train' in forms:
            specs.append(train_spec)
        if 'fused' in forms:
            specs.append(ModelSpec(label, 'fused', 'backbone', reparameterize(train),
                                   reference=train_spec))
    return specs


def resnet_specs(depths: Sequence[int], seed: int, skipped: List[str]) -> List[ModelSpec]:
    """mmdet's ResNets of ``depths``; none, with a message added to ``skipped``, when
    mmdet cannot be imported."""
    if not depths:
        return []
    try:
        from mmdet.models.backbones import ResNet
    except Exception as exc:  # noqa: BLE001  (ImportError, or mmcv.ops failing to load)
        msg = (f'skipped ResNet-{",".join(map(str, depths))}: mmdet is not importable '
               f'({type(exc).__name__}: {exc}); install mmdet for the ResNet rows')
        log(msg)
        skipped.append(msg)
        return []
    specs = []
    for depth in depths:
        torch.manual_seed(seed)
        model = ResNet(depth=depth)
        model.eval()  # mmdet's ResNet.train() returns None: no chaining
        randomize_norm_stats(model, seed)
        specs.append(ModelSpec(f'ResNet-{depth}', '', 'backbone', model))
    return specs


def _whole_model_weights(checkpoint: str, cfg) -> dict:
    """The state dict of a whole-model checkpoint; a fused one makes the config build its
    backbone in deploy form."""
    from ..convert import read_model_checkpoint
    state, info = read_model_checkpoint(checkpoint, request='timing the model')
    if info.deploy:
        cfg.model.backbone.deploy = True
    return state.get('state_dict', state)


def _load_config(path: str):
    from mmengine.config import Config
    if '::' in path and not osp.exists(path):
        from mmengine.hub import get_config
        return get_config(path)
    return Config.fromfile(path)


def _dummy_data_samples(scope: str, batch: int, height: int, width: int) -> Optional[list]:
    meta = dict(img_shape=(height, width), ori_shape=(height, width),
                pad_shape=(height, width), batch_input_shape=(height, width),
                scale_factor=(1.0, 1.0))
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample as Sample
    elif scope == 'mmseg':
        from mmseg.structures import SegDataSample as Sample
    else:
        return None
    return [Sample(metainfo=meta) for _ in range(batch)]


def config_specs(paths: Sequence[str], forward: str, input_size: Sequence[int], seed: int,
                 skipped: List[str], forms: Sequence[str] = ('train', 'fused'),
                 cfg_options: Optional[dict] = None, checkpoint: Optional[str] = None
                 ) -> List[ModelSpec]:
    """The models of config files (a project path or ``scope::path``), timed through
    ``forward`` ('_forward', 'extract_feat' or 'auto'); fused and not where they hold
    RepVGG blocks. Random weights (batch norms with non-trivial statistics), or those of
    ``checkpoint`` (a whole model's, training or fused form). A config whose model cannot
    be built or run is added to ``skipped``."""
    specs = []
    height, width = input_size
    for path in paths:
        label = osp.splitext(osp.basename(path.split('::')[-1]))[0]
        try:
            from mmengine.model import revert_sync_batchnorm
            from mmengine.registry import MODELS, init_default_scope

            # (type='mmrepvgg.RepVGG' is registered: this module's package is imported)
            cfg = _load_config(path)
            if cfg_options:
                cfg.merge_from_dict(cfg_options)
            state = _whole_model_weights(checkpoint, cfg) if checkpoint else None
            scope = cfg.get('default_scope', None) or 'mmdet'
            init_default_scope(scope)
            torch.manual_seed(seed)
            model = revert_sync_batchnorm(MODELS.build(cfg.model))
            if state is not None:
                from mmengine.runner import load_state_dict
                load_state_dict(model, state, strict=True)
            model.eval()
        except Exception as exc:  # noqa: BLE001
            msg = (f'skipped {path}: could not build the model ({type(exc).__name__}: '
                   f'{str(exc).splitlines()[0] if str(exc) else ""}); whole-model rows '
                   'need mmdet or mmseg (whichever the config uses)')
            log(msg)
            skipped.append(msg)
            continue
        if state is None:
            randomize_norm_stats(model, seed)
        # What to time: the tensor forward, or backbone+neck when it needs more than tensors
        # (e.g. a two-stage detector's proposals) and cannot run on a dummy batch.
        choices = {'_forward': [('_forward', True)], 'extract_feat': [('extract_feat', False)],
                   'auto': [('_forward', True), ('extract_feat', False)]}[forward]
        probe = torch.randn(1, 3, height, width)
        method, extra, errors = None, None, []
        for name, with_samples in choices:
            def extra_fn(batch, with_samples=with_samples):
                if not with_samples:
                    return ()
                samples = _dummy_data_samples(scope, batch, height, width)
                return () if samples is None else (samples,)
            try:
                with torch.no_grad():
                    getattr(model, name)(probe, *extra_fn(1))
                method, extra = name, extra_fn
                break
            except Exception as exc:  # noqa: BLE001
                errors.append(f'{name}: {type(exc).__name__}: {exc}'.splitlines()[0])
        if method is None:
            msg = f'skipped {path}: no forward ran on a dummy batch ({"; ".join(errors)})'
            log(msg)
            skipped.append(msg)
            continue
        if errors:
            log(f'{label}: timing {method} ({"; ".join(errors)})')
        info = dict(config=path, method=method, scope=scope)
        if not fusable_modules(model):
            specs.append(ModelSpec(label, '', 'model', model, method, extra, info=info))
            continue
        train = ModelSpec(label, 'train', 'model', model, method, extra, info=info)
        fused = reparameterize(model)
        info_fused = dict(info, unfused_left=count_unfused(fused))
        specs += [train] if 'train' in forms else []
        if 'fused' in forms:
            specs.append(ModelSpec(label, 'fused', 'model', fused, method, extra,
                                   reference=train, info=info_fused))
    return specs


@torch.no_grad()
def _eager_pass(model: nn.Module, forward: Callable, inputs: torch.Tensor,
                check: bool) -> tuple:
    """The MAC counts of ``forward(inputs)`` and, with ``check``, its outputs on CPU,
    computed in IEEE fp32 (the reference of every row: never TF32 on CUDA, nor bf16
    products on CPU, whatever the process-wide default)."""
    with fp32_math(inputs.device, 'fp32'):
        counts = count_conv_flops(model, inputs, forward=forward)
        output = ([t.detach().cpu() for t in flatten_outputs(forward(inputs))] if check
                  else None)
    return dict(macs_per_image=counts['macs'] / inputs.shape[0],
                flops_per_batch=counts['flops']), output


@torch.no_grad()
def _exact_pass(model: nn.Module, call: Callable, inputs: torch.Tensor) -> Optional[list]:
    """``call(copy, inputs)`` with a float64 copy of ``model``, outputs on CPU; None where
    the model cannot run in float64 (e.g. a head that builds fp32 tensors of its own)."""
    exact = copy_module(model).double()
    try:
        return [t.detach().cpu() for t in flatten_outputs(call(exact, inputs.double()))]
    except (RuntimeError, TypeError) as exc:
        log(f'no float64 reference ({type(exc).__name__}: {str(exc).splitlines()[0]}); '
            'rows report no fp64 error')
        return None
    finally:
        del exact


def prepare_specs(specs: Sequence[ModelSpec], inputs: torch.Tensor, device: torch.device,
                  check: bool, exported: bool = False) -> None:
    """One eager fp32 forward of each spec on the device: FLOPs, and the reference output;
    with ``exported``, also of the network the backend modes export. With ``check``, the
    same again in float64, so each row's error can be judged against the reference's own
    fp32 rounding computed here, in the process (and thread count) that ran both. A
    spec's reference (the training form of a fused model) gets its passes even when it
    is not timed."""
    untimed = [s.reference for s in specs if s.reference is not None
               and all(s.reference is not t for t in specs)]
    for spec in list(specs) + list({id(r): r for r in untimed}.values()):
        model = copy.deepcopy(spec.model).to(device)
        model.eval()
        fwd = getattr(model, spec.method)
        extra = spec.extra_args(inputs.shape[0])
        macs, spec.output = _eager_pass(model, lambda x: fwd(x, *extra), inputs.to(device),
                                        check)
        if check:
            spec.exact_output = _exact_pass(
                model, lambda m, x: getattr(m, spec.method)(x, *extra), inputs.to(device))
        spec.info.update(macs, params=sum(p.numel() for p in spec.model.parameters()))
        if exported and spec.kind == 'backbone':
            spec.exported_output = spec.output
            spec.exact_exported_output = spec.exact_output
        elif exported:
            try:
                network = spec.exported_network(model)
            except ValueError as exc:  # a model type mmrepvgg.deploy.parts cannot cut
                spec.export_error = str(exc)
            else:
                macs, spec.exported_output = _eager_pass(network, network, inputs.to(device),
                                                         check)
                if check:
                    spec.exact_exported_output = _exact_pass(
                        model, lambda m, x: spec.exported_network(m)(x), inputs.to(device))
                spec.exported_info = dict(macs, method=f'ExportedPart ({network.kind})')
        del model
