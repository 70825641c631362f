"""Loading checkpoints safely on torch >= 2.6 (``weights_only=True`` by default).

Checkpoints written by mmengine's ``Runner`` carry a ``message_hub`` whose log
buffers (:class:`mmengine.logging.HistoryBuffer`) hold numpy arrays and numpy
scalars. The weights-only unpickler refuses those globals, so ``tools/test.py``
and ``resume=True`` fail with "Weights only load failed" even though the file
is our own. mmengine's ``CheckpointLoader`` calls ``torch.load`` without a
``weights_only`` argument, so the fix has to be an allowlist, not a flag.

:func:`allow_mmengine_checkpoint_types` registers exactly the globals such a
checkpoint needs (found by saving real Runner checkpoints and loading them
back until nothing was refused), and nothing that can run arbitrary code.
Weights-only loading itself is never switched off.
"""
import importlib
import os
import pickle
import re
from typing import Any, Callable, List, Tuple, Union

import numpy as np
import torch

__all__ = ['allow_mmengine_checkpoint_types', 'mmengine_checkpoint_safe_globals',
           'load_file']

SafeGlobal = Union[Callable, Tuple[Callable, str]]

# HistoryBuffer pickles its class-level dict of statistic methods; with pickle
# protocol 2 a method such as ``HistoryBuffer.mean`` is written as
# ``getattr(HistoryBuffer, 'mean')``. Allowing the real ``getattr`` would let a
# crafted file reach any attribute (``__globals__``, ``__builtins__``, ...), so
# ``builtins.getattr`` is bound to this function, which only hands out those
# four methods.
_HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')


def _history_buffer_statistic(obj: Any, name: str) -> Callable:
    from mmengine.logging import HistoryBuffer
    if obj is HistoryBuffer and name in _HISTORY_BUFFER_STATISTICS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'refusing getattr({obj!r}, {name!r}): only the HistoryBuffer '
        f'statistics {_HISTORY_BUFFER_STATISTICS} may be looked up while '
        'loading a checkpoint')


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
        # the instance numpy.dtype() returns is of a per-dtype class
        # (numpy.dtypes.Float64DType), and its BUILD step checks that class:
        # float64: HistoryBuffer._log_history and the 'eta' scalar;
        # int64: HistoryBuffer._count_history (and integer logs);
        # int32: the same counts when numpy's default int is 32-bit
        #        (numpy 1.x on Windows);
        # float32: metric values kept in runtime_info, e.g. mmseg's mIoU
        #          stored as 'best_score' by CheckpointHook(save_best=...).
        type(np.dtype(np.float64)),
        type(np.dtype(np.int64)),
        type(np.dtype(np.int32)),
        type(np.dtype(np.float32)),
    ]
    try:
        from mmengine.logging import HistoryBuffer
    except ImportError:  # pragma: no cover - mmengine is a hard dependency
        return safe
    # the values of message_hub['log_scalars'], plus the restricted getattr
    # its pickled statistics dict needs (see _history_buffer_statistic).
    safe += [HistoryBuffer, (_history_buffer_statistic, 'builtins.getattr')]
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


def load_file(path: Union[str, os.PathLike],
              map_location: Any = 'cpu') -> Any:
    """``torch.load(path, weights_only=True)`` with clear errors.

    The mmengine allowlist is (re-)registered first, so Runner checkpoints
    load; anything else outside torch's own allowlist is refused.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a valid PyTorch checkpoint, or it needs a
            global that is not allowlisted (never retried unsafely).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    allow_mmengine_checkpoint_types()
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # RuntimeError, UnpicklingError, EOFError, ...
        reason = _unpickler_reason(str(err))
        if any(hint in reason for hint in _UNSAFE_HINTS):
            found = re.search(r'GLOBAL (\S+)', reason)
            what = (f'the global {found.group(1)}' if found else
                    'an object outside the allowlist')
            raise ValueError(
                f'refusing to load {path}: it needs {what}, which is not on '
                'the weights_only allowlist, so the file may come from an '
                'untrusted source. If you trust it, allowlist that global '
                'with torch.serialization.add_safe_globals([...]) and load '
                f'again. (torch: {reason})') from err
        raise ValueError(
            f'{path} is not a valid PyTorch checkpoint (unreadable or '
            f'corrupt): {type(err).__name__}: {reason[:300]}') from err
