"""Video LDM's cascade: a text-to-video model at low resolution, then a latent upsampler.

  pipe = CascadePipeline(base=TextToVideoPipeline(...),                       # 32 px, say
                         upsampler=TextToVideoPipeline(..., low_res_factor=2))  # → 64 px
  frames = pipe(["a red circle moving left"], rng=0)   # [B,F,H,W,3] in [0,1] at 64 px

The base samples latents (never decoded); the upsampler, a UNet with the latent channels twice
(noisy latents + the base's, noise-augmented and upsampled), samples the clip at `low_res_factor`
× the resolution from its own noise, so it keeps what the base decided (shape, motion) and adds
the detail. The call's sampling settings (num_steps, guidance_scale, negative_prompt) are the
base's, the text-to-video part a user tunes (by default the base pipeline's default_num_steps and
default_guidance_scale); the upsampler runs with `upsampler_num_steps` and
`upsampler_guidance_scale`, fixed by its training (the low-resolution clip conditions it more
strongly than the prompt does).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from vldm.pipelines import common
from vldm.pipelines.text_to_video import TextToVideoPipeline

_UPSAMPLER_SALT = 1  # the upsampler's per-example keys: independent of the base's draws


@dataclasses.dataclass
class CascadePipeline:
  """A base text-to-video pipeline and a latent upsampler (see the module docstring)."""
  base: TextToVideoPipeline
  upsampler: TextToVideoPipeline
  upsampler_num_steps: int = 12
  upsampler_guidance_scale: float = 1.0

  def __post_init__(self):
    factor = self.upsampler.low_res_factor
    if not factor:
      raise common.PipelineError("upsampler must be a latent upsampler (a TextToVideoPipeline "
                                 "with low_res_factor set).")
    if self.base.low_res_factor:
      raise common.PipelineError("base must be a text-to-video pipeline, not an upsampler.")
    if self.base.vae.latent_channels != self.upsampler.vae.latent_channels:
      raise common.PipelineError(
          f"The base samples {self.base.vae.latent_channels} latent channels, the upsampler is "
          f"conditioned on {self.upsampler.vae.latent_channels}.")

  def with_sampler(self, sampler: str, **options) -> "CascadePipeline":
    """The base with another sampler (the upsampler keeps the one it was trained to run)."""
    return dataclasses.replace(self, base=self.base.with_sampler(sampler, **options))

  @property
  def trace_count(self) -> int:
    return self.base.trace_count + self.upsampler.trace_count

  def default_size(self) -> tuple[int, int]:
    return self.upsampler.default_size()

  @property
  def default_num_steps(self) -> int:
    """The base's: a call's num_steps drives the base."""
    return self.base.default_num_steps

  @property
  def default_guidance_scale(self) -> float:
    return self.base.default_guidance_scale

  def __call__(self, prompts, *, num_frames: Optional[int] = None, height: Optional[int] = None,
               width: Optional[int] = None, num_steps: Optional[int] = None,
               guidance_scale: Optional[float] = None, negative_prompt: str = "", rng=None,
               decode_chunk_size: Optional[int] = None, output: str = "frames",
               **kwargs) -> np.ndarray:
    """Frames [B,F,H,W,3] in [0,1] at (height, width) (default: the upsampler's size), or the
    upsampler's latents (output='latents'). num_steps, guidance_scale: the base's (default its
    defaults). kwargs (fps, motion_bucket_id, time_ids) go to both models; H and W must be
    multiples of low_res_factor × the base's size multiple."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    factor = self.upsampler.low_res_factor
    if height is None or width is None:
      default_h, default_w = self.default_size()
      height, width = height or default_h, width or default_w
    common.check_size(height, width, self.base.vae, self.base.unet, low_res_factor=factor)
    keys = common.example_keys(rng, len(prompts))
    low_res = self.base(prompts, num_frames=num_frames, height=height // factor,
                        width=width // factor, num_steps=num_steps,
                        guidance_scale=guidance_scale, negative_prompt=negative_prompt, rng=keys,
                        output="latents", **kwargs)
    upsampler_keys = jax.vmap(lambda k: jax.random.fold_in(k, _UPSAMPLER_SALT))(keys)
    return self.upsampler(prompts, low_res_latents=low_res, num_steps=self.upsampler_num_steps,
                          guidance_scale=self.upsampler_guidance_scale,
                          negative_prompt=negative_prompt, rng=upsampler_keys,
                          decode_chunk_size=decode_chunk_size, output=output, **kwargs)
