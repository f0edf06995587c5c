"""Text-to-video: prompts → CLIP text context → sampled video latents → decoded frames.

  pipe = TextToVideoPipeline.from_components(unet=(m, p), vae=(m, p), text_encoder=(m, p),
                                             tokenizer=tok, sampler=settings)
  frames = pipe(["a red circle moving left"], num_frames=8, height=64, width=64, rng=0)

The UNet is either a video UNet (vldm `UNet(temporal=True)`, diffusers
UNetSpatioTemporalConditionModel with in_channels = latent channels, or AnimateDiff's
UNetMotionModel) that denoises the whole clip, or an image UNet (UNet2DConditionModel) that then
denoises every frame as an image of its own (the frames of one clip share the prompt, not the
noise). An AnimateDiffPipeline folder whose unet/ is a UNet2DConditionModel gets its
motion_adapter/ attached, as diffusers' pipeline does. The VAE is the temporal decoder
(AutoencoderKLTemporalDecoder, clip-wise) or AutoencoderKL (frame by frame); both decode
`decode_chunk_size` frames at a time.

As diffusers' text-to-image pipelines do: prompts and the negative prompt ("" by default) are
tokenized padded to max_length, the context is the text encoder's last hidden state, guidance is
classifier-free with the unconditional branch first and is off when guidance_scale ≤ 1; the
sampler starts from noise · init_noise_sigma and latents are ÷ scaling_factor before decoding.
With `video=` clips and a `strength`, it is video-to-video (SDEdit) as diffusers' img2img
pipelines run it, each frame encoded to its posterior mode.
A video UNet with added time ids (SVD-style micro-conditioning) gets `time_ids`, by default
[fps − 1, motion_bucket_id, 0] when it takes three (SVD's order, with no conditioning image).
With `low_res_factor` set, the UNet is a Video LDM latent upsampler (2 × the latent channels in):
each call takes `low_res_latents` [B,F,h,w,c] (a base model's sampled latents), noises them to
`low_res_noise_level` (a training timestep: conditioning augmentation) and concatenates them,
nearest-upsampled ×factor, to the UNet input; `vldm.pipelines.CascadePipeline` chains the two.
With `frame_conditioning` set ('prediction' or 'interpolation'), the UNet is a Video LDM
frame-conditioned model (`vldm.diffusion.frame_conditioning`): each call takes `given_latents`
[B,F,h,w,c] and `given_mask` ([F] or [B,F], 1 = given), noise-augments the given latents to
`condition_noise_level` and concatenates the condition to the UNet input; `context_scale` ≠ 1 adds
context guidance (the branch without given frames, `guidance.context_guidance`).
`vldm.pipelines.LongVideoPipeline` chains such models into long videos.
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

from vldm import convert
from vldm import devices
from vldm.diffusion import frame_conditioning as frames_lib
from vldm.diffusion import guidance as guidance_lib
from vldm.diffusion import samplers
from vldm.models import clip as clip_lib
from vldm.models import tokenizer as tokenizer_lib
from vldm.models import unet as unet_lib
from vldm.pipelines import common

NEEDS = {
    "unet": "UNetSpatioTemporalConditionModel, UNetMotionModel or UNet2DConditionModel (with "
    "motion_adapter/: AnimateDiff)",
    "vae": "AutoencoderKLTemporalDecoder or AutoencoderKL",
    "text_encoder": "CLIPTextModel",
    "tokenizer": "a CLIP tokenizer: vocab.json + merges.txt, or tokenizer.json",
    "scheduler": f"{common.SCHEDULER_CONFIG} of a diffusers scheduler",
}
OUTPUTS = ("frames", "latents")
MOTION_ADAPTER = "motion_adapter"  # an AnimateDiffPipeline folder's MotionAdapter component
DEFAULT_IMAGE_UNET_FRAMES = 8  # an image UNet has no clip length of its own


@dataclasses.dataclass
class TextToVideoPipeline:
  """Text-to-video from vldm modules and params (see the module docstring).

  params: {'unet': …, 'vae': …, 'text_encoder': …}. `tokenizer`: a `vldm.models.tokenizer`
  Tokenizer. `sampler`: sampler, schedule and prediction type. `time_ids`: the added time ids
  passed to a micro-conditioned video UNet (None: see the module docstring). `low_res_factor`
  (0: none), `low_res_noise_level`: the latent upsampler's (see the module docstring).
  `default_num_steps`, `default_guidance_scale`: a call's when it passes none (e.g. the settings
  a trained stage was sampled with).
  """

  unet: unet_lib.UNet
  vae: nn.Module
  text_encoder: clip_lib.CLIPTextModel
  tokenizer: tokenizer_lib.Tokenizer
  params: dict
  sampler: common.SamplerSettings = common.SamplerSettings()
  time_ids: Optional[Sequence[float]] = None
  low_res_factor: int = 0
  low_res_noise_level: int = 0
  default_num_steps: int = 25
  default_guidance_scale: float = 7.5
  frame_conditioning: Optional[str] = None
  frame_stride: int = 4
  condition_noise_level: int = 0
  default_context_scale: float = 1.0
  _compiled: common.CompiledCache = common.compiled_cache_field()

  def __post_init__(self):
    self._check_components()

  # ---- construction ----------------------------------------------------------------------
  @classmethod
  def from_components(
      cls,
      *,
      unet: common.Component,
      vae: common.Component,
      text_encoder: common.Component,
      tokenizer: tokenizer_lib.Tokenizer,
      sampler=None,
      **kwargs,
  ) -> "TextToVideoPipeline":
    """From (module, params) pairs, e.g. a trained stage's. `sampler`: SamplerSettings or a
    diffusers scheduler config dict; default `SamplerSettings()` (Euler, linear β, ε-prediction)."""
    extra = {} if sampler is None else {"sampler": common.as_sampler_settings(sampler)}
    return cls(
        unet=unet[0],
        vae=vae[0],
        text_encoder=text_encoder[0],
        tokenizer=tokenizer,
        params=dict(unet=unet[1], vae=vae[1], text_encoder=text_encoder[1]),
        **extra,
        **kwargs,
    )

  @classmethod
  def from_pretrained(cls, folder: str, **kwargs) -> "TextToVideoPipeline":
    """From a diffusers-layout folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/ (and
    motion_adapter/ for an AnimateDiffPipeline folder whose unet/ is an image UNet)."""
    index = common.check_components(folder, "text-to-video", NEEDS)
    load = functools.partial(common.load_component, folder)
    try:
      tokenizer = tokenizer_lib.load_tokenizer(os.path.join(folder, "tokenizer"))
    except (OSError, ValueError) as e:
      raise common.PipelineError(f"Cannot load the tokenizer/ component of {folder}: {e}") from e
    unet = load("unet", [unet_lib.UNet], NEEDS["unet"])
    adapter = os.path.join(folder, MOTION_ADAPTER)
    # A UNetMotionModel already holds the adapter's modules (diffusers attaches it to 2-D only).
    if not unet[0].temporal and common.listed(index, MOTION_ADAPTER) and os.path.isdir(adapter):
      try:
        unet = convert.attach_motion_adapter(*unet, adapter)
      except (convert.ConversionError, OSError) as e:
        raise common.PipelineError(f"Cannot put {adapter} on the unet/ of {folder}: {e}") from e
    return cls.from_components(
        unet=unet,
        vae=load("vae", common.VAES, NEEDS["vae"]),
        text_encoder=load("text_encoder", [clip_lib.CLIPTextModel], NEEDS["text_encoder"]),
        tokenizer=tokenizer,
        sampler=common.load_sampler_settings(folder),
        **kwargs,
    )

  def with_sampler(self, sampler: str, **options) -> "TextToVideoPipeline":
    """The same models with another sampler (options as in diffusers; see vldm.diffusion)."""
    return dataclasses.replace(self, sampler=self.sampler.with_sampler(sampler, **options))

  def _check_components(self) -> None:
    unet, vae, encoder, tokenizer = self.unet, self.vae, self.text_encoder, self.tokenizer
    if not isinstance(unet, unet_lib.UNet):
      raise common.PipelineError(f"unet must be a vldm UNet; got {type(unet).__name__}.")
    if not isinstance(vae, common.VAES):
      raise common.PipelineError(
          f"vae must be one of {[c.__name__ for c in common.VAES]}; got " f"{type(vae).__name__}."
      )
    if not isinstance(encoder, clip_lib.CLIPTextModel):
      raise common.PipelineError(
          f"text_encoder must be a CLIPTextModel; got " f"{type(encoder).__name__}."
      )
    if not isinstance(tokenizer, tokenizer_lib.Tokenizer):
      raise common.PipelineError(
          f"tokenizer must be a vldm Tokenizer; got " f"{type(tokenizer).__name__}."
      )
    c = vae.latent_channels
    problems = []
    if self.frame_conditioning:
      if self.frame_conditioning not in frames_lib.MODES:
        problems.append(
            f"frame_conditioning must be one of {frames_lib.MODES} (or None); got "
            f"{self.frame_conditioning!r}"
        )
      if self.low_res_factor:
        problems.append("a frame-conditioned model cannot also be a latent upsampler")
      if unet.in_channels != frames_lib.conditioned_in_channels(c):
        problems.append(
            f"a {self.frame_conditioning} model takes the VAE's {c} latent channels + "
            f"the condition's {frames_lib.condition_channels(c)} = "
            f"{frames_lib.conditioned_in_channels(c)} input channels; this UNet takes "
            f"{unet.in_channels}"
        )
      if not 0 <= self.condition_noise_level < self.sampler.schedule.num_train_timesteps:
        problems.append(
            f"condition_noise_level must be a training timestep in [0, "
            f"{self.sampler.schedule.num_train_timesteps}); got "
            f"{self.condition_noise_level}"
        )
    elif self.low_res_factor:
      if unet.in_channels != 2 * c:
        problems.append(
            f"a latent upsampler (low_res_factor={self.low_res_factor}) takes 2 × the "
            f"VAE's {c} latent channels; this UNet takes {unet.in_channels}"
        )
      if not isinstance(self.low_res_factor, (int, np.integer)) or self.low_res_factor < 2:
        problems.append(
            f"low_res_factor must be an integer ≥ 2 (or 0: no upsampler); got "
            f"{self.low_res_factor!r}"
        )
      if not 0 <= self.low_res_noise_level < self.sampler.schedule.num_train_timesteps:
        problems.append(
            f"low_res_noise_level must be a training timestep in [0, "
            f"{self.sampler.schedule.num_train_timesteps}); got "
            f"{self.low_res_noise_level}"
        )
    elif unet.in_channels == frames_lib.conditioned_in_channels(c):
      problems.append(
          f"the UNet takes {unet.in_channels} input channels = the VAE's {c} + a "
          "frame condition's: it is a prediction or interpolation model (set "
          "frame_conditioning)"
      )
    elif unet.in_channels == 2 * c:
      problems.append(
          f"the UNet takes {unet.in_channels} input channels = 2 × the VAE's {c} "
          "latent channels: it is an image-to-video UNet (use ImageToVideoPipeline) or "
          "a latent upsampler (set low_res_factor)"
      )
    elif unet.in_channels != c:
      problems.append(f"the UNet takes {unet.in_channels} input channels, the VAE has {c}")
    if unet.out_channels != c:
      problems.append(f"the UNet predicts {unet.out_channels} channels, the VAE has {c}")
    if unet.context_dim != encoder.hidden_size:
      problems.append(
          f"the UNet's cross_attention_dim is {unet.context_dim}, the text encoder's "
          f"hidden_size {encoder.hidden_size}"
      )
    if tokenizer.max_length > encoder.max_position_embeddings:
      problems.append(
          f"the tokenizer pads to {tokenizer.max_length} tokens, the text encoder has "
          f"{encoder.max_position_embeddings} positions"
      )
    if tokenizer.vocab_size > encoder.vocab_size:
      problems.append(
          f"the tokenizer has {tokenizer.vocab_size} tokens, the text encoder's "
          f"vocabulary {encoder.vocab_size}"
      )
    if not unet.temporal and unet.num_time_ids:
      problems.append("an image UNet with added time ids is not supported")
    if self.time_ids is not None and len(self.time_ids) != unet.num_time_ids:
      problems.append(
          f"time_ids has {len(self.time_ids)} entries, the UNet takes " f"{unet.num_time_ids}"
      )
    if problems:
      raise common.PipelineError(
          "These components do not fit together: " + "; ".join(problems) + "."
      )
    if set(self.params) != {"unet", "vae", "text_encoder"}:
      raise common.PipelineError(
          "params must be {'unet', 'vae', 'text_encoder'}; got " f"{sorted(self.params)}."
      )

  # ---- sampling --------------------------------------------------------------------------
  @property
  def trace_count(self) -> int:
    """How many times a jitted function of this pipeline was traced (compiled) so far."""
    return self._compiled.traces

  def default_size(self) -> tuple[int, int]:
    """(height, width) from the UNet config's sample_size × the VAE factor."""
    size = self.unet.sample_size
    if size is None:
      raise ValueError("This UNet's config has no sample_size: pass height and width.")
    vae_factor, _ = common.size_multiple(self.vae, self.unet)
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    return h * vae_factor, w * vae_factor

  def _time_ids(self, batch: int, fps: int, motion_bucket_id: int, time_ids):
    n = self.unet.num_time_ids
    if not n:
      if time_ids is not None:
        raise ValueError("This UNet takes no added time ids; do not pass time_ids.")
      return None
    if time_ids is None:
      time_ids = self.time_ids
    if time_ids is None:
      if n != 3:
        raise ValueError(f"This UNet takes {n} added time ids: pass time_ids (one value each).")
      time_ids = (fps - 1, motion_bucket_id, 0.0)
    if len(time_ids) != n:
      raise ValueError(f"time_ids has {len(time_ids)} entries; this UNet takes {n}.")
    return np.tile(np.asarray([time_ids], np.float32), (batch, 1))

  def __call__(
      self,
      prompts,
      *,
      num_frames: Optional[int] = None,
      height: Optional[int] = None,
      width: Optional[int] = None,
      num_steps: Optional[int] = None,
      guidance_scale: Optional[float] = None,
      negative_prompt: str = "",
      fps: int = 7,
      motion_bucket_id: int = 127,
      time_ids: Optional[Sequence[float]] = None,
      decode_chunk_size: Optional[int] = None,
      rng=None,
      noise=None,
      video=None,
      strength: float = 0.6,
      low_res_latents=None,
      given_latents=None,
      given_mask=None,
      regime: float = 0.0,
      context_scale: Optional[float] = None,
      output: str = "frames",
  ) -> np.ndarray:
    """Frames [B,F,H,W,3] in [0,1], one clip per prompt (or the latents, output='latents').

    num_frames: default the video UNet config's (8 for an image UNet). height, width: default
    sample_size × the VAE factor; multiples of the VAE × UNet downsampling factor. num_steps,
    guidance_scale: default the pipeline's default_num_steps, default_guidance_scale. rng: an int
    seed, a PRNG key or one key per prompt; noise [B,F,h,w,c] (standard normal) replaces its draw.
    video: clips [B,F,H,W,3] in [0,1] to start from (video-to-video, SDEdit, as diffusers'
    VideoToVideoSDPipeline): encoded (posterior mode), noised to where the last
    ⌊num_steps·strength⌋ steps begin, and denoised by those; they set num_frames, height, width.
    low_res_latents: [B,F,h,w,c], required by (and only by) a latent upsampler; they set
    num_frames, and height, width = factor × theirs in pixels.
    given_latents [B,F,h,w,c] (scaled, as output='latents' returns them), given_mask [F] or [B,F]
    (1: given), regime (interpolation: 0 for T → 4T, 1 for 4T → 16T), context_scale (default the
    pipeline's): required by (and only by) a frame-conditioned model; they set num_frames,
    height, width. The given frames come back as the model generates them, not copied: callers
    that want them exact put them back (`LongVideoPipeline` does).
    """
    if output not in OUTPUTS:
      raise ValueError(f"Unknown output {output!r}; accepted: {OUTPUTS}.")
    num_steps = self.default_num_steps if num_steps is None else num_steps
    guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
      raise ValueError("prompts must be a string or a non-empty list of strings.")
    if video is not None:
      video = self._check_video(video, len(prompts), num_frames, height, width)
      num_frames, height, width = video.shape[1:4]
    if self.low_res_factor or low_res_latents is not None:
      low_res_latents = self._check_low_res(
          low_res_latents, len(prompts), num_frames, height, width
      )
      num_frames = low_res_latents.shape[1]
      height, width = (self._low_res_pixels() * n for n in low_res_latents.shape[2:4])
    if self.frame_conditioning or given_latents is not None:
      given_latents, given_mask = self._check_given(
          given_latents, given_mask, len(prompts), num_frames, height, width
      )
      num_frames = given_latents.shape[1]
      height, width = (self._low_res_pixels(1) * n for n in given_latents.shape[2:4])
    if height is None or width is None:
      default_h, default_w = self.default_size()
      height, width = height or default_h, width or default_w
    common.check_size(height, width, self.vae, self.unet)
    batch = len(prompts)
    if num_frames is None:
      num_frames = self.unet.num_frames if self.unet.temporal else DEFAULT_IMAGE_UNET_FRAMES
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
      raise ValueError(f"num_frames must be a positive integer; got {num_frames!r}.")
    vae_factor, _ = common.size_multiple(self.vae, self.unet)
    latent_shape = (num_frames, height // vae_factor, width // vae_factor, self.vae.latent_channels)
    plan = self.sampler.plan(num_steps)  # validates num_steps and the options on the host
    if video is not None:
      plan = samplers.partial_plan(plan, strength)  # validates the sampler and strength
    keys = None if rng is None else common.example_keys(rng, batch)
    if keys is None and (noise is None or plan.stochastic):
      raise ValueError(
          "Pass rng (an int seed or PRNG key), or noise (and rng for the stochastic "
          f"sampler {self.sampler.sampler!r})."
      )
    noise = (
        common.draw_normal(keys, latent_shape, 0)
        if noise is None
        else common.check_array("noise", noise, (batch,) + latent_shape)
    )
    sampler_key = jax.random.key(0) if keys is None else common.sampler_key(keys)
    ids = self.tokenizer(prompts)
    uncond_ids = self.tokenizer([negative_prompt] * batch)
    ids_time = self._time_ids(batch, fps, motion_bucket_id, time_ids)

    use_guidance = guidance_scale > 1  # diffusers' do_classifier_free_guidance
    context_scale = self.default_context_scale if context_scale is None else context_scale
    use_context = bool(self.frame_conditioning) and context_scale != 1
    strength = None if video is None else float(strength)
    sample = self._compiled.get(
        ("sample", num_steps, use_guidance, strength, use_context),
        functools.partial(
            self._sample,
            num_steps=num_steps,
            use_guidance=use_guidance,
            strength=strength,
            use_context=use_context,
        ),
    )
    low_res = context_free = None
    if low_res_latents is not None:
      if keys is None:
        raise ValueError("A latent upsampler needs rng: its conditioning augmentation draws noise.")
      alpha_bar = self.sampler.schedule.alphas_cumprod[self.low_res_noise_level]
      low_res = common.low_res_condition(
          low_res_latents,
          common.draw_normal(keys, low_res_latents.shape[1:], 1),
          alpha_bar,
          self.low_res_factor,
      )
    if given_latents is not None:
      if keys is None:
        raise ValueError(
            "A frame-conditioned model needs rng: the given frames' augmentation draws noise."
        )
      low_res, context_free = self._frame_condition(given_latents, given_mask, regime, keys)
    ids, uncond_ids, ids_time, noise, video, low_res, context_free = devices.split_batch(
        ids, uncond_ids, ids_time, noise, video, low_res, context_free
    )
    latents = sample(
        self.params,
        ids,
        uncond_ids,
        ids_time,
        noise,
        jnp.float32(guidance_scale),
        sampler_key,
        video,
        low_res,
        context_free,
        jnp.float32(context_scale),
    )
    if output == "latents":
      return np.asarray(latents)
    return self.decode(latents, decode_chunk_size)

  def decode(self, latents, decode_chunk_size: Optional[int] = None) -> np.ndarray:
    """Frames [B,F,H,W,3] in [0,1] of scaled latents [B,F,h,w,c] (as output='latents' gives)."""
    decode = self._compiled.decoder(self.vae, decode_chunk_size)
    return np.asarray(decode(self.params["vae"], *devices.split_batch(jnp.asarray(latents))))

  def _network(self, unet_params):
    """network(x [B,F,h,w,c], t [B], cond) → prediction, for the video or the image UNet."""
    unet = self.unet

    def network(x, t, cond):
      if "low_res" in cond:  # an upsampler's / frame-conditioned model's conditioning, after the
        # input scaling
        x = jnp.concatenate([x, cond["low_res"].astype(x.dtype)], axis=-1)
      if unet.temporal:
        return unet.apply({"params": unet_params}, x, t, cond["context"], cond.get("time_ids"))
      b, f = x.shape[:2]
      out = unet.apply(
          {"params": unet_params},
          x.reshape((b * f,) + x.shape[2:]),
          jnp.repeat(t, f),
          jnp.repeat(cond["context"], f, axis=0),
      )
      return out.reshape((b, f) + out.shape[1:])

    return network

  def _check_video(self, video, batch, num_frames, height, width) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 5 or video.shape[0] != batch or video.shape[-1] != 3:
      raise ValueError(
          f"video must be clips [B={batch}, F, H, W, 3] in [0, 1], one per prompt; got "
          f"shape {video.shape}."
      )
    for name, given, actual in (
        ("num_frames", num_frames, video.shape[1]),
        ("height", height, video.shape[2]),
        ("width", width, video.shape[3]),
    ):
      if given is not None and given != actual:
        raise ValueError(f"{name}={given} disagrees with the video's {actual}; leave it unset.")
    return video.astype(np.float32)

  def _low_res_pixels(self, factor: Optional[int] = None) -> int:
    """Output pixels per low-resolution latent: the VAE factor × low_res_factor."""
    factor = self.low_res_factor if factor is None else factor
    return common.size_multiple(self.vae, self.unet)[0] * factor

  def _frame_condition(self, given_latents, given_mask, regime, keys):
    """(condition, the condition without given frames) of a frame-conditioned call."""
    schedule = self.sampler.schedule
    batch = given_latents.shape[0]
    noise = common.draw_normal(keys, given_latents.shape[1:], 2)
    levels = jnp.full((batch,), self.condition_noise_level, jnp.int32)
    given = frames_lib.augment(given_latents, levels, schedule.alphas_cumprod, noise)
    level = jnp.full((batch,), self.condition_noise_level / schedule.num_train_timesteps)
    regime = jnp.broadcast_to(jnp.asarray(regime, jnp.float32), (batch,))
    condition = frames_lib.build_condition(given, given_mask, level, regime)
    free = frames_lib.build_condition(
        jnp.zeros_like(given), jnp.zeros_like(given_mask), level, regime
    )
    return condition, free

  def _clip_latents(self, name, latents, expected, batch):
    """`latents` as float32 [B, F, h, w, C]; a ValueError naming `name` otherwise."""
    latents = jnp.asarray(latents, jnp.float32)
    if (
        latents.ndim != 5
        or latents.shape[0] != batch
        or latents.shape[-1] != self.vae.latent_channels
    ):
      raise ValueError(
          f"{name} must be {expected}, one clip per prompt; got shape {latents.shape}."
      )
    return latents

  @staticmethod
  def _check_sizes(name, latents, unit, num_frames, height, width, note=""):
    """num_frames / height / width, where given, must be what `latents` make (pixels = unit ×)."""
    for key, given, actual in (
        ("num_frames", num_frames, latents.shape[1]),
        ("height", height, latents.shape[2] * unit),
        ("width", width, latents.shape[3] * unit),
    ):
      if given is not None and given != actual:
        raise ValueError(
            f"{key}={given} disagrees with the {name}' {actual}{note}; leave it unset."
        )

  def _check_given(self, latents, mask, batch, num_frames, height, width):
    if not self.frame_conditioning:
      raise ValueError(
          "given_latents is for a frame-conditioned model (prediction or "
          "interpolation); this pipeline's UNet is a plain text-to-video one."
      )
    expected = f"[B={batch}, F, h, w, {self.vae.latent_channels}]"
    if latents is None or mask is None:
      raise ValueError(
          f"This pipeline is a {self.frame_conditioning} model: pass given_latents "
          f"{expected} (e.g. another pipeline's output='latents') and given_mask "
          "[F] or [B, F] (1 = given)."
      )
    latents = self._clip_latents("given_latents", latents, expected, batch)
    mask = jnp.asarray(mask, jnp.float32)
    if mask.ndim == 1:
      mask = jnp.broadcast_to(mask[None], (batch, mask.shape[0]))
    if mask.shape != latents.shape[:2]:
      raise ValueError(
          f"given_mask must be [F={latents.shape[1]}] or [B={batch}, "
          f"F={latents.shape[1]}]; got shape {mask.shape}."
      )
    self._check_sizes("given_latents", latents, self._low_res_pixels(1), num_frames, height, width)
    return latents, mask

  def _check_low_res(self, latents, batch, num_frames, height, width):
    if not self.low_res_factor:
      raise ValueError(
          "low_res_latents is for a latent upsampler (low_res_factor set); this "
          "pipeline's UNet is a plain text-to-video one."
      )
    expected = f"[B={batch}, F, h, w, {self.vae.latent_channels}]"
    if latents is None:
      raise ValueError(
          f"This pipeline is a latent upsampler (×{self.low_res_factor}): pass "
          f"low_res_latents {expected}, e.g. a base pipeline's output='latents'."
      )
    latents = self._clip_latents("low_res_latents", latents, expected, batch)
    self._check_sizes(
        "low_res_latents",
        latents,
        self._low_res_pixels(),
        num_frames,
        height,
        width,
        f" (×{self.low_res_factor})",
    )
    return latents

  def _sample(
      self,
      params,
      ids,
      uncond_ids,
      time_ids,
      noise,
      guidance_scale,
      sampler_key,
      video,
      low_res,
      context_free,
      context_scale,
      *,
      num_steps,
      use_guidance,
      strength,
      use_context,
  ):
    """Text encoder (+ the video's encoding) + the sampling loop (one jitted function); →
    latents."""
    encode = lambda tokens: self.text_encoder.apply({"params": params["text_encoder"]}, tokens)[0]
    extra = {} if time_ids is None else {"time_ids": time_ids}
    if low_res is not None:  # both guidance branches see it (as diffusers' upscaler pipelines)
      extra["low_res"] = low_res
    cond = dict(context=encode(ids), **extra)
    network = self._network(params["unet"])
    if use_context:  # the context-free branch keeps the prompt, drops the given frames
      uncond = dict(context=encode(uncond_ids), **extra) if use_guidance else None
      guided = guidance_lib.context_guidance(
          network,
          cond,
          uncond,
          dict(cond, low_res=context_free),
          guidance_scale if use_guidance else 1,
          context_scale,
      )
    elif use_guidance:
      uncond = dict(context=encode(uncond_ids), **extra)
      guided = guidance_lib.classifier_free_guidance(network, cond, uncond, guidance_scale)
    else:
      guided = lambda x, t: network(x, t, cond)
    init = None if video is None else common.encode_frames(self.vae, params["vae"], video)
    return common.sample_latents(
        self.sampler, guided, noise, num_steps, sampler_key, init_latents=init, strength=strength
    )
