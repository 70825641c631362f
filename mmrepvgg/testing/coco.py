"""A synthetic COCO: textured shapes of a few categories, one colour and shape per class,
with boxes and polygon masks in instances_{train,val}2017.json."""
import json
import os
import os.path as osp

import numpy as np
from PIL import Image, ImageDraw

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


def write_coco(root, num_train, num_val, size, seed):
    """Write the images and annotation files of both splits under ``root`` (empty)."""
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
