"""Clip files for `python -m vldm.curate` (config.export): keyframe-aware ffmpeg cuts.

  export(config, input_dir, out_dir, rows, records)

config.export.mode:
  ranges    no files: the rows of OUT/clips.jsonl are frame ranges of the sources (the default).
  copy      stream copy (no re-encoding): each clip starts at the first keyframe at or after its
            start_frame, so that it decodes cleanly and holds no frame of the previous scene, and
            ends at or before its end_frame where the frames read so far in decoding order are
            exactly a run of frames (B-frames reorder: a P-frame sent before the B-frames it
            references would add a later frame). Clips left shorter than min_frames are skipped.
  reencode  frame-exact cuts re-encoded with libx264 at export.crf (for sources with sparse
            keyframes, where a stream copy would lose most of each clip).

Only kept clips are exported (export.include_dropped: all). The ffmpeg binary is imageio-ffmpeg's.

Keyframes: one `ffmpeg -i SRC -map 0:v:0 -c copy -f framecrc -` pass over the packets (demuxed,
not decoded) gives each video packet's dts, pts, key flag and checksum. A frame's index is the rank
of its packet's pts, which is the curator's frame index (imageio's decoding) when the packet count
equals the decoded frame count; a video where they differ (variable frame rate, invisible frames)
is not exported. A stream copy is cut with `-ss` just past its keyframe's time, `-frames:v N` and
`-avoid_negative_ts make_zero`, and checked: its packets' checksums must be the source's packets
of the clip, so a cut that started elsewhere is never kept.

Output, under OUT/clips/: `<source dir>/<source stem>_<start>-<end><ext>` (the clip's frame range
in the source, end exclusive, 6 digits; the source's container for copy, .mp4 for reencode), and
`OUT/clips/captions.jsonl`: a captioned video folder (`vldm_video_folder`, `data=OUT/clips`), one
row per exported clip with `file` its clip file, start_frame 0, end_frame its length, and the
source's `source_file`, `source_start_frame`, `source_end_frame`. The clip rows of
OUT/clips.jsonl get `clip_file` (relative to OUT), `clip_start_frame` and `clip_end_frame`, or
`clip_file` None and `export_skipped` (why).

Resumable: a clip is written to a temporary name and renamed when complete, so an existing clip
file is complete and is not redone; a partial one from a killed run is redone. Changing the mode
(or crf, preset for reencode) redoes every clip; files of clips no longer listed are removed.
"""

import bisect
import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import tqdm

from vldm.curate import jsonl

log = logging.getLogger(__name__)

MODES = ("ranges", "copy", "reencode")
X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
)
CLIPS_DIR = "clips"
EXPORTED_LIST = "captions.jsonl"  # the default captions file of a video folder: data=OUT/clips
SETTINGS_FILE = "export.json"
PARTIAL = ".partial"
DTS_HEURISTIC = 3 / 23  # seconds: ffmpeg's input seek margin for dts-indexed formats
NOPTS = -(2**63)  # AV_NOPTS_VALUE, as framecrc prints it
_KEY, _DISCARD = 0x1, 0x4  # AV_PKT_FLAG_*
_ROW_KEYS = ("clip_file", "clip_start_frame", "clip_end_frame", "export_skipped")


class ExportError(ValueError):
  """Export settings that cannot work, or an ffmpeg that is missing or fails on every clip."""


class FfmpegFailed(RuntimeError):
  """One ffmpeg command failed: its clip is skipped, not the run."""


# -------------------------------------------------------------------------------------- ffmpeg


@functools.lru_cache(maxsize=None)
def ffmpeg_exe():
  """The ffmpeg binary of imageio-ffmpeg (IMAGEIO_FFMPEG_EXE overrides it)."""
  try:
    import imageio_ffmpeg
  except ImportError as e:
    raise ExportError(
        "config.export.mode copy/reencode runs the ffmpeg binary of the imageio-ffmpeg package, "
        "which is not installed: `pip install imageio-ffmpeg` (or imageio[ffmpeg])."
    ) from e
  try:
    return imageio_ffmpeg.get_ffmpeg_exe()
  except RuntimeError as e:
    raise ExportError(
        f"config.export.mode copy/reencode needs ffmpeg: imageio-ffmpeg found none ({e}). "
        "Reinstall it with its binary (`pip install --force-reinstall imageio-ffmpeg`), or set "
        "IMAGEIO_FFMPEG_EXE to an ffmpeg binary."
    ) from e


@functools.lru_cache(maxsize=None)
def _fps_mode_option(exe):
  """`-fps_mode` (ffmpeg >= 5.1; 9 dropped the older `-vsync`), else `-vsync`."""
  out = subprocess.run([exe, "-version"], capture_output=True, text=True, check=False).stdout
  match = re.search(r"version n?(\d+)\.(\d+)", out)
  if match and (int(match[1]), int(match[2])) < (5, 1):
    return "-vsync"
  return "-fps_mode"


def _ffmpeg(exe, *args):
  """Runs ffmpeg quietly; its stdout. Raises FfmpegFailed with its last error line."""
  cmd = [exe, "-hide_banner", "-nostdin", "-loglevel", "error", *args]
  proc = subprocess.run(cmd, capture_output=True, check=False)
  if proc.returncode:
    lines = proc.stderr.decode(errors="replace").strip().splitlines()
    raise FfmpegFailed(f"ffmpeg exited with {proc.returncode}: {(lines or [''])[-1]}")
  return proc.stdout.decode(errors="replace")


# ------------------------------------------------------------------------------------- packets


@dataclasses.dataclass(frozen=True)
class Packets:
  """A video stream's packets in decoding order (framecrc's view of `-c copy`)."""

  frame: np.ndarray  # int64 [P]: the frame index (rank of the pts) of each packet; -1: no frame
  key: np.ndarray  # bool [P]
  crc: tuple  # each packet's checksum (framecrc's adler32)
  times: np.ndarray  # float64 [F]: each frame's presentation time, seconds (-ss's timeline)
  dts: np.ndarray  # float64 [P]: each packet's decoding time, seconds

  @property
  def num_frames(self):
    return len(self.times)

  @functools.cached_property
  def keyframes(self):
    """Sorted frame indices whose packet is a keyframe."""
    return sorted(int(f) for f, k in zip(self.frame, self.key) if k and f >= 0)

  @functools.cached_property
  def position(self):
    """frame index -> its packet's place in decoding order."""
    out = np.full(self.num_frames, -1, np.int64)
    framed = self.frame >= 0
    out[self.frame[framed]] = np.nonzero(framed)[0]
    return out

  def frame_duration(self, frame):
    """Seconds from `frame` to the next one (the previous gap for the last frame)."""
    if self.num_frames < 2:
      return 0.1
    i = min(frame, self.num_frames - 2)
    return max(float(self.times[i + 1] - self.times[i]), 1e-6)


def parse_framecrc(text):
  """Packets from the text of `ffmpeg -i SRC -map 0:v:0 -c copy -f framecrc -`."""
  tb = None
  dts, pts, flags, crcs = [], [], [], []
  for line in text.splitlines():
    line = line.strip()
    if line.startswith("#tb 0:"):
      num, den = line.split(":", 1)[1].strip().split("/")
      tb = int(num) / int(den)
    if not line or line.startswith("#"):
      continue
    fields = [f.strip() for f in line.split(",")]
    if fields[0] != "0":
      continue
    dts.append(int(fields[1]))
    pts.append(int(fields[2]))
    crcs.append(fields[5])
    flag = next((f[2:] for f in fields[6:] if f.startswith("F=")), None)
    flags.append(_KEY if flag is None else int(flag, 16))  # printed only when not exactly key
  if tb is None:
    raise FfmpegFailed("ffmpeg listed no video stream")
  dts = np.asarray(dts, np.int64)
  pts = np.asarray(pts, np.int64)
  flags = np.asarray(flags, np.int64)
  if np.any(pts == NOPTS):  # containers without pts (raw streams, some AVI): decoding order
    pts = np.where(pts == NOPTS, dts, pts)
  shown = (flags & _DISCARD) == 0  # an edit list's trimmed packets are decoded, not shown
  order = np.argsort(np.where(shown, pts, np.iinfo(np.int64).max), kind="stable")
  frame = np.full(len(pts), -1, np.int64)
  count = int(shown.sum())
  frame[order[:count]] = np.arange(count)
  return Packets(
      frame=frame,
      key=(flags & _KEY) != 0,
      crc=tuple(crcs),
      times=pts[order[:count]] * tb,
      dts=np.where(dts == NOPTS, pts, dts) * tb,
  )


def read_packets(path, exe=None):
  """The video packets of the file at `path` (see the module docstring); no decoding."""
  exe = exe or ffmpeg_exe()
  return parse_framecrc(
      _ffmpeg(exe, "-i", path, "-map", "0:v:0", "-c", "copy", "-f", "framecrc", "-")
  )


# -------------------------------------------------------------------------------------- ranges


def snap(packets, start, end):
  """The stream-copyable part of frames [start, end): (first, end, packets) or None.

  first is the first keyframe >= start; end is the largest end <= `end` at which the packets
  from first's packet on, in decoding order, are exactly the frames [first, end) (packets).
  None when no such range of at least one frame exists (no keyframe in the clip, or leading
  pictures of an open GOP before the keyframe).
  """
  keys = packets.keyframes
  i = bisect.bisect_left(keys, start)
  if i == len(keys) or keys[i] >= end:
    return None
  first = keys[i]
  pos = int(packets.position[first])
  best, lo, hi = None, math.inf, -1
  for m, f in enumerate(packets.frame[pos:].tolist(), 1):
    lo, hi = min(lo, f), max(hi, f)
    if lo < first or hi >= end:  # a frame before the keyframe, an unshown packet, or past the end
      break
    if hi - first + 1 == m:  # distinct frames first..hi: a clean end
      best = hi + 1
  return None if best is None else (first, best, best - first)


def _seek_time(packets, first):
  """An -ss time that seeks to `first`'s keyframe packet: just past its pts and dts (demuxers
  index by either) and before the next keyframe's, rounded up to the microsecond -ss reads."""
  t = float(packets.times[first])  # >= its dts
  later = [k for k in packets.keyframes if k > first]
  margin = packets.frame_duration(first) / 4
  if later:
    nxt = later[0]
    gap = min(float(packets.times[nxt]), float(packets.dts[packets.position[nxt]])) - t
    if gap > 0:
      margin = min(margin, gap / 2)
  return math.ceil((t + max(margin, 1e-6)) * 1e6) / 1e6


def clip_name(file, start, end, mode):
  """The clip file of frames [start, end) of source `file` (relative path), relative to
  OUT/clips: the source's folders and stem, the range, the source's container (.mp4 for
  reencode; a non-MP4 source's extension is kept in the name, so that x.mkv and x.mp4 differ)."""
  base, ext = os.path.splitext(file)
  ext = ext.lower()
  if mode == "reencode":
    if ext != ".mp4":
      base += "-" + ext[1:]
    ext = ".mp4"
  return f"{base}_{start:06d}-{end:06d}{ext}"


def _partial(path):
  base, ext = os.path.splitext(path)
  return base + PARTIAL + ext  # the extension last: ffmpeg picks its muxer from it


def cut_copy(exe, src, dst, packets, first, count, shifts=(0.0, DTS_HEURISTIC)):
  """Stream copy of `count` packets from `first`'s keyframe, checked against the source's;
  returns the -ss shift that worked (try it first for the source's next clips)."""
  pos = int(packets.position[first])
  tmp = _partial(dst)
  cut = ["-map", "0:v:0", "-c", "copy", "-frames:v", str(count)]
  got = ()
  # ffmpeg seeks formats that index by dts (Matroska, not MP4) 3/23 s before -ss where frames are
  # reordered; when the first try lands on an earlier keyframe, the second undoes that shift.
  for shift in shifts if first else (0.0,):
    seek = ["-ss", f"{_seek_time(packets, first) + shift:.6f}"] if first else []
    # The keyframe's timestamps go to 0 (not -ss's point, just after it): else the muxer's edit
    # list would hide the first frame.
    _ffmpeg(exe, "-y", *seek, "-i", src, *cut, "-avoid_negative_ts", "make_zero", tmp)
    got = read_packets(tmp, exe).crc
    if got == packets.crc[pos : pos + count]:
      os.replace(tmp, dst)
      return shift
  os.remove(tmp)
  start = packets.crc.index(got[0]) if got and got[0] in packets.crc else None
  raise FfmpegFailed(
      f"the stream copy holds {len(got)} packets from the source's packet {start}, not {count} "
      f"from packet {pos} (frame {first})"
  )


def cut_reencode(exe, src, dst, packets, start, count, crf, preset):
  """Frames [start, start + count) re-encoded (libx264, yuv420p, even sizes), frame-exactly:
  -ss half a frame before `start` decodes from the keyframe before and drops the frames before."""
  seek = []
  if start:
    t = float(packets.times[start]) - packets.frame_duration(start - 1) / 2
    seek = ["-ss", f"{t:.6f}"]
  tmp = _partial(dst)
  encode = ["-c:v", "libx264", "-crf", str(crf), "-preset", preset, "-pix_fmt", "yuv420p"]
  # passthrough: each decoded frame once (MP4's default would duplicate or drop frames to keep a
  # constant rate); the crop: yuv420p needs even sizes.
  keep = [_fps_mode_option(exe), "passthrough", "-vf", "crop=trunc(iw/2)*2:trunc(ih/2)*2"]
  _ffmpeg(
      exe, "-y", *seek, "-i", src, "-map", "0:v:0", "-frames:v", str(count), *keep, *encode, tmp
  )
  got = read_packets(tmp, exe).num_frames
  if got != count:
    os.remove(tmp)
    raise FfmpegFailed(f"the re-encoded clip holds {got} frames, not {count}")
  os.replace(tmp, dst)


# --------------------------------------------------------------------------------------- export


def settings(config):
  """config.export as a dict with its defaults (configs/curate.py's); an old config without it
  exports nothing."""
  out = {"mode": "ranges", "crf": 18, "preset": "medium", "include_dropped": False, "workers": 0}
  if config.get("export") is not None:
    out.update(config.export.to_dict())
  return out


def validate(config):
  """Raises ExportError for export settings that cannot work, or a missing ffmpeg."""
  s = settings(config)
  if s["mode"] not in MODES:
    raise ExportError(f"config.export.mode must be one of {', '.join(MODES)}; got {s['mode']!r}.")
  if not 0 <= s["crf"] <= 51:
    raise ExportError(f"config.export.crf must be in [0, 51] (libx264); got {s['crf']}.")
  if s["preset"] not in X264_PRESETS:
    raise ExportError(
        f"config.export.preset must be a libx264 preset ({', '.join(X264_PRESETS)}); "
        f"got {s['preset']!r}."
    )
  if s["workers"] < 0:
    raise ExportError(f"config.export.workers must be >= 0 (0: up to 8); got {s['workers']}.")
  if s["mode"] != "ranges":
    ffmpeg_exe()


def _kept_settings(s):
  """The settings a clip file depends on: a change redoes every clip."""
  if s["mode"] == "reencode":
    return {"mode": s["mode"], "crf": s["crf"], "preset": s["preset"]}
  return {"mode": s["mode"]}


def _prepare_dir(clips_dir, wanted):
  """Empties OUT/clips when its clips were made with other settings; records the current ones
  before any clip is written, so that a killed run's files are known to be theirs."""
  path = os.path.join(clips_dir, SETTINGS_FILE)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      if json.load(f) == wanted:
        return
    log.warning("vldm.curate: export settings changed to %s; redoing every clip", wanted)
  if os.path.isdir(clips_dir):
    shutil.rmtree(clips_dir)
  os.makedirs(clips_dir)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(wanted, f, sort_keys=True)


def _export_video(exe, s, input_dir, clips_dir, file, rows, num_frames, min_frames):
  """Exports one source's clips; returns [(row index, row updates, 'exported'|'reused'|reason)]."""
  out = []
  shifts = (0.0, DTS_HEURISTIC)
  try:
    packets = read_packets(os.path.join(input_dir, file), exe)
  except FfmpegFailed as e:
    return [(i, {"export_skipped": f"unreadable: {e}"}, "unreadable") for i, _ in rows]
  if packets.num_frames != num_frames:
    why = (
        f"frame_count: ffmpeg lists {packets.num_frames} frames, the curator decoded "
        f"{num_frames} (variable frame rate?); frame ranges cannot be mapped to packets"
    )
    return [(i, {"export_skipped": why}, "frame_count") for i, _ in rows]
  for i, row in rows:
    start, end = row["start_frame"], row["end_frame"]
    if s["mode"] == "copy":
      snapped = snap(packets, start, end)
      if snapped is None or snapped[2] < min_frames:
        if snapped is None:
          why = f"keyframes: none that starts a clean stream copy in frames [{start}, {end})"
        else:
          why = f"keyframes: {snapped[2]} frames from the keyframe at {snapped[0]} < min_frames"
        out.append((i, {"export_skipped": why}, "keyframes"))
        continue
      start, end, _ = snapped
    name = clip_name(file, start, end, s["mode"])
    path = os.path.join(clips_dir, name)
    update = {
        "clip_file": f"{CLIPS_DIR}/{name}",
        "clip_start_frame": start,
        "clip_end_frame": end,
    }
    if os.path.isfile(path):  # renamed into place only when complete
      out.append((i, update, "reused"))
      continue
    os.makedirs(os.path.dirname(path), exist_ok=True)
    src = os.path.join(input_dir, file)
    try:
      if s["mode"] == "copy":
        shift = cut_copy(exe, src, path, packets, start, end - start, shifts)
        shifts = (shift,) + tuple(x for x in shifts if x != shift)
      else:
        cut_reencode(exe, src, path, packets, start, end - start, s["crf"], s["preset"])
    except FfmpegFailed as e:
      log.warning("vldm.curate: cannot export %s [%d, %d): %s", file, start, end, e)
      out.append((i, {"export_skipped": f"ffmpeg: {e}"}, "ffmpeg"))
      continue
    out.append((i, update, "exported"))
  return out


def exported_rows(rows):
  """The rows of OUT/clips/captions.jsonl for the exported clip rows of clips.jsonl."""
  out = []
  for row in rows:
    if not row.get("clip_file"):
      continue
    new = {k: v for k, v in row.items() if k not in _ROW_KEYS}
    new.update(
        file=row["clip_file"][len(CLIPS_DIR) + 1 :],
        start_frame=0,
        end_frame=row["clip_end_frame"] - row["clip_start_frame"],
        source_file=row["file"],
        source_start_frame=row["clip_start_frame"],
        source_end_frame=row["clip_end_frame"],
    )
    out.append(new)
  return out


def _prune(clips_dir, listed):
  """Removes files of clips no longer listed and partial files of a killed run."""
  keep = {SETTINGS_FILE, EXPORTED_LIST} | set(listed)
  removed = 0
  for root, _, names in os.walk(clips_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), clips_dir).replace(os.sep, "/")
      if rel not in keep:
        os.remove(os.path.join(root, name))
        removed += 1
  if removed:
    log.info("vldm.curate: removed %d stale file(s) under %s", removed, clips_dir)


def export(config, input_dir, out_dir, rows, records):
  """Writes the clip files of config.export.mode and OUT/clips/captions.jsonl, and sets the
  export keys of `rows` (clips.jsonl's, in place; see the module docstring). Returns a summary
  {'mode', 'clips', 'exported', 'reused', 'skipped': {reason: count}, 'seconds'}, or None in
  ranges mode."""
  s = settings(config)
  if s["mode"] == "ranges":
    return None
  t0 = time.perf_counter()
  exe = ffmpeg_exe()
  clips_dir = os.path.join(out_dir, CLIPS_DIR)
  _prepare_dir(clips_dir, _kept_settings(s))
  num_frames = {r["file"]: r.get("num_frames") for r in records}
  by_file = {}
  for i, row in enumerate(rows):
    for key in _ROW_KEYS:
      row.pop(key, None)
    if row.get("kept") or s["include_dropped"]:
      by_file.setdefault(row["file"], []).append((i, row))
  counts = {"exported": 0, "reused": 0}
  skipped = {}
  workers = s["workers"] or min(8, os.cpu_count() or 1)
  progress = tqdm.tqdm(
      total=sum(len(v) for v in by_file.values()),
      desc="export clips",
      unit="clip",
      disable=not sys.stderr.isatty(),
  )
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # ffmpeg runs in subprocesses
    futures = [
        pool.submit(
            _export_video,
            exe,
            s,
            input_dir,
            clips_dir,
            file,
            file_rows,
            num_frames[file],
            config.min_frames,
        )
        for file, file_rows in by_file.items()
    ]
    for future in concurrent.futures.as_completed(futures):
      results = future.result()
      for i, update, outcome in results:
        if "export_skipped" in update:
          update["clip_file"] = None
          skipped[outcome] = skipped.get(outcome, 0) + 1
        else:
          counts[outcome] += 1
        rows[i].update(update)
      progress.update(len(results))
  progress.close()
  failed = skipped.get("ffmpeg", 0) + skipped.get("unreadable", 0)
  if failed and not counts["exported"] + counts["reused"]:
    first = next(
        r["export_skipped"]
        for r in rows
        if r.get("export_skipped", "").startswith(("ffmpeg", "unreadable"))
    )
    raise ExportError(f"config.export.mode={s['mode']}: ffmpeg failed on every clip; {first}")
  listed = exported_rows(rows)
  _prune(clips_dir, [r["file"] for r in listed])
  jsonl.write_atomic(os.path.join(clips_dir, EXPORTED_LIST), listed)
  summary = {
      "mode": s["mode"],
      "clips": sum(len(v) for v in by_file.values()),
      **counts,
      "skipped": skipped,
      "seconds": time.perf_counter() - t0,
  }
  log.info("vldm.curate: export %s", summary)
  return summary
