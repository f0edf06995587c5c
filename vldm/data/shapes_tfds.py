"""TFDS builder for the procedural shapes dataset (`vldm_shapes`).

Configs are named `image_{resolution}` or `video_{resolution}_{frames}`, optionally followed by
`_tempo{k}` (several tempos joined by '-', ascending: each clip takes one, see
`shapes.example_params`), then `_train{N}`, `_val{M}` and `_seed{S}` when the tempos, example
counts or seed differ from the defaults: `video_32_8`, `image_64`, `video_48_12_train64_val18`,
`video_32_9_tempo4-16`, `video_32_32_tempo2.5`. Any such name works, predefined or not
(`tfds.builder('vldm_shapes/video_40_10', data_dir=...)`), and `shapes_builder(...)` builds the
name from arguments. Example i of a split is a pure function of (seed, kind, split, i, tempos).

Tempo configs (version 1.0.0 still: tempo-1 configs, every config that existed before, keep their
features and data bit for bit) hold fps = FPS * tempo per example and an extra `tempo` feature.
"""

import dataclasses
import functools
import re

import numpy as np
import tensorflow_datasets as tfds

from vldm.data import shapes

DEFAULT_NUM_TRAIN = 10_000
DEFAULT_NUM_VALIDATION = 576  # 32 examples of each of the 18 compositions (x 4 directions cycled)
FPS = shapes.FPS  # nominal frame rate of a tempo-1 clip: what fps micro-conditioning sees
_NUMBER = r"\d+(?:\.\d+)?"
_NAME = re.compile(rf"^(?:(image)_(\d+)|(video)_(\d+)_(\d+))(?:_tempo({_NUMBER}(?:-{_NUMBER})*))?")
_SUFFIX = re.compile(r"_(train|val|seed)(\d+)")
_NAME_FORM = (
    "image_<resolution> or video_<resolution>_<frames>[_tempo<k>[-<k2>...]], "
    "optionally "
    "followed by _train<N>, _val<M>, _seed<S> (e.g. 'video_32_8', 'image_64_train100', "
    "'video_32_9_tempo4-16', 'video_32_32_tempo2.5')"
)


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """kind 'image' (stills) or 'video'; resolution in pixels; frames per clip (video only)."""

  kind: str = "video"
  resolution: int = 32
  frames: int = shapes.DEFAULT_FRAMES
  num_train: int = DEFAULT_NUM_TRAIN
  num_validation: int = DEFAULT_NUM_VALIDATION
  seed: int = 0
  tempos: tuple = shapes.DEFAULT_TEMPOS

  @classmethod
  def make(
      cls,
      kind="video",
      resolution=32,
      frames=shapes.DEFAULT_FRAMES,
      num_train=DEFAULT_NUM_TRAIN,
      num_validation=DEFAULT_NUM_VALIDATION,
      seed=0,
      tempos=shapes.DEFAULT_TEMPOS,
  ):
    return cls.from_name(
        config_name(kind, resolution, frames, num_train, num_validation, seed, tempos)
    )

  @classmethod
  @functools.cache  # one object per name: TFDS compares configs by identity
  def from_name(cls, name):
    match = _NAME.match(name)
    rest = _SUFFIX.findall(name[match.end() :]) if match else None
    if not match or "".join(f"_{k}{v}" for k, v in rest) != name[match.end() :]:
      raise ValueError(f"Bad shapes config name {name!r}; expected {_NAME_FORM}.")
    extra = {k: int(v) for k, v in rest}
    if match.group(1):
      kind, resolution, frames = "image", int(match.group(2)), 1
    else:
      kind, resolution, frames = "video", int(match.group(4)), int(match.group(5))
    tempos = (
        tuple(float(t) for t in match.group(6).split("-"))
        if match.group(6)
        else shapes.DEFAULT_TEMPOS
    )
    if resolution < 1:
      raise ValueError(f"Resolution must be >= 1, got {resolution} in {name!r}.")
    try:
      tempos = canonical_tempos(tempos, kind)
    except ValueError as e:
      raise ValueError(f"Bad tempo in shapes config name {name!r}: {e}") from e
    longest = shapes.max_frames(min(tempos))
    if kind == "video" and not 1 <= frames <= longest:
      raise ValueError(
          f"Frames must be in [1, {longest}] at tempo {min(tempos):g} (the longest "
          f"clip that fits the frame: shapes.max_frames(tempo)), got {frames} in "
          f"{name!r}."
      )
    tempo_description = (
        "" if tempos == shapes.DEFAULT_TEMPOS else f", tempo {'/'.join(map(_tempo_text, tempos))}"
    )
    config = cls(
        name=name,
        kind=kind,
        resolution=resolution,
        frames=frames,
        num_train=extra.get("train", DEFAULT_NUM_TRAIN),
        num_validation=extra.get("val", DEFAULT_NUM_VALIDATION),
        seed=extra.get("seed", 0),
        tempos=tempos,
        description=f"{kind} shapes at {resolution}x{resolution}"
        + (f", {frames} frames" if kind == "video" else "")
        + tempo_description,
    )
    canonical = config_name(kind, resolution, frames, **_counts(config))
    if canonical != name:
      raise ValueError(f"Non-canonical shapes config name {name!r}; use {canonical!r}.")
    return config


def _counts(config):
  return dict(
      num_train=config.num_train,
      num_validation=config.num_validation,
      seed=config.seed,
      tempos=config.tempos,
  )


def _tempo_text(tempo):
  """The shortest decimal that reads back as the same float: 4.0 → '4', 2.5 → '2.5'."""
  return np.format_float_positional(tempo, trim="-")


def canonical_tempos(tempos, kind="video"):
  """Tempos as a name spells them: positive floats, ascending, each once (images: only 1)."""
  tempos = tuple(sorted(set(shapes.check_tempos(tempos))))
  if kind == "image" and tempos != shapes.DEFAULT_TEMPOS:
    raise ValueError(
        f"Shapes images are stills: tempos apply to video configs only, got " f"{tempos}."
    )
  return tempos


def config_name(
    kind,
    resolution,
    frames=shapes.DEFAULT_FRAMES,
    num_train=DEFAULT_NUM_TRAIN,
    num_validation=DEFAULT_NUM_VALIDATION,
    seed=0,
    tempos=shapes.DEFAULT_TEMPOS,
):
  """The canonical config name for these parameters (tempos sorted, duplicates dropped)."""
  if kind not in shapes.KINDS:
    raise ValueError(f"Unknown kind {kind!r}; expected one of {shapes.KINDS}.")
  tempos = canonical_tempos(tempos, kind)
  name = f"image_{resolution}" if kind == "image" else f"video_{resolution}_{frames}"
  if tempos != shapes.DEFAULT_TEMPOS:
    name += "_tempo" + "-".join(_tempo_text(t) for t in tempos)
  if num_train != DEFAULT_NUM_TRAIN:
    name += f"_train{num_train}"
  if num_validation != DEFAULT_NUM_VALIDATION:
    name += f"_val{num_validation}"
  if seed:
    name += f"_seed{seed}"
  return name


class VldmShapes(tfds.core.GeneratorBasedBuilder):
  """Procedural captioned shapes: one colored shape per clip, moving left/right/up/down."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      ShapesConfig.from_name(n)
      for n in ("image_32", "image_64", "video_32_8", "video_64_8", "video_32_16")
  ]
  DEFAULT_CONFIG_NAME = "video_32_8"

  def __init__(self, *, config=None, **kwargs):
    if isinstance(config, ShapesConfig):  # a constructed config goes by its canonical name
      config = config.name
    super().__init__(config=config, **kwargs)

  @classmethod
  def get_builder_config(cls, name, version=None):
    config = super().get_builder_config(name, version)
    if config is None and not (version and ":" in name):
      config = ShapesConfig.from_name(name)
    return config

  def _info(self):
    c = self.builder_config
    size = c.resolution
    features = {
        "caption": tfds.features.Text(),
        "color": tfds.features.ClassLabel(names=list(shapes.COLORS)),
        "shape": tfds.features.ClassLabel(names=list(shapes.SHAPES)),
        "held_out": tfds.features.Scalar(np.bool_, doc="a held-out (color, shape) pair"),
        "x": tfds.features.Scalar(np.float32, doc="first-frame centre, fraction of the side"),
        "y": tfds.features.Scalar(np.float32),
        "r": tfds.features.Scalar(np.float32, doc="object size, fraction of the side"),
    }
    if c.kind == "video":
      # Raw uint8 frames, zlib-compressed: the black background compresses to almost nothing and
      # decoding is a memcpy, unlike per-frame PNG.
      features["video"] = tfds.features.Tensor(
          shape=(c.frames, size, size, 3), dtype=np.uint8, encoding="zlib"
      )
      features["direction"] = tfds.features.ClassLabel(names=list(shapes.DIRECTIONS))
      features["speed"] = tfds.features.Scalar(np.float32, doc="fraction of the side per frame")
      features["fps"] = tfds.features.Scalar(np.float32)
      if c.tempos != shapes.DEFAULT_TEMPOS:  # tempo-1 configs keep their original features
        features["tempo"] = tfds.features.Scalar(
            np.float32, doc="frame-rate multiple k: speeds SPEED_RANGE / k, fps 8k"
        )
    else:
      features["image"] = tfds.features.Tensor(
          shape=(size, size, 3), dtype=np.uint8, encoding="zlib"
      )
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features),
        description=__doc__,
        homepage="https://github.com/vldm/vldm",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    c = self.builder_config
    return {
        "train": self._generate_examples("train", c.num_train),
        "validation": self._generate_examples("validation", c.num_validation),
    }

  def _generate_examples(self, split, count):
    c = self.builder_config
    for index in range(count):
      yield index, to_features(
          shapes.make_example(
              c.kind, split, index, c.frames, c.resolution, c.seed, tempos=c.tempos
          ),
          c.kind,
          with_tempo=c.tempos != shapes.DEFAULT_TEMPOS,
      )


def to_features(example, kind, with_tempo=False):
  """A `shapes.make_example` dict as this builder's feature dict; `with_tempo` adds 'tempo'
  (tempo configs only, so that tempo-1 configs keep their features)."""
  out = {k: example[k] for k in ("caption", "color", "shape", "held_out", kind)}
  out.update({k: np.float32(example[k]) for k in ("x", "y", "r")})
  if kind == "video":
    out.update(
        direction=example["direction"],
        speed=np.float32(example["speed"]),
        fps=np.float32(example.get("fps", FPS)),
    )
    if with_tempo:
      out["tempo"] = np.float32(example["tempo"])
  return out


def shapes_builder(
    kind="video",
    resolution=32,
    frames=shapes.DEFAULT_FRAMES,
    num_train=DEFAULT_NUM_TRAIN,
    num_validation=DEFAULT_NUM_VALIDATION,
    seed=0,
    data_dir=None,
    tempos=shapes.DEFAULT_TEMPOS,
):
  """The `VldmShapes` builder for these parameters (not yet prepared)."""
  name = config_name(kind, resolution, frames, num_train, num_validation, seed, tempos)
  return VldmShapes(config=name, data_dir=data_dir)
