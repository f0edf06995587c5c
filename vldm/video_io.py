"""Writing clips to GIF (Pillow) and MP4 (imageio with its bundled ffmpeg), and images to PNG.

Frames are (F, H, W, 3) (or one (H, W, 3) image), uint8 or float; floats are mapped from
`value_range` (default [0, 1]; diffusion outputs use (-1, 1)) to 0..255 and clipped. Paths may be
local or on an object store (gs://...; through etils.epath).
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from typing import Sequence

import numpy as np
from etils import epath


def to_uint8(frames, value_range: Sequence[float] = (0.0, 1.0)) -> np.ndarray:
  """(F, H, W, 3) uint8 frames from uint8 or float frames (one image becomes one frame)."""
  frames = np.asarray(frames)
  if frames.ndim == 3:
    frames = frames[None]
  if frames.ndim != 4 or frames.shape[-1] not in (1, 3):
    raise ValueError(f"Expected frames of shape (F, H, W, 3) or (H, W, 3); got {frames.shape}.")
  if frames.shape[-1] == 1:
    frames = np.repeat(frames, 3, axis=-1)
  if frames.dtype == np.uint8:
    return frames
  if not np.issubdtype(frames.dtype, np.floating):
    raise ValueError(f"Frames must be uint8 or float; got {frames.dtype}.")
  low, high = value_range
  scaled = (frames.astype(np.float32) - low) / (high - low)
  return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_gif(frames, path: str, *, fps: float = 8.0, value_range=(0.0, 1.0)) -> str:
  """Writes a looping GIF; returns `path`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  frames = to_uint8(frames, value_range)
  images = [Image.fromarray(frame) for frame in frames]
  buffer = io.BytesIO()
  images[0].save(
      buffer,
      format="GIF",
      save_all=True,
      append_images=images[1:],
      loop=0,
      duration=max(int(round(1000.0 / fps)), 10),
      optimize=False,
      disposal=1,
  )
  _write_bytes(path, buffer.getvalue())
  return path


def write_png(image, path: str, *, palette: bool = False, value_range=(0.0, 1.0)) -> str:
  """Writes one (H, W, 3) image as a PNG; returns `path`. `palette`: quantized to 256 colors
  (octree, no dithering): lossy, and a fifth of the size for the demo's grids."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  image = Image.fromarray(to_uint8(image, value_range)[0])
  if palette:
    image = image.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
  buffer = io.BytesIO()
  image.save(buffer, format="PNG", optimize=True)
  _write_bytes(path, buffer.getvalue())
  return path


def write_mp4(frames, path: str, *, fps: float = 8.0, value_range=(0.0, 1.0)) -> str:
  """Writes an H.264 MP4 (yuv420p; odd sizes are padded to even); returns `path`."""
  import imageio.v2 as imageio  # pylint: disable=g-import-not-at-top

  frames = to_uint8(frames, value_range)
  pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
  if pad_h or pad_w:
    frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
  with tempfile.TemporaryDirectory() as folder:  # ffmpeg writes to a local file
    local = os.path.join(folder, "clip.mp4")
    with imageio.get_writer(
        local,
        format="FFMPEG",
        mode="I",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=1,
    ) as writer:
      for frame in frames:
        writer.append_data(frame)
    with open(local, "rb") as f:
      _write_bytes(path, f.read())
  return path


def _write_bytes(path: str, data: bytes) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def read_frames(path: str) -> np.ndarray:
  """(F, H, W, 3) uint8 frames of a GIF or MP4 (for tests and evaluation)."""
  import imageio.v3 as iio  # pylint: disable=g-import-not-at-top

  frames = np.asarray(iio.imread(path, index=None))
  if frames.ndim == 3:
    frames = frames[None]
  return frames[..., :3]


VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".gif")


def list_videos(folder: str, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> list[str]:
  """Sorted paths (relative to folder, '/'-separated) of the video files under `folder`, at any
  depth; empty when there are none (callers say what they looked for)."""
  extensions = tuple(e.lower() for e in extensions)
  files = []
  for root, _, names in os.walk(folder):
    for name in names:
      if name.lower().endswith(extensions):
        files.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
  return sorted(files)


def tile(clips, columns=None, gutter_value: int = 64) -> np.ndarray:
  """Clips [B, F, H, W, 3] (or images [B, H, W, 3]), uint8 → one grid clip [F, H', W', 3].

  Clips fill a near-square grid row by row, separated by 1-pixel gray gutters.
  """
  clips = np.asarray(clips)
  if clips.ndim == 4:
    clips = clips[:, None]
  b, f, h, w, c = clips.shape
  columns = columns or math.ceil(math.sqrt(b))
  rows = math.ceil(b / columns)
  out = np.full((f, rows * (h + 1) - 1, columns * (w + 1) - 1, c), gutter_value, clips.dtype)
  for i in range(b):
    r, col = divmod(i, columns)
    out[:, r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = clips[i]
  return out
