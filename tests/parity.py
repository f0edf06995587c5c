"""Helpers for parity tests against PyTorch reference models (diffusers / transformers)."""

import numpy as np


def relative_error(actual, expected) -> float:
  """max |actual − expected| / max |expected|: the worst element, scaled by the output's range."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


def perturb_(torch_model, seed: int = 0, scale: float = 0.1):
  """Adds noise to every parameter and buffer-free weight in place, so that zero-initialised
  layers, unit norms and zero biases cannot hide a wrong mapping."""
  import torch  # pylint: disable=g-import-not-at-top

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in torch_model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
  return torch_model.eval()


def he_init_(torch_model, seed: int):
  """He-normal (ReLU) weights for every convolution, in place. PyTorch's default init (a fraction
  of He's std) shrinks the activations of a deep ReLU network layer by layer until the output
  hardly depends on the input, and then any weight mapping passes a parity test."""
  import torch  # pylint: disable=g-import-not-at-top

  gen = torch.Generator().manual_seed(seed)
  convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
  with torch.no_grad():
    for m in torch_model.modules():
      if isinstance(m, convs):
        torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=gen)
  return torch_model


def calibrate_batch_norms_(torch_model, x, seed: int):
  """Every BatchNorm's running statistics from one train-mode pass on `x`, then perturbed; returns
  the model in eval mode.

  Calibrated statistics keep activations O(1) through a deep network (random ones make the output
  vanish, explode or forget its input); the perturbation makes a swapped mean / var or a wrong eps
  show."""
  import torch  # pylint: disable=g-import-not-at-top

  gen = torch.Generator().manual_seed(seed)
  norms = [m for m in torch_model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]  # pylint: disable=protected-access
  for m in norms:
    m.momentum = 1.0  # running statistics := this batch's
  torch_model.train()
  with torch.no_grad():
    torch_model(x)
    for m in norms:
      n = m.num_features
      m.running_mean.add_(0.2 * m.running_var.sqrt() * torch.randn(n, generator=gen))
      m.running_var.mul_(0.5 + 1.5 * torch.rand(n, generator=gen))
  return torch_model.eval()


def video_unet_inputs(frames, channels, context_dim, size, tokens, seed=0):
  """(sample [2, F, size, size, C], timesteps [2], context per clip [2, tokens, D]) for a video
  UNet, float32."""
  rng = np.random.default_rng(seed)
  return (
      rng.standard_normal((2, frames, size, size, channels)).astype(np.float32),
      np.array([10, 500]),
      rng.standard_normal((2, tokens, context_dim)).astype(np.float32),
  )


def diffusers_video_unet_out(model, sample, timesteps, context, context_per_frame: bool):
  """A diffusers video UNet (sample (B, C, F, H, W)) on vldm's channels-last inputs; the per-clip
  context repeated per frame (batch-major, frames inner) where the class wants it so."""
  import torch  # pylint: disable=g-import-not-at-top

  if context_per_frame:
    context = np.repeat(context, sample.shape[1], axis=0)
  with torch.no_grad():
    out = model(
        torch.from_numpy(np.moveaxis(sample, -1, 1)),
        torch.from_numpy(timesteps),
        torch.from_numpy(context),
    ).sample.numpy()
  return np.moveaxis(out, 1, -1)


def to_nhwc(x):
  """(B, C, H, W) or (B, C, F, H, W) torch/numpy → channels-last numpy."""
  x = np.asarray(x.detach().numpy() if hasattr(x, "detach") else x)
  return np.moveaxis(x, 1, -1)


def to_nchw(x):
  x = np.asarray(x)
  return np.moveaxis(x, -1, 1)


def jit_quick(fn, **kwargs):
  """jax.jit that skips LLVM's optimisations: for tiny test models they cost more compile time
  than they save in run time."""
  import jax  # pylint: disable=g-import-not-at-top

  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kwargs)


def random_params(module, seed):
  """Random weights of `module`'s init shapes (host-side, nothing to compile): unit-variance
  outputs, norm scales near 1, non-zero biases."""
  import jax  # pylint: disable=g-import-not-at-top

  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.example_inputs()))
  rng = np.random.default_rng(seed)

  def leaf(path, shape):
    noise = rng.standard_normal(shape.shape).astype(np.float32)
    name = path[-1].key
    if name == "kernel":
      return noise / np.float32(np.sqrt(np.prod(shape.shape[:-1])))
    return 1 + 0.1 * noise if name == "scale" else 0.1 * noise

  return jax.tree_util.tree_map_with_path(leaf, shapes["params"])
