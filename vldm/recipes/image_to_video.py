"""Stable Video Diffusion's image-to-video stage: `ImageToVideoTask`.

The video UNet denoises a clip's latents conditioned on its first frame, as SVD trains it and as
diffusers' StableVideoDiffusionPipeline (vldm's `ImageToVideoPipeline`) samples it:
  context         the CLIP image embedding [B, 1, P] of the conditioning frame (a frozen
                  CLIPVisionModelWithProjection), the cross-attention context
  image latents   the VAE posterior mode (unscaled) of the conditioning frame plus pixel noise
                  σ_aug · n, ln σ_aug ~ N(`ldm.i2v.cond_aug_mean`, `cond_aug_std`²), concatenated
                  on channels to every frame's noisy latents (the UNet takes 2 × the latent
                  channels)
  added time ids  [fps − 1, motion bucket, σ_aug] (`ldm.added_time_ids`: the clip's fps and
                  measured motion)
  dropout         u ~ U(0, 1) per example, p = `ldm.i2v.conditioning_dropout`: the embedding is
                  zeroed for u < 2p, the image latents for p ≤ u < 3p, so both are for p ≤ u < 2p:
                  the unconditional branch classifier-free guidance samples with
The loss is the stage's (`ldm.prediction_type` 'v_edm': v-prediction on c_in x at c_noise = ¼ ln σ,
log-normal σ, EDM weighting), on latents scaled by the VAE's scaling factor.

Starts: a published SVD folder (`ldm.pretrained`: unet/ vae/ image_encoder/ scheduler/ and
optionally feature_extractor/; transform 'as_is'), or a text-to-video stage of this recipe
(`init_from`, transform 'to_image_to_video': the input conv widened with zero weights for the image
latents, the text encoder dropped), or an image stage ('inflate_to_image_to_video': widened and
inflated). Parameters: {'unet'}; frozen: {'vae', 'scale',
'image_encoder'}. Clips come as pixels (no latent cache: the conditioning frame is noised in pixel
space every step).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vldm.diffusion import losses
from vldm.models import clip as clip_lib
from vldm.models import inflate
from vldm.pipelines import common as pipeline_common
from vldm.pipelines import image_to_video as i2v_pipeline
from vldm.pipelines import workdir as pipeline_workdir
from vldm.recipes import common
from vldm.recipes import components as components_lib
from vldm.recipes import ldm
from vldm.train import tasks as tasks_lib

SAMPLE_IMAGES = 2  # conditioning frames the trainer samples from (the first clips of the data)


def to_image_to_video_transform(source, target):
  """A text-to-video stage → image-to-video: the UNet as it is but its input conv widened with zero
  weights for the image latents (so it starts as the text-to-video model with a null image), and
  the text encoder left behind."""
  widened = ldm.widen_input_transform({"unet": source["unet"]}, {"unet": target["unet"]})
  return dict(target, unet=widened["unet"])


def inflate_to_image_to_video_transform(source, target):
  """An image stage (or an SD image UNet) → image-to-video in one step: the image UNet's input conv
  widened with zero weights for the frame latents, then inflated (spatial layers from the source,
  temporal layers and the added-time-ids embedding as initialised); the text encoder left behind.
  """
  widened = ldm.widen_input_transform(
      {"unet": source["unet"]}, {"unet": inflate.spatial_params(target["unet"])}
  )
  return dict(target, unet=inflate.transplant_temporal(target["unet"], widened["unet"]))


def condition_draws(rng, batch_size: int, image_shape, mean: float, std: float) -> dict:
  """The per-step randomness of the conditioning: {'cond_sigma' [B] (σ_aug), 'cond_noise'
  [B, H, W, 3], 'dropout' [B] (u ~ U(0, 1))}."""
  sigma_key, noise_key, drop_key = jax.random.split(rng, 3)
  return dict(
      cond_sigma=jnp.exp(mean + std * jax.random.normal(sigma_key, (batch_size,))),
      cond_noise=jax.random.normal(noise_key, (batch_size,) + tuple(image_shape)),
      dropout=jax.random.uniform(drop_key, (batch_size,)),
  )


class ImageToVideoTask(ldm.LatentDiffusionTask):
  """SVD image-to-video fine-tuning (see the module docstring)."""

  PRETRAINED_COMPONENTS = components_lib.IMAGE_COMPONENTS
  eval_fn = None  # config.eval samples from prompts; image-to-video samples from images

  def __init__(self, config):  # pylint: disable=super-init-not-called
    # pylint: disable-next=non-parent-init-called
    tasks_lib.Task.__init__(self, config)  # the text-to-video parts are not built
    c = config.ldm
    if c.kind != "video" or config.data.kind != "video":
      raise components_lib.ComponentError(
          f"An image-to-video stage needs ldm.kind and data.kind 'video'; got {c.kind!r} and "
          f"{config.data.kind!r}."
      )
    if c.get("latent_cache_dir"):
      raise components_lib.ComponentError(
          "ldm.latent_cache_dir is not used by an image-to-video stage: its conditioning frame is "
          "noised in pixel space every step, so it trains on pixels; unset it."
      )
    if not 0 <= c.i2v.conditioning_dropout <= 1 / 3:
      raise components_lib.ComponentError(
          f"ldm.i2v.conditioning_dropout must be in [0, 1/3] (u < 2p drops the embedding, "
          f"p ≤ u < 3p the image latents); got {c.i2v.conditioning_dropout}."
      )
    components_lib.check_pretrained(config, self.PRETRAINED_COMPONENTS)
    self.upsample, self.train_crop, self.base_unet = 0, 0, None
    self.unet = components_lib.make_unet(config)
    self.vae = components_lib.make_vae(config)
    self.image_encoder = components_lib.make_image_encoder(config, self.unet.context_dim)
    self.clip_mean, self.clip_std = components_lib.clip_normalization(config)
    self.schedule, self.prediction_type, self._scheduler_sampler, self._scheduler_options = (
        components_lib.schedule_and_prediction(config)
    )
    self._check_unet(config)
    vae_factor, _ = pipeline_common.size_multiple(self.vae, self.unet)
    self.unet = self.unet.clone(
        sample_size=config.data.resolution // vae_factor, num_frames=config.data.frames
    )
    self.size, self.frames = config.data.resolution, config.data.frames
    self._pipeline = None
    self._frozen_vae = None
    self._sample_images: Optional[np.ndarray] = None

  def _check_unet(self, config) -> None:
    latent = self.vae.latent_channels
    problems = []
    if not self.unet.temporal:
      problems.append("the UNet must be a video UNet")
    if self.unet.in_channels != 2 * latent:
      problems.append(
          f"the UNet takes {self.unet.in_channels} input channels; image-to-video needs 2 × the "
          f"VAE's {latent} latent channels (noisy latents + the conditioning frame's)"
      )
    if self.unet.out_channels != latent:
      problems.append(f"the UNet predicts {self.unet.out_channels} channels, the VAE has {latent}")
    if self.unet.num_time_ids != 3:
      problems.append(
          f"the UNet takes {self.unet.num_time_ids} added time ids; SVD conditions on 3 "
          "[fps − 1, motion_bucket_id, noise_aug_strength] (set ldm.temporal."
          "addition_time_embed_dim and projection_class_embeddings_input_dim = 3 × it)"
      )
    if problems:
      raise components_lib.ComponentError(
          "These components do not make an image-to-video stage: " + "; ".join(problems) + "."
      )
    vae_factor, multiple = pipeline_common.size_multiple(self.vae, self.unet)
    if config.data.resolution % multiple:
      raise components_lib.ComponentError(
          f"data.resolution {config.data.resolution} must be a multiple of {multiple} (the VAE "
          f"downsamples by {vae_factor}, the UNet's levels by {multiple // vae_factor})."
      )

  # ---- parameters -----------------------------------------------------------------------------
  def init_params(self, rng):
    latent = jnp.zeros((1, self.frames, 8, 8, self.unet.in_channels))
    context = jnp.zeros((1, 1, self.unet.context_dim))
    time_ids = jnp.zeros((1, 3))
    init = lambda key: {
        "unet": self.unet.init(key, latent, jnp.zeros((1,)), context, time_ids)["params"]
    }
    return common.task_init(self, init, rng, {"mix_factor": self.unet.merge_factor})

  def init_transforms(self):
    return {
        "to_image_to_video": to_image_to_video_transform,
        "inflate_to_image_to_video": inflate_to_image_to_video_transform,
    }

  def init_frozen(self, mesh):
    frozen = super().init_frozen(mesh)
    frozen["image_encoder"] = components_lib.image_encoder_params(
        self.config, self.image_encoder, self.config.seed
    )
    return frozen

  def abstract_frozen(self):
    frozen = super().abstract_frozen()
    frozen["image_encoder"] = components_lib.abstract_image_encoder_params(self.image_encoder)
    return frozen

  def abstract_batch(self, batch_size: int) -> dict:
    return self._abstract_batch(batch_size, text_length=None)  # no captions: no token ids

  def step_flops(self, batch_size: int) -> float:
    """Model FLOPs of one step: the whole UNet's forward + backward on the concatenated input, the
    frozen VAE encoder on the frames and the noised first frame, CLIP on the first frame (and its
    resize, traced); no remat."""
    from vldm.benchmark import flops as flops_lib  # pylint: disable=g-import-not-at-top

    vae_factor, _ = pipeline_common.size_multiple(self.vae, self.unet)
    latent, b = self.size // vae_factor, batch_size
    unet = flops_lib.unet_training_flops(
        self.unet, latent, latent, batch=b, frames=self.frames, context_length=1, trainable="all"
    )
    vae = flops_lib.autoencoder_flops(
        self.vae, self.size, self.size, batch=b, frames=self.frames + 1, part="encode"
    )
    clip = flops_lib.clip_vision_flops(self.image_encoder, batch=b)
    resize = flops_lib.jaxpr_flops(
        lambda x: clip_lib.preprocess_for_clip(x, self.image_encoder.image_size),
        jax.ShapeDtypeStruct((b, self.size, self.size, 3), jnp.float32),
    )
    return float(unet.total + vae.total + clip.total + resize.total)

  # ---- training -------------------------------------------------------------------------------
  def make_data(self, sharding, process_index, process_count):
    data = common.make_data(self.config.data, sharding, process_index, process_count)
    # The trainer's samples start from the first frames of the first clips (the same every run).
    first = data.pipeline.local_batch(0, 0)["video"][:SAMPLE_IMAGES, 0]
    self._sample_images = np.clip((first + 1) / 2, 0, 1)
    return data

  def condition(self, frozen, pixels, draws):
    """(context [B, 1, P], image latents [B, F, h, w, c], σ_aug [B]) of clips [B, F, H, W, 3] in
    [-1, 1], their first frames noised and dropped out as `draws` say."""
    first = pixels[:, 0]
    embedding = i2v_pipeline.image_embeddings(
        self.image_encoder,
        frozen["image_encoder"],
        first,
        clip_mean=self.clip_mean,
        clip_std=self.clip_std,
    )
    sigma = draws["cond_sigma"]
    noised = first + sigma[:, None, None, None] * draws["cond_noise"]
    image_latents = i2v_pipeline.image_latents(self.vae, frozen["vae"], noised)
    p = self.config.ldm.i2v.conditioning_dropout
    u = draws["dropout"]
    keep_embedding = (u >= 2 * p).astype(embedding.dtype)
    keep_latents = ((u < p) | (u >= 3 * p)).astype(image_latents.dtype)
    embedding = embedding * keep_embedding[:, None, None]
    image_latents = image_latents * keep_latents[:, None, None, None]
    frames = pixels.shape[1]
    image_latents = jnp.repeat(image_latents[:, None], frames, axis=1)
    return jax.lax.stop_gradient(embedding), jax.lax.stop_gradient(image_latents), sigma

  def conditioned_loss(self, params, frozen, batch, x0, draws, rng, *, sigma=None, noise=None):
    """(per-example loss [B], aux) of clean scaled latents x0 under the conditioning of `draws`;
    `sigma` / `noise` replace the loss's own draws (tests compute it from the equations)."""
    context, image_latents, cond_sigma = self.condition(frozen, batch["video"], draws)
    time_ids = ldm.added_time_ids(self.config, batch, x0.shape[0], noise_aug=cond_sigma)

    def network(x, t):
      x = jnp.concatenate([x, image_latents.astype(x.dtype)], axis=-1)
      return self.unet.apply({"params": params["unet"]}, x, t, context, time_ids)

    return losses.diffusion_loss(network, x0, rng, sigma=sigma, noise=noise, **self.loss_options())

  def loss_fn(self, params, frozen, batch, rng):
    i2v = self.config.ldm.i2v
    encode_rng, condition_rng, loss_rng = jax.random.split(rng, 3)
    x0 = jax.lax.stop_gradient(self.latents(frozen, batch, encode_rng)["latent"])
    pixels = batch["video"]
    draws = condition_draws(
        condition_rng, pixels.shape[0], pixels.shape[2:], i2v.cond_aug_mean, i2v.cond_aug_std
    )
    loss, aux = self.conditioned_loss(params, frozen, batch, x0, draws, loss_rng)
    return jnp.mean(loss), dict(mse=jnp.mean(aux["mse"]), latent_std=jnp.std(x0))

  # ---- sampling -------------------------------------------------------------------------------
  def components(self, params, frozen) -> dict:
    """The image-to-video pipeline's components (`vldm.pipelines.pipeline_from_components`), with
    the stage's sampling defaults and the micro-conditioning ranges it trained on."""
    s, i2v = self.config.ldm.sampler, self.config.ldm.i2v
    micro = ldm.micro_settings(self.config)
    return dict(
        unet=(self.unet, params["unet"]),
        vae=(self.vae.clone(scaling_factor=float(frozen["scale"])), frozen["vae"]),
        image_encoder=(self.image_encoder, frozen["image_encoder"]),
        sampler=self.sampler_settings(),
        clip_mean=self.clip_mean,
        clip_std=self.clip_std,
        num_steps=s.num_steps,
        min_guidance_scale=i2v.min_guidance_scale,
        max_guidance_scale=i2v.max_guidance_scale,
        fps=micro["sample_fps"],
        motion_bucket_id=micro["sample_motion_bucket_id"],
        noise_aug_strength=i2v.sample_noise_aug_strength,
        micro_conditioning_ranges=ldm.micro_conditioning_ranges(self.config),
    )

  def pipeline(self, params, frozen):
    components = self.components(params, frozen)
    if self._pipeline is None:
      self._pipeline = pipeline_workdir.pipeline_from_components(components)
    else:  # same modules: keep the compiled functions, swap the parameters
      self._pipeline.params = {k: components[k][1] for k in ("unet", "vae", "image_encoder")}
    return self._pipeline

  def generate(  # pylint: disable=arguments-renamed
      self, params, frozen, images, rng, *, num_frames=None, size=None, **kwargs
  ):
    """Clips [B, F, H, W, 3] in [0, 1], one per conditioning image, with the stage's sampler
    settings unless kwargs (num_steps, motion_bucket_id, …) say otherwise."""
    size = size or self.size
    return self.pipeline(params, frozen)(
        images, num_frames=num_frames or self.frames, height=size, width=size, rng=rng, **kwargs
    )

  def sample_fn(self, params, frozen, rng):
    if self._sample_images is None:
      return {}
    clips = self.generate(params, frozen, list(self._sample_images), rng)
    return {f"image_{i}": clip for i, clip in enumerate(clips)}
