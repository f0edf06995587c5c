"""Test helpers: tiny real video files and captioned video folders (`import media`).

Tests import it as a sibling module (tests/ is not a package), like `parity`.
"""

import json
import os

import imageio.v3 as iio
import numpy as np

# The readable clips of write_video_folder: file -> (frames, height, width, fps, caption).
FOLDER_CLIPS = {
    "square_8fps.mp4": (12, 48, 64, 8, "a square drifting at eight frames a second"),
    "square_12fps.mp4": (30, 64, 48, 12, "a square sliding in a tall frame"),
    "square_24fps.mp4": (48, 40, 40, 24, "a square crossing a square frame"),
    "square_30fps.mp4": (60, 72, 56, 30, "a square moving at thirty frames a second"),
}
UNREADABLE = "garbage.mp4"
TOO_SHORT = "two_frames.mp4"
MISSING = "not_there.mp4"


def write_video(path, frames, fps):
  """Writes uint8 frames [T, H, W, 3] (H, W even) as an H.264 MP4 at `fps`; returns `path`."""
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"Expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}.")
  if frames.shape[1] % 2 or frames.shape[2] % 2:
    raise ValueError(f"H.264 (yuv420p) needs even sizes, got {frames.shape[1]}x{frames.shape[2]}.")
  # macro_block_size=2: keep the size as is (imageio would otherwise resize to multiples of 16).
  iio.imwrite(path, frames, fps=fps, codec="libx264", macro_block_size=2)
  return path


def make_clip(num_frames, height, width, seed=0):
  """A square of a seeded colour moving over a seeded background: uint8 [T, H, W, 3].

  The square moves a pixel per frame (wrapping around), so neighbouring frames differ.
  """
  rng = np.random.default_rng(seed)
  background = rng.integers(0, 256, 3, dtype=np.uint8)
  colour = background + np.uint8(128)  # wraps: every channel 128 away, always visible
  side = max(2, min(height, width) // 4)
  y0, x0 = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
  dy, dx = rng.choice([-1, 1], 2)
  clip = np.broadcast_to(background, (num_frames, height, width, 3)).copy()
  for t in range(num_frames):
    y, x = (y0 + dy * t) % (height - side + 1), (x0 + dx * t) % (width - side + 1)
    clip[t, y : y + side, x : x + side] = colour
  return clip


def write_captions(path, rows):
  """Writes (file, caption) rows as CSV (header file,caption) or JSON lines (by the extension)."""
  with open(path, "w", encoding="utf-8", newline="") as f:
    if path.endswith(".jsonl"):
      f.writelines(json.dumps({"file": file, "caption": caption}) + "\n" for file, caption in rows)
    else:
      f.write("file,caption\n")
      f.writelines(f'{file},"{caption}"\n' for file, caption in rows)
  return path


def write_video_folder(folder, captions_format="csv", *, missing=False):
  """A small folder of real MP4s with a captions file, for data and recipe tests.

  Holds the 4 readable clips of FOLDER_CLIPS (sizes 48x64, 64x48, 40x40, 72x56; 8, 12, 24 and
  30 fps; 12 to 60 frames), an unreadable file (garbage bytes named .mp4), a 2-frame clip (too
  short), and captions.csv or captions.jsonl with a caption per file (plus a row for a file that
  does not exist when `missing`).

  Returns {'folder', 'captions' (path), 'files': file -> {frames, height, width, fps, caption},
  'good': readable files, 'bad': {'unreadable': [...], 'too_short': [...], 'missing': [...]}}.
  """
  if captions_format not in ("csv", "jsonl"):
    raise ValueError(f"captions_format must be 'csv' or 'jsonl', got {captions_format!r}.")
  os.makedirs(folder, exist_ok=True)
  files = {}
  for seed, (file, (frames, height, width, fps, caption)) in enumerate(FOLDER_CLIPS.items()):
    write_video(os.path.join(folder, file), make_clip(frames, height, width, seed), fps)
    files[file] = dict(frames=frames, height=height, width=width, fps=float(fps), caption=caption)
  write_video(os.path.join(folder, TOO_SHORT), make_clip(2, 32, 32, seed=7), 10)
  files[TOO_SHORT] = dict(frames=2, height=32, width=32, fps=10.0, caption="a clip of two frames")
  with open(os.path.join(folder, UNREADABLE), "wb") as f:
    f.write(b"\x00\x00\x00\x18ftypmp42 not a video at all " * 16)
  files[UNREADABLE] = dict(frames=0, height=0, width=0, fps=0.0, caption="garbage bytes")
  rows = [(file, info["caption"]) for file, info in files.items()]
  if missing:
    rows.append((MISSING, "a file that is not there"))
  captions = write_captions(os.path.join(folder, f"captions.{captions_format}"), rows)
  return dict(
      folder=folder,
      captions=captions,
      files=files,
      good=list(FOLDER_CLIPS),
      bad=dict(
          unreadable=[UNREADABLE], too_short=[TOO_SHORT], missing=[MISSING] if missing else []
      ),
  )
