"""The latent-diffusion task every recipe configures: image LDM, video LDM, latent upsampler.

One task, `LatentDiffusionTask`, configured by `config.ldm`; its components (UNet, text encoder,
tokenizer, VAE, noise schedule) come from folders, earlier stages or module configs
(`vldm.recipes.components`). Kinds of stage:
  image      a text-conditioned image UNet on stills or frames (`train='all'`).
  video      the image UNet inflated (`vldm.models.inflate`): temporal layers inserted, their output
             layers zero-initialised (`ldm.temporal.zero_init_temporal_outputs`) so the video UNet
             starts as the image UNet frame by frame; with `train='temporal'` only they learn.
             `ldm.joint_image_fraction` > 0 sends that share of each batch through the same UNet
             as stills (the image-only indicator: α = 1, frames independent), Video LDM's joint
             image + video training (it matters where spatial layers learn, `train='all'`).
  upsampler  (`ldm.upsampler.factor` ≥ 2) the video model fine-tuned at a higher resolution as
             Video LDM's latent upsampler: its UNet also takes the low-resolution clip's latents
             (noise-augmented, upsampled, concatenated; the input conv widened with zero weights,
             `widen_input`) and samples after the base stage (`ldm.upsampler.low_res_workdir`).
  prediction / interpolation  (`ldm.frame_conditioning.mode`) Video LDM's long-video models: the
             video model conditioned on given frames (the first S ∈ {0, 1, 2} frames, or key frames
             every `stride`; `vldm.diffusion.frame_conditioning`), its input conv widened with zero
             weights (`widen_input`), the loss on the generated frames only.
Parameters: {'unet', 'text_encoder'} (the text encoder learns only with `ldm.text_encoder.train`);
frozen: {'vae', 'scale'} (+ 'low_res', the upsampler's base). With `ldm.latent_cache_dir` set, a
stage first writes the VAE posterior (mean, std) of every training example there and trains on it,
sampling the posterior each step: the encoder runs once per example instead of once per step.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from vldm import devices
from vldm.data import motion as motion_lib
from vldm.data import sources
from vldm.diffusion import frame_conditioning
from vldm.diffusion import losses
from vldm.models import inflate
from vldm.models import unet as unet_lib
from vldm.pipelines import common as pipeline_common
from vldm.pipelines import image_to_video as i2v_pipeline
from vldm.pipelines import workdir as pipeline_workdir
from vldm.recipes import common
from vldm.recipes import components as components_lib
from vldm.train import tasks as tasks_lib

KINDS = ("image", "video")
# 'temporal_and_input': the temporal layers and the input conv (a frame-conditioned model's new
# input channels are there).
TRAIN_CHOICES = ("all", "temporal", "temporal_and_input")
# SVD's micro-conditioning (`ldm.micro`), for UNets that take added time ids; these defaults apply
# where a config has no `ldm.micro`.
MICRO_DEFAULTS = dict(
    fps_range=(1.0, 60.0),  # a clip's fps is clamped into this range (documented clamp)
    motion_buckets_per_unit=255.0,  # motion score (frame short sides / s) → bucket id
    default_motion_bucket=127,  # for clips without a motion score (e.g. the shapes data)
    sample_fps=7.0,
    sample_motion_bucket_id=127,
)


def frame_settings(config) -> Optional[dict]:
  """`ldm.frame_conditioning` over frame_conditioning.DEFAULTS; None for a plain stage."""
  own = config.ldm.get("frame_conditioning")
  settings = {**frame_conditioning.DEFAULTS, **(own.to_dict() if own is not None else {})}
  return settings if settings["mode"] else None


def micro_settings(config) -> dict:
  """`ldm.micro` over MICRO_DEFAULTS."""
  own = config.ldm.get("micro")
  return {**MICRO_DEFAULTS, **(own.to_dict() if own is not None else {})}


def motion_buckets(score, buckets_per_unit: float):
  """motion_bucket_id of motion scores (`vldm.data.motion`, frame short sides per second):
  round(score × buckets_per_unit), clamped to SVD's [0, 255]. Traceable."""
  return jnp.clip(jnp.round(score * buckets_per_unit), 0, motion_lib.MAX_MOTION_BUCKET)


def added_time_ids(config, batch: dict, batch_size: int, noise_aug=None):
  """[B, 3] SVD's added time ids [fps − 1, motion bucket, conditioning noise σ] of a batch: the
  clip's fps (file fps / frame stride) clamped to `ldm.micro.fps_range`; its motion bucket
  (`motion_buckets`; `default_motion_bucket` where the data has no motion score); the conditioning
  frame's augmentation σ (0 for a text-conditioned stage)."""
  micro = micro_settings(config)
  low, high = micro["fps_range"]
  fps = batch.get("fps")
  fps = jnp.full((batch_size,), micro["sample_fps"]) if fps is None else fps
  fps = jnp.clip(jnp.asarray(fps, jnp.float32), low, high)
  motion = batch.get("motion")
  if motion is None:
    bucket = jnp.full((batch_size,), float(micro["default_motion_bucket"]))
  else:
    bucket = motion_buckets(jnp.asarray(motion, jnp.float32), micro["motion_buckets_per_unit"])
  noise = jnp.zeros((batch_size,)) if noise_aug is None else jnp.asarray(noise_aug, jnp.float32)
  return i2v_pipeline.time_ids(fps, bucket, noise, batch=batch_size)


def micro_conditioning_ranges(config) -> dict:
  """What a stage's added time ids were trained on, for the pipeline's range check."""
  micro = micro_settings(config)
  return {"fps": tuple(micro["fps_range"]), "motion_bucket_id": (0, motion_lib.MAX_MOTION_BUCKET)}


def random_windows(latent, low_res, size: int, factor: int, rng):
  """The same random size × size window of each example's latents [B, (F,) H, W, C] and, at
  1/factor, of its low-resolution latents; windows start on the low-resolution grid."""
  low_size = size // factor
  height, width = low_res.shape[-3:-1]
  y_key, x_key = jax.random.split(rng)
  batch = latent.shape[0]
  top = jax.random.randint(y_key, (batch,), 0, height - low_size + 1)
  left = jax.random.randint(x_key, (batch,), 0, width - low_size + 1)

  def window(x, y, x0, scale, extent):
    start = (0,) * (x.ndim - 3) + (y * scale, x0 * scale, 0)
    return jax.lax.dynamic_slice(x, start, x.shape[:-3] + (extent, extent, x.shape[-1]))

  latent = jax.vmap(lambda x, y, x0: window(x, y, x0, factor, size))(latent, top, left)
  low_res = jax.vmap(lambda x, y, x0: window(x, y, x0, 1, low_size))(low_res, top, left)
  return latent, low_res


def widen_input_transform(source, target):
  """Video stage → its latent upsampler: every parameter as is, and the UNet's input conv widened
  to the upsampler's input channels with zero weights on the new (conditioning) ones, so the
  upsampler starts as the video model."""
  widened = {k: v for k, v in source["unet"].items() if k != "conv_in"}
  kernel = source["unet"]["conv_in"]["kernel"]
  new_in = target["unet"]["conv_in"]["kernel"].shape[-2] - kernel.shape[-2]
  if new_in < 0:
    raise tasks_lib.CheckpointMismatchError(
        f"widen_input: the source UNet takes {kernel.shape[-2]} input channels, more than the "
        f"target's {target['unet']['conv_in']['kernel'].shape[-2]}."
    )
  pad = [(0, 0)] * (kernel.ndim - 2) + [(0, new_in), (0, 0)]
  widened["conv_in"] = dict(source["unet"]["conv_in"], kernel=jnp.pad(kernel, pad))
  return tasks_lib.as_is(dict(source, unet=widened), target)


def inflate_transform(source, target):
  """Image stage (or a pretrained image UNet) → video stage: spatial layers and text encoder from
  the source, temporal layers as initialised in the target (zero output layers)."""
  return dict(
      target,
      unet=inflate.transplant_temporal(target["unet"], source["unet"]),
      text_encoder=tasks_lib.as_is(source["text_encoder"], target["text_encoder"]),
  )


class LatentDiffusionTask(tasks_lib.Task):
  """Text-to-image / text-to-video latent diffusion (see the module docstring)."""

  PRETRAINED_COMPONENTS = components_lib.TEXT_COMPONENTS

  def __init__(self, config):
    super().__init__(config)
    c = config.ldm
    if c.kind not in KINDS:
      raise components_lib.ComponentError(f"ldm.kind must be one of {KINDS}, got {c.kind!r}.")
    if c.train not in TRAIN_CHOICES:
      raise components_lib.ComponentError(
          f"ldm.train must be one of {TRAIN_CHOICES}, got {c.train!r}."
      )
    if c.kind != config.data.kind:
      raise components_lib.ComponentError(
          f"ldm.kind {c.kind!r} needs data.kind {c.kind!r}, got " f"{config.data.kind!r}."
      )
    components_lib.check_pretrained(config, self.PRETRAINED_COMPONENTS)
    self.upsample = c.upsampler.factor
    self.frame_conditioning = frame_settings(config)
    self.tokenizer = components_lib.make_tokenizer(config)
    self.unet = components_lib.make_unet(config)
    self.text_encoder = components_lib.make_text_encoder(config, self.tokenizer)
    self.vae = components_lib.make_vae(config)
    self.schedule, self.prediction_type, self._scheduler_sampler, self._scheduler_options = (
        components_lib.schedule_and_prediction(config)
    )
    self._check_fit(config)
    # Sampling defaults to the size the stage trains at, not the pretrained config's.
    vae_factor, _ = pipeline_common.size_multiple(self.vae, self.unet)
    self.unet = self.unet.clone(sample_size=config.data.resolution // vae_factor)
    # The upsampler's base stage: the same video UNet, without the conditioning channels.
    latent_channels = self.vae.latent_channels
    self.base_unet = self.unet.clone(in_channels=latent_channels) if self.upsample else None
    self.train_crop = c.upsampler.train_crop if self.upsample else 0
    self.size, self.frames = config.data.resolution, config.data.frames
    self._pipeline = None
    self._evaluation = None  # eval_fn's networks and real statistics, built at its first call
    self._frozen_vae = None

  def _check_fit(self, config) -> None:
    """Errors naming what is accepted when the components or the data size do not fit."""
    c = config.ldm
    latent_channels = self.vae.latent_channels
    wanted = latent_channels * (2 if self.upsample else 1)
    what = (
        f"a latent upsampler (ldm.upsampler.factor={self.upsample}) needs 2 × the VAE's "
        if self.upsample
        else "the UNet denoises the VAE's "
    )
    frames = self.frame_conditioning
    if frames:
      self._check_frame_conditioning(config, frames)
      wanted = frame_conditioning.conditioned_in_channels(latent_channels)
      what = (
          f"a {frames['mode']} model (ldm.frame_conditioning) takes the noisy latents and the "
          f"condition (given latents, mask, level, regime: +{frame_conditioning.EXTRA_CHANNELS}) "
          "from the VAE's "
      )
    if self.unet.in_channels != wanted:
      raise components_lib.ComponentError(
          f"The UNet takes {self.unet.in_channels} input channels; {what}"
          f"{latent_channels} latent channels = {wanted}."
      )
    if self.unet.out_channels != latent_channels:
      raise components_lib.ComponentError(
          f"The UNet predicts {self.unet.out_channels} channels; the VAE has "
          f"{latent_channels} latent channels."
      )
    if self.unet.context_dim != self.text_encoder.hidden_size:
      raise components_lib.ComponentError(
          f"The UNet's cross_attention_dim is {self.unet.context_dim}; the text "
          f"encoder's hidden_size is {self.text_encoder.hidden_size}."
      )
    vae_factor, multiple = pipeline_common.size_multiple(self.vae, self.unet)
    if self.upsample:
      multiple *= self.upsample
      if c.kind != "video" or self.upsample < 2:
        raise components_lib.ComponentError(
            f"ldm.upsampler.factor={self.upsample} needs kind 'video' and a factor "
            f"≥ 2 (0: not an upsampler); got kind {c.kind!r}."
        )
    if config.data.resolution % multiple:
      why = f" × the upsampling factor {self.upsample}" if self.upsample else ""
      raise components_lib.ComponentError(
          f"data.resolution {config.data.resolution} cannot be divided by the VAE and UNet: it "
          f"must be a multiple of {multiple} (the VAE downsamples by {vae_factor}, the UNet's "
          f"{len(self.unet.block_out_channels)} levels by "
          f"{2 ** (len(self.unet.block_out_channels) - 1)}{why}); e.g. "
          f"{max(multiple, config.data.resolution // multiple * multiple)}."
      )
    if self.upsample and c.upsampler.train_crop:
      window_multiple = multiple // vae_factor
      latent_size = config.data.resolution // vae_factor
      crop = c.upsampler.train_crop
      if crop % window_multiple or crop > latent_size:
        raise components_lib.ComponentError(
            f"ldm.upsampler.train_crop is {crop}; it must be 0 (whole latents) or a window ≤ the "
            f"latent size {latent_size} divisible by {window_multiple} (the UNet's size multiple "
            f"× the factor: the low-resolution window must be whole too)."
        )
    if self.unet.num_time_ids not in (0, 3):
      raise components_lib.ComponentError(
          f"The UNet takes {self.unet.num_time_ids} added time ids; vldm conditions on SVD's 3 "
          f"[fps − 1, motion_bucket_id, noise_aug_strength] (projection_class_embeddings_input_dim"
          f" = 3 × addition_time_embed_dim) or none."
      )
    fraction = c.joint_image_fraction
    if not 0 <= fraction < 1 or (fraction and c.kind != "video"):
      raise components_lib.ComponentError(
          f"ldm.joint_image_fraction must be in [0, 1) and needs kind 'video'; got "
          f"{fraction} (kind {c.kind!r})."
      )

  def _check_frame_conditioning(self, config, frames) -> None:
    try:
      frame_conditioning.check_mode(frames["mode"])
      if config.ldm.kind != "video" or self.upsample:
        raise ValueError(
            f"ldm.frame_conditioning.mode={frames['mode']!r} needs a video stage (kind 'video') "
            f"that is not a latent upsampler; got kind {config.ldm.kind!r}, upsampler factor "
            f"{self.upsample}."
        )
      if frames["mode"] == "interpolation":
        frame_conditioning.check_interpolation_frames(config.data.frames, frames["stride"])
      else:
        for s in frames["context_choices"]:
          frame_conditioning.prediction_mask(config.data.frames, s)
        if not 0 < frames["context_frames"] < config.data.frames:
          raise ValueError(
              f"ldm.frame_conditioning.context_frames must be in [1, {config.data.frames}); got "
              f"{frames['context_frames']}."
          )
      levels = self.schedule.num_train_timesteps
      for key in ("max_noise_level", "sample_noise_level"):
        if not 0 <= frames[key] < levels:
          raise ValueError(
              f"ldm.frame_conditioning.{key} must be a training timestep in [0, {levels}); got "
              f"{frames[key]}."
          )
      if frames["first_chunk"] not in ("video", "prediction"):
        raise ValueError(
            "ldm.frame_conditioning.first_chunk must be 'video' (the workdir's text-to-video "
            f"stage) or 'prediction' (its S = 0 branch); got {frames['first_chunk']!r}."
        )
    except ValueError as e:
      raise components_lib.ComponentError(str(e)) from e

  @property
  def video(self) -> bool:
    return self.config.ldm.kind == "video"

  # ---- parameters -----------------------------------------------------------------------------
  def _init_fn(self, unet):
    """init(key) -> {'unet', 'text_encoder'} parameters with `unet` as the UNet."""
    ids = jnp.zeros((1, self.tokenizer.max_length), jnp.int32)
    frames = (self.frames,) if self.video else ()
    latent = jnp.zeros((1,) + frames + (8, 8, unet.in_channels))
    context = jnp.zeros((1, self.tokenizer.max_length, self.text_encoder.hidden_size))
    time_ids = (jnp.zeros((1, unet.num_time_ids)),) if unet.num_time_ids else ()

    def init(key):
      unet_key, text_key = jax.random.split(key)
      return {
          "unet": unet.init(unet_key, latent, jnp.zeros((1,)), context, *time_ids)["params"],
          "text_encoder": self.text_encoder.init(text_key, ids)["params"],
      }

    return init

  def init_params(self, rng):
    mix = self.config.ldm.temporal.merge_factor
    params = common.task_init(self, self._init_fn(self.unet), rng, {"mix_factor": mix})
    if self.config.host_init and self.unet.temporal and self.unet.zero_init_temporal_outputs:
      params = dict(params, unet=unet_lib.zero_temporal_outputs(params["unet"]))  # as UNet.init
    return params

  def pretrained_params(self):
    """The weights of the component folders the stage starts from (see `components`)."""
    return components_lib.pretrained_params(self.config)

  def trainable_labels(self, params):
    c = self.config.ldm
    temporal_only = self.video and c.train in ("temporal", "temporal_and_input")
    with_input = c.train == "temporal_and_input"

    def label(path):
      if path[0] == "text_encoder":
        return tasks_lib.TRAIN if c.text_encoder.train else tasks_lib.FREEZE
      if with_input and path[:2] == ("unet", "conv_in"):
        return tasks_lib.TRAIN
      if temporal_only and not inflate.is_temporal(path):
        return tasks_lib.FREEZE
      return tasks_lib.TRAIN

    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: label(k) for k in flat})

  def init_transforms(self):
    return {"inflate": inflate_transform, "widen_input": widen_input_transform}

  def init_frozen(self, mesh):
    vae_params = components_lib.vae_params(self.config, mesh)
    scale = components_lib.scaling_factor(self.config, self.vae, vae_params)
    self._frozen_vae = vae_params
    frozen = {"vae": vae_params, "scale": np.float32(scale)}
    if self.upsample:  # the base stage samples what the upsampler is conditioned on
      low_res = common.load_stage_params(self.config.ldm.upsampler.low_res_workdir, mesh)
      frozen["low_res"] = {k: low_res[k] for k in ("unet", "text_encoder")}
    return frozen

  def abstract_frozen(self):
    """`init_frozen`'s shapes and dtypes, no weights read (compile-only checks)."""
    frozen = {
        "vae": components_lib.abstract_vae_params(self.vae),
        "scale": jax.ShapeDtypeStruct((), jnp.float32),
    }
    if self.upsample:
      frozen["low_res"] = jax.eval_shape(self._init_fn(self.base_unet), jax.random.key(0))
    return frozen

  def abstract_batch(self, batch_size: int) -> dict:
    """One global batch as `make_data` yields it, as ShapeDtypeStructs (compile-only checks)."""
    return self._abstract_batch(batch_size, self.tokenizer.max_length)

  def _abstract_batch(self, batch_size: int, text_length: Optional[int]) -> dict:
    sds, f32 = jax.ShapeDtypeStruct, jnp.float32
    lead = (batch_size, self.frames) if self.video else (batch_size,)
    batch = {}
    if self.config.ldm.get("latent_cache_dir"):  # the cache's posterior moments
      vae_factor, _ = pipeline_common.size_multiple(self.vae, self.unet)
      channels = self.vae.latent_channels
      sizes = {"latent": self.size // vae_factor}
      if self.upsample:
        sizes["low_res"] = self.size // vae_factor // self.upsample
      for name, size in sizes.items():
        for moment in ("mean", "std"):
          batch[f"{name}_{moment}"] = sds(lead + (size, size, channels), f32)
    else:
      batch["video" if self.video else "image"] = sds(lead + (self.size, self.size, 3), f32)
    batch["fps"] = sds((batch_size,), f32)
    if self.config.data.name == "video_folder":  # measured per clip when the data is prepared
      batch["motion"] = sds((batch_size,), f32)
    if text_length:
      batch["input_ids"] = sds((batch_size, text_length), jnp.int32)
    batch["step"] = sds((batch_size,), jnp.int32)
    return batch

  def step_flops(self, batch_size: int) -> float:
    """Model FLOPs of one training step (`vldm.benchmark.flops`: the UNet's forward and the
    backward of what trains, the frozen VAE encoder's and text encoder's forwards; no remat)."""
    from vldm.benchmark import flops as flops_lib  # pylint: disable=g-import-not-at-top

    c = self.config.ldm
    frames = self.frames if self.video else 1
    vae_factor, _ = pipeline_common.size_multiple(self.vae, self.unet)
    latent = self.size // vae_factor
    if self.train_crop:
      latent = self.train_crop
    trainable = c.train if self.video else "all"
    total = flops_lib.unet_training_flops(
        self.unet,
        latent,
        latent,
        batch=batch_size,
        frames=frames,
        context_length=self.tokenizer.max_length,
        trainable=trainable,
    ).total
    text = flops_lib.clip_text_flops(self.text_encoder, batch=batch_size).total
    total += text * (flops_lib.TRAIN_FACTOR if c.text_encoder.train else 1)
    if not c.get("latent_cache_dir"):
      sizes = [self.size] + ([self.size // self.upsample] if self.upsample else [])
      total += sum(
          flops_lib.autoencoder_flops(
              self.vae, size, size, batch=batch_size, frames=frames, part="encode"
          ).total
          for size in sizes
      )
    return float(total)

  # ---- training -------------------------------------------------------------------------------
  def make_data(self, sharding, process_index, process_count):
    data = self.config.data
    cache_dir = self.config.ldm.latent_cache_dir
    if cache_dir:  # encode the frozen VAE once per example instead of once per step
      if not self._frozen_vae:
        raise RuntimeError("make_data needs the frozen VAE: call init_frozen first.")
      build_latent_cache(self, data, cache_dir, self._frozen_vae, process_index, process_count)
      data = data.copy_and_resolve_references()
      data.name, data.cache_dir = "latent_cache", cache_dir
    return common.make_data(data, sharding, process_index, process_count, self.tokenizer)

  def posterior(self, vae_params, pixels):
    """VAE posterior (mean, std) of pixels [B, (F,) H, W, 3] in [-1, 1], unscaled (less the VAE's
    shift_factor, if any), shaped [B, (F,) h, w, c]."""
    lead = pixels.shape[:-3]
    images = pixels.reshape((-1,) + pixels.shape[-3:])

    def encode(x):
      posterior = self.vae.apply({"params": vae_params}, x, method="encode")
      return posterior.mean, posterior.std

    chunk = self.config.ldm.get("encode_chunk_size")
    if chunk and images.shape[0] > chunk:  # frames a chunk at a time: one chunk's activations live
      n = -(-images.shape[0] // chunk)
      padded = jnp.pad(images, ((0, n * chunk - images.shape[0]),) + ((0, 0),) * 3)
      mean, std = jax.lax.map(encode, padded.reshape((n, chunk) + images.shape[1:]))
      mean, std = (x.reshape((n * chunk,) + x.shape[2:])[: images.shape[0]] for x in (mean, std))
    else:
      mean, std = encode(images)
    shift = getattr(self.vae, "shift_factor", None)
    if shift is not None:
      mean = mean - shift
    return tuple(x.reshape(lead + x.shape[1:]) for x in (mean, std))

  def moments(self, vae_params, pixels) -> dict:
    """What the latent cache stores per example: the posterior {latent_mean, latent_std}, and for
    an upsampler {low_res_mean, low_res_std}, the posterior of the clip area-downsampled by the
    factor (what the base stage's latents stand for)."""
    mean, std = self.posterior(vae_params, pixels)
    out = {"latent_mean": mean, "latent_std": std}
    if self.upsample:
      f = self.upsample
      *lead, h, w, ch = pixels.shape
      low = pixels.reshape(tuple(lead) + (h // f, f, w // f, f, ch)).mean(axis=(-4, -2))
      out["low_res_mean"], out["low_res_std"] = self.posterior(vae_params, low)
    return out

  def latents(self, frozen, batch, rng) -> dict:
    """Scaled posterior samples of a batch, {latent[, low_res]}: from its cached moments, or by
    encoding its pixels."""
    if "latent_mean" not in batch:
      batch = self.moments(frozen["vae"], batch["video" if self.video else "image"])
    names, keys = (
        (("latent", "low_res"), jax.random.split(rng)) if self.upsample else (("latent",), [rng])
    )
    out = {}
    for name, key in zip(names, keys):
      mean, std = batch[f"{name}_mean"], batch[f"{name}_std"]
      out[name] = (mean + std * jax.random.normal(key, mean.shape, mean.dtype)) * frozen["scale"]
    return out

  def _image_only_indicator(self, batch: int):
    """[B, F]: 1 for the first ⌊fraction · B⌋ examples (stills), None without joint training.
    Batches are shuffled, so which clips go as stills changes every step."""
    images = int(self.config.ldm.joint_image_fraction * batch)
    if not images:
      return None
    return jnp.broadcast_to((jnp.arange(batch) < images)[:, None], (batch, self.frames)).astype(
        jnp.float32
    )

  def loss_options(self) -> dict:
    """The stage's `losses.diffusion_loss` settings: parameterization, σ sampling, weighting."""
    c = self.config.ldm
    return dict(
        parameterization=self.prediction_type,
        schedule=self.schedule,
        noise_sampling=c.noise_sampling,
        p_mean=c.p_mean,
        p_std=c.p_std,
        weighting=c.weighting,
        min_snr_gamma=c.min_snr_gamma,
    )

  def loss_fn(self, params, frozen, batch, rng):
    c = self.config.ldm
    encode_rng, loss_rng = jax.random.split(rng)
    latents = jax.lax.stop_gradient(self.latents(frozen, batch, encode_rng))
    x0 = latents["latent"]
    context = self.text_encoder.apply({"params": params["text_encoder"]}, batch["input_ids"])[0]
    condition = None
    if self.upsample:  # as the pipeline conditions it: see pipelines.common.low_res_condition
      low_res = latents["low_res"]
      if self.train_crop:
        x0, low_res = random_windows(
            x0, low_res, self.train_crop, self.upsample, jax.random.fold_in(encode_rng, 2)
        )
      alpha_bar = self.schedule.alphas_cumprod[c.upsampler.noise_level]
      condition = pipeline_common.low_res_condition(
          low_res,
          jax.random.normal(jax.random.fold_in(encode_rng, 1), low_res.shape),
          alpha_bar,
          self.upsample,
      )
    frames, frame_mask = self.frame_conditioning, None
    if frames:
      frame_mask, condition = self.frame_condition(x0, batch, jax.random.fold_in(encode_rng, 3))
    extra = {}
    if self.video:
      indicator = self._image_only_indicator(x0.shape[0])
      if indicator is not None:
        extra["image_only_indicator"] = indicator
    if self.unet.num_time_ids:
      extra["added_time_ids"] = added_time_ids(self.config, batch, x0.shape[0])

    def network(x, t):
      if condition is not None:  # an upsampler's or a frame-conditioned model's input
        x = jnp.concatenate([x, condition.astype(x.dtype)], axis=-1)
      return self.unet.apply({"params": params["unet"]}, x, t, context, **extra)

    loss, aux = losses.diffusion_loss(
        network, x0, loss_rng, per_frame=bool(frames), **self.loss_options()
    )
    mse = aux["mse"]
    if frames:  # the given frames are not the model's to generate
      loss = frame_conditioning.generated_frames_loss(loss, frame_mask)
      mse = frame_conditioning.generated_frames_loss(mse, frame_mask)
    return jnp.mean(loss), dict(mse=jnp.mean(mse), latent_std=jnp.std(x0))

  def frame_condition(self, x0, batch, rng):
    """(mask [B, F], condition [B, F, h, w, C + 3]) of a training batch's latents: given frames
    drawn per example (`frame_conditioning.sample_masks`), noise-augmented to a level drawn in
    [0, max_noise_level], the interpolation regime from the clip's fps."""
    s = self.frame_conditioning
    mask_rng, level_rng, noise_rng = jax.random.split(rng, 3)
    b, f = x0.shape[:2]
    mask = frame_conditioning.sample_masks(
        mask_rng,
        s["mode"],
        b,
        f,
        context_choices=s["context_choices"],
        context_probs=s["context_probs"],
        stride=s["stride"],
        uncond_prob=s["uncond_prob"],
        unconditional_allowed=batch.get("clip_start"),
    )
    levels = jax.random.randint(level_rng, (b,), 0, s["max_noise_level"] + 1)
    given = frame_conditioning.augment(
        x0, levels, self.schedule.alphas_cumprod, jax.random.normal(noise_rng, x0.shape)
    )
    level = levels.astype(jnp.float32) / self.schedule.num_train_timesteps
    condition = frame_conditioning.build_condition(given, mask, level, self.regime(batch, b))
    return mask, condition

  def regime(self, batch, batch_size: int):
    """[B] the interpolation regime label of a batch's clips: 1 where fps ≥ regime_fps."""
    boundary = self.frame_conditioning["regime_fps"]
    if self.frame_conditioning["mode"] != "interpolation" or not boundary or "fps" not in batch:
      return jnp.zeros((batch_size,), jnp.float32)
    return (jnp.asarray(batch["fps"], jnp.float32) >= boundary).astype(jnp.float32)

  # ---- sampling -------------------------------------------------------------------------------
  def sampler_settings(self) -> pipeline_common.SamplerSettings:
    """The stage's sampler: `ldm.sampler.name` / `options`, else the scheduler folder's."""
    s = self.config.ldm.sampler
    name = s.get("name") or self._scheduler_sampler
    if not name:
      raise ValueError("ldm.sampler.name is not set and the stage has no scheduler folder.")
    options = dict(s.options) if s.get("name") else dict(self._scheduler_options)
    return pipeline_common.SamplerSettings(name, self.schedule, options, self.prediction_type)

  def components(self, params, frozen) -> dict:
    """{unet, vae, text_encoder: (module, params), tokenizer, sampler, num_steps, guidance_scale}
    for `vldm.pipelines.pipeline_from_components`; an upsampler adds its base stage's
    (`low_res`) and its own sampling settings (`ldm.sampler` is then the base's)."""
    s = self.config.ldm.sampler
    out = dict(
        unet=(self.unet, params["unet"]),
        vae=(self.vae.clone(scaling_factor=float(frozen["scale"])), frozen["vae"]),
        text_encoder=(self.text_encoder, params["text_encoder"]),
        tokenizer=self.tokenizer,
        sampler=self.sampler_settings(),
        num_steps=s.num_steps,
        guidance_scale=s.guidance_scale,
    )
    frames = self.frame_conditioning
    if frames:
      out.update(
          frame_conditioning=frames["mode"],
          frame_stride=frames["stride"],
          condition_noise_level=frames["sample_noise_level"],
          context_scale=frames["context_scale"],
      )
    if self.unet.num_time_ids:  # sample with the stage's micro-conditioning defaults
      micro = micro_settings(self.config)
      out["time_ids"] = (micro["sample_fps"] - 1, micro["sample_motion_bucket_id"], 0.0)
    if self.upsample:
      up, base = self.config.ldm.upsampler, frozen["low_res"]
      out.update(
          low_res=dict(
              out,
              unet=(self.base_unet, base["unet"]),
              text_encoder=(self.text_encoder, base["text_encoder"]),
          ),
          low_res_factor=up.factor,
          low_res_noise_level=up.noise_level,
          upsampler_num_steps=up.num_steps,
          upsampler_guidance_scale=up.guidance_scale,
      )
    return out

  def pipeline(self, params, frozen):
    """The pipeline of these parameters (a CascadePipeline for an upsampler), its compiled
    functions kept across calls (the trainer samples with it every `sample_every` steps)."""
    components = self.components(params, frozen)
    if self._pipeline is None:
      self._pipeline = pipeline_workdir.pipeline_from_components(components)
    else:  # same modules: keep the compiled functions, swap the parameters
      pipes = [(self._pipeline, components)]
      if self.upsample:
        pipes = [
            (self._pipeline.upsampler, components),
            (self._pipeline.base, components["low_res"]),
        ]
      for pipe, parts in pipes:
        pipe.params = {k: parts[k][1] for k in ("unet", "vae", "text_encoder")}
    return self._pipeline

  def generate(
      self,
      params,
      frozen,
      prompts: Sequence[str],
      rng,
      *,
      num_frames: Optional[int] = None,
      size: Optional[int] = None,
      **kwargs,
  ):
    """Clips [B, F, H, W, 3] in [0, 1], one per prompt (still frames for the image stage), with
    the stage's sampler settings unless kwargs (num_steps, guidance_scale, …) say otherwise.
    A prediction or interpolation stage without `given_latents` samples its unconditional
    branch (no frame given)."""
    size = size or self.size
    num_frames = num_frames or (self.frames if self.video else 1)
    if self.frame_conditioning and kwargs.get("given_latents") is None:
      vae_factor, _ = pipeline_common.size_multiple(self.vae, self.unet)
      shape = (len(prompts), num_frames, size // vae_factor, size // vae_factor)
      kwargs.update(
          given_latents=np.zeros(shape + (self.vae.latent_channels,), np.float32),
          given_mask=np.zeros(shape[:2], np.float32),
      )
      return self.pipeline(params, frozen)(list(prompts), rng=rng, **kwargs)
    return self.pipeline(params, frozen)(
        list(prompts), num_frames=num_frames, height=size, width=size, rng=rng, **kwargs
    )

  def sample_fn(self, params, frozen, rng):
    prompts = self.config.ldm.sample_prompts
    clips = self.generate(params, frozen, prompts, rng)
    return {f"prompt_{i}": clip for i, clip in enumerate(clips)}

  def eval_fn(self, params, frozen, rng):
    """config.eval's metrics of clips sampled for its fixed prompts (vldm.eval.evaluator)."""
    if self._evaluation is None:
      from vldm.eval import evaluator  # pylint: disable=g-import-not-at-top  # its networks

      self._evaluation = evaluator.DuringTraining(
          self.config.eval, self.frames if self.video else 1
      )
    return self._evaluation(lambda prompts, key: self.generate(params, frozen, prompts, key), rng)


def build_latent_cache(
    task: LatentDiffusionTask, data_config, cache_dir, vae_params, process_index, process_count
):
  """Writes the VAE posterior moments (`LatentDiffusionTask.moments`) of every training example of
  `data_config` to cache_dir/<train split> unless a complete cache is there (a resumed stage
  reuses it). Unscaled: the stage applies its scale, and samples the posterior every step."""
  directory = os.path.join(cache_dir, data_config.train_split)
  if os.path.exists(os.path.join(directory, f"index.p{process_index}.json")):
    return
  moments_fn = jax.jit(task.moments)
  moments = lambda pixels: jax.device_get(moments_fn(vae_params, *devices.split_batch(pixels)))

  sources.build_cache(
      data_config,
      data_config.train_split,
      cache_dir,
      moments,
      lambda captions: {},
      batch_size=task.config.ldm.latent_cache_batch_size,
      process_index=process_index,
      process_count=process_count,
  )
  if process_count > 1:  # every process reads every process's rows
    multihost_utils.sync_global_devices(f"latent cache {directory}")
