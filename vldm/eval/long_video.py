"""Long and interpolated shapes clips, judged with the oracle (`vldm.eval.oracle`).

Long clips (Video LDM's prediction model: a clip extended chunk by chunk) can be right as a whole
and still go wrong on the way: the object may stop, turn back, or slowly change color or size at
the chunk joins. So besides the oracle's usual judgement of the whole clip:
  windows     the clip is cut into windows of `window` consecutive frames (default 8, a chunk);
              each window is judged by the oracle alone (`window_judgements`), and its direction
              is the oracle's direction rule with a window-sized static threshold,
              WINDOW_STATIC_THRESHOLD = 0.05 of the side (`window_direction`): at the slowest
              long-clip speed, 0.012 of the side per frame (tempo 2.5), an 8-frame window moves
              7 x 0.012 = 0.084, while the oracle's 0.1 is sized for a whole 8-frame tempo-1 clip.
  drift       the mean foreground color and area of the last window against the first
              (`drift`): a clip that keeps its object changes neither by more than 10 %.

Interpolated clips (the temporal-interpolation model: key frames every `factor` frames in, the
frames in between out) are compared with the truth they were cut from by PSNR, against the
linear blend of the key frames as the baseline (`judge_interpolation`), and the oracle checks
that color and shape survive.

`strip` draws clips as a PNG contact strip with the chunk joins marked. Pure numpy and scipy.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from vldm.eval import metrics
from vldm.eval import oracle

WINDOW = 8  # frames per window: one chunk of the prediction model
# Displacement (fraction of the side) below which a window counts as still: an 8-frame window
# of a long clip moves >= 7 x 0.012 = 0.084 at the slowest long-clip speed (SPEED_RANGE / 2.5).
WINDOW_STATIC_THRESHOLD = 0.05
DRIFT_TOLERANCE = 0.10  # relative change of foreground color or area that still counts as kept
PSNR_CAP = 100.0  # dB, for identical clips (infinite PSNR would poison means)
FACTOR = 4  # key frames every FACTOR frames: Video LDM's interpolation factor
LABEL_WIDTH = 160  # pixels of the strip's prompt column (the longest prompt is ~150 px)
_GAP, _JOIN = 1, 3  # strip: pixels between frames, and at a chunk join
_GAP_VALUE, _JOIN_VALUE = 64, 255


# Windows of a long clip.


def window_bounds(
    frames: int, window: int = WINDOW, stride: Optional[int] = None
) -> list[tuple[int, int]]:
  """[start, stop) of every window: starts 0, stride, 2 stride... (stride default: window, so
  windows do not overlap) while a whole window fits; the last partial window is dropped, unless
  the clip is shorter than one window, which is then its only window."""
  stride = window if stride is None else stride
  if window < 1 or stride < 1:
    raise ValueError(f"window and stride must be >= 1, got {window} and {stride}.")
  if frames < 1:
    raise ValueError(f"A clip needs at least one frame, got {frames}.")
  if frames <= window:
    return [(0, frames)]
  return [(start, start + window) for start in range(0, frames - window + 1, stride)]


def window_judgements(
    clip, window: int = WINDOW, stride: Optional[int] = None
) -> list[oracle.Judgement]:
  """The oracle's judgement of each window (`window_bounds`), every window judged on its own."""
  clip = oracle.to_float(clip)
  return [
      oracle.judge(clip[start:stop]) for start, stop in window_bounds(len(clip), window, stride)
  ]


def window_direction(
    judgement: oracle.Judgement, threshold: float = WINDOW_STATIC_THRESHOLD
) -> Optional[str]:
  """A window's direction: its foreground centroid's displacement from its first to its last
  frame, by the oracle's rule with `threshold` as the static threshold; None when the first or
  last frame has no foreground (never correct)."""
  if judgement.displacement is None:
    return None
  return oracle.direction_of(*judgement.displacement, threshold=threshold)


def window_directions(
    clip,
    window: int = WINDOW,
    stride: Optional[int] = None,
    threshold: float = WINDOW_STATIC_THRESHOLD,
) -> list[Optional[str]]:
  """`window_direction` of every window of the clip."""
  return [window_direction(j, threshold) for j in window_judgements(clip, window, stride)]


def drift(clip, window: int = WINDOW, tolerance: float = DRIFT_TOLERANCE) -> dict:
  """How much the object changed between the first `window` frames and the last `window` frames.

  Foreground is the oracle's rule over the whole clip (one threshold, so a fading object shows).
  color_change = |rgb_last - rgb_first| / |rgb_first|, rgb the mean RGB of the foreground
  pixels; area_change = |area_last - area_first| / area_first, area the foreground pixels per
  frame over H x W. ok: both <= tolerance. A window without foreground changes by inf.
  """
  clip = oracle.to_float(clip)
  mask = oracle.foreground(clip)
  window = min(window, len(clip))
  first, last = slice(0, window), slice(len(clip) - window, len(clip))
  if not mask[first].any() or not mask[last].any():
    return dict(color_change=math.inf, area_change=math.inf, ok=False)
  rgb_first, rgb_last = (clip[part][mask[part]].mean(axis=0) for part in (first, last))
  area_first, area_last = (mask[part].mean() for part in (first, last))
  color_change = float(np.linalg.norm(rgb_last - rgb_first) / np.linalg.norm(rgb_first))
  area_change = float(abs(area_last - area_first) / area_first)
  return dict(
      color_change=color_change,
      area_change=area_change,
      ok=color_change <= tolerance and area_change <= tolerance,
  )


def judge_long(
    clips: Sequence,
    prompts: Sequence[str],
    window: int = WINDOW,
    stride: Optional[int] = None,
    threshold: float = WINDOW_STATIC_THRESHOLD,
    tolerance: float = DRIFT_TOLERANCE,
) -> list[dict]:
  """One record per clip: `oracle.judge_all`'s (the whole clip under the oracle's usual rules)
  plus frames, window_directions, windows_direction_ok (the fraction of windows whose direction
  is the prompt's; 'static' for an image prompt) and drift (`drift`)."""
  records = oracle.judge_all(clips, prompts)
  for record, clip in zip(records, clips):
    expected = record["direction"] or oracle.STATIC
    directions = window_directions(clip, window, stride, threshold)
    record.update(
        frames=len(clip),
        window_directions=directions,
        windows_direction_ok=float(np.mean([d == expected for d in directions])),
        drift=drift(clip, window, tolerance),
    )
  return records


def summarize_long(records: Sequence[dict]) -> dict:
  """`metrics.summarize` of the whole-clip verdicts ('seen' | 'held_out' | 'overall': color,
  shape, direction, all, consistency, clips), each group with, over its clips: window_direction
  (mean windows_direction_ok), every_window_direction (fraction of clips whose direction holds in
  every window), drift_ok (fraction within the drift tolerance) and n (= clips)."""
  summary = metrics.summarize(records)
  members = dict(
      seen=[r for r in records if not r["held_out"]],
      held_out=[r for r in records if r["held_out"]],
      overall=list(records),
  )
  mean = lambda values: float(np.mean(values)) if values else float("nan")
  for group, rs in members.items():
    summary[group].update(
        window_direction=mean([r["windows_direction_ok"] for r in rs]),
        every_window_direction=mean([r["windows_direction_ok"] == 1.0 for r in rs]),
        drift_ok=mean([r["drift"]["ok"] for r in rs]),
        n=len(rs),
    )
  return summary


# Temporal interpolation.


def drop_frames(clip, factor: int = FACTOR) -> np.ndarray:
  """The key frames clip[::factor] of a clip of K·factor + 1 frames (the first and last frame are
  keys, so the interpolation model has a neighbour on both sides of every missing frame)."""
  clip = np.asarray(clip)
  if factor < 1 or (len(clip) - 1) % factor:
    raise ValueError(
        f"drop_frames needs factor >= 1 and a clip of K * factor + 1 frames (factor "
        f"{factor}: {', '.join(str(k * factor + 1) for k in range(1, 4))}, ...); got "
        f"{len(clip)} frames."
    )
  return clip[::factor]


def linear_blend(keys, factor: int = FACTOR) -> np.ndarray:
  """The baseline interpolation, [(K - 1)·factor + 1, H, W, 3] float64 in [0, 1]: key k at
  position k·factor (exactly), and at k·factor + j the blend (1 - j/factor)·key_k +
  (j/factor)·key_{k+1}."""
  keys = oracle.to_float(keys)
  if factor < 1:
    raise ValueError(f"factor must be >= 1, got {factor}.")
  weights = (np.arange(factor, dtype=np.float64) / factor)[None, :, None, None, None]
  blend = (1.0 - weights) * keys[:-1, None] + weights * keys[1:, None]  # [K-1, factor, ...]
  blend[:, 0] = keys[:-1]  # bit-exact keys, whatever the float arithmetic
  return np.concatenate([blend.reshape(-1, *keys.shape[1:]), keys[-1:]])


def psnr(a, b, cap: float = PSNR_CAP) -> float:
  """Peak signal-to-noise ratio in dB of two images or clips in [0, 1] (uint8: / 255), over all
  pixels: 10 log10(1 / MSE), at most `cap` (identical inputs give `cap`, not inf)."""
  a, b = (
      x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
      for x in (np.asarray(a), np.asarray(b))
  )
  if a.shape != b.shape:
    raise ValueError(f"psnr needs equal shapes, got {a.shape} and {b.shape}.")
  mse = float(np.mean((a - b) ** 2))
  return cap if mse <= 10.0 ** (-cap / 10.0) else float(10.0 * np.log10(1.0 / mse))


def judge_interpolation(
    generated: Sequence, truth: Sequence, prompts: Sequence[str], factor: int = FACTOR
) -> list[dict]:
  """One record per clip: generated and truth clips of K·factor + 1 frames, the generated one
  made from truth's key frames (positions 0, factor, 2·factor...). PSNR over the in-between
  frames only (the keys were given): psnr_generated (generated vs truth), psnr_blend
  (`linear_blend` of truth's keys vs truth) and gain = psnr_generated - psnr_blend (dB; > 0 beats
  the blend), on top of `oracle.judge_all`'s record of the generated clip, whose `correct` gains
  color_and_shape."""
  if not len(generated) == len(truth) == len(prompts):
    raise ValueError(
        f"{len(generated)} generated clips, {len(truth)} true clips and {len(prompts)} prompts."
    )
  records = oracle.judge_all(generated, prompts)
  for record, clip, true_clip in zip(records, generated, truth):
    clip, true_clip = oracle.to_float(clip), oracle.to_float(true_clip)
    if clip.shape != true_clip.shape:
      raise ValueError(f"Generated clip {clip.shape} and true clip {true_clip.shape} differ.")
    blend = linear_blend(drop_frames(true_clip, factor), factor)
    between = np.arange(len(true_clip)) % factor != 0
    psnr_generated = psnr(clip[between], true_clip[between])
    psnr_blend = psnr(blend[between], true_clip[between])
    correct = record["correct"]
    correct["color_and_shape"] = correct["color"] and correct["shape"]
    record.update(
        frames=len(clip),
        factor=factor,
        psnr_generated=psnr_generated,
        psnr_blend=psnr_blend,
        gain=psnr_generated - psnr_blend,
    )
  return records


def summarize_interpolation(records: Sequence[dict]) -> dict:
  """Means over clips: psnr_generated, psnr_blend, gain (dB); fractions of clips whose color,
  shape, and both (color_and_shape) are correct; n."""
  if not records:
    return dict(
        psnr_generated=float("nan"),
        psnr_blend=float("nan"),
        gain=float("nan"),
        color=float("nan"),
        shape=float("nan"),
        color_and_shape=float("nan"),
        n=0,
    )
  out = {
      k: float(np.mean([r[k] for r in records])) for k in ("psnr_generated", "psnr_blend", "gain")
  }
  out.update(
      {
          k: float(np.mean([r["correct"][k] for r in records]))
          for k in ("color", "shape", "color_and_shape")
      }
  )
  out["n"] = len(records)
  return out


# Contact strip.


def strip(
    clips: Sequence,
    prompts: Optional[Sequence[str]],
    path: str,
    every: int = 1,
    max_frames: Optional[int] = None,
    chunk: int = WINDOW,
    label_width: int = LABEL_WIDTH,
) -> str:
  """Writes a PNG contact strip of the clips and returns `path`.

  One row per clip: its frames 0, every, 2·every... (of the first `max_frames`, if given) left to
  right, 1 gray pixel apart, and a 3-pixel white separator before a frame whose chunk of `chunk`
  frames differs from the previous shown frame's, so the joins of a long clip's chunks can be
  found. Rows are 1 gray pixel apart; clips of other lengths pad with gray. With prompts, a
  `label_width`-pixel column at the left holds each prompt (PIL's default font, clipped to the
  row). Size: height n·S + (n - 1), width label_width + the longest row.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  from PIL import ImageFont  # pylint: disable=g-import-not-at-top
  from vldm import video_io  # pylint: disable=g-import-not-at-top

  if every < 1 or chunk < 1:
    raise ValueError(f"every and chunk must be >= 1, got {every} and {chunk}.")
  if prompts is not None and len(prompts) != len(clips):
    raise ValueError(f"{len(clips)} clips for {len(prompts)} prompts.")
  label_width = label_width if prompts is not None else 0
  rows = []
  for clip in clips:
    clip = video_io.to_uint8(clip)
    shown = list(range(0, len(clip) if max_frames is None else min(max_frames, len(clip)), every))
    pieces = []
    for previous, t in zip([None] + shown[:-1], shown):
      if previous is not None:
        joins = previous // chunk != t // chunk
        pieces.append(
            np.full(
                (clip.shape[1], _JOIN if joins else _GAP, 3),
                _JOIN_VALUE if joins else _GAP_VALUE,
                np.uint8,
            )
        )
      pieces.append(clip[t])
    rows.append(np.concatenate(pieces, axis=1))
  size = rows[0].shape[0]
  width = label_width + max(r.shape[1] for r in rows)
  sheet = np.full((len(rows) * (size + _GAP) - _GAP, width, 3), _GAP_VALUE, np.uint8)
  font = ImageFont.load_default() if prompts is not None else None
  for i, row in enumerate(rows):
    y = i * (size + _GAP)
    sheet[y : y + size, label_width : label_width + row.shape[1]] = row
    if font is not None and label_width:
      label = Image.new("RGB", (label_width, size))
      ImageDraw.Draw(label).text(
          (2, max(0, (size - 12) // 2)), prompts[i], fill=(255, 255, 255), font=font
      )
      sheet[y : y + size, :label_width] = np.asarray(label)
  return video_io.write_png(sheet, path)
