"""Masked-frame conditioning: Video LDM's prediction and temporal-interpolation models.

Some frames of a clip are given (context frames for prediction, key frames for interpolation);
the model generates the others. One mechanism serves both (Video LDM §3.2, §3.3; the input
layout of SVD's interpolation fine-tune and SEINE): per frame, the UNet input is the noisy latent
concatenated channel-wise with

  [ m · z̃ (C channels) | m (1) | augmentation level (1) | regime (1) ]

where m ∈ {0, 1} marks the given frames, z̃ are their latents noise-augmented to the level
(a training timestep / num_train_timesteps, in [0, 1)), and the regime label says which frame-rate
step an interpolation model runs (0: T → 4T, 1: 4T → 16T; always 0 for prediction). The new input
channels of the UNet's first conv start at zero (`vldm.recipes.ldm.widen_input_transform`), so a
conditioned model starts as the video model it comes from. The loss counts the generated frames
only (`generated_frames_loss`); a mask of zeros is the unconditional branch (S = 0), which context
guidance (`vldm.diffusion.guidance.context_guidance`) contrasts with the conditional one.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# A config's `ldm.frame_conditioning` (prediction and interpolation stages, vldm.recipes.ldm); these
# defaults apply where it leaves a key out, and `mode` None is a plain text-to-video stage.
DEFAULTS = dict(
    mode=None,
    context_choices=(0, 1, 2),  # prediction: how many first frames are given (0: unconditional)
    context_probs=(0.2, 0.4, 0.4),
    stride=4,  # interpolation: key frames every `stride` frames (T → stride·T)
    uncond_prob=0.1,  # interpolation: key frames dropped, for guidance
    max_noise_level=250,  # given latents noise-augmented to a timestep drawn in [0, this]
    sample_noise_level=50,  # … and to this one when sampling
    regime_fps=None,  # interpolation: clips at ≥ this fps are the 4T → 16T regime (label 1)
    context_frames=2,  # rollout: generated frames re-used as the next chunk's context
    context_scale=1.0,  # sampling: context guidance (1: off)
    first_chunk="video",  # the long video's first chunk: the video stage, or 'prediction' (S = 0)
)

MODES = ("prediction", "interpolation")
EXTRA_CHANNELS = 3  # mask, augmentation level, regime


def condition_channels(latent_channels: int) -> int:
  """Channels of the condition concatenated to the noisy latents."""
  return latent_channels + EXTRA_CHANNELS


def conditioned_in_channels(latent_channels: int) -> int:
  """A conditioned UNet's input channels: noisy latents + the condition."""
  return latent_channels + condition_channels(latent_channels)


def check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"Unknown frame-conditioning mode {mode!r}; accepted: {MODES}.")


def prediction_mask(num_frames: int, num_context: int) -> np.ndarray:
  """[F] float32: 1 for the first `num_context` frames (given), 0 for the frames to predict."""
  if not 0 <= num_context < num_frames:
    raise ValueError(
        f"num_context must be in [0, {num_frames}) for {num_frames} frames; got " f"{num_context}."
    )
  return (np.arange(num_frames) < num_context).astype(np.float32)


def interpolation_mask(num_frames: int, stride: int = 4) -> np.ndarray:
  """[F] float32: 1 at the key frames 0, stride, 2·stride, …; F must be k·stride + 1 (both ends
  of every gap given)."""
  check_interpolation_frames(num_frames, stride)
  return (np.arange(num_frames) % stride == 0).astype(np.float32)


def check_interpolation_frames(num_frames: int, stride: int) -> None:
  if stride < 2 or num_frames < stride + 1 or (num_frames - 1) % stride:
    raise ValueError(
        f"An interpolation window has k·stride + 1 frames (key frames at both ends "
        f"of each gap), k ≥ 1, stride ≥ 2; got {num_frames} frames, stride {stride} "
        f"(e.g. {2 * max(stride, 2) + 1})."
    )


def sample_masks(
    rng,
    mode: str,
    batch: int,
    num_frames: int,
    *,
    context_choices: Sequence[int] = (0, 1, 2),
    context_probs: Sequence[float] = (0.2, 0.4, 0.4),
    stride: int = 4,
    uncond_prob: float = 0.1,
    unconditional_allowed=None,
):
  """[B, F] training masks, one per example. prediction: the first S frames given, S drawn from
  `context_choices` with `context_probs` (S = 0: the unconditional branch; where
  `unconditional_allowed` [B] is False, S = 0's probability goes to the other choices, so that
  the branch that makes a long video's first chunk learns from clips that start videos only);
  interpolation: the key frames every `stride`, dropped (all zeros) with `uncond_prob`."""
  check_mode(mode)
  if mode == "prediction":
    if len(context_choices) != len(context_probs) or not context_choices:
      raise ValueError(
          f"context_choices {tuple(context_choices)} and context_probs "
          f"{tuple(context_probs)} must be non-empty and of the same length."
      )
    masks = np.stack([prediction_mask(num_frames, s) for s in context_choices])
    probs = jnp.broadcast_to(jnp.asarray(context_probs, jnp.float32), (batch, len(masks)))
    if unconditional_allowed is not None:
      unconditional = jnp.asarray([s == 0 for s in context_choices])
      allowed = jnp.asarray(unconditional_allowed, bool).reshape(batch, 1)
      restricted = jnp.where(unconditional[None] & ~allowed, 0.0, probs)
      probs = jnp.where(restricted.sum(-1, keepdims=True) > 0, restricted, probs)  # S = 0 only
    choice = jax.random.categorical(rng, jnp.log(probs / probs.sum(-1, keepdims=True)))
    return jnp.asarray(masks)[choice]
  keep = jax.random.uniform(rng, (batch,)) >= uncond_prob
  return jnp.asarray(interpolation_mask(num_frames, stride))[None] * keep[:, None]


def augment(latents, levels, alphas_cumprod, noise):
  """Given latents [B, F, h, w, C] noised to the training timesteps `levels` [B] (integers; 0 is
  a light touch, not none: ᾱ_0 < 1): √ᾱ z + √(1 − ᾱ) ε."""
  alpha_bar = jnp.asarray(alphas_cumprod, jnp.float32)[levels]
  alpha_bar = alpha_bar.reshape((-1,) + (1,) * (latents.ndim - 1))
  return jnp.sqrt(alpha_bar) * latents + jnp.sqrt(1 - alpha_bar) * noise


def build_condition(given, mask, level, regime):
  """The condition [B, F, h, w, C + 3] (see the module docstring) of the given latents
  [B, F, h, w, C] (already augmented), the mask [B, F], the augmentation level [B] in [0, 1) and
  the regime [B]."""
  b, f, h, w, _ = given.shape
  dtype = given.dtype

  def plane(values, shape):  # per-example or per-frame scalars → one channel
    values = jnp.asarray(values, dtype).reshape(shape + (1,) * (5 - len(shape)))
    return jnp.broadcast_to(values, (b, f, h, w, 1))

  mask = jnp.asarray(mask, dtype)
  return jnp.concatenate(
      [
          given * mask[:, :, None, None, None],
          plane(mask, (b, f)),
          plane(level, (b,)),
          plane(regime, (b,)),
      ],
      axis=-1,
  )


def generated_frames_loss(per_frame_loss, mask):
  """[B]: the mean of a per-frame loss [B, F] over the frames each example generates (mask 0)."""
  weight = 1 - jnp.asarray(mask, per_frame_loss.dtype)
  return (per_frame_loss * weight).sum(axis=1) / jnp.maximum(weight.sum(axis=1), 1)


def rollout_length(num_frames: int, context: int, chunks: int) -> int:
  """Frames after a first chunk of F and `chunks` prediction chunks, each re-using the last
  `context` frames: F + n·(F − context)."""
  return num_frames + chunks * (num_frames - context)


def chunks_for(total: int, num_frames: int, context: int) -> int:
  """The fewest prediction chunks for at least `total` frames."""
  if total <= num_frames:
    return 0
  step = num_frames - context
  return -(-(total - num_frames) // step)


def interpolated_length(num_keys: int, factor: int) -> int:
  """Frames of `num_keys` key frames interpolated ×factor: (K − 1)·factor + 1."""
  return (num_keys - 1) * factor + 1


def interpolation_windows(num_keys: int, keys_per_window: int) -> list[int]:
  """Start indices (in key frames) of windows of `keys_per_window` key frames that cover
  `num_keys`, overlapping by one key frame (the last window moved back to end at the last key)."""
  if num_keys < 2:
    raise ValueError(f"Interpolation needs at least 2 key frames; got {num_keys}.")
  span = keys_per_window - 1
  if num_keys <= keys_per_window:
    return [0]
  starts = list(range(0, num_keys - keys_per_window + 1, span))
  if starts[-1] + span < num_keys - 1:
    starts.append(num_keys - keys_per_window)
  return starts
