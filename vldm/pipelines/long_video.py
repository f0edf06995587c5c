"""Long videos as Video LDM makes them: key frames, prediction rollout, interpolation, upsampling.

  pipe = LongVideoPipeline(first=video_pipe,             # text-to-video (or a CascadePipeline)
                           prediction=prediction_pipe,   # frame_conditioning='prediction'
                           interpolation=interp_pipe)    # frame_conditioning='interpolation'
  frames = pipe(["a red circle moving left"], num_frames=32, interpolate=4, rng=0)

1. A first chunk of F key frames: the text-to-video model (`first`), or, with
   `first_chunk='prediction'` (or no `first`), the prediction model's unconditional branch (no
   frame given: a model trained at another frame rate than the video model starts its own clips).
2. Rollout: each further chunk is the prediction model's F frames given the last
   `context_frames` (2: position and velocity) of what was generated, in latent space (never
   decoded and re-encoded between chunks); it adds F − 2 frames, so n chunks make F + n·(F − 2).
3. Interpolation ×4 (twice for ×16: the regime label 0, then 1): windows of k + 1 key frames,
   overlapping by one, each filled by the interpolation model (F_i = k·4 + 1 frames); the key
   frames stay exactly as they were, at positions 0, 4, 8, …
4. With a CascadePipeline as `first`: its latent upsampler over windows of its clip length.
5. The VAE decodes the whole clip, `decode_chunk_size` frames at a time.
Every model samples with its own defaults (steps, guidance, context guidance) unless the call
says otherwise; `num_steps`, `guidance_scale` and `context_scale` apply to the key-frame models.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import jax
import numpy as np

from vldm.diffusion import frame_conditioning as frames_lib
from vldm.pipelines import common
from vldm.pipelines.cascade import CascadePipeline
from vldm.pipelines.text_to_video import TextToVideoPipeline

FACTORS = (1, 4, 16)
_SALT = 1000  # per-chunk keys: fold_in(example key, _SALT + chunk), apart from the first chunk's


def _keys(keys, salt: int):
  return jax.vmap(lambda k: jax.random.fold_in(k, salt))(keys)


@dataclasses.dataclass
class LongVideoPipeline:
  """Key frames → rollout → interpolation → upsampling → decoding (see the module docstring)."""

  first: Optional[Union[TextToVideoPipeline, CascadePipeline]]
  prediction: Optional[TextToVideoPipeline] = None
  interpolation: Optional[TextToVideoPipeline] = None
  context_frames: int = 2
  first_chunk: str = "video"  # or 'prediction': its unconditional branch
  num_frames_per_chunk: Optional[int] = None  # default: the prediction model's clip length

  def __post_init__(self):
    for name, pipe, mode in (
        ("prediction", self.prediction, "prediction"),
        ("interpolation", self.interpolation, "interpolation"),
    ):
      if pipe is not None and pipe.frame_conditioning != mode:
        raise common.PipelineError(
            f"{name} must be a TextToVideoPipeline with "
            f"frame_conditioning={mode!r}; got "
            f"{pipe.frame_conditioning!r}."
        )
    if self.first_chunk not in ("video", "prediction"):
      raise common.PipelineError(
          f"first_chunk must be 'video' or 'prediction'; got " f"{self.first_chunk!r}."
      )
    if self.first_chunk == "prediction" and self.prediction is None:
      raise common.PipelineError("first_chunk='prediction' needs a prediction model.")
    if self.first is None and self.prediction is None:
      raise common.PipelineError(
          "A long video needs a first chunk: pass `first` (a text-to-video "
          "pipeline) or a prediction model (its unconditional branch)."
      )
    if self.first is not None and self.first_pipe.frame_conditioning:
      raise common.PipelineError("first must be a plain text-to-video pipeline (or a cascade).")
    channels = {p.vae.latent_channels for p in self.keyframe_pipes}
    if len(channels) > 1:
      raise common.PipelineError(
          f"The pipelines' VAEs have different latent channels "
          f"{sorted(channels)}; they must share the latent space."
      )

  def with_sampler(self, sampler: str, **options) -> "LongVideoPipeline":
    """The key-frame models (text-to-video, prediction) with another sampler; interpolation and
    upsampling keep theirs."""
    swap = lambda pipe: None if pipe is None else pipe.with_sampler(sampler, **options)
    return dataclasses.replace(self, first=swap(self.first), prediction=swap(self.prediction))

  @property
  def first_pipe(self) -> Optional[TextToVideoPipeline]:
    """The key-frame text-to-video pipeline (a cascade's base)."""
    return self.first.base if isinstance(self.first, CascadePipeline) else self.first

  @property
  def keyframe_pipes(self) -> list:
    return [p for p in (self.first_pipe, self.prediction, self.interpolation) if p is not None]

  @property
  def chunk_frames(self) -> int:
    if self.num_frames_per_chunk:
      return self.num_frames_per_chunk
    pipe = self.prediction or self.first_pipe
    return pipe.unet.num_frames

  @property
  def max_frames(self) -> int:
    """Key frames without a prediction model: one chunk."""
    return self.chunk_frames if self.prediction is None else np.iinfo(np.int32).max

  def check(self, num_frames: int, interpolate: int) -> None:
    """A clear error when the pipelines at hand cannot make what is asked."""
    if interpolate not in FACTORS:
      raise ValueError(f"interpolate must be one of {FACTORS}; got {interpolate}.")
    if interpolate > 1 and self.interpolation is None:
      raise ValueError(
          f"interpolate={interpolate} needs an interpolation stage (a model trained "
          "with ldm.frame_conditioning.mode='interpolation'); there is none."
      )
    if num_frames < 1:
      raise ValueError(f"num_frames must be ≥ 1; got {num_frames}.")
    if num_frames > self.chunk_frames and self.prediction is None:
      raise ValueError(
          f"num_frames={num_frames} is more than the {self.chunk_frames} frames the "
          "text-to-video model makes: longer clips need a prediction stage (a model "
          "trained with ldm.frame_conditioning.mode='prediction'); there is none."
      )
    if interpolate > 1 and num_frames < 2:
      raise ValueError("Interpolation needs at least 2 key frames.")
    if self.prediction is not None and not 0 < self.context_frames < self.chunk_frames:
      raise ValueError(
          f"context_frames must be in [1, {self.chunk_frames}); got " f"{self.context_frames}."
      )

  def output_frames(self, num_frames: int, interpolate: int = 1) -> int:
    """Frames of a call: (N − 1)·interpolate + 1 (N key frames)."""
    return frames_lib.interpolated_length(num_frames, interpolate)

  # ---- stages --------------------------------------------------------------------------------
  def keyframes(self, prompts, num_frames: int, keys, height=None, width=None, **kwargs):
    """Key-frame latents [B, N, h, w, c]: the first chunk, then the prediction rollout."""
    f, c = self.chunk_frames, self.context_frames
    if self.first is not None and self.first_chunk == "video":
      latents = self.first_pipe(
          prompts,
          num_frames=min(f, max(num_frames, 1)) if self.prediction is None else f,
          height=height,
          width=width,
          rng=keys,
          output="latents",
          **_without(kwargs, "context_scale"),
      )
    else:  # the prediction model's unconditional branch: nothing given
      shape = self._latent_shape(len(prompts), f, height, width)
      latents = self.prediction(
          prompts,
          given_latents=np.zeros(shape, np.float32),
          given_mask=np.zeros((f,), np.float32),
          rng=keys,
          output="latents",
          **_without(kwargs, "context_scale"),
      )
    latents = np.asarray(latents)
    for chunk in range(frames_lib.chunks_for(num_frames, latents.shape[1], c)):
      given = np.zeros((latents.shape[0], f) + latents.shape[2:], np.float32)
      given[:, :c] = latents[:, -c:]
      window = self.prediction(
          prompts,
          given_latents=given,
          given_mask=frames_lib.prediction_mask(f, c),
          rng=_keys(keys, _SALT + chunk),
          output="latents",
          **kwargs,
      )
      latents = np.concatenate([latents, np.asarray(window)[:, c:]], axis=1)
    return latents[:, :num_frames]

  def _latent_shape(self, batch, frames, height, width):
    pipe = self.prediction
    h, w = (height, width) if height and width else pipe.default_size()
    factor, _ = common.size_multiple(pipe.vae, pipe.unet)
    return (batch, frames, h // factor, w // factor, pipe.vae.latent_channels)

  def interpolate(self, prompts, keyframes, keys, regime: int = 0, **kwargs):
    """[B, (N − 1)·stride + 1, h, w, c]: the key-frame latents [B, N, …] at positions 0, stride,
    … exactly, the frames between them from the interpolation model, window by window (all
    windows of all clips in one batch)."""
    pipe = self.interpolation
    stride = pipe.frame_stride
    b, n = keyframes.shape[:2]
    keys_per_window = (pipe.unet.num_frames - 1) // stride + 1
    keys_per_window = min(keys_per_window, n)
    starts = frames_lib.interpolation_windows(n, keys_per_window)
    window_frames = frames_lib.interpolated_length(keys_per_window, stride)
    mask = frames_lib.interpolation_mask(window_frames, stride)
    given = np.zeros((len(starts), b, window_frames) + keyframes.shape[2:], np.float32)
    for i, s in enumerate(starts):
      given[i][:, ::stride] = keyframes[:, s : s + keys_per_window]
    out = pipe(
        [p for _ in starts for p in prompts],
        given_latents=given.reshape((-1,) + given.shape[2:]),
        given_mask=mask,
        regime=float(regime),
        rng=_window_keys(keys, _SALT * (2 + regime), len(starts)),
        output="latents",
        **_without(kwargs, "context_scale"),
    )
    out = np.asarray(out).reshape(given.shape)
    result = np.zeros(
        (b, frames_lib.interpolated_length(n, stride)) + keyframes.shape[2:], np.float32
    )
    for i, s in enumerate(starts):
      result[:, s * stride : s * stride + window_frames] = out[i]
    result[:, ::stride] = keyframes  # the key frames exactly
    return result

  def upsample(self, prompts, latents, keys, negative_prompt: str = ""):
    """The cascade's latent upsampler over windows of its clip length (the last window moved back
    to end at the last frame)."""
    cascade = self.first
    up = cascade.upsampler
    b, n = latents.shape[:2]
    f = min(up.unet.num_frames, n)
    starts = list(range(0, n - f + 1, f))
    if starts[-1] + f < n:
      starts.append(n - f)
    windows = np.concatenate([latents[:, s : s + f] for s in starts])
    window_keys = _window_keys(keys, _SALT * 5, len(starts))
    out = np.asarray(
        up(
            [p for _ in starts for p in prompts],
            low_res_latents=windows,
            num_steps=cascade.upsampler_num_steps,
            guidance_scale=cascade.upsampler_guidance_scale,
            negative_prompt=negative_prompt,
            rng=window_keys,
            output="latents",
        )
    )
    out = out.reshape((len(starts), b) + out.shape[1:])
    result = np.zeros((b, n) + out.shape[3:], np.float32)
    for i, s in enumerate(starts):
      result[:, s : s + f] = out[i]
    return result

  # ---- the call ------------------------------------------------------------------------------
  def __call__(
      self,
      prompts,
      *,
      num_frames: Optional[int] = None,
      interpolate: int = 1,
      height: Optional[int] = None,
      width: Optional[int] = None,
      num_steps: Optional[int] = None,
      guidance_scale: Optional[float] = None,
      context_scale: Optional[float] = None,
      negative_prompt: str = "",
      rng=None,
      decode_chunk_size: Optional[int] = None,
      output: str = "frames",
  ):
    """Frames [B, (N − 1)·interpolate + 1, H, W, 3] in [0, 1] for N = num_frames key frames
    (default: one chunk), or their latents (output='latents'). height, width: the key frames'
    (a cascade's: the upsampled size is factor × theirs)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    num_frames = num_frames or self.chunk_frames
    self.check(num_frames, interpolate)
    keys = common.example_keys(rng, len(prompts))
    kwargs = dict(
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        negative_prompt=negative_prompt,
        context_scale=context_scale,
    )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    latents = self.keyframes(prompts, num_frames, keys, height, width, **kwargs)
    for regime in range({1: 0, 4: 1, 16: 2}[interpolate]):
      latents = self.interpolate(prompts, latents, keys, regime, **kwargs)
    final = self.first_pipe or self.prediction
    if isinstance(self.first, CascadePipeline):
      latents = self.upsample(prompts, latents, keys, negative_prompt)
      final = self.first.upsampler
    if output == "latents":
      return latents
    return final.decode(latents, decode_chunk_size)


def _without(kwargs: dict, *names) -> dict:
  return {k: v for k, v in kwargs.items() if k not in names}


def _window_keys(keys, salt: int, windows: int):
  """[W·B] keys, window-major (the order of the batched prompts), each window's its own."""
  return jax.numpy.concatenate([_keys(keys, salt + i) for i in range(windows)])
