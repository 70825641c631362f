"""How a trained model survives INT8 (``tools/quantization_report.py``): the metric of
every form through the config's own evaluator (post-training INT8 and, given one, the
quantization-aware fine-tune), their speed in one interleaved run, feature SQNR of the
INT8 backbone, and the spread of each fused kernel."""
import os
import os.path as osp
from typing import Dict, Optional, Sequence

import torch

from ..apis.config import load_config, scope_of
from ..apis.deploy import export
from ..apis.runner import test
from ..convert import load_fused_model
from ..deploy.backends import load_backend
from ..deploy.quantize import METHODS, calibration_inputs, quantize_onnx, sqnr_db
from ..models.rep_block import RepVGGBlock

__all__ = ['quantization_study', 'time_files', 'weight_ranges']


def weight_ranges(backbone: torch.nn.Module) -> list:
    """(block name, max |w| / std) of each fused conv kernel of a RepVGG backbone."""
    rows = []
    for name, block in backbone.named_modules():
        if isinstance(block, RepVGGBlock) and block.fused is not None:
            kernel = block.fused.weight.detach().double()
            rows.append((name, float(kernel.abs().max() / kernel.std())))
    return rows


def time_files(files: Dict[str, str], backends: Sequence[str], image: torch.Tensor,
               repeats: int = 20, warmup: int = 3) -> Dict[str, Optional[float]]:
    """Median ms of one call on ``image`` of each ONNX file (name -> path) in each
    backend, all timed in one interleaved run (``'{backend} {name}'`` -> ms; None for a
    file that failed to load or run)."""
    from .timing import Candidate, benchmark_interleaved

    def setup(path, backend):
        runner = load_backend(path, backend)
        return lambda: runner(image)
    candidates = [Candidate(f'{backend} {name}', lambda p=path, b=backend: setup(p, b))
                  for name, path in files.items() for backend in backends]
    benchmark_interleaved(candidates, 'cpu', repeats=repeats, warmup=warmup,
                          measure_memory=False)
    return {c.name: c.stats()['median'] * 1e3 if c.times else None for c in candidates}


def quantization_study(config: str, checkpoint: str, work_dir: str, calib: int = 16,
                       split: str = 'train', methods: Sequence[str] = METHODS,
                       backends: Sequence[str] = ('onnxruntime',), sqnr_images: int = 8,
                       mini: bool = False, cfg_options: Optional[dict] = None,
                       qat: Optional[str] = None, repeats: int = 20) -> dict:
    """For one trained ``checkpoint``: the metric of the training form in torch, the fused
    form (``--deploy``), the fused fp32 ONNX file and its INT8 forms (one per calibration
    method and backend); the SQNR (dB) of the INT8 backbone's stage outputs against fp32
    on ``sqnr_images`` test images; max |w| / std per fused backbone conv. With ``qat``
    (a QAT checkpoint fine-tuned from ``checkpoint``) also its fake-quantized metric in
    torch and its INT8 file's in each backend. ``timing``: ms per test image of the fp32
    file and each INT8 file in each backend, one interleaved run of ``repeats``. Files and
    logs go under ``work_dir``."""
    os.makedirs(work_dir, exist_ok=True)
    work = lambda *names: osp.join(work_dir, *names)  # noqa: E731

    def evaluate(path, name, **kwargs):
        metrics = test(config, path, work_dir=work('logs', name), cfg_options=cfg_options,
                       mini=mini, **kwargs)
        return {k: float(v) for k, v in metrics.items()}

    results = dict(config=config, checkpoint=checkpoint, calib=calib, split=split,
                   metrics={}, sqnr_db={}, weight_ranges=[])
    metrics = results['metrics']
    metrics['torch fp32'] = evaluate(checkpoint, 'torch')
    metrics['torch fused fp32'] = evaluate(checkpoint, 'deploy', deploy=True)
    cfg = load_config(config, cfg_options=cfg_options, mini=mini)
    dynamic = scope_of(cfg) == 'mmdet'  # a detector's test images differ in size
    export(config, checkpoint, work('model.onnx'), dynamic=dynamic, cfg_options=cfg_options,
           mini=mini)
    export(config, checkpoint, work('backbone.onnx'), part='backbone',
           cfg_options=cfg_options, mini=mini)
    for backend in backends:
        metrics[f'{backend} fp32'] = evaluate(work('model.onnx'), f'{backend}_fp32',
                                              backend=backend)

    calib_images = calibration_inputs(cfg, calib, split)
    probe = calibration_inputs(cfg, sqnr_images, 'test')
    fp32_backbone = load_backend(work('backbone.onnx'))
    reference = [fp32_backbone(x) for x in probe]
    for method in methods:
        int8_file = work(f'model_int8_{method}.onnx')
        quantize_onnx(work('model.onnx'), int8_file, calib_images, method)
        for backend in backends:
            metrics[f'{backend} int8 {method}'] = evaluate(int8_file, f'{backend}_{method}',
                                                           backend=backend)
        backbone_file = work(f'backbone_int8_{method}.onnx')
        quantize_onnx(work('backbone.onnx'), backbone_file, calib_images, method)
        int8_backbone = load_backend(backbone_file)
        quantized = [int8_backbone(x) for x in probe]
        stages = len(reference[0])
        results['sqnr_db'][method] = dict(
            {f'stage {i + 1 + 4 - stages}': sqnr_db([r[i] for r in reference],
                                                    [q[i] for q in quantized])
             for i in range(stages)},
            all=sqnr_db([t for r in reference for t in r], [t for q in quantized for t in q]))

    files = {'fp32': work('model.onnx')}
    files.update({f'int8 {m}': work(f'model_int8_{m}.onnx') for m in methods})
    if qat:
        metrics['torch qat (fake-quantized)'] = evaluate(qat, 'qat_torch')
        export(config, qat, work('model_int8_qat.onnx'), dynamic=dynamic,
               cfg_options=cfg_options, mini=mini)
        files['int8 qat'] = work('model_int8_qat.onnx')
        for backend in backends:
            metrics[f'{backend} int8 qat'] = evaluate(work('model_int8_qat.onnx'),
                                                      f'{backend}_qat', backend=backend)
    results['timing'] = time_files(files, backends, probe[0], repeats)

    _, model, _ = load_fused_model(config, checkpoint, cfg_options)
    results['weight_ranges'] = weight_ranges(model.backbone)
    return results
