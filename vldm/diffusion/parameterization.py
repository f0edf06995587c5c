"""What the network predicts, and the denoiser D(x, σ) that samplers use.

Every parameterization is written as EDM preconditioning on the VE sample x = x0 + σ n:

  D(x, σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, c_noise)

  prediction_type  c_skip          c_out              c_in            c_noise
  'epsilon'        1               −σ                 1/√(σ²+1)       t (the schedule's timestep)
  'v_prediction'   1/(σ²+1)        −σ/√(σ²+1)         1/√(σ²+1)       t
  'sample'         0               1                  1/√(σ²+1)       t
  'edm'            σd²/(σ²+σd²)    σ σd/√(σ²+σd²)     1/√(σ²+σd²)     ¼ ln σ      (Karras et al.)
  'v_edm'          1/(σ²+1)        −σ/√(σ²+1)         1/√(σ²+1)       ¼ ln σ      (SVD; sgm
                                                                          VScalingWithEDMcNoise)

For the first three, c_in x is exactly the VP sample √ᾱ x0 + √(1−ᾱ) n a DDPM-trained network sees.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax.numpy as jnp

from vldm.diffusion import schedules

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "edm", "v_edm")
# Parameterizations whose network time input is c_noise = ¼ ln σ rather than a schedule timestep.
CONTINUOUS_NOISE = ("edm", "v_edm")


@dataclasses.dataclass(frozen=True)
class Parameterization:
  """A prediction type (see the module table) and, for 'edm', the data standard deviation."""
  prediction_type: str = "epsilon"
  sigma_data: float = 0.5

  def __post_init__(self):
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"Unknown prediction_type {self.prediction_type!r}; "
                       f"accepted: {PREDICTION_TYPES}.")

  @property
  def continuous_noise(self) -> bool:
    return self.prediction_type in CONTINUOUS_NOISE

  def scalings(self, sigma):
    """(c_skip, c_out, c_in) at noise level σ (any shape)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    kind = self.prediction_type
    if kind == "edm":
      sd2 = self.sigma_data**2
      c_skip = sd2 / (sigma**2 + sd2)
      c_out = sigma * self.sigma_data / jnp.sqrt(sigma**2 + sd2)
      return c_skip, c_out, 1 / jnp.sqrt(sigma**2 + sd2)
    c_in = 1 / jnp.sqrt(sigma**2 + 1)
    if kind == "epsilon":
      return jnp.ones_like(sigma), -sigma, c_in
    if kind == "sample":
      return jnp.zeros_like(sigma), jnp.ones_like(sigma), c_in
    return 1 / (sigma**2 + 1), -sigma / jnp.sqrt(sigma**2 + 1), c_in  # v_prediction, v_edm

  def c_noise(self, sigma, t=None):
    """The network's time input: ¼ ln σ for 'edm'/'v_edm', else the schedule timestep t."""
    if self.continuous_noise:
      return 0.25 * jnp.log(jnp.asarray(sigma, jnp.float32))
    if t is None:
      raise ValueError(f"prediction_type {self.prediction_type!r} needs the schedule timestep t "
                       "(pass t, or give the Denoiser a schedule to map σ to t).")
    return jnp.asarray(t, jnp.float32)


def as_parameterization(p) -> Parameterization:
  """A Parameterization, or a prediction_type string for one."""
  return p if isinstance(p, Parameterization) else Parameterization(p)


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """D(x, σ, t) → x0 estimate from a raw network F(x_in, c_noise) → prediction.

  `x` is the VE sample x0 + σ n ([B, …]); σ and t are scalars or per-example [B]. t is the
  network time a sampler precomputed (discrete or interpolated timestep, or ¼ ln σ); when it is
  None, 'edm'/'v_edm' use ¼ ln σ and the others map σ to t through `schedule`. The network gets
  c_noise broadcast to [B] and its output is promoted to float32 before the skip connection.
  """
  network: Callable[..., Any]
  parameterization: Any = "epsilon"
  schedule: Optional[schedules.DiscreteSchedule] = None

  def __post_init__(self):
    object.__setattr__(self, "parameterization", as_parameterization(self.parameterization))

  def __call__(self, x, sigma, t=None):
    param = self.parameterization
    batch = x.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (batch,))
    if t is None and not param.continuous_noise and self.schedule is not None:
      t = self.schedule.sigma_to_t(sigma)
    c_noise = jnp.broadcast_to(param.c_noise(sigma, t), (batch,))
    c_skip, c_out, c_in = (schedules.append_dims(c, x.ndim) for c in param.scalings(sigma))
    out = self.network(c_in * x, c_noise)
    return c_skip * x + c_out * out.astype(jnp.float32)


# ---- conversions between predictions on the VP sample x_t = √ᾱ x0 + √(1−ᾱ) ε ---------------------
VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _vp_coefficients(alpha_bar, ndim):
  alpha_bar = schedules.append_dims(jnp.asarray(alpha_bar, jnp.float32), ndim)
  return jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar)


def predict_x0(prediction, x_t, alpha_bar, prediction_type: str):
  """x0 from an ε / v / x0 prediction at the VP sample x_t."""
  a, s = _vp_coefficients(alpha_bar, jnp.ndim(x_t))
  if prediction_type == "epsilon":
    return (x_t - s * prediction) / a
  if prediction_type == "v_prediction":
    return a * x_t - s * prediction
  if prediction_type == "sample":
    return prediction
  raise ValueError(f"Unknown VP prediction_type {prediction_type!r}; accepted: {VP_PREDICTIONS}.")


def predict_epsilon(prediction, x_t, alpha_bar, prediction_type: str):
  """ε from an ε / v / x0 prediction at the VP sample x_t."""
  a, s = _vp_coefficients(alpha_bar, jnp.ndim(x_t))
  if prediction_type == "epsilon":
    return prediction
  if prediction_type == "v_prediction":
    return a * prediction + s * x_t
  if prediction_type == "sample":
    return (x_t - a * prediction) / s
  raise ValueError(f"Unknown VP prediction_type {prediction_type!r}; accepted: {VP_PREDICTIONS}.")


def velocity(x0, noise, alpha_bar):
  """v = √ᾱ ε − √(1−ᾱ) x0 (diffusers `get_velocity`)."""
  a, s = _vp_coefficients(alpha_bar, jnp.ndim(x0))
  return a * noise - s * x0


def convert_prediction(prediction, x_t, alpha_bar, from_type: str, to_type: str):
  """Re-express an ε / v / x0 prediction at x_t as another of the three."""
  for name in (from_type, to_type):
    if name not in VP_PREDICTIONS:
      raise ValueError(f"Unknown VP prediction_type {name!r}; accepted: {VP_PREDICTIONS}.")
  if from_type == to_type:
    return prediction
  if to_type == "sample":
    return predict_x0(prediction, x_t, alpha_bar, from_type)
  if to_type == "epsilon":
    return predict_epsilon(prediction, x_t, alpha_bar, from_type)
  x0 = predict_x0(prediction, x_t, alpha_bar, from_type)
  eps = predict_epsilon(prediction, x_t, alpha_bar, from_type)
  return velocity(x0, eps, alpha_bar)
