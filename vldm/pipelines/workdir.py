"""From a training workdir to a pipeline (text-to-video, or SVD image-to-video): the seam between
vldm.train and sampling.

A trained stage is a run folder with Orbax checkpoints, `RUN/checkpoints/<step>/` (see
`vldm.train.checkpoint`). `--workdir DIR` names one run, or a folder of stage runs
(`DIR/<stage>/checkpoints/<step>/`); the newest stage is the one whose newest checkpoint was written
last. Turning a stage into modules and params is the recipes' job (`vldm.recipes.stages`): they
return the components, `pipeline_from_components` builds the pipeline.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping, Optional

from vldm.pipelines import common
from vldm.pipelines.cascade import CascadePipeline
from vldm.pipelines.image_to_video import ImageToVideoPipeline
from vldm.pipelines.text_to_video import TextToVideoPipeline

CHECKPOINTS = "checkpoints"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")  # + optional sampler, time_ids
CASCADE_OPTIONS = ("upsampler_num_steps", "upsampler_guidance_scale")
DEFAULTS = ("num_steps", "guidance_scale", "context_scale")
# Image-to-video (SVD) stages: components with an image_encoder.
IMAGE_COMPONENTS = ("unet", "vae", "image_encoder")
IMAGE_DEFAULTS = (
    "num_steps",
    "min_guidance_scale",
    "max_guidance_scale",
    "fps",
    "motion_bucket_id",
    "noise_aug_strength",
)
IMAGE_OPTIONS = ("sampler", "clip_mean", "clip_std", "micro_conditioning_ranges")


@dataclasses.dataclass(frozen=True)
class TrainedStage:
  """One run's newest checkpoint: RUN/checkpoints/<step>/."""

  run_dir: str
  step: int
  path: str
  mtime: float

  @property
  def name(self) -> str:
    return os.path.basename(os.path.normpath(self.run_dir))


def _newest_checkpoint(run_dir: str) -> Optional[TrainedStage]:
  directory = os.path.join(run_dir, CHECKPOINTS)
  if not os.path.isdir(directory):
    return None
  # Only finished steps: Orbax writes into temporary names and renames to the bare step number.
  steps = [
      int(n)
      for n in os.listdir(directory)
      if n.isdigit() and os.path.isdir(os.path.join(directory, n))
  ]
  if not steps:
    return None
  path = os.path.join(directory, str(max(steps)))
  return TrainedStage(run_dir, max(steps), path, os.path.getmtime(path))


def searched_locations(workdir: str) -> list[str]:
  return [
      os.path.join(workdir, CHECKPOINTS, "<step>"),
      os.path.join(workdir, "<stage>", CHECKPOINTS, "<step>"),
  ]


def find_trained_stages(workdir: str) -> list[TrainedStage]:
  """The trained stages under `workdir`, newest first (by when their newest step was written)."""
  if not os.path.isdir(workdir):
    return []
  runs = [workdir] + sorted(
      os.path.join(workdir, n)
      for n in os.listdir(workdir)
      if os.path.isdir(os.path.join(workdir, n))
  )
  stages = [s for s in map(_newest_checkpoint, runs) if s is not None]
  return sorted(stages, key=lambda s: (s.mtime, s.step), reverse=True)


def image_to_video_from_components(components: Mapping) -> ImageToVideoPipeline:
  """{unet, vae, image_encoder: (module, params), [sampler], [clip_mean], [clip_std],
  [micro_conditioning_ranges], [num_steps], [min_guidance_scale], [max_guidance_scale], [fps],
  [motion_bucket_id], [noise_aug_strength]} → an ImageToVideoPipeline. The last six are its
  default_* (what the stage trained with); sampler: SamplerSettings or a scheduler config dict."""
  components = dict(components)
  missing = [name for name in IMAGE_COMPONENTS if name not in components]
  unknown = sorted(set(components) - set(IMAGE_COMPONENTS + IMAGE_OPTIONS + IMAGE_DEFAULTS))
  if missing or unknown:
    raise common.PipelineError(
        f"An image-to-video stage must provide {', '.join(IMAGE_COMPONENTS)} and may provide "
        f"{', '.join(IMAGE_OPTIONS + IMAGE_DEFAULTS)}; "
        + "; ".join(
            ([f"missing: {', '.join(missing)}"] if missing else [])
            + ([f"unknown: {', '.join(unknown)}"] if unknown else [])
        )
        + "."
    )
  for name in IMAGE_DEFAULTS:
    if name in components:
      components[f"default_{name}"] = components.pop(name)
  return ImageToVideoPipeline.from_components(**components)


def pipeline_from_components(components: Mapping):
  """{unet, vae, text_encoder: (module, params), tokenizer, [sampler], [time_ids], [num_steps],
  [guidance_scale]} → a TextToVideoPipeline (num_steps and guidance_scale: its defaults). A latent
  upsampler's components add low_res_factor, low_res_noise_level, `low_res` (its base stage's
  components) and optionally upsampler_num_steps and upsampler_guidance_scale → a
  CascadePipeline. Components with an `image_encoder` → an ImageToVideoPipeline (see
  `image_to_video_from_components` for the keys)."""
  if "image_encoder" in components:
    return image_to_video_from_components(components)
  components = dict(components)
  base = components.pop("low_res", None)
  cascade = {k: components.pop(k) for k in CASCADE_OPTIONS if k in components}
  for name in DEFAULTS:  # the stage's own sampling defaults
    if name in components:
      components[f"default_{name}"] = components.pop(name)
  missing = [name for name in COMPONENTS if name not in components]
  if missing:
    raise common.PipelineError(
        f"A trained stage must provide {', '.join(COMPONENTS)} (and "
        f"optionally sampler, time_ids); missing: {', '.join(missing)}."
    )
  pipe = TextToVideoPipeline.from_components(**components)
  if base is None:
    return pipe
  return CascadePipeline(base=pipeline_from_components(base), upsampler=pipe, **cascade)


def newest_stage(workdir: str) -> TrainedStage:
  """The newest trained stage under `workdir`; a PipelineError says where it looked."""
  stages = find_trained_stages(workdir)
  if not stages:
    state = "does not exist" if not os.path.isdir(workdir) else "holds no trained stage"
    raise common.PipelineError(
        f"{workdir} {state}: looked for Orbax checkpoints at "
        f"{' and '.join(searched_locations(workdir))} (written by `python -m vldm.train "
        f"--workdir …`). Train a stage first, or sample a diffusers folder with --pretrained."
    )
  return stages[0]


def pipeline_from_workdir(workdir: str, restore: Callable[[TrainedStage], Mapping]):
  """The pipeline of the newest trained stage in `workdir`, its components given by
  `restore(stage)` (`vldm.recipes.stages.pipeline_from_workdir` does this for vldm's recipes)."""
  return pipeline_from_components(restore(newest_stage(workdir)))
