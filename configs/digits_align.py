"""The digits job (configs/digits.py) with R-REPA alignment to a frozen DINOv2 ViT-S/14.

Needs DINOv2 weights on disk: `--config.align.weights=/path/to/dinov2-small` (a
transformers directory) or `/path/to/dinov2_vits14_pretrain.pth`; without them training
stops at start saying so. `--config.align.random_init=True` aligns to a random encoder:
only for smoke tests.

The 4x4 token grid (8x8 images, patch 2) matches DINO's grid at resolution 56 (4x4
patches of 14 pixels), so no resampling is needed. Projector hidden 256, not the paper's
1024: at flow width 64 a 1024-wide projector would cost more than the flow itself.
Locations: the last two blocks in forward order (the first two the sampler runs), layer 1
of 2 (the paper's layer 6 of 8 is the last-but-one quarter of the block).
"""

import ml_collections

from configs import common, digits

VARIANTS = digits.VARIANTS


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = digits.get_config(arg)
    c.align = common.align(enabled=True, locations=[(3, 1), (4, 1)], weight=0.1, projector_hidden=256,
                           encoder="vits14", resolution=56)
    return c
