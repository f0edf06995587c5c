"""Training losses: weightings, shapes, targets (a perfect model scores zero), σ sampling."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vldm.diffusion import losses
from vldm.diffusion.parameterization import Denoiser, Parameterization
from vldm.diffusion.schedules import DiscreteSchedule

SD = DiscreteSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
ZERO_SNR = DiscreteSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            rescale_betas_zero_snr=True)
VIDEO = (3, 4, 5, 6, 2)  # [B, F, H, W, C]


def key(seed):
  # RBG keys compile much faster than threefry on CPU; the loss is agnostic to the key type.
  return jax.random.key(seed, impl="rbg")


def _latents(shape=VIDEO, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_min_snr_weights_match_the_train_script_formulas():
  snr = np.asarray([0.0, 1e-3, 0.5, 1.0, 4.99, 5.0, 7.0, 300.0], np.float32)
  gamma = 5.0
  clipped = np.minimum(snr, gamma)  # diffusers: stack([snr, γ]).min(dim=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    eps = np.where(snr > 0, clipped / snr, 1.0)
  np.testing.assert_allclose(losses.min_snr_weight(snr, gamma, "epsilon"), eps, rtol=1e-6)
  np.testing.assert_allclose(losses.min_snr_weight(snr, gamma, "v_prediction"), clipped / (snr + 1),
                             rtol=1e-6)
  np.testing.assert_allclose(losses.min_snr_weight(snr, gamma, "sample"), clipped, rtol=1e-6)
  # Clipping: above γ the x0 weight is γ, below it the weight on ε is 1.
  assert losses.min_snr_weight(300.0, gamma, "sample") == gamma
  assert losses.min_snr_weight(0.5, gamma, "epsilon") == 1.0
  assert losses.min_snr_weight(300.0, gamma, "epsilon") == pytest.approx(gamma / 300.0)


def test_edm_weight_formula():
  sigma = np.asarray([0.002, 0.1, 0.5, 1.0, 80.0])
  for sigma_data in (0.5, 1.0):
    np.testing.assert_allclose(losses.edm_weight(sigma, sigma_data),
                               (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2, rtol=1e-6)
  # On the 'edm' network output the weight λ(σ) c_out² is exactly 1 (EDM's design).
  c_out = Parameterization("edm").scalings(sigma)[1]
  np.testing.assert_allclose(losses.edm_weight(sigma, 0.5) * c_out**2, 1.0, rtol=1e-5)


def _perfect_model(kind, schedule, x0):
  """Returns the true target, recovered from (x_in, t) and the clean x0 the test knows."""
  param = Parameterization(kind)

  def model(x_in, t):
    if param.continuous_noise:
      sigma = jnp.exp(4 * t)  # t = c_noise = ¼ ln σ
      c_skip, c_out, c_in = (c.reshape((-1,) + (1,) * (x0.ndim - 1)) for c in param.scalings(sigma))
      return (x0 - c_skip * x_in / c_in) / c_out
    alpha_bar = jnp.asarray(schedule.alphas_cumprod)[t.astype(jnp.int32)]
    a = jnp.sqrt(alpha_bar).reshape((-1,) + (1,) * (x0.ndim - 1))
    s = jnp.sqrt(1 - alpha_bar).reshape(a.shape)
    if kind == "epsilon":
      return (x_in - a * x0) / s
    if kind == "v_prediction":
      return (a * x_in - x0) / s
    return x0

  return model


@pytest.mark.parametrize("kind,sampling,schedule,offset,weighting", [
    ("epsilon", "uniform", SD, 0.0, "min_snr"),
    ("v_prediction", "uniform", ZERO_SNR, 0.1, "min_snr"),
    ("sample", "uniform", SD, 0.0, "uniform"),
    ("edm", "lognormal", None, 0.1, "edm"),
    ("v_edm", "lognormal", None, 0.0, "edm"),
    ("v_edm", "uniform", SD, 0.0, "min_snr"),
])
def test_perfect_model_has_zero_loss(kind, sampling, schedule, offset, weighting):
  x0 = _latents()
  kw = dict(parameterization=kind, schedule=schedule, noise_sampling=sampling,
            weighting=weighting, offset_noise=offset)

  @jax.jit
  def run(rng):
    perfect = losses.diffusion_loss(_perfect_model(kind, schedule, x0), x0, rng, **kw)
    wrong = losses.diffusion_loss(lambda x, t: jnp.zeros_like(x), x0, rng, **kw)
    return perfect, wrong[0]

  (loss, aux), wrong_loss = run(key(4))
  assert loss.shape == (VIDEO[0],)
  assert np.all(np.isfinite(aux["weight"]))
  np.testing.assert_allclose(loss, 0.0, atol=1e-8)
  assert np.all(wrong_loss > 1e-4)  # and a wrong model does not score zero


def test_per_example_and_per_frame_shapes_and_weights():
  x0 = _latents()
  model = lambda x, t: 0.3 * x + 0.01 * t[:, None, None, None, None]

  @jax.jit
  def both(rng):
    kw = dict(parameterization="v_prediction", schedule=SD, weighting="min_snr", min_snr_gamma=5.0)
    return (losses.diffusion_loss(model, x0, rng, **kw),
            losses.diffusion_loss(model, x0, rng, per_frame=True, **kw))

  (loss, aux), (frame_loss, frame_aux) = both(key(0))
  b, f = VIDEO[:2]
  assert loss.shape == (b,) and aux["mse"].shape == (b,)
  assert frame_loss.shape == (b, f) and frame_aux["mse"].shape == (b, f)
  for name in ("t", "sigma", "snr", "weight"):
    assert aux[name].shape == (b,)
  np.testing.assert_allclose(frame_loss.mean(axis=1), loss, rtol=1e-5)
  np.testing.assert_allclose(aux["weight"], losses.min_snr_weight(aux["snr"], 5.0, "v_prediction"))
  np.testing.assert_allclose(loss, aux["weight"] * aux["mse"], rtol=1e-6)
  t = np.asarray(aux["t"]).astype(int)
  alpha_bar = SD.alphas_cumprod[t]
  np.testing.assert_allclose(aux["snr"], alpha_bar / (1 - alpha_bar), rtol=1e-6)


def test_weightings_are_x0_space_weights():
  """min-SNR and EDM weights on the network output equal the stated weights on ‖D − x0‖²."""
  x0 = _latents((64, 3, 3, 2))
  model = lambda x, t: jnp.tanh(x) * 0.7 + 0.1 * jnp.cos(t)[:, None, None, None]
  expand = lambda v: v[:, None, None, None]

  @jax.jit
  def run(rng):
    eps_loss, eps_aux = losses.diffusion_loss(model, x0, rng, parameterization="epsilon",
                                              schedule=SD, weighting="min_snr", min_snr_gamma=5.0)
    edm_loss, edm_aux = losses.diffusion_loss(model, x0, rng, parameterization="edm",
                                              weighting="edm", noise_sampling="lognormal")
    noise = jax.random.normal(jax.random.split(rng, 3)[1], x0.shape)  # the loss's own draw
    # ε: x0_pred = (x_t − √(1−ᾱ) ε̂)/√ᾱ, weight min(SNR, γ) on its error.
    alpha_bar = expand(jnp.asarray(SD.alphas_cumprod)[eps_aux["t"].astype(jnp.int32)])
    x_t = jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1 - alpha_bar) * noise
    x0_pred = (x_t - jnp.sqrt(1 - alpha_bar) * model(x_t, eps_aux["t"])) / jnp.sqrt(alpha_bar)
    eps_expected = jnp.minimum(eps_aux["snr"], 5.0) * jnp.mean((x0_pred - x0) ** 2, axis=(1, 2, 3))
    # EDM: λ(σ) ‖D(x, σ) − x0‖² with the Denoiser the samplers use.
    sigma = edm_aux["sigma"]
    denoised = Denoiser(model, "edm")(x0 + expand(sigma) * noise, sigma)
    edm_expected = losses.edm_weight(sigma, 0.5) * jnp.mean((denoised - x0) ** 2, axis=(1, 2, 3))
    return eps_loss, eps_expected, edm_loss, edm_expected

  eps_loss, eps_expected, edm_loss, edm_expected = run(key(1))
  np.testing.assert_allclose(eps_loss, eps_expected, rtol=2e-3)
  np.testing.assert_allclose(edm_loss, edm_expected, rtol=1e-3)


def test_noise_level_sampling_statistics():
  n = 200_000
  sigma = losses.sample_lognormal_sigmas(key(0), n, p_mean=-1.2, p_std=1.2)
  log_sigma = np.log(np.asarray(sigma))
  assert abs(log_sigma.mean() + 1.2) < 5 * 1.2 / np.sqrt(n)
  assert abs(log_sigma.std() - 1.2) < 0.01
  t = np.asarray(losses.sample_timesteps(key(1), n, 1000))
  assert t.min() == 0 and t.max() == 999
  counts = np.bincount(t // 100, minlength=10)
  np.testing.assert_allclose(counts / n, 0.1, atol=0.005)


def test_offset_noise_is_per_channel_and_broadcast():
  rng = key(2)
  video, image = jnp.zeros((6, 4, 5, 5, 3)), jnp.zeros((6, 5, 5, 3))
  assert losses.offset_noise_like(rng, video, 0.1).shape == (6, 1, 1, 1, 3)
  assert losses.offset_noise_like(rng, image, 0.1).shape == (6, 1, 1, 3)
  # A zero ε-model's loss is the noise power: 1 + offset².
  x0 = jnp.zeros((512, 2, 4, 4, 3))
  loss, _ = jax.jit(functools.partial(
      losses.diffusion_loss, lambda x, t: jnp.zeros_like(x), schedule=SD, offset_noise=0.5))(
          x0, key(3))
  assert float(loss.mean()) == pytest.approx(1.25, abs=0.05)


def test_bad_loss_inputs():
  x0, rng, model = _latents(), key(0), lambda x, t: x
  with pytest.raises(ValueError, match="weighting.*accepted"):
    losses.diffusion_loss(model, x0, rng, schedule=SD, weighting="p2")
  with pytest.raises(ValueError, match="noise_sampling.*accepted"):
    losses.diffusion_loss(model, x0, rng, schedule=SD, noise_sampling="cosine")
  with pytest.raises(ValueError, match="prediction_type.*accepted"):
    losses.diffusion_loss(model, x0, rng, schedule=SD, parameterization="flow")
  with pytest.raises(ValueError, match="per_frame needs video latents"):
    losses.diffusion_loss(model, x0[:, 0], rng, schedule=SD, per_frame=True)
  with pytest.raises(ValueError, match="needs a DiscreteSchedule"):
    losses.diffusion_loss(model, x0, rng, parameterization="epsilon")
  with pytest.raises(ValueError, match="min_snr weighting"):
    losses.min_snr_weight(1.0, 5.0, "edm")
