"""layers.Conv2D: the im2col matmul taken for inputs narrower than the kernel computes the same
convolution as the convolution op (and as torch's Conv2d), and the choice follows the shapes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vldm.models import layers
from parity import relative_error


def test_matmul_is_chosen_only_below_the_kernel_size():
  assert layers.conv_as_matmul(2, 2, 3, 1, 1)
  assert layers.conv_as_matmul(4, 4, 3, 2, 1)  # the output is 2×2
  assert layers.conv_as_matmul(8, 1, 3, 1, 1)
  assert not layers.conv_as_matmul(3, 3, 3, 1, 1)
  assert not layers.conv_as_matmul(16, 16, 3, 2, 1)
  assert not layers.conv_as_matmul(1, 1, 1)  # a 1×1 conv is a matmul already


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((2, 2, 2, 5), 3, 1, 1), ((3, 4, 2, 5), 3, 1, 1), ((2, 4, 4, 5), 3, 2, 1),
    ((2, 3, 3, 5), 3, 2, 0), ((1, 2, 2, 4), 4, 2, 1), ((2, 3, 1, 1, 5), 3, 1, 1)])
def test_matmul_path_equals_the_convolution(shape, kernel, stride, padding):
  x = jax.random.normal(jax.random.key(0), shape)
  module = layers.Conv2D(6, kernel, stride=stride, padding=padding)
  params = module.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, params)["params"] == {"kernel": (kernel, kernel, shape[-1], 6),
                                                       "bias": (6,)}
  params = jax.tree.map(lambda p: p + 0.1, params)
  flat = x.reshape((-1,) + shape[-3:])
  expected = jax.lax.conv_general_dilated(
      flat, params["params"]["kernel"], (stride, stride), ((padding, padding),) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["params"]["bias"]
  out = jax.jit(module.apply)(params, x)
  assert out.shape == shape[:-3] + expected.shape[1:]
  assert relative_error(out.reshape(expected.shape), expected) < 1e-5
  # Gradients too (the training step differentiates through the matmul path).
  grad = jax.grad(lambda p, x: jnp.sum(module.apply(p, x) ** 2), (0, 1))
  conv_grad = jax.grad(lambda p, x: jnp.sum((jax.lax.conv_general_dilated(
      x.reshape(flat.shape), p["params"]["kernel"], (stride, stride), ((padding, padding),) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["params"]["bias"]) ** 2), (0, 1))
  for a, b in zip(jax.tree.leaves(grad(params, x)), jax.tree.leaves(conv_grad(params, x))):
    assert relative_error(a, b) < 1e-5


def test_small_input_matches_torch_conv2d():
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  reference = torch.nn.Conv2d(8, 4, 3, padding=1)
  x = np.random.default_rng(0).standard_normal((3, 8, 2, 2)).astype(np.float32)
  expected = reference(torch.from_numpy(x)).detach().numpy().transpose(0, 2, 3, 1)
  params = {"params": {
      "kernel": jnp.asarray(reference.weight.detach().numpy().transpose(2, 3, 1, 0)),
      "bias": jnp.asarray(reference.bias.detach().numpy())}}
  out = jax.jit(layers.Conv2D(4, 3, padding=1).apply)(params, x.transpose(0, 2, 3, 1))
  assert relative_error(out, expected) < 1e-5
