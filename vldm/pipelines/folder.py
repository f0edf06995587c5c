"""A pipeline as a diffusers-layout folder, and back: what `python -m vldm.export` writes and
`python -m vldm.sample --pretrained FOLDER` reads.

An ImageToVideoPipeline (SVD) is written as diffusers' StableVideoDiffusionPipeline folder, which
diffusers loads as it is: model_index.json (+ `vldm`: the sampling defaults and
micro_conditioning_ranges), unet/ (UNetSpatioTemporalConditionModel), vae/, image_encoder/
(CLIPVisionModelWithProjection), feature_extractor/preprocessor_config.json (CLIPImageProcessor)
and scheduler/ (EulerDiscreteScheduler: 'v_edm' is v_prediction with continuous timesteps).

A text-to-video pipeline:

  FOLDER/model_index.json           the pipeline class (StableDiffusionPipeline for an image UNet,
                                    AnimateDiffPipeline for a UNetMotionModel with a CLIP
                                    tokenizer, TextToVideoSDPipeline for a UNet3DConditionModel
                                    (ModelScope) with one, else VldmTextToVideoPipeline), each
                                    component's
                                    [library, class], and `vldm`: the sampling defaults
  FOLDER/unet/ vae/ text_encoder/   `vldm.convert.save_diffusers` folders: diffusers /
                                    transformers classes where one describes the model (an image
                                    UNet: UNet2DConditionModel), else vldm-native ('VldmUNet')
  FOLDER/tokenizer/                 the CLIP tokenizer files (or vldm's word tokenizer file)
  FOLDER/scheduler/                 scheduler_config.json of the sampler, schedule and prediction
  FOLDER/temporal_layers.safetensors  a video UNet's temporal layers alone (a motion module), to
                                    move onto another image model (`convert.load_temporal_layers`)
  FOLDER/motion_adapter/            AnimateDiffPipeline's MotionAdapter (the motion modules alone,
                                    diffusers' format)
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
from vldm.pipelines import image_to_video
from vldm.pipelines.cascade import CascadePipeline
from vldm.pipelines.image_to_video import ImageToVideoPipeline
from vldm.pipelines.text_to_video import NEEDS, TextToVideoPipeline

TEMPORAL_LAYERS = "temporal_layers.safetensors"
UPSAMPLER = "upsampler"
UPSAMPLER_CONFIG = "upsampler.json"
VIDEO_PIPELINE_CLASS = "VldmTextToVideoPipeline"
IMAGE_PIPELINE_CLASS = "StableDiffusionPipeline"
ANIMATEDIFF_PIPELINE_CLASS = "AnimateDiffPipeline"
MODELSCOPE_PIPELINE_CLASS = "TextToVideoSDPipeline"
SVD_PIPELINE_CLASS = "StableVideoDiffusionPipeline"
SVD_UNET_CLASS = "UNetSpatioTemporalConditionModel"
DIFFUSERS_VERSION = "0.35.0"
# model_index.json's `vldm` entries of an image-to-video folder → ImageToVideoPipeline fields.
SVD_DEFAULTS = ("num_steps", "min_guidance_scale", "max_guidance_scale", "fps",
                "motion_bucket_id", "noise_aug_strength")

Pipeline = Union[TextToVideoPipeline, CascadePipeline, ImageToVideoPipeline]


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


def _write_json(value, path: str, **kwargs) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, **kwargs)


def _save_scheduler(settings: common.SamplerSettings, folder: str) -> list[str]:
  s = settings
  scheduler = samplers.to_scheduler_config(s.sampler, s.schedule, s.options, s.prediction_type)
  _write_json(scheduler, os.path.join(folder, "scheduler", common.SCHEDULER_CONFIG),
              sort_keys=True)
  return ["diffusers", scheduler["_class_name"]]


def feature_extractor_config(image_size: int, clip_mean, clip_std) -> dict:
  """What `transformers.CLIPImageProcessor(crop_size=image_size, size=image_size,
  image_mean=…, image_std=…).save_pretrained` writes (plain json: no torch needed)."""
  return {
      "crop_size": {"height": int(image_size), "width": int(image_size)},
      "do_center_crop": True,
      "do_convert_rgb": True,
      "do_normalize": True,
      "do_rescale": True,
      "do_resize": True,
      "image_mean": [float(v) for v in clip_mean],
      "image_processor_type": "CLIPImageProcessor",
      "image_std": [float(v) for v in clip_std],
      "resample": 3,
      "rescale_factor": 1 / 255,
      "size": {"shortest_edge": int(image_size)},
  }


def _save_image_to_video(pipe: ImageToVideoPipeline, folder: str) -> str:
  """Writes a diffusers StableVideoDiffusionPipeline folder (see the module docstring)."""
  os.makedirs(folder, exist_ok=True)
  index = {"_class_name": SVD_PIPELINE_CLASS, "_diffusers_version": DIFFUSERS_VERSION}
  unet = _portable(pipe.unet)
  try:
    convert.save_diffusers(unet, pipe.params["unet"], os.path.join(folder, "unet"),
                           class_name=SVD_UNET_CLASS)
  except convert.ConversionError as e:
    raise common.PipelineError(
        f"Cannot write this image-to-video pipeline as a {SVD_PIPELINE_CLASS} folder: diffusers' "
        f"pipeline needs its UNet as a {SVD_UNET_CLASS}, which cannot describe this one ({e})."
    ) from e
  index["unet"] = ["diffusers", SVD_UNET_CLASS]
  index["vae"] = _save_model(pipe.vae, pipe.params["vae"], os.path.join(folder, "vae"))
  index["image_encoder"] = _save_model(pipe.image_encoder, pipe.params["image_encoder"],
                                       os.path.join(folder, "image_encoder"))
  _write_json(
      feature_extractor_config(pipe.image_encoder.image_size, pipe.clip_mean, pipe.clip_std),
      os.path.join(folder, image_to_video.FEATURE_EXTRACTOR_CONFIG))
  index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
  try:
    index["scheduler"] = _save_scheduler(pipe.sampler, folder)
  except ValueError as e:
    raise common.PipelineError(f"Cannot write this pipeline's sampler as a diffusers scheduler: "
                               f"{e}") from e
  plain = lambda v: v.item() if hasattr(v, "item") else v  # numpy scalars → JSON numbers
  index["vldm"] = {name: plain(getattr(pipe, f"default_{name}")) for name in SVD_DEFAULTS}
  if pipe.micro_conditioning_ranges is not None:
    index["vldm"]["micro_conditioning_ranges"] = {
        k: list(v) for k, v in pipe.micro_conditioning_ranges.items()}
  _write_json(index, os.path.join(folder, common.MODEL_INDEX))
  return folder


def save_pipeline(pipe: Pipeline, folder: str) -> str:
  """Writes `pipe` (a TextToVideoPipeline, a CascadePipeline or an ImageToVideoPipeline) to
  `folder`; returns folder."""
  if isinstance(pipe, ImageToVideoPipeline):
    return _save_image_to_video(pipe, folder)
  upsampler = None
  if isinstance(pipe, CascadePipeline):
    pipe, upsampler = pipe.base, pipe
  os.makedirs(folder, exist_ok=True)
  index = {
      "_class_name": VIDEO_PIPELINE_CLASS if pipe.unet.temporal else IMAGE_PIPELINE_CLASS,
      "_diffusers_version": DIFFUSERS_VERSION,
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
  index["scheduler"] = _save_scheduler(pipe.sampler, folder)
  if IMAGE_PIPELINE_CLASS == index["_class_name"]:  # what StableDiffusionPipeline expects too
    index.update(
        safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False
    )
  if (upsampler is None and index["unet"][1] == "UNetMotionModel"
      and index["tokenizer"][1] == "CLIPTokenizer"):  # all that AnimateDiffPipeline loads
    convert.save_motion_adapter(_portable(pipe.unet), pipe.params["unet"],
                                os.path.join(folder, "motion_adapter"))
    index.update(_class_name=ANIMATEDIFF_PIPELINE_CLASS, motion_adapter=["diffusers",
                                                                         "MotionAdapter"],
                 feature_extractor=[None, None], image_encoder=[None, None])
  if (upsampler is None and index["unet"][1] == "UNet3DConditionModel"
      and index["tokenizer"][1] == "CLIPTokenizer"):  # all that TextToVideoSDPipeline loads
    index["_class_name"] = MODELSCOPE_PIPELINE_CLASS
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


def load_image_to_video(folder: str) -> ImageToVideoPipeline:
  """A StableVideoDiffusionPipeline folder's pipeline, with model_index.json's `vldm` defaults and
  micro_conditioning_ranges when it has them (a folder vldm wrote)."""
  extra = common.read_model_index(folder).get("vldm", {})
  kwargs = {f"default_{k}": v for k, v in extra.items() if k in SVD_DEFAULTS}
  ranges = extra.get("micro_conditioning_ranges")
  if ranges is not None:
    kwargs["micro_conditioning_ranges"] = {k: tuple(v) for k, v in ranges.items()}
  return ImageToVideoPipeline.from_pretrained(folder, **kwargs)


def load_pipeline(folder: str) -> Pipeline:
  """The pipeline of a diffusers-layout folder (see the module docstring): an
  ImageToVideoPipeline for a StableVideoDiffusionPipeline folder; else text-to-video, a
  CascadePipeline when it has an upsampler/; the sampling defaults from model_index.json."""
  if common.read_model_index(folder).get("_class_name") == SVD_PIPELINE_CLASS:
    return load_image_to_video(folder)
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
