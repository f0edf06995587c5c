"""vldm's FID InceptionV3 vs torch-fidelity's (tests/reference_fid_inception.py) at random
weights, float32: pool3 features and logits, the preprocessing (TF 1.x bilinear resize to 299,
scaling) and checkpoint loading."""

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference_fid_inception
from parity import calibrate_batch_norms_, he_init_, perturb_, relative_error
from vldm.convert import core
from vldm.convert import torch_state
from vldm.models import fid_inception

TOL = 1e-4
HEIGHT, WIDTH = 64, 80  # small frames, upscaled to 299 inside both networks


def _reference(path=None):
  return reference_fid_inception.FeatureExtractorInceptionV3(
      "inception-v3-compat", ["2048", "logits"], feature_extractor_weights_path=path
  )


def _images(gen, height, width, cells):
  """uint8 images [B, 3, H, W], one per cell size: random colours on a grid of `cell`-pixel
  cells, bilinearly smoothed. Different cell sizes give different textures, so the features of
  a random network differ between the images (iid noise of one kind would average out in pool3)."""
  out = []
  for cell in cells:
    low = 255 * torch.rand(1, 3, -(-height // cell), -(-width // cell), generator=gen)
    out.append(F.interpolate(low, size=(height, width), mode="bilinear").round().to(torch.uint8))
  return torch.cat(out)


@pytest.fixture(scope="module", name="case")
def _case(tmp_path_factory):
  torch.manual_seed(0)
  ref = perturb_(_reference(), seed=1)  # BatchNorm affine and fc away from 1 / 0
  gen = torch.Generator().manual_seed(2)
  calibrate_batch_norms_(he_init_(ref, seed=3), _images(gen, HEIGHT, WIDTH, (8, 1)), seed=4)
  images = _images(gen, HEIGHT, WIDTH, (16, 2))
  with torch.no_grad():
    pool3, logits = ref(images)
  path = tmp_path_factory.mktemp("fid_inception") / "inception.pth"
  torch.save(ref.state_dict(), path)
  nhwc = images.permute(0, 2, 3, 1).numpy()
  return ref, nhwc, pool3.numpy(), logits.numpy(), path


def test_fid_inception_matches_torch_fidelity(case):
  _, images, pool3, logits, path = case
  assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
  # A deep random network can collapse to an input-independent output: parity would prove little.
  assert pool3.std(axis=0).mean() > 0.1 * np.abs(pool3).mean()
  variables = torch_state.load_fid_inception_params(str(path))
  assert set(variables) == {"params", "batch_stats"}
  got_pool3, got_logits = jax.jit(
      lambda v, x: fid_inception.FIDInceptionV3().apply(v, fid_inception.preprocess(x))
  )(variables, images)
  assert got_pool3.dtype == np.float32
  assert relative_error(got_pool3, pool3) <= TOL
  assert relative_error(got_logits, logits) <= TOL
  # The convenience entry point computes the same pool3.
  assert relative_error(fid_inception.features(variables, images), pool3) <= TOL


class _Captured(Exception):
  pass


def _reference_input(ref, images):
  """What the reference's forward feeds its first convolution (after its resize and scaling),
  captured by a hook that then stops the forward."""
  captured = {}

  def hook(_, args):
    captured["x"] = args[0].clone()
    raise _Captured

  handle = ref.Conv2d_1a_3x3.register_forward_pre_hook(hook)
  try:
    with pytest.raises(_Captured), torch.no_grad():
      ref(images)
  finally:
    handle.remove()
  return captured["x"].permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize(
    "height, width",
    [(37, 53), (512, 400), (200, 640), (299, 299)],  # up, down, up × down, identity
)
def test_preprocess_matches_torch_fidelity(case, height, width):
  ref = case[0]
  images = torch.randint(0, 256, (2, 3, height, width), generator=torch.Generator().manual_seed(5))
  images = images.to(torch.uint8)
  want = _reference_input(ref, images)
  got = np.asarray(fid_inception.preprocess(images.permute(0, 2, 3, 1).numpy()))
  assert got.shape == (2, 299, 299, 3) and got.dtype == np.float32
  assert relative_error(got, want) <= 1e-5
  assert got.min() >= -1 and got.max() <= 127 / 128


def test_preprocess_takes_leading_axes_and_refuses_floats():
  frames = np.random.default_rng(0).integers(0, 256, (2, 3, 20, 30, 3), dtype=np.uint8)
  got = np.asarray(fid_inception.preprocess(frames))
  assert got.shape == (2, 3, 299, 299, 3)
  np.testing.assert_array_equal(got[1, 2], np.asarray(fid_inception.preprocess(frames[1, 2])))
  with pytest.raises(ValueError, match="uint8"):
    fid_inception.preprocess(frames.astype(np.float32) / 255)
  with pytest.raises(ValueError, match="RGB"):
    fid_inception.preprocess(frames[..., :2])


def test_load_without_batch_counters(case, tmp_path):
  """pytorch-fid's and older files may lack `num_batches_tracked`: the weights still load."""
  ref, *_, path = case
  plain = tmp_path / "plain.pth"
  state = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
  torch.save(state, plain)
  a = torch_state.load_fid_inception_params(str(path))
  b = torch_state.load_fid_inception_params(str(plain))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def test_wrong_file_names_expected_keys(case, tmp_path):
  ref, *_ = case
  path = tmp_path / "other.pth"
  torch.save(torch.nn.Sequential(torch.nn.Linear(4, 2)).state_dict(), path)
  with pytest.raises(ValueError) as error:
    torch_state.load_fid_inception_params(str(path))
  assert isinstance(error.value, core.ConversionError)
  message = str(error.value)
  for key in ("Conv2d_1a_3x3.bn.running_mean", "Conv2d_2a_3x3.conv.weight", "0.weight"):
    assert key in message
  # One key renamed: exactly it is reported, in the file's own spelling.
  state = ref.state_dict()
  state["Mixed_5b.branch5x5_one.conv.weight"] = state.pop("Mixed_5b.branch5x5_1.conv.weight")
  torch.save(state, path)
  with pytest.raises(core.ConversionError) as error:
    torch_state.load_fid_inception_params(str(path))
  message = str(error.value)
  assert "missing weights (1): Mixed_5b.branch5x5_1.conv.weight" in message
  assert "unexpected weights (1): Mixed_5b.branch5x5_one.conv.weight" in message
  # A mis-shaped weight is caught too.
  state = ref.state_dict()
  state["fc.bias"] = torch.zeros(1000)
  torch.save(state, path)
  with pytest.raises(core.ConversionError, match="fc.bias"):
    torch_state.load_fid_inception_params(str(path))
