"""Post-training INT8 quantization of an exported network (ONNX Runtime, QDQ format).

:func:`quantize_onnx` turns a file of ``tools/export.py`` into a static INT8 model:
QuantizeLinear/DequantizeLinear pairs around every quantizable op, int8 weights per
output channel, uint8 activations per tensor with ranges calibrated on real inputs.
ONNX Runtime fuses the pairs into integer kernels (QLinearConv); OpenVINO reads the same
file as an INT8 model. :func:`calibration_inputs` draws those inputs through the config's
own data pipeline and data preprocessor, so they are what ``tools/test.py --backend``
feeds the file.

Nothing half-written is ever left at the output path (temporary files, then rename).
"""
import contextlib
import io
import json
import os.path as osp
import shutil
import tempfile
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..fileio import staged_files
from .backends import QUANTIZATION_KEY, load_backend, read_onnx
from .export import torch_part_path

__all__ = ['METHODS', 'QUANTIZED_OPS', 'quantized_ops', 'calibration_inputs',
           'calibration_loader', 'read_images', 'quantize_onnx', 'sqnr_db']

#: Calibration methods: how the range of each activation tensor is chosen.
#: minmax: the observed extremes; percentile: the 99.999th percentile of |x| (clips rare
#: outliers); entropy: the range minimizing the KL divergence between the fp32 and the
#: quantized histograms.
METHODS = ('minmax', 'percentile', 'entropy')
#: Ops that only a quantized ONNX file holds.
QUANTIZED_OPS = frozenset({'QuantizeLinear', 'DequantizeLinear', 'DynamicQuantizeLinear',
                           'QLinearConv', 'QLinearMatMul', 'ConvInteger', 'MatMulInteger',
                           'QLinearAdd', 'QLinearMul', 'QGemm'})
#: What gets INT8: the compute ops and the data movement between them, which then stays
#: in int8. Not the index arithmetic (Gather/Add/Div/Where) torch's exporter writes for
#: adaptive pooling to bins that do not divide the feature map: measured on PSPNet A0
#: (128x256, random inputs), quantizing it too (ONNX Runtime's default) cost 6 dB of
#: output SQNR (36.9 vs 42.9) for no speed.
OP_TYPES = ('Conv', 'MatMul', 'Gemm', 'Resize', 'AveragePool', 'MaxPool', 'Concat')


def quantized_ops(proto) -> Dict[str, int]:
    """Op type -> count of the quantized ops in an ``onnx.ModelProto`` (empty: fp32)."""
    return dict(Counter(n.op_type for n in proto.graph.node if n.op_type in QUANTIZED_OPS))


def sqnr_db(reference: Sequence[Tensor], candidate: Sequence[Tensor]) -> float:
    """Signal-to-quantization-noise ratio in dB of ``candidate`` against ``reference``
    over all their tensors: 10 log10(sum ref^2 / sum (ref - cand)^2), in float64."""
    signal = sum(float(r.double().pow(2).sum()) for r in reference)
    noise = sum(float((r.double() - c.double()).pow(2).sum())
                for r, c in zip(reference, candidate, strict=True))
    if noise == 0:
        return float('inf')
    return 10 * float(np.log10(signal / noise)) if signal else float('-inf')


def _split_images(inputs: Tensor) -> List[Tensor]:
    return [inputs[i:i + 1] for i in range(inputs.shape[0])]


def calibration_loader(cfg, split: str):
    """The ``{split}_dataloader`` config, its images read through the test pipeline in
    dataset order: the inputs the exported file sees in tools/test.py."""
    import copy
    loader_cfg = cfg.get(f'{split}_dataloader')
    if not loader_cfg:
        raise ValueError(f'the config has no {split}_dataloader to draw calibration images '
                         'from; choose another split (train, val, test)')
    loader_cfg = copy.deepcopy(loader_cfg)
    if split != 'test':
        test_pipeline = (cfg.get('test_dataloader') or {}).get('dataset', {}).get('pipeline')
        if test_pipeline is None or 'pipeline' not in loader_cfg.get('dataset', {}):
            raise ValueError(f'cannot read the {split} images through the test pipeline: '
                             f'{split}_dataloader.dataset has no pipeline of its own (a '
                             'wrapped dataset?) or the config no test pipeline; use --split '
                             'test')
        loader_cfg.dataset.pipeline = test_pipeline
    loader_cfg.sampler = dict(type='DefaultSampler', shuffle=False)
    return loader_cfg


def calibration_inputs(cfg, num: int, split: str = 'test') -> List[Tensor]:
    """``num`` preprocessed images (1x3xHxW each), the first ones of the config's
    ``{split}_dataloader`` dataset, read through the test pipeline and the model's data
    preprocessor in test mode: what ``tools/test.py --backend`` feeds the file. ``split``
    ``train`` calibrates on training images, apart from the ones the metric is computed on.

    Raises:
        ValueError: the config has no such loader, its data cannot be loaded, or it holds
            fewer than ``num`` images.
    """
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope(cfg.get('default_scope') or 'mmengine')
    preprocessor = MODELS.build(cfg.model.data_preprocessor)
    return read_images(calibration_loader(cfg, split), preprocessor, num, split)


def read_images(loader_cfg, preprocessor, num: int, split: str = 'test') -> List[Tensor]:
    """The first ``num`` images of the dataloader config ``loader_cfg`` (see
    :func:`calibration_loader`), through ``preprocessor`` in test mode, 1x3xHxW each.
    ``split`` names the loader in errors."""
    from mmengine.runner import Runner
    if num < 1:
        raise ValueError(f'the calibration set needs at least 1 image, asked {num}')
    dataset = loader_cfg.get('dataset', {})
    where = (f'{split}_dataloader.dataset (type {dataset.get("type")}, data_root '
             f'{dataset.get("data_root")!r})')
    try:
        loader = Runner.build_dataloader(loader_cfg)
        size = len(loader.dataset)
    except Exception as err:  # noqa: BLE001 - missing files, bad annotations, ...
        raise ValueError(f'cannot load the calibration data from {where}: '
                         f'{type(err).__name__}: {str(err)[:300]}') from err
    if size < num:
        raise ValueError(f'asked for {num} calibration images, but {where} holds only '
                         f'{size}: pass --calib {size} or fewer, or another split')
    images: List[Tensor] = []
    was_training = preprocessor.training
    preprocessor.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                images += _split_images(preprocessor(batch, False)['inputs'].float())
                if len(images) >= num:
                    break
    except Exception as err:  # noqa: BLE001
        raise ValueError(f'cannot load the calibration data from {where}: '
                         f'{type(err).__name__}: {str(err)[:300]}') from err
    finally:
        preprocessor.train(was_training)
    return images[:num]


def _batches(images: Sequence[Tensor], input_shape: Sequence[Optional[int]],
             path: str) -> List[Tensor]:
    """Group single images into the file's batch size (1 for a dynamic batch axis)."""
    batch = input_shape[0] or 1
    if len(images) % batch:
        raise ValueError(f'{osp.basename(path)} takes batches of {batch}; give a '
                         f'calibration set of a multiple of {batch} images, not '
                         f'{len(images)}')
    return [torch.cat(list(images[i:i + batch])) for i in range(0, len(images), batch)]


def _reader(input_name: str, batches: Iterable[Tensor]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(batches)

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {
                input_name: np.ascontiguousarray(batch.numpy(), dtype=np.float32)}
    return Reader()


#: Histogram bins for entropy calibration. ONNX Runtime's quantize_static builds its
#: entropy calibrator with 128 bins for 128 quantized levels, which leaves one candidate
#: range, the observed extremes (minmax's); with 1024 the KL search has 448 to choose
#: from (TensorRT's 2048 doubles the search time for a finer step of the clip point).
ENTROPY_BINS = 1024


def _entropy_overrides(prepared: str, input_name: str, batches: Sequence[Tensor],
                       work: str) -> dict:
    """Per-tensor activation ranges by KL divergence, as quantize_static overrides."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator
    calibrator = create_calibrator(
        prepared, list(OP_TYPES), augmented_model_path=osp.join(work, 'augmented.onnx'),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options=dict(num_bins=ENTROPY_BINS, num_quantized_bins=128, symmetric=False))
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
        calibrator.collect_data(_reader(input_name, batches))
        ranges = calibrator.compute_data()
    overrides = {}
    for name, data in ranges.items():
        low, high = (np.asarray(v, dtype=np.float32) for v in data.range_value)
        overrides[name] = [dict(rmin=np.minimum(low, 0), rmax=np.maximum(high, 0))]
    return overrides


def _quantize_static(source: str, output: str, input_name: str, batches: Sequence[Tensor],
                     method: str, per_channel: bool, reduce_range: bool) -> None:
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    with tempfile.TemporaryDirectory(dir=osp.dirname(osp.abspath(output)),
                                     prefix='.mmrepvgg-quantize-') as work:
        # ONNX Runtime's recommended preparation: shape inference and constant folding,
        # so every tensor the quantizer meets has a known type and rank.
        prepared = osp.join(work, 'prepared.onnx')
        quant_pre_process(source, prepared, skip_symbolic_shape=True)
        extra = {}
        calibrate = (CalibrationMethod.Percentile if method == 'percentile'
                     else CalibrationMethod.MinMax)
        if method == 'entropy':  # ranges found here; quantize_static's own run is ignored
            extra['TensorQuantOverrides'] = _entropy_overrides(prepared, input_name,
                                                               batches, work)
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(prepared, output, _reader(input_name, batches),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=calibrate,
                            op_types_to_quantize=list(OP_TYPES), extra_options=extra)


def quantize_onnx(model: str, output: str, images: Sequence[Tensor], method: str = 'minmax',
                  per_channel: bool = True, reduce_range: bool = False,
                  info: Optional[dict] = None) -> dict:
    """Write the static INT8 (QDQ) form of the exported file ``model`` to ``output``,
    with activation ranges calibrated on ``images`` (1x3xHxW tensors, e.g. from
    :func:`calibration_inputs`) by ``method`` (one of :data:`METHODS`).

    ``per_channel``: one weight scale per output channel (default), else per tensor.
    ``reduce_range``: 7-bit weights, for CPUs without VNNI where ONNX Runtime's u8s8
    kernels can saturate. ``info`` is recorded in the file's metadata with the settings.
    A two-stage detector's torch-part weights are copied beside ``output``.

    Returns ``quantized_ops`` of the output, ``sqnr_db`` (its outputs against the fp32
    file's on the calibration images, in ONNX Runtime), ``calibration_images`` and
    ``torch_part`` (the copied weights file, or None).

    Raises:
        ValueError: ``model`` is not an exported fp32 file, is already quantized, the
            images do not fit it, or ``output`` is ``model`` or not ``.onnx``.
    """
    import onnx
    import onnxruntime
    if method not in METHODS:
        raise ValueError(f'unknown calibration method {method!r}; valid: {", ".join(METHODS)}')
    if not output.endswith('.onnx'):
        raise ValueError(f'OUTPUT must end with .onnx, got {output}')
    if osp.abspath(output) == osp.abspath(model):
        raise ValueError(f'OUTPUT is the input file {model}; write the INT8 model elsewhere')
    proto = read_onnx(model)
    already = quantized_ops(proto)
    if already:
        raise ValueError(f'{model} is already quantized (it holds '
                         f'{", ".join(f"{k} {v}" for k, v in already.items())}); quantize '
                         'the fp32 file tools/export.py wrote')
    metadata = {p.key: p.value for p in proto.metadata_props}
    del proto
    if 'mmrepvgg.part' not in metadata:
        raise ValueError(f'{model} was not written by tools/export.py (it lacks the metadata '
                         'that says which part of the model it holds); export it first')
    if not images:
        raise ValueError('no calibration images given')
    fp32 = load_backend(model, 'onnxruntime')
    for image in images:
        fp32.check_input(image.expand(fp32.input_shape[0] or 1, *image.shape[1:]))
    batches = _batches(images, fp32.input_shape, model)

    settings = dict(info or {}, toolkit=f'onnxruntime {onnxruntime.__version__}',
                    format='QDQ', method=method, calibration_images=len(images),
                    weights='int8 per channel' if per_channel else 'int8 per tensor',
                    activations='uint8 per tensor', reduce_range=reduce_range)
    side_src = metadata.get('mmrepvgg.torch_part')
    side = torch_part_path(output) if side_src else None
    with staged_files() as (stage, publish):
        onnx_tmp = stage(output, '.onnx')
        _quantize_static(model, onnx_tmp, fp32.input_name, batches, method, per_channel,
                         reduce_range)
        quantized = onnx.load(onnx_tmp)
        del quantized.metadata_props[:]
        for key, value in dict(metadata, **{QUANTIZATION_KEY: json.dumps(settings)}).items():
            if key == 'mmrepvgg.torch_part':
                value = osp.basename(side)
            entry = quantized.metadata_props.add()
            entry.key, entry.value = key, value
        ops = quantized_ops(quantized)
        onnx.save(quantized, onnx_tmp)
        del quantized
        if side:
            shutil.copyfile(osp.join(osp.dirname(osp.abspath(model)), side_src),
                            stage(side, '.pth'))
        int8 = load_backend(onnx_tmp, 'onnxruntime')
        reference, result = [], []
        for batch in batches:
            reference += fp32(batch)
            result += int8(batch)
        sqnr = sqnr_db(reference, result)
        publish(*([side] if side else []), output)
    return dict(quantized_ops=ops, sqnr_db=sqnr, calibration_images=len(images),
                torch_part=side, settings=settings)
