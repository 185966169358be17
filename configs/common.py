"""The sections every experiment config builds on (data only: no biflow_jax, no TensorFlow).

An experiment file calls `base()` and overrides what differs. Sections:
  stage     'flow' (stage 1), 'biflow' (stage 2 against biflow.flow_init) or 'both'
            (WORKDIR/forward then WORKDIR/reverse: the two-stage job)
  data      dataset (digits | folder | a prepared TFDS name), image size, classes
  model     the forward flow (TARFlow, arXiv:2412.06329); `name` picks the class
  train     stage 1's loop: batch, steps, noise, EMA, logging/eval/checkpoint cadence
  optim     stage 1's AdamW and schedule
  align     R-REPA (arXiv:2511.22345), off unless enabled
  evals     stage 1's evaluators, by name -> {every: steps (0 = at the end only), ...}; `fid`
            (every -1: not in training) also holds `--mode=eval`'s FID-50K settings
  biflow    stage 2 (BiFlow, arXiv:2512.10953): flow_init, G's `model` (a variant string +
            overrides), the objective, its perceptual terms, and its own train / optim / evals sections
  sample    exact-inverse sampling settings (guidance, solver, denoising)
  latent    VAE latent space (data.name='latents'), off unless enabled
  parallel  jit | pmap backend, fsdp, and the TPU slice the config is sized for (`--mode=compile`)
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def data(**overrides) -> ml_collections.ConfigDict:
    fields = dict(name="digits", data_dir="", folder="", train_split="train", test_split="test", image_size=8,
                  channels=1, num_classes=10, random_flip=False, shuffle_buffer=50_000, label_key="label",
                  skip_unreadable=False,  # folder data: leave out files that do not decode (all decoded at start)
                  max_pixels=int(1.5 * 4096**2))  # folder data: larger images (by their header) are refused
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def flow_model(**overrides) -> ml_collections.ConfigDict:
    """TARFlow as ml-tarflow builds it (one head per 64 channels, 4x MLP, no clip by default).

    Improved-flow options, all off by default (docs/tarflow.md): rope (2D RoPE instead of the
    learned positions; head_dim % 4 == 0), norm 'layernorm'|'rmsnorm', qk_norm, mlp 'gelu'|'swiglu'
    (ours: SiLU gate, hidden ceil(8C/3) to 8)|'geglu_starflow' (STARFlow's: tanh-GELU gate, hidden
    C * expansion), block_layers (per-block layer counts in forward order, e.g. STARFlow's deep-shallow
    (2, 2, 2, 2, 2, 24); () = layers_per_block for every block), clip_shift (the soft clip `clip` acts
    on the shift too, as STARFlow's code does; ours clips the log-scale only).
    """
    fields = dict(name="tarflow", img_size=8, in_channels=1, patch_size=2, channels=64, num_blocks=4,
                  layers_per_block=2, num_classes=10, head_dim=64, expansion=4, clip=0.0, dtype="float32",
                  scan_layers=False, remat="none",  # nn.scan over each block's layers; "none"|"full"|"dots"
                  rope=False, norm="layernorm", qk_norm=False, mlp="gelu", block_layers=(),
                  clip_shift=False)
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def loop(**overrides) -> ml_collections.ConfigDict:
    """A stage's training loop. `ema_warmup`: the EMA decay ramps as min(decay, (1+t)/(10+t))."""
    fields = dict(seed=0, batch_size=64, eval_batch_size=300, steps=2000, ema_decay=0.999, ema_warmup=True,
                  log_every=100, eval_every=1000, checkpoint_every=500, keep_checkpoints=2,
                  on_damaged_checkpoint="fallback")  # or 'stop': a newest step that does not read stops the run
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def flow_train(**overrides) -> ml_collections.ConfigDict:
    """Stage 1's loop plus the input noise of the flow and label dropout for guidance."""
    fields = loop().to_dict()
    fields.update(noise="uniform", noise_std=0.0, label_drop=0.1)
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def optim(**overrides) -> ml_collections.ConfigDict:
    fields = dict(lr=2e-3, init_lr=1e-6, end_lr=1e-5, warmup_steps=100, b1=0.9, b2=0.95, weight_decay=1e-4,
                  grad_clip=1.0)
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def align(**overrides) -> ml_collections.ConfigDict:
    """R-REPA: locations are 1-indexed (block in forward order, layer); encoder is a DINOv2 size."""
    fields = dict(enabled=False, locations=[(7, 6), (8, 6)], weight=0.1, mode="reverse", reverse_passes=1,
                  projector_hidden=1024, encoder="vitb14", weights="", random_init=False, registers=False,
                  resolution=224, dtype="float32")
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def reverse_model(variant: str = "B/2", **overrides) -> ml_collections.ConfigDict:
    """BiFlow's G: a size preset ('tiny', 'B/2', 'L/2', 'XL/2') and optional overrides.

    Fields left as None take the preset's value. G's classes, token grid and stage count
    come from the forward flow it inverts, never from here.
    """
    fields = dict(variant=variant, depth=placeholder(int), width=placeholder(int), heads=placeholder(int),
                  mlp_ratio=placeholder(float), layers_per_stage=[], guidance_conditioning=True,
                  stage_bottleneck=False, dtype="float32")
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def perceptual(lpips: float = 0.0, convnext: float = 0.0, dino: float = 0.0, **overrides) -> ml_collections.ConfigDict:
    """Stage 2's perceptual terms on G's final image (BiFlow, arXiv:2512.10953); a weight of 0 turns one off.

    lpips: VGG16 trunk (a torchvision vgg16 state_dict, `vgg16_path`) + the lpips package's
    calibration (`lin_path`; '' = the copy shipped in the installed lpips package).
    convnext: a save_pretrained directory of facebook/convnextv2-base-22k-224 (`path`); `normalize`
    'imagenet' feeds it ImageNet mean/std-normalised crops (the checkpoint's training input), 'none'
    the [-1, 1] crops as they are (the BiFlow group's pMF code).
    dino: a DINOv2 directory or torch-hub .pth (`path`; `size` only for .pth files).
    Each enabled term's file must exist or stage 2 stops at start naming it. Paired
    random-resized crops (`crop_scale` of the area, `crop_ratio` aspect) resized to `crop_size`
    px; `remat` recomputes the networks' activations (and, in latent space, the VAE decoder's) in
    the backward pass; `chunk` > 0 runs decode + terms `chunk` samples at a time under remat (the
    backward then holds one chunk's activations: what makes a 256-px VAE decode fit a TPU chip).
    """
    fields = dict(lpips=dict(weight=lpips, vgg16_path="", lin_path=""),
                  convnext=dict(weight=convnext, path="", normalize="imagenet"),
                  dino=dict(weight=dino, path="", size="vitb14"), crop_size=224, crop_scale=(0.08, 1.0),
                  crop_ratio=(3 / 4, 4 / 3), remat=False, chunk=0, dtype="float32")
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def fid(**overrides) -> ml_collections.ConfigDict:
    """FID-50K settings, in `evals.fid` (exact inverse) and `biflow.evals.fid` (BiFlow's 1-NFE G).

    Read by the `fid` evaluator during training (`every` steps; 0 = at the end; -1 = never) on
    `train_samples` samples, and by `--mode=eval` on `num_samples`. reference: an ADM-format
    reference batch .npz (`reference_name`: the published file the config expects, named when
    it is missing; make others with the package's `cli.ref_stats` tool). inception:
    pytorch-fid's pt_inception-2015-12-05-6726825d.pth; `random_inception` is for tests and the
    digits only. guidance None: sample.guidance (exact) or biflow.guidance (BiFlow, if CFG-trained).
    convention: 'adm' (ADM's TF-graph resize, what ADM's VIRTUAL_* reference batches hold) or
    'pytorch_fid'; scoring a reference made in the other convention stops unless
    `allow_convention_mismatch=True` says the figures are knowingly not comparable.
    """
    fields = dict(every=-1, train_samples=5000, num_samples=50_000, reference="", reference_name="", inception="",
                  random_inception=False, convention="adm", inception_size=299, batch_size=256, chunk_size=5000,
                  guidance=placeholder(float), cfg_scale=0.0, seed=0, precision_recall=True, is_split_size=5000,
                  allow_convention_mismatch=False)
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def biflow(**overrides) -> ml_collections.ConfigDict:
    """Stage 2. flow_init: the stage-1 workdir G inverts ('' in the two-stage job: WORKDIR/forward)."""
    c = ml_collections.ConfigDict(dict(
        flow_init="", model=reverse_model("tiny"), objective="hidden_alignment", adaptive=True, adaptive_p=1.0,
        adaptive_c=0.01, cfg_training=True, w_min=0.0, w_max=3.0, guidance=1.0, label_drop=0.1,
        train=loop(steps=1500), optim=optim(lr=1e-3), perceptual=perceptual(),
        evals=dict(reconstruction=dict(every=1000), fid=fid())))
    for key, value in overrides.items():  # whole sections are replaced, not merged
        c[key] = value
    return c


def latent(**overrides) -> ml_collections.ConfigDict:
    """Latent space (the SD VAE of BiFlow arXiv:2512.10953 and R-REPA arXiv:2511.22345), off unless enabled.

    vae_path: a diffusers AutoencoderKL directory (e.g. one saved from stabilityai/sd-vae-ft-ema);
    scale / shift map its posterior to the flow's input, (z - shift) * scale. `source` is the
    image dataset the package's `cli.encode_latents` tool encodes (ADM centre crop to
    source.image_size, image and flip) into data.folder, with data.name='latents'.
    """
    fields = dict(enabled=False, vae_path="", scale=0.18215, shift=0.0, vae_dtype="float32", decode_batch=64,
                  source=data(name="folder", image_size=256, channels=3, num_classes=1000),
                  store_dtype="float16", shard_size=10_000, encode_batch=64)
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def sample(**overrides) -> ml_collections.ConfigDict:
    fields = dict(num_images=100, batch_size=100, guidance=0.0, guide_what="ab", annealed=False, attn_temp=1.0,
                  rule="cfg", solver="cached", noise_scale=1.0, denoise=False, jacobi_tol=1e-4, jacobi_max_iters=0)
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def base() -> ml_collections.ConfigDict:
    """Every section at its default: the digits-sized TARFlow, stage 1 only."""
    c = ml_collections.ConfigDict()
    c.stage = "flow"
    c.data = data()
    c.model = flow_model()
    c.train = flow_train()
    c.optim = optim()
    # topology: the TPU slice the config is sized for ('' = none named), the default of --mode=compile.
    c.parallel = ml_collections.ConfigDict(dict(backend="jit", fsdp=False, topology=""))
    c.align = align()
    c.evals = ml_collections.ConfigDict(dict(bpd=dict(every=1000), fid=fid()))
    c.biflow = biflow()
    c.sample = sample()
    c.latent = latent()
    return c


def variant(arg: str, choices: tuple[str, ...], file: str) -> str:
    """The config's `:ARG` (first choice when empty), or a clear error naming the choices."""
    chosen = arg or choices[0]
    if chosen not in choices:
        raise ValueError(f"{file} takes one of {list(choices)} after ':', got {arg!r}")
    return chosen
