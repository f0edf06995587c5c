"""vldm.eval.evaluator: FVD's sanity with a small I3D (a clip set against itself ~0, time-shuffled
frames further than lightly blurred ones), CLIPSIM against transformers' CLIPModel, reading clip
folders by the protocol, and the real statistics' cache."""

import json
import os

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import media
from test_curate import write_tiny_clip
from vldm.eval import evaluator as evaluator_lib
from vldm import video_io
from vldm.eval import frechet

FEATURES = 16


class SmallI3D(nn.Module):
  """Two strided 3-D convolutions and a projection: a stand-in for I3D small enough for a test."""

  @nn.compact
  def __call__(self, videos):
    x = videos.astype(jnp.float32) / 127.5 - 1.0
    x = nn.relu(nn.Conv(8, (3, 3, 3), strides=(1, 2, 2), padding="SAME")(x))
    x = nn.relu(nn.Conv(16, (3, 3, 3), strides=(2, 2, 2), padding="SAME")(x))
    return nn.Dense(FEATURES)(x.mean(axis=(1, 2, 3)))


class SmallI3DFeatures:
  """The evaluator's feature-network interface (`dim`, clips uint8 → [N, dim]) over SmallI3D."""

  dim = FEATURES

  def __init__(self):
    module = SmallI3D()
    self.params = module.init(jax.random.key(0), jnp.zeros((1, 8, 32, 32, 3)))
    self.fn = jax.jit(module.apply)

  def __call__(self, clips):
    return np.asarray(self.fn(self.params, jnp.asarray(clips)))


def moving_squares(n, frames=8, size=32, seed=0):
  """n clips of a bright square moving in a random direction over a dim background."""
  rng = np.random.default_rng(seed)
  clips = np.full((n, frames, size, size, 3), 20, np.uint8)
  for clip in clips:
    color = rng.integers(80, 256, 3)
    x, y = rng.integers(6, size - 14, 2)
    dx, dy = rng.choice([-1, 1], 2) * rng.integers(1, 3, 2)
    for t, frame in enumerate(clip):
      px, py = np.clip([x + dx * t, y + dy * t], 0, size - 8)
      frame[py : py + 8, px : px + 8] = color
  return clips


def _fvd_evaluator():
  evaluator = object.__new__(evaluator_lib.Evaluator)  # no weight files: the test's network
  evaluator.metrics, evaluator.protocol = ("fvd",), evaluator_lib.Protocol(64, 8)
  evaluator.networks, evaluator.weights, evaluator.clip = {"fvd": SmallI3DFeatures()}, {}, None
  return evaluator


def test_fvd_sees_motion():
  evaluator = _fvd_evaluator()
  clips = moving_squares(64)
  real = evaluator.feature_stats(list(clips))
  rng = np.random.default_rng(1)
  shuffled = np.stack([c[rng.permutation(len(c))] for c in clips])
  blurred = np.stack([[cv2.GaussianBlur(f, (3, 3), 0.6) for f in c] for c in clips])  # pylint: disable=no-member

  def fvd(clip_list):
    generated = evaluator_lib.clip_set(clip_list)
    return evaluator.evaluate(generated, real)["fvd"]

  itself, time_shuffled, light_blur = fvd(clips), fvd(shuffled), fvd(blurred)
  assert abs(itself) < 1e-6 * np.trace(real["fvd"].mean_and_cov()[1])
  assert time_shuffled > 2 * light_blur > 0, (time_shuffled, light_blur)


def test_clipsim_matches_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  clip_dir = str(tmp_path / "clip")
  model, tokenizer = write_tiny_clip(clip_dir)
  evaluator = evaluator_lib.Evaluator(["clipsim"], evaluator_lib.Protocol(4, 3), clip=clip_dir)
  clips = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32, 3), dtype=np.uint8)
  captions = ["a red circle", "blue"]
  ours = evaluator.evaluate(evaluator_lib.clip_set(clips, captions))
  mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
  std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
  pixels = (torch.tensor(clips.reshape(6, 32, 32, 3)).permute(0, 3, 1, 2) / 255.0 - mean) / std
  ids = tokenizer(captions, padding="max_length", max_length=16, return_tensors="pt").input_ids
  with torch.no_grad():
    out = model(input_ids=ids, pixel_values=pixels)  # normalised embeddings
  cos = torch.stack([out.image_embeds[3 * i : 3 * i + 3] @ out.text_embeds[i] for i in range(2)])
  assert ours["clipsim"] == pytest.approx(float(cos.mean()), abs=1e-5)
  assert ours["clip_score"] == pytest.approx(float((100 * cos).clamp(min=0).mean()), abs=1e-3)
  assert ours["clipsim_clips"] == 2
  with pytest.raises(evaluator_lib.EvaluationError, match="needs captions"):
    evaluator.evaluate(evaluator_lib.clip_set(clips))


def _write_folder(folder, clips, captions=None, fps=8):
  os.makedirs(folder, exist_ok=True)
  for i, clip in enumerate(clips):
    media.write_video(os.path.join(folder, f"{i:02d}.mp4"), clip, fps)
  if captions is not None:
    with open(os.path.join(folder, "captions.jsonl"), "w", encoding="utf-8") as f:
      for i, caption in enumerate(captions):
        f.write(json.dumps({"file": f"{i:02d}.mp4", "caption": caption}) + "\n")
  return folder


def test_read_folder_follows_the_protocol(tmp_path):
  clips = moving_squares(5, frames=12)
  folder = _write_folder(str(tmp_path / "real"), clips, [f"clip {i}" for i in range(5)])
  media.write_video(os.path.join(folder, "04.mp4"), clips[4][:5], 8)  # too short
  protocol = evaluator_lib.Protocol(num_clips=3, num_frames=4, frame_stride=3)
  got = evaluator_lib.read_folder(folder, protocol)
  assert got.sources == ["00.mp4", "01.mp4", "02.mp4"] and got.captions[0] == "clip 0"
  assert got.clips[0].shape == (4, 32, 32, 3)
  decoded = video_io.read_frames(os.path.join(folder, "00.mp4"))
  np.testing.assert_array_equal(got.clips[0], decoded[[0, 3, 6, 9]])
  everything = evaluator_lib.read_folder(folder, evaluator_lib.Protocol(num_clips=10, num_frames=6))
  assert len(everything) == 4 and everything.skipped == {"too_short": ["04.mp4"]}
  os.makedirs(tmp_path / "empty")
  with pytest.raises(evaluator_lib.EvaluationError, match="No videos"):
    evaluator_lib.read_folder(str(tmp_path / "empty"), protocol)


def test_real_statistics_are_cached(tmp_path):
  clips = moving_squares(6)
  folder = _write_folder(str(tmp_path / "real"), clips)
  evaluator = _fvd_evaluator()
  real = evaluator_lib.read_folder(folder, evaluator.protocol)
  cache = str(tmp_path / "stats")
  first = evaluator.real_stats(real, cache)
  (path,) = [os.path.join(cache, p) for p in os.listdir(cache)]
  stats = frechet.FeatureStats(FEATURES, 1, np.zeros(FEATURES), np.zeros((FEATURES, FEATURES)))
  stats.save(path)  # a marked cache entry: read back, not recomputed
  assert evaluator.real_stats(real, cache)["fvd"].count == 1
  assert first["fvd"].count == 6
  evaluator.protocol = evaluator_lib.Protocol(64, 4)  # another protocol: another entry
  assert (
      evaluator.real_stats(evaluator_lib.read_folder(folder, evaluator.protocol), cache)[
          "fvd"
      ].count
      == 6
  )
  assert len(os.listdir(cache)) == 2


def test_bad_input(tmp_path):
  with pytest.raises(evaluator_lib.EvaluationError, match="accepted: fvd, fid, clipsim, oracle"):
    evaluator_lib.Evaluator(["fvd", "is"])
  with pytest.raises(evaluator_lib.EvaluationError, match="fvd needs --i3d_weights"):
    evaluator_lib.Evaluator(["fvd"])
  with pytest.raises(ValueError, match="not a file"):
    evaluator_lib.Evaluator(["fid"], inception_weights=str(tmp_path / "missing.pth"))
  with pytest.raises(evaluator_lib.EvaluationError, match="num_clips >= 2"):
    evaluator_lib.Protocol(num_clips=1)
