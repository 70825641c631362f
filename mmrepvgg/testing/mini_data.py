"""Write a tiny synthetic dataset in the on-disk layout of Cityscapes or COCO.

The layouts match what unmodified mmseg ``CityscapesDataset`` and mmdet ``CocoDataset``
configs expect, so smoke tests and CPU training runs can point ``data_root`` here instead
of at the real (tens of GB) datasets. Every class has its own base colour and texture, so
a model can learn the data in a few hundred iterations and a falling loss means something.
A dataset is written beside its folder and renamed into place: an interrupted run leaves
the user's folder as it was.
"""
import errno
import os
import os.path as osp
import shutil
import tempfile

from .cityscapes import write_cityscapes
from .coco import write_coco

#: Image size (width, height) per layout when none is given.
DEFAULT_SIZES = {'cityscapes': (256, 128), 'coco': (256, 192)}
#: Images per split when no count is given.
DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL = 24, 8


class OutDirNotEmpty(FileExistsError):
    """OUT_DIR holds something and replacing it was not asked for."""


def _check_out_dir(out_dir, force):
    if osp.lexists(out_dir) and not force:
        if not osp.isdir(out_dir) or osp.islink(out_dir):
            raise OutDirNotEmpty(f'{out_dir} exists and is not a directory; '
                                 'pass --force to replace it')
        if os.listdir(out_dir):
            raise OutDirNotEmpty(f'{out_dir} exists and is not empty; '
                                 'pass --force to replace it')


def _raise_if_filled(out_dir, err, force):
    """OutDirNotEmpty where ``err`` says another process filled out_dir meanwhile."""
    if err.errno in (errno.ENOTEMPTY, errno.EEXIST) and not force:
        raise OutDirNotEmpty(f'{out_dir} was filled while this dataset was being '
                             'written; pass --force to replace it') from err


def _build_in_place(out_dir, force, writer):
    """Run ``writer(tmp_dir)`` next to out_dir, then swap the result in atomically-ish.

    Building beside the target keeps the final rename on one filesystem, and a crash or
    Ctrl-C mid-way leaves the user's existing directory untouched.
    """
    out_dir = osp.abspath(out_dir)
    _check_out_dir(out_dir, force)
    parent, name = osp.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{name}.new-', dir=parent)
    try:
        writer(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a dataset dir should be readable
        # Re-check: something may have appeared while we were writing (another process
        # writing the same dataset: whichever renames first wins, the other stops here or
        # at its own rename, and the folder holds one whole dataset).
        _check_out_dir(out_dir, force)
        if osp.isdir(out_dir) and not osp.islink(out_dir) and not os.listdir(out_dir):
            try:
                os.rmdir(out_dir)
            except FileNotFoundError:  # another process took it away first
                pass
            except OSError as err:
                _raise_if_filled(out_dir, err, force)
                raise
        old = None
        if osp.lexists(out_dir) and force:
            old = tempfile.mkdtemp(prefix=f'.{name}.old-', dir=parent)
            os.rmdir(old)
            os.rename(out_dir, old)
        try:
            # refused where a folder with something in it is there by now
            os.rename(tmp, out_dir)
        except OSError as err:
            if old is not None:
                os.rename(old, out_dir)
            _raise_if_filled(out_dir, err, force)
            raise
        except BaseException:
            if old is not None:
                os.rename(old, out_dir)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if osp.isdir(old) and not osp.islink(old):
            shutil.rmtree(old)
        else:
            os.remove(old)
    return out_dir


def _check_counts(num_train, num_val):
    if num_train < 0 or num_val < 0:
        raise ValueError('--num-train and --num-val must be >= 0')


def make_cityscapes(out_dir, num_train=DEFAULT_NUM_TRAIN, num_val=DEFAULT_NUM_VAL,
                    size=(256, 128), seed=0, force=False):
    """Write a Cityscapes-layout dataset (leftImg8bit/ + gtFine/ labelTrainIds) to out_dir.

    Returns the absolute path written. Raises OutDirNotEmpty if out_dir holds anything
    and ``force`` is False.
    """
    _check_counts(num_train, num_val)
    w, h = map(int, size)
    if w < 64 or h < 32:
        raise ValueError(f'cityscapes size must be at least 64x32, got {w}x{h}')
    return _build_in_place(
        out_dir, force, lambda d: write_cityscapes(d, num_train, num_val, (w, h), seed))


def make_coco(out_dir, num_train=DEFAULT_NUM_TRAIN, num_val=DEFAULT_NUM_VAL,
              size=(256, 192), seed=0, force=False):
    """Write a COCO-layout dataset (annotations/instances_*2017.json + images) to out_dir.

    Returns the absolute path written. Raises OutDirNotEmpty if out_dir holds anything
    and ``force`` is False.
    """
    _check_counts(num_train, num_val)
    w, h = map(int, size)
    if w < 64 or h < 64:
        raise ValueError(f'coco size must be at least 64x64, got {w}x{h}')
    return _build_in_place(
        out_dir, force, lambda d: write_coco(d, num_train, num_val, (w, h), seed))
