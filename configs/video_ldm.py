"""Video LDM on your own videos, from a published Stable Diffusion (1.x or 2.x, ε or v).

Stages (each a `python -m vldm.train` run in ROOT/<stage>):
  image      optional: the SD image UNet fine-tuned on frames of your videos (Video LDM adapts SD
             to the target domain first); text encoder and VAE frozen
  video      the image UNet (ROOT/image when that stage was trained, else the pretrained one)
             inflated: temporal layers inserted with zero outputs and trained alone on clips;
             spatial layers, text encoder and VAE frozen
  upsampler  the video stage fine-tuned at 2× the resolution as Video LDM's latent upsampler
             (conditioned on the clip's low-resolution latents; it samples after the video stage)
  prediction     long videos: the video stage conditioned on its clips' first 0, 1 or 2 frames
                 (temporal layers and the widened input conv train); `python -m vldm.sample
                 --workdir RUNS --num_frames N` then rolls clips out two frames of context at a time
  interpolation  the video stage conditioned on key frames every 4th frame of 17-frame clips at
                 4× the video stage's frame rate (32 fps; whole UNet trains, as Video LDM's
                 interpolation model); `--interpolate 4` makes (N − 1)·4 + 1 frames

  python -m vldm.train \
      --config configs/video_ldm.py:stage=video,pretrained=SD_DIR,data=VIDEOS,root=RUNS \
      --workdir RUNS/video
  python -m vldm.sample --workdir RUNS/video --prompt "…" --out OUT
  python -m vldm.export --workdir RUNS/video --out FOLDER

Args: stage; pretrained (a diffusers Stable Diffusion folder: unet/ vae/ text_encoder/ tokenizer/
scheduler/); data (a folder of videos with captions.csv or captions.jsonl: file, caption); root
(the folder of stage workdirs; its data/ holds the prepared dataset); preset (sd15 or sd21:
the architecture without folders, for `--compile_only` checks; pretrained and data then
optional); resolution (pixels of the
square clips; default 256, upsampler 2×); frames (default 16); runlocal (a few steps, small clips,
float32: for tests). Every key can still be overridden, e.g. --config.data.target_fps=4,
--config.remat_policy=full, --config.mesh="(('data', -1), ('fsdp', 8))".
"""

import os

import ml_collections
from ml_collections import config_dict

from configs import common
from vldm.data import config as data_config_lib
from vldm.diffusion import frame_conditioning

STAGES = ("image", "video", "upsampler", "prediction", "interpolation")
LONG_STAGES = ("prediction", "interpolation")
TASK = "vldm.recipes.ldm:LatentDiffusionTask"
# Per stage: steps, batch size, peak learning rate, warmup (full recipe; runlocal: 3 steps).
SCHEDULE = {
    "image": (10_000, 64, 1e-5, 500),
    "video": (20_000, 16, 1e-4, 1000),
    "upsampler": (10_000, 16, 5e-5, 500),
    "prediction": (10_000, 16, 1e-4, 500),
    "interpolation": (10_000, 16, 5e-5, 500),
}
VIDEO_FPS = 8.0  # the clips' frame rate (data.target_fps); interpolation trains at 4× it
UPSAMPLER_FACTOR = 2


def get_config(arg=None):
  arg = common.parse_arg(
      arg,
      stage="video",
      pretrained="",
      data="",
      root="",
      resolution=0,
      frames=0,
      preset="",
      runlocal=False,
  )
  if arg.stage not in STAGES:
    raise ValueError(f"Unknown stage {arg.stage!r}; configs/video_ldm.py has {STAGES}.")
  if not arg.data and not arg.preset:
    raise ValueError(
        "configs/video_ldm.py needs data=DIR: a folder of videos with captions.csv "
        "or captions.jsonl (one row per video: file, caption)."
    )
  if not arg.pretrained and not arg.preset:
    raise ValueError(
        "configs/video_ldm.py needs pretrained=DIR: a diffusers Stable Diffusion "
        "folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/)."
    )
  stage, local = arg.stage, arg.runlocal
  root = os.path.abspath(arg.root) if arg.root else ""
  config = common.pretrained_stage_config(TASK, stage, SCHEDULE[stage], local)

  base_resolution = arg.resolution or (32 if local else 256)
  resolution = base_resolution * (
      UPSAMPLER_FACTOR if stage == "upsampler" and not arg.resolution else 1
  )
  frames = arg.frames or (4 if local else 16)
  if stage == "interpolation" and not arg.frames:  # k·4 + 1: key frames at both ends
    frames = 5 if local else 17
  kind = "image" if stage == "image" else "video"
  config.data = data_config_lib.data_config(
      "video_folder",
      kind=kind,
      resolution=resolution,
      frames=frames,
      batch_size=config.batch_size,
      folder=os.path.abspath(arg.data or os.curdir),
      caption_dropout=0.1,
      target_fps=VIDEO_FPS * (4 if stage == "interpolation" else 1),
      max_frames=2 * frames,
      num_workers=2 if local else 8,
      prefetch=2 if local else 4,
  )
  common.link_data(config, arg.data, root)

  config.ldm = ldm_config(
      stage, os.path.abspath(arg.pretrained) if arg.pretrained else "", frames, local
  )
  if arg.preset:
    common.use_preset(config.ldm, arg.preset)
  source = {"image": None, "video": "image"}.get(stage, "video")
  config.init_from.transform = {"image": "as_is", "video": "inflate"}.get(stage, "widen_input")
  if root:
    config.ldm.latent_cache_dir = os.path.join(root, stage, "latents")
    # The video stage starts from ROOT/image when that optional stage was trained, else from the
    # pretrained UNet (the same `inflate` transform either way).
    if source and (source != "image" or os.path.isdir(os.path.join(root, "image", "checkpoints"))):
      config.init_from.workdir = os.path.join(root, source)
    if stage == "upsampler":
      config.ldm.upsampler.low_res_workdir = os.path.join(root, "video")
  return config


def ldm_config(stage, pretrained, frames, local):
  c = ml_collections.ConfigDict()
  c.kind = "image" if stage == "image" else "video"
  # Every component from the SD folder unless its own folder is set; the VAE and text encoder stay
  # frozen and the schedule and prediction type are the folder's (set ldm.schedule /
  # ldm.prediction_type to change them).
  c.pretrained = pretrained
  c.unet = ml_collections.ConfigDict(
      dict(folder=config_dict.placeholder(str), model=ml_collections.ConfigDict())
  )
  c.text_encoder = ml_collections.ConfigDict(
      dict(folder=config_dict.placeholder(str), model=ml_collections.ConfigDict(), train=False)
  )
  c.tokenizer = ml_collections.ConfigDict(
      dict(
          folder=config_dict.placeholder(str),
          kind="clip",
          padding=config_dict.placeholder(str),  # None: the folder's own (SD1 eos, SD2 "!")
          max_length=config_dict.placeholder(int),
      )
  )  # None: the folder's (77)
  c.vae = ml_collections.ConfigDict(
      dict(
          folder=config_dict.placeholder(str),
          workdir=config_dict.placeholder(str),
          model=ml_collections.ConfigDict(),
          scaling_factor=config_dict.placeholder(float),
          scale_from=config_dict.placeholder(str),
      )
  )  # None: the VAE config's scaling_factor
  c.scheduler = ml_collections.ConfigDict(dict(folder=config_dict.placeholder(str)))
  c.schedule = ml_collections.ConfigDict()
  c.prediction_type = config_dict.placeholder(str)
  c.latent_cache_dir = config_dict.placeholder(str)
  # Frames the frozen VAE encodes at a time inside the train step (None: all of the batch's at
  # once); bounds its activations when clips train from pixels (image-to-video, no latent cache).
  c.encode_chunk_size = config_dict.placeholder(int)
  c.latent_cache_batch_size = 8
  c.temporal = ml_collections.ConfigDict(
      dict(
          merge_factor=0.5,
          merge_strategy="learned_with_images",
          num_frames=frames,
          text_motion_embedding=False,
          zero_init_temporal_outputs=True,
      )
  )
  c.train = {"video": "temporal", "prediction": "temporal_and_input"}.get(stage, "all")
  c.joint_image_fraction = 0.0  # > 0: that share of each batch as stills (with train='all')
  c.noise_sampling, c.weighting = "uniform", "uniform"
  c.min_snr_gamma = 5.0
  c.p_mean, c.p_std = -1.2, 1.2  # for noise_sampling='lognormal'
  c.sampler = ml_collections.ConfigDict(
      dict(
          name=config_dict.placeholder(str),  # None: the scheduler folder's
          options=ml_collections.ConfigDict(),
          num_steps=2 if local else 25,
          guidance_scale=7.5,
      )
  )
  upsampler = stage == "upsampler"
  c.upsampler = ml_collections.ConfigDict(
      dict(
          factor=UPSAMPLER_FACTOR if upsampler else 0,
          noise_level=100,
          num_steps=2 if local else 25,
          guidance_scale=1.0,
          train_crop=0,  # > 0: train on random windows of that many latents (sampled whole)
          low_res_workdir=config_dict.placeholder(str),
      )
  )
  c.sample_prompts = ("a video",)
  # Video LDM's long-video stages (vldm.diffusion.frame_conditioning.DEFAULTS for the keys).
  c.frame_conditioning = ml_collections.ConfigDict(frame_conditioning.DEFAULTS)
  c.frame_conditioning.mode = stage if stage in LONG_STAGES else config_dict.placeholder(str)
  # One regime (T → 4T) by default; train 4T → 16T too by mixing frame strides
  # (data.max_frame_stride) and setting the fps that splits them here.
  c.frame_conditioning.regime_fps = config_dict.placeholder(float)
  return c
