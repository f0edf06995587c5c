"""Samplers against diffusers' schedulers with a fixed analytic network, and the loop's contract."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parity import relative_error
from vldm.diffusion import samplers
from vldm.diffusion.parameterization import Denoiser
from vldm.diffusion.schedules import DiscreteSchedule

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 3, 6, 5)  # elementwise network: the layout does not matter
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SVD_EULER = dict(SD, prediction_type="v_prediction", use_karras_sigmas=True, sigma_min=0.002,
                 sigma_max=700.0, timestep_spacing="leading", timestep_type="continuous",
                 steps_offset=1, interpolation_type="linear")


def network_torch(x, t):
  """Nonlinear in x and t, bounded: every term of a step's update matters."""
  return (0.6 * torch.tanh(1.3 * x) + 0.25 * torch.sin(0.7 * x + 0.013 * t)
          + 0.1 * torch.cos(0.37 * t))


def network_jax(x, t):
  t = t.reshape((-1,) + (1,) * (x.ndim - 1))
  return 0.6 * jnp.tanh(1.3 * x) + 0.25 * jnp.sin(0.7 * x + 0.013 * t) + 0.1 * jnp.cos(0.37 * t)


# (id, sampler, diffusers class, config, steps, extra vldm options)
CASES = [
    ("ddim-eps", "ddim", "DDIMScheduler",
     dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1), 25, dict(eta=0.0)),
    ("ddim-v-eta", "ddim", "DDIMScheduler",
     dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
          prediction_type="v_prediction"), 20, dict(eta=0.7)),
    ("ddim-zero-snr-trailing", "ddim", "DDIMScheduler",
     dict(SD, clip_sample=False, timestep_spacing="trailing", rescale_betas_zero_snr=True,
          prediction_type="v_prediction"), 10, dict(eta=0.0)),
    ("ddim-cos-clip", "ddim", "DDIMScheduler",
     dict(beta_schedule="squaredcos_cap_v2", clip_sample=True, clip_sample_range=0.5,
          timestep_spacing="linspace",
          prediction_type="sample"), 12, dict(eta=1.0)),
    ("euler-svd", "euler", "EulerDiscreteScheduler", SVD_EULER, 25, {}),
    ("euler-eps", "euler", "EulerDiscreteScheduler", dict(SD), 30, {}),
    ("euler-zero-snr-karras", "euler", "EulerDiscreteScheduler",
     dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction", use_karras_sigmas=True,
          timestep_spacing="trailing"), 14, {}),
    ("euler-ancestral", "euler_ancestral", "EulerAncestralDiscreteScheduler", dict(SD), 20, {}),
    ("euler-ancestral-v-leading", "euler_ancestral", "EulerAncestralDiscreteScheduler",
     dict(SD, prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1), 15, {}),
    ("heun", "heun", "HeunDiscreteScheduler", dict(SD), 15, {}),
    ("heun-v-karras", "heun", "HeunDiscreteScheduler",
     dict(SD, prediction_type="v_prediction", use_karras_sigmas=True), 12, {}),
    ("dpmpp-2m-karras", "dpmpp_2m", "DPMSolverMultistepScheduler",
     dict(SD, use_karras_sigmas=True), 25, {}),
    ("dpmpp-2m-v", "dpmpp_2m", "DPMSolverMultistepScheduler",
     dict(SD, prediction_type="v_prediction"), 10, {}),
    ("dpmpp-2m-heun-trailing", "dpmpp_2m", "DPMSolverMultistepScheduler",
     dict(SD, solver_type="heun", timestep_spacing="trailing", lower_order_final=False,
          final_sigmas_type="sigma_min"), 16, {}),
    ("ddpm", "ddpm", "DDPMScheduler", dict(clip_sample=False), 50, {}),
    ("ddpm-sample-large", "ddpm", "DDPMScheduler",
     dict(SD, clip_sample=False, prediction_type="sample", variance_type="fixed_large",
          timestep_spacing="trailing"), 20, {}),
]


def _reference_noise(name, ref, plan, eta):
  """Draws both sides use: given to the sampler as step_noise and to diffusers."""
  calls = plan.num_model_calls
  if name == "ddim" and eta > 0:
    noise = np.random.default_rng(7).standard_normal((calls,) + SHAPE).astype(np.float32)
    return noise, lambda i: dict(eta=eta, variance_noise=torch.from_numpy(noise[i]))
  if name in ("ddpm", "euler_ancestral"):
    # diffusers draws randn from the generator at every step (DDPM: only where t > 0).
    gen = torch.Generator().manual_seed(123)
    draws = []
    for t in plan.timesteps:
      skip = name == "ddpm" and t == 0
      draw = np.zeros(SHAPE, np.float32) if skip else torch.randn(SHAPE, generator=gen).numpy()
      draws.append(draw)
    gen = torch.Generator().manual_seed(123)
    return np.stack(draws), lambda i: dict(generator=gen)
  return None, lambda i: dict(eta=eta) if name == "ddim" else {}


def _reference_run(ref, steps, x_start, step_kwargs, forced=None):
  """diffusers' denoising loop; with `forced`, each step starts from forced[i−1] (single steps)."""
  ref.set_timesteps(steps)
  x = torch.from_numpy(x_start) * ref.init_noise_sigma
  out = []
  for i, t in enumerate(ref.timesteps):
    if forced is not None and i > 0:
      x = torch.from_numpy(np.array(forced[i - 1]))
    model_output = network_torch(ref.scale_model_input(x, t), t.float())
    x = ref.step(model_output, t, x, **step_kwargs(i)).prev_sample
    out.append(x.numpy())
  return np.stack(out)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sampler_matches_diffusers(case):
  _, name, cls_name, config, steps, extra = case
  ref = getattr(diffusers, cls_name)(**config)
  config = dict(ref.config, _class_name=cls_name)  # as in scheduler_config.json
  sampler, schedule, options, prediction_type = samplers.from_scheduler_config(config)
  assert sampler == name
  options.update(extra)
  plan = samplers.make_plan(name, schedule, steps, **options)
  step_noise, step_kwargs = _reference_noise(name, ref, plan, options.get("eta", 0.0))

  x_start = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
  denoiser = Denoiser(network_jax, prediction_type)
  run = jax.jit(lambda x, n: samplers.run(plan, denoiser, x, step_noise=n, return_trajectory=True))
  final, trajectory = run(jnp.asarray(x_start),
                          None if step_noise is None else jnp.asarray(step_noise))
  trajectory = np.asarray(trajectory)

  expected = _reference_run(ref, steps, x_start, step_kwargs)
  assert trajectory.shape == expected.shape
  assert relative_error(final, expected[-1]) < 1e-5
  worst_step = max(relative_error(a, b) for a, b in zip(trajectory, expected))
  assert worst_step < 1e-5
  # Single steps: diffusers restarted from vldm's state before every step.
  if name == "ddpm" or name == "euler_ancestral":
    step_noise, step_kwargs = _reference_noise(name, ref, plan, 0.0)
  single = _reference_run(ref, steps, x_start, step_kwargs, forced=trajectory)
  assert max(relative_error(a, b) for a, b in zip(trajectory, single)) < 1e-5


# (id, sampler, diffusers class, config, steps, strength)
PARTIAL_CASES = [
    ("ddim-zero-snr-trailing", "ddim", "DDIMScheduler",
     dict(SD, clip_sample=False, timestep_spacing="trailing", rescale_betas_zero_snr=True,
          prediction_type="v_prediction"), 12, 0.5),
    ("ddim-eps-leading", "ddim", "DDIMScheduler",
     dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1), 25, 0.3),
    ("euler-karras-v", "euler", "EulerDiscreteScheduler",
     dict(SD, prediction_type="v_prediction", use_karras_sigmas=True), 20, 0.75),
    ("euler-svd", "euler", "EulerDiscreteScheduler", SVD_EULER, 25, 0.6),
]


@pytest.mark.parametrize("case", PARTIAL_CASES, ids=[c[0] for c in PARTIAL_CASES])
def test_partial_run_matches_diffusers_img2img(case):
  """SDEdit as diffusers' img2img pipelines run it: `get_timesteps` keeps the last
  ⌊N·strength⌋ steps, `add_noise` noises the clean input to the first of them."""
  _, name, cls_name, config, steps, strength = case
  ref = getattr(diffusers, cls_name)(**config)
  sampler, schedule, options, prediction_type = samplers.from_scheduler_config(
      dict(ref.config, _class_name=cls_name))
  plan = samplers.partial_plan(samplers.make_plan(sampler, schedule, steps, **options), strength)
  rng = np.random.default_rng(4)
  x0, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
  run = jax.jit(lambda x0, n: samplers.run(plan, Denoiser(network_jax, prediction_type), n,
                                           start=samplers.noise_to_start(plan, x0, n)))
  final = run(jnp.asarray(x0), jnp.asarray(noise))

  ref.set_timesteps(steps)  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
  t_start = max(steps - min(int(steps * strength), steps), 0)
  timesteps = ref.timesteps[t_start * ref.order:]
  if hasattr(ref, "set_begin_index"):
    ref.set_begin_index(t_start * ref.order)
  x = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps[:1])
  assert len(timesteps) == plan.num_model_calls
  for t in timesteps:
    x = ref.step(network_torch(ref.scale_model_input(x, t), t.float()), t, x).prev_sample
  assert relative_error(final, x.numpy()) < 1e-5


def test_partial_plan_inputs():
  schedule = DiscreteSchedule(**SD)
  plan = samplers.make_plan("ddim", schedule, 10)
  assert samplers.partial_plan(plan, 1.0).num_model_calls == 10
  assert samplers.partial_plan(plan, 0.35).num_model_calls == 3
  np.testing.assert_array_equal(samplers.partial_plan(plan, 0.35).timesteps, plan.timesteps[7:])
  for strength in (0.0, 0.05, 1.5, -1):
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\].*≥ 0.1"):
      samplers.partial_plan(plan, strength)
  for name in ("heun", "dpmpp_2m"):
    with pytest.raises(ValueError, match=f"Sampler '{name}' cannot start part-way"):
      samplers.partial_plan(samplers.make_plan(name, schedule, 10), 0.5)


def test_sample_equals_run_of_plan_and_is_deterministic_per_key():
  schedule = DiscreteSchedule(**SD)
  denoiser = Denoiser(network_jax, "epsilon")
  noise = jnp.asarray(np.random.default_rng(0).standard_normal(SHAPE), jnp.float32)
  plan = samplers.make_plan("euler_ancestral", schedule, 8)

  @jax.jit
  def both(key):  # a default (threefry) key
    return (samplers.sample("euler_ancestral", denoiser, noise, schedule, 8, key),
            samplers.run(plan, denoiser, noise, key))

  a, b = both(jax.random.PRNGKey(1))
  c, _ = both(jax.random.PRNGKey(2))
  np.testing.assert_array_equal(a, b)
  assert np.all(np.isfinite(a)) and not np.allclose(a, c)


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_loop_traces_model_once_and_compiles_once(name):
  schedule = DiscreteSchedule(**SD)
  calls = []

  def network(x, t):
    calls.append(x.shape)
    return 0.1 * x + jnp.sin(t)[:, None, None, None]

  denoiser = Denoiser(network, "epsilon")
  fn = jax.jit(lambda x, key: samplers.sample(name, denoiser, x, schedule, 6, key))
  key = lambda seed: jax.random.key(seed, impl="rbg")  # quick to compile on CPU
  fn(jnp.ones(SHAPE), key(0)).block_until_ready()
  fn(2 * jnp.ones(SHAPE), key(3)).block_until_ready()
  assert calls == [SHAPE]  # one trace of the model inside the scan, never per step
  assert fn._cache_size() == 1


def test_zero_snr_ddim_first_step_is_exact():
  """At ᾱ = 0 a v-model's x0 is −v: the VP samplers must not lose it to σ = ∞."""
  schedule = DiscreteSchedule(**SD, rescale_betas_zero_snr=True)
  denoiser = Denoiser(lambda x, t: jnp.full_like(x, 0.5), "v_prediction")
  plan = samplers.make_plan("ddim", schedule, 1, timestep_spacing="trailing")
  assert plan.timesteps[0] == 999 and plan.arrays["alpha_bar"][0] == 0
  out = samplers.run(plan, denoiser, jnp.ones(SHAPE))
  # One step from t = 999 to ᾱ_prev = 1: the result is x0 = −v.
  np.testing.assert_allclose(out, -0.5, atol=1e-6)


def test_from_scheduler_config_svd():
  config = dict(diffusers.EulerDiscreteScheduler(**SVD_EULER).config,
                _class_name="EulerDiscreteScheduler")
  name, schedule, options, prediction_type = samplers.from_scheduler_config(config)
  assert (name, prediction_type) == ("euler", "v_prediction")
  assert options["timestep_type"] == "continuous" and options["use_karras_sigmas"]
  plan = samplers.make_plan(name, schedule, 25, **options)
  assert plan.sigmas[0] == pytest.approx(700.0) and plan.sigmas[-1] == 0
  np.testing.assert_allclose(plan.timesteps, 0.25 * np.log(plan.sigmas[:-1]), rtol=1e-6)
  assert plan.init_noise_sigma == pytest.approx(np.sqrt(700.0**2 + 1))


def test_bad_sampler_inputs():
  schedule = DiscreteSchedule(**SD)
  denoiser = Denoiser(network_jax, "epsilon")
  noise = jnp.zeros(SHAPE)
  with pytest.raises(ValueError, match=r"Unknown sampler 'plms'; accepted: \('ddpm', 'ddim'"):
    samplers.sample("plms", denoiser, noise, schedule, 10)
  for steps in (0, 1001, -1, 2.0):
    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 1000\]"):
      samplers.make_plan("euler", schedule, steps)
  with pytest.raises(ValueError, match="outside the schedule"):
    samplers.make_plan("ddim", schedule, 1000, steps_offset=1)
  with pytest.raises(ValueError, match="repeated timesteps"):
    samplers.make_plan("dpmpp_2m", schedule, 1000)
  with pytest.raises(ValueError, match=r"Unknown option\(s\) \['eta'\] for sampler 'euler'"):
    samplers.make_plan("euler", schedule, 10, eta=0.5)
  with pytest.raises(ValueError, match="timestep_spacing.*accepted"):
    samplers.make_plan("ddim", schedule, 10, timestep_spacing="uniform")
  with pytest.raises(ValueError, match="solver_order"):
    samplers.make_plan("dpmpp_2m", schedule, 10, solver_order=3)
  with pytest.raises(ValueError, match="Only one of"):
    samplers.make_plan("euler", schedule, 10, use_karras_sigmas=True, use_exponential_sigmas=True)
  with pytest.raises(ValueError, match="variance_type"):
    samplers.make_plan("ddpm", schedule, 10, variance_type="learned")
  with pytest.raises(ValueError, match="eta must be"):
    samplers.make_plan("ddim", schedule, 10, eta=-0.1)
  with pytest.raises(ValueError, match="DiscreteSchedule"):
    samplers.make_plan("ddim", {"num_train_timesteps": 1000}, 10)
  with pytest.raises(ValueError, match="stochastic: pass rng"):
    samplers.sample("ddim", denoiser, noise, schedule, 10, eta=0.5)
  with pytest.raises(ValueError, match="step_noise must have shape"):
    samplers.sample("ddpm", denoiser, noise, schedule, 10, step_noise=jnp.zeros((9,) + SHAPE))
  with pytest.raises(ValueError, match="Unsupported scheduler class 'PNDMScheduler'"):
    samplers.from_scheduler_config({"_class_name": "PNDMScheduler"})
  with pytest.raises(ValueError, match="algorithm_type"):
    samplers.from_scheduler_config({"_class_name": "DPMSolverMultistepScheduler",
                                    "algorithm_type": "sde-dpmsolver++"})
  with pytest.raises(ValueError, match="needs the schedule timestep"):
    Denoiser(network_jax, "epsilon")(noise, 1.0)


def test_svd_euler_with_the_v_edm_denoiser():
  """SVD's EDM-style denoiser (c_noise = ¼ ln σ computed from σ) gives diffusers' SVD trajectory."""
  ref = diffusers.EulerDiscreteScheduler(**SVD_EULER)
  name, schedule, options, _ = samplers.from_scheduler_config(
      dict(ref.config, _class_name="EulerDiscreteScheduler"))
  x_start = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
  final = jax.jit(lambda x: samplers.sample(name, Denoiser(network_jax, "v_edm"), x, schedule, 25,
                                            **options))(jnp.asarray(x_start))
  expected = _reference_run(ref, 25, x_start, lambda i: {})
  assert relative_error(final, expected[-1]) < 1e-5


def test_parameterization_scalings_and_conversions():
  from vldm.diffusion import parameterization as P
  sigma = np.asarray([0.002, 0.3, 1.0, 14.6, 700.0], np.float32)
  root = np.sqrt(sigma**2 + 1)
  table = {
      "epsilon": (np.ones_like(sigma), -sigma, 1 / root),
      "v_prediction": (1 / (sigma**2 + 1), -sigma / root, 1 / root),
      "sample": (np.zeros_like(sigma), np.ones_like(sigma), 1 / root),
      # sgm VScalingWithEDMcNoise (SVD)
      "v_edm": (1 / (sigma**2 + 1), -sigma / root, 1 / root),
      "edm": (0.25 / (sigma**2 + 0.25), sigma * 0.5 / np.sqrt(sigma**2 + 0.25),
              1 / np.sqrt(sigma**2 + 0.25)),
  }
  for kind, expected in table.items():
    for got, want in zip(P.Parameterization(kind).scalings(sigma), expected):
      np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(P.Parameterization("v_edm").c_noise(sigma), 0.25 * np.log(sigma),
                             rtol=1e-6)
  np.testing.assert_allclose(P.Parameterization("epsilon").c_noise(sigma, t=7.0), 7.0)

  # ε ↔ x0 ↔ v at x_t = √ᾱ x0 + √(1−ᾱ) ε, and v as diffusers' get_velocity.
  rng = np.random.default_rng(0)
  x0, eps = (jnp.asarray(rng.standard_normal((4, 3, 2, 2)), jnp.float32) for _ in range(2))
  schedule = DiscreteSchedule(**SD)
  t = np.asarray([0, 250, 600, 999])
  alpha_bar = schedule.alpha_bar(jnp.asarray(t))
  x_t = schedule.q_sample(x0, jnp.asarray(t), eps)
  v = P.velocity(x0, eps, alpha_bar)
  ref_v = diffusers.DDPMScheduler(**SD).get_velocity(
      torch.from_numpy(np.array(x0)), torch.from_numpy(np.array(eps)), torch.from_numpy(t))
  assert relative_error(v, ref_v.numpy()) < 1e-6
  preds = {"epsilon": eps, "v_prediction": v, "sample": x0}
  for source, pred in preds.items():
    for target, want in preds.items():
      got = P.convert_prediction(pred, x_t, alpha_bar, source, target)
      np.testing.assert_allclose(got, want, atol=2e-5,
                                 err_msg=f"{source} → {target}")

  # The denoiser recovers x0 from an exact prediction, given (σ, t) or σ alone with a schedule.
  sigma_t = schedule.sigma(jnp.asarray(t, jnp.float32))
  x_ve = x_t * jnp.sqrt(1 + sigma_t**2)[:, None, None, None]
  for kind, pred in preds.items():
    exact = lambda x_in, c_noise, pred=pred: pred
    np.testing.assert_allclose(Denoiser(exact, kind)(x_ve, sigma_t, t), x0, atol=2e-5)
  seen = []
  Denoiser(lambda x_in, c: seen.append(c) or x_in, "epsilon", schedule)(x_ve, sigma_t)
  np.testing.assert_allclose(seen[0], t, atol=1e-2)
