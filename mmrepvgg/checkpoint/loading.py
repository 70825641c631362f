"""Loading checkpoints safely on torch >= 2.6 (``weights_only=True`` by default).

Checkpoints written by mmengine's ``Runner`` carry a ``message_hub`` whose log
buffers (:class:`mmengine.logging.HistoryBuffer`) hold numpy arrays and numpy
scalars, and more that is not a tensor: numpy values in ``meta`` and
``dataset_meta``, OneCycleLR's annealing function in ``param_schedulers``. The
weights-only unpickler refuses those globals, so ``tools/test.py`` and
``resume=True`` fail with "Weights only load failed" even though the file is
our own. mmengine's ``CheckpointLoader`` calls ``torch.load`` without a
``weights_only`` argument, so the fix has to be an allowlist, not a flag.

:func:`allow_mmengine_checkpoint_types` registers exactly the globals such a
checkpoint needs, and nothing that can run arbitrary code. They were found by
saving real Runner checkpoints and loading them back until nothing was refused:
the message hub at iteration 0, mid-training and after validation (save_best),
every param scheduler mmengine, mmdet, mmseg and mmpretrain register, the EMA
models, AmpOptimWrapper's loss scaler (plain numbers), and the dataset_meta of
mmdet's and mmseg's datasets. Weights-only loading itself is never switched off.
"""
import importlib
import pickle
import re
from typing import Any, Callable, Dict, List, Tuple, Union

import numpy as np
import torch

__all__ = ['allow_mmengine_checkpoint_types', 'mmengine_checkpoint_safe_globals',
           'torch_load_safely', 'UnsafeCheckpointError']

SafeGlobal = Union[Callable, Tuple[Callable, str]]


# Pickle protocol 2 (torch.save's) writes a function that lives inside a class as
# ``getattr(Class, 'name')``: HistoryBuffer's class-level dict of statistic
# methods (``HistoryBuffer.mean``, ...) and OneCycleParamScheduler's
# ``anneal_func`` (a staticmethod) in its state dict. Allowing the real
# ``getattr`` would let a crafted file reach any attribute (``__globals__``,
# ``__builtins__``, ...), so ``builtins.getattr`` is bound to this function,
# which hands out only these names of these classes.
def _getattr_allowed() -> Dict[type, Tuple[str, ...]]:
    from mmengine.logging import HistoryBuffer
    from mmengine.optim import OneCycleParamScheduler
    return {HistoryBuffer: ('min', 'max', 'current', 'mean'),
            OneCycleParamScheduler: ('_annealing_cos', '_annealing_linear')}


def _restricted_getattr(obj: Any, name: str) -> Callable:
    allowed = _getattr_allowed()
    if isinstance(obj, type) and name in allowed.get(obj, ()):
        return getattr(obj, name)
    shown = '; '.join(f'{cls.__name__}.{{{", ".join(names)}}}'
                      for cls, names in allowed.items())
    raise pickle.UnpicklingError(
        f'refusing getattr({obj!r}, {name!r}): while loading a checkpoint only '
        f'{shown} may be looked up')


def _numpy_multiarray():
    # numpy 2 moved numpy.core to numpy._core; importing the old path there
    # warns, so import the one that matches the running numpy.
    major = int(np.__version__.split('.')[0])
    return importlib.import_module(
        'numpy._core.multiarray' if major >= 2 else 'numpy.core.multiarray')


def mmengine_checkpoint_safe_globals() -> List[SafeGlobal]:
    """The allowlist, with the reason for each entry.

    Names in a pickle are the module path of the numpy that *saved* the file,
    so the two numpy functions are registered under both the numpy 1.x
    (``numpy.core``) and the numpy 2.x (``numpy._core``) path. The dtype
    classes, on the other hand, are checked by type at load time, so the
    running numpy's classes are the right ones whatever saved the file.
    """
    multiarray = _numpy_multiarray()
    safe: List[SafeGlobal] = []
    for mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        # numpy scalars, e.g. the np.float64 'eta' in message_hub.runtime_info.
        safe.append((multiarray.scalar, f'{mod}.scalar'))
        # rebuilds the ndarrays inside HistoryBuffer (_log_history etc.).
        safe.append((multiarray._reconstruct, f'{mod}._reconstruct'))
    safe += [
        # the array type handed to _reconstruct and then BUILD-ed.
        np.ndarray,
        # called as numpy.dtype('f8', False, True) for every array/scalar dtype.
        np.dtype,
        # protocol 2 writes empty bytes as bytes() (non-empty ones as
        # _codecs.encode, which torch allows): the raw data of an empty array,
        # e.g. a HistoryBuffer() that has no values yet. bytes() only builds
        # data, as the builtins.bytearray torch allows by default does.
        bytes,
    ]
    # The instance numpy.dtype() returns is of a per-dtype class
    # (numpy.dtypes.Float64DType, ...), and its BUILD step checks that class:
    safe += [type(np.dtype(t)) for t in (
        # HistoryBuffer._log_history and the 'eta' scalar;
        np.float64,
        # HistoryBuffer._count_history (and integer logs);
        np.int64,
        # the same counts when numpy's default int is 32-bit (numpy 1.x on Windows);
        np.int32,
        # metric values kept in runtime_info, e.g. mmseg's mIoU stored as
        # 'best_score' by CheckpointHook(save_best=...);
        np.float32,
        # numpy values a dataset's metainfo (saved as meta['dataset_meta'] and
        # runtime_info['dataset_meta']), a hook's meta or a metric may carry:
        # np.bool_ flags, uint8 palettes and masks, the other fixed-size ints
        # and float16. Every one of these is plain data: a dtype class's BUILD
        # only sets byte order and flags.
        np.bool_, np.int8, np.int16, np.uint8, np.uint16, np.uint32, np.uint64,
        np.float16)]
    from mmengine.logging import HistoryBuffer
    from mmengine.optim import OneCycleParamScheduler
    safe += [
        # the values of message_hub['log_scalars'].
        HistoryBuffer,
        # the class whose staticmethod OneCycleLR's state dict holds as
        # 'anneal_func', looked up by the restricted getattr below. Calling it
        # runs only its argument checks (it needs a torch Optimizer, which a
        # weights-only file cannot hold); BUILD on one only fills __dict__.
        OneCycleParamScheduler,
        # getattr limited to those two classes' functions (_restricted_getattr).
        (_restricted_getattr, 'builtins.getattr'),
    ]
    return safe


def allow_mmengine_checkpoint_types() -> None:
    """Allowlist the globals of mmengine Runner checkpoints for weights_only.

    Idempotent: torch keeps the allowlist as a set, and re-adding here (rather
    than remembering a flag) also survives a ``clear_safe_globals()`` made by
    someone else.
    """
    torch.serialization.add_safe_globals(mmengine_checkpoint_safe_globals())


_UNSAFE_HINTS = ('Unsupported global', 'unrecognized function',
                 'Can only build', 'Can only create new object',
                 'refusing getattr', 'is blocked')


def _unpickler_reason(msg: str) -> str:
    # torch wraps the real reason in advice to retry with weights_only=False;
    # keep only the reason, that advice is exactly what we must not suggest.
    found = re.search(r'WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)',
                      msg, re.S)
    return (found.group(1) if found else msg).strip()


class UnsafeCheckpointError(ValueError):
    """A checkpoint needs a global outside the weights_only allowlist (never retried
    unsafely): the file may be untrusted, it is not broken."""


def torch_load_safely(path: str, label: str, map_location: Any = 'cpu') -> Any:
    """``torch.load(path, weights_only=True)`` with Runner checkpoints' types allowed.

    ``label`` names the file in errors (e.g. the URL it came from).

    Raises:
        UnsafeCheckpointError: the file needs a global that is not allowlisted.
        ValueError: the file is not a readable PyTorch checkpoint (truncated, corrupt,
            not a checkpoint at all).
    """
    allow_mmengine_checkpoint_types()
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # RuntimeError, UnpicklingError, EOFError, ...
        reason = _unpickler_reason(str(err))
        if any(hint in reason for hint in _UNSAFE_HINTS):
            found = re.search(r'GLOBAL (\S+)', reason)
            what = (f'the global {found.group(1)}' if found else
                    'an object outside the allowlist')
            raise UnsafeCheckpointError(
                f'refusing to load {label}: it needs {what}, which is not on '
                'the weights_only allowlist, so the file may come from an '
                'untrusted source. If you trust it, allowlist that global '
                'with torch.serialization.add_safe_globals([...]) and load '
                f'again. (torch: {reason})') from err
        raise ValueError(
            f'{label} is not a valid PyTorch checkpoint (unreadable or '
            f'corrupt): {type(err).__name__}: {reason[:300]}') from err

