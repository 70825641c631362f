"""An MMLab model whose exported network runs in ONNX Runtime, OpenVINO or from an
AOTInductor package, or in torch with an inference recipe.

``tools/test.py CONFIG MODEL.onnx --backend B`` (``MODEL.pt2 --backend aoti``) builds the
config's model as usual, then :func:`use_backend` replaces its exported part by the file
(``parts.attach_backend``) and loads the weights of the Python part from beside it. The
runner, the data pipeline and the evaluator stay the config's own, so every format is
scored by the same metric. :func:`use_recipe` does the same with the network kept in
torch and prepared by ``optimize_for_inference`` (``tools/test.py --deploy --mode M``).
"""
import copy
import json
import os.path as osp
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.inference import optimize_for_inference
from .backends import load_backend
from .parts import ExportedPart, attach_backend

__all__ = ['use_backend', 'use_recipe']


def _load_torch_part(model: nn.Module, runner) -> None:
    name = runner.metadata.get('mmrepvgg.torch_part')
    if not name:
        return
    from ..checkpoint.fetch import load_file
    from ..fileio import sha256_file
    path = osp.join(osp.dirname(osp.abspath(runner.path)), name)
    if not osp.isfile(path):
        raise FileNotFoundError(
            f'{osp.basename(runner.path)} needs the weights of the part that runs in '
            f'torch (e.g. the RoI head), written beside it by tools/export.py as {name}; '
            f'it is not at {path}')
    if sha256_file(path) != runner.metadata.get('mmrepvgg.torch_part_sha256'):
        raise ValueError(f'{path} is not the file exported with {runner.path} (its '
                         'checksum differs): export again')
    state = load_file(path)['state_dict']
    own = model.state_dict()
    missing = sorted(k for k in state if k not in own)
    wrong = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    if missing or wrong:
        shown = ', '.join((missing + wrong)[:5])
        raise ValueError(f'{name} does not match the config\'s model ({len(missing)} keys '
                         f'it lacks, {len(wrong)} of another shape: {shown}): test with the '
                         'config the file was exported from')
    model.load_state_dict(state, strict=False)


@torch.no_grad()
def _check_matches(model: nn.Module, kind: str, runner) -> None:
    """The file and the config's model must give outputs of the same number and shapes."""
    shape = [d if d is not None else default
             for d, default in zip(runner.input_shape, (1, 3, 64, 64))]
    probe = torch.zeros(*shape)
    part = ExportedPart(model, 'backbone' if kind == 'backbone' else 'model')
    if part.kind != kind:
        raise ValueError(f'{osp.basename(runner.path)} holds a {kind} network; the config '
                         f'builds a {part.kind} ({type(model).__name__}): test with the '
                         'config it was exported from')
    device = next(model.parameters()).device
    expected = [tuple(t.shape) for t in part(probe.to(device))]
    got = [tuple(t.shape) for t in runner(probe)]
    if expected != got:
        raise ValueError(
            f'{osp.basename(runner.path)} does not match the config\'s model: on a '
            f'{"x".join(map(str, shape))} input it gives outputs {got}, the config\'s model '
            f'{expected}. Test with the config it was exported from')


def use_backend(model: nn.Module, path: str, backend: str = 'onnxruntime',
                precision: str = 'fp32', threads: Optional[int] = None):
    """Make ``model`` (built from the config the file was exported from) run the exported
    network of ``path`` in ``backend``; the rest stays in torch. ``model`` is changed in
    place; returns the backend runner (its ``precision_used`` says what runs).

    Raises:
        FileNotFoundError: ``path``, or the torch-part weights it names, is missing.
        ValueError: ``path`` is not ONNX, or it does not match the config's model.
    """
    runner = load_backend(path, backend, precision, threads)
    kind = runner.metadata.get('mmrepvgg.part')
    groups = runner.metadata.get('mmrepvgg.groups')
    if kind is None or groups is None:
        raise ValueError(f'{path} was not written by tools/export.py (it lacks the '
                         'metadata that says which part of the model it holds); export it '
                         'with tools/export.py CONFIG CHECKPOINT OUTPUT.onnx')
    model.eval()
    _check_matches(model, kind, runner)
    _load_torch_part(model, runner)
    attach_backend(model, runner, kind, json.loads(groups))
    return runner


@torch.no_grad()
def use_recipe(model: nn.Module, example_input: Tensor, mode: str = 'eager',
               precision: str = 'fp32'):
    """Make ``model`` compute the part ``tools/export.py`` would export with a copy of it
    prepared by ``optimize_for_inference(copy, example_input, mode=..., precision=...)``
    (prepared now, for ``example_input``'s shape); its outputs come back in float32 to
    the model's own post-processing, as a backend's do. ``model`` is changed in place;
    returns the :class:`mmrepvgg.ops.InferenceRunner`."""
    model.eval()
    part = ExportedPart(model)
    device = next(model.parameters()).device
    part(example_input.to(device))  # in fp32: how the outputs nest (part.groups)
    # a copy: the recipe casts and re-lays out its module, the torch rest stays fp32
    runner = optimize_for_inference(ExportedPart(copy.deepcopy(model)), example_input,
                                    device, mode, precision)

    def run(inputs: Tensor):
        return [t.float() for t in runner(inputs)]

    attach_backend(model, run, part.kind, part.groups)
    return runner
