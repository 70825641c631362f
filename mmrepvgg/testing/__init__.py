"""Synthetic mini datasets in the Cityscapes and COCO layouts (and the configs that put a
bundled config on them at CPU size): what ``--mini``, the demo and the tests run on."""
from .mini_data import OutDirNotEmpty, make_cityscapes, make_coco

__all__ = ['OutDirNotEmpty', 'make_cityscapes', 'make_coco']
