"""AFHQ-256 class-conditional TARFlow (3 classes), patch 8, noise 0.07 (PAPERS.md 1).

Point `--config.data.folder` at an image folder FOLDER/{train,test}/{cat,dog,wild}/*.jpg.
"""

import ml_collections

from configs import digits


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = digits.get_config()
    c.data.update(name="folder", folder="", image_size=256, channels=3, num_classes=3, random_flip=True)
    c.model.update(img_size=256, in_channels=3, patch_size=8, channels=768, num_blocks=8,
                   layers_per_block=8, num_classes=3, dtype="bfloat16")
    c.train.update(batch_size=256, eval_batch_size=256, steps=200_000, noise="gaussian", noise_std=0.07,
                   ema_decay=0.9999, eval_every=10_000, checkpoint_every=5000, keep_checkpoints=3)
    c.optim.update(lr=1e-4, init_lr=1e-6, end_lr=1e-6, warmup_steps=2000, grad_clip=0.0)
    c.sample.update(num_images=10_000, batch_size=64, guidance=1.0, denoise=True)
    return c
