"""Image-to-video as Stable Video Diffusion samples it (diffusers' StableVideoDiffusionPipeline).

  pipe = ImageToVideoPipeline.from_pretrained("path/to/svd")          # a diffusers folder
  frames = pipe(image, num_frames=14, height=576, width=1024, rng=0)  # [B,F,H,W,3] in [0,1]

What one call does, in diffusers' order:
  1. context: the CLIP image embedding [B,1,P] of the input image at its own size, anti-aliased
     down to the image encoder's size and CLIP-normalised (`preprocess_for_clip`).
  2. image latents: the input image resized to (height, width) (PIL Lanczos, as diffusers'
     VaeImageProcessor), in [-1, 1], plus noise_aug_strength · n, VAE-encoded, the posterior's
     mode (NOT × scaling_factor), repeated over frames, concatenated to the UNet input channels
     after the c_in scaling (`scale_model_input`).
  3. added_time_ids = [fps − 1, motion_bucket_id, noise_aug_strength].
  4. guidance when max_guidance_scale > 1: the unconditional branch has zero image embeddings and
     zero image latents (same time ids), scale linspace(min, max, F) per frame.
  5. the sampler from noise · init_noise_sigma, then ÷ scaling_factor, the temporal decoder
     `decode_chunk_size` frames at a time, (x / 2 + 0.5) clamped to [0, 1].
Steps 1–4 and the sampling loop are one jitted function (compiled once per shapes, num_steps and
guidance on/off), the decoder another (per decode_chunk_size), both kept on the pipeline: the
latents stay on the device between them, output='latents' reuses the sampler's executable, and a
new decode_chunk_size does not recompile the sampler.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vldm import devices
from vldm.diffusion import guidance as guidance_lib
from vldm.models import clip as clip_lib
from vldm.models import unet as unet_lib
from vldm.pipelines import common

# diffusers' SVD scheduler (stabilityai/stable-video-diffusion-img2vid[-xt] scheduler_config.json).
SVD_SCHEDULER_CONFIG = dict(
    _class_name="EulerDiscreteScheduler", beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", interpolation_type="linear", num_train_timesteps=1000,
    prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
    timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)

NEEDS = {
    "unet": "UNetSpatioTemporalConditionModel",
    "vae": "AutoencoderKLTemporalDecoder or AutoencoderKL",
    "image_encoder": "CLIPVisionModelWithProjection",
    "scheduler": f"{common.SCHEDULER_CONFIG} of a diffusers scheduler",
}
FEATURE_EXTRACTOR_CONFIG = os.path.join("feature_extractor", "preprocessor_config.json")
OUTPUTS = ("frames", "latents")


# ------------------------------------------------------------------------------ input images
def _to_list(image) -> list:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(image, (str, os.PathLike)):
    return [Image.open(image)]
  if isinstance(image, Image.Image):
    return [image]
  if isinstance(image, (list, tuple)):
    return [item for part in image for item in _to_list(part)]
  array = np.asarray(image)
  if array.ndim == 3:
    return [array]
  if array.ndim == 4:
    return list(array)
  raise ValueError(f"image must be a path, a PIL image, an array [H,W,3] or [B,H,W,3], or a list "
                   f"of those; got an array of shape {array.shape}.")


def _to_float(image) -> np.ndarray:
  """[H,W,3] float32 in [0, 1] (diffusers' pil_to_numpy: uint8 / 255)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(image, Image.Image):
    image = np.asarray(image.convert("RGB"))
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"Images must be RGB [H,W,3]; got shape {image.shape}.")
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  if not np.issubdtype(image.dtype, np.floating):
    raise ValueError(f"Image arrays must be uint8 or float in [0, 1]; got {image.dtype}.")
  if image.min() < -1e-3 or image.max() > 1 + 1e-3:
    raise ValueError(f"Float images must lie in [0, 1]; got range [{image.min():.3g}, "
                     f"{image.max():.3g}].")
  return image.astype(np.float32)


def _resize(image, height: int, width: int) -> np.ndarray:
  """PIL Lanczos resize (diffusers' VaeImageProcessor.resize for PIL input) → [H,W,3] in [0,1]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(image, Image.Image):
    return _to_float(image.convert("RGB").resize((width, height), Image.LANCZOS))
  image = _to_float(image)
  if image.shape[:2] == (height, width):
    return image
  # Float input: the same filter per channel in PIL's float mode (no rounding to 8 bits).
  channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F")
                         .resize((width, height), Image.LANCZOS)) for c in range(3)]
  return np.stack(channels, axis=-1).astype(np.float32)


def prepare_images(image, height: Optional[int] = None, width: Optional[int] = None):
  """(originals [B,H0,W0,3], resized [B,H,W,3], (H, W)), both in [-1, 1], on the host.

  height / width default to the input's own size. All images of a batch share one size.
  """
  images = _to_list(image)
  if not images:
    raise ValueError("No image given.")
  originals = [_to_float(im) for im in images]
  sizes = {im.shape[:2] for im in originals}
  if len(sizes) != 1:
    raise ValueError(f"All images of a batch must have one size; got {sorted(sizes)}.")
  h0, w0 = sizes.pop()
  height, width = height or h0, width or w0
  resized = [_resize(im, height, width) for im in images]
  to_signed = lambda ims: np.stack(ims) * 2.0 - 1.0
  return to_signed(originals), to_signed(resized), (height, width)


# ------------------------------------------------------------------------------------ pipeline
@dataclasses.dataclass
class ImageToVideoPipeline:
  """SVD image-to-video from vldm modules and params (see the module docstring).

  params: {'unet': …, 'vae': …, 'image_encoder': …}. `sampler`: the sampler, schedule and
  prediction type (default: SVD's Euler). `clip_mean` / `clip_std`: the feature extractor's
  normalisation (OpenAI CLIP's unless the folder's preprocessor_config.json says otherwise).
  `default_num_steps`, `default_min_guidance_scale`, `default_max_guidance_scale`: a call's when it
  passes none (diffusers' StableVideoDiffusionPipeline defaults unless a model needs others).
  """
  unet: unet_lib.UNet
  vae: nn.Module
  image_encoder: clip_lib.CLIPVisionModelWithProjection
  params: dict
  sampler: common.SamplerSettings = dataclasses.field(
      default_factory=lambda: common.SamplerSettings.from_scheduler_config(SVD_SCHEDULER_CONFIG))
  clip_mean: Sequence[float] = clip_lib.CLIP_MEAN
  clip_std: Sequence[float] = clip_lib.CLIP_STD
  default_num_steps: int = 25
  default_min_guidance_scale: float = 1.0
  default_max_guidance_scale: float = 3.0
  _compiled: common.CompiledCache = common.compiled_cache_field()

  def __post_init__(self):
    self._check_components()

  # ---- construction ----------------------------------------------------------------------
  @classmethod
  def from_components(cls, *, unet: common.Component, vae: common.Component,
                      image_encoder: common.Component, sampler=None,
                      **kwargs) -> "ImageToVideoPipeline":
    """From (module, params) pairs. `sampler`: SamplerSettings or a diffusers scheduler config
    dict; default SVD's Euler settings."""
    extra = {} if sampler is None else {"sampler": common.as_sampler_settings(sampler)}
    return cls(unet=unet[0], vae=vae[0], image_encoder=image_encoder[0],
               params=dict(unet=unet[1], vae=vae[1], image_encoder=image_encoder[1]),
               **extra, **kwargs)

  @classmethod
  def from_pretrained(cls, folder: str, **kwargs) -> "ImageToVideoPipeline":
    """From a diffusers StableVideoDiffusionPipeline folder (unet/, vae/, image_encoder/,
    scheduler/, optional feature_extractor/); kwargs set fields (e.g. default_num_steps)."""
    common.check_components(folder, "image-to-video", NEEDS)
    load = functools.partial(common.load_component, folder)
    extractor = os.path.join(folder, FEATURE_EXTRACTOR_CONFIG)
    if os.path.isfile(extractor):
      config = common.read_json(extractor)
      kwargs = {"clip_mean": tuple(config.get("image_mean", clip_lib.CLIP_MEAN)),
                "clip_std": tuple(config.get("image_std", clip_lib.CLIP_STD)), **kwargs}
    return cls.from_components(
        unet=load("unet", [unet_lib.UNet], NEEDS["unet"]),
        vae=load("vae", common.VAES, NEEDS["vae"]),
        image_encoder=load("image_encoder", [clip_lib.CLIPVisionModelWithProjection],
                           NEEDS["image_encoder"]),
        sampler=common.load_sampler_settings(folder), **kwargs)

  def with_sampler(self, sampler: str, **options) -> "ImageToVideoPipeline":
    """The same models with another sampler (options as in diffusers; see vldm.diffusion)."""
    return dataclasses.replace(self, sampler=self.sampler.with_sampler(sampler, **options))

  def _check_components(self) -> None:
    unet, vae, encoder = self.unet, self.vae, self.image_encoder
    if not isinstance(unet, unet_lib.UNet) or not unet.temporal:
      kind = "an image UNet" if isinstance(unet, unet_lib.UNet) else type(unet).__name__
      raise common.PipelineError("The image-to-video pipeline needs a video UNet (vldm UNet with "
                                 f"temporal=True); got {kind}.")
    if not isinstance(vae, common.VAES):
      raise common.PipelineError(f"vae must be one of {[c.__name__ for c in common.VAES]}; got "
                                 f"{type(vae).__name__}.")
    if not isinstance(encoder, clip_lib.CLIPVisionModelWithProjection):
      raise common.PipelineError("image_encoder must be a CLIPVisionModelWithProjection; got "
                                 f"{type(encoder).__name__}.")
    c = vae.latent_channels
    problems = []
    if unet.in_channels != 2 * c:
      problems.append(f"the UNet takes {unet.in_channels} input channels; SVD conditioning needs "
                      f"2 × the VAE's {c} latent channels (noise latents + image latents)")
    if unet.out_channels != c:
      problems.append(f"the UNet predicts {unet.out_channels} channels, the VAE has {c}")
    if unet.context_dim != encoder.projection_dim:
      problems.append(f"the UNet's cross_attention_dim is {unet.context_dim}, the image "
                      f"encoder's projection_dim {encoder.projection_dim}")
    if unet.num_time_ids != 3:
      problems.append(f"the UNet takes {unet.num_time_ids} added time ids; SVD passes 3 "
                      "[fps-1, motion_bucket_id, noise_aug_strength]")
    if problems:
      raise common.PipelineError("These components do not fit together: " + "; ".join(problems)
                                 + ".")
    if set(self.params) != {"unet", "vae", "image_encoder"}:
      raise common.PipelineError("params must be {'unet', 'vae', 'image_encoder'}; got "
                                 f"{sorted(self.params)}.")

  # ---- sampling --------------------------------------------------------------------------
  @property
  def trace_count(self) -> int:
    """How many times a jitted function of this pipeline was traced (compiled) so far."""
    return self._compiled.traces

  def __call__(self, image, *, num_frames: Optional[int] = None, height: Optional[int] = None,
               width: Optional[int] = None, num_steps: Optional[int] = None,
               min_guidance_scale: Optional[float] = None,
               max_guidance_scale: Optional[float] = None, fps: int = 7,
               motion_bucket_id: int = 127, noise_aug_strength: float = 0.02,
               decode_chunk_size: Optional[int] = None, rng=None, noise=None, image_noise=None,
               output: str = "frames") -> np.ndarray:
    """Frames [B,F,H,W,3] in [0,1] (or, with output='latents', the sampled latents [B,F,h,w,c]).

    image: a path, PIL image, array [H,W,3] / [B,H,W,3] (uint8, or float in [0,1]) or a list.
    height, width: default the image's size; multiples of the VAE × UNet downsampling factor.
    num_frames: default the UNet config's. num_steps, min/max_guidance_scale: default the
    pipeline's default_*. rng: an int seed, a PRNG key or one key per image.
    noise [B,F,h,w,c] (standard normal; the sampler scales it by init_noise_sigma) and
    image_noise [B,H,W,3] (the noise augmentation draw) replace the draws from rng.
    """
    if output not in OUTPUTS:
      raise ValueError(f"Unknown output {output!r}; accepted: {OUTPUTS}.")
    num_steps = self.default_num_steps if num_steps is None else num_steps
    if min_guidance_scale is None:
      min_guidance_scale = self.default_min_guidance_scale
    if max_guidance_scale is None:
      max_guidance_scale = self.default_max_guidance_scale
    originals, resized, (height, width) = prepare_images(image, height, width)
    common.check_size(height, width, self.vae, self.unet)
    batch = originals.shape[0]
    frames = self.unet.num_frames if num_frames is None else num_frames
    if not isinstance(frames, (int, np.integer)) or frames < 1:
      raise ValueError(f"num_frames must be a positive integer; got {num_frames!r}.")
    vae_factor, _ = common.size_multiple(self.vae, self.unet)
    latent_shape = (frames, height // vae_factor, width // vae_factor, self.vae.latent_channels)
    plan = self.sampler.plan(num_steps)  # validates num_steps and the options on the host
    keys = None if rng is None else common.example_keys(rng, batch)
    if keys is None and (noise is None or image_noise is None or plan.stochastic):
      raise ValueError("Pass rng (an int seed or PRNG key), or both noise and image_noise (and rng "
                       f"for the stochastic sampler {self.sampler.sampler!r}).")
    noise = (common.draw_normal(keys, latent_shape, 0) if noise is None
             else common.check_array("noise", noise, (batch,) + latent_shape))
    image_noise = (common.draw_normal(keys, (height, width, 3), 1) if image_noise is None
                   else common.check_array("image_noise", image_noise, (batch, height, width, 3)))
    sampler_key = jax.random.key(0) if keys is None else common.sampler_key(keys)

    use_guidance = max_guidance_scale > 1  # diffusers' do_classifier_free_guidance
    scales = guidance_lib.frame_guidance_scale(min_guidance_scale, max_guidance_scale, frames,
                                               batch)
    time_ids = np.tile(np.array([[fps - 1, motion_bucket_id, noise_aug_strength]], np.float32),
                       (batch, 1))
    sample = self._compiled.get(("sample", num_steps, use_guidance), functools.partial(
        self._sample, num_steps=num_steps, use_guidance=use_guidance))
    originals, resized, image_noise, noise, scales, time_ids = devices.split_batch(
        originals, resized, image_noise, noise, scales, time_ids)
    latents = sample(self.params, originals, resized, image_noise, jnp.float32(noise_aug_strength),
                     noise, scales, time_ids, sampler_key)
    if output == "latents":
      return np.asarray(latents)
    decode = self._compiled.decoder(self.vae, decode_chunk_size)
    return np.asarray(decode(self.params["vae"], latents))

  def _clip_pixels(self, originals):
    pixels = clip_lib.preprocess_for_clip(originals, self.image_encoder.image_size)
    if (tuple(self.clip_mean), tuple(self.clip_std)) != (clip_lib.CLIP_MEAN, clip_lib.CLIP_STD):
      unit = pixels * jnp.asarray(clip_lib.CLIP_STD) + jnp.asarray(clip_lib.CLIP_MEAN)
      pixels = (unit - jnp.asarray(self.clip_mean)) / jnp.asarray(self.clip_std)
    return pixels

  def _sample(self, params, originals, resized, image_noise, noise_aug_strength, noise, scales,
              time_ids, sampler_key, *, num_steps, use_guidance):
    """Conditioning encoders + the sampling loop (one jitted function); → latents."""
    frames = noise.shape[1]
    embeddings = self.image_encoder.apply({"params": params["image_encoder"]},
                                          self._clip_pixels(originals))[:, None]  # [B, 1, P]
    augmented = resized + noise_aug_strength * image_noise
    image_latents = self.vae.apply({"params": params["vae"]}, augmented, method="encode").mode()
    image_latents = jnp.repeat(image_latents[:, None], frames, axis=1)
    cond = dict(context=embeddings, image_latents=image_latents, time_ids=time_ids)

    def network(x, t, c):
      x = jnp.concatenate([x, c["image_latents"].astype(x.dtype)], axis=-1)
      return self.unet.apply({"params": params["unet"]}, x, t, c["context"], c["time_ids"])

    if use_guidance:
      uncond = dict(context=jnp.zeros_like(embeddings), image_latents=jnp.zeros_like(image_latents),
                    time_ids=time_ids)
      guided = guidance_lib.classifier_free_guidance(network, cond, uncond, scales)
    else:
      guided = lambda x, t: network(x, t, cond)
    return common.sample_latents(self.sampler, guided, noise, num_steps, sampler_key)
