"""vldm's I3D vs cd-fvd's (tests/reference_i3d.py) at random weights, float32: the FVD features
end to end (preprocessing, network, checkpoint loading), the "SAME" padding rule and the resize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference_i3d
from parity import calibrate_batch_norms_, he_init_, perturb_, relative_error
from vldm.convert import core
from vldm.convert import torch_state
from vldm.models import i3d

TOL = 1e-4
# The smallest inputs the reference maps to [B, 400]: 193 px is the least side with a 7×7 final
# map. 193 is odd at every strided layer and 224 even, so both branches of `compute_pad` run
# (asymmetric padding included); 17 frames leave 2 time steps after the final pool, so the mean
# over time is tested too.
FRAMES, HEIGHT, WIDTH = 17, 193, 224


def _videos(rng, batch, frames, height=72, width=96):
  """uint8 clips smaller than the network input (preprocessing enlarges them, non-uniformly), each
  with its own brightness and contrast: the features of i.i.d. noise clips differ by only ~5 %
  after the global pools, their differences would be lost among the shared part."""
  gain = np.linspace(1.0, 0.3, batch)[:, None, None, None, None]
  noise = rng.integers(0, 256, (batch, frames, height, width, 3))
  return (gain * noise).astype(np.uint8)


@pytest.fixture(scope="module", name="case")
def _case(tmp_path_factory):
  torch.manual_seed(0)
  ref = he_init_(perturb_(reference_i3d.InceptionI3d(400, in_channels=3), seed=1), seed=2)
  rng = np.random.default_rng(3)
  # One short clip calibrates the statistics (BatchNorm pools over time and space too).
  calibration = reference_i3d.preprocess_i3d(_videos(rng, 1, i3d.MIN_FRAMES), (HEIGHT, WIDTH))
  calibrate_batch_norms_(ref, calibration, seed=4)
  videos = _videos(rng, 2, FRAMES)
  with torch.no_grad():
    logits = ref(reference_i3d.preprocess_i3d(videos, (HEIGHT, WIDTH))).numpy()
  path = tmp_path_factory.mktemp("i3d") / "i3d_pretrained_400.pt"
  torch.save(ref.state_dict(), path)
  return videos, logits, path


def test_features_match_cd_fvd(case):
  """cd-fvd's `get_i3d_logits` (preprocess_i3d, then the port's forward) vs `i3d.features` with
  the weights read back from a `torch.save`d state dict."""
  videos, logits, path = case
  assert logits.shape == (2, 400)
  # A deep random network can collapse to an input-independent output: parity would prove little.
  assert logits.std(axis=0).mean() > 0.1 * np.abs(logits).mean()
  variables = torch_state.load_i3d_params(str(path))
  assert set(variables) == {"params", "batch_stats"}
  fn = jax.jit(i3d.features, static_argnames=("dtype", "precision", "resolution"))
  got = fn(variables, videos, resolution=(HEIGHT, WIDTH))
  assert got.shape == (2, 400) and got.dtype == jnp.float32
  assert relative_error(got, logits) <= TOL


@pytest.mark.parametrize(
    "size, resolution",
    [((50, 70), 224), ((300, 260), 224), ((240, 120), (193, 224)), ((224, 224), 224)],
    ids=["enlarge", "shrink", "shrink-rows-enlarge-columns", "same-size"],
)
def test_preprocess_matches_cd_fvd(size, resolution):
  videos = np.random.default_rng(0).integers(0, 256, (2, 3, *size, 3), np.uint8)
  target = (resolution,) * 2 if isinstance(resolution, int) else resolution
  want = reference_i3d.preprocess_i3d(videos, target)
  got = i3d.preprocess(videos, resolution)
  assert relative_error(got, np.moveaxis(want.numpy(), 1, -1)) <= 1e-5
  assert float(jnp.min(got)) >= -1 and float(jnp.max(got)) <= 1


def test_resize_weights_are_torch_interpolate():
  """The interpolation matrices vs PyTorch's own weights (the resize of one-hot rows)."""
  for n, m in [(300, 224), (50, 224), (224, 193), (1080, 224), (7, 3), (1, 4)]:
    eye = torch.eye(n).reshape(n, 1, n, 1)
    want = F.interpolate(eye, size=(m, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T
    # pylint: disable-next=protected-access
    assert np.abs(i3d._bilinear_matrix(n, m) - want.numpy()).max() <= 1e-6, (n, m)


@pytest.mark.parametrize("kernel, stride", [(7, 2), (3, 2), (2, 2), (3, 1), (1, 1)])
def test_same_padding_is_compute_pad(kernel, stride):
  unit = reference_i3d.Unit3D(1, 1, kernel_shape=[kernel] * 3, stride=(stride,) * 3)
  pool = reference_i3d.MaxPool3dSamePadding(kernel_size=[kernel] * 3, stride=(stride,) * 3)
  for n in range(1, 12):
    total = unit.compute_pad(0, n)
    assert pool.compute_pad(0, n) == total
    front, back = i3d.same_padding((n,), (kernel,), (stride,))[0]
    assert (front, back) == (total // 2, total - total // 2)
    assert (n + front + back - kernel) // stride + 1 == -(-n // stride)  # TF "SAME": ceil(n / s)


def test_rejects_inputs_without_a_400_vector():
  model = i3d.InceptionI3d()
  for shape in ((1, 8, 224, 224, 3), (1, 16, 192, 224, 3), (1, 16, 225, 224, 3)):
    with pytest.raises(ValueError, match="I3D needs"):
      jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


def test_wrong_file_names_expected_keys(tmp_path):
  path = tmp_path / "other.pt"
  torch.save(torch.nn.Sequential(torch.nn.Linear(4, 2)).state_dict(), path)
  with pytest.raises(core.ConversionError) as error:
    torch_state.load_i3d_params(str(path))
  message = str(error.value)
  for key in ("Conv3d_1a_7x7.conv3d.weight", "Conv3d_1a_7x7.bn.running_mean", "0.weight"):
    assert key in message
