"""The built-in job: a class-conditional TARFlow on scikit-learn's 8x8 digits, CPU, minutes.

`--config=configs/digits.py` is the README's main job; `:quick` is a shorter run for
tests and smoke checks.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variant = arg or "full"
    if variant not in ("full", "quick"):
        raise ValueError(f"configs/digits.py takes '' or 'quick', got {arg!r}")
    c = ml_collections.ConfigDict()

    c.data = dict(name="digits", data_dir="", folder="", train_split="train", test_split="test",
                  image_size=8, channels=1, num_classes=10, random_flip=False, shuffle_buffer=50_000)

    # 4 blocks x 2 layers, width 64 (one 64-d head), patch 2: 16 tokens of 4 values.
    c.model = dict(img_size=8, in_channels=1, patch_size=2, channels=64, num_blocks=4,
                   layers_per_block=2, num_classes=10, head_dim=64, expansion=4, clip=0.0,
                   dtype="float32")

    c.train = dict(seed=0, batch_size=128, eval_batch_size=300, steps=3000, noise="uniform",
                   noise_std=0.0, label_drop=0.1, ema_decay=0.999, log_every=100, eval_every=1000,
                   checkpoint_every=500, keep_checkpoints=2)

    c.optim = dict(lr=1e-3, init_lr=1e-6, end_lr=1e-5, warmup_steps=200, b1=0.9, b2=0.95,
                   weight_decay=1e-4, grad_clip=1.0)

    c.parallel = dict(backend="jit", fsdp=False)

    c.sample = dict(num_images=100, batch_size=100, guidance=0.0, guide_what="ab", annealed=False,
                    attn_temp=1.0, rule="cfg", solver="cached", noise_scale=1.0, denoise=False,
                    jacobi_tol=1e-4, jacobi_max_iters=0)

    if variant == "quick":
        c.train.update(steps=300, batch_size=64, log_every=50, eval_every=300, checkpoint_every=100)
        c.optim.update(lr=3e-3, warmup_steps=20)
    return c
