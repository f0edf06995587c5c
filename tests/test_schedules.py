"""Schedules and the forward process: tables against diffusers, t ↔ ᾱ ↔ σ maps, marginals."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parity import relative_error
from vldm.diffusion import samplers, schedules
from vldm.diffusion.schedules import DiscreteSchedule

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
DDIMScheduler, DDPMScheduler = diffusers.DDIMScheduler, diffusers.DDPMScheduler
EulerDiscreteScheduler = diffusers.EulerDiscreteScheduler
EulerAncestralDiscreteScheduler = diffusers.EulerAncestralDiscreteScheduler
HeunDiscreteScheduler = diffusers.HeunDiscreteScheduler
DPMSolverMultistepScheduler = diffusers.DPMSolverMultistepScheduler

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
BETA_CONFIGS = {
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "scaled_linear": SD,
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02),
    "zero_snr": dict(SD, rescale_betas_zero_snr=True),
    "zero_snr_linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                            rescale_betas_zero_snr=True, num_train_timesteps=500),
}
# Float32 round-off in diffusers' own tables (torch's CPU sqrt is not correctly rounded); with zero
# terminal SNR, σ near T−1 comes from a cancellation and agrees to ~2e-5.
TABLE_TOL = {"zero_snr": 3e-5, "zero_snr_linear": 3e-5}


@pytest.mark.parametrize("name", list(BETA_CONFIGS))
def test_training_tables_match_diffusers(name):
  config = BETA_CONFIGS[name]
  ours = DiscreteSchedule(**config)
  ddim, euler = DDIMScheduler(**config), EulerDiscreteScheduler(**config)
  zero_snr = config.get("rescale_betas_zero_snr", False)
  np.testing.assert_allclose(ours.betas, ddim.betas.numpy(), rtol=0,
                             atol=1e-5 if zero_snr else 2e-7)
  np.testing.assert_allclose(ours.alphas_cumprod, ddim.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
  # Euler's σ table (descending, final 0) carries the 2⁻²⁴ floor of zero-SNR schedules.
  assert relative_error(ours.sigmas[::-1], euler.sigmas.numpy()[:-1]) < TABLE_TOL.get(name, 1e-6)
  if zero_snr:
    assert ours.alphas_cumprod[-1] == 0 and ours.betas[-1] == 1
    assert ours.sigmas[-1] == pytest.approx(4096, rel=1e-6)


def _table_cases():
  cases = []
  for sched in ("linear", "scaled_linear", "squaredcos_cap_v2", "zero_snr"):
    for steps in (1, 7, 25, 50, 999):
      for spacing in ("leading", "trailing", "linspace"):
        cases.append((sched, steps, spacing, 1 if spacing == "leading" else 0))
  return cases


REFERENCE_CLASSES = [
    ("ddim", DDIMScheduler, {}),
    ("ddpm", DDPMScheduler, {}),
    ("euler", EulerDiscreteScheduler, {}),
    ("euler", EulerDiscreteScheduler, dict(use_karras_sigmas=True)),
    ("euler", EulerDiscreteScheduler,
     dict(use_exponential_sigmas=True, final_sigmas_type="sigma_min")),
    ("euler", EulerDiscreteScheduler,
     dict(use_karras_sigmas=True, sigma_min=0.002, sigma_max=700.0, timestep_type="continuous",
          prediction_type="v_prediction")),
    ("euler_ancestral", EulerAncestralDiscreteScheduler, {}),
    ("heun", HeunDiscreteScheduler, {}),
    ("heun", HeunDiscreteScheduler, dict(use_karras_sigmas=True)),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {}),
    ("dpmpp_2m", DPMSolverMultistepScheduler, dict(use_karras_sigmas=True)),
]


@pytest.mark.parametrize("sched,steps,spacing,offset", _table_cases())
def test_inference_tables_match_diffusers(sched, steps, spacing, offset):
  """timesteps, σ and the initial noise scale of every sampler equal diffusers' set_timesteps."""
  schedule = DiscreteSchedule(**BETA_CONFIGS[sched])
  tol = TABLE_TOL.get(sched, 5e-7)
  checked = 0
  for name, cls, extra in REFERENCE_CLASSES:
    if cls is HeunDiscreteScheduler and sched == "zero_snr":
      continue  # Heun has no zero-SNR option
    config = dict(BETA_CONFIGS[sched], **extra, timestep_spacing=spacing, steps_offset=offset)
    ref = cls(**config)
    ref.set_timesteps(steps)
    options = {k: v for k, v in config.items() if k in samplers.SAMPLERS[name].defaults}
    if name == "dpmpp_2m" and spacing == "leading" and steps == 999:
      # DPM-Solver's leading spacing steps by T // (N+1): diffusers ends on t = 1000, out of the
      # table; vldm refuses.
      with pytest.raises(ValueError, match="outside the schedule"):
        samplers.make_plan(name, schedule, steps, **options)
      continue
    plan = samplers.make_plan(name, schedule, steps, **options)
    ref_t = ref.timesteps.numpy()
    if spacing == "trailing" and len(ref_t) == steps + 1:
      ref_t = ref_t[:-1]  # diffusers' float arange overshoots to t = −1 for some N
    assert plan.timesteps.shape == ref_t.shape, (name, extra)
    if ref_t.dtype.kind == "i":
      np.testing.assert_array_equal(plan.timesteps, ref_t)
    else:
      assert relative_error(plan.timesteps, ref_t) < max(tol, 1e-6), (name, extra)
    if name not in ("ddim", "ddpm"):
      ref_sigmas = ref.sigmas.numpy()[:len(plan.sigmas)]
      assert relative_error(plan.sigmas, ref_sigmas) < tol, (name, extra)
      init = 1.0 if name == "dpmpp_2m" else float(ref.init_noise_sigma)
      assert plan.init_noise_sigma == pytest.approx(init, rel=max(tol, 1e-6))
    checked += 1
  assert checked >= 7


def test_spaced_timesteps_values():
  spaced = lambda *args: schedules.spaced_timesteps(1000, 4, *args).tolist()
  assert spaced("leading", 1) == [751, 501, 251, 1]
  assert spaced("trailing") == [999, 749, 499, 249]
  assert spaced("linspace") == [999, 666, 333, 0]


def test_karras_sigmas():
  sigmas = schedules.karras_sigmas(25, 0.002, 700.0)
  assert sigmas[0] == pytest.approx(700.0) and sigmas[-1] == pytest.approx(0.002)
  ramp = np.linspace(0, 1, 25)
  expected = (700 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 700 ** (1 / 7))) ** 7
  np.testing.assert_allclose(sigmas, expected, rtol=1e-12)


def test_t_alpha_sigma_maps():
  schedule = DiscreteSchedule(**SD)
  t = np.arange(0, 1000, 37)
  t_grid = np.asarray([0.0, 3.0, 100.0, 512.0, 998.0, 999.0], np.float32)
  t_frac = np.asarray([3.25, 100.5, 512.75, 998.9], np.float32)
  probe = np.asarray([0.01, 0.0292, 0.5, 1.0, 7.3, 14.6, 20.0], np.float32)

  @jax.jit
  def maps(t, t_grid, t_frac, probe):
    sigma = schedule.sigma(t.astype(jnp.float32))
    return dict(alpha_bar=schedule.alpha_bar(t), sigma=sigma, snr=schedule.snr(t),
                snr_sigma=schedules.snr_from_sigma(sigma),
                grid=schedule.sigma_to_t(schedule.sigma(t_grid)),
                frac=schedule.sigma_to_t(schedule.sigma(t_frac)), probe=schedule.sigma_to_t(probe))

  out = maps(t, t_grid, t_frac, probe)
  alpha_bar = schedule.alphas_cumprod[t]
  np.testing.assert_allclose(out["alpha_bar"], alpha_bar)
  np.testing.assert_allclose(out["sigma"], np.sqrt((1 - alpha_bar) / alpha_bar), rtol=1e-6)
  np.testing.assert_allclose(out["snr"], alpha_bar / (1 - alpha_bar), rtol=1e-6)
  np.testing.assert_allclose(out["snr_sigma"], out["snr"], rtol=1e-5)
  # Continuous t: σ interpolates linearly in t, σ → t inverts in log σ (both as diffusers' Euler
  # does), so the round trip is exact on the grid and within the interpolation gap between.
  np.testing.assert_allclose(out["grid"], t_grid, atol=1e-3)
  np.testing.assert_allclose(out["frac"], t_frac, atol=0.02)
  ref = EulerDiscreteScheduler(**SD)
  log_sigmas = np.log(schedule.sigmas)
  expected = [ref._sigma_to_t(np.asarray(s, np.float64), log_sigmas) for s in probe]
  np.testing.assert_allclose(out["probe"], expected, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(schedules.sigma_to_t(probe.astype(np.float64), log_sigmas, xp=np),
                             expected, rtol=1e-12)
  # Fractional t reads ᾱ through σ.
  assert float(schedule.alpha_bar(jnp.float32(10.0))) == pytest.approx(schedule.alphas_cumprod[10],
                                                                       rel=1e-5)


def test_q_sample_matches_diffusers_add_noise():
  schedule = DiscreteSchedule(**BETA_CONFIGS["zero_snr"])
  ref = DDPMScheduler(**BETA_CONFIGS["zero_snr"])
  rng = np.random.default_rng(0)
  x0, noise = rng.standard_normal((2, 5, 3, 4, 4)).astype(np.float32)
  t = np.asarray([0, 17, 400, 800, 999])
  expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
  actual = schedule.q_sample(jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
  assert relative_error(actual, expected.numpy()) < 1e-6
  np.testing.assert_allclose(actual[-1], noise[-1], atol=1e-6)  # zero SNR: pure noise at T−1


def test_forward_process_marginals():
  """q(x_t | x0) = N(√ᾱ x0, (1−ᾱ) I), and iterating the one-step kernel reaches the same law."""
  schedule = DiscreteSchedule(beta_schedule="linear", beta_start=0.001, beta_end=0.05,
                              num_train_timesteps=60)
  n = 40000
  x0 = jnp.asarray([-1.5, 0.0, 0.7, 2.0])
  for t in (0, 9, 59):
    alpha_bar = float(schedule.alphas_cumprod[t])
    noise = jax.random.normal(jax.random.key(t, impl="rbg"), (n, 4))
    xt = schedule.q_sample(jnp.broadcast_to(x0, (n, 4)), jnp.full((n,), t), noise)
    se_mean, se_var = np.sqrt((1 - alpha_bar) / n), (1 - alpha_bar) * np.sqrt(2 / n)
    np.testing.assert_allclose(xt.mean(0), np.sqrt(alpha_bar) * x0, atol=5 * se_mean)
    np.testing.assert_allclose(xt.var(0), 1 - alpha_bar, atol=5 * se_var)

  def chain(t_last, key):
    def body(x, inputs):
      s, k = inputs
      return schedule.q_step(x, s, jax.random.normal(k, x.shape)), None
    keys = jax.random.split(key, t_last + 1)
    x, _ = jax.lax.scan(body, jnp.broadcast_to(x0, (n, 4)), (jnp.arange(t_last + 1), keys))
    return x

  for t in (4, 59):
    alpha_bar = float(schedule.alphas_cumprod[t])
    iterated = jax.jit(chain, static_argnums=0)(t, jax.random.key(100 + t, impl="rbg"))
    closed = schedule.q_sample(jnp.broadcast_to(x0, (n, 4)), t,
                               jax.random.normal(jax.random.key(200 + t, impl="rbg"), (n, 4)))
    se_mean, se_var = np.sqrt((1 - alpha_bar) / n), (1 - alpha_bar) * np.sqrt(2 / n)
    np.testing.assert_allclose(iterated.mean(0), np.sqrt(alpha_bar) * x0, atol=5 * se_mean)
    np.testing.assert_allclose(iterated.var(0), 1 - alpha_bar, atol=5 * se_var)
    # Same law: matching quantiles of the standardised samples, element by element.
    qs = np.linspace(0.05, 0.95, 7)
    standardise = lambda x: ((np.asarray(x) - np.sqrt(alpha_bar) * np.asarray(x0))
                             / np.sqrt(1 - alpha_bar))
    np.testing.assert_allclose(np.quantile(standardise(iterated), qs, axis=0),
                               np.quantile(standardise(closed), qs, axis=0), atol=0.04)


def test_schedule_from_diffusers_config():
  config = dict(EulerDiscreteScheduler(**SD, prediction_type="v_prediction").config)
  schedule = DiscreteSchedule.from_config(config)
  assert schedule == DiscreteSchedule(**SD)


def test_bad_schedule_inputs():
  with pytest.raises(ValueError, match="beta_schedule.*accepted"):
    DiscreteSchedule(beta_schedule="cosine")
  with pytest.raises(ValueError, match="num_train_timesteps"):
    DiscreteSchedule(num_train_timesteps=1)
  with pytest.raises(ValueError, match=r"\(0, 1\)"):
    DiscreteSchedule(beta_start=0.1, beta_end=1.5)
  with pytest.raises(ValueError, match="trained_betas"):
    DiscreteSchedule(trained_betas=[0.1, 0.2], num_train_timesteps=3)
  with pytest.raises(ValueError, match="timestep_spacing.*accepted"):
    schedules.spaced_timesteps(1000, 10, "uniform")
  for steps in (0, -3, 1001, 2.5, True):
    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 1000\]"):
      schedules.spaced_timesteps(1000, steps, "leading")
  with pytest.raises(ValueError, match="outside the schedule"):
    schedules.spaced_timesteps(1000, 1000, "leading", steps_offset=1)
