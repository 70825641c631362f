"""Checks made before hours of training are spent: the data a config reads is laid out
as its dataset expects, its pretrained weights can be had, and the GPUs can be used.
Each problem is a sentence that names what is missing and how to get it."""
import glob
import json
import os
import sys
import os.path as osp
import urllib.error
import urllib.request
from typing import Dict, Iterable, List, Optional

from mmengine.config import Config

from ..checkpoint.fetch import is_remote_checkpoint, resolve_location

__all__ = ['data_problems', 'weight_urls', 'weight_problems', 'environment_problems',
           'CHECK_MARK', 'main']

_SPLITS = ('train_dataloader', 'val_dataloader', 'test_dataloader')
_MINI = {'CityscapesDataset': 'cityscapes', 'CocoDataset': 'coco'}
_PREPARE = {
    'CityscapesDataset': (
        'download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from '
        'https://www.cityscapes-dataset.com/ and unpack both into {root}, then write the '
        '*_labelTrainIds.png files with mmseg\'s converter: pip install cityscapesscripts && '
        'python "$(python -c \'import mmseg, os; print(os.path.dirname(mmseg.__file__))\')'
        '/.mim/tools/dataset_converters/cityscapes.py" {root} --nproc 8'),
    'CocoDataset': (
        'download COCO 2017 (train2017.zip, val2017.zip, annotations_trainval2017.zip from '
        'https://cocodataset.org/#download) and unpack them into {root}, or: python '
        '"$(python -c \'import mmdet, os; print(os.path.dirname(mmdet.__file__))\')'
        '/.mim/tools/misc/download_dataset.py" --dataset-name coco2017 --save-dir {root} '
        '--unzip'),
}


def _datasets(cfg: Config, splits: Iterable[str] = _SPLITS) -> Iterable[dict]:
    for split in splits:
        loader = cfg.get(split)
        dataset = loader.get('dataset') if loader else None
        while dataset is not None and 'dataset' in dataset:  # RepeatDataset and the like
            dataset = dataset['dataset']
        if dataset is not None:
            yield dataset


def data_problems(cfg: Config, mini: bool = False,
                  splits: Iterable[str] = _SPLITS, *,
                  skip_roots: Iterable[str] = ()) -> List[str]:
    """What is missing of the files the config's datasets read (``splits``: its train,
    val and test loaders by default): the annotation file and image/label folders under
    ``data_root``, and for Cityscapes the ``*_labelTrainIds.png`` maps that mmseg's
    converter writes. ``mini``: the data is the synthetic one (which ``--mini`` writes
    where its folder is absent), and the hint says how to write it again.
    ``skip_roots``: data roots not checked (those ``--mini`` is yet to write)."""
    problems, seen = [], set()
    skip = set(skip_roots)
    for dataset in _datasets(cfg, splits):
        kind = dataset.get('type', '')
        kind = kind.split('.')[-1] if isinstance(kind, str) else getattr(kind, '__name__', '')
        root = dataset.get('data_root') or ''
        if root in skip:
            continue
        missing = []
        ann_file = dataset.get('ann_file')
        if ann_file:
            path = osp.join(root, ann_file)
            if not osp.isfile(path):
                missing.append(path)
        for key, folder in (dataset.get('data_prefix') or {}).items():
            path = osp.join(root, folder)
            if not folder or osp.isdir(path):
                if kind == 'CityscapesDataset' and key == 'seg_map_path' and \
                        osp.isdir(path) and not _has_file(path, '*_labelTrainIds.png'):
                    missing.append(osp.join(path, '**', '*_labelTrainIds.png'))
                continue
            missing.append(path.rstrip(os.sep) + os.sep)
        missing = [m for m in missing if m not in seen]
        seen.update(missing)
        if missing:
            how = _PREPARE.get(kind, 'prepare it as the dataset\'s documentation says')
            if mini and kind in _MINI:
                how = ('it is not the whole synthetic dataset: remove {root} (--mini then '
                       'writes it again) or write it again with: python '
                       f'tools/make_mini_data.py {_MINI[kind]} {{root}} --force')
            problems.append(f'{kind or "dataset"} data missing: {", ".join(missing)}; '
                            + how.format(root=root.rstrip('/') or '.'))
    return problems


def _has_file(folder: str, pattern: str) -> bool:
    return next(iter(glob.iglob(osp.join(folder, '**', pattern), recursive=True)), None) \
        is not None


def weight_urls(cfg: Config) -> List[str]:
    """The remote checkpoints the model starts from (``init_cfg`` anywhere in the model,
    ``pretrained``, ``load_from``), in order, once each."""
    found: List[str] = []

    def walk(node):
        if isinstance(node, dict):
            init = node.get('init_cfg')
            for item in init if isinstance(init, list) else [init]:
                if isinstance(item, dict) and item.get('type') == 'Pretrained':
                    found.append(item.get('checkpoint'))
            if isinstance(node.get('pretrained'), str):
                found.append(node['pretrained'])
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(cfg.get('model'))
    found.append(cfg.get('load_from'))
    return list(dict.fromkeys(u for u in found if isinstance(u, str) and u))


def weight_problems(urls: Iterable[str], checked: Dict[str, Optional[str]],
                    timeout: float = 20) -> List[str]:
    """For each URL or model-zoo name: cached in torch's hub folder, or answered by its
    server (one HEAD request per URL; ``checked`` remembers answers across configs). A
    local path must exist."""
    problems = []
    for url in urls:
        if url not in checked:
            checked[url] = _weight_problem(url, timeout)
        if checked[url]:
            problems.append(checked[url])
    return problems


def _weight_problem(url: str, timeout: float) -> Optional[str]:
    if not is_remote_checkpoint(url):
        return None if osp.isfile(url) else f'pretrained file not found: {url}'
    try:
        cached, target, _ = resolve_location(url)
    except (OSError, ValueError) as err:  # an unknown scheme or model-zoo name
        return f'pretrained weights {url}: {err}'
    if target is None:  # pavi://, s3://, a local zoo file: read as mmengine reads them
        return None
    if osp.isfile(cached):
        return None
    try:
        with urllib.request.urlopen(urllib.request.Request(target, method='HEAD'),
                                    timeout=timeout):
            return None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, 'reason', None) or getattr(err, 'code', None) or err
        return (f'pretrained weights {url} are not cached ({cached}) and cannot be '
                f'downloaded ({reason}): fetch them on a machine with access and copy '
                f'them there')


# The checks of mmrepvgg.env that only detectors need: mmdet's heads run mmcv's NMS and
# RoIAlign on the GPU; mmseg's PSPNet needs no mmcv op there.
_DETECTION_ONLY = ('mmcv ops built for CUDA', 'mmcv NMS and RoIAlign on cuda')


def environment_problems(want_cuda: Optional[bool], detection: bool = True) -> List[str]:
    """The failed checks of ``tools/check_env.py`` (CUDA usable, mmcv's ops built for it,
    NCCL). ``want_cuda``: True requires a usable GPU, False checks the CPU path only,
    None a GPU where the machine has one. ``detection``: whether a detector runs here,
    which needs mmcv's ops on CUDA (a segmentation-only run does not)."""
    from ..env import environment_checks
    return _failed(environment_checks(want_cuda=want_cuda), detection)


def _unused(check, detection: bool) -> bool:
    return not detection and check.name in _DETECTION_ONLY


def _failed(checks, detection: bool) -> List[str]:
    return [f'{c.name}: {c.detail}' for c in checks if not c.ok and not _unused(c, detection)]


#: Marks the line of ``--check``'s output that carries its verdict as JSON.
CHECK_MARK = 'mmrepvgg-environment-check: '
_DEVICES = {'auto': None, 'cuda': True, 'cpu': False}


def main(argv=None) -> int:
    """``python -m mmrepvgg.reproduce.preflight``: run on the machine that trains (tools/
    reproduce.py starts it there, through srun under slurm) before an experiment."""
    import argparse
    parser = argparse.ArgumentParser(
        prog='python -m mmrepvgg.reproduce.preflight',
        description='--check: the environment checks of tools/check_env.py that a training '
                    'needs, one verdict a line, then this machine\'s facts and the failed '
                    'checks as one JSON line; exit 1 if a check failed. --record FILE: write '
                    'this machine\'s facts (host, torch, CUDA, GPUs, driver, mmcv) to FILE.')
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument('--check', action='store_true', help='run the checks')
    what.add_argument('--record', metavar='FILE', help='write this machine\'s facts')
    parser.add_argument('--device', choices=tuple(_DEVICES), default='auto',
                        help='cuda: a usable GPU is required; cpu: the CPU path only; auto '
                             '(default): a GPU where the machine has one')
    parser.add_argument('--detection', action='store_true',
                        help='a detector trains here: mmcv\'s NMS and RoIAlign must run on '
                             'CUDA')
    args = parser.parse_args(argv)
    from .results import machine_facts, record_environment
    if args.record:
        record_environment(args.record)
        return 0
    from ..env import environment_checks
    checks = environment_checks(want_cuda=_DEVICES[args.device])
    for check in checks:
        unused = not check.ok and _unused(check, args.detection)
        verdict = '[ok]' if check.ok else '[-]' if unused else '[FAILED]'
        print(f'{verdict:<8} {check.name}: {check.detail}'
              + ('; not needed: no detector runs here' if unused else ''))
    problems = _failed(checks, args.detection)
    print(CHECK_MARK + json.dumps(dict(machine=machine_facts(), problems=problems)),
          flush=True)
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
