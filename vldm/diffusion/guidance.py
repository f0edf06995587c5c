"""Classifier-free guidance as wrappers around a network `network_fn(x, t, cond) -> prediction`.

`cond` is any pytree whose leaves carry the batch on axis 0 (text embeddings, image latents, added
time ids, …). A wrapper concatenates x, t and the branches' conditionings along the batch, calls the
network once, splits the output and combines the branches; what it returns is a plain network
fn(x, t) for `parameterization.Denoiser`. Guidance acts on the raw network output, as diffusers'
pipelines do (for an affine parameterization that equals guiding the x0 estimate).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vldm.diffusion.schedules import append_dims

NetworkFn = Callable[..., jax.Array]


def batched_branches(network_fn: NetworkFn, conds: Sequence[Any]):
  """fn(x, t) → [output per branch], from one network call on the batch-concatenated branches."""
  k = len(conds)

  def fn(x, t):
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    cond = jax.tree.map(lambda *leaves: jnp.concatenate(leaves, axis=0), *conds)
    out = network_fn(jnp.concatenate([x] * k, axis=0), jnp.concatenate([t] * k, axis=0), cond)
    return jnp.split(out, k, axis=0)

  return fn


def _is_one(scale) -> bool:
  return isinstance(scale, numbers.Number) and scale == 1


def _as_scale(scale, ndim: int):
  """A scalar, or [B] / [B, F] scales broadcast over the output's trailing axes."""
  return append_dims(jnp.asarray(scale, jnp.float32), ndim)


def classifier_free_guidance(network_fn: NetworkFn, cond, uncond, guidance_scale) -> NetworkFn:
  """out = u + s (c − u), the unconditional branch first in the batch (diffusers' order).

  `guidance_scale` is a scalar, or per example [B], or per frame [B, F] (SVD; see
  `frame_guidance_scale`). A Python scale of exactly 1 skips the unconditional branch.
  """
  if _is_one(guidance_scale):
    return lambda x, t: network_fn(x, jnp.broadcast_to(jnp.asarray(t), (x.shape[0],)), cond)
  branches = batched_branches(network_fn, [uncond, cond])

  def guided(x, t):
    out_uncond, out_cond = branches(x, t)
    scale = _as_scale(guidance_scale, out_cond.ndim)
    return out_uncond + scale * (out_cond - out_uncond)

  return guided


def dual_guidance(
    network_fn: NetworkFn, cond, image_cond, uncond, guidance_scale, image_guidance_scale
) -> NetworkFn:
  """Text and image guidance, separately scaled (InstructPix2Pix, Brooks et al. eq. 3):

    out = u + s_T (c − i) + s_I (i − u)

  with branches c = text + image conditioning, i = image only, u = neither, batched in that order
  as diffusers' StableDiffusionInstructPix2PixPipeline does.
  """
  branches = batched_branches(network_fn, [cond, image_cond, uncond])

  def guided(x, t):
    out_text, out_image, out_uncond = branches(x, t)
    scale = _as_scale(guidance_scale, out_text.ndim)
    image_scale = _as_scale(image_guidance_scale, out_text.ndim)
    return out_uncond + scale * (out_text - out_image) + image_scale * (out_image - out_uncond)

  return guided


def frame_guidance_scale(
    min_guidance_scale: float, max_guidance_scale: float, num_frames: int, batch_size: int = 1
):
  """SVD's per-frame scale: linspace(min, max, F) for every example, [B, F] float32."""
  if num_frames < 1 or batch_size < 1:
    raise ValueError(f"num_frames and batch_size must be ≥ 1; got {num_frames}, {batch_size}.")
  scale = np.linspace(min_guidance_scale, max_guidance_scale, num_frames).astype(np.float32)
  return jnp.asarray(np.tile(scale[None], (batch_size, 1)))


def context_guidance(
    network_fn: NetworkFn, cond, text_uncond, context_uncond, guidance_scale, context_scale
) -> NetworkFn:
  """Text guidance and Video LDM's context guidance, separately scaled:

    out = c + (s_T − 1)(c − u_T) + (s_C − 1)(c − u_C)

  c: prompt + given frames; u_T: the negative prompt + given frames; u_C: the prompt without
  them (S = 0). With s_C = 1 it is classifier-free guidance on the conditional model, with
  s_T = 1 Video LDM's f(z) + s_C (f(z; c_S) − f(z)); a Python scale of exactly 1 skips its branch.
  """
  scales = [(guidance_scale, text_uncond), (context_scale, context_uncond)]
  used = [(scale, uncond) for scale, uncond in scales if not _is_one(scale)]
  branches = batched_branches(network_fn, [cond] + [uncond for _, uncond in used])

  def guided(x, t):
    out, *unconds = branches(x, t)
    result = out
    for (scale, _), out_uncond in zip(used, unconds):
      result = result + (_as_scale(scale, out.ndim) - 1) * (out - out_uncond)
    return result

  return guided
