"""The curation run: sharded, resumable scoring of a folder's videos, then filtering over all clips.

  run(config, input_dir, out_dir)

1. The videos of `input_dir` (sorted relative paths; video i goes to host i % process_count) are
   decoded once each: every frame feeds the cut cascade (`cuts`) at `analysis_size` (short side),
   and is kept at that size for the motion score and the report's thumbnails. When a model scorer
   runs, a second pass keeps each clip's first, middle and last frames at `score_size`.
2. Per clip: `vldm.data.motion.motion_score` at the file's frame rate, and the model scores the
   config's weights allow (`scorers`) on the first, middle and last frames.
3. Each video's record (its clips and their scores, or why it was unreadable) is appended to
   `OUT/scores-<host>.jsonl` as soon as it is scored, its thumbnails saved before, under
   `OUT/thumbs/`. A rerun skips the videos already recorded there; a partly written last line
   (a killed run) is dropped. Records depend on their video only, so a killed-and-rerun run ends
   with the records of an uninterrupted one.
4. Host 0 merges every host's records and applies the filters over all clips (`apply_filters`:
   a percentile of the clips, or an absolute threshold, per score), then writes
   `OUT/clips.jsonl` sorted by (file, start_frame) and `OUT/report.html` (`report`).
"""

import hashlib
import json
import logging
import math
import os
import sys
import time

import cv2
import imageio.v3 as iio
import numpy as np
import tqdm

from vldm import video_io
from vldm.curate import cuts as cuts_lib
from vldm.curate import jsonl
from vldm.curate import report
from vldm.data import motion as motion_lib
from vldm.data import transforms
from vldm.data import video_folder

log = logging.getLogger(__name__)

SCORES = ("motion", "clip_score", "aesthetic", "text_area")
# Which end of each score a filter drops: SVD drops still clips, unaesthetic ones, clips whose
# captions do not match, and clips covered in text.
DROPS = {"motion": "low", "clip_score": "low", "aesthetic": "low", "text_area": "high"}
VIDEO_EXTENSIONS = video_io.VIDEO_EXTENSIONS
THUMB_SIZE = 48
CLIPS_FILE = "clips.jsonl"


class CurationError(ValueError):
  """Bad input: the message says what was wrong and what is accepted."""


# ----------------------------------------------------------------------------------- inputs


def list_videos(folder, extensions=VIDEO_EXTENSIONS):
  """Sorted paths (relative to folder, '/'-separated) of the video files under `folder`."""
  if not folder or not os.path.isdir(folder):
    raise CurationError(f"--input must be an existing folder of videos; got {folder!r}.")
  files = video_io.list_videos(folder, extensions)
  if not files:
    raise CurationError(
        f"No videos found in {folder!r}: looked for files ending in {', '.join(extensions)} "
        "(config.extensions sets the list)."
    )
  return files


def load_captions(folder, captions=video_folder.DEFAULT_CAPTIONS):
  """file -> {'captions': [...], 'captioners': [...], 'fps': float or None} from the folder's
  captions file, read as `vldm.data.video_folder` reads it (CSV or JSON lines; several rows per
  file give several captions; an optional `captioner` column names each row's captioner, and
  'captioners' is parallel to 'captions', '' where unnamed). Without the default captions file
  (nor captions.jsonl) no video has captions; a captions file named in the config must exist."""
  try:
    path = video_folder.captions_path(folder, captions)
  except ValueError:
    if captions == video_folder.DEFAULT_CAPTIONS:
      return {}
    raise
  out = {}
  for row in video_folder.read_captions(path):
    entry = out.setdefault(row["file"], {"captions": [], "captioners": [], "fps": None})
    entry["captions"].extend(row["captions"])
    entry["captioners"].extend(row["captioners"])
    entry["fps"] = entry["fps"] or row["fps"]
  return out


def _videos(config, folder):
  return list_videos(folder, tuple(config.extensions.split(",")))


def shard(files, index, count):
  """The files of host `index` of `count`: file i goes to host i % count."""
  return files[index::count]


# ---------------------------------------------------------------------------------- scoring


def _resize_short(frame, size):
  """Shorter side to `size` (aspect kept); frames already that small are left as they are."""
  h, w = frame.shape[:2]
  if min(h, w) <= size:
    return frame
  new_h, new_w = transforms.short_side_shape(h, w, size)
  return cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_AREA)  # pylint: disable=no-member


class UnreadableVideo(Exception):
  """A video the decoder cannot open or read through: skipped and counted, not a crash."""


def _decoded_frames(path):
  """The file's frames (RGB uint8), decoder failures raised as UnreadableVideo; only errors of
  the decoder are turned into skips, so a bug elsewhere still stops the run."""
  frames = iio.imiter(path)
  try:
    while True:
      try:
        frame = next(frames)
      except StopIteration:
        return
      except (OSError, ValueError, RuntimeError, EOFError) as e:  # imageio/pyav's read errors
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise UnreadableVideo(f"{type(e).__name__}: {first_line}") from e
      yield transforms.to_rgb(frame)
  finally:
    frames.close()


def decode(path, fps, analysis_size, cut_options=cuts_lib.CutOptions()):
  """One decode pass: (cuts, every frame at analysis_size [T, ...]) — small frames only, so a long
  video fits in memory."""
  detector = cuts_lib.CutDetector(fps, cut_options)
  small = []
  for frame in _decoded_frames(path):
    s = _resize_short(frame, analysis_size)
    detector.add(s)
    small.append(s)
  if not small:
    raise UnreadableVideo("the file holds no frames")
  return detector.finish(), np.stack(small)


def frames_at(path, indices, size):
  """The frames `indices` (sorted or not, repeats allowed) at `size` (short side), from a second
  decode pass that keeps only those: the model scores read 3 frames a clip, not the whole video."""
  wanted = set(int(i) for i in indices)
  kept = {}
  for index, frame in enumerate(_decoded_frames(path)):
    if index in wanted:
      kept[index] = _resize_short(frame, size)
      if len(kept) == len(wanted):
        break
  missing = sorted(wanted - set(kept))
  if missing:
    raise UnreadableVideo(f"the second decode pass ended before frames {missing[:5]}")
  return np.stack([kept[int(i)] for i in indices])


def key_indices(start, end):
  """First, middle and last frame of [start, end)."""
  return [start, (start + end - 1) // 2, end - 1]


def score_video(folder, file, entry, config, scorers):
  """The record of one video: its clips and their scores (see the module docstring)."""
  path = os.path.join(folder, file)
  timings = {}
  t0 = time.perf_counter()
  meta_fps = video_folder.probe(path)[0]
  fps = float(entry.get("fps") or meta_fps or video_folder.DEFAULT_FPS)
  score_size = config.score_size if scorers is not None and scorers.names else 0
  cuts, small = decode(path, fps, config.analysis_size, _cut_options(config))
  ranges = cuts_lib.clip_ranges(cuts, len(small), config.min_frames, config.max_frames)
  timings["decode_and_cuts"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  clips = [
      {"start_frame": s, "end_frame": e, "motion": motion_lib.motion_score(small[s:e], fps)}
      for s, e in ranges
  ]
  timings["motion"] = time.perf_counter() - t0
  if score_size and ranges:
    t0 = time.perf_counter()
    indices = [i for s, e in ranges for i in key_indices(s, e)]
    keys = frames_at(path, indices, score_size)
    keys = keys.reshape((len(ranges), 3) + keys.shape[1:])
    for name, values in scorers.score(keys, entry.get("captions", [])).items():
      for clip, value in zip(clips, values):
        clip[name] = value
    timings["models"] = time.perf_counter() - t0
  thumbs = (
      np.stack(
          [transforms.resize_and_crop(small[key_indices(s, e)], THUMB_SIZE) for s, e in ranges]
      )
      if ranges
      else np.zeros((0, 3, THUMB_SIZE, THUMB_SIZE, 3), np.uint8)
  )
  return {
      "file": file,
      "fps": fps,
      "num_frames": len(small),
      "cuts": cuts,
      "captions": list(entry.get("captions", [])),
      # Only where named: records (and clip lists) without captioners stay as they were.
      **({"captioners": list(entry["captioners"])} if any(entry.get("captioners", ())) else {}),
      "clips": clips,
      "seconds": timings,
  }, thumbs


def _cut_options(config):
  return cuts_lib.CutOptions(**config.cuts.to_dict())  # configs/curate.py's keys are its fields


# ------------------------------------------------------------------------------- score files


def scores_path(out_dir, host):
  return os.path.join(out_dir, f"scores-{host}.jsonl")


def thumbs_path(out_dir, file):
  return os.path.join(out_dir, "thumbs", hashlib.sha1(file.encode()).hexdigest()[:20] + ".npy")


def read_records(path, repair=False):
  """The complete records of a score file. A last line without its newline or not valid JSON (a
  run killed while writing it) is ignored, and with `repair` cut off the file, so that appending
  starts on a fresh line."""
  if not os.path.isfile(path):
    return []
  with open(path, "rb") as f:
    data = f.read()
  records, good = [], 0
  for line in data.splitlines(keepends=True):
    if not line.endswith(b"\n"):
      break
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      break
    good += len(line)
  if repair and good < len(data):
    log.warning("vldm.curate: dropping a partly written record at the end of %s", path)
    with open(path, "r+b") as f:
      f.truncate(good)
  return records


def _append(path, record):
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _save_thumbs(path, thumbs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.npy"
  np.save(tmp, thumbs)
  os.replace(tmp, path)


def score_shard(
    config, input_dir, out_dir, host, host_count, scorers=None, captions=None, videos=None
):
  """Scores this host's videos (of `videos`, default all of input_dir's) not yet in its score
  file; returns the number scored now."""
  videos = _videos(config, input_dir) if videos is None else videos
  files = shard(videos, host, host_count)
  captions = load_captions(input_dir, config.captions) if captions is None else captions
  os.makedirs(out_dir, exist_ok=True)
  path = scores_path(out_dir, host)
  done = {r["file"] for r in read_records(path, repair=True)}
  todo = [f for f in files if f not in done]
  if config.max_videos:
    todo = todo[: config.max_videos]
  progress = tqdm.tqdm(
      todo, desc=f"curate host {host}", unit="video", disable=not sys.stderr.isatty()
  )
  for file in progress:
    try:
      record, thumbs = score_video(input_dir, file, captions.get(file, {}), config, scorers)
    except UnreadableVideo as e:
      log.warning("vldm.curate: skipping unreadable %s (%s)", file, e)
      record, thumbs = {"file": file, "error": str(e)}, None
    if thumbs is not None:
      _save_thumbs(thumbs_path(out_dir, file), thumbs)
    _append(path, record)
  return len(todo)


# --------------------------------------------------------------------------------- filtering


def apply_filters(rows, filters):
  """Sets each row's 'kept' and 'dropped_by'; returns {filter: its summary}.

  `filters`: name -> {'percentile', 'threshold'}. A threshold (not None) drops clips below it
  (above it for text_area); else the `percentile` % of the clips with a score at the bad end are
  dropped (by rank: ties broken by file and start frame, so the count is exact). Scores that no
  clip has are skipped; a clip without the score passes that filter.
  """
  for row in rows:
    row["dropped_by"] = []
  summary = {}
  for name in SCORES:
    if name not in filters:
      continue
    scored = [r for r in rows if r.get(name) is not None]
    if not scored:
      continue
    spec = filters[name]
    high = DROPS[name] == "high"
    sign = -1.0 if high else 1.0
    order = sorted(scored, key=lambda r, n=name, k=sign: (k * r[n], r["file"], r["start_frame"]))
    if spec.get("threshold") is not None:
      threshold = float(spec["threshold"])
      dropped = [r for r in order if (r[name] > threshold if high else r[name] < threshold)]
      mode = "threshold"
    else:
      count = int(math.floor(len(order) * float(spec.get("percentile") or 0.0) / 100.0 + 0.5))
      dropped = order[:count]
      mode = "percentile"
      if 0 < count < len(order):
        threshold = (order[count - 1][name] + order[count][name]) / 2.0
      elif count:
        threshold = order[-1][name]
      else:
        threshold = None
    for r in dropped:
      r["dropped_by"].append(name)
    summary[name] = {
        "mode": mode,
        "percentile": spec.get("percentile"),
        "threshold": threshold,
        "dropped": len(dropped),
        "scored": len(scored),
        "drops": DROPS[name],
    }
  for row in rows:
    row["kept"] = not row["dropped_by"]
  return summary


def merge(out_dir, host_count, filters):
  """(clip rows sorted by (file, start_frame), records, filter summary) from every host's file."""
  records = {}
  for host in range(host_count):
    for record in read_records(scores_path(out_dir, host)):
      records.setdefault(record["file"], record)
  rows = []
  for file in sorted(records):
    record = records[file]
    for clip in record.get("clips", ()):
      row = {
          "file": file,
          "start_frame": clip["start_frame"],
          "end_frame": clip["end_frame"],
          "fps": record["fps"],
      }
      captions = record.get("captions") or []
      if record.get("captioners"):  # named: a list parallel to `captions`, '' where unnamed
        row["captions"], row["captioners"] = captions, record["captioners"]
      elif len(captions) == 1:
        row["caption"] = captions[0]
      elif captions:
        row["captions"] = captions
      row.update({name: clip[name] for name in SCORES if clip.get(name) is not None})
      rows.append(row)
  rows.sort(key=lambda r: (r["file"], r["start_frame"]))
  summary = apply_filters(rows, filters)
  return rows, [records[f] for f in sorted(records)], summary


def filters_from_config(config):
  return {name: dict(config.filters[name]) for name in SCORES if name in config.filters}


def run(config, input_dir, out_dir, host=None, host_count=None):
  """The whole run (see the module docstring); returns {'rows', 'records', 'filters'} on host 0,
  None on the other hosts."""
  import jax  # pylint: disable=g-import-not-at-top

  host = jax.process_index() if host is None else host
  host_count = jax.process_count() if host_count is None else host_count
  validate(config)
  from vldm.curate import ffmpeg_cuts  # pylint: disable=g-import-not-at-top

  ffmpeg_cuts.validate(config)  # a bad export setting or no ffmpeg fails before the scoring
  videos = _videos(config, input_dir)  # bad input fails before the models load
  captions = load_captions(input_dir, config.captions)
  scorers = None
  if config.clip or config.aesthetic_weights or config.craft_weights:
    from vldm.curate import scorers as scorers_lib  # pylint: disable=g-import-not-at-top

    scorers = scorers_lib.Scorers(config)
  score_shard(config, input_dir, out_dir, host, host_count, scorers, captions, videos)
  if host_count > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices("vldm.curate: every shard scored")
  if host != 0:
    return None
  rows, records, summary = merge(out_dir, host_count, filters_from_config(config))
  exported = ffmpeg_cuts.export(config, input_dir, out_dir, rows, records)  # sets rows' clip_file
  jsonl.write_atomic(os.path.join(out_dir, CLIPS_FILE), rows)
  # Where the rows' files are: a recipe given data=OUT/clips.jsonl reads them from there.
  with open(os.path.join(out_dir, video_folder.CURATION_MANIFEST), "w", encoding="utf-8") as f:
    json.dump({"input": os.path.abspath(input_dir)}, f)
  report.write_report(
      out_dir, rows, records, summary, SCORES, lambda file: np.load(thumbs_path(out_dir, file))
  )
  return {"rows": rows, "records": records, "filters": summary, "export": exported}


def validate(config):
  """Raises CurationError for settings that cannot work."""
  if config.analysis_size < motion_lib.DEFAULT_SIZE:
    raise CurationError(
        f"config.analysis_size must be >= {motion_lib.DEFAULT_SIZE} (the motion "
        f"score's frame size); got {config.analysis_size}."
    )
  try:
    cuts_lib.clip_ranges([], 1, config.min_frames, config.max_frames)
  except ValueError as e:
    raise CurationError(f"config.min_frames / config.max_frames: {e}") from e
  for name in config.filters:
    if name not in SCORES:
      raise CurationError(f"config.filters.{name}: unknown score; accepted: {', '.join(SCORES)}.")
    percentile = config.filters[name].percentile
    if not 0 <= percentile <= 100:
      raise CurationError(
          f"config.filters.{name}.percentile must be in [0, 100]; got {percentile}."
      )
