"""The shapes oracle: what a generated clip shows, judged from its pixels (DESIGN.md contract).

  j = judge(clip)          # clip [F, H, W, 3] uint8, or float in [0, 1]
  j.color, j.shape, j.direction  # palette name, shape name, left/right/up/down/static
  score(j, "a red circle moving left")  # {color: True, shape: True, direction: False, all: …}

The rules, exactly as DESIGN.md states them:
  foreground  pixels brighter than half the clip's peak brightness; brightness is the largest of
              the R, G, B values, so every palette color has about the same peak and, on an
              anti-aliased or blurred edge (coverage α times the color), the threshold sits at
              α = 1/2, where the sharp edge was.
  color       the palette entry nearest (Euclidean RGB) to the mean RGB of the foreground pixels
              of all frames.
  shape       per frame: the ideal circle, square and triangle with the foreground's area and
              centroid are rendered (pixel coverage > 1/2) and the one with the best IoU against
              the foreground wins; the clip's shape is the majority over frames.
  direction   the foreground centroid's displacement from the first to the last frame: 'static'
              when both components are below 0.1 of the side, else the dominant axis and its sign
              (y grows downwards, so a negative dy is 'up').
A frame without foreground has no shape; a clip whose first or last frame has none has no
direction (None), which is never correct.

Temporal consistency (`Judgement.consistency`, in [0, 1]): the mean over consecutive frame pairs of
the soft IoU, Σ min(a, b) / Σ max(a, b), of the frames' coverage maps (brightness / peak, see
`coverage_map`), frame t+1's shifted back by the foreground centroid's displacement (bilinear,
sub-pixel). Motion is compensated, so an object that keeps its shape, size and color while it
moves scores ≈ 1 (rendered shapes clips: ≥ 0.95); flicker, morphing, blur that comes and goes, or
an object that appears or vanishes (that pair scores 0) lowers it.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from vldm.data import shapes

STATIC = "static"
STATIC_THRESHOLD = 0.1  # displacement below this fraction of the side counts as no motion
_PALETTE_NAMES = tuple(shapes.COLORS)
_PALETTE = np.asarray([shapes.COLORS[c] for c in _PALETTE_NAMES], np.float64)
# The triangle's centroid lies r/3 below its nominal centre (apex y−r, base y+r).
_CENTROID_OFFSET = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0}
_PROMPT = re.compile(
    r"^\s*an?\s+(?P<color>\w+)\s+(?P<shape>\w+)(?:\s+moving\s+(?P<direction>\w+))?\s*$"
)


@dataclasses.dataclass(frozen=True)
class Judgement:
  """What the oracle sees in one clip (see the module docstring)."""

  color: Optional[str]
  shape: Optional[str]
  direction: Optional[str]
  frame_shapes: tuple  # per frame, None where the frame has no foreground
  displacement: Optional[tuple]  # (dx, dy) first → last frame centroid, fractions of the side
  consistency: float


def to_float(clip) -> np.ndarray:
  """[F, H, W, 3] (or one image [H, W, 3]) uint8 or float in [0, 1] → float64 in [0, 1]."""
  clip = np.asarray(clip)
  if clip.ndim == 3:
    clip = clip[None]
  if clip.ndim != 4 or clip.shape[-1] != 3:
    raise ValueError(
        f"The oracle takes a clip [F, H, W, 3] or an image [H, W, 3]; got shape " f"{clip.shape}."
    )
  if clip.shape[1] != clip.shape[2]:
    raise ValueError(f"Shapes frames are square; got {clip.shape[1]}x{clip.shape[2]}.")
  if clip.dtype == np.uint8:
    return clip.astype(np.float64) / 255.0
  if not np.issubdtype(clip.dtype, np.floating):
    raise ValueError(f"Clips must be uint8 or float in [0, 1]; got {clip.dtype}.")
  return np.clip(clip.astype(np.float64), 0.0, 1.0)


def brightness(clip) -> np.ndarray:
  """Per-pixel brightness [F, H, W]: the largest channel value."""
  return clip.max(axis=-1)


def foreground(clip) -> np.ndarray:
  """Boolean mask [F, H, W] of the pixels brighter than half the clip's peak brightness."""
  value = brightness(clip)
  peak = value.max()
  if peak <= 0:
    return np.zeros(value.shape, bool)
  return value > 0.5 * peak


def nearest_color(rgb) -> str:
  """The palette name nearest to an RGB triple in [0, 1]."""
  distances = np.linalg.norm(_PALETTE - np.asarray(rgb, np.float64) * 255.0, axis=-1)
  return _PALETTE_NAMES[int(np.argmin(distances))]


def centroid(mask) -> tuple[float, float]:
  """(x, y) of a non-empty mask's pixel centres, fractions of the side."""
  size = mask.shape[-1]
  rows, cols = np.nonzero(mask)
  return (cols.mean() + 0.5) / size, (rows.mean() + 0.5) / size


def soft_centroid(weights) -> tuple[float, float]:
  """(x, y) in pixels of a weight map's centre of mass (sub-pixel, for motion compensation)."""
  total = weights.sum()
  rows, cols = np.indices(weights.shape)
  return float((cols * weights).sum() / total), float((rows * weights).sum() / total)


def ideal_mask(shape: str, area: float, cx: float, cy: float, size: int) -> np.ndarray:
  """The filled `shape` of `area` (squared sides) centred at (cx, cy), pixel coverage > 1/2."""
  r = float(np.sqrt(area / shapes.shape_area(shape, 1.0)))
  cy = cy - _CENTROID_OFFSET[shape] * r
  return shapes.coverage(shape, [cx], [cy], r, size)[0] > 0.5


def iou(a, b) -> float:
  union = np.logical_or(a, b).sum()
  return float(np.logical_and(a, b).sum() / union) if union else 0.0


def frame_shape(mask) -> Optional[str]:
  """The ideal shape with the best IoU against one frame's foreground (None if it is empty)."""
  count = int(mask.sum())
  if count == 0:
    return None
  size = mask.shape[-1]
  cx, cy = centroid(mask)
  area = count / size**2
  scores = [iou(mask, ideal_mask(s, area, cx, cy, size)) for s in shapes.SHAPES]
  return shapes.SHAPES[int(np.argmax(scores))]


def direction_of(dx: float, dy: float, threshold: float = STATIC_THRESHOLD) -> str:
  """'static' when both components are below `threshold` (a fraction of the side; windows of a
  long clip move less than a whole clip, so they pass a smaller one), else the dominant axis and
  its sign."""
  if max(abs(dx), abs(dy)) < threshold:
    return STATIC
  if abs(dx) >= abs(dy):
    return "right" if dx > 0 else "left"
  return "down" if dy > 0 else "up"


def coverage_map(clip) -> np.ndarray:
  """Soft foreground [F, H, W] in [0, 1]: brightness / peak, so a sharp object is 1 inside, 0
  outside, and an anti-aliased edge pixel holds its coverage."""
  value = brightness(clip)
  peak = value.max()
  return value / peak if peak > 0 else np.zeros_like(value)


def temporal_consistency(clip, mask=None) -> float:
  """Mean motion-compensated soft IoU of consecutive frames (see the module docstring)."""
  clip = to_float(clip)
  mask = foreground(clip) if mask is None else mask
  soft = coverage_map(clip)
  if len(soft) < 2:
    return 1.0
  scores = []
  for t in range(len(soft) - 1):
    a, b = soft[t], soft[t + 1]
    if not mask[t].any() or not mask[t + 1].any():
      scores.append(0.0)  # an object that vanishes is as inconsistent as it gets
      continue
    (x0, y0), (x1, y1) = soft_centroid(a * mask[t]), soft_centroid(b * mask[t + 1])
    b = ndimage.shift(b, (y0 - y1, x0 - x1), order=1, mode="constant")
    union = np.maximum(a, b).sum()
    scores.append(float(np.minimum(a, b).sum() / union) if union > 0 else 0.0)
  return float(np.mean(scores))


def judge(clip) -> Judgement:
  """Color, shape, direction and temporal consistency of one clip [F, H, W, 3]."""
  clip = to_float(clip)
  mask = foreground(clip)
  if not mask.any():
    return Judgement(None, None, None, (None,) * len(clip), None, 0.0)
  color = nearest_color(clip[mask].mean(axis=0))
  frame_shapes = tuple(frame_shape(m) for m in mask)
  votes = collections.Counter(s for s in frame_shapes if s is not None)
  shape = votes.most_common(1)[0][0]
  direction = displacement = None
  if mask[0].any() and mask[-1].any():
    (x0, y0), (x1, y1) = centroid(mask[0]), centroid(mask[-1])
    displacement = (x1 - x0, y1 - y0)
    direction = direction_of(*displacement)
  return Judgement(
      color, shape, direction, frame_shapes, displacement, temporal_consistency(clip, mask)
  )


def parse_prompt(prompt: str) -> tuple[str, str, Optional[str]]:
  """Prompt "a {color} {shape} moving {direction}" (or "a {color} {shape}") → its three parts."""
  match = _PROMPT.match(prompt.lower())
  if not match:
    raise ValueError(
        f"Not a shapes prompt: {prompt!r}; expected 'a {{color}} {{shape}} moving "
        f"{{direction}}' or 'a {{color}} {{shape}}'."
    )
  color, shape, direction = match.group("color", "shape", "direction")
  if (
      color not in shapes.COLORS
      or shape not in shapes.SHAPES
      or (direction is not None and direction not in shapes.DIRECTIONS)
  ):
    raise ValueError(
        f"Unknown words in {prompt!r}: colors {list(shapes.COLORS)}, shapes "
        f"{list(shapes.SHAPES)}, directions {list(shapes.DIRECTIONS)}."
    )
  return color, shape, direction


def score(judgement: Judgement, prompt: str) -> dict:
  """Which attributes of `prompt` the clip shows: {'color', 'shape', 'direction', 'all'} → bool.

  An image prompt (no direction) expects a still object ('static').
  """
  color, shape, direction = parse_prompt(prompt)
  result = dict(
      color=judgement.color == color,
      shape=judgement.shape == shape,
      direction=judgement.direction == (direction or STATIC),
  )
  result["all"] = all(result.values())
  return result


def judge_all(clips: Sequence, prompts: Sequence[str]) -> list[dict]:
  """One record per clip: prompt, its attributes, what the oracle saw and the per-attribute
  scores (`score`), consistency, and whether the composition is held out."""
  if len(clips) != len(prompts):
    raise ValueError(f"{len(clips)} clips for {len(prompts)} prompts.")
  records = []
  for clip, prompt in zip(clips, prompts):
    color, shape, direction = parse_prompt(prompt)
    j = judge(clip)
    records.append(
        dict(
            prompt=prompt,
            color=color,
            shape=shape,
            direction=direction,
            held_out=shapes.is_held_out(color, shape),
            seen=dict(color=j.color, shape=j.shape, direction=j.direction),
            consistency=j.consistency,
            correct=score(j, prompt),
        )
    )
  return records
