"""The denoising training loss, per example, with its noise-level sampling and weightings.

  loss_b = w_b · mean over the example's elements of (F(x_in, t_in) − target)²

where F is the raw network, target is what the parameterization predicts, and w_b a weighting
expressed on that prediction (so 'uniform' is the plain MSE of diffusers' training scripts):

  'uniform'   1
  'min_snr'   min(SNR, γ) on x0, i.e. min(1, γ/SNR) for ε, min(SNR, γ)/(SNR+1) for v, min(SNR, γ)
              for x0 (Hang et al. 2023; diffusers' train scripts)
  'edm'       λ(σ) = (σ² + σd²)/(σ σd)² on x0, i.e. λ(σ) c_out(σ)² on the network output (= 1 for
              the 'edm' parameterization)

Noise levels: 'uniform' draws the discrete t ~ U{0, …, T−1}; 'lognormal' draws ln σ ~ N(P_mean,
P_std²) (EDM / SVD). Discrete parameterizations (ε, v, x0) see x_t = √ᾱ x0 + √(1−ᾱ) n at time t;
'edm' / 'v_edm' see c_in (x0 + σ n) at c_noise = ¼ ln σ.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from vldm.diffusion import schedules
from vldm.diffusion.parameterization import as_parameterization, velocity

WEIGHTINGS = ("uniform", "min_snr", "edm")
NOISE_SAMPLINGS = ("uniform", "lognormal")


def _choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"Unknown {name} {value!r}; accepted: {tuple(choices)}.")


def sample_timesteps(rng, batch_size: int, num_train_timesteps: int):
  """t ~ U{0, …, T−1}, [B] int32."""
  return jax.random.randint(rng, (batch_size,), 0, num_train_timesteps)


def sample_lognormal_sigmas(rng, batch_size: int, p_mean: float = -1.2, p_std: float = 1.2):
  """σ = exp(P_mean + P_std·n), [B] float32 (EDM's training distribution)."""
  return jnp.exp(p_mean + p_std * jax.random.normal(rng, (batch_size,), jnp.float32))


def edm_weight(sigma, sigma_data: float = 0.5):
  """EDM's λ(σ) = (σ² + σd²)/(σ σd)², the weight on ‖D(x, σ) − x0‖²."""
  return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def min_snr_weight(snr, gamma: float, prediction_type: str):
  """Min-SNR-γ weight on the network output's squared error, for the given prediction type."""
  snr = jnp.asarray(snr, jnp.float32)
  clipped = jnp.minimum(snr, gamma)
  if prediction_type == "epsilon":
    return jnp.minimum(1.0, gamma / snr)  # = min(SNR, γ)/SNR, and 1 at SNR = 0
  if prediction_type in ("v_prediction", "v_edm"):
    return clipped / (snr + 1)
  if prediction_type == "sample":
    return clipped
  raise ValueError(f"min_snr weighting for prediction_type {prediction_type!r} is not defined; "
                   "accepted: ('epsilon', 'v_prediction', 'v_edm', 'sample').")


def offset_noise_like(rng, x, offset: float):
  """offset · n with one draw per (example, channel), broadcast over frames and space."""
  shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
  return offset * jax.random.normal(rng, shape, jnp.float32)


def diffusion_loss(model_fn: Callable, x0, rng, *, parameterization="epsilon",
                   schedule: Optional[schedules.DiscreteSchedule] = None,
                   noise_sampling: Optional[str] = None, weighting: str = "uniform",
                   min_snr_gamma: float = 5.0, p_mean: float = -1.2, p_std: float = 1.2,
                   sigma_data: Optional[float] = None, offset_noise: float = 0.0,
                   per_frame: bool = False, sigma=None, noise=None):
  """Per-example loss of `model_fn(x_in, t_in) -> prediction` on clean latents x0 [B, …, C].

  Returns (loss, aux): loss [B], or [B, F] with `per_frame` (x0 [B, F, H, W, C]); aux holds the
  per-example 't' (network time), 'sigma', 'snr', 'weight' and unweighted 'mse' (shaped as loss).
  `noise_sampling` defaults to 'lognormal' for 'edm'/'v_edm' and 'uniform' otherwise;
  `sigma_data` (for 'edm' weighting) defaults to the parameterization's for 'edm', else 1.
  `sigma` [B] and `noise` (x0's shape) replace the draws from rng (given noise levels are taken as
  continuous σ, whatever `noise_sampling` says): for tests against the equations.
  """
  param = as_parameterization(parameterization)
  if noise_sampling is None:
    noise_sampling = "lognormal" if param.continuous_noise else "uniform"
  _choice("noise_sampling", noise_sampling, NOISE_SAMPLINGS)
  _choice("weighting", weighting, WEIGHTINGS)
  if per_frame and x0.ndim != 5:
    raise ValueError(f"per_frame needs video latents [B, F, H, W, C]; got shape {x0.shape}.")
  kind = param.prediction_type
  needs_schedule = noise_sampling == "uniform" or not param.continuous_noise
  if needs_schedule and schedule is None:
    raise ValueError(f"noise_sampling={noise_sampling!r} with prediction_type {kind!r} needs a "
                     "DiscreteSchedule (schedule=...).")
  x0 = jnp.asarray(x0, jnp.float32)
  batch = x0.shape[0]
  level_rng, noise_rng, offset_rng = jax.random.split(rng, 3)
  if noise is None:
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
    if offset_noise:
      noise = noise + offset_noise_like(offset_rng, x0, offset_noise)
  noise = jnp.asarray(noise, jnp.float32)

  t = None
  if sigma is not None:
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (batch,))
    alpha_bar = 1 / (1 + sigma**2)
    snr = schedules.snr_from_sigma(sigma)
    if not param.continuous_noise:
      t = schedule.sigma_to_t(sigma)
  elif noise_sampling == "uniform":
    t = sample_timesteps(level_rng, batch, schedule.num_train_timesteps)
    alpha_bar = jnp.asarray(schedule.alphas_cumprod)[t]
    sigma = jnp.asarray(schedule.sigmas)[t]
    snr = alpha_bar / (1 - alpha_bar)
  else:
    sigma = sample_lognormal_sigmas(level_rng, batch, p_mean, p_std)
    alpha_bar = 1 / (1 + sigma**2)
    snr = schedules.snr_from_sigma(sigma)
    if not param.continuous_noise:
      t = schedule.sigma_to_t(sigma)

  if param.continuous_noise:
    c_skip, c_out, c_in = param.scalings(sigma)
    x = schedules.add_noise_ve(x0, sigma, noise)
    x_in = schedules.append_dims(c_in, x0.ndim) * x
    t_in = param.c_noise(sigma)
    c_skip, c_out = (schedules.append_dims(c, x0.ndim) for c in (c_skip, c_out))
    target = (x0 - c_skip * x) / c_out
  else:
    x_in = schedules.q_sample(x0, alpha_bar, noise)
    t_in = jnp.asarray(t, jnp.float32)
    target = {"epsilon": noise, "sample": x0}.get(kind)
    if target is None:
      target = velocity(x0, noise, alpha_bar)

  prediction = model_fn(x_in, t_in).astype(jnp.float32)
  axes = tuple(range(2 if per_frame else 1, x0.ndim))
  mse = jnp.mean(jnp.square(prediction - target), axis=axes)

  if weighting == "uniform":
    weight = jnp.ones_like(sigma)
  elif weighting == "min_snr":
    if kind == "edm":
      weight = jnp.minimum(snr, min_snr_gamma) * param.scalings(sigma)[1] ** 2
    else:
      weight = min_snr_weight(snr, min_snr_gamma, kind)
  else:
    if sigma_data is None:
      sigma_data = param.sigma_data if kind == "edm" else 1.0
    weight = edm_weight(sigma, sigma_data) * param.scalings(sigma)[1] ** 2

  loss = (weight[:, None] if per_frame else weight) * mse
  aux = dict(t=t_in, sigma=sigma, snr=snr, weight=weight, mse=mse)
  return loss, aux
