"""Where the ImageNet weights of each RepVGG arch are hosted (the bundled configs'
pretrained backbones)."""
from typing import Dict

# ImageNet-1k weights OpenMMLab hosts for mmpretrain's RepVGG (mmpretrain layout,
# training form), by arch; the bundled configs start from these. B2g2 and B3g2 have
# none (their weights exist only as the official release files).
OPENMMLAB_REPVGG = 'https://download.openmmlab.com/mmclassification/v0/repvgg/'
IMAGENET_WEIGHTS: Dict[str, str] = {
    'A0': 'repvgg-A0_8xb32_in1k_20221213-60ae8e23.pth',
    'A1': 'repvgg-A1_8xb32_in1k_20221213-f81bf3df.pth',
    'A2': 'repvgg-A2_8xb32_in1k_20221213-a8767caf.pth',
    'B0': 'repvgg-B0_8xb32_in1k_20221213-5091ecc7.pth',
    'B1': 'repvgg-B1_8xb32_in1k_20221213-d17c45e7.pth',
    'B1g2': 'repvgg-B1g2_8xb32_in1k_20221213-ae6428fd.pth',
    'B1g4': 'repvgg-B1g4_8xb32_in1k_20221213-a7a4aaea.pth',
    'B2': 'repvgg-B2_8xb32_in1k_20221213-d8b420ef.pth',
    'B2g4': 'repvgg-B2g4_8xb32_in1k_20221213-0c1990eb.pth',
    'B3': 'repvgg-B3_8xb32_in1k_20221213-927a329a.pth',
    'B3g4': 'repvgg-B3g4_8xb32_in1k_20221213-e01cb280.pth',
    'D2se': ('repvgg-D2se_3rdparty_4xb64-autoaug-lbs-mixup-coslr-200e_in1k_'
             '20210909-cf3139b7.pth'),
}


def imagenet_checkpoint(arch: str) -> str:
    """URL of the ImageNet weights OpenMMLab hosts for ``arch`` (downloaded and cached
    by the backbone's Pretrained init on first use)."""
    if arch not in IMAGENET_WEIGHTS:
        raise ValueError(
            f'OpenMMLab hosts no ImageNet weights for RepVGG {arch!r} (it does for '
            f'{", ".join(IMAGENET_WEIGHTS)}); use the official release file instead, '
            "e.g. init_cfg=dict(type='Pretrained', "
            f"checkpoint='checkpoints/RepVGG-{arch}-train.pth'), or init_cfg=None to train "
            'from scratch')
    return OPENMMLAB_REPVGG + IMAGENET_WEIGHTS[arch]
