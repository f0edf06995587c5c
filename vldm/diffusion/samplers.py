"""Samplers: DDPM, DDIM, Euler, Euler ancestral, Heun and DPM-Solver++ 2M, as diffusers runs them.

Every sampler drives a denoiser `denoise_fn(x, sigma, t) -> x0` (see `parameterization.Denoiser`;
x is the VE sample x0 + σ n, t the network time of the step) in one `lax.scan`: the model is traced
once, per-step constants (timesteps, σ, ᾱ, flags) are arrays precomputed on the host by
`make_plan`, so a jitted sampler compiles once per (sampler, step count, shape).

  x = sample('euler', denoise_fn, noise, schedule, 25, rng, use_karras_sigmas=True, ...)

`noise` is standard normal; the loop starts from noise × the sampler's initial noise scale
(`Plan.init_noise_sigma`, diffusers' `init_noise_sigma`) and returns the final latents. Samplers
that diffusers runs on the VP sample (DDPM, DDIM, DPM-Solver++) keep their state VP and hand the
denoiser x_vp·√(σ²+1). Option names and defaults are those of the diffusers scheduler classes
(timestep_spacing, steps_offset, use_karras_sigmas, …), except `clip_sample`, off by default for
latent diffusion.

SDEdit (diffusers' image-to-image / video-to-video): `partial_plan(plan, strength)` keeps the last
⌊N·strength⌋ steps and `run(..., start=noise_to_start(plan, x0, noise))` denoises clean latents x0
noised to the first of them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vldm.diffusion import schedules
from vldm.diffusion.schedules import DiscreteSchedule

DenoiseFn = Callable[..., jax.Array]

# Floor on ᾱ when a VP sampler hands the denoiser x_vp/√ᾱ: at zero terminal SNR (ᾱ = 0) σ stays
# finite (1e15) and v-prediction's x0 = −v comes out exact in float32.
_MIN_ALPHA_BAR = 1e-30


@dataclasses.dataclass(frozen=True)
class Plan:
  """A sampler's precomputed step tables (host numpy).

  timesteps: [M] float32 network time of each model call (M = model calls; 2N−1 for Heun).
  sigmas: the sampler's σ table (diffusers' `scheduler.sigmas` for σ-based samplers, with the final
    0; the VE σ of each step for DDPM/DDIM).
  arrays: per-call arrays with leading axis M, fed to the scan.
  options: the sampler's resolved options.
  """
  sampler: str
  timesteps: np.ndarray
  sigmas: np.ndarray
  init_noise_sigma: float
  arrays: dict
  options: dict
  stochastic: bool

  @property
  def num_model_calls(self) -> int:
    return int(self.timesteps.shape[0])


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A registry entry: option defaults, the host planner and the traced step."""
  name: str
  defaults: dict
  plan: Callable[..., tuple]  # (schedule, num_steps, options) → (timesteps, sigmas, init, arrays)
  init: Callable[[jax.Array], dict]
  step: Callable[..., dict]  # (options, denoise_fn, carry, xs, noise) → carry
  stochastic: Callable[[dict], bool] = lambda options: False


def _choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"Unknown {name} {value!r}; accepted: {tuple(choices)}.")


def _vp_denoise(denoise_fn, x_vp, sigma, t):
  """The denoiser on a VP state: x_ve = x_vp·√(σ²+1) = x_vp/√ᾱ."""
  return denoise_fn(x_vp * jnp.sqrt(sigma**2 + 1), sigma, t)


def _vp_sigma(alpha_bar: np.ndarray) -> np.ndarray:
  alpha_bar = np.asarray(alpha_bar, np.float32)
  return np.sqrt((1 - alpha_bar) / np.maximum(alpha_bar, np.float32(_MIN_ALPHA_BAR)))


def _clip(x0, options):
  if options["clip_sample"]:
    r = options["clip_sample_range"]
    return jnp.clip(x0, -r, r)
  return x0


def _x_only(x):
  return {"x": x}


# ---- DDPM ------------------------------------------------------------------------------------
DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_large")


def _ddpm_plan(schedule: DiscreteSchedule, num_steps: int, o: dict):
  _choice("variance_type", o["variance_type"], DDPM_VARIANCE_TYPES)
  ts = schedules.spaced_timesteps(schedule.num_train_timesteps, num_steps, o["timestep_spacing"],
                                  o["steps_offset"])
  ac = schedule.alphas_cumprod
  prev = np.append(ts[1:], -1)
  alpha_bar_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], np.float32(1.0)).astype(np.float32)
  sigma = _vp_sigma(ac[ts])
  arrays = dict(alpha_bar=ac[ts], alpha_bar_prev=alpha_bar_prev, sigma=sigma, add_noise=ts > 0)
  return ts.astype(np.float32), sigma, 1.0, arrays


def _ddpm_step(o, denoise_fn, carry, xs, noise):
  x, ab, ab_prev = carry["x"], xs["alpha_bar"], xs["alpha_bar_prev"]
  x0 = _clip(_vp_denoise(denoise_fn, x, xs["sigma"], xs["t"]), o)
  beta_prod, beta_prod_prev = 1 - ab, 1 - ab_prev
  current_alpha = ab / ab_prev
  current_beta = 1 - current_alpha
  x0_coeff = ab_prev**0.5 * current_beta / beta_prod
  x_coeff = current_alpha**0.5 * beta_prod_prev / beta_prod
  mean = x0_coeff * x0 + x_coeff * x
  if o["variance_type"] == "fixed_small":
    variance = jnp.maximum(beta_prod_prev / beta_prod * current_beta, 1e-20)
  else:
    variance = current_beta
  return {"x": mean + jnp.where(xs["add_noise"], variance**0.5, 0.0) * noise}


# ---- DDIM ------------------------------------------------------------------------------------
def _ddim_plan(schedule: DiscreteSchedule, num_steps: int, o: dict):
  if o["eta"] < 0:
    raise ValueError(f"eta must be ≥ 0; got {o['eta']}.")
  t_max = schedule.num_train_timesteps
  ts = schedules.spaced_timesteps(t_max, num_steps, o["timestep_spacing"], o["steps_offset"])
  ac = schedule.alphas_cumprod
  # diffusers steps back by T // N whatever the spacing.
  prev = ts - t_max // num_steps
  final = np.float32(1.0) if o["set_alpha_to_one"] else ac[0]
  alpha_bar_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float32)
  sigma = _vp_sigma(ac[ts])
  arrays = dict(alpha_bar=ac[ts], alpha_bar_prev=alpha_bar_prev, sigma=sigma)
  return ts.astype(np.float32), sigma, 1.0, arrays


def _ddim_step(o, denoise_fn, carry, xs, noise):
  x, ab, ab_prev = carry["x"], xs["alpha_bar"], xs["alpha_bar_prev"]
  x0 = _vp_denoise(denoise_fn, x, xs["sigma"], xs["t"])
  eps = (x - ab**0.5 * x0) / (1 - ab) ** 0.5
  x0 = _clip(x0, o)
  # ≥ 0 in exact arithmetic (ᾱ_prev ≥ ᾱ); the clamp keeps a rounded ᾱ/ᾱ_prev of 1 + ε at the last
  # step (ᾱ_prev = ᾱ_0 = ᾱ there without set_alpha_to_one) from making it √(−ε) = NaN, × eta 0.
  variance = jnp.maximum((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev), 0.0)
  std = o["eta"] * variance**0.5
  x = ab_prev**0.5 * x0 + jnp.maximum(1 - ab_prev - std**2, 0.0) ** 0.5 * eps
  if o["eta"] > 0:
    x = x + std * noise
  return {"x": x}


# ---- σ tables of the Euler family --------------------------------------------------------------
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
TIMESTEP_TYPES = ("discrete", "continuous")


def _init_noise_sigma(sigmas: np.ndarray, spacing: str) -> float:
  max_sigma = sigmas.max()
  if spacing in ("linspace", "trailing"):
    return float(max_sigma)
  return float((max_sigma**2 + np.float32(1)) ** np.float32(0.5))


def _euler_sigmas(schedule: DiscreteSchedule, num_steps: int, o: dict):
  """diffusers' EulerDiscreteScheduler.set_timesteps: (timesteps [N], sigmas [N+1]), float32."""
  _choice("interpolation_type", o.get("interpolation_type", "linear"), ("linear",))
  _choice("final_sigmas_type", o.get("final_sigmas_type", "zero"), FINAL_SIGMAS_TYPES)
  _choice("timestep_type", o.get("timestep_type", "discrete"), TIMESTEP_TYPES)
  karras, exponential = o.get("use_karras_sigmas", False), o.get("use_exponential_sigmas", False)
  if karras and exponential:
    raise ValueError("Only one of use_karras_sigmas and use_exponential_sigmas can be set.")
  table = schedule.sigmas
  timesteps = schedules.spaced_timesteps(schedule.num_train_timesteps, num_steps,
                                         o["timestep_spacing"], o["steps_offset"], integer=False)
  sigmas = np.interp(timesteps, np.arange(len(table)), table)
  if karras or exponential:
    # The ends are the spaced σ's unless the config pins them (SVD: 0.002 … 700).
    lo = o.get("sigma_min") if o.get("sigma_min") is not None else sigmas[-1].item()
    hi = o.get("sigma_max") if o.get("sigma_max") is not None else sigmas[0].item()
    if not 0 < lo <= hi:
      raise ValueError(f"Need 0 < sigma_min ≤ sigma_max; got sigma_min={lo}, sigma_max={hi}.")
    make = schedules.karras_sigmas if karras else schedules.exponential_sigmas
    sigmas = make(num_steps, lo, hi)
    timesteps = schedules.sigma_to_t(sigmas, schedule.log_sigmas, xp=np)
  last = table[0] if o.get("final_sigmas_type") == "sigma_min" else 0.0
  sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
  if o.get("timestep_type") == "continuous":
    timesteps = np.float32(0.25) * np.log(sigmas[:-1])  # c_noise = ¼ ln σ (SVD)
  return np.asarray(timesteps, np.float32), sigmas


def _euler_plan(schedule, num_steps, o):
  timesteps, sigmas = _euler_sigmas(schedule, num_steps, o)
  arrays = dict(sigma=sigmas[:-1], sigma_next=sigmas[1:])
  return timesteps, sigmas, _init_noise_sigma(sigmas, o["timestep_spacing"]), arrays


def _euler_step(o, denoise_fn, carry, xs, noise):
  x, sigma = carry["x"], xs["sigma"]
  x0 = denoise_fn(x, sigma, xs["t"])
  derivative = (x - x0) / sigma
  return {"x": x + derivative * (xs["sigma_next"] - sigma)}


def _euler_ancestral_step(o, denoise_fn, carry, xs, noise):
  x, sigma_from, sigma_to = carry["x"], xs["sigma"], xs["sigma_next"]
  x0 = denoise_fn(x, sigma_from, xs["t"])
  sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
  sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
  derivative = (x - x0) / sigma_from
  return {"x": x + derivative * (sigma_down - sigma_from) + noise * sigma_up}


# ---- Heun (EDM Algorithm 1, as diffusers' two-calls-per-step state machine) ---------------------
def _heun_plan(schedule, num_steps, o):
  timesteps, sigmas = _euler_sigmas(schedule, num_steps, o)
  init = _init_noise_sigma(sigmas, o["timestep_spacing"])
  # Model calls: σ0, then (σ_i: Heun correction, σ_i: next Euler step) for i ≥ 1; the last step
  # (to σ = 0) is plain Euler. The order matches diffusers' `timesteps` / `sigmas` exactly.
  sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
  timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])
  calls = len(timesteps)
  arrays = dict(sigma=sigmas[:-1], sigma_next=sigmas[1:], first_order=np.arange(calls) % 2 == 0)
  return timesteps, sigmas, init, arrays


def _heun_init(x):
  return {"x": x, "x_saved": x, "d_prev": jnp.zeros_like(x), "dt": jnp.zeros((), jnp.float32)}


def _heun_step(o, denoise_fn, carry, xs, noise):
  x, sigma, first = carry["x"], xs["sigma"], xs["first_order"]
  x0 = denoise_fn(x, sigma, xs["t"])
  derivative = (x - x0) / sigma
  # First order: an Euler step to σ_next, remembering where it started.
  dt = xs["sigma_next"] - sigma
  euler = x + derivative * dt
  # Second order: average the slopes at both ends and redo the step from the saved sample.
  heun = carry["x_saved"] + (carry["d_prev"] + derivative) / 2 * carry["dt"]
  return {"x": jnp.where(first, euler, heun),
          "x_saved": jnp.where(first, x, carry["x_saved"]),
          "d_prev": jnp.where(first, derivative, carry["d_prev"]),
          "dt": jnp.where(first, dt, carry["dt"])}


# ---- DPM-Solver++ (2M) -----------------------------------------------------------------------
SOLVER_TYPES = ("midpoint", "heun")


def _dpm_timesteps(schedule: DiscreteSchedule, num_steps: int, o: dict) -> np.ndarray:
  """DPMSolverMultistepScheduler's spacing: N of N+1 points, with lambda_min_clipped."""
  t_max = schedule.num_train_timesteps
  schedules.check_num_steps(num_steps, t_max)
  spacing = o["timestep_spacing"]
  _choice("timestep_spacing", spacing, schedules.TIMESTEP_SPACINGS)
  lambdas = -schedule.log_sigmas  # λ = ln α_t − ln σ_t = −ln σ, descending in t
  last = t_max - int(np.searchsorted(lambdas[::-1], o["lambda_min_clipped"]))
  if spacing == "linspace":
    ts = np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1]
  elif spacing == "leading":
    ratio = last // (num_steps + 1)
    ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1] + o["steps_offset"]
  else:
    ts = np.arange(last, 0, -t_max / num_steps).round()[:num_steps] - 1
  ts = ts.astype(np.int64)
  schedules.check_timesteps(ts, t_max, f"timestep_spacing={spacing!r}, steps_offset="
                            f"{o['steps_offset']}, num_steps={num_steps} (DPM-Solver spacing)")
  return ts


def _dpm_plan(schedule: DiscreteSchedule, num_steps: int, o: dict):
  _choice("solver_order", o["solver_order"], (1, 2))
  _choice("solver_type", o["solver_type"], SOLVER_TYPES)
  _choice("final_sigmas_type", o["final_sigmas_type"], FINAL_SIGMAS_TYPES)
  karras, exponential = o["use_karras_sigmas"], o["use_exponential_sigmas"]
  if karras and exponential:
    raise ValueError("Only one of use_karras_sigmas and use_exponential_sigmas can be set.")
  timesteps = _dpm_timesteps(schedule, num_steps, o)
  table = schedule.sigmas
  if karras or exponential:
    # The ends are the whole training table's (DPM-Solver has no sigma_min / sigma_max option).
    make = schedules.karras_sigmas if karras else schedules.exponential_sigmas
    sigmas = make(num_steps, table[0].item(), table[-1].item())
    timesteps = schedules.sigma_to_t(sigmas, schedule.log_sigmas, xp=np)
    if karras and schedule.beta_schedule != "squaredcos_cap_v2":
      timesteps = timesteps.round()
  else:
    sigmas = np.interp(timesteps, np.arange(len(table)), table)
  last = table[0] if o["final_sigmas_type"] == "sigma_min" else 0.0
  sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
  timesteps = timesteps.astype(np.int64)  # diffusers truncates fractional (cosine) timesteps
  steps = len(timesteps)
  first_order = np.arange(steps) == 0
  if o["solver_order"] == 1:
    first_order[:] = True
  if (o["euler_at_final"] or (o["lower_order_final"] and steps < 15)
      or o["final_sigmas_type"] == "zero"):
    first_order[-1] = True
  arrays = dict(sigma=sigmas[:-1], sigma_next=sigmas[1:],
                sigma_prev=np.concatenate([sigmas[:1], sigmas[:-2]]), first_order=first_order)
  return timesteps.astype(np.float32), sigmas, 1.0, arrays


def _dpm_init(x):
  return {"x": x, "m_prev": jnp.zeros_like(x)}


def _alpha_sigma_lambda(sigma):
  alpha = 1 / (sigma**2 + 1) ** 0.5
  sigma_vp = sigma * alpha
  return alpha, sigma_vp, jnp.log(alpha) - jnp.log(sigma_vp)


def _dpm_step(o, denoise_fn, carry, xs, noise):
  x, first = carry["x"], xs["first_order"]
  m0 = _vp_denoise(denoise_fn, x, xs["sigma"], xs["t"])
  alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(xs["sigma_next"])
  _, sigma_s0, lambda_s0 = _alpha_sigma_lambda(xs["sigma"])
  _, _, lambda_s1 = _alpha_sigma_lambda(xs["sigma_prev"])
  h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
  # The second-order terms are unused (and may be inf/nan) on first-order steps: keep them finite.
  r0 = jnp.where(first, 1.0, h_0 / h)
  d1 = (1.0 / r0) * (m0 - carry["m_prev"])
  em1 = jnp.exp(-h) - 1.0
  x_first = (sigma_t / sigma_s0) * x - (alpha_t * em1) * m0
  if o["solver_type"] == "midpoint":
    x_second = x_first - 0.5 * (alpha_t * em1) * d1
  else:
    h_safe = jnp.where(first, 1.0, h)
    x_second = x_first + (alpha_t * (em1 / h_safe + 1.0)) * d1
  return {"x": jnp.where(first, x_first, x_second), "m_prev": m0}


# ---- registry --------------------------------------------------------------------------------
_CLIP = dict(clip_sample=False, clip_sample_range=1.0)
_EULER_SIGMAS = dict(timestep_spacing="linspace", steps_offset=0, use_karras_sigmas=False,
                     use_exponential_sigmas=False, sigma_min=None, sigma_max=None)

SAMPLERS = {
    "ddpm": Sampler(
        "ddpm", dict(timestep_spacing="leading", steps_offset=0, variance_type="fixed_small",
                     **_CLIP),
        _ddpm_plan, _x_only, _ddpm_step, stochastic=lambda o: True),
    "ddim": Sampler(
        "ddim", dict(timestep_spacing="leading", steps_offset=0, eta=0.0, set_alpha_to_one=True,
                     **_CLIP),
        _ddim_plan, _x_only, _ddim_step, stochastic=lambda o: o["eta"] > 0),
    "euler": Sampler(
        "euler", dict(_EULER_SIGMAS, interpolation_type="linear", final_sigmas_type="zero",
                      timestep_type="discrete"),
        _euler_plan, _x_only, _euler_step),
    "euler_ancestral": Sampler(
        "euler_ancestral", dict(timestep_spacing="linspace", steps_offset=0),
        _euler_plan, _x_only, _euler_ancestral_step, stochastic=lambda o: True),
    "heun": Sampler("heun", dict(_EULER_SIGMAS), _heun_plan, _heun_init, _heun_step),
    "dpmpp_2m": Sampler(
        "dpmpp_2m", dict(timestep_spacing="linspace", steps_offset=0, solver_order=2,
                         solver_type="midpoint", lower_order_final=True, euler_at_final=False,
                         use_karras_sigmas=False, use_exponential_sigmas=False,
                         final_sigmas_type="zero", lambda_min_clipped=-float("inf")),
        _dpm_plan, _dpm_init, _dpm_step),
}


def get_sampler(name: str) -> Sampler:
  if name not in SAMPLERS:
    raise ValueError(f"Unknown sampler {name!r}; accepted: {tuple(SAMPLERS)}.")
  return SAMPLERS[name]


def make_plan(sampler: str, schedule: DiscreteSchedule, num_steps: int, **options) -> Plan:
  """Host-side step tables for `sampler` with `num_steps` steps; options as in diffusers."""
  entry = get_sampler(sampler)
  if not isinstance(schedule, DiscreteSchedule):
    raise ValueError(f"schedule must be a DiscreteSchedule; got {type(schedule).__name__}.")
  unknown = sorted(set(options) - set(entry.defaults))
  if unknown:
    raise ValueError(f"Unknown option(s) {unknown} for sampler {sampler!r}; "
                     f"accepted: {sorted(entry.defaults)}.")
  resolved = {**entry.defaults, **options}
  schedules.check_num_steps(num_steps, schedule.num_train_timesteps)
  timesteps, sigmas, init, arrays = entry.plan(schedule, num_steps, resolved)
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  return Plan(sampler, np.asarray(timesteps, np.float32), np.asarray(sigmas, np.float32),
              float(init), arrays, resolved, bool(entry.stochastic(resolved)))


# ---- partial runs: SDEdit (diffusers' image-to-image and video-to-video pipelines) -------------
# Samplers whose plan is one model call per step with no state beyond x: any suffix of the plan is
# itself a plan.
PARTIAL_SAMPLERS = ("ddpm", "ddim", "euler", "euler_ancestral")


def _check_partial(plan: Plan) -> None:
  if plan.sampler not in PARTIAL_SAMPLERS:
    raise ValueError(f"Sampler {plan.sampler!r} cannot start part-way; samplers that can: "
                     f"{PARTIAL_SAMPLERS}.")


def partial_plan(plan: Plan, strength: float) -> Plan:
  """The last min(⌊N·strength⌋, N) of the plan's N steps, as diffusers' img2img `get_timesteps`
  keeps them: a clean sample noised to the first kept step (`noise_to_start`) is denoised from
  there. strength 1 keeps the whole plan; small strengths stay close to the input."""
  _check_partial(plan)
  steps = plan.num_model_calls
  keep = min(int(steps * strength), steps) if 0 < strength <= 1 else 0
  if keep < 1:
    raise ValueError(f"strength must be in (0, 1] and keep at least one of the {steps} steps "
                     f"(strength ≥ {1 / steps:.3g}); got {strength!r}.")
  start = steps - keep
  return dataclasses.replace(
      plan, timesteps=plan.timesteps[start:], sigmas=plan.sigmas[start:],
      arrays={k: v[start:] for k, v in plan.arrays.items()})


def noise_to_start(plan: Plan, x0, noise):
  """Clean latents x0 noised to the plan's first step, in the sampler's own state (diffusers'
  `scheduler.add_noise`): √ᾱ·x0 + √(1−ᾱ)·noise for DDPM/DDIM, x0 + σ·noise for the Euler family."""
  _check_partial(plan)
  x0, noise = jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32)
  if "alpha_bar" in plan.arrays:
    alpha_bar = float(plan.arrays["alpha_bar"][0])
    return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise
  return x0 + float(plan.sigmas[0]) * noise


def run(plan: Plan, denoise_fn: DenoiseFn, noise, rng=None, *, step_noise=None,
        return_trajectory: bool = False, start=None):
  """Runs a plan from standard-normal `noise`; returns the final latents (float32).

  Stochastic samplers draw one normal per model call from `rng` (split per step), or take the
  draws from `step_noise` [M, *noise.shape] (to replay a reference implementation's noise).
  With `return_trajectory`, also returns the state after every model call, [M, *noise.shape].
  `start`: the initial state instead of noise × init_noise_sigma (a partial plan's
  `noise_to_start`; `noise` then only gives the shape).
  """
  entry = get_sampler(plan.sampler)
  x = jnp.asarray(noise if start is None else start, jnp.float32)
  if start is None:
    x = x * plan.init_noise_sigma
  calls = plan.num_model_calls
  xs = {k: jnp.asarray(v) for k, v in plan.arrays.items()}
  xs["t"] = jnp.asarray(plan.timesteps)
  if plan.stochastic:
    if step_noise is not None:
      step_noise = jnp.asarray(step_noise, jnp.float32)
      if step_noise.shape != (calls,) + x.shape:
        raise ValueError(f"step_noise must have shape {(calls,) + x.shape} (one draw per model "
                         f"call); got {step_noise.shape}.")
      xs["noise"] = step_noise
    elif rng is None:
      raise ValueError(f"Sampler {plan.sampler!r} with these options is stochastic: pass rng "
                       "(a PRNG key) or step_noise.")
    else:
      xs["key"] = jax.random.split(rng, calls)

  def body(carry, inputs):
    noise_i = None
    if plan.stochastic:
      noise_i = inputs["noise"] if "noise" in inputs else jax.random.normal(
          inputs["key"], x.shape, jnp.float32)
    carry = entry.step(plan.options, denoise_fn, carry, inputs, noise_i)
    return carry, carry["x"] if return_trajectory else None

  carry, trajectory = jax.lax.scan(body, entry.init(x), xs)
  return (carry["x"], trajectory) if return_trajectory else carry["x"]


def sample(sampler: str, denoise_fn: DenoiseFn, noise, schedule: DiscreteSchedule, num_steps: int,
           rng=None, *, step_noise=None, return_trajectory: bool = False, **options):
  """Samples with a registered sampler; see the module docstring. Traceable: wrap it in jax.jit."""
  plan = make_plan(sampler, schedule, num_steps, **options)
  return run(plan, denoise_fn, noise, rng, step_noise=step_noise,
             return_trajectory=return_trajectory)


# ---- diffusers scheduler configs -------------------------------------------------------------
DIFFUSERS_SCHEDULERS = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
}
# Config values vldm does not implement: a config must leave them at these defaults.
_REQUIRED_DEFAULTS = dict(thresholding=False, use_beta_sigmas=False, use_lu_lambdas=False,
                          use_flow_sigmas=False, algorithm_type="dpmsolver++",
                          use_dynamic_shifting=False)


def from_scheduler_config(config: dict):
  """diffusers scheduler_config.json → (sampler name, DiscreteSchedule, options, prediction_type)."""
  class_name = config.get("_class_name")
  if class_name not in DIFFUSERS_SCHEDULERS:
    raise ValueError(f"Unsupported scheduler class {class_name!r}; accepted: "
                     f"{tuple(DIFFUSERS_SCHEDULERS)}.")
  for key, default in _REQUIRED_DEFAULTS.items():
    if config.get(key, default) not in (default, None):
      raise ValueError(f"{class_name} config sets {key}={config[key]!r}, which vldm does not "
                       f"implement (only {default!r}).")
  name = DIFFUSERS_SCHEDULERS[class_name]
  entry = SAMPLERS[name]
  options = {k: v for k, v in config.items() if k in entry.defaults}
  prediction_type = config.get("prediction_type", "epsilon")
  if name == "euler" and prediction_type != "v_prediction":
    options.pop("timestep_type", None)  # diffusers uses ¼ ln σ only with v-prediction
  return name, DiscreteSchedule.from_config(config), options, prediction_type


# What each diffusers class cannot express, beyond the option names it shares with vldm: sampler →
# {option: the only value the class runs}.
_DIFFUSERS_FIXED_OPTIONS = {
    "ddim": {"eta": 0.0},  # diffusers takes eta when called (pipeline(..., eta=...)), not in config
    "heun": {"sigma_min": None, "sigma_max": None},
}
_DIFFUSERS_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
V_EDM = "v_edm"  # written as Euler with v_prediction and continuous timesteps (SVD's config)


def to_scheduler_config(
    sampler_name: str,
    schedule: DiscreteSchedule,
    options: dict | None = None,
    prediction_type: str = "epsilon",
) -> dict:
  """(sampler name, DiscreteSchedule, options, prediction_type) → a diffusers
  scheduler_config.json dict; the inverse of `from_scheduler_config`.

  The options are written resolved (vldm's defaults filled in: diffusers' own defaults differ,
  e.g. DDIM's clip_sample), so `from_scheduler_config` gives back the resolved options, equal to
  `options` when they were complete (as `from_scheduler_config` returns them). Raises ValueError
  for what the diffusers class cannot express: DDIM eta ≠ 0, Heun with sigma_min / sigma_max or
  rescale_betas_zero_snr, Euler's continuous timesteps without v-prediction, 'edm', and 'v_edm'
  with any sampler but Euler.

  'v_edm' (v-prediction with c_noise = ¼ ln σ: SVD's) is diffusers' EulerDiscreteScheduler with
  prediction_type='v_prediction' and timestep_type='continuous' (its timesteps are then ¼ ln σ),
  whatever timestep_type the options hold: vldm's 'v_edm' denoiser ignores the sampler's timesteps.
  `SamplerSettings.from_scheduler_config` reads that config back as 'v_edm'.
  """
  entry = get_sampler(sampler_name)
  class_name = {v: k for k, v in DIFFUSERS_SCHEDULERS.items()}.get(sampler_name)
  if class_name is None:
    raise ValueError(
        f"Sampler {sampler_name!r} has no diffusers scheduler class; those that do: "
        f"{tuple(DIFFUSERS_SCHEDULERS.values())}."
    )
  if not isinstance(schedule, DiscreteSchedule):
    raise ValueError(f"schedule must be a DiscreteSchedule; got {type(schedule).__name__}.")
  options = dict(options or {})
  unknown = sorted(set(options) - set(entry.defaults))
  if unknown:
    raise ValueError(
        f"Unknown option(s) {unknown} for sampler {sampler_name!r}; "
        f"accepted: {sorted(entry.defaults)}."
    )
  if prediction_type == V_EDM:
    if sampler_name != "euler":
      raise ValueError(
          f"prediction_type 'v_edm' (v-prediction with c_noise = ¼ ln σ, as SVD) has a diffusers "
          f"scheduler only with sampler 'euler' (EulerDiscreteScheduler, prediction_type="
          f"'v_prediction', timestep_type='continuous'); diffusers' {class_name} feeds the network "
          f"its discrete timesteps instead. Got sampler {sampler_name!r}: save with 'euler'."
      )
    options["timestep_type"] = "continuous"
    prediction_type = "v_prediction"
  _choice("prediction_type for a diffusers scheduler", prediction_type, _DIFFUSERS_PREDICTION_TYPES)
  resolved = {**entry.defaults, **options}
  problems = []
  fixed = _DIFFUSERS_FIXED_OPTIONS.get(sampler_name, {})
  for key, only in fixed.items():
    if resolved[key] != only:
      problems.append(f"{key}={resolved[key]!r} (it runs {key}={only!r})")
  if sampler_name == "heun" and schedule.rescale_betas_zero_snr:
    problems.append("rescale_betas_zero_snr=True (it has no such option)")
  if (
      sampler_name == "euler"
      and resolved["timestep_type"] == "continuous"
      and prediction_type != "v_prediction"
  ):
    problems.append(
        "timestep_type='continuous' with prediction_type="
        f"{prediction_type!r} (it uses continuous timesteps only with v_prediction)"
    )
  if problems:
    raise ValueError(
        f"diffusers' {class_name} cannot express sampler {sampler_name!r} with "
        + "; ".join(problems)
        + "."
    )
  config = {
      "_class_name": class_name,
      "num_train_timesteps": int(schedule.num_train_timesteps),
      "beta_start": schedule.beta_start,
      "beta_end": schedule.beta_end,
      "beta_schedule": schedule.beta_schedule,
      "prediction_type": prediction_type,
  }
  if sampler_name != "heun":  # HeunDiscreteScheduler has no such option (False only, see above)
    config["rescale_betas_zero_snr"] = schedule.rescale_betas_zero_snr
  if schedule.trained_betas is not None:
    config["trained_betas"] = list(schedule.trained_betas)
  if sampler_name == "dpmpp_2m":
    config["algorithm_type"] = "dpmsolver++"
  config.update({k: v for k, v in resolved.items() if k not in fixed})
  return config
