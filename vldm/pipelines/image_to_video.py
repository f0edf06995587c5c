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
  3. added_time_ids = [fps − 1, motion_bucket_id, noise_aug_strength] (`time_ids`); fps,
     motion_bucket_id and noise_aug_strength default to the pipeline's default_* (what the model
     was trained with), and must lie in its micro_conditioning_ranges when it has them.
  4. guidance when max_guidance_scale > 1: the unconditional branch has zero image embeddings and
     zero image latents (same time ids), scale linspace(min, max, F) per frame.
  5. the sampler from noise · init_noise_sigma, then ÷ scaling_factor, the temporal decoder
     `decode_chunk_size` frames at a time, (x / 2 + 0.5) clamped to [0, 1].
Steps 1–4 and the sampling loop are one jitted function (compiled once per shapes, num_steps and
guidance on/off), the decoder another (per decode_chunk_size), both kept on the pipeline: the
latents stay on the device between them, output='latents' reuses the sampler's executable, and a
new decode_chunk_size does not recompile the sampler.

`image_embeddings`, `image_latents` and `time_ids` are steps 1–3 as functions of arrays, so that a
training loss conditions the UNet with exactly the numerics this pipeline samples with.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Mapping, Optional, Sequence

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
MICRO_CONDITIONS = ("fps", "motion_bucket_id", "noise_aug_strength")


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


# ---------------------------------------------------------------------------- conditioning
def clip_pixels(originals, image_size: int, clip_mean: Sequence[float] = clip_lib.CLIP_MEAN,
                clip_std: Sequence[float] = clip_lib.CLIP_STD):
  """Images [B,H0,W0,3] in [-1, 1] → the image encoder's input: anti-aliased to image_size and
  normalised by the feature extractor's mean / std. Traceable."""
  pixels = clip_lib.preprocess_for_clip(originals, image_size)
  if (tuple(clip_mean), tuple(clip_std)) != (clip_lib.CLIP_MEAN, clip_lib.CLIP_STD):
    unit = pixels * jnp.asarray(clip_lib.CLIP_STD) + jnp.asarray(clip_lib.CLIP_MEAN)
    pixels = (unit - jnp.asarray(clip_mean)) / jnp.asarray(clip_std)
  return pixels


def image_embeddings(image_encoder: clip_lib.CLIPVisionModelWithProjection, encoder_params,
                     originals, *, clip_mean: Sequence[float] = clip_lib.CLIP_MEAN,
                     clip_std: Sequence[float] = clip_lib.CLIP_STD):
  """The UNet's context [B, 1, P]: the projected CLIP embedding of images [B,H0,W0,3] in [-1, 1]
  (at their own size; `clip_pixels` resizes). Traceable."""
  pixels = clip_pixels(originals, image_encoder.image_size, clip_mean, clip_std)
  return image_encoder.apply({"params": encoder_params}, pixels)[:, None]


def image_latents(vae: nn.Module, vae_params, pixels):
  """The conditioning latents [B,h,w,c] of images [B,H,W,3] in [-1, 1]: the VAE posterior's mode,
  NOT × scaling_factor (SVD's convention). SVD passes the noise-augmented image,
  pixels + noise_aug_strength · n. Traceable."""
  return vae.apply({"params": vae_params}, pixels, method="encode").mode()


def time_ids(fps, motion_bucket_id, noise_aug_strength, batch: Optional[int] = None):
  """added_time_ids [B, 3] float32: [fps − 1, motion_bucket_id, noise_aug_strength] (diffusers').

  Each value is a scalar or per-example [B]; scalars repeat over `batch` (default 1, or the
  per-example values' B). numpy in, numpy out (the pipeline's host side); traceable with jax.
  """
  values = (fps, motion_bucket_id, noise_aug_strength)
  xp = jnp if any(isinstance(v, jax.Array) for v in values) else np
  values = [xp.asarray(v, xp.float32) for v in values]
  shape = np.broadcast_shapes(*(v.shape for v in values))
  if len(shape) > 1:
    raise ValueError(f"fps, motion_bucket_id and noise_aug_strength must be scalars or [B]; got "
                     f"shapes {[v.shape for v in values]}.")
  if batch is not None and shape not in ((), (batch,)):
    raise ValueError(f"Per-example time ids of shape {shape} do not match batch {batch}.")
  shape = (batch or 1,) if shape == () else shape
  fps, motion, aug = (xp.broadcast_to(v, shape) for v in values)
  return xp.stack([fps - 1, motion, aug], axis=-1).astype(xp.float32)


def _check_ranges(ranges) -> dict:
  """micro_conditioning_ranges as {name: (lo, hi)}, validated."""
  if not isinstance(ranges, Mapping):
    raise ValueError("micro_conditioning_ranges must map names among "
                     f"{MICRO_CONDITIONS} to (low, high); got {type(ranges).__name__}.")
  unknown = sorted(set(ranges) - set(MICRO_CONDITIONS))
  if unknown:
    raise ValueError(f"Unknown micro-conditioning name(s) {unknown} in micro_conditioning_ranges; "
                     f"accepted: {MICRO_CONDITIONS}.")
  checked = {}
  for name, bounds in ranges.items():
    try:
      lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
      raise ValueError(f"micro_conditioning_ranges[{name!r}] must be (low, high); got "
                       f"{bounds!r}.") from None
    if lo > hi:
      raise ValueError(f"micro_conditioning_ranges[{name!r}] = {bounds!r} has low > high.")
    checked[name] = (lo, hi)
  return checked


# ------------------------------------------------------------------------------------ pipeline
@dataclasses.dataclass
class ImageToVideoPipeline:
  """SVD image-to-video from vldm modules and params (see the module docstring).

  params: {'unet': …, 'vae': …, 'image_encoder': …}. `sampler`: the sampler, schedule and
  prediction type (default: SVD's Euler). `clip_mean` / `clip_std`: the feature extractor's
  normalisation (OpenAI CLIP's unless the folder's preprocessor_config.json says otherwise).
  `default_num_steps`, `default_min_guidance_scale`, `default_max_guidance_scale`, `default_fps`,
  `default_motion_bucket_id`, `default_noise_aug_strength`: a call's when it passes none
  (diffusers' StableVideoDiffusionPipeline defaults unless a model was trained with others).
  `micro_conditioning_ranges`: {'fps' | 'motion_bucket_id' | 'noise_aug_strength': (low, high)},
  the values the model was trained on; a call outside them is an error (None: any value).
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
  default_fps: float = 7
  default_motion_bucket_id: float = 127
  default_noise_aug_strength: float = 0.02
  micro_conditioning_ranges: Optional[Mapping[str, tuple[float, float]]] = None
  _compiled: common.CompiledCache = common.compiled_cache_field()

  def __post_init__(self):
    self._check_components()
    if self.micro_conditioning_ranges is not None:
      self.micro_conditioning_ranges = _check_ranges(self.micro_conditioning_ranges)

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
               max_guidance_scale: Optional[float] = None, fps: Optional[float] = None,
               motion_bucket_id: Optional[float] = None,
               noise_aug_strength: Optional[float] = None,
               decode_chunk_size: Optional[int] = None, rng=None, noise=None, image_noise=None,
               output: str = "frames") -> np.ndarray:
    """Frames [B,F,H,W,3] in [0,1] (or, with output='latents', the sampled latents [B,F,h,w,c]).

    image: a path, PIL image, array [H,W,3] / [B,H,W,3] (uint8, or float in [0,1]) or a list.
    height, width: default the image's size; multiples of the VAE × UNet downsampling factor.
    num_frames: default the UNet config's. num_steps, min/max_guidance_scale, fps,
    motion_bucket_id, noise_aug_strength: default the pipeline's default_*; fps > 0, and each
    within micro_conditioning_ranges when the pipeline has them.
    rng: an int seed, a PRNG key or one key per image.
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
    fps, motion_bucket_id, noise_aug_strength = self.micro_conditions(
        fps, motion_bucket_id, noise_aug_strength)
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
    ids = time_ids(fps, motion_bucket_id, noise_aug_strength, batch)
    sample = self._compiled.get(("sample", num_steps, use_guidance), functools.partial(
        self._sample, num_steps=num_steps, use_guidance=use_guidance))
    originals, resized, image_noise, noise, scales, ids = devices.split_batch(
        originals, resized, image_noise, noise, scales, ids)
    latents = sample(self.params, originals, resized, image_noise, jnp.float32(noise_aug_strength),
                     noise, scales, ids, sampler_key)
    if output == "latents":
      return np.asarray(latents)
    decode = self._compiled.decoder(self.vae, decode_chunk_size)
    return np.asarray(decode(self.params["vae"], latents))

  def micro_conditions(self, fps=None, motion_bucket_id=None, noise_aug_strength=None):
    """(fps, motion_bucket_id, noise_aug_strength): the pipeline's defaults for those None, checked
    (fps > 0; within micro_conditioning_ranges)."""
    values = dict(fps=fps, motion_bucket_id=motion_bucket_id,
                  noise_aug_strength=noise_aug_strength)
    values = {k: getattr(self, f"default_{k}") if v is None else v for k, v in values.items()}
    if not values["fps"] > 0:
      raise ValueError(f"fps must be > 0 (the UNet is conditioned on fps − 1); got "
                       f"{values['fps']!r}.")
    for name, (lo, hi) in (self.micro_conditioning_ranges or {}).items():
      if not lo <= values[name] <= hi:
        raise ValueError(f"{name}={values[name]!r} is outside [{lo:g}, {hi:g}]: the model was "
                         f"trained on {name} in that range (micro_conditioning_ranges).")
    return values["fps"], values["motion_bucket_id"], values["noise_aug_strength"]

  def _sample(self, params, originals, resized, image_noise, noise_aug_strength, noise, scales,
              ids, sampler_key, *, num_steps, use_guidance):
    """Conditioning encoders + the sampling loop (one jitted function); → latents."""
    frames = noise.shape[1]
    embeddings = image_embeddings(self.image_encoder, params["image_encoder"], originals,
                                  clip_mean=self.clip_mean, clip_std=self.clip_std)  # [B, 1, P]
    augmented = resized + noise_aug_strength * image_noise
    latents = image_latents(self.vae, params["vae"], augmented)
    latents = jnp.repeat(latents[:, None], frames, axis=1)
    cond = dict(context=embeddings, image_latents=latents, time_ids=ids)

    def network(x, t, c):
      x = jnp.concatenate([x, c["image_latents"].astype(x.dtype)], axis=-1)
      return self.unet.apply({"params": params["unet"]}, x, t, c["context"], c["time_ids"])

    if use_guidance:
      uncond = dict(context=jnp.zeros_like(embeddings), image_latents=jnp.zeros_like(latents),
                    time_ids=ids)
      guided = guidance_lib.classifier_free_guidance(network, cond, uncond, scales)
    else:
      guided = lambda x, t: network(x, t, cond)
    return common.sample_latents(self.sampler, guided, noise, num_steps, sampler_key)
