"""From a path, URL or model-zoo name to a loaded checkpoint, never trusting half a file.

:func:`load_file` is what everything that reads a checkpoint calls. A remote checkpoint
(``http(s)://``, or a model-zoo name of mmengine's tables such as ``open-mmlab://`` or
``torchvision://``) is downloaded once into torch's hub cache
(``<torch hub dir>/checkpoints/<file name>``, where mmengine's loader caches too), and
only after it proved whole: the bytes arrived are the server's Content-Length, the
sha256 starts with the prefix a torch-hub style name carries (``name-<sha256
prefix>.pth``), and the file loads as a checkpoint. Until then it lives under a
temporary name beside the cache, so an interrupted download leaves nothing that a later
run would mistake for the checkpoint. A cached copy that is no longer whole (left by
another tool, or by a full disk) is downloaded again. Processes that share the cache take
turns (a file lock), so the ranks of a distributed job download a file once, not once
each; a whole cached file is read without the lock, and on a filesystem without locks
each process goes on unlocked after one warning.
"""
import contextlib
import errno
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from typing import Any, Optional, Tuple, Union

import torch

from ..fileio import staged_files
from .loading import UnsafeCheckpointError, torch_load_safely

__all__ = ['load_file', 'fetch_and_load', 'fetch_checkpoint', 'is_remote_checkpoint',
           'CheckpointDownloadError']

_HTTP = ('http://', 'https://')
#: seconds a download may wait for the server before giving up
DOWNLOAD_TIMEOUT = 60
# torch hub's convention, 'resnet50-0676ba61.pth': the digits after the last '-' are a
# prefix of the file's sha256. At least 8 of them, so 'epoch-12.pth' is not read as one.
_HASH_PREFIX = re.compile(r'-([a-f0-9]{8,64})\.[^.]+$')


class CheckpointDownloadError(OSError):
    """A checkpoint URL could not be downloaded whole (HTTP error, unreachable host,
    connection closed early, wrong hash, not a checkpoint)."""


def is_remote_checkpoint(name: Union[str, os.PathLike]) -> bool:
    """True for a URL or model-zoo name (``scheme://...``), False for a local path."""
    return '://' in os.fspath(name)


def _zoo_target(name: str) -> Optional[str]:
    """What ``name`` stands for, by mmengine's own model-name tables: an http(s) URL, or a
    file under mmengine's home (open-mmlab:// entries may be local). None for schemes
    that only their own backend reads (pavi://, s3://, petrel://, registered ones)."""
    from mmengine.runner import checkpoint as mm
    if name.startswith(_HTTP):
        return name
    tables = {'torchvision://': mm.get_torchvision_models,
              'modelzoo://': mm.get_torchvision_models,
              'open-mmlab://': mm.get_external_models,
              'openmmlab://': mm.get_external_models,
              'mmcls://': mm.get_mmcls_models}
    prefix = next((p for p in tables if name.startswith(p)), None)
    if prefix is None:
        return None
    model = name[len(prefix):]
    if prefix in ('open-mmlab://', 'openmmlab://'):
        model = mm.get_deprecated_model_names().get(model, model)
    urls = tables[prefix]()
    if model not in urls:
        raise ValueError(f'unknown model name in {name!r}: mmengine\'s {prefix} table has '
                         f'no {model!r} (it has {len(urls)} names, e.g. '
                         f'{", ".join(sorted(urls)[:5])})')
    target = urls[model]
    return target if target.startswith(_HTTP) else os.path.join(
        mm._get_mmengine_home(), target)


def resolve_location(name: str) -> Tuple[str, Optional[str], str]:
    """``(where to read, URL to download or None, how to name it in messages)``."""
    if not is_remote_checkpoint(name):
        return name, None, name
    from mmengine.runner import CheckpointLoader
    # CheckpointLoader reads a scheme it does not know as a local path ('' matches all).
    schemes = [p for p in CheckpointLoader._schemes if p]
    if not any(re.match(p, name) for p in schemes):
        shown = sorted({re.sub(r'\(.*?\)\?', '', p) for p in schemes})
        raise ValueError(f'unsupported checkpoint location {name!r}: give a local path or '
                         f'one of the schemes mmengine reads: {", ".join(shown)}')
    target = _zoo_target(name)
    if target is None or not target.startswith(_HTTP):
        return (name if target is None else target), None, name
    what = target if target == name else f'{name} ({target})'
    filename = os.path.basename(urllib.parse.urlparse(target).path)
    if not filename:
        raise ValueError(f'{what} names no file (its path ends with "/")')
    return os.path.join(torch.hub.get_dir(), 'checkpoints', filename), target, what


def _size(n: int) -> str:
    return f'{n / 1e6:.1f} MB' if n >= 100_000 else f'{n} bytes'


def _download_reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f'HTTP {err.code} {err.reason}'
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return f'{type(err).__name__}: {err}'


def _looks_like_html(path: str) -> bool:
    with open(path, 'rb') as f:
        head = f.read(512).lstrip().lower()
    return head.startswith((b'<!doctype html', b'<html', b'<head', b'<?xml'))


def _download(url: str, cached: str, what: str, map_location: Any) -> Any:
    """Download ``url`` to ``cached`` if it arrives whole; returns the loaded checkpoint."""
    from mmengine.logging import print_log
    print_log(f'downloading {what} to {cached}', logger='current')
    request = urllib.request.Request(url, headers={'Accept-Encoding': 'identity'})
    show_progress = sys.stderr.isatty()
    with staged_files() as (stage, publish):
        part = stage(cached, '.part')
        got, expected, digest = 0, None, hashlib.sha256()
        try:
            with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response, \
                    open(part, 'wb') as f:
                length = response.headers.get('Content-Length', '')
                expected = int(length) if length.isdigit() else None
                for chunk in iter(lambda: response.read(1 << 20), b''):
                    f.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    if show_progress:
                        total = f' of {_size(expected)}' if expected else ''
                        sys.stderr.write(f'\r  {_size(got)}{total}')
            if show_progress:
                sys.stderr.write('\n')
        except (OSError, ValueError, http.client.HTTPException) as err:
            arrived = f' (got {_size(got)}' + (f' of {_size(expected)})' if expected else ')')
            raise CheckpointDownloadError(
                f'could not download the checkpoint {what}: {_download_reason(err)}'
                + (arrived if got else '') + '; nothing was cached') from err
        if expected is not None and got != expected:
            raise CheckpointDownloadError(
                f'the download of {what} is incomplete: got {_size(got)} of '
                f'{_size(expected)} (the server closed the connection early); nothing was '
                'cached, so running again downloads it again')
        found = _HASH_PREFIX.search(os.path.basename(cached))
        if found and not digest.hexdigest().startswith(found.group(1)):
            raise CheckpointDownloadError(
                f'the download of {what} is not the file its name promises: its sha256 '
                f'starts with {digest.hexdigest()[:len(found.group(1))]}, the name says '
                f'{found.group(1)} (damaged in transit, or replaced on the server); '
                'nothing was cached')
        try:
            checkpoint = torch_load_safely(part, what, map_location)
        except UnsafeCheckpointError:
            raise
        except ValueError as err:
            if _looks_like_html(part):
                raise CheckpointDownloadError(
                    f'{what} answered with an HTML page ({_size(got)}), not a checkpoint: '
                    'is it a download link? (a login or error page of the server)') from err
            raise CheckpointDownloadError(
                f'{what} did not give a loadable checkpoint ({_size(got)} arrived): '
                f'{err}; nothing was cached') from err
        publish(cached)
    return checkpoint


def _cached_problem(path: str) -> Optional[str]:
    """Why the cached file ``path`` is not a whole checkpoint, or None. Cheap: torch
    saves a zip archive whose directory is written last, so a cut file has none."""
    with open(path, 'rb') as f:
        head = f.read(4)
    if not head:
        return 'it is empty'
    if head.startswith(b'PK'):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        except (zipfile.BadZipFile, OSError) as err:
            return f'it is a damaged or cut-off archive ({err})'
        return None
    if head[:1] == b'\x80':  # torch's legacy (pickle) format, checked when it loads
        return None
    return f'it is not a PyTorch checkpoint (it starts with {head!r})'


def _drop_cached(cached: str, what: str, problem: str) -> None:
    from mmengine.logging import print_log
    try:
        os.remove(cached)
    except OSError as err:
        raise CheckpointDownloadError(
            f'the cached copy of {what}, {cached}, is broken ({problem}) and could not be '
            f'removed ({err.strerror}): delete that file and run again') from err
    print_log(f'the cached copy of {what}, {cached}, is broken ({problem}); downloading '
              'it again', logger='current', level=30)


# flock's answers on a filesystem that has no locks (Lustre or NFS mounted without them)
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_warned_unlocked = set()  # lock files already warned about in this process


def _warn_unlocked(lock_path: str, err: OSError) -> None:
    if lock_path in _warned_unlocked:
        return
    _warned_unlocked.add(lock_path)
    warnings.warn(
        f'cannot lock {lock_path} ({err.strerror or err}): the filesystem of the checkpoint '
        'cache has no file locks, so processes sharing it may each download the same '
        'checkpoint (every download is still verified and renamed into place whole). '
        'Point TORCH_HOME at a folder on a filesystem with locks to download once.',
        RuntimeWarning)


@contextlib.contextmanager
def _one_download_at_a_time(cache_dir: str):
    """Processes sharing a cache (the ranks of a distributed job on one node, or on
    nodes sharing the folder; two tools at once) download one after another: the first
    fetches and verifies, the others then find its file in the cache. Where the
    filesystem cannot lock, each goes on without the lock (downloads are published by
    an atomic rename, so the worst case is a download per process), warning once."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: every process downloads for itself
        yield
        return
    os.makedirs(cache_dir, exist_ok=True)
    # beside the checkpoints folder, not in it: that holds checkpoints only
    lock_path = os.path.join(os.path.dirname(cache_dir), '.mmrepvgg-download.lock')
    with open(lock_path, 'a') as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                raise
            _warn_unlocked(lock_path, err)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _whole_cached(local: str) -> bool:
    """``local`` is a whole checkpoint. Safe to ask without the lock: a download only
    ever appears under its cached name by an atomic rename, verified."""
    try:
        return os.path.isfile(local) and _cached_problem(local) is None
    except OSError:  # removed meanwhile by a process that found it broken
        return False


def _fetch(name: Union[str, os.PathLike], map_location: Any = 'cpu') -> Tuple[str, Any]:
    """``(local file or backend name, the loaded checkpoint or None)``: the checkpoint
    comes back whenever verifying a download loaded it already."""
    name = os.fspath(name)
    local, url, what = resolve_location(name)
    if url is None:
        return local, None
    from mmengine.logging import print_log
    # a whole cached copy needs no lock: every rank of a job reads it at once
    if _whole_cached(local):
        print_log(f'{what}: using the copy downloaded before, {local}', logger='current')
        return local, None
    with _one_download_at_a_time(os.path.dirname(local)):
        if os.path.isfile(local):
            problem = _cached_problem(local)
            if problem is None:  # another process downloaded it while this one waited
                print_log(f'{what}: using the copy downloaded before, {local}',
                          logger='current')
                return local, None
            _drop_cached(local, what, problem)
        return local, _download(url, local, what, map_location)


def fetch_checkpoint(name: Union[str, os.PathLike]) -> str:
    """The local file to read for checkpoint ``name``; a remote one is downloaded once.

    A local path comes back unchanged. ``http(s)://`` URLs and mmengine's model-zoo
    names (``torchvision://``, ``open-mmlab://``, ``mmcls://``) are downloaded on first
    use into torch's hub cache, verified (see the module's docstring), and that file is
    returned. ``mmcls://`` gives the file as stored (mmengine's loader keeps only its
    backbone). Names of the other schemes mmengine's ``CheckpointLoader`` registers
    (``pavi://``, ``s3://``, ...) come back unchanged: only their backend reads them.

    Raises:
        ValueError: a scheme ``CheckpointLoader`` does not handle, an unknown model name;
            a download that needs globals outside the weights-only allowlist.
        CheckpointDownloadError: the download failed or did not arrive whole (the message
            names the URL and what arrived); nothing is cached then.
    """
    return _fetch(name)[0]


def load_file(path: Union[str, os.PathLike], map_location: Any = 'cpu') -> Any:
    """The checkpoint at ``path`` (a file, URL or model-zoo name), loaded weights-only
    (see :func:`fetch_and_load`)."""
    return fetch_and_load(path, map_location)[1]


def fetch_and_load(path: Union[str, os.PathLike], map_location: Any = 'cpu'
                   ) -> Tuple[str, Any]:
    """``(where it was read, the checkpoint)`` for ``path`` (a file, URL or model-zoo
    name), loaded weights-only: the file is resolved once and unpickled once, also on
    the first download (whose verification already loads it).

    A remote checkpoint is downloaded once and verified (see :func:`fetch_checkpoint`),
    never read through ``torch.hub.load_state_dict_from_url`` (which mmengine's http
    loader uses, and which unpickles with weights_only=False). mmengine Runner
    checkpoints load; anything else outside torch's own allowlist is refused. A cached
    download that no longer loads is downloaded again, once.

    Raises:
        FileNotFoundError: a local ``path`` does not exist.
        CheckpointDownloadError: a URL could not be downloaded whole.
        ValueError: an unsupported scheme; the file is not a valid PyTorch checkpoint,
            or it needs a global that is not allowlisted (never retried unsafely).
    """
    name = os.fspath(path)
    local, checkpoint = _fetch(name, map_location)
    if checkpoint is not None:
        return local, checkpoint
    if is_remote_checkpoint(local):  # pavi://, s3://: read by mmengine's backend, whose
        # loaders call torch.load with its default, weights_only=True
        from mmengine.runner import CheckpointLoader
        from .loading import allow_mmengine_checkpoint_types
        allow_mmengine_checkpoint_types()
        return local, CheckpointLoader.load_checkpoint(local, map_location)
    if not os.path.isfile(local):
        raise FileNotFoundError(f'checkpoint file not found: {local}')
    label = name if local == name else f'{name} (local copy {local})'
    try:
        return local, torch_load_safely(local, label, map_location)
    except UnsafeCheckpointError:
        raise
    except ValueError as err:
        _, url, what = resolve_location(name)
        if url is None:
            raise
        _drop_cached(local, what, str(err))  # e.g. a legacy-format file cut short
        return _fetch(name, map_location)
