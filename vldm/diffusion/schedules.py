"""Noise schedules and the forward process, discrete and continuous time in one vocabulary.

A discrete-time (DDPM) schedule is a table over training timesteps t = 0 … T−1:

  β_t → ᾱ_t = ∏(1 − β_s) → σ_t = √((1 − ᾱ_t)/ᾱ_t),   SNR_t = ᾱ_t/(1 − ᾱ_t) = 1/σ_t².

The variance-preserving (VP) sample is x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε; the variance-exploding (VE,
EDM / k-diffusion) view of the same point is x = x0 + σ ε = x_t/√ᾱ_t. Continuous t maps to σ by
linear interpolation of the σ table and σ maps back to t by interpolation in log σ (diffusers'
`np.interp` / `_sigma_to_t`), so Karras σ grids and SVD's continuous c_noise live in the same
schedule.

Host tables (numpy) follow diffusers' dtype flow (float32 tables, float64 where diffusers works in
numpy float64) so that `set_timesteps`-style tables agree with diffusers to float32 rounding; the
traced functions (`alpha_bar`, `sigma`, `sigma_to_t`, `q_sample`, …) are plain jnp.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers' σ-based schedulers replace ᾱ_T = 0 (zero terminal SNR) by 2⁻²⁴ so that σ_max is finite.
ZERO_SNR_ALPHA_BAR = 2.0**-24


def _check_choice(name: str, value, choices: Sequence) -> None:
  if value not in choices:
    raise ValueError(f"Unknown {name} {value!r}; accepted: {tuple(choices)}.")


def make_betas(beta_schedule: str, num_train_timesteps: int, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> np.ndarray:
  """β_t for t = 0 … T−1 (float32), as diffusers' schedulers build them.

  linear: linspace(β0, β1, T); scaled_linear (SD): linspace(√β0, √β1, T)²; squaredcos_cap_v2:
  β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), 0.999) with ᾱ(s) = cos²((s + 0.008)/1.008 · π/2).
  """
  _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
  n = num_train_timesteps
  if beta_schedule == "linear":
    return np.linspace(beta_start, beta_end, n).astype(np.float32)
  if beta_schedule == "scaled_linear":
    return np.linspace(beta_start**0.5, beta_end**0.5, n).astype(np.float32) ** 2
  alpha_bar = lambda s: np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
  s = np.arange(n, dtype=np.float64)
  return np.minimum(1 - alpha_bar((s + 1) / n) / alpha_bar(s / n), 0.999).astype(np.float32)


def _cumprod(x: np.ndarray) -> np.ndarray:
  # torch's CPU cumprod accumulates float32 in float64; doing the same keeps tables identical.
  return np.cumprod(x.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Shifts and scales √ᾱ so that ᾱ_{T−1} = 0 and ᾱ_0 is unchanged (Lin et al. 2023, Alg. 1)."""
  alphas_bar_sqrt = np.sqrt(_cumprod(1 - np.asarray(betas, np.float32)))
  first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
  alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
  alphas_bar = alphas_bar_sqrt**2
  alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
  return (1 - alphas).astype(np.float32)


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float,
                  rho: float = 7.0) -> np.ndarray:
  """σ_i = (σmax^{1/ρ} + i/(N−1) (σmin^{1/ρ} − σmax^{1/ρ}))^ρ, descending, float64 (EDM eq. 5)."""
  ramp = np.linspace(0, 1, num_steps)
  max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
  return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(num_steps: int, sigma_min: float, sigma_max: float) -> np.ndarray:
  """σ evenly spaced in log σ from σmax down to σmin, float64."""
  return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def sigma_to_t(sigma, log_sigmas, xp=jnp):
  """Fractional training timestep of σ by linear interpolation in log σ (diffusers `_sigma_to_t`).

  `log_sigmas` is the ascending log σ table; σ outside it clamps to t = 0 or T−1. `xp` is jnp
  (traced) or np (host tables, computed in the dtypes diffusers uses).
  """
  log_sigma = xp.log(xp.maximum(sigma, 1e-10))
  low_idx = xp.clip(xp.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0,
                    log_sigmas.shape[0] - 2)
  low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
  w = xp.clip((low - log_sigma) / (low - high), 0, 1)
  return (1 - w) * low_idx + w * (low_idx + 1)


def spaced_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "leading",
                     steps_offset: int = 0, *, integer: bool = True) -> np.ndarray:
  """The descending inference timesteps of diffusers' `set_timesteps` (DDPM/DDIM/Euler/Heun).

  'leading': arange(N)·(T//N) + steps_offset; 'trailing': round(arange(T, 0, −T/N)) − 1;
  'linspace': linspace(0, T−1, N) (rounded when `integer`; Euler-type schedulers keep it
  fractional). Returns int64 when `integer`, else float32.
  """
  check_num_steps(num_steps, num_train_timesteps)
  _check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
  t_max, n = num_train_timesteps, num_steps
  if spacing == "linspace":
    if integer:
      timesteps = np.linspace(0, t_max - 1, n).round()[::-1]
    else:
      timesteps = np.linspace(0, t_max - 1, n, dtype=np.float32)[::-1]
  elif spacing == "leading":
    timesteps = (np.arange(0, n) * (t_max // n)).round()[::-1] + steps_offset
  else:
    # Float steps can make arange one element longer than N (diffusers then ends on t = −1).
    timesteps = np.round(np.arange(t_max, 0, -t_max / n))[:n] - 1
  timesteps = timesteps.astype(np.int64 if integer else np.float32)
  check_timesteps(timesteps, num_train_timesteps, f"timestep_spacing={spacing!r}, "
                  f"steps_offset={steps_offset}, num_steps={num_steps}")
  return timesteps


def check_num_steps(num_steps, num_train_timesteps: int) -> None:
  if (isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer))
      or not 1 <= num_steps <= num_train_timesteps):
    raise ValueError(f"num_steps must be an integer in [1, {num_train_timesteps}] (the schedule's "
                     f"num_train_timesteps); got {num_steps!r}.")


def check_timesteps(timesteps: np.ndarray, num_train_timesteps: int, what: str) -> None:
  """Inference timesteps must lie in [0, T−1] and strictly decrease."""
  if timesteps.min() < 0 or timesteps.max() > num_train_timesteps - 1:
    raise ValueError(f"{what} gives timesteps in [{timesteps.min()}, {timesteps.max()}], "
                     f"outside the schedule's [0, {num_train_timesteps - 1}].")
  if np.any(np.diff(timesteps) >= 0):
    raise ValueError(f"{what} gives repeated timesteps {timesteps.tolist()}; use fewer steps.")


def append_dims(v, ndim: int):
  """A per-example [B] (or scalar) coefficient → [B, 1, …, 1] to broadcast against x."""
  v = jnp.asarray(v)
  return v.reshape(v.shape + (1,) * (ndim - v.ndim)) if v.ndim else v


@dataclasses.dataclass(frozen=True)
class DiscreteSchedule:
  """A DDPM β schedule over `num_train_timesteps`; field names are diffusers' scheduler config keys.

  Tables (numpy float32, index t): `betas`, `alphas_cumprod` (ᾱ, exact zero at T−1 with
  `rescale_betas_zero_snr`), `sigmas` (σ = √((1−ᾱ)/ᾱ), ascending, ᾱ_T floored at 2⁻²⁴ as diffusers'
  σ-based schedulers do), `log_sigmas`. Methods map t ↔ ᾱ ↔ σ, traced.
  """
  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = "linear"
  rescale_betas_zero_snr: bool = False
  trained_betas: Optional[tuple] = None

  def __post_init__(self):
    if self.trained_betas is not None:
      object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
      if len(self.trained_betas) != self.num_train_timesteps:
        raise ValueError(f"trained_betas has {len(self.trained_betas)} entries; "
                         f"num_train_timesteps is {self.num_train_timesteps}.")
    else:
      _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
    if isinstance(self.num_train_timesteps, bool) or not (
        isinstance(self.num_train_timesteps, (int, np.integer)) and self.num_train_timesteps >= 2):
      raise ValueError("num_train_timesteps must be an integer ≥ 2; "
                       f"got {self.num_train_timesteps!r}.")
    betas = self._base_betas
    if not np.all((betas > 0) & (betas < 1)):
      raise ValueError(f"Betas must lie in (0, 1); got range [{betas.min()}, {betas.max()}] from "
                       f"beta_start={self.beta_start}, beta_end={self.beta_end}.")

  @classmethod
  def from_config(cls, config: dict) -> "DiscreteSchedule":
    """From a diffusers scheduler config (scheduler_config.json); unrelated keys are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names and v is not None})

  # ---- host tables ---------------------------------------------------------------------------
  @functools.cached_property
  def _base_betas(self) -> np.ndarray:
    if self.trained_betas is not None:
      return np.asarray(self.trained_betas, np.float32)
    return make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)

  @functools.cached_property
  def betas(self) -> np.ndarray:
    """β_t (float32); with `rescale_betas_zero_snr` the last one is 1."""
    betas = self._base_betas
    return rescale_zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

  @functools.cached_property
  def alphas_cumprod(self) -> np.ndarray:
    return _cumprod(1 - self.betas)

  @functools.cached_property
  def sigmas(self) -> np.ndarray:
    alphas_cumprod = self.alphas_cumprod.copy()
    if self.rescale_betas_zero_snr:
      alphas_cumprod[-1] = ZERO_SNR_ALPHA_BAR
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)

  @functools.cached_property
  def log_sigmas(self) -> np.ndarray:
    return np.log(self.sigmas)

  @property
  def sigma_min(self) -> float:
    return float(self.sigmas[0])

  @property
  def sigma_max(self) -> float:
    return float(self.sigmas[-1])

  # ---- traced maps ---------------------------------------------------------------------------
  def alpha_bar(self, t):
    """ᾱ_t: the table entry for integer t; 1/(1+σ(t)²) for fractional t."""
    t = jnp.asarray(t)
    if jnp.issubdtype(t.dtype, jnp.integer):
      return jnp.asarray(self.alphas_cumprod)[t]
    return 1 / (1 + self.sigma(t) ** 2)

  def sigma(self, t):
    """σ(t), linear interpolation of the σ table (diffusers' `np.interp(t, arange(T), sigmas)`)."""
    t = jnp.asarray(t, jnp.float32)
    return jnp.interp(t, jnp.arange(self.num_train_timesteps, dtype=jnp.float32),
                      jnp.asarray(self.sigmas))

  def sigma_to_t(self, sigma):
    """Fractional t of σ by interpolation in log σ; inverse of `sigma` up to rounding."""
    return sigma_to_t(jnp.asarray(sigma, jnp.float32), jnp.asarray(self.log_sigmas))

  def snr(self, t):
    """Signal-to-noise ratio ᾱ_t/(1 − ᾱ_t) (0 at a zero-SNR terminal step)."""
    alpha_bar = self.alpha_bar(t)
    return alpha_bar / (1 - alpha_bar)

  def q_sample(self, x0, t, noise):
    """x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε, for per-example t [B] (or a scalar t)."""
    return q_sample(x0, self.alpha_bar(t), noise)

  def q_step(self, x_prev, t, noise):
    """One forward step x_t = √(1 − β_t) x_{t−1} + √β_t ε (t integer; x_{−1} is x0)."""
    beta = append_dims(jnp.asarray(self.betas)[jnp.asarray(t)], jnp.ndim(x_prev))
    return jnp.sqrt(1 - beta) * x_prev + jnp.sqrt(beta) * noise


def q_sample(x0, alpha_bar, noise):
  """The closed-form forward process √ᾱ x0 + √(1 − ᾱ) ε, ᾱ per example [B] or scalar."""
  alpha_bar = append_dims(alpha_bar, jnp.ndim(x0))
  return jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1 - alpha_bar) * noise


def add_noise_ve(x0, sigma, noise):
  """The VE (EDM) forward process x = x0 + σ ε, σ per example [B] or scalar."""
  return x0 + append_dims(sigma, jnp.ndim(x0)) * noise


def snr_from_sigma(sigma):
  """SNR = 1/σ² for the VE noise level σ."""
  return 1 / jnp.square(sigma)
