"""The shapes recipe: Video LDM's stages on the procedural shapes dataset, sized for a laptop CPU.

Stages, in order (each a `python -m vldm.train` run in ROOT/<stage>; later stages read earlier
ones through `init_from` and `ldm.vae.workdir`):
  autoencoder        KL autoencoder + PatchGAN on 32-px frames (32 px → 8×8×4 latents)
  autoencoder_video  its temporal decoder fine-tuned on 8-frame clips, encoder frozen
  image              text-to-image LDM on 32-px stills; the text encoder trains with it
  video              temporal layers inserted (inflation), spatial layers and text frozen;
                     8-frame 32-px clips
  hires              the video model fine-tuned on 64-px clips as Video LDM's latent upsampler:
                     conditioned on the clip's 32-px latents, it samples after the video stage
  prediction         (long videos, `python -m vldm.demo --long`) the video model conditioned on
                     the first 0, 1 or 2 frames of slower 8-frame clips (tempo 2.5: motion that
                     continues for 32 frames inside the frame); it makes its own first chunk
                     (nothing given) and extends clips two frames at a time of context
  interpolation      the video model conditioned on key frames every 4th frame of 9-frame clips
                     at 4× (T → 4T) or 16× (4T → 16T) the video stage's frame rate, the regime
                     told by the clip's fps

  python -m vldm.train --config configs/shapes.py:stage=image,root=runs/shapes \
      --workdir runs/shapes/image
  python -m vldm.demo --workdir runs/shapes      # every stage, sampling and the oracle's report

Args: stage, root (the folder of stage workdirs), data_dir (TFDS; default ROOT/data when root is
set), runlocal (tiny models, data and step counts: seconds per stage, for tests).
"""

import os

import ml_collections
from ml_collections import config_dict

from configs import common
from vldm.data import config as data_config_lib
from vldm.diffusion import frame_conditioning

BASE_STAGES = ("autoencoder", "autoencoder_video", "image", "video", "hires")  # the demo's
LONG_STAGES = ("prediction", "interpolation")  # + `python -m vldm.demo --long`
STAGES = BASE_STAGES + LONG_STAGES
TASKS = {
    "autoencoder": "vldm.recipes.autoencoder:AutoencoderTask",
    "autoencoder_video": "vldm.recipes.autoencoder:TemporalDecoderTask",
    "image": "vldm.recipes.ldm:LatentDiffusionTask",
    "video": "vldm.recipes.ldm:LatentDiffusionTask",
    "hires": "vldm.recipes.ldm:LatentDiffusionTask",
    "prediction": "vldm.recipes.ldm:LatentDiffusionTask",
    "interpolation": "vldm.recipes.ldm:LatentDiffusionTask",
}
# Where each stage starts from (stage, init_from transform); the autoencoder starts from scratch.
INIT_FROM = {
    "autoencoder_video": ("autoencoder", "from_kl"),
    "video": ("image", "inflate"),
    "hires": ("video", "widen_input"),
    "prediction": ("video", "widen_input"),
    "interpolation": ("video", "widen_input"),
}
# Per stage: steps, batch size, peak learning rate, warmup (full recipe / runlocal).
# The autoencoder's 1200 steps: at 600 it rounded 20% of 32-px squares into circles (the oracle's
# verdict on decoded validation stills), a ceiling no diffusion stage can pass; at 1200, 0.3%.
# hires, the latent upsampler: its new conditioning weights start at zero and must outweigh the
# video model's. On whole 64-px clips 300 steps reached 71 % shape (64 px); on 32-px windows
# (ldm.upsampler.train_crop, 4× cheaper a step) 600 steps 83 %, 1200 steps 88 %.
# video: the direction of motion is learned late; 350 steps 55 %, 500 steps 92 %, 800 steps 98 %
# (held-out compositions 79 % → 92 %; 32 px, the same image stage).
# prediction: the direction held in 81 % of a long clip's 8-frame windows after 400 steps, 92 %
# after 800 (docs/long_video.md).
SCHEDULE = {
    "autoencoder": (1200, 8, 1e-3, 50),
    "autoencoder_video": (80, 2, 5e-4, 10),
    "image": (1400, 64, 1e-3, 100),
    "video": (800, 8, 1e-3, 50),
    "hires": (1200, 4, 1e-3, 20),
    "prediction": (800, 8, 1e-3, 20),
    "interpolation": (400, 8, 1e-3, 20),
}
RUNLOCAL_STEPS = 3
# Rendered training examples per stage. The diffusion stages cache their latents (the VAE encoder
# runs once per example), so a video stage renders about what it trains on: caching 10,000 clips
# would cost more than encoding the clips of 800 steps. The video stages share one dataset.
TRAIN_EXAMPLES = {
    "autoencoder": 10_000,
    "autoencoder_video": 2_000,
    "image": 10_000,
    "video": 2_000,
    "hires": 400,
    "prediction": 1_000,
    "interpolation": 1_000,
}
# Long videos: the prediction stage's clips move at 1/2.5 of the video stage's speeds, so that a
# 32-frame clip stays inside the frame and an 8-frame window still moves ≥ 0.08 of the side; the
# interpolation stage's 9-frame clips at 4× or 16× the frame rate (fps 32 or 128; 64 splits the
# regimes).
TEMPOS = {"prediction": (2.5,), "interpolation": (4.0, 16.0)}
FRAMES = {"interpolation": 9}
# The prediction stage trains on 8-frame windows of 32-frame motions: conditioned chunks see the
# object anywhere along its path, the unconditional branch (a long video's first chunk) only the
# starts of paths (CLIP_START_PROB of the windows), so that the object has room for the whole
# clip. Trained on the starts only, rollouts slowed down once past the states starts show; on
# windows of short motions, long clips ran into the border within 16 frames.
PATH_FRAMES = {"prediction": 32}
CLIP_START_PROB = {"prediction": 0.5}
REGIME_FPS = 64.0


def stage_resolution(stage, runlocal=False):
  base = 8 if runlocal else 32
  return 2 * base if stage == "hires" else base


def get_config(arg=None):
  arg = common.parse_arg(arg, stage="image", root="", data_dir="", runlocal=False)
  if arg.stage not in STAGES:
    raise ValueError(f"Unknown stage {arg.stage!r}; the shapes recipe has {STAGES}.")
  stage, local = arg.stage, arg.runlocal
  config = common.base_config()
  config.task = TASKS[stage]
  config.stage = stage
  config.host_init = True  # tiny models: initial weights drawn on the host (see recipes.common)
  config.prng_impl = "rbg"  # cheap random-number kernels: XLA:CPU compiles threefry slowly
  steps, batch, lr, warmup = SCHEDULE[stage]
  config.total_steps = RUNLOCAL_STEPS if local else steps
  config.batch_size = 2 if local else batch
  config.log_every = 1 if local else 25
  config.checkpoint_every = 0  # at the end (and on preemption) only: saves cost seconds here
  config.keep_checkpoints = 1
  config.tensorboard = False
  config.optim.lr = lr
  config.optim.warmup_steps = 1 if local else warmup
  config.optim.decay = "cosine"
  config.optim.end_lr_factor = 0.1
  # EMA over about the last tenth of the run: with a few hundred steps a fixed 0.9999 would keep
  # mostly the initial weights (the trainer's EMA starts from them).
  config.ema_decay = 0.0 if stage.startswith("autoencoder") or local else 1 - 10 / steps

  root = os.path.abspath(arg.root) if arg.root else ""  # saved configs work from any folder
  data_dir = arg.data_dir or (os.path.join(root, "data") if root else None)
  if stage in INIT_FROM:
    source, transform = INIT_FROM[stage]
    if root:
      config.init_from.workdir = os.path.join(root, source)
    config.init_from.transform = transform

  resolution = stage_resolution(stage, local)
  kind = "image" if stage in ("autoencoder", "image") else "video"
  config.data = data_config_lib.data_config(
      "shapes",
      kind=kind,
      resolution=resolution,
      frames=FRAMES.get(stage, 8),
      batch_size=config.batch_size,
      tempos=TEMPOS.get(stage, (1.0,)),
      path_frames=PATH_FRAMES.get(stage, 0),
      clip_start_prob=CLIP_START_PROB.get(stage, 0.0),
      caption_dropout=0.1 if stage in ("image", "video", "hires") + LONG_STAGES else 0.0,
      num_train_examples=64 if local else TRAIN_EXAMPLES[stage],
      num_validation_examples=18 if local else 72,
      num_workers=2,
      prefetch=2,
  )
  config.data.data_dir = data_dir
  config.data.batch_size = config.get_ref("batch_size")  # one batch size: --config.batch_size

  if stage.startswith("autoencoder"):
    config.autoencoder = autoencoder_config(local)
    return config

  config.ldm = ldm_config(stage, local)
  if root:
    config.ldm.vae.workdir = os.path.join(root, "autoencoder_video")
    config.ldm.latent_cache_dir = os.path.join(root, stage, "latents")
    if config.ldm.upsampler.factor:
      config.ldm.upsampler.low_res_workdir = os.path.join(root, "video")
  return config


def autoencoder_config(local):
  c = ml_collections.ConfigDict()
  c.vae = ml_collections.ConfigDict(
      dict(
          block_out_channels=(32, 32) if local else (32, 64, 64),
          layers_per_block=1,
          latent_channels=4,
          norm_num_groups=32,
          use_post_quant_conv=False,
          sample_size=stage_resolution("autoencoder", local),
          scaling_factor=1.0,
      )
  )
  c.discriminator = ml_collections.ConfigDict(
      dict(features=16 if local else 32, num_layers=1 if local else 2, norm_num_groups=8)
  )
  c.l2_weight = 1.0  # reconstruction: L1 + l2_weight · L2 (L1 alone averages colors)
  c.kl_weight = 1e-5  # on the KL summed over latents (LDM's convention: per pixel value)
  c.disc_weight = 0.5  # × the adaptive weight
  c.disc_start = 1 if local else 2 * SCHEDULE["autoencoder"][0] // 3  # the last third
  c.temporal_weight = 1.0  # temporal decoder: L1 on frame differences (flicker)
  return c


def ldm_config(stage, local):
  c = ml_collections.ConfigDict()
  c.kind = "image" if stage == "image" else "video"
  c.pretrained = config_dict.placeholder(str)  # every component is trained here
  # Where the frozen VAE's posterior of every training example is cached (built at the stage's
  # start, reused on resume): the encoder then runs once per example, not once per step.
  c.latent_cache_dir = config_dict.placeholder(str)
  c.latent_cache_batch_size = 64
  levels = 1 if local else 2  # runlocal: one level, the least to compile
  upsampler = stage == "hires"
  vae_levels = len(autoencoder_config(local).vae.block_out_channels)
  latent_size = stage_resolution(stage, local) // 2 ** (vae_levels - 1)  # the sampler's default
  # runlocal: attention in the down and mid blocks only (each spatio-temporal transformer is a
  # fifth of a video step's compile time; two fewer took the runlocal recipe from 156 s to 115 s).
  up_blocks = ("UpBlock2D",) if local else ("CrossAttnUpBlock2D",) * levels
  c.unet = ml_collections.ConfigDict()
  c.unet.folder = config_dict.placeholder(str)
  c.unet.model = ml_collections.ConfigDict(
      dict(
          in_channels=8 if upsampler else 4,
          out_channels=4,
          down_block_types=("CrossAttnDownBlock2D",) * levels,
          mid_block_type="UNetMidBlock2DCrossAttn",
          up_block_types=up_blocks,
          block_out_channels=(16,) if local else (32, 64),
          layers_per_block=1,
          num_attention_heads=(2,) if local else (2, 4),
          cross_attention_dim=32 if local else 64,
          norm_num_groups=8,
          sample_size=latent_size,
      )
  )
  # A small CLIP text encoder learned from scratch over the 19-token word vocabulary of the
  # captions. Image captions have no direction words: the video stage is where it learns them.
  c.text_encoder = ml_collections.ConfigDict()
  c.text_encoder.folder = config_dict.placeholder(str)
  c.text_encoder.model = ml_collections.ConfigDict(
      dict(
          hidden_size=32 if local else 64,
          intermediate_size=64 if local else 128,
          num_hidden_layers=1 if local else 2,
          num_attention_heads=2,
      )
  )
  c.text_encoder.train = stage in ("image", "video")
  # "a red circle moving left" + bos + eos = 7 tokens
  c.tokenizer = ml_collections.ConfigDict(
      dict(
          folder=config_dict.placeholder(str),
          kind="shapes_words",
          padding=config_dict.placeholder(str),
          max_length=8,
      )
  )
  # The frozen temporal-decoder VAE of the autoencoder stages; its latents are scaled by 1/std,
  # measured on fixed rendered frames, so every stage and the sampler agree on the scale.
  vae = autoencoder_config(local).vae
  c.vae = ml_collections.ConfigDict(
      dict(
          folder=config_dict.placeholder(str),
          workdir=config_dict.placeholder(str),
          scaling_factor=config_dict.placeholder(float),
          scale_from="shapes",
      )
  )
  c.vae.model = ml_collections.ConfigDict(
      dict(
          kind="temporal_decoder",
          block_out_channels=vae.block_out_channels,
          layers_per_block=vae.layers_per_block,
          latent_channels=vae.latent_channels,
          sample_size=vae.sample_size,
          scaling_factor=vae.scaling_factor,
      )
  )
  c.scheduler = ml_collections.ConfigDict(dict(folder=config_dict.placeholder(str)))
  c.temporal = ml_collections.ConfigDict(
      dict(
          merge_factor=0.5,
          merge_strategy="learned_with_images",
          num_frames=8,
          text_motion_embedding=True,
          zero_init_temporal_outputs=True,
      )
  )
  c.train = "all" if stage in ("image", "hires") + LONG_STAGES else "temporal"
  c.joint_image_fraction = 0.0
  c.prediction_type = "v_prediction"
  if stage == "image":
    c.weighting, c.noise_sampling = "min_snr", "uniform"
  else:
    # The direction is decided at high noise (t ≳ 700 of 1000), where min-SNR weighting of the
    # v-loss goes to 0 with the SNR: plain v-loss, noise levels lognormal (median t ≈ 700).
    c.weighting, c.noise_sampling = "uniform", "lognormal"
  c.min_snr_gamma = 5.0
  # 'lognormal': σ ~ exp(p_mean + p_std·n), mapped to timesteps.
  c.p_mean, c.p_std = 1.5, 1.6
  c.schedule = ml_collections.ConfigDict(
      dict(
          num_train_timesteps=1000,
          beta_start=0.00085,
          beta_end=0.012,
          beta_schedule="scaled_linear",
          rescale_betas_zero_snr=True,
      )
  )
  # Guidance trades shape for direction (32-px video stage, 144 clips: scale 2 → shape 93 %,
  # direction 91 %, all attributes 85 %; 3 → 94 %, 95 %, 89 %; 4 → 87 %, 98 %, 85 %).
  c.sampler = ml_collections.ConfigDict(
      dict(
          name="ddim",
          options=dict(timestep_spacing="trailing"),
          num_steps=2 if local else 12,
          guidance_scale=3.0,
      )
  )
  # hires as a latent upsampler (Video LDM): the 64-px model also sees the 32-px clip's latents, so
  # shape and motion come from the video stage. Fine-tuned from the 32-px video stage alone, the
  # 64-px model rounded almost every square (shape 59 % against 90 % at 32 px, README).
  c.upsampler = ml_collections.ConfigDict(
      dict(
          factor=2 if upsampler else 0,  # 0: not an upsampler
          noise_level=100,  # conditioning augmentation, a training timestep (ᾱ ≈ 0.89)
          # The upsampler's own sampling: 6 steps judge as well as 12 (all attributes 66 % vs 64 %).
          num_steps=2 if local else 6,
          guidance_scale=1.0,
          # Trained on random 32-px windows (half the latent size) of the 64-px clips, as SD's x4
          # upscaler on crops; sampled whole: all attributes 66 % → 78 % on seen compositions.
          train_crop=latent_size // 2 if upsampler else 0,
          low_res_workdir=config_dict.placeholder(str),
      )
  )  # the base stage (frozen)
  c.sample_prompts = ("a red circle moving right", "a yellow triangle moving up")
  c.frame_conditioning = frame_conditioning_config(stage)
  if stage in LONG_STAGES:
    c.unet.model.in_channels = frame_conditioning.conditioned_in_channels(4)
    c.temporal.num_frames = FRAMES.get(stage, 8)
  if stage == "interpolation":  # the key frames decide what is there: text guidance only hurt
    c.sampler.guidance_scale = 1.0  # (held-out clips, PSNR between keys: 24.2 dB vs 22.8 at 3)
  return c


def frame_conditioning_config(stage):
  """`ldm.frame_conditioning` (vldm.diffusion.frame_conditioning.DEFAULTS): Video LDM's
  prediction and interpolation stages; mode None elsewhere."""
  c = ml_collections.ConfigDict(frame_conditioning.DEFAULTS)
  c.mode = stage if stage in LONG_STAGES else config_dict.placeholder(str)
  c.regime_fps = REGIME_FPS
  # The video stage's clips move 2.5× faster than these: the prediction model starts its own
  c.first_chunk = "prediction"
  return c
