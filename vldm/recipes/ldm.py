"""The shapes recipe's latent diffusion stages: image LDM, video LDM (inflated), high resolution.

One task, `LatentDiffusionTask`, configured by `config.ldm`:
  image   a text-conditioned image UNet on stills; the CLIP text encoder (small, from scratch, over
          the file-free WordTokenizer) trains jointly with it. Caption dropout in the data gives
          the unconditional branch for classifier-free guidance.
  video   the image UNet inflated (`vldm.models.inflate`): temporal layers inserted, their output
          layers zero-initialised so the video UNet starts as the image UNet frame by frame; the
          spatial layers are frozen (`train='temporal'`, `trainable_labels`); the temporal layers
          and (`train_text_encoder`) the text encoder learn, on clips.
  hires   the video model fine-tuned at a higher resolution (`train='all'` or 'temporal'); with
          `ldm.upsampler.factor` set, as Video LDM's latent upsampler: its UNet also takes the
          low-resolution clip's latents (noise-augmented, upsampled, concatenated; the input conv
          widened with zero weights, `widen_input`) and samples after the base stage
          (`ldm.upsampler.low_res_workdir`, frozen), so shape and motion come from the base.
The VAE is frozen: the temporal-decoder autoencoder of the autoencoder stages
(`config.ldm.vae_workdir`); its latents are scaled by 1/std, measured on fixed rendered frames
(`latent_scale`), so every stage and the sampler agree on the scale without storing it. With
`config.ldm.latent_cache_dir` set, a stage first writes the VAE posterior (mean, std) of every
training example there and trains on it, sampling the posterior each step: the encoder runs once
per example instead of once per step (a resumed stage reuses the cache).

Why the text encoder trains in the image stage and again in the video stage: there is no pretrained
encoder for a 19-token vocabulary, so it has to be learned. The image stage learns captions and
appearance together, but image captions have no direction words, so the encoder meets "moving left"
only in the video stage. Frozen there, it hands the temporal layers untrained direction tokens, and
the shapes recipe's direction accuracy stayed at chance (15–18 %); trained there, with the spatial
layers still frozen, 93 % (README, "Where it stands").
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from vldm.data import shapes
from vldm.data import sources
from vldm.diffusion import losses
from vldm.diffusion.schedules import DiscreteSchedule
from vldm.models import clip as clip_lib
from vldm.models import inflate
from vldm.models import unet as unet_lib
from vldm.pipelines import common as pipeline_common
from vldm.pipelines import workdir as pipeline_workdir
from vldm.recipes import autoencoder as autoencoder_recipe
from vldm.recipes import common
from vldm.train import sharding as sharding_lib
from vldm.train import tasks as tasks_lib

KINDS = ("image", "video")
TRAIN_CHOICES = ("all", "temporal")
# Output layers of the temporal branches and the frame position embedding (a temporal block with
# zero outputs passes its input, positions included, through): zero at init, so inflation starts
# from the image model. The text motion embedding is zero at init on its own.
_ZERO_INIT = re.compile(r"(temporal_res_block/conv2|temporal_transformer_blocks_\d+/(ff_in|ff)/"
                        r"net_2|temporal_transformer_blocks_\d+/attn[12]/to_out_0|"
                        r"time_pos_embed/linear_2)/")
SCALE_EXAMPLES = 64  # rendered 32-px frames whose latent std sets the scaling factor


def image_unet(config) -> unet_lib.UNet:
  return unet_lib.UNet(**config.ldm.unet.to_dict())


def make_unet(config) -> unet_lib.UNet:
  """The stage's UNet: the image UNet, or its inflated video version."""
  unet = image_unet(config)
  if config.ldm.kind == "video":
    unet = inflate.video_config_from_image(unet, **config.ldm.temporal.to_dict())
  return unet


def make_text_encoder(config, tokenizer) -> clip_lib.CLIPTextModel:
  return clip_lib.CLIPTextModel(**config.ldm.text.to_dict(), **tokenizer.text_model_config())


def make_schedule(config) -> DiscreteSchedule:
  return DiscreteSchedule(**config.ldm.schedule.to_dict())


def sampler_settings(config) -> pipeline_common.SamplerSettings:
  s = config.ldm.sampler
  return pipeline_common.SamplerSettings(s.name, make_schedule(config), dict(s.options),
                                         config.ldm.prediction_type)


def latent_scale(vae, vae_params, size: int = 32) -> float:
  """1 / std of the VAE's latent means on fixed rendered frames (LDM's scale_factor), `size` the
  autoencoder's training resolution: the same value for every stage, whatever its resolution."""
  images = np.stack([shapes.make_example("image", "train", i, size=size)["image"]
                     for i in range(SCALE_EXAMPLES)]).astype(np.float32) / 127.5 - 1.0
  encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode").mean)
  return float(1.0 / np.std(np.asarray(encode(vae_params, images))))


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
        f"target's {target['unet']['conv_in']['kernel'].shape[-2]}.")
  pad = [(0, 0)] * (kernel.ndim - 2) + [(0, new_in), (0, 0)]
  widened["conv_in"] = dict(source["unet"]["conv_in"], kernel=jnp.pad(kernel, pad))
  return tasks_lib.as_is(dict(source, unet=widened), target)


def inflate_transform(source, target):
  """Image stage → video stage: spatial layers and text encoder from the image stage, temporal
  layers as initialised in the target (zero output layers)."""
  return dict(target, unet=inflate.transplant_temporal(target["unet"], source["unet"]),
              text_encoder=tasks_lib.as_is(source["text_encoder"], target["text_encoder"]))


class LatentDiffusionTask(tasks_lib.Task):
  """Text-to-image / text-to-video latent diffusion on shapes (see the module docstring).

  Parameters: {'unet', 'text_encoder'}; frozen: {'vae', 'scale'}.
  """

  def __init__(self, config):
    super().__init__(config)
    c = config.ldm
    if c.kind not in KINDS:
      raise ValueError(f"ldm.kind must be one of {KINDS}, got {c.kind!r}.")
    if c.train not in TRAIN_CHOICES:
      raise ValueError(f"ldm.train must be one of {TRAIN_CHOICES}, got {c.train!r}.")
    if c.kind != config.data.kind:
      raise ValueError(f"ldm.kind {c.kind!r} needs data.kind {c.kind!r}, got "
                       f"{config.data.kind!r}.")
    self.upsample = c.upsampler.factor if "upsampler" in c else 0  # configs saved before it: 0
    self.train_crop = 0
    latent_channels = config.autoencoder.vae.latent_channels
    wanted = latent_channels * (2 if self.upsample else 1)
    if c.unet.in_channels != wanted:
      what = (f"a latent upsampler (ldm.upsampler.factor={self.upsample}) needs 2 × the VAE's "
              if self.upsample else "the UNet denoises the VAE's ")
      raise ValueError(f"ldm.unet.in_channels is {c.unet.in_channels}; {what}{latent_channels} "
                       f"latent channels = {wanted}.")
    self.tokenizer = common.shapes_tokenizer(c.max_length)
    self.unet = make_unet(config)
    # The upsampler's base stage: the same video UNet, without the conditioning channels.
    self.base_unet = self.unet.clone(in_channels=latent_channels) if self.upsample else None
    self.text_encoder = make_text_encoder(config, self.tokenizer)
    self.vae = autoencoder_recipe.temporal_decoder(config)
    if self.upsample:
      vae_factor, pixel_multiple = pipeline_common.size_multiple(self.vae, self.unet)
      multiple = pixel_multiple * self.upsample
      if c.kind != "video" or self.upsample < 2 or config.data.resolution % multiple:
        raise ValueError(f"ldm.upsampler.factor={self.upsample} needs kind 'video', a factor ≥ 2 "
                         f"and a data resolution divisible by {multiple} (the base samples at "
                         f"1/factor); got kind {c.kind!r}, resolution {config.data.resolution}.")
      # Train on the same random window of the latents and their low-res latents (0: whole).
      self.train_crop = c.upsampler.get("train_crop", 0)  # configs saved before it: 0
      window_multiple = multiple // vae_factor
      latent_size = config.data.resolution // vae_factor
      if self.train_crop and (self.train_crop % window_multiple or self.train_crop > latent_size):
        raise ValueError(
            f"ldm.upsampler.train_crop is {self.train_crop}; it must be 0 (whole latents) or a "
            f"window ≤ the latent size {latent_size} divisible by {window_multiple} (the UNet's "
            f"size multiple × the factor: the low-resolution window must be whole too).")
    self.schedule = make_schedule(config)
    self.size, self.frames = config.data.resolution, config.data.frames
    self._pipeline = None
    self._pipeline_scale = None
    self._frozen_vae = None

  @property
  def video(self) -> bool:
    return self.config.ldm.kind == "video"

  # ---- parameters -----------------------------------------------------------------------------
  def init_params(self, rng):
    ids = jnp.zeros((1, self.tokenizer.max_length), jnp.int32)
    frames = (self.frames,) if self.video else ()
    latent = jnp.zeros((1,) + frames + (8, 8, self.unet.in_channels))
    context = jnp.zeros((1, self.tokenizer.max_length, self.text_encoder.hidden_size))

    def init(key):
      unet_key, text_key = jax.random.split(key)
      return {"unet": self.unet.init(unet_key, latent, jnp.zeros((1,)), context)["params"],
              "text_encoder": self.text_encoder.init(text_key, ids)["params"]}

    mix = self.config.ldm.temporal.merge_factor
    params = common.task_init(self, init, rng, {"mix_factor": mix})
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {k: jnp.zeros_like(v) if _ZERO_INIT.search("/".join(k)) else v for k, v in flat.items()})

  def trainable_labels(self, params):
    c = self.config.ldm
    temporal_only = self.video and c.train == "temporal"

    def label(path):
      if path[0] == "text_encoder":
        return tasks_lib.TRAIN if c.train_text_encoder else tasks_lib.FREEZE
      if temporal_only and not inflate.is_temporal(path):
        return tasks_lib.FREEZE
      return tasks_lib.TRAIN

    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: label(k) for k in flat})

  def init_transforms(self):
    return {"inflate": inflate_transform, "widen_input": widen_input_transform}

  def init_frozen(self, mesh):
    vae_params = common.load_stage_params(self.config.ldm.vae_workdir, mesh)
    scale = latent_scale(self.vae, vae_params, self.config.autoencoder.vae.sample_size)
    self._frozen_vae = vae_params
    frozen = {"vae": vae_params, "scale": np.float32(scale)}
    if self.upsample:  # the base stage samples what the upsampler is conditioned on
      low_res = common.load_stage_params(self.config.ldm.upsampler.low_res_workdir, mesh)
      frozen["low_res"] = {k: low_res[k] for k in ("unet", "text_encoder")}
    return frozen

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
    """VAE posterior (mean, std) of pixels [B, (F,) H, W, 3] in [-1, 1], unscaled, shaped
    [B, (F,) h, w, c]."""
    lead = pixels.shape[:-3]
    posterior = self.vae.apply({"params": vae_params}, pixels.reshape((-1,) + pixels.shape[-3:]),
                               method="encode")
    return tuple(x.reshape(lead + x.shape[1:]) for x in (posterior.mean, posterior.std))

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
    names, keys = (("latent", "low_res"), jax.random.split(rng)) if self.upsample else (
        ("latent",), [rng])
    out = {}
    for name, key in zip(names, keys):
      mean, std = batch[f"{name}_mean"], batch[f"{name}_std"]
      out[name] = (mean + std * jax.random.normal(key, mean.shape, mean.dtype)) * frozen["scale"]
    return out

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
        x0, low_res = random_windows(x0, low_res, self.train_crop, self.upsample,
                                     jax.random.fold_in(encode_rng, 2))
      alpha_bar = self.schedule.alphas_cumprod[c.upsampler.noise_level]
      condition = pipeline_common.low_res_condition(
          low_res, jax.random.normal(jax.random.fold_in(encode_rng, 1), low_res.shape), alpha_bar,
          self.upsample)

    def network(x, t):
      if condition is not None:  # a latent upsampler's input: noisy latents + the condition
        x = jnp.concatenate([x, condition], axis=-1)
      return self.unet.apply({"params": params["unet"]}, x, t, context)

    loss, aux = losses.diffusion_loss(network, x0, loss_rng, parameterization=c.prediction_type,
                                      schedule=self.schedule, noise_sampling=c.noise_sampling,
                                      p_mean=c.p_mean, p_std=c.p_std, weighting=c.weighting,
                                      min_snr_gamma=c.min_snr_gamma)
    return jnp.mean(loss), dict(mse=jnp.mean(aux["mse"]), latent_std=jnp.std(x0))

  # ---- sampling -------------------------------------------------------------------------------
  def components(self, params, frozen) -> dict:
    """{unet, vae, text_encoder: (module, params), tokenizer, sampler} for
    `vldm.pipelines.pipeline_from_components`; an upsampler adds its base stage's (`low_res`) and
    its own sampling settings (the config's `ldm.sampler` is then the base's)."""
    out = dict(unet=(self.unet, params["unet"]),
               vae=(self.vae.clone(scaling_factor=float(frozen["scale"])), frozen["vae"]),
               text_encoder=(self.text_encoder, params["text_encoder"]),
               tokenizer=self.tokenizer, sampler=sampler_settings(self.config))
    if self.upsample:
      up, base = self.config.ldm.upsampler, frozen["low_res"]
      out.update(low_res=dict(out, unet=(self.base_unet, base["unet"]),
                              text_encoder=(self.text_encoder, base["text_encoder"])),
                 low_res_factor=up.factor, low_res_noise_level=up.noise_level,
                 upsampler_num_steps=up.num_steps, upsampler_guidance_scale=up.guidance_scale)
    return out

  def pipeline(self, params, frozen):
    """The pipeline of these parameters (a CascadePipeline for an upsampler), its compiled
    functions kept across calls."""
    components = self.components(params, frozen)
    scale = float(frozen["scale"])
    if self._pipeline is None or self._pipeline_scale != scale:
      self._pipeline = pipeline_workdir.pipeline_from_components(components)
      self._pipeline_scale = scale
    else:  # same modules: keep the compiled functions, swap the parameters
      pipes = [(self._pipeline, components)]
      if self.upsample:
        pipes = [(self._pipeline.upsampler, components),
                 (self._pipeline.base, components["low_res"])]
      for pipe, parts in pipes:
        pipe.params = {k: parts[k][1] for k in ("unet", "vae", "text_encoder")}
    return self._pipeline

  def generate(self, params, frozen, prompts: Sequence[str], rng, *,
               num_frames: Optional[int] = None, size: Optional[int] = None,
               num_steps: Optional[int] = None, guidance_scale: Optional[float] = None):
    """Clips [B, F, H, W, 3] in [0, 1], one per prompt (still frames for the image stage)."""
    s = self.config.ldm.sampler
    size = size or self.size
    return self.pipeline(params, frozen)(
        list(prompts), num_frames=num_frames or (self.frames if self.video else 1), height=size,
        width=size, num_steps=num_steps or s.num_steps,
        guidance_scale=s.guidance_scale if guidance_scale is None else guidance_scale, rng=rng)

  def sample_fn(self, params, frozen, rng):
    prompts = self.config.ldm.sample_prompts
    clips = self.generate(params, frozen, prompts, rng)
    return {f"prompt_{i}": clip for i, clip in enumerate(clips)}


def build_latent_cache(task: LatentDiffusionTask, data_config, cache_dir, vae_params,
                       process_index, process_count):
  """Writes the VAE posterior moments (`LatentDiffusionTask.moments`) of every training example of
  `data_config` to cache_dir/<train split> unless a complete cache is there (a resumed stage
  reuses it). Unscaled: the stage applies its scale, and samples the posterior every step."""
  directory = os.path.join(cache_dir, data_config.train_split)
  if os.path.exists(os.path.join(directory, f"index.p{process_index}.json")):
    return
  moments_fn = jax.jit(task.moments)
  moments = lambda pixels: jax.device_get(moments_fn(vae_params, *sharding_lib.split_batch(pixels)))

  sources.build_cache(data_config, data_config.train_split, cache_dir,
                      moments, lambda captions: {},
                      batch_size=64, process_index=process_index, process_count=process_count)
  if process_count > 1:  # every process reads every process's rows
    multihost_utils.sync_global_devices(f"latent cache {directory}")


def restore(config: ml_collections.ConfigDict, workdir: str):
  """(task, params, frozen) of a trained diffusion stage: its newest (EMA) parameters."""
  task = tasks_lib.get_task(config)
  if not isinstance(task, LatentDiffusionTask):
    raise ValueError(f"{workdir} holds a {type(task).__name__} stage, not a diffusion stage.")
  params = common.load_stage_params(workdir)
  return task, params, task.init_frozen(None)



def _tuples(value):
  """JSON lists back to tuples (module fields and config values are tuples in the recipe)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def saved_config(checkpoint_path: str) -> ml_collections.ConfigDict:
  """The config a run saved beside its checkpoint (`<run>/checkpoints/<step>/config`)."""
  path = os.path.join(checkpoint_path, "config", "metadata")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{checkpoint_path} has no saved config ({path}).")
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def restore_stage(stage) -> dict:
  """A trained shapes diffusion stage (`vldm.pipelines.TrainedStage`) → pipeline components.

  For `vldm.pipelines.pipeline_from_workdir(workdir, restore=restore_stage)`, which is how
  `python -m vldm.sample --workdir DIR` can sample a shapes run.
  """
  config = saved_config(stage.path)
  task, params, frozen = restore(config, stage.run_dir)
  return task.components(params, frozen)
