"""A trained stage → its task, parameters and pipeline: the one way from a workdir to sampling.

`python -m vldm.sample --workdir`, `python -m vldm.demo` and `python -m vldm.export` all go through
here. A stage is rebuilt from the config saved beside its newest checkpoint
(`RUN/checkpoints/<step>/config`), so sampling uses the stage's own components and sampler settings.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import ml_collections

from vldm.pipelines import common as pipeline_common
from vldm.pipelines import folder as pipeline_folder
from vldm.pipelines import workdir as workdir_lib
from vldm.recipes import common
from vldm.recipes import ldm
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
  """(task, params, frozen) of a trained diffusion stage: its newest (EMA) parameters."""
  task = tasks_lib.get_task(config)
  if not isinstance(task, ldm.LatentDiffusionTask):
    raise ValueError(f"{workdir} holds a {type(task).__name__} stage, not a diffusion stage.")
  params = common.load_stage_params(workdir)
  return task, params, task.init_frozen(None)


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


def pipeline_from_workdir(workdir: str):
  """The text-to-video pipeline of the newest trained stage in `workdir` (a CascadePipeline for
  a latent upsampler stage), with the stage's own sampler settings as its defaults."""
  return workdir_lib.pipeline_from_components(components_of(workdir_lib.newest_stage(workdir)))


def export(workdir: str, out: str) -> str:
  """Writes the newest trained stage of `workdir` as a diffusers-layout folder (see
  `vldm.pipelines.folder`); returns out. `python -m vldm.export` runs this."""
  return pipeline_folder.save_pipeline(pipeline_from_workdir(workdir), out)
