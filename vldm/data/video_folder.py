"""TFDS builder for a folder of captioned videos (`vldm_video_folder`).

Input: a folder of videos (mp4, webm, gif, or anything imageio + ffmpeg reads) and a captions
file, CSV with a header or JSON lines, one row per clip with the keys
  file     path of the video, relative to the folder (aliases: video, path)
  caption  its caption (alias: text)
  fps      optional; overrides the frame rate read from the file
  split    optional; the split the clip goes to (default 'train')
Output: examples {'video': uint8 [T, R, R, 3] (shorter side resized to R, centre crop, at most
max_frames frames), 'caption', 'fps', 'file'}.

Files that are missing, unreadable or shorter than `min_frames` are skipped, never fatal: each is
logged, and the per-reason lists are kept in `builder.info.metadata['skipped']` (saved with the
dataset) and returned by `skipped_files(builder)`.
"""
import collections
import csv
import dataclasses
import json
import logging
import os

import imageio.v3 as iio
import numpy as np
import tensorflow_datasets as tfds

from vldm.data import transforms

log = logging.getLogger(__name__)

DEFAULT_FPS = 10.0  # when a file carries no frame rate
SKIP_REASONS = ("missing", "unreadable", "too_short")
_FILE_KEYS = ("file", "video", "path")
_CAPTION_KEYS = ("caption", "text")


@dataclasses.dataclass
class VideoFolderConfig(tfds.core.BuilderConfig):
  """folder: the videos; captions: CSV/JSONL file (relative to folder unless absolute)."""
  folder: str = ""
  captions: str = "captions.csv"
  resolution: int = 64
  min_frames: int = 8
  max_frames: int = 64  # 0: keep every frame


def read_captions(path):
  """Rows of a CSV (with header) or JSON-lines captions file as dicts {file, caption, fps, split}."""
  with open(path, newline="", encoding="utf-8") as f:
    if str(path).endswith((".jsonl", ".json")):
      raw = [json.loads(line) for line in f if line.strip()]
    else:
      raw = list(csv.DictReader(f))
  rows = []
  for n, row in enumerate(raw):
    file = next((row[k] for k in _FILE_KEYS if row.get(k)), None)
    caption = next((row[k] for k in _CAPTION_KEYS if row.get(k) is not None), None)
    if file is None or caption is None:
      raise ValueError(f"{path}, row {n + 1}: every row needs a file ({'/'.join(_FILE_KEYS)}) and "
                       f"a caption ({'/'.join(_CAPTION_KEYS)}); got keys {sorted(row)}.")
    fps = row.get("fps")
    rows.append(dict(file=str(file), caption=str(caption),
                     fps=float(fps) if fps not in (None, "") else None,
                     split=str(row.get("split") or "train")))
  return rows


def read_video(path, max_frames=0):
  """Frames uint8 [T, H, W, 3] (at most max_frames if > 0) and the frame rate (None if unknown)."""
  frames = []
  for frame in iio.imiter(path):
    frames.append(transforms.to_rgb(frame))
    if max_frames and len(frames) >= max_frames:
      break
  fps = None
  try:
    meta = iio.immeta(path)
    if meta.get("fps"):
      fps = float(meta["fps"])
    elif meta.get("duration"):  # GIF: milliseconds per frame
      fps = 1000.0 / float(meta["duration"])
  except Exception:  # pylint: disable=broad-except  # a frame rate is optional
    pass
  if not frames:
    raise ValueError(f"{path} holds no frames.")
  return np.stack(frames), fps


class VldmVideoFolder(tfds.core.GeneratorBasedBuilder):
  """Captioned videos from a local folder; pass a VideoFolderConfig (see video_folder_builder)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, *, config=None, **kwargs):
    super().__init__(config=config, **kwargs)
    self.skipped = collections.defaultdict(list)  # reason -> files, filled while generating

  def _info(self):
    r = self.builder_config.resolution
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Video(shape=(None, r, r, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "fps": tfds.features.Scalar(np.float32),
            "file": tfds.features.Text(),
        }),
        description=__doc__,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    if not c.folder or not os.path.isdir(c.folder):
      raise ValueError(f"VideoFolderConfig.folder must be an existing folder, got {c.folder!r}.")
    captions = os.path.join(c.folder, c.captions)
    if not os.path.isfile(captions):
      raise ValueError(f"Captions file {captions!r} not found (CSV with a header, or JSON lines).")
    rows = read_captions(captions)
    by_split = collections.defaultdict(list)
    for key, row in enumerate(rows):
      by_split[row["split"]].append((key, row))
    self.skipped.clear()
    self.info.metadata["skipped"] = {reason: [] for reason in SKIP_REASONS}
    return {split: self._generate_examples(split_rows) for split, split_rows in by_split.items()}

  def _generate_examples(self, rows):
    c = self.builder_config
    for key, row in rows:
      path = os.path.join(c.folder, row["file"])
      example = self._load(path, row)
      if example is not None:
        yield key, example
    self._report()

  def _load(self, path, row):
    c = self.builder_config
    if not os.path.isfile(path):
      return self._skip("missing", row["file"], "no such file")
    try:
      frames, fps = read_video(path, c.max_frames)
    except Exception as e:  # pylint: disable=broad-except  # any decoder failure skips the file
      first_line = (str(e).strip().splitlines() or [""])[0]
      return self._skip("unreadable", row["file"], f"{type(e).__name__}: {first_line}")
    if len(frames) < c.min_frames:
      return self._skip("too_short", row["file"], f"{len(frames)} < {c.min_frames} frames")
    return {"video": transforms.resize_and_crop(frames, c.resolution),
            "caption": row["caption"],
            "fps": np.float32(row["fps"] or fps or DEFAULT_FPS),
            "file": row["file"]}

  def _skip(self, reason, file, detail):
    log.warning("vldm_video_folder: skipping %s (%s: %s)", file, reason, detail)
    self.skipped[reason].append(file)
    self.info.metadata["skipped"][reason].append(file)
    return None

  def _report(self):
    counts = {k: len(v) for k, v in self.skipped.items() if v}
    if counts:
      log.warning("vldm_video_folder %s: skipped %d file(s) so far: %s",
                      self.builder_config.name, sum(counts.values()), counts)


def video_folder_builder(folder, captions="captions.csv", resolution=64, min_frames=8,
                         max_frames=64, name=None, data_dir=None):
  """The `VldmVideoFolder` builder for a folder (not yet prepared).

  `name` names the config (and its directory under data_dir); by default
  `<folder basename>_<resolution>`. Building the same name again reuses the prepared data.
  """
  if resolution < 1 or min_frames < 1 or max_frames < 0:
    raise ValueError(f"Need resolution >= 1, min_frames >= 1, max_frames >= 0; got {resolution}, "
                     f"{min_frames}, {max_frames}.")
  if max_frames and max_frames < min_frames:
    raise ValueError(f"max_frames ({max_frames}) < min_frames ({min_frames}): nothing would fit.")
  folder = os.path.abspath(folder)
  name = name or f"{os.path.basename(folder.rstrip(os.sep)) or 'videos'}_{resolution}"
  config = VideoFolderConfig(name=name, folder=folder, captions=captions, resolution=resolution,
                             min_frames=min_frames, max_frames=max_frames,
                             description=f"videos of {folder} at {resolution}x{resolution}")
  return VldmVideoFolder(config=config, data_dir=data_dir)


def skipped_files(builder):
  """reason -> list of skipped files, from the build just run or from the saved dataset."""
  saved = builder.info.metadata.get("skipped") if builder.info.metadata is not None else None
  return {reason: list((saved or {}).get(reason, [])) for reason in SKIP_REASONS}


def skipped_count(builder):
  return sum(len(v) for v in skipped_files(builder).values())
