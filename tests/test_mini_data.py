"""Tests for mmrepvgg.testing (the data of tools/make_mini_data.py, run as a process where
its command line is tested): the synthetic data must load through the real mmseg/mmdet
dataset classes, be reproducible, never clobber user data, and be learnable."""
import itertools
import json
import os.path as osp
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmrepvgg.testing import make_cityscapes, make_coco
from mmrepvgg.testing.cityscapes import CITYSCAPES_CLASSES
from mmrepvgg.testing.coco import COCO_CATEGORIES, COCO_OBJECTS, MIN_OBJ

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / 'tools' / 'make_mini_data.py'


def _run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)


def _label_files(root):
    return sorted(Path(root).glob('gtFine/*/*/*_gtFine_labelTrainIds.png'))


def test_cityscapes_loads_in_mmseg(tmp_path):
    pytest.importorskip('mmseg')
    from mmseg.datasets import CityscapesDataset

    root = tmp_path / 'cs'
    make_cityscapes(root, num_train=6, num_val=3, size=(128, 64), seed=1)
    seen = set()
    for split, n in (('train', 6), ('val', 3)):
        ds = CityscapesDataset(
            data_root=str(root),
            data_prefix=dict(img_path=f'leftImg8bit/{split}', seg_map_path=f'gtFine/{split}'),
            pipeline=[], lazy_init=False)
        assert len(ds) == n
        for i in range(n):
            info = ds.get_data_info(i)
            img, seg = info['img_path'], info['seg_map_path']
            assert osp.isfile(img) and osp.isfile(seg)
            assert osp.basename(img)[:-len('_leftImg8bit.png')] == \
                osp.basename(seg)[:-len('_gtFine_labelTrainIds.png')]
            lab_img = Image.open(seg)
            assert lab_img.mode == 'L'
            assert Image.open(img).mode == 'RGB' and Image.open(img).size == lab_img.size
            vals = np.unique(np.asarray(lab_img))
            assert set(vals.tolist()) <= set(range(19)) | {255}
            seen |= set(vals.tolist()) - {255}
    assert len(seen) >= 4
    assert ds.metainfo['classes'] == CITYSCAPES_CLASSES


def test_coco_loads_in_mmdet(tmp_path):
    pytest.importorskip('mmdet')
    from mmdet.datasets import CocoDataset

    root = tmp_path / 'coco'
    make_coco(root, num_train=4, num_val=5, size=(160, 128), seed=2)
    # Category names must be exactly mmdet's, or its name->id lookup silently drops them.
    names = [c[1] for c in COCO_CATEGORIES]
    assert tuple(names) == CocoDataset.METAINFO['classes']

    ds = CocoDataset(data_root=str(root), ann_file='annotations/instances_val2017.json',
                     data_prefix=dict(img='val2017/'), pipeline=[])
    assert len(ds) == 5
    # Labels are the standard 80-class indices (person 0, car 2, dog 16, bottle 39).
    expected = {names.index(n) for i, n, _ in COCO_CATEGORIES if i in COCO_OBJECTS}
    for i in range(len(ds)):
        info = ds.get_data_info(i)
        assert osp.isfile(info['img_path'])
        w, h = info['width'], info['height']
        assert Image.open(info['img_path']).size == (w, h)
        assert len(info['instances']) >= 1
        for inst in info['instances']:
            assert 0 <= inst['bbox_label'] < 80 and inst['bbox_label'] in expected
            x1, y1, x2, y2 = inst['bbox']
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert x2 - x1 >= MIN_OBJ - 1 and y2 - y1 >= MIN_OBJ - 1
            assert inst['ignore_flag'] == 0 and inst['mask']

    # The train split through the usual training filter keeps every image.
    ds = CocoDataset(data_root=str(root), ann_file='annotations/instances_train2017.json',
                     data_prefix=dict(img='train2017/'), pipeline=[],
                     filter_cfg=dict(filter_empty_gt=True, min_size=32))
    assert len(ds) == 4


def test_coco_json_is_standard(tmp_path):
    root = make_coco(tmp_path / 'coco', num_train=3, num_val=2, seed=0)
    d = json.loads((Path(root) / 'annotations' / 'instances_train2017.json').read_text())
    assert {'info', 'licenses', 'images', 'annotations', 'categories'} <= d.keys()
    assert len(d['images']) == 3 and len(d['categories']) == 80
    ids = {im['id'] for im in d['images']}
    for im in d['images']:
        assert im['file_name'] == f"{im['id']:012d}.jpg"
        assert (Path(root) / 'train2017' / im['file_name']).is_file()
    for a in d['annotations']:
        assert a['image_id'] in ids and a['category_id'] in COCO_OBJECTS
        assert a['iscrowd'] == 0 and a['area'] > 0
        assert all(isinstance(v, float) for v in a['bbox'])
        poly = a['segmentation'][0]
        assert len(poly) >= 6 and len(poly) % 2 == 0


def test_deterministic(tmp_path):
    a = make_cityscapes(tmp_path / 'a', num_train=2, num_val=1, seed=5)
    b = make_cityscapes(tmp_path / 'b', num_train=2, num_val=1, seed=5)
    c = make_cityscapes(tmp_path / 'c', num_train=2, num_val=1, seed=6)
    fa, fb, fc = _label_files(a)[0], _label_files(b)[0], _label_files(c)[0]
    assert fa.read_bytes() == fb.read_bytes()
    assert fa.read_bytes() != fc.read_bytes()
    ja = Path(make_coco(tmp_path / 'ca', 2, 1, seed=5)) / 'annotations'
    jb = Path(make_coco(tmp_path / 'cb', 2, 1, seed=5)) / 'annotations'
    assert (ja / 'instances_val2017.json').read_bytes() == \
        (jb / 'instances_val2017.json').read_bytes()


def test_refuses_non_empty_out_dir_and_force_replaces(tmp_path):
    out = tmp_path / 'data'
    out.mkdir()
    keep = out / 'precious.txt'
    keep.write_text('user data')

    r = _run('cityscapes', out, '--num-train', 1, '--num-val', 1)
    assert r.returncode == 2
    assert 'not empty' in r.stderr and '--force' in r.stderr
    assert keep.read_text() == 'user data'
    assert sorted(p.name for p in out.iterdir()) == ['precious.txt']
    # No temp directories left lying around next to it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ['data']

    r = _run('coco', out, '--num-train', 1, '--num-val', 1, '--force')
    assert r.returncode == 0, r.stderr
    assert 'coco' in r.stdout and str(out) in r.stdout
    assert not keep.exists()
    assert (out / 'annotations' / 'instances_val2017.json').is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['data']


def test_empty_out_dir_is_used(tmp_path):
    out = tmp_path / 'empty'
    out.mkdir()
    r = _run('cityscapes', out, '--num-train', 1, '--num-val', 1, '--size', 96, 48)
    assert r.returncode == 0, r.stderr
    assert len(_label_files(out)) == 2
    assert Image.open(_label_files(out)[0]).size == (96, 48)


def test_cityscapes_classes_are_separable_by_colour(tmp_path):
    root = Path(make_cityscapes(tmp_path / 'cs', num_train=4, num_val=0, seed=0))
    sums, counts = {}, {}
    for lab_path in _label_files(root):
        img_path = Path(str(lab_path).replace('gtFine', 'leftImg8bit', 1)
                        .replace('_gtFine_labelTrainIds', '_leftImg8bit'))
        lab = np.asarray(Image.open(lab_path))
        img = np.asarray(Image.open(img_path), np.float64)
        for c in np.unique(lab):
            if c == 255:
                continue
            m = lab == c
            sums[c] = sums.get(c, 0) + img[m].sum(0)
            counts[c] = counts.get(c, 0) + m.sum()
    assert len(sums) >= 6
    means = {c: sums[c] / counts[c] for c in sums}
    dist = min(np.linalg.norm(means[a] - means[b])
               for a, b in itertools.combinations(means, 2))
    assert dist > 40, f'class mean colours too close: {dist:.1f}'
    # Ignore pixels exist but stay a small fraction.
    labs = np.stack([np.asarray(Image.open(p)) for p in _label_files(root)])
    assert 0 < (labs == 255).mean() < 0.05


# ------------------------------------------------- --mini writes its data where absent
def _mini_cfg(root):
    """A --mini segmentation config reading the synthetic data at ``root``."""
    from mmengine.config import Config
    dataset = dict(type='CityscapesDataset', data_root=str(root))
    return Config(dict(default_scope='mmseg', train_dataloader=dict(dataset=dataset),
                       val_dataloader=dict(dataset=dataset)))


def _write_when_released(root, barrier, results):
    from mmrepvgg.apis.config import write_mini_data
    said = []
    barrier.wait()
    written = write_mini_data(_mini_cfg(root), say=said.append)
    results.put((written, said))


def test_concurrent_mini_writers_leave_one_whole_dataset(tmp_path):
    """Three processes (as the ranks of one run) find the data absent at once: each
    writes beside the folder, one rename wins and says so, the others leave it."""
    import multiprocessing
    ctx = multiprocessing.get_context('fork')  # the children only write images
    root = tmp_path / 'data' / 'mini_cityscapes'
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_write_when_released, args=(str(root), barrier, results))
             for _ in range(3)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    writers = [o for o in outcomes if o[0]]
    assert len(writers) == 1, outcomes
    (written, said), = writers
    assert written == [str(root)]
    assert said == [f'--mini: wrote the synthetic mini Cityscapes (24 train + 8 val images) '
                    f'to {root}']
    assert len(_label_files(root)) == 32
    assert len(list(root.glob('leftImg8bit/*/*/*_leftImg8bit.png'))) == 32
    assert [p.name for p in root.parent.iterdir()] == ['mini_cityscapes']  # no temp dirs


def test_load_config_mini_writes_absent_data_once(tmp_path, monkeypatch):
    from mmrepvgg.apis.config import absent_mini_data, load_config
    monkeypatch.chdir(tmp_path)
    config = str(REPO / 'configs' / 'retinanet_repvgg-a2_fpn_1x_coco.py')
    cfg = load_config(config, mini=True, write_mini=False)
    assert absent_mini_data(cfg) == [('coco', 'data/mini_coco/')]
    assert not (tmp_path / 'data').exists()
    load_config(config, mini=True)
    ann = tmp_path / 'data' / 'mini_coco' / 'annotations' / 'instances_val2017.json'
    assert len(json.loads(ann.read_text())['images']) == 8
    stamp = ann.stat().st_mtime_ns
    assert absent_mini_data(load_config(config, mini=True)) == []
    assert ann.stat().st_mtime_ns == stamp  # found, not written again
    # an empty folder counts as absent; one holding anything is the user's
    (tmp_path / 'data' / 'mini_cityscapes').mkdir()
    seg = load_config(str(REPO / 'configs' / 'pspnet_repvgg_b1g2_cityscapes.py'),
                      mini=True)
    assert absent_mini_data(seg) == [] and len(_label_files('data/mini_cityscapes')) == 32


def test_mini_data_root_taken_by_a_file_is_refused(tmp_path):
    from mmrepvgg.apis.config import write_mini_data
    from mmrepvgg.errors import InputError
    root = tmp_path / 'mini_cityscapes'
    root.write_text('not a dataset')
    with pytest.raises(InputError, match=rf'--mini writes the synthetic mini Cityscapes to '
                       rf'{root}, but {root} is not a folder: move it away'):
        write_mini_data(_mini_cfg(root), say=print)
    assert root.read_text() == 'not a dataset'
    assert [p.name for p in tmp_path.iterdir()] == ['mini_cityscapes']
