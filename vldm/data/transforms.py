"""Frame geometry and value transforms shared by the builders and the input pipeline (numpy)."""

import numpy as np
from PIL import Image


def to_rgb(frames):
  """uint8 frames [..., H, W] / [..., H, W, 1|3|4] -> [..., H, W, 3] (gray repeated, alpha dropped)."""
  frames = np.asarray(frames)
  if frames.dtype != np.uint8:
    raise ValueError(f"Expected uint8 frames, got {frames.dtype}.")
  if frames.ndim >= 3 and frames.shape[-1] in (1, 3, 4):
    if frames.shape[-1] == 3:
      return frames
    if frames.shape[-1] == 4:
      return frames[..., :3]
    return np.repeat(frames, 3, axis=-1)
  return np.repeat(frames[..., None], 3, axis=-1)


def crop_box(height, width, size, rng=None):
  """(top, left) of a size x size crop: centred, or uniformly random when rng is given."""
  if rng is None:
    return (height - size) // 2, (width - size) // 2
  return int(rng.integers(height - size + 1)), int(rng.integers(width - size + 1))


def short_side_shape(height, width, size):
  """(new height, new width) with the shorter side `size` and the aspect ratio kept (each side at
  least `size`)."""
  scale = size / min(height, width)
  return max(size, round(height * scale)), max(size, round(width * scale))


def resize_and_crop(frames, size, rng=None):
  """Resizes [T, H, W, 3] uint8 frames so the shorter side is `size`, then crops size x size.

  The crop is centred, or at a random position (the same for every frame) when rng is given.
  Frames already at size x size are returned unchanged.
  """
  t, h, w, _ = frames.shape
  if (h, w) == (size, size):
    return frames
  new_h, new_w = short_side_shape(h, w, size)
  if (new_h, new_w) != (h, w):
    # Bicubic with Pillow's antialiasing when shrinking.
    frames = np.stack(
        [np.asarray(Image.fromarray(f).resize((new_w, new_h), Image.BICUBIC)) for f in frames]
    )
  top, left = crop_box(new_h, new_w, size, rng)
  return frames[:, top : top + size, left : left + size]


def normalize(frames):
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return np.asarray(frames, np.float32) / np.float32(127.5) - np.float32(1)


def denormalize(frames):
  """float [-1, 1] -> uint8 [0, 255] (clipped, rounded)."""
  return np.clip(np.rint((np.asarray(frames, np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)
