"""Global motion score of a clip (Stable Video Diffusion's) and its `motion_bucket_id`.

SVD conditions its UNet on a `motion_bucket_id` derived from a clip's global motion: dense optical
flow (OpenCV's Farnebäck) between frames sampled at 2 fps, on downscaled frames, with the flow
magnitude averaged over pixels and frame pairs. Computed once when video data is prepared (the
video-folder builder stores it as 'motion') and reused by data curation, so it lives here once.

Units: the score is in **frame short sides per second**: mean flow magnitude in pixels of the
resized frame, divided by that frame's short side (`size`), times the sampled frame rate
(fps / stride). So it depends neither on the video's resolution nor on its frame rate: content
crossing the frame's short side once a second scores 1.0, a still clip 0.0. A whole frame
panning at v px/frame on a 64 px frame at f fps scores about v * f / 64.
"""

import math

import cv2
import numpy as np

from vldm.data import transforms

DEFAULT_SAMPLE_FPS = 2.0  # SVD: flow between frames 0.5 s apart
DEFAULT_SIZE = 64  # short side (px) the frames are resized to before the flow
MAX_MOTION_BUCKET = 255  # SVD's motion_bucket_id range is [0, 255]; 127 is its "typical" default
DEFAULT_BUCKETS_PER_UNIT = 255.0  # one short side per second -> the top bucket

# Farnebäck parameters: OpenCV's customary ones (as in its tutorial), which suit ~64 px frames:
# 15 px windows hold enough texture for a stable estimate without smearing much past a moving
# object. OpenCV stops the pyramid at ~32 px, so at 64 px only 2 of the 3 levels exist: per-sample
# displacements up to ~1/8 of the short side (0.25 short sides/s at 2 fps) of textured content are
# measured to a few percent, larger ones increasingly underestimated (the score saturates for very
# fast motion).
FARNEBACK_PYR_SCALE = 0.5
FARNEBACK_LEVELS = 3
FARNEBACK_WINSIZE = 15
FARNEBACK_ITERATIONS = 3
FARNEBACK_POLY_N = 5
FARNEBACK_POLY_SIGMA = 1.2
FARNEBACK_FLAGS = 0


def _gray(frame, size):
  """RGB frame (uint8) -> uint8 gray with the shorter side resized to `size` (aspect kept)."""
  gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
  h, w = gray.shape
  new_h, new_w = transforms.short_side_shape(h, w, size)
  if (new_h, new_w) == (h, w):
    return gray
  # Area averaging when shrinking (no aliasing); bilinear when a small frame is enlarged.
  interpolation = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
  return cv2.resize(gray, (new_w, new_h), interpolation=interpolation)


def _as_uint8(frames):
  """uint8 frames as they are; float frames in [0, 1] scaled (clipped) to uint8 for Farnebäck."""
  if frames.dtype == np.uint8:
    return frames
  if frames.dtype.kind != "f":
    raise ValueError(f"Expected uint8 or float (in [0, 1]) frames, got {frames.dtype}.")
  if not np.isfinite(frames).all():
    raise ValueError("Frames hold NaN or infinite values.")
  return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)


def motion_score(frames, fps, *, sample_fps=DEFAULT_SAMPLE_FPS, size=DEFAULT_SIZE):
  """Global motion of a clip in frame short sides per second (see the module docstring).

  Args:
    frames: uint8 [T, H, W, 3], or float in [0, 1], the clip's frames at `fps`.
    fps: the clip's frame rate (frames per second), > 0.
    sample_fps: rate at which frames are compared: every stride = max(1, round(fps / sample_fps))-th
      frame is kept (consecutive frames when that would leave fewer than 2).
    size: short side (px, >= 8) the gray frames are resized to (INTER_AREA when shrinking;
      bilinear when enlarging, so that the Farnebäck parameters see ~size px frames).

  Returns:
    float: mean Farnebäck flow magnitude (px) / size * (fps / stride); 0.0 for fewer than 2 frames.
  """
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape[1:3]:
    raise ValueError(f"Expected frames [T, H, W, 3] with H, W >= 1, got shape {frames.shape}.")
  if not (np.isscalar(fps) and math.isfinite(fps) and fps > 0):
    raise ValueError(f"fps must be a finite number > 0 (frames per second), got {fps!r}.")
  if not (np.isscalar(sample_fps) and math.isfinite(sample_fps) and sample_fps > 0):
    raise ValueError(f"sample_fps must be a finite number > 0, got {sample_fps!r}.")
  if not (isinstance(size, (int, np.integer)) and size >= 8):
    raise ValueError(f"size must be an integer >= 8 (px of the short side), got {size!r}.")
  frames = _as_uint8(frames)
  t = len(frames)
  if t < 2:
    return 0.0
  stride = max(1, int(round(fps / sample_fps)))
  if -(-t // stride) < 2:  # a clip shorter than one sampling interval: compare neighbours
    stride = 1
  grays = [_gray(frame, int(size)) for frame in frames[::stride]]
  magnitudes = []
  for prev, nxt in zip(grays[:-1], grays[1:]):
    flow = cv2.calcOpticalFlowFarneback(
        prev,
        nxt,
        None,
        FARNEBACK_PYR_SCALE,
        FARNEBACK_LEVELS,
        FARNEBACK_WINSIZE,
        FARNEBACK_ITERATIONS,
        FARNEBACK_POLY_N,
        FARNEBACK_POLY_SIGMA,
        FARNEBACK_FLAGS,
    )
    magnitudes.append(float(np.sqrt(np.square(flow, dtype=np.float64).sum(-1)).mean()))
  return float(np.mean(magnitudes)) / size * (fps / stride)


def motion_bucket_id(score, buckets_per_unit=DEFAULT_BUCKETS_PER_UNIT):
  """SVD's motion_bucket_id for a motion score: clip(round(score * buckets_per_unit), 0, 255).

  Scores beyond MAX_MOTION_BUCKET / buckets_per_unit (1 short side per second by default) all land
  in the top bucket, and negative ones in bucket 0, since SVD was trained on ids in [0, 255].
  `score` may be a number (returns an int) or an array (returns an int32 array of its shape).
  """
  if not (math.isfinite(buckets_per_unit) and buckets_per_unit > 0):
    raise ValueError(f"buckets_per_unit must be a finite number > 0, got {buckets_per_unit!r}.")
  scores = np.asarray(score, np.float64)
  if not np.isfinite(scores).all():
    raise ValueError(f"Motion scores must be finite, got {score!r}.")
  ids = np.clip(np.rint(scores * buckets_per_unit), 0, MAX_MOTION_BUCKET).astype(np.int32)
  return int(ids) if ids.ndim == 0 else ids
