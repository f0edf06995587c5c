"""SVD-style image-to-video on the procedural shapes clips, sized for a CPU (no text prompt).

The i2v stage of configs/svd.py (`ImageToVideoTask`: the clip's first frame conditions a video UNet
through a frozen CLIP image embedding and its VAE latents concatenated on channels; v-EDM loss,
log-normal σ, EDM weighting; Euler on Karras σ) trained from scratch on configs/shapes.py's 8-frame
32-px clips, with the shapes recipe's pieces:
  VAE         the shapes autoencoder stages: ROOT/autoencoder_video (the temporal decoder fine-tuned
              from ROOT/autoencoder's KL autoencoder, as the shapes video stage uses it), frozen,
              latents scaled by 1/std measured on rendered frames (`scale_from='shapes'`)
  UNet        the shapes video stage's UNet module config (two levels, 32/64 channels), inflated by
              `ldm.temporal` with SVD's added time ids; its input conv takes 2 × 4 latent channels
  image tower a small CLIP image encoder (IMAGE_ENCODER), frozen: trained by stage=clip (`clip=`),
              else random
  schedule    SD's scaled-linear β 0.00085–0.012 over 1000 steps (module config, no folder)

  python -m vldm.train --config configs/shapes.py:stage=autoencoder,root=ROOT \
      --workdir ROOT/autoencoder
  python -m vldm.train --config configs/shapes.py:stage=autoencoder_video,root=ROOT \
      --workdir ROOT/autoencoder_video
  python -m vldm.train --config configs/svd_shapes.py:stage=clip,root=ROOT --workdir ROOT/clip
  python -m vldm.train --config configs/svd_shapes.py:root=ROOT,clip=ROOT/clip --workdir ROOT/i2v
  python -m vldm.eval.i2v_shapes --workdir ROOT/i2v --num_clips 72 --out ROOT/report

The image tower: SVD conditions on a trained CLIP's embedding of the frame (what is in it) beside
its latents (where). No published CLIP has seen these frames, so `stage=clip` trains one on the
shapes stills and their captions, contrastively as CLIP is trained (`vldm.recipes.
contrastive_clip`), and the i2v stage reads its image tower frozen (`clip=`). Without `clip` the
tower is random and frozen: its embedding carries colour at most, and the model must find the
shape in the latents alone (docs/svd_shapes.md measures both).

Args: stage ('i2v', default, or 'clip'), root (required: the folder holding ROOT/autoencoder_video;
data in ROOT/data unless data_dir), steps (default 1000 for i2v, 600 for clip), data_dir, image (a
trained shapes image stage, configs/shapes.py:stage=image: the UNet starts from it, widened and
inflated; default: from scratch), clip (a trained stage=clip workdir: the frozen image tower),
runlocal (tiny step count and sampler, for a smoke test).
"""

import os

import ml_collections
from ml_collections import config_dict

from configs import common
from configs import shapes
from configs import svd

FRAMES = 8
RESOLUTION = 32
STAGES = ("i2v", "clip")
DEFAULT_STEPS = dict(i2v=1000, clip=600)
# The image tower, random (no `clip`) or trained by stage=clip: 8 × 8 patches of 4 px.
IMAGE_ENCODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=RESOLUTION,
    patch_size=4,
)
PROJECTION_DIM = 64  # the UNet's cross-attention width (configs/shapes.py's video stage)
BATCH, LR, WARMUP = 8, 1e-3, 50  # the shapes video stage's batch, peak rate and warmup


def get_config(arg=None):
  arg = common.parse_arg(
      arg, stage="i2v", root="", steps=0, data_dir="", image="", clip="", runlocal=False
  )
  if arg.stage not in STAGES:
    raise ValueError(f"Unknown stage {arg.stage!r}; configs/svd_shapes.py has {STAGES}.")
  if not arg.root:
    raise ValueError(
        "configs/svd_shapes.py needs root=DIR, the folder holding "
        "DIR/autoencoder_video (configs/shapes.py:stage=autoencoder_video)."
    )
  root = os.path.abspath(arg.root)
  local = arg.runlocal
  steps = 3 if local else (arg.steps or DEFAULT_STEPS[arg.stage])
  if arg.stage == "clip":
    return clip_config(root, steps, arg.data_dir, local)

  config = common.base_config()
  config.task = svd.IMAGE_TASK
  config.stage = "i2v"
  config.host_init = True  # tiny models: initial weights drawn on the host
  config.prng_impl = "rbg"  # XLA:CPU compiles threefry slowly (as configs/shapes.py)
  config.dtype = "float32"
  config.total_steps = steps
  config.batch_size = 2 if local else BATCH
  config.log_every = 1 if local else 25
  config.checkpoint_every = 0  # at the end (and on preemption) only
  config.keep_checkpoints = 1
  config.tensorboard = False
  config.sample_every = 0
  config.optim.lr = LR
  config.optim.warmup_steps = 1 if local else WARMUP
  config.optim.decay = "cosine"
  config.optim.end_lr_factor = 0.1
  # EMA over about the last tenth of the run (configs/shapes.py's rule for short runs).
  config.ema_decay = 0.0 if local else 1 - 10 / steps

  # The shapes video data (as configs/shapes.py's video stage builds it); captions are unused.
  video = shapes.get_config(f"stage=video,root={root},runlocal={local}")
  config.data = video.data
  config.data.caption_dropout = 0.0
  config.data.resolution = RESOLUTION
  config.data.frames = FRAMES
  config.data.data_dir = arg.data_dir or os.path.join(root, "data")
  config.data.batch_size = config.get_ref("batch_size")

  c = svd.ldm_config("i2v", "", FRAMES, False, False, "")
  c.pretrained = config_dict.placeholder(str)  # every component from a module config or workdir
  c.pretrained_components = ()
  # UNet: the shapes video stage's module config (an image UNet; `ldm.temporal` inflates it and the
  # task widens its input conv to 2 × the latent channels).
  c.unet.model = shapes.ldm_config("video", False).unet.model
  c.unet.model.sample_size = RESOLUTION // 4
  # Added time ids [fps − 1, motion bucket, σ_aug], each embedded at this width (SVD: 256).
  time_embed = 32
  c.temporal.addition_time_embed_dim = time_embed
  c.temporal.projection_class_embeddings_input_dim = 3 * time_embed
  c.temporal.eps_convention = "svd"  # as configs/svd.py (the SVD layout)
  # VAE: the shapes autoencoder's temporal-decoder stage, frozen, as configs/shapes.py's video stage
  # takes it, and scaled as it scales it.
  c.vae = shapes.ldm_config("video", False).vae
  c.vae.workdir = os.path.join(root, "autoencoder_video")
  c.schedule = ml_collections.ConfigDict(
      dict(
          num_train_timesteps=1000,
          beta_start=0.00085,
          beta_end=0.012,
          beta_schedule="scaled_linear",
      )
  )
  c.prediction_type = "v_edm"
  c.noise_sampling, c.weighting = "lognormal", "edm"
  c.p_mean, c.p_std = svd.NOISE["i2v"]
  c.sampler.name = "euler"
  c.sampler.options = ml_collections.ConfigDict(svd.SVD_SAMPLER)
  c.sampler.num_steps = 2 if local else 25
  c.train = "all"
  c.latent_cache_dir = config_dict.placeholder(str)
  config.ldm = c
  c.image_encoder.model = ml_collections.ConfigDict(IMAGE_ENCODER)
  c.image_encoder.workdir = os.path.abspath(arg.clip) if arg.clip else config_dict.placeholder(str)
  if arg.image:  # start from a trained shapes image stage: its spatial layers know the shapes
    config.init_from.workdir = os.path.abspath(arg.image)
    config.init_from.transform = "inflate_to_image_to_video"
  return config


def clip_config(root: str, steps: int, data_dir: str, local: bool):
  """stage=clip: the image tower and a text tower trained contrastively on the shapes stills and
  their captions (configs/shapes.py's image-stage data, no caption dropout)."""
  config = common.base_config()
  config.task = "vldm.recipes.contrastive_clip:ContrastiveClipTask"
  config.stage = "clip"
  config.prng_impl = "rbg"
  config.dtype = "float32"
  config.total_steps = steps
  config.batch_size = 4 if local else 64
  config.log_every = 1 if local else 50
  config.checkpoint_every = 0
  config.keep_checkpoints = 1
  config.tensorboard = False
  config.sample_every = 0
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 1 if local else 50
  config.optim.decay = "cosine"
  config.optim.end_lr_factor = 0.1
  config.ema_decay = 0.0
  image = shapes.get_config(f"stage=image,root={root},runlocal={local}")
  config.data = image.data
  config.data.caption_dropout = 0.0
  config.data.resolution = RESOLUTION
  config.data.data_dir = data_dir or os.path.join(root, "data")
  config.data.batch_size = config.get_ref("batch_size")
  c = ml_collections.ConfigDict()
  c.projection_dim = PROJECTION_DIM
  c.image_encoder = ml_collections.ConfigDict(
      dict(folder=config_dict.placeholder(str), model=ml_collections.ConfigDict(IMAGE_ENCODER))
  )
  c.text_encoder = image.ldm.text_encoder
  c.text_encoder.train = True
  c.tokenizer = image.ldm.tokenizer
  c.pretrained = config_dict.placeholder(str)
  config.ldm = c
  return config
