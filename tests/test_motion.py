"""The motion score (vldm.data.motion): still is ~0, faster is higher, in known units, and the same
physical motion scores the same at any frame rate; motion_bucket_id clamps to SVD's range."""

import cv2
import numpy as np
import pytest

from vldm.data import motion

SIZE = 64


def panning_clip(speed, fps=8.0, seconds=2.0, seed=0, angle=0.3):
  """A smooth random texture panning at `speed` px per frame (sub-pixel, bilinear): uint8
  [T, 64, 64, 3]. The whole frame moves, so the mean flow magnitude is `speed` px per frame."""
  rng = np.random.default_rng(seed)
  texture = cv2.GaussianBlur(rng.random((256, 256)).astype(np.float32), (0, 0), 3.0)
  texture = (texture - texture.min()) / (texture.max() - texture.min())
  frames = []
  for t in range(int(round(fps * seconds))):
    centre = (96 + speed * np.cos(angle) * t, 96 + speed * np.sin(angle) * t)
    frame = cv2.getRectSubPix(texture, (SIZE, SIZE), centre)
    frames.append(np.repeat(np.rint(frame * 255).astype(np.uint8)[..., None], 3, -1))
  return np.stack(frames)


def square_clip(speed, frames=16, size=SIZE):
  """A bright square moving right over a dark background at `speed` px (integer) per frame."""
  clip = np.full((frames, size, size, 3), 30, np.uint8)
  for t in range(frames):
    x = 4 + speed * t
    clip[t, 20:36, x : x + 16] = 220
  return clip


def test_still_clip_scores_zero():
  assert motion.motion_score(panning_clip(0.0), 8.0) < 1e-3
  assert motion.motion_score(square_clip(0), 8.0) < 1e-3
  assert motion.motion_score(panning_clip(1.0)[:1], 8.0) == 0.0  # one frame: nothing to compare


def test_faster_scores_higher_in_short_sides_per_second():
  speeds = [0.25, 0.5, 1.0, 2.0]  # px per frame at 8 fps; at most 8 px between 2 fps samples
  scores = [motion.motion_score(panning_clip(v), 8.0) for v in speeds]
  assert np.all(np.diff([0.0] + scores) > 0)
  for v, score in zip(speeds, scores):  # v px/frame * 8 fps / 64 px = short sides per second
    assert score == pytest.approx(v * 8.0 / SIZE, rel=0.25), v
  # Comparing every frame (sample_fps 8: stride 1), 3 px/frame is measured as well.
  assert motion.motion_score(panning_clip(3.0), 8.0, sample_fps=8.0) == pytest.approx(
      3.0 * 8.0 / SIZE, rel=0.25
  )
  squares = [motion.motion_score(square_clip(v), 8.0) for v in (0, 1, 2)]
  assert squares[0] < squares[1] < squares[2]


def test_independent_of_resolution_and_frame_rate():
  for v in (0.5, 1.0, 2.0):  # px per frame at 8 fps
    at_8 = motion.motion_score(panning_clip(v), 8.0)
    # The same physical motion (px per second) filmed at 16 fps (stride 8) and 5 fps (stride 2,
    # comparing frames 0.4 s apart rather than 0.5 s).
    assert motion.motion_score(panning_clip(v / 2, fps=16.0), 16.0) == pytest.approx(at_8, rel=0.1)
    assert motion.motion_score(panning_clip(v * 8 / 5, fps=5.0), 5.0) == pytest.approx(
        at_8, rel=0.1
    )
  clip = panning_clip(1.0)
  upscaled = np.repeat(np.repeat(clip, 2, axis=1), 2, axis=2)  # 128 px, resized back to 64
  assert motion.motion_score(upscaled, 8.0) == pytest.approx(
      motion.motion_score(clip, 8.0), rel=0.1
  )
  # Non-square frames keep their aspect: 48 x 64 frames, 1 px/frame = 8/48 short sides per second.
  assert motion.motion_score(clip[:, :48], 8.0) == pytest.approx(1.0 * 8.0 / 48, rel=0.25)
  # Float frames in [0, 1] score like uint8 ones.
  assert motion.motion_score(clip / 255.0, 8.0) == pytest.approx(motion.motion_score(clip, 8.0))


def test_short_clip_falls_back_to_consecutive_frames():
  clip = panning_clip(1.0)[:3]  # 3 frames at 8 fps: stride 4 would leave one
  assert motion.motion_score(clip, 8.0) == pytest.approx(8.0 / SIZE, rel=0.25)


def test_motion_bucket_id_clamps():
  assert motion.MAX_MOTION_BUCKET == 255
  assert motion.motion_bucket_id(0.0) == 0
  assert motion.motion_bucket_id(0.5) == 128  # round(127.5): half to even
  assert motion.motion_bucket_id(0.1, buckets_per_unit=1000.0) == 100
  assert motion.motion_bucket_id(7.0) == 255 and motion.motion_bucket_id(-1.0) == 0
  assert isinstance(motion.motion_bucket_id(0.2), int)
  ids = motion.motion_bucket_id(np.array([-0.5, 0.0, 0.25, 1.0, 3.0]))
  assert ids.dtype == np.int32 and ids.tolist() == [0, 0, 64, 255, 255]
  with pytest.raises(ValueError, match="finite"):
    motion.motion_bucket_id(float("nan"))
  with pytest.raises(ValueError, match="buckets_per_unit"):
    motion.motion_bucket_id(0.5, buckets_per_unit=0)


@pytest.mark.parametrize(
    "frames,kwargs,match",
    [
        (np.zeros((4, 16, 16), np.uint8), {}, r"\[T, H, W, 3\]"),
        (np.zeros((4, 16, 16, 4), np.uint8), {}, r"\[T, H, W, 3\]"),
        (np.zeros((4, 0, 16, 3), np.uint8), {}, r"\[T, H, W, 3\]"),
        (np.zeros((4, 16, 16, 3), np.int32), {}, "uint8 or float"),
        (np.full((4, 16, 16, 3), np.nan, np.float32), {}, "NaN"),
        (np.zeros((4, 16, 16, 3), np.uint8), dict(fps=0.0), "fps"),
        (np.zeros((4, 16, 16, 3), np.uint8), dict(fps=float("inf")), "fps"),
        (np.zeros((4, 16, 16, 3), np.uint8), dict(sample_fps=-2.0), "sample_fps"),
        (np.zeros((4, 16, 16, 3), np.uint8), dict(size=4), "size"),
        (np.zeros((4, 16, 16, 3), np.uint8), dict(size=32.5), "size"),
    ],
)
def test_bad_input_raises(frames, kwargs, match):
  kwargs = {"fps": 8.0, **kwargs}
  with pytest.raises(ValueError, match=match):
    motion.motion_score(frames, **kwargs)
