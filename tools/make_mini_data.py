#!/usr/bin/env python3
"""Write a tiny synthetic dataset in the on-disk layout of Cityscapes or COCO.

The layouts match what unmodified mmseg ``CityscapesDataset`` and mmdet ``CocoDataset``
configs expect, so smoke tests and CPU training runs can point ``data_root`` here instead
of at the real (tens of GB) datasets. Every class has its own base colour and texture, so
a model can learn the data in a few hundred iterations and a falling loss means something.

Usage (``--size`` is width height)::

    python tools/make_mini_data.py cityscapes data/mini_cityscapes
    python tools/make_mini_data.py coco data/mini_coco --num-train 24 --num-val 8

Standalone on purpose (numpy + Pillow only): it must run before the project is installed.
"""
import argparse
import json
import os
import os.path as osp
import shutil
import sys
import tempfile

import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------
# Cityscapes
# ---------------------------------------------------------------------------------------

# trainId -> RGB. The official Cityscapes palette, so rendered images look like the usual
# colour-coded label visualisations and each class mean is far from every other.
CITYSCAPES_COLORS = {
    0: (128, 64, 128),    # road
    1: (244, 35, 232),    # sidewalk
    2: (70, 70, 70),      # building
    5: (153, 153, 153),   # pole
    8: (107, 142, 35),    # vegetation
    10: (70, 130, 180),   # sky
    11: (220, 20, 60),    # person
    13: (0, 0, 142),      # car
}
CITYSCAPES_CLASSES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole',
                      'traffic light', 'traffic sign', 'vegetation', 'terrain', 'sky',
                      'person', 'rider', 'car', 'truck', 'bus', 'train', 'motorcycle',
                      'bicycle')
CITYSCAPES_CITIES = {'train': ('aachen', 'bremen'), 'val': ('frankfurt',)}
IGNORE = 255
# Thin objects whose outlines are ambiguous, like the unlabelled seams in real gtFine.
_THING_IDS = (5, 11, 13)


def _cityscapes_textures(rng, h, w):
    """Per-class brightness offsets (H, W). Zero-mean-ish so class means stay distinct."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ph = rng.uniform(0, 2 * np.pi, size=4)
    ox, oy = rng.integers(0, 12, size=2)
    windows = (((xx + ox) % 10) < 5) & (((yy + oy) % 12) < 6)
    return {
        0: rng.normal(0, 6, size=(h, w)),                                # asphalt grain
        1: 18 * np.sign(np.sin(2 * np.pi * yy / 6 + ph[0])),            # paving stripes
        2: np.where(windows, -28.0, 12.0),                              # window grid
        5: 10 * np.sin(2 * np.pi * xx / 3),                             # metallic sheen
        8: 22 * np.sin(xx / 3 + ph[1]) * np.sin(yy / 4 + ph[2]),        # foliage blotches
        10: 40 * (yy / h - 0.2),                                        # brighter at horizon
        11: 20 * np.sign(np.sin(2 * np.pi * xx / 4 + ph[3])),           # clothing stripes
        13: 20 * (((xx // 4 + yy // 4) % 2) * 2 - 1),                   # checker paint
    }


def _cityscapes_label(rng, w, h):
    """Lay out a street scene as a trainId map, painting back to front."""
    label = np.full((h, w), 10, np.uint8)  # sky everywhere, overwritten below
    horizon = int(h * rng.uniform(0.45, 0.55))
    curb = horizon + max(2, int(h * rng.uniform(0.06, 0.1)))

    # Skyline: adjacent blocks of random width and height.
    x = 0
    while x < w:
        bw = int(rng.integers(max(8, w // 12), max(9, w // 4)))
        top = int(h * rng.uniform(0.08, 0.35))
        label[top:horizon, x:x + bw] = 2
        x += bw
    # Trees in front of the buildings.
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0, w), horizon - rng.uniform(0.05, 0.2) * h
        rx, ry = rng.uniform(0.05, 0.12) * w, rng.uniform(0.08, 0.18) * h
        label[(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1) & (yy < curb)] = 8
    label[horizon:curb] = 1
    label[curb:] = 0
    # Poles stand on the sidewalk.
    for _ in range(int(rng.integers(1, 4))):
        px = int(rng.integers(0, w - 3))
        pw = max(2, w // 80)
        label[int(h * rng.uniform(0.15, 0.3)):curb, px:px + pw] = 5
    # Cars on the road: body plus a narrower cabin so the shape is not a bare box.
    for _ in range(int(rng.integers(1, 4))):
        cw = int(w * rng.uniform(0.12, 0.25))
        ch = max(6, int(cw * rng.uniform(0.3, 0.45)))
        x0 = int(rng.integers(0, max(1, w - cw)))
        y1 = int(rng.integers(curb + ch // 2, h + 1))
        body_top = y1 - ch * 2 // 3
        label[body_top:y1, x0:x0 + cw] = 13
        label[y1 - ch:body_top, x0 + cw // 5:x0 + cw * 4 // 5] = 13
    # People on the sidewalk, head as a narrower block on top.
    for _ in range(int(rng.integers(0, 3))):
        ph_ = max(8, int(h * rng.uniform(0.15, 0.28)))
        pw = max(3, ph_ // 4)
        x0 = int(rng.integers(0, w - pw))
        y1 = int(rng.integers(horizon + 2, curb + 3))
        label[y1 - ph_ + pw:y1, x0:x0 + pw] = 11
        label[y1 - ph_:y1 - ph_ + pw, x0 + pw // 4:x0 + pw - pw // 4] = 11
    return label


def _ignore_thing_borders(rng, label):
    """Mark about half of the pixels on object outlines as ignore (255)."""
    edge = np.zeros(label.shape, bool)
    dy = label[1:] != label[:-1]
    dx = label[:, 1:] != label[:, :-1]
    edge[1:] |= dy
    edge[:-1] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge &= np.isin(label, _THING_IDS)
    out = label.copy()
    out[edge & (rng.random(label.shape) < 0.5)] = IGNORE
    return out


def _render(label, colors, textures, rng, noise=6.0):
    img = np.zeros(label.shape + (3,), np.float32)
    for cls, rgb in colors.items():
        m = label == cls
        if m.any():
            img[m] = np.asarray(rgb, np.float32) + textures[cls][m][:, None]
    img += rng.normal(0, noise, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _write_cityscapes(root, num_train, num_val, size, seed):
    w, h = size
    for split_idx, (split, n) in enumerate((('train', num_train), ('val', num_val))):
        cities = CITYSCAPES_CITIES[split]
        # mmseg lists these folders even when a split has no images.
        for top in ('leftImg8bit', 'gtFine'):
            os.makedirs(osp.join(root, top, split), exist_ok=True)
        for i in range(n):
            # One generator per image: changing --num-train leaves val images unchanged.
            rng = np.random.default_rng([seed, split_idx, i])
            city = cities[i % len(cities)]
            stem = f'{city}_{i // len(cities):06d}_{19 + i:06d}'
            label = _cityscapes_label(rng, w, h)
            img = _render(label, CITYSCAPES_COLORS, _cityscapes_textures(rng, h, w), rng)
            label = _ignore_thing_borders(rng, label)
            img_dir = osp.join(root, 'leftImg8bit', split, city)
            seg_dir = osp.join(root, 'gtFine', split, city)
            os.makedirs(img_dir, exist_ok=True)
            os.makedirs(seg_dir, exist_ok=True)
            Image.fromarray(img, 'RGB').save(osp.join(img_dir, stem + '_leftImg8bit.png'))
            Image.fromarray(label, 'L').save(
                osp.join(seg_dir, stem + '_gtFine_labelTrainIds.png'))


# ---------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------

# All 80 COCO categories with their real (gappy) ids. Real instances_*.json files list all
# of them, and mmdet maps category ids to labels by enumerating the categories present in
# the json that match its class names; listing only the used ones would renumber labels.
COCO_CATEGORIES = [
    (1, 'person', 'person'), (2, 'bicycle', 'vehicle'), (3, 'car', 'vehicle'),
    (4, 'motorcycle', 'vehicle'), (5, 'airplane', 'vehicle'), (6, 'bus', 'vehicle'),
    (7, 'train', 'vehicle'), (8, 'truck', 'vehicle'), (9, 'boat', 'vehicle'),
    (10, 'traffic light', 'outdoor'), (11, 'fire hydrant', 'outdoor'),
    (13, 'stop sign', 'outdoor'), (14, 'parking meter', 'outdoor'), (15, 'bench', 'outdoor'),
    (16, 'bird', 'animal'), (17, 'cat', 'animal'), (18, 'dog', 'animal'),
    (19, 'horse', 'animal'), (20, 'sheep', 'animal'), (21, 'cow', 'animal'),
    (22, 'elephant', 'animal'), (23, 'bear', 'animal'), (24, 'zebra', 'animal'),
    (25, 'giraffe', 'animal'), (27, 'backpack', 'accessory'), (28, 'umbrella', 'accessory'),
    (31, 'handbag', 'accessory'), (32, 'tie', 'accessory'), (33, 'suitcase', 'accessory'),
    (34, 'frisbee', 'sports'), (35, 'skis', 'sports'), (36, 'snowboard', 'sports'),
    (37, 'sports ball', 'sports'), (38, 'kite', 'sports'), (39, 'baseball bat', 'sports'),
    (40, 'baseball glove', 'sports'), (41, 'skateboard', 'sports'),
    (42, 'surfboard', 'sports'), (43, 'tennis racket', 'sports'), (44, 'bottle', 'kitchen'),
    (46, 'wine glass', 'kitchen'), (47, 'cup', 'kitchen'), (48, 'fork', 'kitchen'),
    (49, 'knife', 'kitchen'), (50, 'spoon', 'kitchen'), (51, 'bowl', 'kitchen'),
    (52, 'banana', 'food'), (53, 'apple', 'food'), (54, 'sandwich', 'food'),
    (55, 'orange', 'food'), (56, 'broccoli', 'food'), (57, 'carrot', 'food'),
    (58, 'hot dog', 'food'), (59, 'pizza', 'food'), (60, 'donut', 'food'),
    (61, 'cake', 'food'), (62, 'chair', 'furniture'), (63, 'couch', 'furniture'),
    (64, 'potted plant', 'furniture'), (65, 'bed', 'furniture'),
    (67, 'dining table', 'furniture'), (70, 'toilet', 'furniture'),
    (72, 'tv', 'electronic'), (73, 'laptop', 'electronic'), (74, 'mouse', 'electronic'),
    (75, 'remote', 'electronic'), (76, 'keyboard', 'electronic'),
    (77, 'cell phone', 'electronic'), (78, 'microwave', 'appliance'),
    (79, 'oven', 'appliance'), (80, 'toaster', 'appliance'), (81, 'sink', 'appliance'),
    (82, 'refrigerator', 'appliance'), (84, 'book', 'indoor'), (85, 'clock', 'indoor'),
    (86, 'vase', 'indoor'), (87, 'scissors', 'indoor'), (88, 'teddy bear', 'indoor'),
    (89, 'hair drier', 'indoor'), (90, 'toothbrush', 'indoor'),
]
# The classes actually drawn: category id -> (shape, RGB, texture). Shape and colour both
# give the class away; the texture keeps the colour from being the only cue.
COCO_OBJECTS = {
    1: ('ellipse', (205, 40, 50), 'hstripes'),     # person: tall red ellipse
    3: ('rectangle', (30, 60, 195), 'checker'),    # car: wide blue box
    18: ('triangle', (225, 150, 35), 'blotch'),    # dog: orange triangle
    44: ('diamond', (40, 175, 70), 'vstripes'),    # bottle: tall green diamond
}
MIN_OBJ = 16  # px, both sides: smaller boxes vanish after the usual downsampling


def _coco_shape_size(rng, shape, scale, w, h):
    lo = MIN_OBJ
    if shape == 'ellipse':
        bw = rng.uniform(18, 40) * scale
        bh = bw * rng.uniform(1.6, 2.4)
    elif shape == 'rectangle':
        bw = rng.uniform(40, 90) * scale
        bh = bw * rng.uniform(0.4, 0.6)
    elif shape == 'triangle':
        bw = rng.uniform(28, 64) * scale
        bh = bw * rng.uniform(0.7, 1.0)
    else:  # diamond
        bw = rng.uniform(18, 32) * scale
        bh = bw * rng.uniform(1.8, 2.4)
    # Keep a 2 px margin so polygons never touch the border after rounding.
    bw = float(np.clip(bw, lo, w - 4))
    bh = float(np.clip(bh, lo, h - 4))
    return bw, bh


def _coco_polygon(shape, x0, y0, bw, bh):
    x1, y1 = x0 + bw, y0 + bh
    cx, cy = x0 + bw / 2, y0 + bh / 2
    if shape == 'ellipse':
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([cx + bw / 2 * np.cos(t), cy + bh / 2 * np.sin(t)], 1)
    elif shape == 'rectangle':
        pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    elif shape == 'triangle':
        pts = np.array([[cx, y0], [x1, y1], [x0, y1]])
    else:
        pts = np.array([[cx, y0], [x1, cy], [cx, y1], [x0, cy]])
    return np.round(pts, 2)


def _coco_texture(kind, rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ph = rng.uniform(0, 2 * np.pi)
    if kind == 'hstripes':
        return 22 * np.sign(np.sin(2 * np.pi * yy / 6 + ph))
    if kind == 'vstripes':
        return 22 * np.sign(np.sin(2 * np.pi * xx / 5 + ph))
    if kind == 'checker':
        return 22.0 * (((xx // 5 + yy // 5) % 2) * 2 - 1)
    return 25 * np.sin(xx / 3 + ph) * np.sin(yy / 4 - ph)  # blotch


def _coco_image(rng, w, h):
    """Return (RGB uint8 image, [(category_id, polygon)])."""
    scale = min(w, h) / 192
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Dull grey background with gentle ripples: nothing like any object colour.
    base = rng.uniform(105, 145)
    ph = rng.uniform(0, 2 * np.pi, size=2)
    bg = base + 12 * np.sin(xx / 11 + ph[0]) * np.cos(yy / 13 + ph[1])
    img = np.repeat(bg[..., None], 3, axis=2)

    cat_ids = sorted(COCO_OBJECTS)
    placed, objects = [], []
    for _ in range(int(rng.integers(1, 5))):
        cat = int(rng.choice(cat_ids))
        shape, rgb, tex = COCO_OBJECTS[cat]
        bw, bh = _coco_shape_size(rng, shape, scale, w, h)
        # Rejection-sample a free spot; objects never overlap, so each mask is complete.
        for _try in range(30):
            x0 = rng.uniform(2, w - 2 - bw)
            y0 = rng.uniform(2, h - 2 - bh)
            box = (x0 - 3, y0 - 3, x0 + bw + 3, y0 + bh + 3)
            if all(box[2] <= p[0] or p[2] <= box[0] or box[3] <= p[1] or p[3] <= box[1]
                   for p in placed):
                break
        else:
            continue
        placed.append(box)
        pts = _coco_polygon(shape, x0, y0, bw, bh)
        mask_img = Image.new('L', (w, h), 0)
        ImageDraw.Draw(mask_img).polygon([tuple(p) for p in pts.tolist()], fill=1)
        mask = np.asarray(mask_img, bool)
        texture = _coco_texture(tex, rng, h, w)
        img[mask] = np.asarray(rgb, np.float32) + texture[mask][:, None]
        objects.append((cat, pts, int(mask.sum())))
    img += rng.normal(0, 5, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects


def _write_coco(root, num_train, num_val, size, seed):
    w, h = size
    os.makedirs(osp.join(root, 'annotations'))
    categories = [dict(id=i, name=n, supercategory=s) for i, n, s in COCO_CATEGORIES]
    for split_idx, (split, n) in enumerate((('train', num_train), ('val', num_val))):
        img_dir = osp.join(root, f'{split}2017')
        os.makedirs(img_dir)
        images, annotations = [], []
        for i in range(n):
            rng = np.random.default_rng([seed, split_idx, i])
            # Ids unique across splits, like real COCO, so merged evaluations stay valid.
            img_id = (split_idx + 1) * 100000 + i + 1
            file_name = f'{img_id:012d}.jpg'
            img, objects = _coco_image(rng, w, h)
            # 4:4:4 at q95: default 4:2:0 chroma subsampling smears the object colours.
            Image.fromarray(img, 'RGB').save(osp.join(img_dir, file_name), quality=95,
                                             subsampling=0)
            images.append(dict(id=img_id, file_name=file_name, width=w, height=h,
                               license=1, date_captured=''))
            for cat, pts, area in objects:
                xmin, ymin = pts.min(0)
                xmax, ymax = pts.max(0)
                annotations.append(dict(
                    id=split_idx * 1000000 + len(annotations) + 1,
                    image_id=img_id, category_id=cat,
                    bbox=[round(float(xmin), 2), round(float(ymin), 2),
                          round(float(xmax - xmin), 2), round(float(ymax - ymin), 2)],
                    area=float(area), iscrowd=0,
                    segmentation=[[float(v) for v in pts.reshape(-1)]]))
        coco = dict(
            info=dict(description='mmrepvgg synthetic mini COCO', version='1.0',
                      year=2017, contributor='tools/make_mini_data.py', url='',
                      date_created=''),
            licenses=[dict(id=1, name='synthetic', url='')],
            images=images, annotations=annotations, categories=categories)
        with open(osp.join(root, 'annotations', f'instances_{split}2017.json'), 'w') as f:
            json.dump(coco, f, separators=(',', ':'))


# ---------------------------------------------------------------------------------------
# Safe placement
# ---------------------------------------------------------------------------------------

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
        # Re-check: something may have appeared while we were writing.
        _check_out_dir(out_dir, force)
        if osp.isdir(out_dir) and not osp.islink(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
        old = None
        if osp.lexists(out_dir):  # only reachable with force
            old = tempfile.mkdtemp(prefix=f'.{name}.old-', dir=parent)
            os.rmdir(old)
            os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
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


def make_cityscapes(out_dir, num_train=24, num_val=8, size=(256, 128), seed=0,
                    force=False):
    """Write a Cityscapes-layout dataset (leftImg8bit/ + gtFine/ labelTrainIds) to out_dir.

    Returns the absolute path written. Raises OutDirNotEmpty if out_dir holds anything
    and ``force`` is False.
    """
    _check_counts(num_train, num_val)
    w, h = map(int, size)
    if w < 64 or h < 32:
        raise ValueError(f'cityscapes size must be at least 64x32, got {w}x{h}')
    return _build_in_place(
        out_dir, force, lambda d: _write_cityscapes(d, num_train, num_val, (w, h), seed))


def make_coco(out_dir, num_train=24, num_val=8, size=(256, 192), seed=0, force=False):
    """Write a COCO-layout dataset (annotations/instances_*2017.json + images) to out_dir.

    Returns the absolute path written. Raises OutDirNotEmpty if out_dir holds anything
    and ``force`` is False.
    """
    _check_counts(num_train, num_val)
    w, h = map(int, size)
    if w < 64 or h < 64:
        raise ValueError(f'coco size must be at least 64x64, got {w}x{h}')
    return _build_in_place(
        out_dir, force, lambda d: _write_coco(d, num_train, num_val, (w, h), seed))


DEFAULT_SIZES = {'cityscapes': (256, 128), 'coco': (256, 192)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('kind', choices=sorted(DEFAULT_SIZES), help='which layout to write')
    p.add_argument('out_dir', help='dataset root to create (use it as data_root)')
    p.add_argument('--num-train', type=int, default=24)
    p.add_argument('--num-val', type=int, default=8)
    p.add_argument('--size', type=int, nargs=2, metavar=('WIDTH', 'HEIGHT'),
                   help='image size (default: cityscapes 256 128, coco 256 192)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--force', action='store_true',
                   help='replace out_dir if it is not empty (only once the new one is done)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    size = tuple(args.size) if args.size else DEFAULT_SIZES[args.kind]
    make = make_cityscapes if args.kind == 'cityscapes' else make_coco
    try:
        path = make(args.out_dir, args.num_train, args.num_val, size, args.seed,
                    args.force)
    except OutDirNotEmpty as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'wrote {args.kind} mini dataset: {args.num_train} train + {args.num_val} val '
          f'images ({size[0]}x{size[1]}, seed {args.seed}) to {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
