"""AFHQ-256 class-conditional TARFlow (3 classes), patch 8, noise 0.07 (TARFlow, arXiv:2412.06329).

Point `--config.data.folder` at an image folder FOLDER/{train,test}/{cat,dog,wild}/*.jpg.
Runs stage 1 by default; the `biflow` section trains a B/2-sized G over the flow's 3 classes.

BiFlow (arXiv:2512.10953) settings: `model.clip=4` (soft clip of the forward log-scales,
STARFlow's norm control, arXiv:2506.06276) and LPIPS (0.4) + ConvNeXt-V2 (0.1) on G's final
image in stage 2. Their weights are not shipped: stage 2 stops at start naming each missing
file until `--config.biflow.perceptual.lpips.vgg16_path=` (a torchvision vgg16 state_dict) and
`--config.biflow.perceptual.convnext.path=` (facebook/convnextv2-base-22k-224 saved with
save_pretrained) are given, or a term's weight is set to 0.
"""

import ml_collections

from configs import common

VARIANTS = ("",)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    common.variant(arg, VARIANTS, "configs/afhq256.py")
    c = common.base()
    c.data = common.data(name="folder", image_size=256, channels=3, num_classes=3, random_flip=True)
    c.model = common.flow_model(img_size=256, in_channels=3, patch_size=8, channels=768, num_blocks=8,
                                layers_per_block=8, num_classes=3, dtype="bfloat16", clip=4.0)
    c.train = common.flow_train(batch_size=256, eval_batch_size=256, steps=200_000, noise="gaussian", noise_std=0.07,
                                ema_decay=0.9999, eval_every=10_000, checkpoint_every=5000, keep_checkpoints=3)
    c.optim = common.optim(lr=1e-4, init_lr=1e-6, end_lr=1e-6, warmup_steps=2000, grad_clip=0.0)
    # FID-50K (--mode=eval; every=-1: not during training): no ADM file exists for AFHQ, so the reference is
    # made from the training images with the package's `cli.ref_stats` tool and given as --ref.
    fid = dict(num_samples=50_000, batch_size=64)
    c.evals = ml_collections.ConfigDict(dict(bpd=dict(every=10_000), fid=common.fid(guidance=1.0, **fid)))
    c.biflow = common.biflow(
        model=common.reverse_model("B/2", dtype="bfloat16"),
        perceptual=common.perceptual(lpips=0.4, convnext=0.1),
        train=common.loop(batch_size=256, eval_batch_size=256, steps=100_000, ema_decay=0.9999, eval_every=10_000,
                          checkpoint_every=5000, keep_checkpoints=3),
        optim=common.optim(lr=1e-4, init_lr=1e-6, end_lr=1e-6, warmup_steps=2000, grad_clip=0.0),
        evals=dict(reconstruction=dict(every=10_000), fid=common.fid(**fid)))
    c.sample = common.sample(num_images=10_000, batch_size=64, guidance=1.0, denoise=True)
    c.parallel.topology = "v5p:2x4x4"  # the slice --mode=compile sizes it for (README)
    return c
