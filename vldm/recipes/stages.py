"""A trained stage → its task, parameters and pipeline: the one way from a workdir to sampling.

`python -m vldm.sample --workdir`, `python -m vldm.demo` and `python -m vldm.export` all go through
here. A stage is rebuilt from the config saved beside its newest checkpoint
(`RUN/checkpoints/<step>/config`), so sampling uses the stage's own components and sampler settings.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import ml_collections

from vldm.pipelines import common as pipeline_common
from vldm.pipelines import folder as pipeline_folder
from vldm.pipelines import workdir as workdir_lib
from vldm.pipelines.cascade import CascadePipeline
from vldm.pipelines.long_video import LongVideoPipeline
from vldm.recipes import common
from vldm.recipes import ldm
from vldm.train import lora as lora_train
from vldm.train import tasks as tasks_lib


def _tuples(value):
  """JSON lists back to tuples (module fields and config values are tuples in the recipes)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def saved_config(checkpoint_path: str) -> ml_collections.ConfigDict:
  """The config a run saved beside its checkpoint (`<run>/checkpoints/<step>/config`)."""
  path = os.path.join(checkpoint_path, "config", "metadata")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{checkpoint_path} has no saved config ({path}).")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def restore(config: ml_collections.ConfigDict, workdir: str):
  """(task, params, frozen) of a trained diffusion stage: its newest (EMA) parameters. A LoRA
  stage's are its base with the adapters merged (the base rebuilt from the stage's config: its
  pretrained folder or init_from workdir must still be there)."""
  task = tasks_lib.get_task(config)
  inner = task.inner if isinstance(task, lora_train.LoraTask) else task
  if not isinstance(inner, ldm.LatentDiffusionTask):
    raise ValueError(f"{workdir} holds a {type(inner).__name__} stage, not a diffusion stage.")
  params = common.load_stage_params(workdir)
  frozen = task.init_frozen(None)
  if inner is not task:
    params, frozen = task.task_params(params, frozen)
  return inner, params, frozen


def restore_stage(stage: workdir_lib.TrainedStage):
  """(task, params, frozen) of a found stage, from its saved config; errors say what was found."""
  try:
    return restore(saved_config(stage.path), stage.run_dir)
  except (FileNotFoundError, KeyError, ValueError) as e:
    raise pipeline_common.PipelineError(
        f"Found the trained stage {stage.name!r} at {stage.path} (step {stage.step}), but cannot "
        f"rebuild its modules and params: {e}"
    ) from e


def components_of(stage: workdir_lib.TrainedStage) -> Mapping:
  """A trained latent-diffusion stage → pipeline components (`pipeline_from_components`)."""
  task, params, frozen = restore_stage(stage)
  return task.components(params, frozen)


def frame_mode(stage: workdir_lib.TrainedStage) -> Optional[str]:
  """'prediction' or 'interpolation' for Video LDM's frame-conditioned stages, else None."""
  try:
    config = saved_config(stage.path)
  except FileNotFoundError:
    return None
  frames = config.get("ldm", {}).get("frame_conditioning")
  return frames.get("mode") if frames else None


def stages_by_mode(workdir: str) -> dict:
  """{None (text-to-video), 'prediction', 'interpolation'} → the newest such stage, for those
  the workdir has; a PipelineError when it has no trained stage at all."""
  workdir_lib.newest_stage(workdir)  # says where it looked when there is none
  found = {}
  for stage in workdir_lib.find_trained_stages(workdir):  # newest first
    found.setdefault(frame_mode(stage), stage)
  return found


def pipeline_from_workdir(workdir: str):
  """The text-to-video pipeline of the newest trained text-to-video stage in `workdir` (a
  CascadePipeline for a latent upsampler stage), with the stage's own sampler settings as its
  defaults. A workdir whose only stages are long-video ones (prediction, interpolation) gives
  their LongVideoPipeline."""
  found = stages_by_mode(workdir)
  if None not in found:
    return long_video_from_workdir(workdir)
  return workdir_lib.pipeline_from_components(components_of(found[None]))


def long_video_from_workdir(workdir: str, upsample: bool = True) -> LongVideoPipeline:
  """Video LDM's long-video pipeline of a workdir: its newest text-to-video stage (a cascade
  with an upsampler stage, unless `upsample` is False: then its base), prediction stage and
  interpolation stage, those it has; the rollout's context and first chunk as the prediction
  stage was configured."""
  found = stages_by_mode(workdir)
  first = found.get(None)
  if first is not None:
    first = workdir_lib.pipeline_from_components(components_of(first))
    if not upsample and isinstance(first, CascadePipeline):
      first = first.base
  pipes = {
      mode: workdir_lib.pipeline_from_components(components_of(found[mode]))
      for mode in ("prediction", "interpolation")
      if mode in found
  }
  settings = {}
  if "prediction" in found:
    own = ldm.frame_settings(saved_config(found["prediction"].path))
    settings = dict(context_frames=own["context_frames"], first_chunk=own["first_chunk"])
  try:
    return LongVideoPipeline(
        first=first,
        prediction=pipes.get("prediction"),
        interpolation=pipes.get("interpolation"),
        **settings,
    )
  except pipeline_common.PipelineError as e:
    raise pipeline_common.PipelineError(f"{workdir}: {e}") from e


def newest_lora_stage(workdir: str) -> workdir_lib.TrainedStage:
  """The newest trained stage of `workdir` whose config trains LoRA adapters (lora.rank > 0)."""
  workdir_lib.newest_stage(workdir)  # says where it looked when there is none
  for stage in workdir_lib.find_trained_stages(workdir):  # newest first
    try:
      config = saved_config(stage.path)
    except FileNotFoundError:
      continue
    if config.get("lora", {}).get("rank"):
      return stage
  raise pipeline_common.PipelineError(
      f"{workdir} holds no LoRA stage (a run with --config.lora.rank > 0); its stages: "
      f"{', '.join(s.name for s in workdir_lib.find_trained_stages(workdir))}."
  )


def export_lora(workdir: str, out: str) -> str:
  """Writes the adapters (EMA where kept) of the newest LoRA stage of `workdir` as diffusers'
  `OUT/pytorch_lora_weights.safetensors` (`vldm.convert.lora.save_lora`); returns its path.
  `python -m vldm.export --workdir RUN --lora OUT` runs this."""
  import jax  # pylint: disable=g-import-not-at-top

  from vldm.convert import lora as lora_convert  # pylint: disable=g-import-not-at-top

  stage = newest_lora_stage(workdir)
  settings = lora_train.settings(saved_config(stage.path))
  adapters = jax.device_get(common.load_stage_params(stage.run_dir))
  return lora_convert.save_lora(adapters, out, alpha=settings["alpha"])


def export(workdir: str, out: str) -> str:
  """Writes the newest trained stage of `workdir` as a diffusers-layout folder (see
  `vldm.pipelines.folder`); returns out. `python -m vldm.export` runs this."""
  return pipeline_folder.save_pipeline(pipeline_from_workdir(workdir), out)
