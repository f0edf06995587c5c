"""TFDS builder for a folder of captioned videos (`vldm_video_folder`).

Input: a folder of videos (mp4, webm, gif, or anything imageio + ffmpeg reads) and a captions
file, CSV with a header or JSON lines, one row per clip with the keys
  file       path of the video, relative to the folder (aliases: video, path)
  caption    its caption (alias: text)
  captioner  optional; the name of the captioner that wrote the row's caption(s), which
             data.caption_weights weighs in training (see vldm.data.pipeline)
  captions, captioners   JSON lines, instead of caption / captioner: the clip's several captions,
             and optionally their captioners' names (a list parallel to captions; '' unnamed)
  fps        optional; overrides the frame rate read from the file
  split      optional; the split the clip goes to (default 'train')
  start_frame, end_frame   optional; the clip is that frame range of the file (end exclusive)
  kept       optional; rows with kept false are skipped
A curated clip list (`python -m vldm.curate`'s OUT/clips.jsonl: several rows per file, a
`captions` list where a clip has several, with `captioners` where they are named) is such a file;
its rows without a caption get the empty one (a warning says how many).
Without `captions`' default name, 'captions.csv', in the folder, 'captions.jsonl' is used.
Output: examples {'video': uint8 [T, R, R, 3] (shorter side resized to R, centre crop), 'caption'
(the first caption), 'captions' (all of the row's; empty for an uncaptioned clip), 'captioners'
(parallel to 'captions', '' where unnamed), 'fps', 'file', 'start_frame', 'motion'}. Training
reads 'caption', or with data.max_captions > 1 samples among 'captions' (vldm.data.pipeline).
'motion' (float32) is the segment's global motion score, `vldm.data.motion.motion_score` of its
stored frames at its fps (SVD's Farnebäck flow at 2 fps), in frame short sides per second: so it
does not depend on the resolution or frame rate, and maps to SVD's motion_bucket_id.

Clips: a file's frames are taken at a stride, round(file fps / target_fps) (>= 1; 1 without
target_fps), so the stored 'fps' is file fps / stride (the file's fps: the captions row's, else the
file's, else DEFAULT_FPS). The strided frames are cut into segments of `max_frames` frames (0: one
segment, the whole video); a last segment shorter than `min_frames` is dropped. Each segment is an
example; at most `clips_per_video` of them per file (0: all), spread evenly over the video.
'start_frame' is the file's frame index of an example's first frame. Frames are decoded streaming,
so only the frames of the segment being filled are held.

Files that are missing, unreadable or shorter than `min_frames` (after the stride) are skipped,
never fatal: each is logged, and the per-reason lists are kept in
`builder.info.metadata['skipped']` (saved with the dataset) and returned by
`skipped_files(builder)`.
A split of which no file could be read, and a folder without a captions file, are errors.
"""

import collections
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
from typing import Optional

import imageio.v3 as iio
import numpy as np
import tensorflow_datasets as tfds

from vldm.data import motion as motion_lib
from vldm.data import transforms

log = logging.getLogger(__name__)

DEFAULT_FPS = 10.0  # when a file carries no frame rate
DEFAULT_CAPTIONS = "captions.csv"
FALLBACK_CAPTIONS = "captions.jsonl"  # used when the default captions file is absent
CURATION_MANIFEST = "curation.json"  # {'input': folder}: beside a curated clip list
DEFAULT_CLIPS_PER_VIDEO = 8
SKIP_REASONS = ("missing", "unreadable", "too_short")
_FILE_KEYS = ("file", "video", "path")
_CAPTION_KEYS = ("caption", "text")


@dataclasses.dataclass
class VideoFolderConfig(tfds.core.BuilderConfig):
  """folder: the videos; captions: CSV/JSONL file (relative to folder unless absolute)."""

  folder: str = ""
  captions: str = DEFAULT_CAPTIONS
  resolution: int = 64
  min_frames: int = 8
  max_frames: int = 64  # frames per segment; 0: one segment, every (strided) frame
  target_fps: Optional[float] = None  # None: every frame of the file (stride 1)
  clips_per_video: int = DEFAULT_CLIPS_PER_VIDEO  # 0: every segment


def read_captions(path):
  """Rows of a CSV (with header) or JSON-lines captions file as dicts {file, caption, captions (all
  of the row's: a clip list's `captions` list), captioners (parallel to captions: the names from
  `captioners`, else the row's `captioner` for each, else ''), fps, split, start_frame,
  end_frame}; rows with kept false are left out. `captioners` of another length than the row's
  captions is a ValueError naming the file and row."""
  with open(path, newline="", encoding="utf-8") as f:
    if str(path).endswith((".jsonl", ".json")):
      raw = [json.loads(line) for line in f if line.strip()]
    else:
      raw = list(csv.DictReader(f))
  rows, uncaptioned = [], 0
  for n, row in enumerate(raw):
    if _is_false(row.get("kept")):  # a curated clip list's dropped clip
      continue
    file = next((row[k] for k in _FILE_KEYS if row.get(k)), None)
    caption = next((row[k] for k in _CAPTION_KEYS if row.get(k) is not None), None)
    captions = [str(c) for c in row.get("captions") or ()] if caption is None else [str(caption)]
    if captions:
      caption = captions[0]  # a clip list's several captions: training reads the first
    elif "end_frame" in row:
      caption = ""  # a clip list's uncaptioned clip: usable where captions are not (image-to-video)
      uncaptioned += 1
    if file is None or caption is None:
      raise ValueError(
          f"{path}, row {n + 1}: every row needs a file ({'/'.join(_FILE_KEYS)}) and "
          f"a caption ({'/'.join(_CAPTION_KEYS)}, or a non-empty 'captions' list); "
          f"got keys {sorted(row)}."
      )
    captioners = _captioners(row, captions, path, n)
    fps = row.get("fps")
    window = [_optional_int(row.get(k), k, path, n) for k in ("start_frame", "end_frame")]
    if window[1] is not None and window[1] <= (window[0] or 0):
      raise ValueError(
          f"{path}, row {n + 1}: end_frame {window[1]} must be > start_frame "
          f"{window[0] or 0} (end exclusive)."
      )
    rows.append(
        dict(
            file=str(file),
            caption=str(caption),
            captions=captions,
            captioners=captioners,
            fps=float(fps) if fps not in (None, "") else None,
            split=str(row.get("split") or "train"),
            start_frame=window[0] or 0,
            end_frame=window[1],
        )
    )
  if uncaptioned:
    log.warning("%s: %d clip(s) have no caption; they get the empty caption.", path, uncaptioned)
  return rows


def _captioners(row, captions, path, n):
  """The names of the row's captions' captioners: a list parallel to `captions`, '' unnamed."""
  names = row.get("captioners")
  if names is None:
    name = row.get("captioner")
    return [str(name) if name is not None else ""] * len(captions)
  if isinstance(names, str) or not isinstance(names, (list, tuple)) or len(names) != len(captions):
    raise ValueError(
        f"{path}, row {n + 1}: 'captioners' must be a list parallel to the row's captions "
        f"(one name per caption, '' where unnamed); got {names!r} for {len(captions)} "
        f"caption(s)."
    )
  return [str(name) if name is not None else "" for name in names]


def _is_false(value):
  return value is False or (isinstance(value, str) and value.strip().lower() in ("false", "0"))


def _optional_int(value, key, path, n):
  if value in (None, ""):
    return None
  try:
    number = int(value)
  except (TypeError, ValueError):
    number = None
  if number is None or number < 0 or number != float(value):
    raise ValueError(f"{path}, row {n + 1}: {key} must be a frame index >= 0; got {value!r}.")
  return number


def clip_list_folder(clip_list):
  """The folder whose files a clip list's rows name: the 'input' of the `python -m vldm.curate`
  manifest beside it (CURATION_MANIFEST), else the list's own folder."""
  here = os.path.dirname(os.path.abspath(clip_list))
  manifest = os.path.join(here, CURATION_MANIFEST)
  if not os.path.isfile(manifest):
    return here
  with open(manifest, encoding="utf-8") as f:
    return json.load(f)["input"]


def captions_path(folder, captions=DEFAULT_CAPTIONS):
  """The captions file to read: `captions` (relative to folder), or captions.jsonl when the default
  captions.csv is absent. Raises ValueError naming what was looked for."""
  path = os.path.join(folder, captions)
  if os.path.isfile(path):
    return path
  looked_for = [path]
  if captions == DEFAULT_CAPTIONS:
    fallback = os.path.join(folder, FALLBACK_CAPTIONS)
    if os.path.isfile(fallback):
      return fallback
    looked_for.append(fallback)
  raise ValueError(
      f"No captions file for the videos in {folder!r}: looked for "
      f"{' and '.join(repr(p) for p in looked_for)}. Add one (CSV with a header, or "
      f"JSON lines; a row per video with file and caption), or name yours with "
      f"captions= / data.captions."
  )


def probe(path):
  """(fps, number of frames) from the file's metadata, without decoding; each None if unknown.

  The count is duration x fps for ffmpeg's formats, so it may be off by a frame.
  """
  fps = num_frames = None
  try:
    meta = iio.immeta(path)
  except Exception:  # pylint: disable=broad-except  # both are optional; reading will tell
    meta = {}
  try:
    if meta.get("fps"):
      fps = float(meta["fps"])
      duration = meta.get("duration")  # ffmpeg: seconds
      if duration and math.isfinite(float(duration)):
        num_frames = int(round(float(duration) * fps))
    elif meta.get("duration"):  # GIF: milliseconds per frame
      fps = 1000.0 / float(meta["duration"])
    if num_frames is None and "fps" not in meta:  # ffmpeg would report inf here
      n = iio.improps(path).n_images
      if n is not None and math.isfinite(n):
        num_frames = int(n)
  except Exception:  # pylint: disable=broad-except
    pass
  return fps, num_frames


def read_video(path, max_frames=0):
  """Frames uint8 [T, H, W, 3] (at most max_frames if > 0) and the frame rate (None if unknown)."""
  frames = []
  for frame in iio.imiter(path):
    frames.append(transforms.to_rgb(frame))
    if max_frames and len(frames) >= max_frames:
      break
  if not frames:
    raise ValueError(f"{path} holds no frames.")
  return np.stack(frames), probe(path)[0]


def frame_stride(fps, target_fps):
  """Source frames per kept frame: fps / target_fps rounded half up, >= 1 (1 without a target)."""
  if not target_fps:
    return 1
  return max(1, int(math.floor(fps / target_fps + 0.5)))


def num_segments(num_frames, stride, min_frames, max_frames):
  """Segments of a video of `num_frames` source frames (see the module docstring)."""
  kept = -(-num_frames // stride)
  if not max_frames:
    return int(kept >= min_frames)
  return kept // max_frames + int(kept % max_frames >= min_frames)


def chosen_segments(count, clips_per_video):
  """Indices of the segments to keep out of `count`: all, or `clips_per_video` spread evenly
  (first and last included). None: all (count unknown or within the cap)."""
  if not clips_per_video or count is None or count <= clips_per_video:
    return None
  return sorted({int(i) for i in np.linspace(0, count - 1, clips_per_video).round()})


def iter_segments(
    path,
    stride,
    min_frames,
    max_frames,
    clips_per_video=0,
    num_frames=None,
    resolution=None,
    start_frame=0,
    end_frame=None,
):
  """Yields (start_frame, frames uint8 [T, H, W, 3]) for the segments of the video at `path`.

  Decodes once, streaming, holding only the frames of the segment being filled, each resized
  (shorter side) and centre-cropped to `resolution` as it is read when given. `num_frames` (an
  estimate is fine) spreads capped segments over the video; unknown with a cap, a first pass counts
  the frames. Only the frames [start_frame, end_frame) are used (a clip list's clip; end None: to
  the end); segments start at start_frame. Decoder errors propagate.
  """
  if clips_per_video and num_frames is None and end_frame is None:
    num_frames = sum(1 for _ in iio.imiter(path))
  if end_frame is not None:
    num_frames = end_frame if num_frames is None else min(num_frames, end_frame)
  if num_frames is not None:
    num_frames = max(0, num_frames - start_frame)
  chosen = None
  if max_frames and num_frames is not None:
    chosen = chosen_segments(
        num_segments(num_frames, stride, min_frames, max_frames), clips_per_video
    )
  limit = len(chosen) if chosen is not None else (clips_per_video or math.inf)
  if not max_frames:
    limit = 1
  wanted = set(chosen) if chosen is not None else None
  emitted = 0
  segment, start, frames = None, None, []
  frame_iter = iio.imiter(path)
  try:
    for i, frame in enumerate(frame_iter):
      if end_frame is not None and i >= end_frame:
        break
      j = i - start_frame  # the frame's place in the clip
      if j < 0 or j % stride:
        continue
      index = (j // stride // max_frames) if max_frames else 0
      if index != segment:  # a new segment starts; the previous one was full or skipped
        segment, start, frames = index, i, []
      if wanted is not None and index not in wanted:
        if index > max(wanted):
          break
        continue
      frame = transforms.to_rgb(frame)
      if resolution:  # small frames held, whatever the file's size
        frame = transforms.resize_and_crop(frame[None], resolution)[0]
      frames.append(frame)
      if max_frames and len(frames) == max_frames:
        yield start, np.stack(frames)
        emitted, frames = emitted + 1, []
        if emitted >= limit:
          break
    if frames and len(frames) >= min_frames and emitted < limit:
      yield start, np.stack(frames)
  finally:
    frame_iter.close()  # stops the decoder when we leave early


class VldmVideoFolder(tfds.core.GeneratorBasedBuilder):
  """Captioned videos from a local folder; pass a VideoFolderConfig (see video_folder_builder)."""

  VERSION = tfds.core.Version("1.4.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "1.1.0": "Several clips (segments) per video at a target frame rate (target_fps, "
      "clips_per_video); 'start_frame' feature.",
      "1.2.0": "'motion' feature: each clip's motion score (frame short sides per second).",
      "1.3.0": "Clip lists: rows with start_frame / end_frame take that frame range of the file; "
      "rows with kept false are skipped (`python -m vldm.curate`'s clips.jsonl).",
      "1.4.0": "'captions' and 'captioners' features: every caption of a clip and the name of "
      "its captioner ('' where unnamed), for sampling among captions in training.",
  }

  def __init__(self, *, config=None, **kwargs):
    super().__init__(config=config, **kwargs)
    self.skipped = collections.defaultdict(list)  # reason -> files, filled while generating

  def _info(self):
    r = self.builder_config.resolution
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
            {
                "video": tfds.features.Video(shape=(None, r, r, 3), encoding_format="png"),
                "caption": tfds.features.Text(),  # the first of 'captions' ('' without)
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "captioners": tfds.features.Sequence(tfds.features.Text()),
                "fps": tfds.features.Scalar(np.float32),
                "file": tfds.features.Text(),
                "start_frame": tfds.features.Scalar(np.int64),
                "motion": tfds.features.Scalar(np.float32),
            }
        ),
        description=__doc__,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    if not c.folder or not os.path.isdir(c.folder):
      raise ValueError(f"VideoFolderConfig.folder must be an existing folder, got {c.folder!r}.")
    rows = read_captions(captions_path(c.folder, c.captions))
    by_split = collections.defaultdict(list)
    for key, row in enumerate(rows):
      by_split[row["split"]].append((key, row))
    self.skipped.clear()
    self.info.metadata["skipped"] = {reason: [] for reason in SKIP_REASONS}
    return {
        split: self._generate_examples(split, split_rows) for split, split_rows in by_split.items()
    }

  def _generate_examples(self, split, rows):
    c = self.builder_config
    seen = {reason: len(self.skipped[reason]) for reason in SKIP_REASONS}
    count = 0
    for key, row in rows:
      for start, example in self._load(os.path.join(c.folder, row["file"]), row):
        count += 1
        yield f"{key}/{start}", example  # row and first frame: unique, deterministic
    self._report()
    if not count:
      raise ValueError(self._nothing_read(split, {r: self.skipped[r][n:] for r, n in seen.items()}))

  def _nothing_read(self, split, skipped):
    c = self.builder_config
    counts = {reason: len(files) for reason, files in skipped.items() if files}
    examples = "; ".join(
        f"{reason}: {', '.join(files[:3])}{', ...' if len(files) > 3 else ''}"
        for reason, files in skipped.items()
        if files
    )
    return (
        f"No video of split {split!r} in {c.folder!r} could be read: skipped per reason "
        f"{counts or 'none (no rows)'}{' (' + examples + ')' if examples else ''}. Each file "
        f"must exist, be decodable by imageio + ffmpeg (mp4, webm, gif, ...) and hold at "
        f"least min_frames={c.min_frames} frames at the frame stride "
        f"(target_fps={c.target_fps})."
    )

  def _load(self, path, row):
    """Yields (start_frame, example) for the segments of one file; skips a bad file."""
    c = self.builder_config
    if not os.path.isfile(path):
      self._skip("missing", row["file"], "no such file")
      return
    emitted = 0
    try:
      meta_fps, num_frames = probe(path)
      fps = row["fps"] or meta_fps or DEFAULT_FPS
      stride = frame_stride(fps, c.target_fps)
      for start, frames in iter_segments(
          path,
          stride,
          c.min_frames,
          c.max_frames,
          c.clips_per_video,
          num_frames,
          c.resolution,
          row.get("start_frame", 0),
          row.get("end_frame"),
      ):
        emitted += 1
        segment_fps = fps / stride
        yield start, {
            "video": frames,
            "caption": row["caption"],
            "captions": row["captions"],
            "captioners": row["captioners"],
            "fps": np.float32(segment_fps),
            "file": row["file"],
            "start_frame": start,
            # Scored here, on the frames as stored, while they are in memory: once per clip.
            "motion": np.float32(motion_lib.motion_score(frames, segment_fps)),
        }
    except Exception as e:  # pylint: disable=broad-except  # any decoder failure skips the file
      first_line = (str(e).strip().splitlines() or [""])[0]
      if emitted:  # a truncated file: keep the segments read before the failure
        log.warning(
            "vldm_video_folder: %s ends early after %d clip(s) (%s: %s)",
            row["file"],
            emitted,
            type(e).__name__,
            first_line,
        )
      else:
        self._skip("unreadable", row["file"], f"{type(e).__name__}: {first_line}")
      return
    if not emitted:
      self._skip(
          "too_short",
          row["file"],
          f"fewer than {c.min_frames} frames at stride {stride}"
          + (f" (about {num_frames} frames)" if num_frames is not None else ""),
      )

  def _skip(self, reason, file, detail):
    log.warning("vldm_video_folder: skipping %s (%s: %s)", file, reason, detail)
    self.skipped[reason].append(file)
    self.info.metadata["skipped"][reason].append(file)

  def _report(self):
    counts = {k: len(v) for k, v in self.skipped.items() if v}
    if counts:
      log.warning(
          "vldm_video_folder %s: skipped %d file(s) so far: %s",
          self.builder_config.name,
          sum(counts.values()),
          counts,
      )


def video_folder_builder(
    folder,
    captions=DEFAULT_CAPTIONS,
    resolution=64,
    min_frames=8,
    max_frames=64,
    target_fps=None,
    clips_per_video=DEFAULT_CLIPS_PER_VIDEO,
    name=None,
    data_dir=None,
):
  """The `VldmVideoFolder` builder for a folder (not yet prepared).

  `name` names the config (and its directory under data_dir); by default
  `<folder basename>_<resolution>_<hash of the clip options>`, so that other min_frames,
  max_frames, target_fps or clips_per_video build anew. Building the same name again reuses the
  prepared data.
  """
  if resolution < 1 or min_frames < 1 or max_frames < 0 or clips_per_video < 0:
    raise ValueError(
        f"Need resolution >= 1, min_frames >= 1, max_frames >= 0, "
        f"clips_per_video >= 0; got {resolution}, {min_frames}, {max_frames}, "
        f"{clips_per_video}."
    )
  if max_frames and max_frames < min_frames:
    raise ValueError(f"max_frames ({max_frames}) < min_frames ({min_frames}): nothing would fit.")
  if target_fps is not None and not target_fps > 0:
    raise ValueError(
        f"target_fps must be > 0 (frames per second), or None to keep every frame; "
        f"got {target_fps}."
    )
  target_fps = float(target_fps) if target_fps is not None else None
  folder = os.path.abspath(folder)
  if not name:
    options = repr((captions, min_frames, max_frames, target_fps, clips_per_video))
    digest = hashlib.sha1(options.encode()).hexdigest()[:8]
    name = f"{os.path.basename(folder.rstrip(os.sep)) or 'videos'}_{resolution}_{digest}"
  config = VideoFolderConfig(
      name=name,
      folder=folder,
      captions=captions,
      resolution=resolution,
      min_frames=min_frames,
      max_frames=max_frames,
      target_fps=target_fps,
      clips_per_video=clips_per_video,
      description=f"videos of {folder} at {resolution}x{resolution}",
  )
  return VldmVideoFolder(config=config, data_dir=data_dir)


def skipped_files(builder):
  """reason -> list of skipped files, from the build just run or from the saved dataset."""
  saved = builder.info.metadata.get("skipped") if builder.info.metadata is not None else None
  return {reason: list((saved or {}).get(reason, [])) for reason in SKIP_REASONS}


def skipped_count(builder):
  return sum(len(v) for v in skipped_files(builder).values())
