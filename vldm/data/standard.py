"""Standard TFDS video datasets (ucf101, moving_mnist, bair_robot_pushing_small) as pipeline sources.

They are read only where already prepared under `data_dir` (array_record format, for random
access); nothing is ever downloaded. Each example becomes the pipeline's canonical form:
{'video': uint8 [T, H, W, 3], 'caption': str, 'fps': float}, the caption from the class name
through a template ("a video of {label}") or a fixed text where there is no label.
"""
import dataclasses
import re

import numpy as np
import tensorflow_datasets as tfds

from vldm.data import transforms


@dataclasses.dataclass(frozen=True)
class VideoDatasetSpec:
  video_key: str  # the feature holding the frames
  template: str  # caption; may use {label}
  fps: float  # nominal frame rate (for fps micro-conditioning)
  label_key: str | None = None  # a ClassLabel feature, if any


STANDARD_DATASETS = {
    "ucf101": VideoDatasetSpec("video", "a video of {label}", 25.0, label_key="label"),
    "moving_mnist": VideoDatasetSpec("image_sequence", "digits moving", 10.0),
    "bair_robot_pushing_small": VideoDatasetSpec("image_main", "a robot arm pushing objects", 10.0),
}


def humanize(label):
  """Class names as words: 'ApplyEyeMakeup' -> 'apply eye makeup', 'push_ups' -> 'push ups'."""
  words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", label)
  return " ".join(words.replace("_", " ").split()).lower()


class LabeledVideoSource:
  """Maps a TFDS data source's examples to {'video', 'caption', 'fps'}."""

  def __init__(self, data_source, spec, label_names=None, template=None):
    self.data_source, self.spec = data_source, spec
    self.template = template or spec.template
    self.label_names = label_names
    if "{label}" in self.template and (spec.label_key is None or label_names is None):
      raise ValueError(f"Caption template {self.template!r} uses {{label}} but this dataset has "
                       "no class label; use a fixed caption.")

  def __len__(self):
    return len(self.data_source)

  def caption(self, example):
    if self.spec.label_key is None or "{label}" not in self.template:
      return self.template
    label = self.label_names[int(example[self.spec.label_key])]
    return self.template.format(label=humanize(label))

  def __getitem__(self, index):
    example = self.data_source[index]
    video = example[self.spec.video_key]
    video = np.stack(video) if isinstance(video, (list, tuple)) else np.asarray(video)
    return {"video": transforms.to_rgb(video), "caption": self.caption(example),
            "fps": self.spec.fps}


def standard_source(name, split="train", data_dir=None, template=None):
  """A pipeline source for a prepared standard dataset; `name` may carry a config ('ucf101/...')."""
  base = name.split("/")[0].split(":")[0]
  if base not in STANDARD_DATASETS:
    raise ValueError(f"Unknown standard video dataset {name!r}; known: "
                     f"{sorted(STANDARD_DATASETS)}.")
  spec = STANDARD_DATASETS[base]
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not present under {builder.data_dir}; vldm never downloads it. "
        f"Prepare it where there is network access (`tfds build {name} --data_dir=DIR "
        "--file_format=array_record`) and pass that data_dir.")
  try:
    data_source = builder.as_data_source(split)
  except (NotImplementedError, ValueError) as e:
    raise ValueError(
        f"TFDS dataset {name!r} at {builder.data_dir} cannot be read by random access ({e}). "
        "Convert it to array_record: `tfds convert_format --dataset_version_dir=DIR "
        "--out_file_format=array_record`.") from e
  label_names = None
  if spec.label_key is not None:
    label_names = builder.info.features[spec.label_key].names
  return LabeledVideoSource(data_source, spec, label_names, template)
