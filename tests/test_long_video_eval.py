"""Long and interpolated clips judged with the oracle (vldm.eval.long_video), on rendered clips."""

import numpy as np
import pytest
from PIL import Image

from vldm.data import shapes
from vldm.eval import long_video
from vldm.eval import oracle

SIZE = 32


def slow_clip(color="red", shape="circle", direction="right", frames=32, x=0.2, y=0.5, speed=0.016):
  """A long clip at the slow speeds of a tempo-2.5 dataset (0.012-0.024 of the side per frame)."""
  return shapes.render_clip(color, shape, direction, x, y, 0.15, speed, frames, SIZE)


def test_slow_long_clip_is_all_correct():
  records = long_video.judge_long([slow_clip()], ["a red circle moving right"])
  r = records[0]
  assert r["correct"]["all"] and r["frames"] == 32
  assert r["window_directions"] == ["right"] * 4 and r["windows_direction_ok"] == 1.0
  assert r["drift"]["ok"] and r["drift"]["color_change"] < 0.05
  summary = long_video.summarize_long(records)
  seen = summary["seen"]
  assert (
      seen["all"],
      seen["window_direction"],
      seen["every_window_direction"],
      seen["drift_ok"],
      seen["n"],
  ) == (1.0, 1.0, 1.0, 1.0, 1)
  assert summary["held_out"]["n"] == 0 and np.isnan(summary["held_out"]["drift_ok"])


def test_window_bounds():
  assert long_video.window_bounds(32) == [(0, 8), (8, 16), (16, 24), (24, 32)]
  assert long_video.window_bounds(30) == [(0, 8), (8, 16), (16, 24)]  # partial window dropped
  assert long_video.window_bounds(5) == [(0, 5)]
  assert long_video.window_bounds(16, stride=4) == [(0, 8), (4, 12), (8, 16)]
  # At the slowest speed a window moves 0.084: below the oracle's whole-clip threshold, above the
  # window one.
  j = long_video.window_judgements(slow_clip(frames=8, speed=0.012))[0]
  assert j.direction == oracle.STATIC and long_video.window_direction(j) == "right"


def test_color_change_fails_drift():
  clip = slow_clip()
  clip[-8:] = slow_clip(color="magenta")[-8:]
  r = long_video.judge_long([clip], ["a red circle moving right"])[0]
  assert not r["drift"]["ok"] and r["drift"]["color_change"] > 0.5
  assert r["drift"]["area_change"] <= long_video.DRIFT_TOLERANCE


def test_reversal_has_windows_wrong():
  out = slow_clip(frames=16, x=0.3)
  back = shapes.render_clip("red", "circle", "left", 0.3 + 15 * 0.016, 0.5, 0.15, 0.016, 16, SIZE)
  r = long_video.judge_long([np.concatenate([out, back])], ["a red circle moving right"])[0]
  assert r["window_directions"] == ["right", "right", "left", "left"]
  assert r["windows_direction_ok"] == 0.5 and not r["correct"]["direction"]
  summary = long_video.summarize_long([r])["seen"]
  assert summary["every_window_direction"] == 0.0 and summary["drift_ok"] == 1.0


def test_linear_blend_and_drop_frames():
  truth = shapes.render_clip("blue", "square", "down", 0.5, 0.2, 0.15, 0.05, 9, SIZE)
  keys = long_video.drop_frames(truth)
  assert keys.shape == (3, SIZE, SIZE, 3)
  blend = long_video.linear_blend(keys)
  assert blend.shape == (9, SIZE, SIZE, 3) and blend.dtype == np.float64
  for position, key in zip((0, 4, 8), keys):
    np.testing.assert_array_equal(blend[position], key / 255.0)
  np.testing.assert_allclose(blend[1], 0.75 * keys[0] / 255.0 + 0.25 * keys[1] / 255.0)
  with pytest.raises(ValueError, match="K \\* factor \\+ 1 frames"):
    long_video.drop_frames(truth[:8])


def test_interpolation_psnr():
  truth = shapes.render_clip("green", "triangle", "right", 0.25, 0.5, 0.15, 0.05, 9, SIZE)
  assert long_video.psnr(truth, truth) == long_video.PSNR_CAP
  wrong_color = shapes.render_clip("red", "triangle", "right", 0.25, 0.5, 0.15, 0.05, 9, SIZE)
  records = long_video.judge_interpolation(
      [truth, wrong_color], [truth, truth], ["a green triangle moving right"] * 2
  )
  perfect, recolored = records[0], records[1]
  assert perfect["psnr_generated"] == long_video.PSNR_CAP
  assert perfect["psnr_blend"] < 30 and perfect["gain"] > 60
  assert perfect["correct"] == dict(
      color=True, shape=True, direction=True, all=True, color_and_shape=True
  )
  assert not recolored["correct"]["color"] and recolored["correct"]["shape"]
  summary = long_video.summarize_interpolation(records)
  assert summary["n"] == 2 and summary["color_and_shape"] == 0.5
  assert summary["psnr_blend"] == perfect["psnr_blend"]


def test_strip_writes_png(tmp_path):
  clips = [slow_clip(frames=17), slow_clip("cyan", "square", "left", frames=17, x=0.8)]
  path = long_video.strip(
      clips, ["a red circle moving right", "a cyan square moving left"], str(tmp_path / "strip.png")
  )
  # 17 frames: 16 gaps, two of them chunk joins (before frames 8 and 16).
  width = long_video.LABEL_WIDTH + 17 * SIZE + 14 * 1 + 2 * 3
  assert Image.open(path).size == (width, 2 * SIZE + 1)
  every = long_video.strip(clips, None, str(tmp_path / "every.png"), every=4, max_frames=16)
  assert Image.open(every).size == (4 * SIZE + 1 + 3 + 1, 2 * SIZE + 1)  # frames 0, 4 | 8, 12
