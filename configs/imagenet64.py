"""ImageNet-64 class-conditional TARFlow, the paper's settings (ml-tarflow README, PAPERS.md 1).

`:p2` (default): patch 2, width 768, 8 blocks x 8 layers (~450M params).
`:p4`: patch 4, width 1024. Needs `--config.data.data_dir` holding a prepared TFDS
`downsampled_imagenet/64x64` (or `imagenet2012`, resized here to 64).
"""

import ml_collections

from configs import digits

STEPS_PER_EPOCH = 1_281_167 // 256


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variant = arg or "p2"
    sizes = {"p2": (2, 768), "p4": (4, 1024)}
    if variant not in sizes:
        raise ValueError(f"configs/imagenet64.py takes one of {sorted(sizes)}, got {arg!r}")
    patch, width = sizes[variant]
    c = digits.get_config()
    c.data.update(name="downsampled_imagenet/64x64", image_size=64, channels=3, num_classes=1000,
                  random_flip=True, label_key="label")
    c.model.update(img_size=64, in_channels=3, patch_size=patch, channels=width, num_blocks=8,
                   layers_per_block=8, num_classes=1000, dtype="bfloat16")
    c.train.update(batch_size=256, eval_batch_size=256, steps=300 * STEPS_PER_EPOCH, noise="gaussian",
                   noise_std=0.05, label_drop=0.1, ema_decay=0.9999, log_every=100,
                   eval_every=10 * STEPS_PER_EPOCH, checkpoint_every=5000, keep_checkpoints=3)
    c.optim.update(lr=1e-4, init_lr=1e-6, end_lr=1e-6, warmup_steps=STEPS_PER_EPOCH, b1=0.9, b2=0.95,
                   weight_decay=1e-4, grad_clip=0.0)
    c.sample.update(num_images=50_000, batch_size=256, guidance=1.7, denoise=True)
    return c
