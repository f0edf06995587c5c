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
