"""Writing files so that a reader never sees half of one: every file the package writes
(checkpoints, exports, downloads) goes to a temporary name beside its target and is
renamed into place once complete."""
import contextlib
import hashlib
import os
import os.path as osp
import tempfile

__all__ = ['temporary_beside', 'staged_files', 'save_atomic', 'write_text_atomic', 'sha256_file']


def temporary_beside(path: str, suffix: str = '.tmp') -> str:
    """A new empty file beside ``path`` (the same filesystem, so renaming it onto
    ``path`` is atomic), with the permissions a plain ``open(path, 'w')`` would give."""
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + osp.basename(path), suffix=suffix)
    os.close(fd)
    umask = os.umask(0)  # mkstemp makes 0600; read the umask (only settable) and restore
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


@contextlib.contextmanager
def staged_files():
    """Write several files that appear together: ``stage(path, suffix)`` gives a
    temporary file beside ``path``, ``publish(*paths)`` renames the staged files onto
    their paths in that order (the main file last, so it never exists without its
    companions); whatever was not published is removed when the block ends."""
    staged = {}

    def stage(path: str, suffix: str = '.tmp') -> str:
        staged[path] = temporary_beside(path, suffix)
        return staged[path]

    def publish(*paths: str) -> None:
        for path in paths:
            os.replace(staged.pop(path), path)

    try:
        yield stage, publish
    finally:
        for tmp in staged.values():
            if osp.exists(tmp):
                os.remove(tmp)


def save_atomic(obj, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, renamed into place, so a crash
    never leaves a half-written file where the user expects a checkpoint."""
    import torch
    with staged_files() as (stage, publish):
        torch.save(obj, stage(path))
        publish(path)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, renamed into place: a reader
    sees the old file or the new one, never half of one."""
    with staged_files() as (stage, publish):
        with open(stage(path), 'w') as f:
            f.write(text)
        publish(path)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()
