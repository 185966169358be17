"""R-REPA on ImageNet-64 (PAPERS.md section 2): configs/imagenet64.py plus DINOv2-B alignment.

Paper settings: DINOv2 ViT-B/14 on the clean image at 224 (16x16 patches), blocks 7 & 8
(1-indexed forward order), layer 6, lambda 0.1, reverse gradient, projector hidden 1024,
EMA 0.9999, AdamW (0.9, 0.95), lr 1e-4, wd 1e-4, batch 256. The 32x32 (p2) or 16x16 (p4)
token grid is area-pooled / matched to DINO's 16x16 grid.
Needs `--config.align.weights=` a transformers `facebook/dinov2-base` directory or
`dinov2_vitb14_pretrain.pth`.
"""

import ml_collections

from biflow_jax.objectives.rrepa import default_align_config
from configs import imagenet64


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = imagenet64.get_config(arg)
    c.align = default_align_config()
    c.align.update(enabled=True, locations=[(7, 6), (8, 6)], weight=0.1, mode="reverse", reverse_passes=1,
                   projector_hidden=1024, encoder="vitb14", weights="", random_init=False, registers=False,
                   resolution=224, dtype="bfloat16")
    c.train.ema_decay = 0.9999
    return c
