"""R-REPA on ImageNet-64 (arXiv:2511.22345): configs/imagenet64.py plus DINOv2-B alignment.

The same variants and data as configs/imagenet64.py: `:p2` / `:p4` class-conditional on labelled
TFDS `imagenet2012` (centre-cropped to 64), `:uncond` on `downsampled_imagenet/64x64` without labels.

Paper settings: DINOv2 ViT-B/14 on the clean image at 224 (16x16 patches), blocks 7 & 8
(1-indexed forward order), layer 6, lambda 0.1, reverse gradient, projector hidden 1024.
The 32x32 (p2) or 16x16 (p4) token grid is area-pooled / matched to DINO's 16x16 grid.
Needs `--config.align.weights=` a transformers `facebook/dinov2-base` directory or
`dinov2_vitb14_pretrain.pth`.
"""

import ml_collections

from configs import common, imagenet64

VARIANTS = imagenet64.VARIANTS


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = imagenet64.get_config(arg)
    c.align = common.align(enabled=True, locations=[(7, 6), (8, 6)], weight=0.1, projector_hidden=1024,
                           encoder="vitb14", resolution=224, dtype="bfloat16")
    return c
