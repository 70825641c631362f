"""Where an MMLab model is cut for deployment: the exported network and the Python rest.

The exported part is everything up to the last dense layer, so the deployed file is a
plain network, image batch in, tensors out:

* a segmentor (mmseg ``EncoderDecoder``): backbone, neck and decode head, its logits
  resized to the input size (per-pixel class logits, as ``decode_head.predict`` gives);
* a single-stage detector: backbone, neck and the dense head's raw outputs (per-level
  class scores and box deltas, plus e.g. centerness for heads that have it);
* a two-stage detector: the neck's feature maps and the RPN head's raw outputs;
* ``part='backbone'``: the backbone's feature maps, for any config.

What stays in Python is the model's own post-processing, called exactly as mmseg and
mmdet call it (:func:`attach_backend`): the decode head's resize and the segmentor's
argmax, the dense head's box decoding and NMS (``predict_by_feat``), a two-stage
detector's RoI head. The RoI head has weights: :meth:`ExportedPart.torch_state` gives
them, and the exporter writes them beside the ONNX file.
"""
import json
from typing import Callable, Dict, List, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ['PARTS', 'ExportedPart', 'attach_backend', 'unflatten']

#: What ``tools/export.py --part`` takes: ``model`` (the network up to its dense head,
#: by model type) or ``backbone``.
PARTS = ('model', 'backbone')
# Names of a dense head's output groups, as its predict_by_feat names its arguments.
_HEAD_GROUPS = ('cls_score', 'bbox_pred', 'score_factor')
# Never run at test time: no weights of theirs need to travel.
_UNUSED_AT_TEST = ('auxiliary_head.', 'data_preprocessor.')


def _kind(model: nn.Module, part: str) -> str:
    if part not in PARTS:
        raise ValueError(f'unknown part {part!r}; valid: {", ".join(PARTS)}')
    if part == 'backbone':
        if not isinstance(getattr(model, 'backbone', None), nn.Module):
            raise ValueError(f'{type(model).__name__} has no backbone to export')
        return 'backbone'
    if hasattr(model, 'decode_head') and hasattr(model, 'extract_feat'):
        return 'segmentor'
    if getattr(model, 'rpn_head', None) is not None and hasattr(model, 'roi_head'):
        return 'two_stage'
    if getattr(model, 'bbox_head', None) is not None and hasattr(model, 'extract_feat'):
        return 'single_stage'
    raise ValueError(
        f'cannot tell which part of a {type(model).__name__} to export: supported are '
        'mmseg segmentors with a decode head, mmdet single-stage detectors (bbox_head) and '
        "two-stage detectors (rpn_head + roi_head); part='backbone' exports the backbone "
        'of any model')


class ExportedPart(nn.Module):
    """The exported part of ``model`` as a module: one image batch in, a flat tuple of
    tensors out (what an ONNX file can hold).

    ``groups`` says how to nest that tuple back, as ``[(name, count), ...]``: e.g.
    ``[('cls_score', 5), ('bbox_pred', 5)]`` for RetinaNet. It is set by each forward.
    """

    def __init__(self, model: nn.Module, part: str = 'model'):
        super().__init__()
        self.kind = _kind(model, part)
        self.model = model
        self.groups: List[Tuple[str, int]] = []

    @property
    def exported_prefixes(self) -> Tuple[str, ...]:
        """State-dict prefixes of the modules that run inside the exported network."""
        return {'backbone': ('backbone.',),
                'segmentor': ('backbone.', 'neck.', 'decode_head.'),
                'single_stage': ('backbone.', 'neck.', 'bbox_head.'),
                'two_stage': ('backbone.', 'neck.', 'rpn_head.')}[self.kind]

    def torch_state(self) -> Dict[str, Tensor]:
        """Weights of what runs in Python after the network (a two-stage detector's RoI
        head); empty for the other kinds."""
        if self.kind == 'backbone':
            return {}
        skip = self.exported_prefixes + _UNUSED_AT_TEST
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith(skip)}

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        model = self.model
        if self.kind == 'backbone':
            feats = model.backbone(x)
            return self.flatten([('feat', tuple(feats) if isinstance(feats, (list, tuple))
                                  else (feats,))])
        if self.kind == 'segmentor':
            return self.dense_outputs(x, model.decode_head.forward(model.extract_feat(x)))
        feats = model.extract_feat(x)
        if self.kind == 'single_stage':
            return self.dense_outputs(x, model.bbox_head(feats))
        return self.flatten([('feat', tuple(feats))] + self._head_groups(model.rpn_head(feats)))

    def dense_outputs(self, x: Tensor, outs) -> Tuple[Tensor, ...]:
        """The exported outputs of a segmentor or single-stage detector from what its
        tensor-mode forward gives for the image batch ``x`` (the decode head's logits,
        resized to the input; the dense head's outputs)."""
        if self.kind == 'segmentor':
            logits = F.interpolate(outs, size=x.shape[2:], mode='bilinear',
                                   align_corners=self.model.decode_head.align_corners)
            return self.flatten([('seg_logits', (logits,))])
        if self.kind == 'single_stage':
            return self.flatten(self._head_groups(outs))
        raise ValueError(f'a {self.kind} part has no dense outputs of its own')

    @staticmethod
    def _head_groups(outs) -> List[Tuple[str, tuple]]:
        return [(_HEAD_GROUPS[i] if i < len(_HEAD_GROUPS) else f'head_out{i}', tuple(out))
                for i, out in enumerate(outs)]

    def flatten(self, groups) -> Tuple[Tensor, ...]:
        """The flat output tuple of ``[(name, tensors), ...]``, remembered in ``groups``."""
        self.groups = [(name, len(tensors)) for name, tensors in groups]
        return tuple(t for _, tensors in groups for t in tensors)

    def output_names(self) -> List[str]:
        """One name per output tensor (``cls_score_0``, ...; ``seg_logits``)."""
        return [name if count == 1 and self.kind == 'segmentor' else f'{name}_{i}'
                for name, count in self.groups for i in range(count)]

    def describe(self) -> Dict[str, str]:
        """What the exporter records in the file's metadata (read by attach_backend)."""
        return {'mmrepvgg.part': self.kind, 'mmrepvgg.model': type(self.model).__name__,
                'mmrepvgg.groups': json.dumps(self.groups)}


def unflatten(outputs: Sequence[Tensor], groups: Sequence[Sequence]) -> List[List[Tensor]]:
    """Nest a flat list of outputs back into ``groups`` (``ExportedPart.groups``)."""
    total = sum(count for _, count in groups)
    if len(outputs) != total:
        raise ValueError(f'the network gave {len(outputs)} outputs, its groups '
                         f'{[tuple(g) for g in groups]} need {total}')
    nested, start = [], 0
    for _, count in groups:
        nested.append(list(outputs[start:start + count]))
        start += count
    return nested


def attach_backend(model: nn.Module, run: Callable[[Tensor], List[Tensor]],
                   kind: str, groups: Sequence[Sequence]) -> nn.Module:
    """Make ``model`` compute its exported part with ``run`` (e.g. an ONNX Runtime
    session) and everything after it in torch, with its own post-processing.

    The model's ``extract_feat`` calls ``run`` and hands the outputs to the head that
    would have made them: the decode head (segmentor) or the dense head (detectors), whose
    ``predict`` then decodes them as usual. A two-stage detector's RoI head gets the
    feature maps from the network too. ``model`` is changed in place and returned.
    """
    if kind == 'backbone':
        raise ValueError('a backbone-only export has no metric to evaluate: export the '
                         'model (--part model) to test it with a backend')
    head = {'segmentor': 'decode_head', 'single_stage': 'bbox_head',
            'two_stage': 'rpn_head'}.get(kind)
    if head is None or getattr(model, head, None) is None:
        raise ValueError(f'the exported network is a {kind} part; the config builds a '
                         f'{type(model).__name__}, which has no {head or kind}: export '
                         'from this config')
    outputs: Dict[str, list] = {}

    def extract_feat(inputs: Tensor):
        # NCHW memory, as the model's own layers give it: an AOTInductor package computes
        # in NHWC and returns that layout, which mmcv's ops (RoIAlign) would misread
        nested = [[t.to(inputs.device).contiguous() for t in group]
                  for group in unflatten(run(inputs), groups)]
        if kind == 'two_stage':
            feats, outputs['head'] = tuple(nested[0]), tuple(nested[1:])
            return feats
        outputs['head'] = nested[0][0] if kind == 'segmentor' else tuple(nested)
        return [inputs]  # the head below ignores its input: it returns the outputs

    def head_forward(*args, **kwargs):
        return outputs.pop('head')

    model.extract_feat = extract_feat
    getattr(model, head).forward = head_forward
    return model
