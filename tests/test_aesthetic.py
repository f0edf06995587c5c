"""vldm's LAION aesthetic MLP vs the original PyTorch layer list at random weights, float32."""

import jax
import numpy as np
import pytest
import torch

from parity import perturb_, relative_error
from vldm.convert import core
from vldm.convert import torch_state
from vldm.models import aesthetic

TOL = 1e-5


def _reference(width):
  """improved-aesthetic-predictor's `MLP.layers` (simple_inference.py; its ReLUs commented out)."""
  nn = torch.nn
  return nn.Sequential(
      nn.Linear(width, 1024),
      nn.Dropout(0.2),
      nn.Linear(1024, 128),
      nn.Dropout(0.2),
      nn.Linear(128, 64),
      nn.Dropout(0.1),
      nn.Linear(64, 16),
      nn.Linear(16, 1),
  )


def _normalized(a, axis=-1, order=2):
  """The original script's normalisation of CLIP embeddings (zero rows divided by 1)."""
  l2 = np.atleast_1d(np.linalg.norm(a, order, axis))
  l2[l2 == 0] = 1
  return a / np.expand_dims(l2, axis)


class _Layers(torch.nn.Module):
  """Keys `layers.*`, as in the published state dict (the original `MLP.layers`)."""

  def __init__(self, width):
    super().__init__()
    self.layers = _reference(width)

  def forward(self, x):
    return self.layers(x)


@pytest.fixture(scope="module", name="case")
def _case(tmp_path_factory):
  torch.manual_seed(0)
  ref = perturb_(_Layers(aesthetic.CLIP_L14_WIDTH), seed=1)
  path = tmp_path_factory.mktemp("aesthetic") / "mlp.pth"
  torch.save(ref.state_dict(), path)
  params = torch_state.load_aesthetic_params(str(path))
  apply = jax.jit(aesthetic.AestheticMLP().apply)
  return ref, params, apply


def _score(ref, embeds):
  with torch.no_grad():
    return ref(torch.from_numpy(np.asarray(embeds, np.float32))).numpy()[..., 0]


def test_matches_pytorch(case):
  ref, params, apply = case
  embeds = 5 * np.random.default_rng(0).standard_normal((4, aesthetic.CLIP_L14_WIDTH))
  want = _score(ref, _normalized(embeds))
  assert np.ptp(want) > 0.05 * np.abs(want).max()  # distinct inputs, distinct scores
  got = apply({"params": params}, embeds)
  assert got.shape == (4,)
  assert relative_error(got, want) <= TOL


def test_embeddings_are_l2_normalised(case):
  ref, params, apply = case
  embeds = np.random.default_rng(1).standard_normal((3, aesthetic.CLIP_L14_WIDTH))
  embeds[2] = 0  # zero embeddings stay zero, as in the original
  scaled = embeds * np.float32([[0.01], [30.0], [1.0]])
  got = np.asarray(apply({"params": params}, np.stack([embeds, scaled])))
  np.testing.assert_allclose(got[0], got[1], rtol=1e-5)
  assert relative_error(got[0], _score(ref, _normalized(embeds))) <= TOL


def test_wrong_file_names_expected_keys(tmp_path):
  path = tmp_path / "other.pth"
  torch.save({"module.fc.weight": torch.zeros(1, 8), "module.fc.bias": torch.zeros(1)}, path)
  with pytest.raises(ValueError) as error:
    torch_state.load_aesthetic_params(str(path))
  assert isinstance(error.value, core.ConversionError)
  for key in ("layers.0.weight", "layers.7.bias", "fc.weight"):
    assert key in str(error.value)
  torch.save(_Layers(8).state_dict(), path)  # right network, another embedding width
  with pytest.raises(
      ValueError, match=r"layers\.0\.weight: file \(8, 1024\) vs model \(768, 1024\)"
  ):
    torch_state.load_aesthetic_params(str(path))
  params = torch_state.load_aesthetic_params(str(path), embed_dim=8)
  assert params["layers_0"]["kernel"].shape == (8, 1024)
