"""The shapes world: palette, shapes, motions, held-out compositions and a numpy renderer.

This module is the single definition of the procedural shapes dataset (DESIGN.md, "The shapes
dataset"): the TFDS builder (`shapes_tfds.py`), the oracle and the demo all import it, so the
rendered clips and the oracle's expectations cannot drift apart. No TensorFlow, no JAX.

Coordinates are fractions of the frame side: x to the right, y downwards, (0, 0) the top-left
corner of the frame and (1, 1) the bottom-right one; pixel (row i, column j) has its centre at
((j + 0.5) / size, (i + 0.5) / size).
"""

import itertools

import numpy as np

# Palette (RGB), in a fixed order: ClassLabel ids in the TFDS features follow this order.
COLORS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 230),
}
SHAPES = ("circle", "square", "triangle")
# Unit displacement per direction, in (dx, dy) image coordinates (y grows downwards).
DIRECTIONS = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
# (color, shape) pairs seen in image data only, never in the video training split.
HELD_OUT = frozenset({("yellow", "triangle"), ("cyan", "circle"), ("magenta", "square")})

SIZE_RANGE = (0.14, 0.22)  # r, as a fraction of the frame side
SPEED_RANGE = (0.03, 0.06)  # displacement per frame, as a fraction of the frame side
DEFAULT_FRAMES = 8
FPS = 8.0  # nominal frame rate of a tempo-1 clip: what fps micro-conditioning sees
# A clip's tempo k films the same motion at k times the frame rate: speeds SPEED_RANGE / k per
# frame and FPS * k frames per second, so k times as many frames fit the frame (long clips) and
# tempo-k frames interpolate tempo-1 ones. Tempo 1 is the original dataset, draw for draw.
DEFAULT_TEMPOS = (1.0,)
DEFAULT_SUPERSAMPLE = 4  # 4x4 samples per pixel for anti-aliased edges

# Every (color, shape) pair, held-out ones first so that any evaluation split of at least
# len(HELD_OUT) examples that cycles through this list contains all of them.
COMPOSITIONS = tuple(sorted(HELD_OUT, key=lambda cs: (list(COLORS).index(cs[0]), cs[1]))) + tuple(
    cs for cs in itertools.product(COLORS, SHAPES) if cs not in HELD_OUT
)


def check_tempo(tempo):
  """`tempo` as a float; a ValueError unless it is a finite number > 0."""
  try:
    value = float("nan") if isinstance(tempo, (bool, str, bytes)) else float(tempo)
  except (TypeError, ValueError):
    value = float("nan")
  if not (np.isfinite(value) and value > 0):
    raise ValueError(
        f"A shapes tempo must be a finite number > 0 (1: the original speeds at "
        f"{FPS:g} fps; k: speeds / k at {FPS:g}k fps), got {tempo!r}."
    )
  return value


def check_tempos(tempos):
  """A non-empty sequence of tempos as a tuple of floats (order kept: it is what draws index)."""
  if isinstance(tempos, (str, bytes)) or not hasattr(tempos, "__len__") or not tempos:
    raise ValueError(
        f"Shapes tempos must be a non-empty sequence of numbers > 0, e.g. (1.0,) or "
        f"(4, 16); got {tempos!r}."
    )
  return tuple(check_tempo(t) for t in tempos)


def speed_range(tempo=1.0):
  """(slowest, fastest) displacement per frame at this tempo: SPEED_RANGE / tempo."""
  tempo = check_tempo(tempo)
  return SPEED_RANGE[0] / tempo, SPEED_RANGE[1] / tempo


def max_frames(tempo=1.0):
  """The longest clip for which every motion still fits the frame at the slowest speed of `tempo`.

  A hair of slack absorbs float error in the division, so tempo 4 allows 97 frames, not 96.
  """
  travel = (1.0 - 2 * SIZE_RANGE[0]) / speed_range(tempo)[0]
  return int(travel + 1e-9) + 1


def image_caption(color, shape):
  return f"a {color} {shape}"


def video_caption(color, shape, direction):
  return f"a {color} {shape} moving {direction}"


def is_held_out(color, shape):
  return (color, shape) in HELD_OUT


def _check_names(color, shape, direction=None):
  if color not in COLORS:
    raise ValueError(f"Unknown color {color!r}; expected one of {list(COLORS)}.")
  if shape not in SHAPES:
    raise ValueError(f"Unknown shape {shape!r}; expected one of {list(SHAPES)}.")
  if direction is not None and direction not in DIRECTIONS:
    raise ValueError(f"Unknown direction {direction!r}; expected one of {list(DIRECTIONS)}.")


def shape_mask(shape, cx, cy, r, px, py):
  """Whether the points (px, py) lie inside the filled shape centred at (cx, cy) with size r.

  cx, cy broadcast against px, py (e.g. cx of shape [F, 1, 1] for F frames).
  """
  dx, dy = px - cx, py - cy
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    return (np.abs(dx) <= r) & (np.abs(dy) <= r)
  if shape == "triangle":
    # Apex (cx, cy - r), base corners (cx +- r, cy + r): half-width grows by 1/2 per unit of depth.
    depth = dy + r
    return (dy <= r) & (np.abs(dx) <= 0.5 * depth)
  raise ValueError(f"Unknown shape {shape!r}; expected one of {list(SHAPES)}.")


def shape_area(shape, r):
  """Exact area of the filled shape, in squared frame sides."""
  return {"circle": np.pi * r * r, "square": 4 * r * r, "triangle": 2 * r * r}[shape]


def trajectory(direction, x, y, speed, frames):
  """Centres (x_t, y_t), each of shape [frames], of a clip starting at (x, y)."""
  dx, dy = DIRECTIONS[direction] if direction is not None else (0.0, 0.0)
  t = np.arange(frames, dtype=np.float64)
  return x + dx * speed * t, y + dy * speed * t


def coverage(shape, xs, ys, r, size, supersample=DEFAULT_SUPERSAMPLE):
  """Fraction of each pixel covered by the shape, [len(xs), size, size] float64 in [0, 1]."""
  n = size * supersample
  samples = (np.arange(n, dtype=np.float64) + 0.5) / n  # sub-pixel sample centres
  cx = np.asarray(xs, np.float64)[:, None, None]
  cy = np.asarray(ys, np.float64)[:, None, None]
  inside = shape_mask(shape, cx, cy, r, samples[None, None, :], samples[None, :, None])
  inside = inside.reshape(len(cx), size, supersample, size, supersample)
  return inside.mean(axis=(2, 4))


def render_clip(
    color, shape, direction, x, y, r, speed, frames, size, supersample=DEFAULT_SUPERSAMPLE
):
  """Renders one clip, uint8 [frames, size, size, 3].

  Args:
    color: a key of COLORS.
    shape: one of SHAPES.
    direction: a key of DIRECTIONS, or None for a still object (images).
    x, y: centre of the object in the first frame, fractions of the frame side.
    r: object size (circle radius, square half side, triangle half height), fraction of the side.
    speed: displacement per frame, fraction of the side.
    frames: number of frames.
    size: frame side in pixels.
    supersample: samples per pixel along each axis; edges are the covered fraction of the color.
  """
  _check_names(color, shape, direction)
  if frames < 1 or size < 1 or supersample < 1:
    raise ValueError(
        f"frames, size and supersample must be >= 1, got {frames}, {size}, " f"{supersample}."
    )
  xs, ys = trajectory(direction, x, y, speed, frames)
  alpha = coverage(shape, xs, ys, r, size, supersample)
  rgb = np.asarray(COLORS[color], np.float64)
  return np.rint(alpha[..., None] * rgb).astype(np.uint8)


def render_image(color, shape, x, y, r, size, supersample=DEFAULT_SUPERSAMPLE):
  """Renders one still image, uint8 [size, size, 3]."""
  return render_clip(color, shape, None, x, y, r, 0.0, 1, size, supersample)[0]


def sample_motion(rng, frames, tempo=1.0):
  """Draws (r, speed) so that a `frames`-long motion fits the frame: 2r + speed (frames-1) <= 1.

  Speeds come from SPEED_RANGE / tempo; at tempo 1 the draws are exactly the original ones.
  """
  tempo = check_tempo(tempo)
  slowest, fastest = speed_range(tempo)
  if frames > max_frames(tempo):
    raise ValueError(
        f"Shapes clips at tempo {tempo:g} can have at most {max_frames(tempo)} "
        f"frames (the slowest object must fit the frame), got {frames}."
    )
  travel = max(frames - 1, 0)
  r_max = min(SIZE_RANGE[1], (1.0 - slowest * travel) / 2)
  r = rng.uniform(SIZE_RANGE[0], r_max)
  speed_max = fastest if travel == 0 else min(fastest, (1.0 - 2 * r) / travel)
  speed = rng.uniform(slowest, speed_max)
  return r, speed


def sample_start(rng, direction, r, speed, frames):
  """A start centre (x, y) keeping the whole object inside [0, 1]^2 in every frame."""
  dx, dy = DIRECTIONS[direction] if direction is not None else (0.0, 0.0)
  travel = speed * max(frames - 1, 0)

  def axis(d):
    lo, hi = r, 1.0 - r  # the object's extent is [c - r, c + r] for all three shapes
    if d > 0:
      hi -= travel
    elif d < 0:
      lo += travel
    return rng.uniform(lo, hi)

  return axis(dx), axis(dy)


def sample_clip_params(rng, composition, direction, frames, tempo=1.0):
  """Draws the free parameters of one clip: dict(color, shape, direction, x, y, r, speed, tempo,
  fps), speeds at `tempo` (see DEFAULT_TEMPOS)."""
  color, shape = composition
  tempo = check_tempo(tempo)
  r, speed = sample_motion(rng, frames, tempo)
  if direction is None:
    speed = 0.0
  x, y = sample_start(rng, direction, r, speed, frames)
  return dict(
      color=color,
      shape=shape,
      direction=direction,
      x=x,
      y=y,
      r=r,
      speed=speed,
      tempo=tempo,
      fps=FPS * tempo,
  )


SPLITS = ("train", "validation")
KINDS = ("image", "video")


def validation_tempo(index, tempos):
  """The tempo of validation example `index`: the tempos cycle with the index, shifted by one at
  every pass over the compositions and at every pass over compositions x directions, so any
  len(tempos) consecutive examples hold every tempo and each composition (and, for two tempos,
  each composition-direction pair) meets every tempo."""
  passes = index // len(COMPOSITIONS)
  return tempos[(index + passes + passes // len(DIRECTIONS)) % len(tempos)]


def example_params(kind, split, index, frames=DEFAULT_FRAMES, seed=0, tempos=DEFAULT_TEMPOS):
  """Parameters of example `index` of a split: a pure function of (seed, kind, split, index,
  tempos).

  Training examples draw a composition at random (video training never draws a held-out one);
  validation examples cycle through every composition (held-out ones first) and direction, so a
  validation split of n >= 3 examples contains all held-out compositions and is balanced.
  With several tempos, a training example draws its tempo after its composition and direction
  (and before its motion, whose speeds depend on it), a validation example takes
  `validation_tempo`; with one tempo nothing is drawn, so single-tempo data keep the original
  draws (tempo 1: the original examples, bit for bit). The params carry 'tempo' and 'fps'.
  The resolution plays no part: the same index renders the same scene at any size.
  """
  if kind not in KINDS:
    raise ValueError(f"Unknown kind {kind!r}; expected one of {KINDS}.")
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
  tempos = check_tempos(tempos)
  if kind == "image" and tempos != DEFAULT_TEMPOS:
    raise ValueError(
        f"Shapes images are stills: tempos apply to videos only (use (1.0,)), got " f"{tempos}."
    )
  if kind == "video" and frames > max_frames(min(tempos)):
    raise ValueError(
        f"Shapes clips at tempo {min(tempos):g} can have at most "
        f"{max_frames(min(tempos))} frames (the slowest object must fit the frame), "
        f"got {frames}."
    )
  rng = np.random.default_rng([seed, KINDS.index(kind), SPLITS.index(split), index])
  directions = list(DIRECTIONS)
  if split == "validation":
    composition = COMPOSITIONS[index % len(COMPOSITIONS)]
    direction = directions[(index // len(COMPOSITIONS)) % len(directions)]
    tempo = validation_tempo(index, tempos)
  else:
    pool = COMPOSITIONS if kind == "image" else COMPOSITIONS[len(HELD_OUT) :]
    composition = pool[rng.integers(len(pool))]
    direction = directions[rng.integers(len(directions))]
    tempo = tempos[rng.integers(len(tempos))] if len(tempos) > 1 else tempos[0]
  if kind == "image":
    direction, frames = None, 1
  params = sample_clip_params(rng, composition, direction, frames, tempo)
  params["held_out"] = is_held_out(*composition)
  params["caption"] = (
      image_caption(*composition) if kind == "image" else video_caption(*composition, direction)
  )
  return params


def make_example(
    kind,
    split,
    index,
    frames=DEFAULT_FRAMES,
    size=32,
    seed=0,
    supersample=DEFAULT_SUPERSAMPLE,
    tempos=DEFAULT_TEMPOS,
):
  """Parameters of `example_params` plus the pixels: 'image' [S,S,3] or 'video' [F,S,S,3] uint8."""
  params = example_params(kind, split, index, frames, seed, tempos)
  keys = ("color", "shape", "direction", "x", "y", "r", "speed")
  pixels = render_clip(
      *(params[k] for k in keys), frames if kind == "video" else 1, size, supersample
  )
  params[kind] = pixels if kind == "video" else pixels[0]
  return params
