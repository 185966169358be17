"""ImageNet-256 in SD-VAE latent space: BiFlow (arXiv:2512.10953) and R-REPA (arXiv:2511.22345).

The flow and G work on 32x32x4 latents of stabilityai/sd-vae-ft-ema (scale 0.18215),
patch 2: 256 tokens of 16 dims. Two steps:
  1. encode the images once (ADM centre crop to 256, image and flip, posterior mean/std) with
     the package's `cli.encode_latents` tool (`python -m <package>.cli.encode_latents`, same config):
       --config=configs/imagenet256_latent.py:b2 --config.latent.vae_path=VAE_DIR \
       --config.latent.source.data_dir=TFDS_DIR --out=LATENTS
  2. train with the package's `main` as for any config, adding
       --config.latent.vae_path=VAE_DIR --config.data.folder=LATENTS
VAE_DIR is a diffusers AutoencoderKL directory (e.g. stabilityai/sd-vae-ft-ema saved with
save_pretrained); nothing is downloaded. Samples and grids are decoded through it.

Variants:
  b2     iTARFlow-B/2 (~120M, stage 1) and BiFlow-B/2 (~133M, stage 2; G = the B/2 preset,
         DiT-B-like). The paper gives the sizes, not the layout: our choice for the flow is
         8 blocks x 2 layers at width 768 (12 heads of 64), soft clip 4 (STARFlow's norm
         control, arXiv:2506.06276), latent noise 0.3 (STARFlow; the papers quote 0.2-0.3).
         160 epochs for each stage (the length of BiFlow's ablations), batch 256, AdamW
         (0.9, 0.95), lr 1e-4 with a one-epoch warmup, EMA 0.9999. Stage 2 adds LPIPS (0.4) and
         ConvNeXt-V2 (0.1) on the VAE-decoded final image (the paper's 2.39-FID recipe); their
         weights files are named by --config.biflow.perceptual.{lpips.vgg16_path,convnext.path}.
  xl2    iTARFlow-XL/2 (~690M; our layout: 6 blocks x 7 layers at width 1152 (DiT-XL's), 18 heads of 64).
  rrepa  R-REPA's latent TARFlow: 8 blocks x 8 layers at width 768 (its ImageNet-64 layout;
         the latent model's width is our choice), noise 0.2, DINOv2-B alignment at blocks
         7 & 8, layer 6, on the VAE-decoded posterior mean (needs --config.align.weights=).
  smoke  a tiny CPU run: a generated image folder (--config.latent.source.folder=), a tiny
         random VAE (--config.latent.vae_path=), both stages for a few steps.
FID (`--mode=eval`, both stages): VAE-decoded samples against ADM's VIRTUAL_imagenet256_labeled.npz
(openai/guided-diffusion evaluations), named until `--ref=` points at it.
Improved flow: b2, xl2 and rrepa use 2D RoPE and SwiGLU (R-REPA's latent flow; BiFlow's
"improved TARFlow"); smoke turns on every option (RoPE, RMSNorm, QK-norm, SwiGLU and a
deep-shallow (1, 2) layer schedule) so the CPU run exercises them in both stages.
"""

import ml_collections

from configs import common

IMAGENET_TRAIN = 1_281_167
STEPS_PER_EPOCH = IMAGENET_TRAIN // 256
VARIANTS = ("b2", "xl2", "rrepa", "smoke")


def latent_imagenet() -> ml_collections.ConfigDict:
    """Stage 1 and 2 of the B/2 pair on ImageNet latents; the other variants change what differs."""
    c = common.base()
    c.stage = "flow"
    c.latent = common.latent(
        enabled=True, vae_path="", scale=0.18215, shift=0.0, decode_batch=64,
        source=common.data(name="imagenet2012", image_size=256, channels=3, num_classes=1000,
                           train_split="train", test_split="validation"))
    c.data = common.data(name="latents", folder="", image_size=32, channels=4, num_classes=1000,
                         train_split="train", test_split="validation", random_flip=True)
    c.model = common.flow_model(img_size=32, in_channels=4, patch_size=2, channels=768, num_blocks=8,
                                layers_per_block=2, num_classes=1000, head_dim=64, clip=4.0, dtype="bfloat16",
                                rope=True, mlp="swiglu")
    c.train = common.flow_train(batch_size=256, eval_batch_size=256, steps=160 * STEPS_PER_EPOCH,
                                noise="gaussian", noise_std=0.3, ema_decay=0.9999, log_every=500,
                                eval_every=10 * STEPS_PER_EPOCH, checkpoint_every=5000, keep_checkpoints=3)
    c.optim = common.optim(lr=1e-4, init_lr=1e-6, end_lr=1e-6, warmup_steps=STEPS_PER_EPOCH, grad_clip=0.0)
    # bits/dim of 8-bit pixels has no meaning for latents. FID-50K (--mode=eval; every=-1: not during training)
    # of VAE-decoded samples against ADM's ImageNet-256 reference batch, named until --ref points at it.
    fid = dict(reference_name="VIRTUAL_imagenet256_labeled.npz", num_samples=50_000)
    c.evals = ml_collections.ConfigDict(dict(fid=common.fid(**fid)))
    c.biflow = common.biflow(
        model=common.reverse_model("B/2", dtype="bfloat16"),
        # remat + chunk 4: the 256-px VAE decode and both networks' backward for 4 samples at a time (a v5e
        # chip holds 32 samples' G step, not their decoder activations; --mode=compile, README).
        perceptual=common.perceptual(lpips=0.4, convnext=0.1, remat=True, chunk=4),
        train=common.loop(batch_size=256, eval_batch_size=256, steps=160 * STEPS_PER_EPOCH, ema_decay=0.9999,
                          log_every=500, eval_every=10 * STEPS_PER_EPOCH, checkpoint_every=5000, keep_checkpoints=3),
        optim=common.optim(lr=1e-4, init_lr=1e-6, end_lr=1e-6, warmup_steps=STEPS_PER_EPOCH, grad_clip=0.0),
        evals=dict(reconstruction=dict(every=10 * STEPS_PER_EPOCH), fid=common.fid(**fid)))
    c.sample = common.sample(num_images=50_000, batch_size=256, guidance=1.0, denoise=True)
    c.parallel.topology = "v5e:2x4"  # 32 images a chip; --mode=compile: every program fits (README)
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Tiny everything: 16x16 images, a 2-level random VAE (8x8x4 latents), 2-class folder, a few steps."""
    c.stage = "both"
    c.latent.source = common.data(name="folder", folder="", image_size=16, channels=3, num_classes=2,
                                  train_split="train", test_split="test")
    c.latent.update(decode_batch=8, shard_size=4, encode_batch=4, store_dtype="float32")
    c.data = common.data(name="latents", folder="", image_size=8, channels=4, num_classes=2, random_flip=True,
                         shuffle_buffer=64)
    c.model = common.flow_model(img_size=8, in_channels=4, patch_size=2, channels=32, num_blocks=2,
                                layers_per_block=1, num_classes=2, head_dim=16, clip=4.0, rope=True,
                                norm="rmsnorm", qk_norm=True, mlp="swiglu", block_layers=(1, 2))
    c.train = common.flow_train(batch_size=4, eval_batch_size=4, steps=3, noise="gaussian", noise_std=0.3,
                                log_every=1, eval_every=3, checkpoint_every=3, keep_checkpoints=1)
    c.optim = common.optim(lr=1e-3, warmup_steps=1)
    c.evals = ml_collections.ConfigDict(dict(fid=common.fid()))  # a generated folder: no ADM reference
    c.biflow = common.biflow(
        model=common.reverse_model("tiny", depth=3, width=32, heads=2),
        train=common.loop(batch_size=4, eval_batch_size=4, steps=3, log_every=1, eval_every=3, checkpoint_every=3,
                          keep_checkpoints=1),
        optim=common.optim(lr=1e-3, warmup_steps=1),
        evals=dict(reconstruction=dict(every=0), fid=common.fid()))
    c.sample = common.sample(num_images=4, batch_size=4, guidance=0.0, denoise=True)
    return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    chosen = common.variant(arg, VARIANTS, "configs/imagenet256_latent.py")
    c = latent_imagenet()
    if chosen == "xl2":
        c.model.update(channels=1152, num_blocks=6, layers_per_block=7)
        c.parallel.topology = "v5p:2x2x4"  # v5p-32: 16 images a chip
    elif chosen == "rrepa":
        c.model.update(num_blocks=8, layers_per_block=8)
        c.train.noise_std = 0.2
        c.align = common.align(enabled=True, locations=[(7, 6), (8, 6)], weight=0.1, projector_hidden=1024,
                               encoder="vitb14", resolution=224, dtype="bfloat16")
        c.parallel.topology = "v5p:2x2x4"
    elif chosen == "smoke":
        c = smoke(c)
        c.parallel.topology = ""  # a CPU run
    return c
