"""The built-in job: BiFlow on scikit-learn's 8x8 digits, CPU, minutes.

`--config=configs/digits.py` is the README's main job: stage 1 trains a class-conditional
TARFlow (WORKDIR/forward), stage 2 trains the reverse model G against it (WORKDIR/reverse),
then both generate side by side. `:quick` is a shorter run for tests and smoke checks.
`--config.stage=flow` runs stage 1 alone in WORKDIR; `--config.stage=biflow` runs stage 2
alone in WORKDIR, against `--config.forward_workdir`.
"""

import ml_collections

from biflow_jax.models.reverse import reverse_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variant = arg or "full"
    if variant not in ("full", "quick"):
        raise ValueError(f"configs/digits.py takes '' or 'quick', got {arg!r}")
    c = ml_collections.ConfigDict()
    c.stage = "both"  # flow (stage 1) | biflow (stage 2) | both
    c.forward_workdir = ""  # stage 2's frozen flow; `both` sets it to WORKDIR/forward

    c.data = dict(name="digits", data_dir="", folder="", train_split="train", test_split="test",
                  image_size=8, channels=1, num_classes=10, random_flip=False, shuffle_buffer=50_000)

    # 4 blocks x 2 layers, width 64 (one 64-d head), patch 2: 16 tokens of 4 values.
    c.model = dict(img_size=8, in_channels=1, patch_size=2, channels=64, num_blocks=4,
                   layers_per_block=2, num_classes=10, head_dim=64, expansion=4, clip=0.0,
                   dtype="float32")

    c.train = dict(seed=0, batch_size=64, eval_batch_size=300, steps=2000, noise="uniform",
                   noise_std=0.0, label_drop=0.1, ema_decay=0.999, log_every=100, eval_every=1000,
                   checkpoint_every=500, keep_checkpoints=2)

    c.optim = dict(lr=2e-3, init_lr=1e-6, end_lr=1e-5, warmup_steps=100, b1=0.9, b2=0.95,
                   weight_decay=1e-4, grad_clip=1.0)

    c.parallel = dict(backend="jit", fsdp=False)

    # Stage 2: G has one stage per forward block plus a denoising stage (5 here), 2 layers each.
    c.reverse = reverse_config("tiny", num_classes=10)
    c.reverse.update(depth=10, width=64, heads=2)
    c.reverse_train = dict(steps=1500, lr=1e-3, objective="hidden_alignment", adaptive=True, adaptive_p=1.0,
                           adaptive_c=0.01, cfg_training=True, w_min=0.0, w_max=3.0, guidance=1.0)

    c.sample = dict(num_images=100, batch_size=100, guidance=0.0, guide_what="ab", annealed=False,
                    attn_temp=1.0, rule="cfg", solver="cached", noise_scale=1.0, denoise=False,
                    jacobi_tol=1e-4, jacobi_max_iters=0)

    if variant == "quick":
        c.train.update(steps=300, batch_size=64, log_every=50, eval_every=300, checkpoint_every=100)
        c.optim.update(lr=3e-3, warmup_steps=20)
        c.reverse_train.steps = 300
    return c
