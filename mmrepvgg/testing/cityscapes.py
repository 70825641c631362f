"""A synthetic Cityscapes: street-like label maps (road, sidewalk, buildings, sky, poles,
people, cars) rendered into images, in the leftImg8bit/ + gtFine/ layout with the
``*_labelTrainIds.png`` files mmseg's converter writes."""
import os
import os.path as osp

import numpy as np
from PIL import Image

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


def write_cityscapes(root, num_train, num_val, size, seed):
    """Write the images and label maps of both splits under ``root`` (an empty folder)."""
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
