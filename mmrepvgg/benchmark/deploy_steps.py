"""The tool runs that write each deployable form of a config's fused model and score it
with the config's own metric: ``tools/export.py``, ``tools/quantize.py`` and
``tools/test.py``. One description serves both uses: printed as the command lines a user
runs, and run in this process through the ``mmrepvgg.apis`` functions behind the tools
(``benchmark.py --recommend --metric``), so what is scored is what the commands do."""
import json
import os.path as osp
import shlex
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from .models import BACKEND_MODES, QAT_MODES

__all__ = ['CHECKPOINT', 'QAT_CHECKPOINT', 'Step', 'form_steps', 'form_commands', 'run_steps']

#: Where the user's checkpoint goes among a step's files, and their QAT fine-tune of it.
CHECKPOINT = 'CHECKPOINT'
QAT_CHECKPOINT = 'QAT_CHECKPOINT'


@dataclass(frozen=True)
class Step:
    """``python tools/{tool}.py CONFIG *files --options``: ``files`` are CHECKPOINT or
    files an earlier step writes; ``options`` are ``(keyword, value)`` pairs of the
    ``mmrepvgg.apis`` function of the tool, whose flags have the same names."""
    tool: str
    files: Tuple[str, ...]
    options: Tuple[Tuple[str, Any], ...] = ()


def form_steps(mode: str, precision: str, shape: Sequence[int],
               calib: Optional[int] = None) -> List[Step]:
    """The steps that write the form (benchmark mode, precision) of ``--recommend`` at
    input ``shape`` and test it; a torch form has nothing to write. ``calib``: the
    calibration images of an INT8 form, where the tool's default is too many."""
    if mode == 'winograd-aoti':
        package = 'model.pt2'
        return [Step('export', (CHECKPOINT, package),
                     (('format', 'aoti'), ('winograd', 'auto'), ('shape', tuple(shape)))),
                Step('test', (package,), (('backend', 'aoti'),))]
    if mode in QAT_MODES:
        return [Step('export', (QAT_CHECKPOINT, 'model_qat.onnx')),
                Step('test', ('model_qat.onnx',), (('backend', BACKEND_MODES[mode][0]),))]
    if mode in BACKEND_MODES:
        backend = BACKEND_MODES[mode][0]
        steps, onnx = [Step('export', (CHECKPOINT, 'model.onnx'))], 'model.onnx'
        if precision == 'int8':
            steps.append(Step('quantize', (onnx, 'model_int8.onnx'),
                              (('calib', calib),) if calib else ()))
            onnx = 'model_int8.onnx'
        arithmetic = (('precision', precision),) if precision == 'bf16' else ()
        return steps + [Step('test', (onnx,), (('backend', backend),) + arithmetic)]
    recipe = (() if mode == 'eager' else (('mode', mode),)) + (
        () if precision == 'fp32' else (('precision', precision),))
    return [Step('test', (CHECKPOINT,), (('deploy', True),) + recipe)]


def _flag(name: str, value: Any) -> str:
    flag = '--' + name.replace('_', '-')
    if value is True:
        return flag
    if isinstance(value, (list, tuple)):
        return f'{flag} {" ".join(map(str, value))}'
    return f'{flag} {value}'


def _option_text(cfg_options: Optional[dict]) -> str:
    """``cfg_options`` back as the ``--cfg-options`` of a command line."""
    if not cfg_options:
        return ''
    pairs = [f'{k}={json.dumps(v, separators=(",", ":")) if isinstance(v, (list, tuple)) else v}'
             for k, v in cfg_options.items()]
    return ' --cfg-options ' + ' '.join(shlex.quote(p) for p in pairs)


def _files(step: Step, checkpoint: str, qat: Optional[str]) -> List[str]:
    names = {CHECKPOINT: checkpoint, QAT_CHECKPOINT: qat or QAT_CHECKPOINT}
    return [names.get(f, f) for f in step.files]


def form_commands(steps: Sequence[Step], config: str, checkpoint: str, mini: bool,
                  cfg_options: Optional[dict], qat: Optional[str] = None) -> List[str]:
    """``steps`` as command lines, with ``--mini`` and ``--cfg-options`` as given
    (``qat``: the QAT checkpoint the *-qat forms export)."""
    tail = (' --mini' if mini else '') + _option_text(cfg_options)
    commands = []
    for step in steps:
        files = _files(step, checkpoint, qat)
        words = [f'python tools/{step.tool}.py', *map(shlex.quote, [config, *files]),
                 *(_flag(k, v) for k, v in step.options)]
        commands.append(' '.join(words) + tail)
    return commands


def run_steps(steps: Sequence[Step], config: str, checkpoint: str, folder: str,
              done: Set[Step], cfg_options: Optional[dict] = None,
              mini: bool = False, qat: Optional[str] = None) -> Dict[str, Any]:
    """Run ``steps`` in this process, their files in ``folder``; a step in ``done`` (run
    for an earlier form: the same export, the same quantization) is not run again.
    Returns the metrics of the last step, the test. The test runs log warnings only
    (their progress would bury the caller's), each under a name of its own (mmengine
    keeps one logger per experiment name)."""
    from ..apis.deploy import export, quantize
    from ..apis.runner import test
    tools = {'export': export, 'quantize': quantize, 'test': test}
    result: Dict[str, Any] = {}
    for step in steps:
        if step in done:
            continue
        files = [f if f in (checkpoint, qat) else osp.join(folder, f)
                 for f in _files(step, checkpoint, qat)]
        kwargs = dict(step.options, cfg_options=cfg_options, mini=mini)
        if step.tool == 'test':
            kwargs.update(work_dir=folder, cfg_options=dict(
                cfg_options or {}, log_level='WARNING',
                experiment_name=f'recommend_{uuid.uuid4().hex[:8]}'))
        result = tools[step.tool](config, *files, **kwargs)
        done.add(step)
    return result
