"""TFDS builder for the procedural shapes dataset (`vldm_shapes`).

Configs are named `image_{resolution}` or `video_{resolution}_{frames}`, optionally followed by
`_train{N}`, `_val{M}` and `_seed{S}` when the example counts or the seed differ from the
defaults: `video_32_8`, `image_64`, `video_48_12_train64_val18`. Any such name works, predefined
or not (`tfds.builder('vldm_shapes/video_40_10', data_dir=...)`), and `shapes_builder(...)` builds
the name from arguments. Example i of a split is a pure function of (seed, kind, split, i); see
`shapes.example_params`.
"""
import dataclasses
import functools
import re

import numpy as np
import tensorflow_datasets as tfds

from vldm.data import shapes

DEFAULT_NUM_TRAIN = 10_000
DEFAULT_NUM_VALIDATION = 576  # 32 examples of each of the 18 compositions (x 4 directions cycled)
FPS = 8.0  # nominal frame rate of a shapes clip: what fps micro-conditioning sees
_NAME = re.compile(r"^(image)_(\d+)|(video)_(\d+)_(\d+)")
_SUFFIX = re.compile(r"_(train|val|seed)(\d+)")


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """kind 'image' (stills) or 'video'; resolution in pixels; frames per clip (video only)."""
  kind: str = "video"
  resolution: int = 32
  frames: int = shapes.DEFAULT_FRAMES
  num_train: int = DEFAULT_NUM_TRAIN
  num_validation: int = DEFAULT_NUM_VALIDATION
  seed: int = 0

  @classmethod
  def make(cls, kind="video", resolution=32, frames=shapes.DEFAULT_FRAMES,
           num_train=DEFAULT_NUM_TRAIN, num_validation=DEFAULT_NUM_VALIDATION, seed=0):
    return cls.from_name(config_name(kind, resolution, frames, num_train, num_validation, seed))

  @classmethod
  @functools.cache  # one object per name: TFDS compares configs by identity
  def from_name(cls, name):
    match = _NAME.match(name)
    rest = _SUFFIX.findall(name[match.end():]) if match else None
    if not match or "".join(f"_{k}{v}" for k, v in rest) != name[match.end():]:
      raise ValueError(f"Bad shapes config name {name!r}; expected image_<resolution> or "
                       "video_<resolution>_<frames>, optionally followed by _train<N>, _val<M>, "
                       "_seed<S> (e.g. 'video_32_8', 'image_64_train100').")
    extra = {k: int(v) for k, v in rest}
    if match.group(1):
      kind, resolution, frames = "image", int(match.group(2)), 1
    else:
      kind, resolution, frames = "video", int(match.group(4)), int(match.group(5))
    if resolution < 1:
      raise ValueError(f"Resolution must be >= 1, got {resolution} in {name!r}.")
    if kind == "video" and not 1 <= frames <= shapes.max_frames():
      raise ValueError(f"Frames must be in [1, {shapes.max_frames()}], got {frames} in {name!r}.")
    config = cls(
        name=name, kind=kind, resolution=resolution, frames=frames,
        num_train=extra.get("train", DEFAULT_NUM_TRAIN),
        num_validation=extra.get("val", DEFAULT_NUM_VALIDATION), seed=extra.get("seed", 0),
        description=f"{kind} shapes at {resolution}x{resolution}" +
        (f", {frames} frames" if kind == "video" else ""))
    if config_name(config.kind, config.resolution, config.frames, config.num_train,
                   config.num_validation, config.seed) != name:
      raise ValueError(f"Non-canonical shapes config name {name!r}; use "
                       f"{config_name(kind, resolution, frames, **_counts(config))!r}.")
    return config


def _counts(config):
  return dict(num_train=config.num_train, num_validation=config.num_validation, seed=config.seed)


def config_name(kind, resolution, frames=shapes.DEFAULT_FRAMES, num_train=DEFAULT_NUM_TRAIN,
                num_validation=DEFAULT_NUM_VALIDATION, seed=0):
  """The canonical config name for these parameters."""
  if kind not in shapes.KINDS:
    raise ValueError(f"Unknown kind {kind!r}; expected one of {shapes.KINDS}.")
  name = f"image_{resolution}" if kind == "image" else f"video_{resolution}_{frames}"
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
  BUILDER_CONFIGS = [ShapesConfig.from_name(n) for n in
                     ("image_32", "image_64", "video_32_8", "video_64_8", "video_32_16")]
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
          shape=(c.frames, size, size, 3), dtype=np.uint8, encoding="zlib")
      features["direction"] = tfds.features.ClassLabel(names=list(shapes.DIRECTIONS))
      features["speed"] = tfds.features.Scalar(np.float32, doc="fraction of the side per frame")
      features["fps"] = tfds.features.Scalar(np.float32)
    else:
      features["image"] = tfds.features.Tensor(
          shape=(size, size, 3), dtype=np.uint8, encoding="zlib")
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features),
        description=__doc__,
        homepage="https://github.com/vldm/vldm",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    c = self.builder_config
    return {"train": self._generate_examples("train", c.num_train),
            "validation": self._generate_examples("validation", c.num_validation)}

  def _generate_examples(self, split, count):
    c = self.builder_config
    for index in range(count):
      yield index, to_features(shapes.make_example(
          c.kind, split, index, c.frames, c.resolution, c.seed), c.kind)


def to_features(example, kind):
  """A `shapes.make_example` dict as this builder's feature dict."""
  out = {k: example[k] for k in ("caption", "color", "shape", "held_out", kind)}
  out.update({k: np.float32(example[k]) for k in ("x", "y", "r")})
  if kind == "video":
    out.update(direction=example["direction"], speed=np.float32(example["speed"]),
               fps=np.float32(FPS))
  return out


def shapes_builder(kind="video", resolution=32, frames=shapes.DEFAULT_FRAMES,
                   num_train=DEFAULT_NUM_TRAIN, num_validation=DEFAULT_NUM_VALIDATION, seed=0,
                   data_dir=None):
  """The `VldmShapes` builder for these parameters (not yet prepared)."""
  return VldmShapes(config=config_name(kind, resolution, frames, num_train, num_validation, seed),
                    data_dir=data_dir)
