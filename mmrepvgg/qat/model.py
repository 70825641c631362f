"""Quantization-aware fine-tuning: a trained detector or segmentor, fused, with INT8 fake
quantizers (NNCF) on the network it exports, trained by mmengine's runner.

:class:`QATModel` is a model type of its own, so the runner builds, wraps (DDP), trains,
validates, checkpoints and resumes it like any model. Built from a trained checkpoint
(training or fused form) it fuses the backbone's blocks and the heads' conv + BN pairs,
then lets ``nncf.quantize`` place the quantizers and set their ranges from calibration
images: int8 weights per output channel, uint8 activations per tensor with a zero point
(NNCF's mixed preset), the scheme ``tools/quantize.py`` writes. Fine-tuning then trains
the weights and the quantizers' ranges together. Built without a checkpoint, it takes
its quantizers from the state it loads (a QAT checkpoint, for testing and export).
"""
import copy
import json
import logging
from typing import Dict, List, Optional

import torch
from mmengine.model import BaseModel
from torch import nn

from ..registry import MODELS

__all__ = ['QATModel', 'is_qat_state', 'prepare_for_quantization', 'quantizer_counts',
           'use_reference_kernels']

#: Where a QAT checkpoint's quantizers live (NNCF's hook storage, inside QATModel.model).
HOOKS_KEY = '.__nncf_hooks.'


def is_qat_state(state: dict) -> bool:
    """Whether a checkpoint (or its ``state_dict``) was written by a :class:`QATModel`."""
    tensors = state.get('state_dict', state) if isinstance(state, dict) else {}
    return isinstance(tensors, dict) and any(HOOKS_KEY in k for k in tensors)


def prepare_for_quantization(model: nn.Module) -> nn.Module:
    """Fuse ``model`` (in place, eval mode) into what is exported: RepVGG blocks into
    single convs, each conv + BN pair (the heads' ConvModules) into one conv."""
    from mmcv.cnn import fuse_conv_bn

    from ..reparam import reparameterize
    model.eval()
    reparameterize(model, inplace=True)
    return fuse_conv_bn(model)


def use_reference_kernels(device: str) -> Optional[str]:
    """Make NNCF fake-quantize with torch ops instead of compiling its C++/CUDA kernels
    where it cannot compile them: on CUDA without nvcc (pip's CUDA torch brings none,
    and NNCF then stops with an InstallationError). Returns why, or None (compiled)."""
    if not device.startswith('cuda'):
        return None
    from ..env import find_cuda_toolkit
    if find_cuda_toolkit()[1]:  # an nvcc that runs
        return None
    from nncf.torch.quantization import extensions, quantize_functions
    from nncf.torch.quantization.reference import ReferenceQuantizedFunctions
    for namespace in (extensions.QuantizedFunctionsCUDA,
                      quantize_functions.QuantizedFunctionsCUDA):
        if hasattr(namespace, '_loaded_namespace'):
            namespace._loaded_namespace = ReferenceQuantizedFunctions
    return ('no CUDA compiler (nvcc) on PATH or in CUDA_HOME: NNCF fake-quantizes with '
            'torch ops (slower than its CUDA kernels; install the CUDA toolkit to compile '
            'them)')


def quantizer_counts(model: nn.Module) -> Dict[str, int]:
    """The NNCF quantizers of the NNCF-wrapped ``model`` (one shared by several hooks
    counts once): ``weights`` (per channel) and ``activations`` (per tensor)."""
    from nncf.torch.function_hook.wrapper import get_hook_storage
    from nncf.torch.quantization.layers import BaseQuantizer
    found = {id(m): m for _, m in get_hook_storage(model).named_hooks(remove_duplicate=False)
             if isinstance(m, BaseQuantizer)}
    weights = sum(bool(m.per_channel) for m in found.values())
    return dict(weights=weights, activations=len(found) - weights)


def _log(message: str, level: int = logging.INFO) -> None:
    from mmengine.logging import print_log
    print_log(message, logger='current', level=level)


@MODELS.register_module()
class QATModel(BaseModel):
    """``model`` (a detector or segmentor config) fused and fake-quantized for INT8.

    Args:
        model: the config of the model to fine-tune, as trained.
        checkpoint: its trained weights (a path or URL; training or fused form). Needed
            to train; without it the quantizers come from a QAT checkpoint's state
            (``load_state_dict``), as for testing and export.
        calibration: ``dict(dataloader=..., num=N)``: the first N images of that
            dataloader config set the quantizers' initial ranges (mmrepvgg's
            ``calibration_loader`` makes one that reads them through the test pipeline).
        ignored: NNCF name patterns left in float (default: a two-stage detector's RoI
            head, which runs in torch after the exported network).
        data_preprocessor: not used: the model's own runs (mmengine's runner hands the
            config's top-level one to every model it builds).
    """

    def __init__(self, model: dict, checkpoint: Optional[str] = None,
                 calibration: Optional[dict] = None, ignored: Optional[List[str]] = None,
                 data_preprocessor: Optional[dict] = None, init_cfg: Optional[dict] = None):
        from mmengine.registry import MODELS as ROOT
        from mmengine.runner import load_state_dict

        from ..checkpoint.fetch import fetch_and_load
        from ..convert import read_model_checkpoint
        model = copy.deepcopy(model)
        source = None
        if checkpoint is not None:
            loaded = fetch_and_load(checkpoint)
            if is_qat_state(loaded[1]):
                raise ValueError(f'{checkpoint} is a QAT checkpoint already; start from '
                                 'the float model it was fine-tuned from, or resume it')
            source, info = read_model_checkpoint(checkpoint, 'model',
                                                 'quantization-aware training',
                                                 loaded=loaded)
            fused = bool(info.deploy)
        else:
            fused = True  # a QAT checkpoint holds the fused layout
        if 'RepVGG' in str(model.get('backbone', {}).get('type', '')):
            model['backbone']['deploy'] = fused
        inner = ROOT.build(model)
        super().__init__(data_preprocessor=inner.data_preprocessor, init_cfg=init_cfg)
        if source is not None:
            load_state_dict(inner, source.get('state_dict', source), strict=True)
        self.model = prepare_for_quantization(inner)
        self.ignored = list(ignored if ignored is not None else ['roi_head/.*'])
        self.quantized = False
        if checkpoint is not None:
            if not calibration:
                raise ValueError('QATModel needs calibration=dict(dataloader=..., num=N) '
                                 'to set the quantizers\' ranges')
            self._quantize(calibration)

    def _quantize(self, calibration: dict) -> None:
        import nncf

        from ..deploy.quantize import read_images
        num = int(calibration.get('num', 32))
        images = read_images(calibration['dataloader'], self.model.data_preprocessor, num,
                             calibration.get('split', 'calibration'))
        device = next(self.model.parameters()).device
        reason = use_reference_kernels(str(device))
        if reason:
            _log(reason, logging.WARNING)
        ignored = nncf.IgnoredScope(patterns=self.ignored, validate=False)
        with torch.no_grad():
            self.model = nncf.quantize(
                self.model.eval(), nncf.Dataset([i.to(device) for i in images]),
                preset=nncf.QuantizationPreset.MIXED, subset_size=len(images),
                ignored_scope=ignored)
        self.quantized = True
        counts = self.quantizer_counts()
        _log(f'QAT: {counts["weights"]} weight and {counts["activations"]} activation '
             f'quantizers, ranges from {len(images)} calibration images')

    def quantizer_counts(self) -> Dict[str, int]:
        """How many quantizers the model holds (see :func:`quantizer_counts`)."""
        if not self.quantized:
            return dict(weights=0, activations=0)
        return quantizer_counts(self.model)

    def get_extra_state(self) -> str:
        # where the quantizers sit, as JSON text (a checkpoint then loads weights_only)
        if not self.quantized:
            return ''
        import nncf
        return json.dumps(nncf.torch.get_config(self.model))

    def set_extra_state(self, state) -> None:
        if not state:
            raise ValueError('the checkpoint holds a QATModel that was never quantized')
        import nncf
        config = json.loads(state)
        if self.quantized:
            if config != json.loads(self.get_extra_state()):
                raise ValueError('the checkpoint\'s quantizers sit elsewhere than this '
                                 'model\'s: it was fine-tuned from another config')
            return
        self.model = nncf.torch.load_from_config(self.model, config)
        self.quantized = True

    def init_weights(self) -> None:
        """Nothing: the weights come from ``checkpoint`` or the loaded QAT state."""

    def forward(self, inputs, data_samples=None, mode: str = 'tensor'):
        if not self.quantized:
            raise RuntimeError('QATModel has no quantizers: build it with checkpoint= and '
                               'calibration=, or load a QAT checkpoint first')
        return self.model(inputs, data_samples, mode)
