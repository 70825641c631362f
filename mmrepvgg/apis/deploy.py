"""Export and quantize a config's fused network as ``tools/export.py`` and
``tools/quantize.py`` do: the input size taken from the config's test pipeline (the
``--mini`` one with ``mini``), the request checked, tool errors as one message; the
command-line options the two tools share."""
import argparse
import os.path as osp
import tempfile
from typing import Optional, Sequence, Union

from mmengine.config import DictAction

from ..deploy.export import FORMATS, config_input_shape, export_model
from ..deploy.onnx_export import DEFAULT_OPSET, ExportFailure
from ..deploy.parts import PARTS
from ..deploy.quantize import calibration_inputs, quantize_onnx
from ..errors import InputError, UsageError
from ..qat import export_qat, is_qat_state
from ..ops.winograd import TILES
from .config import load_config, scope_of

__all__ = ['DEFAULT_CALIB', 'EXPORT_OPTIONS', 'add_export_option', 'export', 'quantize',
           'winograd_tile']

#: Calibration images tools/quantize.py takes by default.
DEFAULT_CALIB = 32

#: How tools/export.py and tools/quantize.py parse the options they share: a checkpoint
#: given to tools/quantize.py is exported as tools/export.py exports it, so both read
#: these alike. Each tool gives its own help where its wording differs.
EXPORT_OPTIONS = {
    '--shape': dict(nargs=2, type=int, metavar=('H', 'W')),
    '--dynamic': dict(action='store_true'),
    '--part': dict(choices=PARTS, default='model'),
    '--cfg-options': dict(nargs='+', action=DictAction,
                          help='override config entries, as in tools/test.py'),
    '--mini': dict(action='store_true'),
}


def add_export_option(parser: argparse.ArgumentParser, flag: str, **kwargs) -> None:
    """Add ``flag``, one of :data:`EXPORT_OPTIONS`, to ``parser`` as the tools parse it;
    ``kwargs`` (its ``help``) go to ``add_argument`` as well."""
    parser.add_argument(flag, **{**EXPORT_OPTIONS[flag], **kwargs})


def winograd_tile(value: Optional[str]) -> Union[None, str, int]:
    """``--winograd``'s value: None (direct convs), 'auto' or one of :data:`TILES`."""
    if value is None or value == 'auto':
        return value
    if not str(value).isdigit() or int(value) not in TILES:
        raise UsageError(f'--winograd takes a tile of {", ".join(map(str, TILES))} or '
                         f'auto, got {value!r}')
    return int(value)


def _input_shape(cfg, shape: Optional[Sequence[int]]) -> Sequence[int]:
    shape = shape or config_input_shape(cfg)
    if shape is None:
        raise UsageError('the config\'s test pipeline gives no image size: pass --shape H W')
    return shape


def export(config: str, checkpoint: str, output: str, format: str = 'onnx',
           winograd: Optional[str] = None, shape: Optional[Sequence[int]] = None,
           batch: int = 1, dynamic: bool = False, opset: int = DEFAULT_OPSET,
           part: str = 'model', check: bool = True, cfg_options: Optional[dict] = None,
           mini: bool = False) -> dict:
    """Write ``output`` (see :func:`mmrepvgg.deploy.export_model`); returns its report,
    with ``shape`` the input size used."""
    suffix = FORMATS[format]
    if not output.endswith(suffix):
        raise UsageError(f'OUTPUT of --format {format} must end with {suffix}, got {output}')
    tile = winograd_tile(winograd)
    shape = _input_shape(load_config(config, cfg_options=cfg_options, mini=mini), shape)
    try:
        loaded = _read_checkpoint(checkpoint)
        if loaded is not None and is_qat_state(loaded[1]):
            if format != 'onnx' or tile is not None or part != 'model':
                raise UsageError('a QAT checkpoint exports as an INT8 ONNX file of the '
                                 'whole model: drop --format, --winograd and --part')
            report = export_qat(config, loaded[1], output, shape, batch, dynamic, opset,
                                cfg_options, check, source=osp.basename(checkpoint))
        else:
            report = export_model(config, checkpoint, output, shape, batch, dynamic, opset,
                                  part, cfg_options, check=check, format=format,
                                  winograd=tile, loaded=loaded)
    except (OSError, ValueError, KeyError, ExportFailure) as err:
        raise InputError(f'error: {err}') from err
    report['shape'] = list(shape)
    return report


def _read_checkpoint(checkpoint: str) -> Optional[tuple]:
    """``fetch_and_load(checkpoint)``, read once for whichever export it turns out to
    need; None for an exported file (export_model says what is wrong with it)."""
    from ..checkpoint.fetch import fetch_and_load
    if checkpoint.endswith(tuple(FORMATS.values())):
        return None
    return fetch_and_load(checkpoint)


def quantize(config: str, model: str, output: str, calib: int = DEFAULT_CALIB,
             method: str = 'minmax',
             split: str = 'test', per_channel: bool = True, reduce_range: bool = False,
             part: str = 'model', dynamic: bool = False,
             shape: Optional[Sequence[int]] = None, cfg_options: Optional[dict] = None,
             mini: bool = False, log=print) -> dict:
    """Quantize ``model`` (an fp32 ONNX file, or a checkpoint exported first to a
    temporary folder beside ``output``; a detector always with dynamic sizes) to a
    static INT8 ``output`` calibrated on ``calib`` images of ``split``. Returns the
    report of :func:`mmrepvgg.deploy.quantize_onnx` plus ``images`` (how many, their
    size)."""
    cfg = load_config(config, cfg_options=cfg_options, mini=mini)
    info = dict(config=osp.basename(config), split=split)
    try:
        images = calibration_inputs(cfg, calib, split)
        if model.endswith('.onnx'):
            report = quantize_onnx(model, output, images, method, per_channel=per_channel,
                                   reduce_range=reduce_range, info=info)
        else:
            shape = _input_shape(cfg, shape)
            with tempfile.TemporaryDirectory(dir=osp.dirname(osp.abspath(output)),
                                             prefix='.export-') as folder:
                onnx_file = osp.join(folder, 'fp32.onnx')
                # a detector's test images differ in size: its export takes any size
                dynamic = dynamic or scope_of(cfg) == 'mmdet'
                export_model(config, model, onnx_file, shape, 1, dynamic, part=part,
                             cfg_options=cfg_options)
                log(f'[quantize] exported {model} ({part}, input 1x3x{shape[0]}x{shape[1]}'
                    f'{", dynamic" if dynamic else ""}) to quantize it')
                report = quantize_onnx(onnx_file, output, images, method,
                                       per_channel=per_channel, reduce_range=reduce_range,
                                       info=info)
    except (OSError, ValueError, ExportFailure) as err:
        raise InputError(f'error: {err}') from err
    report['images'] = dict(count=len(images), size='x'.join(map(str, images[0].shape[1:])))
    return report
