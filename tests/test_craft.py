"""vldm's CRAFT vs EasyOCR's (tests/reference_craft.py) at random weights, float32; its
preprocessing, upsampling, checkpoint loading and text-area post-processing."""

import cv2
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference_craft
from parity import calibrate_batch_norms_, perturb_, relative_error, to_nhwc
from vldm.convert import core
from vldm.convert import torch_state
from vldm.models import craft

TOL = 1e-4
HEIGHT, WIDTH = 64, 96  # the smallest multiples of 32 with every level non-square


@pytest.fixture(scope="module", name="case")
def _case(tmp_path_factory):
  torch.manual_seed(0)
  ref = perturb_(reference_craft.CRAFT(), seed=1)
  gen = torch.Generator().manual_seed(2)
  calibrate_batch_norms_(ref, torch.randn(2, 3, HEIGHT, WIDTH, generator=gen), seed=3)
  images = torch.randn(2, 3, HEIGHT, WIDTH, generator=gen)
  with torch.no_grad():
    y, feature = ref(images)
  path = tmp_path_factory.mktemp("craft") / "craft.pth"
  # The published craft_mlt_25k.pth was saved from nn.DataParallel: every key has `module.`.
  torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, path)
  return ref, to_nhwc(images), y.numpy(), to_nhwc(feature), path


def test_craft_matches_easyocr(case):
  ref, images, y, feature, path = case
  del ref
  assert y.shape == (2, HEIGHT // 2, WIDTH // 2, 2) and feature.shape == (
      2,
      HEIGHT // 2,
      WIDTH // 2,
      32,
  )
  # A deep random network can collapse to an input-independent output: parity would prove little.
  assert relative_error(y[0], y[1]) > 0.05 and relative_error(feature[0], feature[1]) > 0.05
  variables = torch_state.load_craft_params(str(path))
  got_y, got_feature = jax.jit(craft.CRAFT().apply)(variables, images)
  assert relative_error(got_y, y) <= TOL
  assert relative_error(got_feature, feature) <= TOL


@pytest.mark.parametrize("height, width", [(96, 64), (80, 112)])  # (80, 112): 5 and 7 × 16
def test_craft_matches_easyocr_at_other_sizes(case, height, width):
  """Other aspect ratios, and sides that are not multiples of 32: the backbone's pools floor odd
  sizes and the up blocks resize to the skip's shape, as in PyTorch."""
  ref, *_, path = case
  images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(4))
  with torch.no_grad():
    y, feature = ref(images)
  variables = torch_state.load_craft_params(str(path))
  got_y, got_feature = jax.jit(craft.CRAFT().apply)(variables, to_nhwc(images))
  assert got_y.shape == y.shape and relative_error(got_y, y.numpy()) <= TOL
  assert relative_error(got_feature, to_nhwc(feature)) <= TOL


def test_load_accepts_keys_without_data_parallel_prefix(case, tmp_path):
  ref, _, _, _, path = case
  plain = tmp_path / "plain.pth"
  torch.save(ref.state_dict(), plain)
  a, b = torch_state.load_craft_params(str(path)), torch_state.load_craft_params(str(plain))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))
  assert set(a) == {"params", "batch_stats"}


def test_wrong_file_names_expected_keys(tmp_path):
  path = tmp_path / "other.pth"
  torch.save(torch.nn.Sequential(torch.nn.Linear(4, 2)).state_dict(), path)
  with pytest.raises(ValueError) as error:
    torch_state.load_craft_params(str(path))
  assert isinstance(error.value, core.ConversionError)
  message = str(error.value)
  for key in ("basenet.slice1.0.weight", "basenet.slice1.1.running_mean", "0.weight"):
    assert key in message
  torch.save([torch.zeros(1)], path)
  with pytest.raises(ValueError, match="not a state dict"):
    torch_state.load_craft_params(str(path))
  with pytest.raises(ValueError, match="No weights file"):
    torch_state.load_craft_params(str(tmp_path / "absent.pth"))


@pytest.mark.parametrize("src,dst", [((3, 5), (6, 10)), ((2, 3), (5, 7)), ((4, 4), (4, 4))])
def test_upsample_matches_torch_interpolate(src, dst):
  x = torch.randn(2, 3, *src, generator=torch.Generator().manual_seed(0))
  want = F.interpolate(x, size=dst, mode="bilinear", align_corners=False)
  got = craft.upsample_bilinear(to_nhwc(x), *dst)
  assert relative_error(got, to_nhwc(want)) <= 1e-6


def test_preprocess_is_opencv_resize_then_easyocr_normalisation():
  frames = np.random.default_rng(0).integers(0, 256, (2, 50, 70, 3), dtype=np.uint8)
  got = np.asarray(craft.preprocess(frames, (32, 96)))  # shrink rows, enlarge columns
  mean, std = np.float32([0.485, 0.456, 0.406]) * 255, np.float32([0.229, 0.224, 0.225]) * 255
  for frame, out in zip(frames, got):
    # pylint: disable-next=no-member  # cv2 is a compiled extension: pylint cannot list its members
    resized = cv2.resize(frame.astype(np.float32), (96, 32), interpolation=cv2.INTER_LINEAR)
    want = (resized - mean) / std  # easyocr imgproc.normalizeMeanVariance
    assert relative_error(out, want) <= 1e-5
  with pytest.raises(ValueError, match="multiples of 32"):
    craft.preprocess(frames, (48, 96))
  assert craft.input_size(720, 1280, 512) == (288, 512)


def _scores(height=64, width=96):
  return np.zeros((height, width, 2), np.float32)


def test_text_area_of_two_rectangles():
  scores = _scores()
  # Word A: 10 × 30 px. Every pixel is above low_text, so size = w·h and niter = int(2·sqrt(10))
  # = 6: dilated by a 7 × 7 square, it grows 3 px a side → 16 × 36 = 576 px.
  scores[10:20, 10:40, 0] = 0.9
  # Word B: 12 × 16 px, niter = int(2·sqrt(12)) = 6 → 18 × 22 = 396 px.
  scores[40:52, 60:76, 0] = 0.8
  # Ignored: a component whose peak stays under text_threshold, and one under 10 px.
  scores[30:35, 10:30, 0] = 0.6
  scores[2:5, 80:83, 0] = 0.95
  assert craft.text_area(scores) == pytest.approx((576 + 396) / (64 * 96), abs=1e-7)
  assert craft.text_area(_scores()) == 0.0
  batch = np.stack([scores, _scores()])[None]  # [1, 2, h, w, 2]
  np.testing.assert_allclose(craft.text_area(batch), [[(576 + 396) / (64 * 96), 0.0]], atol=1e-7)


def test_text_area_links_characters_into_one_box():
  scores = _scores()
  scores[10:20, 10:20, 0] = 0.9  # two 10 × 10 characters, 10 px apart
  scores[10:20, 30:40, 0] = 0.9
  separate = craft.text_area(scores)
  # Each alone: niter = int(2·sqrt(10)) = 6 → a 16 × 16 box.
  assert separate == pytest.approx(2 * 16 * 16 / (64 * 96), abs=1e-7)
  scores[12:18, 20:30, 1] = 0.8  # affinity between them: one word
  # One component of 260 px, 30 × 10: niter = int(2·sqrt(260·10/300)) = 5, a 6 × 6 square (anchor
  # 3) grows it 2 px up/left and 3 px down/right: one box over rows 8..22, columns 8..42.
  assert craft.text_area(scores) == pytest.approx(15 * 35 / (64 * 96), abs=1e-7)


def test_curation_scorer_runs_craft_on_frames(case):
  """vldm.curate's CRAFT scorer: uint8 frames of any size → one text-area fraction each."""
  from vldm.curate import scorers  # pylint: disable=g-import-not-at-top

  *_, path = case
  frames = np.random.default_rng(0).integers(0, 256, (3, 40, 72, 3), dtype=np.uint8)
  areas = scorers.CraftScorer(str(path), long_side=64, batch_size=2)(frames)
  assert areas.shape == (3,) and areas.dtype in (np.float32, np.float64)
  assert np.all((areas >= 0) & (areas <= 1))
