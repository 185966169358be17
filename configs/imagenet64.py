"""ImageNet-64 TARFlow, the paper's settings (TARFlow, arXiv:2412.06329).

`:p2` (default): class-conditional, patch 2, width 768, 8 blocks x 8 layers. `:p4`: patch 4, width 1024.
As the paper's recipe (ml-tarflow), the conditional flows train on the labelled full ImageNet,
TFDS `imagenet2012` (train; `validation` as the test split), each image centre-cropped to a
square and resized to 64 by the input pipeline: `--config.data.data_dir` must hold it prepared.
`:uncond`: the unconditional flow (patch 2, width 768) on TFDS `downsampled_imagenet/64x64`
(64x64 images, no labels; train / validation): no classes, no label dropout, no guidance; its
FID reference is made from that set's train split with the package's `cli.ref_stats` tool (ADM
publishes only the labelled VIRTUAL_imagenet64_labeled.npz, the conditional flows' reference).
Runs stage 1 by default; its `biflow` section is a real stage 2 (a BiFlow-B/2-sized G over the
flow's classes): `--config.stage=biflow --config.biflow.flow_init=STAGE1_DIR`.

BiFlow (arXiv:2512.10953) settings on both stages: the forward flow's log-scales are soft-clipped
(`model.clip=4`, STARFlow's norm control, arXiv:2506.06276), and stage 2 adds LPIPS (0.4) and
ConvNeXt-V2 (0.1) on G's final image. Their weights files are not shipped, so stage 2 stops at
start naming each one until given: `--config.biflow.perceptual.lpips.vgg16_path=` a torchvision
vgg16 state_dict (vgg16-397923af.pth; the LPIPS calibration comes from the installed lpips
package) and `--config.biflow.perceptual.convnext.path=` a save_pretrained directory of
facebook/convnextv2-base-22k-224 (or `...lpips.weight=0` / `...convnext.weight=0` to go without).
"""

import ml_collections

from configs import common

STEPS_PER_EPOCH = 1_281_167 // 256
VARIANTS = ("p2", "p4", "uncond")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variant = common.variant(arg, VARIANTS, "configs/imagenet64.py")
    patch, width = {"p2": (2, 768), "p4": (4, 1024), "uncond": (2, 768)}[variant]
    conditional = variant != "uncond"
    classes = 1000 if conditional else 0
    c = common.base()
    c.stage = "flow"
    c.data = common.data(name="imagenet2012" if conditional else "downsampled_imagenet/64x64", image_size=64,
                         channels=3, num_classes=classes, train_split="train", test_split="validation",
                         random_flip=True)
    c.model = common.flow_model(img_size=64, in_channels=3, patch_size=patch, channels=width, num_blocks=8,
                                layers_per_block=8, num_classes=classes, dtype="bfloat16", clip=4.0)
    c.train = common.flow_train(batch_size=256, eval_batch_size=256, steps=300 * STEPS_PER_EPOCH, noise="gaussian",
                                noise_std=0.05, ema_decay=0.9999, eval_every=10 * STEPS_PER_EPOCH,
                                checkpoint_every=5000, keep_checkpoints=3, label_drop=0.1 if conditional else 0.0)
    c.optim = common.optim(lr=1e-4, init_lr=1e-6, end_lr=1e-6, warmup_steps=STEPS_PER_EPOCH, grad_clip=0.0)
    # FID-50K as the papers report it (--mode=eval; every=-1: not during training) against ADM's reference
    # batch; the run stops at eval start naming the file until evals.fid.reference / --ref points at it.
    # Unconditional: no ADM file, the reference is given as --ref (ref_stats of downsampled_imagenet/64x64 train).
    fid = dict(reference_name="VIRTUAL_imagenet64_labeled.npz" if conditional else "", num_samples=50_000)
    guidance = 1.7 if conditional else 0.0
    c.evals = ml_collections.ConfigDict(dict(bpd=dict(every=10 * STEPS_PER_EPOCH),
                                             fid=common.fid(guidance=guidance, **fid)))
    c.biflow = common.biflow(
        model=common.reverse_model("B/2", dtype="bfloat16"),
        perceptual=common.perceptual(lpips=0.4, convnext=0.1),
        train=common.loop(batch_size=256, eval_batch_size=256, steps=160 * STEPS_PER_EPOCH, ema_decay=0.9999,
                          eval_every=10 * STEPS_PER_EPOCH, checkpoint_every=5000, keep_checkpoints=3),
        optim=common.optim(lr=1e-4, init_lr=1e-6, end_lr=1e-6, warmup_steps=STEPS_PER_EPOCH, grad_clip=0.0),
        evals=dict(reconstruction=dict(every=10 * STEPS_PER_EPOCH), fid=common.fid(**fid)))
    if not conditional:  # G without classes: no training-time CFG, no label dropout, no trained-in guidance
        c.biflow.update(cfg_training=False, label_drop=0.0, guidance=0.0)
    c.sample = common.sample(num_images=50_000, batch_size=256, guidance=guidance, denoise=True)
    c.parallel.topology = "v5p:2x4x4" if patch == 2 else "v5p:2x2x4"  # what --mode=compile sizes it for
    return c
