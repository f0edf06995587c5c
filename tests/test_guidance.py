"""Classifier-free guidance wrappers: one batched call, the combinations, SVD's frame scale."""
import jax.numpy as jnp
import numpy as np
import pytest

from vldm.diffusion import guidance
from vldm.diffusion.parameterization import Denoiser

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

B, F, H, W, C = 2, 5, 3, 4, 4


class RecordingNetwork:
  """A conditional network out = tanh(x)·(1 + cond.mean) + 0.01 t, recording its call shapes."""

  def __init__(self):
    self.calls = []

  def __call__(self, x, t, cond):
    self.calls.append((x.shape, t.shape))
    scale = 1 + cond["text"].mean(axis=(1, 2)) + cond["image"].mean(axis=tuple(range(1, x.ndim)))
    shape = (-1,) + (1,) * (x.ndim - 1)
    return jnp.tanh(x) * scale.reshape(shape) + 0.01 * t.reshape(shape)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((B, F, H, W, C)), jnp.float32)
  t = jnp.asarray([3.0, 500.0])
  cond = {"text": jnp.asarray(rng.standard_normal((B, 7, 8)), jnp.float32),
          "image": jnp.asarray(rng.standard_normal((B, F, H, W, C)), jnp.float32)}
  uncond = {"text": jnp.zeros((B, 7, 8)), "image": jnp.zeros((B, F, H, W, C))}
  image_only = {"text": jnp.zeros((B, 7, 8)), "image": cond["image"]}
  return x, t, cond, uncond, image_only


def test_scale_one_is_the_conditional_output():
  x, t, cond, uncond, _ = _inputs()
  net = RecordingNetwork()
  out = guidance.classifier_free_guidance(net, cond, uncond, 1.0)(x, t)
  np.testing.assert_array_equal(out, net(x, t, cond))
  assert net.calls[0][0] == x.shape  # the unconditional branch was skipped
  ones = guidance.classifier_free_guidance(net, cond, uncond, jnp.ones((B, F)))(x, t)
  np.testing.assert_allclose(ones, net(x, t, cond), rtol=1e-6, atol=1e-6)


def test_cfg_formula_and_a_single_batched_call():
  x, t, cond, uncond, _ = _inputs()
  net = RecordingNetwork()
  out = guidance.classifier_free_guidance(net, cond, uncond, 7.5)(x, t)
  assert net.calls == [((2 * B, F, H, W, C), (2 * B,))]
  u, c = net(x, t, uncond), net(x, t, cond)
  np.testing.assert_allclose(out, u + 7.5 * (c - u), rtol=1e-6, atol=1e-6)
  # The branches are batched unconditional first, as diffusers' pipelines concatenate them.
  both = guidance.batched_branches(net, [uncond, cond])(x, t)
  np.testing.assert_allclose(both[0], u, rtol=1e-6)
  np.testing.assert_allclose(both[1], c, rtol=1e-6)


def test_dual_guidance_matches_instruct_pix2pix():
  x, t, cond, uncond, image_only = _inputs(1)
  net = RecordingNetwork()
  out = guidance.dual_guidance(net, cond, image_only, uncond, 7.5, 1.5)(x, t)
  assert net.calls == [((3 * B, F, H, W, C), (3 * B,))]
  # diffusers' StableDiffusionInstructPix2PixPipeline: chunk(3) of one call, then this sum.
  text, image, none = (torch.from_numpy(np.array(net(x, t, c))) for c in (cond, image_only, uncond))
  expected = none + 7.5 * (text - image) + 1.5 * (image - none)
  np.testing.assert_allclose(out, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_svd_frame_guidance_scale():
  from diffusers.pipelines.stable_video_diffusion import pipeline_stable_video_diffusion as svd
  _append_dims = svd._append_dims
  for frames, low, high in ((14, 1.0, 3.0), (25, 1.0, 2.5), (5, 1.5, 4.0), (1, 1.0, 3.0)):
    scale = guidance.frame_guidance_scale(low, high, frames, batch_size=3)
    # The pipeline: linspace(min, max, F).unsqueeze(0), repeated over the batch, dims appended.
    expected = torch.linspace(low, high, frames).unsqueeze(0).repeat(3, 1)
    assert scale.shape == (3, frames) and scale.dtype == jnp.float32
    np.testing.assert_allclose(scale, expected.numpy(), rtol=1e-6)
  # Applied per frame: frame f of every example uses scale[f] (latents [B, F, H, W, C]).
  x, t, cond, uncond, _ = _inputs(2)
  net = RecordingNetwork()
  scale = guidance.frame_guidance_scale(1.0, 3.0, F, batch_size=B)
  out = guidance.classifier_free_guidance(net, cond, uncond, scale)(x, t)
  u = torch.from_numpy(np.array(net(x, t, uncond))).permute(0, 1, 4, 2, 3)  # torch (B,F,C,H,W)
  c = torch.from_numpy(np.array(net(x, t, cond))).permute(0, 1, 4, 2, 3)
  torch_scale = _append_dims(torch.linspace(1.0, 3.0, F).unsqueeze(0).repeat(B, 1), 5)
  expected = (u + torch_scale * (c - u)).permute(0, 1, 3, 4, 2).numpy()
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[:, 0], np.asarray(net(x, t, cond))[:, 0], rtol=1e-5, atol=1e-6)


def test_guided_network_plugs_into_the_denoiser():
  x, _, cond, uncond, _ = _inputs(3)
  net = RecordingNetwork()
  guided = guidance.classifier_free_guidance(net, cond, uncond, 2.0)
  denoised = Denoiser(guided, "v_edm")(x, 1.7)
  c_skip, c_out = 1 / (1.7**2 + 1), -1.7 / np.sqrt(1.7**2 + 1)
  x_in = x / np.sqrt(1.7**2 + 1)
  t = jnp.full((B,), 0.25 * np.log(1.7), jnp.float32)
  u, c = net(x_in, t, uncond), net(x_in, t, cond)
  np.testing.assert_allclose(denoised, c_skip * x + c_out * (u + 2 * (c - u)), rtol=1e-5, atol=1e-6)


def test_bad_guidance_inputs():
  with pytest.raises(ValueError, match="num_frames"):
    guidance.frame_guidance_scale(1.0, 3.0, 0)
