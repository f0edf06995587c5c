"""Stable Video Diffusion on your own videos: its three training stages and image-to-video.

Stages (each a `python -m vldm.train` run in ROOT/<stage>, wired with `init_from`):
  image  Stage I: an SD-2.1-layout image model (from `pretrained`, an SD 2.x folder) fine-tuned
         on frames of your videos with SVD's EDM training (v-EDM preconditioning, c_noise = ¼ ln σ,
         log-normal σ, EDM weighting)
  video  Stage II: inflated to the SVD-layout video UNet (UNetSpatioTemporalConditionModel: temporal
         layers, per-block epsilons, added time ids) from ROOT/image when that stage was trained,
         else from the SD UNet, and trained whole on low-resolution clips, micro-conditioned on
         each clip's fps and measured motion (`ldm.micro`; the motion score of
         `vldm.data.motion`, computed when the data is prepared)
  hires  Stage III: ROOT/video fine-tuned at 2× the resolution, σ shifted toward more noise
         (P_mean −1.2 → 1.0)
  i2v    image-to-video (`vldm.recipes.image_to_video`): from a published SVD folder
         (`pretrained`: unet/ vae/ image_encoder/ scheduler/ feature_extractor/), or from
         ROOT/hires (else ROOT/video) with `pretrained` the SD 2.x folder of the earlier stages and
         `image_encoder` a CLIPVisionModelWithProjection folder (e.g. an SVD folder's
         image_encoder/); runlocal uses a small random frozen one without it

  python -m vldm.train --config configs/svd.py:stage=i2v,pretrained=SVD_DIR,data=VIDEOS \
      --workdir RUNS/i2v
  python -m vldm.sample --workdir RUNS/i2v --image first_frame.png --out OUT
  python -m vldm.export --workdir RUNS/i2v --out FOLDER   # a StableVideoDiffusionPipeline folder

Args: stage; pretrained; data (a folder of videos with captions.csv or captions.jsonl: file,
caption; the i2v stage ignores captions); root (the folder of stage workdirs; its data/ holds the
prepared datasets); resolution (square frames; default 256, hires and i2v 512); frames (default
14); image_encoder; preset (PRESETS[stage]: the architecture without folders, for
`--compile_only` checks; pretrained and data then optional); runlocal (a few steps, tiny clips,
float32: for tests). Full-size stages compute in bf16 with float32 parameters and full remat;
every key can still be overridden, e.g. --config.mesh="(('data', -1), ('fsdp', 8))",
--config.ldm.p_mean=0.7.
"""

import os

import ml_collections
from ml_collections import config_dict

from configs import common
from configs import video_ldm
from vldm.data import config as data_config_lib
from vldm.recipes import ldm as ldm_lib

STAGES = ("image", "video", "hires", "i2v")
TEXT_TASK = "vldm.recipes.ldm:LatentDiffusionTask"
IMAGE_TASK = "vldm.recipes.image_to_video:ImageToVideoTask"
# Per stage: steps, batch size, peak learning rate, warmup (full recipe; runlocal: 3 steps).
SCHEDULE = {
    "image": (10_000, 64, 1e-5, 500),
    "video": (30_000, 16, 1e-4, 1000),
    "hires": (10_000, 8, 3e-5, 500),
    "i2v": (10_000, 8, 3e-5, 500),
}
# Log-normal σ per stage (P_mean, P_std): EDM's for the image and low-resolution stages, shifted
# toward more noise at high resolution, and SVD's image-to-video values.
NOISE = {"image": (-1.2, 1.2), "video": (-1.2, 1.2), "hires": (1.0, 1.2), "i2v": (0.7, 1.6)}
HIRES = ("hires", "i2v")
# Each stage's architecture preset (`preset=`, vldm.models.presets), for compile-only checks.
PRESETS = {"image": "sd21", "video": "sd21", "hires": "sd21", "i2v": "svd"}
# diffusers' SVD scheduler: Euler on Karras σ from 700 to 0.002, timesteps ¼ ln σ.
SVD_SAMPLER = dict(
    timestep_spacing="leading",
    steps_offset=1,
    use_karras_sigmas=True,
    sigma_min=0.002,
    sigma_max=700.0,
    interpolation_type="linear",
    timestep_type="continuous",
)


def is_svd_folder(path: str) -> bool:
  return bool(path) and os.path.isdir(os.path.join(path, "image_encoder"))


def get_config(arg=None):
  arg = common.parse_arg(
      arg,
      stage="i2v",
      pretrained="",
      data="",
      root="",
      resolution=0,
      frames=0,
      image_encoder="",
      preset="",
      runlocal=False,
  )
  if arg.stage not in STAGES:
    raise ValueError(f"Unknown stage {arg.stage!r}; configs/svd.py has {STAGES}.")
  if arg.preset and arg.preset != PRESETS[arg.stage]:
    raise ValueError(
        f"stage={arg.stage} has preset={PRESETS[arg.stage]} (the SD 2.1 layout for "
        f"the text stages, SVD for i2v), not {arg.preset!r}."
    )
  if not arg.data and not arg.preset:
    raise ValueError(
        "configs/svd.py needs data=DIR: a folder of videos with captions.csv or "
        "captions.jsonl (one row per video: file, caption)."
    )
  if not arg.pretrained and not arg.preset:
    raise ValueError(
        "configs/svd.py needs pretrained=DIR: a diffusers Stable Diffusion 2.x folder "
        "(unet/ vae/ text_encoder/ tokenizer/ scheduler/), or for stage=i2v a Stable Video "
        "Diffusion folder (unet/ vae/ image_encoder/ scheduler/)."
    )
  stage, local = arg.stage, arg.runlocal
  pretrained = os.path.abspath(arg.pretrained) if arg.pretrained else ""
  from_svd = stage == "i2v" and (is_svd_folder(pretrained) or arg.preset == "svd")
  root = os.path.abspath(arg.root) if arg.root else ""
  if stage == "i2v" and not from_svd and not (arg.image_encoder or local):
    raise ValueError(
        f"stage=i2v from this recipe's stages needs image_encoder=DIR (a transformers "
        f"CLIPVisionModelWithProjection folder, e.g. an SVD folder's image_encoder/); "
        f"{pretrained} is not an SVD folder (it has no image_encoder/)."
    )

  task = IMAGE_TASK if stage == "i2v" else TEXT_TASK
  config = common.pretrained_stage_config(task, stage, SCHEDULE[stage], local)
  config.remat_policy = config_dict.placeholder(str) if local else "full"

  base = 16 if local else 256
  resolution = arg.resolution or (2 * base if stage in HIRES else base)
  frames = arg.frames or (4 if local else 14)
  kind = "image" if stage == "image" else "video"
  config.data = data_config_lib.data_config(
      "video_folder",
      kind=kind,
      resolution=resolution,
      frames=frames,
      batch_size=config.batch_size,
      folder=os.path.abspath(arg.data or os.curdir),
      caption_dropout=0.1,
      max_frames=4 * frames,
      # Full size: the frame stride varies per clip, so the fps the model is conditioned on does.
      max_frame_stride=0 if local else 2,
      num_workers=2 if local else 8,
      prefetch=2 if local else 4,
  )
  common.link_data(config, arg.data, root)

  config.ldm = ldm_config(stage, pretrained, frames, local, from_svd, arg.image_encoder)
  if arg.preset:
    common.use_preset(config.ldm, arg.preset)
  if stage == "i2v":
    config.init_from.transform = "as_is" if from_svd else "to_image_to_video"
    if not from_svd and root:
      source = "hires" if _trained(root, "hires") else "video"
      config.init_from.workdir = os.path.join(root, source)
  else:
    config.init_from.transform = {"image": "as_is", "video": "inflate", "hires": "as_is"}[stage]
    if root:
      config.ldm.latent_cache_dir = os.path.join(root, stage, "latents")
      source = {"image": None, "video": "image", "hires": "video"}[stage]
      # The video stage starts from ROOT/image when that optional stage was trained, else from the
      # pretrained SD UNet (the same `inflate` transform either way).
      if source and (source != "image" or _trained(root, "image")):
        config.init_from.workdir = os.path.join(root, source)
  return config


def _trained(root: str, stage: str) -> bool:
  return os.path.isdir(os.path.join(root, stage, "checkpoints"))


def ldm_config(stage, pretrained, frames, local, from_svd, image_encoder):
  """`video_ldm.ldm_config` with SVD's training: v-EDM, log-normal σ, EDM weighting, the SVD UNet
  layout, micro-conditioning and, for i2v, the image conditioning."""
  c = video_ldm.ldm_config("image" if stage == "image" else "video", pretrained, frames, local)
  c.train = "all"  # SVD trains the whole UNet in every stage
  # i2v trains from pixels: the VAE encodes a clip's frames inside the step, 2 at a time at full
  # size (at 576×1024 all 15 at once take several GiB of activations a clip).
  c.encode_chunk_size = None if local else 2
  c.prediction_type = "v_edm"
  c.noise_sampling, c.weighting = "lognormal", "edm"
  c.p_mean, c.p_std = NOISE[stage]
  time_embed = 16 if local else 256
  c.temporal.addition_time_embed_dim = time_embed
  c.temporal.projection_class_embeddings_input_dim = 3 * time_embed
  c.temporal.eps_convention = "svd"
  # fps clamped into fps_range (sampling outside it is an error), motion bucket = round(score ×
  # motion_buckets_per_unit) clamped to [0, 255], default_motion_bucket for clips without a score.
  c.micro = ml_collections.ConfigDict(dict(ldm_lib.MICRO_DEFAULTS))
  # The SD folder's scheduler gives the schedule; SVD samples with Euler on Karras σ (an SVD folder
  # states the same in its scheduler/; a preset has none).
  if not (from_svd and pretrained):
    c.sampler.name = "euler"
    c.sampler.options = ml_collections.ConfigDict(SVD_SAMPLER)
  c.conditioning = "image" if stage == "i2v" else "text"
  c.image_encoder = ml_collections.ConfigDict(
      dict(
          folder=image_encoder or config_dict.placeholder(str),
          # Without a folder (runlocal): a small random frozen CLIP image tower.
          model=ml_collections.ConfigDict(
              dict(
                  hidden_size=32,
                  intermediate_size=37,
                  num_hidden_layers=2,
                  num_attention_heads=4,
                  image_size=32,
                  patch_size=8,
              )
          ),
      )
  )
  c.i2v = ml_collections.ConfigDict(
      dict(
          cond_aug_mean=-3.0,  # ln σ_aug ~ N(−3, 0.5²): SVD's conditioning-frame noise
          cond_aug_std=0.5,
          conditioning_dropout=0.1,
          min_guidance_scale=1.0,
          max_guidance_scale=3.0,
          sample_noise_aug_strength=0.02,
      )
  )
  if stage == "i2v":
    c.latent_cache_dir = config_dict.placeholder(str)
    if not from_svd:  # the SD folder of the earlier stages: the UNet's layout, the VAE, σ
      c.pretrained_components = ("unet", "vae", "scheduler")
  return c
