"""A text-to-video pipeline as a diffusers-layout folder, and back: what `python -m vldm.export`
writes and `python -m vldm.sample --pretrained FOLDER` reads.

  FOLDER/model_index.json           the pipeline class (StableDiffusionPipeline for an image UNet,
                                    else VldmTextToVideoPipeline), each component's
                                    [library, class], and `vldm`: the sampling defaults
  FOLDER/unet/ vae/ text_encoder/   `vldm.convert.save_diffusers` folders: diffusers /
                                    transformers classes where one describes the model (an image
                                    UNet: UNet2DConditionModel), else vldm-native ('VldmUNet')
  FOLDER/tokenizer/                 the CLIP tokenizer files (or vldm's word tokenizer file)
  FOLDER/scheduler/                 scheduler_config.json of the sampler, schedule and prediction
  FOLDER/temporal_layers.safetensors  a video UNet's temporal layers alone (a motion module), to
                                    move onto another image model (`convert.load_temporal_layers`)
  FOLDER/upsampler/                 a cascade's latent upsampler: unet/ and upsampler.json
                                    (low_res_factor, low_res_noise_level, num_steps,
                                    guidance_scale), text_encoder/ where it differs from the
                                    base's; the rest of FOLDER is its base
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from vldm import convert
from vldm.diffusion import samplers
from vldm.models import tokenizer as tokenizer_lib
from vldm.models import unet as unet_lib
from vldm.pipelines import common
from vldm.pipelines import workdir as workdir_lib
from vldm.pipelines.cascade import CascadePipeline
from vldm.pipelines.text_to_video import NEEDS, TextToVideoPipeline

TEMPORAL_LAYERS = "temporal_layers.safetensors"
UPSAMPLER = "upsampler"
UPSAMPLER_CONFIG = "upsampler.json"
VIDEO_PIPELINE_CLASS = "VldmTextToVideoPipeline"
IMAGE_PIPELINE_CLASS = "StableDiffusionPipeline"

Pipeline = Union[TextToVideoPipeline, CascadePipeline]


def _portable(module):
  """The module with the default compute settings: what the folder stores is the architecture."""
  fields = {"dtype": jnp.float32, "remat_policy": "none", "attention_implementation": None}
  return module.clone(**{k: v for k, v in fields.items() if hasattr(module, k)})


def _library(class_name: str) -> str:
  return (
      "vldm"
      if class_name.startswith("Vldm")
      else ("transformers" if class_name.startswith("CLIP") else "diffusers")
  )


def _save_model(module, params, path: str) -> list[str]:
  module = _portable(module)
  convert.save_diffusers(module, params, path)
  class_name = convert.export_class_of(module)
  return [_library(class_name), class_name]


def _same(a, b) -> bool:
  """Whether two parameter trees hold the same arrays."""
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(leaves_a, leaves_b))


def _save_unet(unet, params, folder: str) -> list[str]:
  entry = _save_model(unet, params, os.path.join(folder, "unet"))
  if unet.temporal:
    convert.save_temporal_layers(params, os.path.join(folder, TEMPORAL_LAYERS))
  return entry


def save_pipeline(pipe: Pipeline, folder: str) -> str:
  """Writes `pipe` (a TextToVideoPipeline or a CascadePipeline) to `folder`; returns folder."""
  upsampler = None
  if isinstance(pipe, CascadePipeline):
    pipe, upsampler = pipe.base, pipe
  os.makedirs(folder, exist_ok=True)
  index = {
      "_class_name": VIDEO_PIPELINE_CLASS if pipe.unet.temporal else IMAGE_PIPELINE_CLASS,
      "_diffusers_version": "0.35.0",
  }
  index["unet"] = _save_unet(pipe.unet, pipe.params["unet"], folder)
  index["vae"] = _save_model(pipe.vae, pipe.params["vae"], os.path.join(folder, "vae"))
  index["text_encoder"] = _save_model(
      pipe.text_encoder, pipe.params["text_encoder"], os.path.join(folder, "text_encoder")
  )
  tokenizer_lib.save_tokenizer(pipe.tokenizer, os.path.join(folder, "tokenizer"))
  index["tokenizer"] = (
      ["transformers", "CLIPTokenizer"]
      if isinstance(pipe.tokenizer, tokenizer_lib.CLIPBPETokenizer)
      else ["vldm", "WordTokenizer"]
  )
  s = pipe.sampler
  scheduler = samplers.to_scheduler_config(s.sampler, s.schedule, s.options, s.prediction_type)
  os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
  with open(os.path.join(folder, "scheduler", common.SCHEDULER_CONFIG), "w", encoding="utf-8") as f:
    json.dump(scheduler, f, indent=2, sort_keys=True)
  index["scheduler"] = ["diffusers", scheduler["_class_name"]]
  if IMAGE_PIPELINE_CLASS == index["_class_name"]:  # what StableDiffusionPipeline expects too
    index.update(
        safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False
    )
  index["vldm"] = {
      "num_steps": pipe.default_num_steps,
      "guidance_scale": pipe.default_guidance_scale,
  }
  if upsampler is not None:
    up = upsampler.upsampler
    path = os.path.join(folder, UPSAMPLER)
    index["vldm"]["upsampler"] = _save_unet(up.unet, up.params["unet"], path)
    if not _same(up.params["text_encoder"], pipe.params["text_encoder"]):  # trained with it
      _save_model(up.text_encoder, up.params["text_encoder"], os.path.join(path, "text_encoder"))
    with open(os.path.join(path, UPSAMPLER_CONFIG), "w", encoding="utf-8") as f:
      json.dump(
          {
              "low_res_factor": up.low_res_factor,
              "low_res_noise_level": up.low_res_noise_level,
              "num_steps": upsampler.upsampler_num_steps,
              "guidance_scale": upsampler.upsampler_guidance_scale,
          },
          f,
          indent=2,
      )
  with open(os.path.join(folder, common.MODEL_INDEX), "w", encoding="utf-8") as f:
    json.dump(index, f, indent=2)
  return folder


def load_pipeline(folder: str) -> Pipeline:
  """The text-to-video pipeline of a diffusers-layout folder (see the module docstring): a
  CascadePipeline when it has an upsampler/, its sampling defaults from model_index.json."""
  index = common.check_components(folder, "text-to-video", NEEDS)
  defaults = {
      f"default_{k}": v
      for k, v in index.get("vldm", {}).items()
      if k in workdir_lib.DEFAULTS
  }
  base = TextToVideoPipeline.from_pretrained(folder, **defaults)
  path = os.path.join(folder, UPSAMPLER)
  if not os.path.isdir(path):
    return base
  options = common.read_json(os.path.join(path, UPSAMPLER_CONFIG))
  unet, params = common.load_component(path, "unet", [unet_lib.UNet], NEEDS["unet"])
  encoder = base.text_encoder, base.params["text_encoder"]
  if os.path.isdir(os.path.join(path, "text_encoder")):  # its own, where it trained the encoder
    encoder = common.load_component(path, "text_encoder", [type(base.text_encoder)],
                                    NEEDS["text_encoder"])
  upsampler = dataclasses.replace(
      base,
      unet=unet,
      text_encoder=encoder[0],
      params=dict(base.params, unet=params, text_encoder=encoder[1]),
      low_res_factor=options["low_res_factor"],
      low_res_noise_level=options["low_res_noise_level"],
  )
  return CascadePipeline(
      base=base,
      upsampler=upsampler,
      upsampler_num_steps=options["num_steps"],
      upsampler_guidance_scale=options["guidance_scale"],
  )
