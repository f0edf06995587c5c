"""Cut detection (PySceneDetect) and the clip frame ranges between cuts.

A cascade of scenedetect detectors, fed the frames of one decode pass:
  * ContentDetector (HSV + edge change between neighbouring frames): hard cuts;
  * AdaptiveDetector (content change relative to its neighbours' average): hard cuts in busy
    footage, where a fixed threshold either misses cuts or fires on motion;
  * both again at a reduced rate (every `frame_skip + 1`-th frame), where a slow dissolve or a
    cross-fade changes as much between two compared frames as a hard cut does;
  * ThresholdDetector (mean intensity under `fade_threshold`): fades to and from black, cut in
    the middle of the dark stretch.
Their cuts are merged: cuts less than `merge_frames` apart are one cut (the earliest).
Clips are the frame ranges between cuts, split into consecutive clips of at most `max_frames`;
ranges shorter than `min_frames` are dropped. Frame numbers are the source's; nothing is
re-encoded.
"""

import dataclasses

import cv2
from scenedetect import detectors
from scenedetect import FrameTimecode


@dataclasses.dataclass(frozen=True)
class CutOptions:
  """The cascade's settings (configs/curate.py's `cuts`)."""

  content_threshold: float = 27.0  # ContentDetector's default
  adaptive_threshold: float = 3.0  # AdaptiveDetector's default
  adaptive_min_content: float = 15.0
  fade_threshold: float = 12.0  # ThresholdDetector's default (8-bit mean intensity)
  min_scene_len: int = 4  # frames between two cuts of one detector
  frame_skip: int = 2  # the reduced-rate detectors see every (frame_skip + 1)-th frame; 0: none
  merge_frames: int = 3  # cuts closer than this are one cut


def _detectors(options):
  """(detector, stride) pairs of the cascade."""

  def content_pair():
    return [
        detectors.ContentDetector(options.content_threshold, min_scene_len=options.min_scene_len),
        detectors.AdaptiveDetector(
            options.adaptive_threshold,
            min_scene_len=options.min_scene_len,
            min_content_val=options.adaptive_min_content,
        ),
    ]

  pairs = [(d, 1) for d in content_pair()]
  if options.frame_skip > 0:
    pairs += [(d, options.frame_skip + 1) for d in content_pair()]
  pairs.append((detectors.ThresholdDetector(options.fade_threshold, options.min_scene_len), 1))
  return pairs


class CutDetector:
  """Feeds frames (RGB uint8, in order) to the cascade; `finish()` returns the merged cuts.

  `fps` is the source's frame rate: scenedetect's detectors take frame timecodes, though every
  length here (min_scene_len, merge_frames) is in frames.
  """

  def __init__(self, fps, options=CutOptions()):
    if not fps or fps <= 0:
      raise ValueError(f"CutDetector needs the video's frame rate (> 0); got {fps!r}.")
    self.options = options
    self._fps = float(fps)
    self._pairs = _detectors(options)
    self._raw = []  # (frame number, detector name)
    self._count = 0

  def _record(self, detector, timecodes):
    self._raw += [(tc.frame_num, type(detector).__name__) for tc in timecodes or ()]

  def add(self, frame):
    bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)  # pylint: disable=no-member
    n = self._count
    timecode = FrameTimecode(n, self._fps)
    for detector, stride in self._pairs:
      if n % stride == 0:
        self._record(detector, detector.process_frame(timecode, bgr))
    self._count += 1

  def finish(self):
    """Cut frames (the first frame of each new scene), merged and sorted, in (0, frames)."""
    if self._count:
      last = FrameTimecode(self._count - 1, self._fps)
      for detector, _ in self._pairs:
        self._record(detector, detector.post_process(last))
    return merge_cuts([c for c, _ in self._raw], self.options.merge_frames, self._count)


def merge_cuts(cuts, merge_frames, num_frames):
  """Sorted unique cuts in (0, num_frames); cuts within `merge_frames` of the previous kept one
  are dropped (one transition seen by several detectors, or a few frames apart)."""
  merged = []
  for cut in sorted(set(cuts)):
    if 0 < cut < num_frames and (not merged or cut - merged[-1] >= merge_frames):
      merged.append(cut)
  return merged


def clip_ranges(cuts, num_frames, min_frames, max_frames):
  """[(start, end)] (end exclusive) of the clips between `cuts`: scenes longer than `max_frames`
  are split into consecutive clips of `max_frames` (0: no limit), and pieces shorter than
  `min_frames` are dropped."""
  if min_frames < 1 or max_frames < 0 or (max_frames and max_frames < min_frames):
    raise ValueError(
        f"Need 1 <= min_frames <= max_frames (or max_frames 0: no limit); got min_frames="
        f"{min_frames}, max_frames={max_frames}."
    )
  bounds = [0] + list(cuts) + [num_frames]
  ranges = []
  for start, end in zip(bounds[:-1], bounds[1:]):
    step = max_frames or (end - start)
    for s in range(start, end, max(step, 1)):
      e = min(s + step, end)
      if e - s >= min_frames:
        ranges.append((s, e))
  return ranges
