"""Run an exported network, torch tensors in and out: an ONNX file in ONNX Runtime or
OpenVINO, or an AOTInductor package (``aoti``, ``mmrepvgg.deploy.aoti``).

A runner takes one NCHW float32 batch and returns the file's outputs as a list of
float32 tensors, in the order the file declares them, so callers (``tools/test.py
--backend``, ``tools/benchmark.py``, the export's parity check) never touch the
backends' own APIs. All run on CPU.
"""
import os
import os.path as osp
from typing import Dict, List, Optional

import numpy as np
import torch

__all__ = ['BACKENDS', 'ONNX_BACKENDS', 'BACKEND_PRECISIONS', 'BackendRunner', 'load_backend',
           'read_onnx']

#: Backend names as the tools take them.
BACKENDS = ('onnxruntime', 'openvino', 'aoti')
#: Those that run ONNX files.
ONNX_BACKENDS = ('onnxruntime', 'openvino')
#: Arithmetic each backend can be asked for. ``bf16`` is OpenVINO's inference precision
#: hint: weights and activations in bfloat16 on CPUs with AVX512-BF16 or AMX, fp32 where
#: the CPU has neither.
BACKEND_PRECISIONS = {'onnxruntime': ('fp32',), 'openvino': ('fp32', 'bf16'), 'aoti': ('fp32',)}
_OPENVINO_PRECISION = {'fp32': 'f32', 'bf16': 'bf16'}
#: Metadata key tools/quantize.py records its settings under (JSON).
QUANTIZATION_KEY = 'mmrepvgg.quantization'


def read_onnx(path: str, load_weights: bool = False):
    """The ``onnx.ModelProto`` of ``path``, checked; a clear error when it is not ONNX."""
    import onnx
    if not osp.isfile(path):
        raise FileNotFoundError(f'ONNX file not found: {path}')
    try:
        model = onnx.load(path, load_external_data=load_weights)
    except Exception as err:  # DecodeError, google.protobuf errors, ...
        raise ValueError(f'{path} is not an ONNX model ({type(err).__name__}: '
                         f'{str(err)[:200]}); give a file written by tools/export.py') from err
    if not model.graph.node:
        raise ValueError(f'{path} is not an ONNX model (it holds no graph); give a file '
                         'written by tools/export.py')
    return model


def onednn_isa_without_bf16() -> Optional[str]:
    """The instruction set oneDNN is held to (``ONEDNN_MAX_CPU_ISA`` or its older name
    ``DNNL_MAX_CPU_ISA``) when it has no bf16 arithmetic, else None. OpenVINO's CPU plugin
    reads bf16 support from the CPU's flags, not from that cap, and then finds no bf16
    kernel to run: a bf16 request must ask for f32, as on a CPU of that ISA."""
    cap = os.environ.get('ONEDNN_MAX_CPU_ISA') or os.environ.get('DNNL_MAX_CPU_ISA')
    if not cap:
        return None
    name = cap.upper()
    if name == 'ALL' or 'BF16' in name or 'AMX' in name or name.startswith('AVX10'):
        return None
    return cap


def openvino_bf16_problem() -> Optional[str]:
    """Why OpenVINO computes a bf16 request in fp32 on this machine, or None (it can
    compute in bf16, or OpenVINO is not installed)."""
    cap = onednn_isa_without_bf16()
    if cap:
        return (f'oneDNN is held to {cap} (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA), which '
                'has no bf16 arithmetic')
    try:
        import openvino
        capabilities = openvino.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES')
    except Exception:  # noqa: BLE001  (not installed: loading a file says so)
        return None
    if 'BF16' in capabilities:
        return None
    return (f'OpenVINO lists no BF16 among this CPU\'s capabilities '
            f'({", ".join(capabilities)})')


class BackendRunner:
    """A compiled ONNX model: ``runner(x)`` -> list of output tensors.

    Attributes:
        backend, precision, path: what runs; ``precision_used``: what the backend
            actually computes in (OpenVINO runs bf16 requests in fp32 on CPUs without
            bfloat16 instructions).
        input_name, output_names: the file's tensor names.
        input_shape: the declared input shape, ``None`` for a dynamic axis.
        metadata: the file's metadata properties (``tools/export.py`` records what was
            exported there).
        quantized: the file is an INT8 model of ``tools/quantize.py`` (it runs in int8
            whatever ``precision`` says, which then applies to the ops left in float).
    """

    def __init__(self, path: str, backend: str, precision: str = 'fp32',
                 threads: Optional[int] = None):
        if backend not in ONNX_BACKENDS:
            raise ValueError(f'unknown ONNX backend {backend!r}; valid: '
                             f'{", ".join(ONNX_BACKENDS)}')
        if precision not in BACKEND_PRECISIONS[backend]:
            raise ValueError(f'{backend} runs {", ".join(BACKEND_PRECISIONS[backend])}, not '
                             f'{precision!r}')
        proto = read_onnx(path)
        inputs = [i for i in proto.graph.input
                  if i.name not in {t.name for t in proto.graph.initializer}]
        if len(inputs) != 1:
            raise ValueError(f'{path} takes {len(inputs)} inputs; an exported network takes '
                             'one image batch')
        dims = inputs[0].type.tensor_type.shape.dim
        self.input_shape = [d.dim_value if d.HasField('dim_value') else None for d in dims]
        self.input_name = inputs[0].name
        self.output_names = [o.name for o in proto.graph.output]
        self.metadata: Dict[str, str] = {p.key: p.value for p in proto.metadata_props}
        self.quantized = QUANTIZATION_KEY in self.metadata
        self.path, self.backend, self.precision = path, backend, precision
        self.threads = threads
        #: the arithmetic the backend chose (OpenVINO may run a bf16 request in fp32)
        self.precision_used = precision
        del proto
        self._run = (self._load_onnxruntime if backend == 'onnxruntime'
                     else self._load_openvino)(path, precision, threads)

    def _load_onnxruntime(self, path, precision, threads):
        import onnxruntime as ort
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])

        def run(array):
            return session.run(self.output_names, {self.input_name: array})
        return run

    def _load_openvino(self, path, precision, threads):
        import openvino as ov
        if precision == 'bf16' and onednn_isa_without_bf16():
            precision = 'fp32'  # what OpenVINO would pick on a CPU with that ISA
        config = {'INFERENCE_PRECISION_HINT': _OPENVINO_PRECISION[precision]}
        if threads:
            config['INFERENCE_NUM_THREADS'] = threads
        compiled = ov.Core().compile_model(path, 'CPU', config)
        # A CPU without bfloat16 support runs a bf16 request in f32: say what ran.
        ran = compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()
        self.precision_used = {value: key for key, value in
                               _OPENVINO_PRECISION.items()}.get(ran, ran)
        request = compiled.create_infer_request()
        outputs = compiled.outputs

        def run(array):
            result = request.infer({0: array})
            return [result[o] for o in outputs]
        return run

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` when ``x`` does not fit the file's declared input."""
        fixed = [d for d in self.input_shape]
        if len(fixed) != x.dim() or any(d is not None and d != s
                                        for d, s in zip(fixed, x.shape)):
            shown = 'x'.join('?' if d is None else str(d) for d in fixed)
            raise ValueError(
                f'{osp.basename(self.path)} takes inputs of shape {shown}, got '
                f'{"x".join(map(str, x.shape))}: export again with --dynamic, or with '
                '--batch/--shape matching this data')

    def __call__(self, x: torch.Tensor) -> List[torch.Tensor]:
        self.check_input(x)
        array = np.ascontiguousarray(x.detach().to('cpu', torch.float32).numpy())
        return [torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in self._run(array)]

    def __repr__(self) -> str:
        return (f'BackendRunner({osp.basename(self.path)!r}, backend={self.backend!r}, '
                f'precision={self.precision!r})')


def load_backend(path: str, backend: str = 'onnxruntime', precision: str = 'fp32',
                 threads: Optional[int] = None):
    """Load ``path`` for ``backend`` on CPU: an ONNX file compiled by ONNX Runtime or
    OpenVINO (:class:`BackendRunner`), or an AOTInductor package for ``'aoti'``
    (:class:`mmrepvgg.deploy.aoti.PackageRunner`).

    ``threads`` caps the backend's intra-op threads (default: the backend's own choice,
    usually one per physical core; for ``aoti``, torch's).
    """
    if backend == 'aoti':
        from .aoti import PackageRunner
        return PackageRunner(path, precision, threads)
    if backend not in BACKENDS:
        raise ValueError(f'unknown backend {backend!r}; valid: {", ".join(BACKENDS)}')
    return BackendRunner(os.fspath(path), backend, precision, threads)
