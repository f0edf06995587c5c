"""Where a latent-diffusion stage's components come from: a folder, a workdir, or a module config.

Each component of `config.ldm` is resolved in one of three ways:
  a diffusers / transformers folder  `ldm.<component>.folder`, or `ldm.pretrained` (a Stable
                                     Diffusion pipeline folder: unet/ vae/ text_encoder/
                                     tokenizer/ scheduler/) for every component not given its own
  an earlier stage's workdir         `ldm.vae.workdir` (a trained autoencoder stage); the UNet and
                                     text encoder of an earlier stage enter through `init_from`
  a from-scratch module config       `ldm.unet.model`, `ldm.text_encoder.model`, `ldm.vae.model`
Module architectures come from folders' config.json files (no weights are read to build a module);
weights are read by `pretrained_params` and `frozen_vae`. The schedule and the prediction type come
from the folder's scheduler/scheduler_config.json unless the config sets them.
"""

from __future__ import annotations

import os
from typing import Optional

import jax.numpy as jnp
import numpy as np

from vldm import convert
from vldm.convert import registry
from vldm.data import shapes
from vldm.diffusion import frame_conditioning
from vldm.diffusion import samplers
from vldm.diffusion.schedules import DiscreteSchedule
from vldm.models import autoencoder as autoencoder_lib
from vldm.models import clip as clip_lib
from vldm.models import inflate
from vldm.models import tokenizer as tokenizer_lib
from vldm.models import unet as unet_lib
from vldm.recipes import common
from vldm.train import tasks as tasks_lib

SUBFOLDERS = {
    "unet": "unet",
    "vae": "vae",
    "text_encoder": "text_encoder",
    "tokenizer": "tokenizer",
    "scheduler": "scheduler",
    "image_encoder": "image_encoder",
}
NEEDS = {
    "unet": "a UNet2DConditionModel (config.json + diffusion_pytorch_model.safetensors)",
    "vae": "an AutoencoderKL or AutoencoderKLTemporalDecoder",
    "text_encoder": "a transformers CLIPTextModel (config.json + model.safetensors)",
    "tokenizer": "a CLIP tokenizer (vocab.json + merges.txt, or tokenizer.json)",
    "scheduler": "scheduler_config.json of a diffusers scheduler",
    "image_encoder": (
        "a transformers CLIPVisionModelWithProjection (config.json + model.safetensors)"
    ),
}
# The components each kind of stage reads from `ldm.pretrained`, and what such a folder is.
TEXT_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
IMAGE_COMPONENTS = ("unet", "vae", "image_encoder", "scheduler")
PIPELINE_KINDS = {
    TEXT_COMPONENTS: "a diffusers Stable Diffusion folder",
    IMAGE_COMPONENTS: "a diffusers Stable Video Diffusion (StableVideoDiffusionPipeline) folder",
}
VAE_KINDS = ("temporal_decoder", "kl")
TOKENIZER_KINDS = ("clip", "shapes_words", "ids_only")
SCALE_SOURCES = ("shapes",)
SCALE_EXAMPLES = 64  # rendered frames whose latent std sets a measured scaling factor
SCHEDULER_CONFIG = "scheduler_config.json"
FALLBACK_SCHEDULER = "DDIMScheduler"  # samples a scheduler class vldm has no sampler for
VAES = (autoencoder_lib.AutoencoderKL, autoencoder_lib.AutoencoderKLTemporalDecoder)


class ComponentError(tasks_lib.TaskInputError):
  """A component folder or config the recipe cannot use; the message says what is accepted."""


def from_pretrained(config) -> tuple:
  """The components `ldm.pretrained` provides: `ldm.pretrained_components` where set (e.g. an
  image-to-video stage on an SD folder takes no image encoder from it), else all."""
  return tuple(config.ldm.get("pretrained_components") or SUBFOLDERS)


def folder(config, name: str) -> Optional[str]:
  """The folder `name` is read from: `ldm.<name>.folder`, else `ldm.pretrained/<subfolder>`."""
  c = config.ldm
  own = c[name].get("folder") if name in c else None
  if own:
    return own
  if c.get("pretrained") and name in from_pretrained(config):
    return os.path.join(c.pretrained, SUBFOLDERS[name])
  return None


def check_pretrained(config, names=TEXT_COMPONENTS) -> None:
  """A clear error for a `pretrained` folder that lacks a component (of `names`) the stage reads
  from it."""
  c = config.ldm
  if not c.get("pretrained"):
    return
  kind = PIPELINE_KINDS.get(tuple(names), "a diffusers pipeline folder")
  names = [n for n in names if n in from_pretrained(config)]
  if not os.path.isdir(c.pretrained):
    raise ComponentError(
        f"ldm.pretrained={c.pretrained!r} is not a folder; expected {kind} with "
        f"{', '.join(s + '/' for s in names)}."
    )
  paths = {name: folder(config, name) for name in names}
  missing = [name for name, path in paths.items() if path and not os.path.isdir(path)]
  if missing:
    wanted = "; ".join(f"{n}/ ({NEEDS[n]})" for n in names)
    raise ComponentError(
        f"{c.pretrained} has no {', '.join(m + '/' for m in missing)}: ldm.pretrained must be "
        f"{kind}, with {wanted}."
    )


def _module_from_folder(path: str, name: str, accepted: tuple):
  """The module a model folder's config.json describes (its weights are not read)."""
  try:
    config = registry.read_config(path)
    module = registry.format_for(registry.class_name_of(config)).from_config(config)
  except convert.ConversionError as e:
    raise ComponentError(f"Cannot use {path} as the {name}: {e}") from e
  if not isinstance(module, accepted):
    found = getattr(module, "reference_class", type(module).__name__)
    raise ComponentError(f"{path} holds a {found}; the {name} must be {NEEDS[name]}.")
  return module


def _compute_options(config) -> dict:
  """The run's compute settings, which every UNet of the stage takes."""
  return dict(
      dtype=jnp.dtype(config.dtype),
      remat_policy=config.get("remat_policy") or "none",
      attention_implementation=config.get("attention_implementation"),
  )


# -------------------------------------------------------------------------------------- UNet
def image_conditioned(config) -> bool:
  """Whether the stage is image-to-video (SVD): conditioned on a frame, not on text."""
  return config.ldm.get("conditioning", "text") == "image"


def make_unet(config) -> unet_lib.UNet:
  """The stage's UNet, with the run's compute settings: an image UNet from a folder or a module
  config, inflated for a video stage (`ldm.temporal`); its input conv takes 2 × the latent channels
  where the stage concatenates a condition (a latent upsampler's low-resolution latents, an
  image-to-video stage's frame latents). An image-to-video stage also takes a video UNet as it is
  (e.g. a published SVD folder's UNetSpatioTemporalConditionModel)."""
  path = folder(config, "unet")
  if path:
    unet = _module_from_folder(path, "unet", (unet_lib.UNet,))
  else:
    unet = unet_lib.UNet(**config.ldm.unet.model.to_dict())
  if unet.temporal:
    if not image_conditioned(config):
      raise ComponentError(
          f"{path} holds a {unet.reference_class}; this recipe inflates an image "
          f"UNet: the unet must be {NEEDS['unet']}."
      )
  else:
    upsampler = config.ldm.upsampler.factor if "upsampler" in config.ldm else 0
    # A latent upsampler's module config states its full input width; a folder's UNet does not.
    if (upsampler and path) or image_conditioned(config):
      unet = unet.clone(in_channels=2 * unet.in_channels)
    elif path and frame_mode(config):  # + the given frames' condition (prediction, interpolation)
      unet = unet.clone(in_channels=frame_conditioning.conditioned_in_channels(unet.in_channels))
    if config.ldm.kind == "video":
      unet = inflate.video_config_from_image(unet, **config.ldm.temporal.to_dict())
  return unet.clone(**_compute_options(config))


def frame_mode(config):
  """`ldm.frame_conditioning.mode` (prediction, interpolation) or None."""
  frames = config.ldm.get("frame_conditioning")
  return frames.get("mode") if frames else None


# ---------------------------------------------------------------------------- text encoder
def make_tokenizer(config) -> tokenizer_lib.Tokenizer:
  c = config.ldm.tokenizer
  kind = c.kind
  if kind not in TOKENIZER_KINDS:
    raise ComponentError(f"ldm.tokenizer.kind must be one of {TOKENIZER_KINDS}; got {kind!r}.")
  if kind == "shapes_words":
    return common.shapes_tokenizer(c.max_length)
  if kind == "ids_only":  # an architecture preset's: shapes without a vocabulary
    return tokenizer_lib.IdsOnlyTokenizer(**c.ids.to_dict())
  path = folder(config, "tokenizer")
  if not path:
    raise ComponentError(
        "ldm.tokenizer.kind='clip' reads a CLIP tokenizer folder: set "
        "ldm.tokenizer.folder or ldm.pretrained."
    )
  try:  # padding None keeps the folder's own rule (SD1 pads with eos, SD2 with "!")
    return tokenizer_lib.CLIPBPETokenizer(
        path, padding=c.get("padding"), max_length=c.get("max_length")
    )
  except (OSError, ValueError) as e:
    raise ComponentError(f"Cannot use {path} as the tokenizer ({NEEDS['tokenizer']}): {e}") from e


def make_text_encoder(config, tokenizer) -> clip_lib.CLIPTextModel:
  path = folder(config, "text_encoder")
  if path:
    encoder = _module_from_folder(path, "text_encoder", (clip_lib.CLIPTextModel,))
    if tokenizer.max_length > encoder.max_position_embeddings:
      raise ComponentError(
          f"The tokenizer pads to {tokenizer.max_length} tokens; the text "
          f"encoder in {path} has {encoder.max_position_embeddings} positions."
      )
    return encoder
  return clip_lib.CLIPTextModel(
      **config.ldm.text_encoder.model.to_dict(), **tokenizer.text_model_config()
  )


# ---------------------------------------------------------------------------- image encoder
def make_image_encoder(config, projection_dim: int) -> clip_lib.CLIPVisionModelWithProjection:
  """An image-to-video stage's frozen CLIP image encoder: from a folder (`ldm.image_encoder.folder`
  or the SVD folder's image_encoder/), else `ldm.image_encoder.model` (randomly initialised,
  projecting to the UNet's cross-attention width: a stand-in for tests and toy data)."""
  path = folder(config, "image_encoder")
  if path:
    encoder = _module_from_folder(path, "image_encoder", (clip_lib.CLIPVisionModelWithProjection,))
    if encoder.projection_dim != projection_dim:
      raise ComponentError(
          f"The image encoder in {path} projects to {encoder.projection_dim}; the UNet's "
          f"cross_attention_dim is {projection_dim}."
      )
    return encoder
  return clip_lib.CLIPVisionModelWithProjection(
      **config.ldm.image_encoder.model.to_dict(), projection_dim=projection_dim
  )


def image_encoder_params(config, encoder, seed: int):
  """Its folder's weights, else a trained contrastive CLIP stage's image tower
  (`ldm.image_encoder.workdir`, `vldm.recipes.contrastive_clip`), else its own init from `seed`
  (the same on every restart)."""
  path = folder(config, "image_encoder")
  if path:
    return _load_weights(path, "image_encoder")
  workdir = config.ldm.image_encoder.get("workdir")
  if workdir:
    params = common.load_stage_params(workdir)
    if "image_encoder" not in params:
      raise ComponentError(
          f"ldm.image_encoder.workdir {workdir} holds no image tower (parameters "
          f"{sorted(params)}); it must be a contrastive CLIP stage."
      )
    return params["image_encoder"]
  import jax  # pylint: disable=g-import-not-at-top

  pixels = jnp.zeros((1, encoder.image_size, encoder.image_size, 3), jnp.float32)
  return jax.jit(encoder.init)(jax.random.key(seed), pixels)["params"]


def abstract_image_encoder_params(encoder):
  """The shapes and dtypes `image_encoder_params` returns, without reading weights."""
  import jax  # pylint: disable=g-import-not-at-top

  pixels = jnp.zeros((1, encoder.image_size, encoder.image_size, 3), jnp.float32)
  return jax.eval_shape(lambda: encoder.init(jax.random.key(0), pixels))["params"]


def clip_normalization(config) -> tuple:
  """(mean, std) of the image encoder's preprocessing: the pretrained folder's
  feature_extractor/preprocessor_config.json where there is one, else OpenAI CLIP's."""
  path = config.ldm.get("pretrained")
  file = os.path.join(path, "feature_extractor", "preprocessor_config.json") if path else None
  if file and os.path.isfile(file):
    import json  # pylint: disable=g-import-not-at-top

    with open(file, encoding="utf-8") as f:
      extractor = json.load(f)
    return (
        tuple(extractor.get("image_mean", clip_lib.CLIP_MEAN)),
        tuple(extractor.get("image_std", clip_lib.CLIP_STD)),
    )
  return tuple(clip_lib.CLIP_MEAN), tuple(clip_lib.CLIP_STD)


# ------------------------------------------------------------------------------------- VAE
def make_vae(config):
  """The frozen VAE's module: from a folder, or the model config of an autoencoder stage; with the
  run's attention implementation (its mid-block attends over every latent position)."""
  attention = config.get("attention_implementation")
  path = folder(config, "vae")
  if path:
    return _module_from_folder(path, "vae", VAES).clone(attention_implementation=attention)
  model = config.ldm.vae.model.to_dict()
  kind = model.pop("kind", "temporal_decoder")
  if kind not in VAE_KINDS:
    raise ComponentError(f"ldm.vae.model.kind must be one of {VAE_KINDS}; got {kind!r}.")
  cls = (
      autoencoder_lib.AutoencoderKLTemporalDecoder
      if kind == "temporal_decoder"
      else autoencoder_lib.AutoencoderKL
  )
  return cls(**model, attention_implementation=attention)


def vae_params(config, mesh=None):
  """The frozen VAE's weights: its folder's, or its autoencoder stage's newest."""
  path = folder(config, "vae")
  if path:
    return _load_weights(path, "vae")
  workdir = config.ldm.vae.get("workdir")
  if not workdir:
    raise ComponentError(
        "The VAE needs weights: set ldm.vae.workdir (an autoencoder stage), "
        "ldm.vae.folder or ldm.pretrained."
    )
  params = common.load_stage_params(workdir, mesh)
  # An autoencoder stage keeps {'vae', 'discriminator'}; its temporal-decoder stage the VAE alone.
  return params["vae"] if "vae" in params else params


def abstract_vae_params(vae):
  """The shapes and dtypes `vae_params` returns for this VAE module, without reading weights
  (compile-only checks). Folders' weights load as float32, as these are."""
  import jax  # pylint: disable=g-import-not-at-top

  temporal = isinstance(vae, autoencoder_lib.AutoencoderKLTemporalDecoder)
  pixels = jnp.zeros((1,) + ((2,) if temporal else ()) + (64, 64, 3), jnp.float32)
  return jax.eval_shape(lambda: vae.init(jax.random.key(0), pixels))["params"]


def scaling_factor(config, vae, params) -> float:
  """The latents' scale: the config's, else a folder VAE's own, else measured (`scale_from`)."""
  c = config.ldm.vae
  if c.get("scaling_factor"):
    return float(c.scaling_factor)
  if folder(config, "vae"):
    return float(vae.scaling_factor)
  source = c.get("scale_from")
  if source not in SCALE_SOURCES:
    raise ComponentError(
        f"A VAE trained here has no scaling factor: set ldm.vae.scaling_factor, "
        f"or ldm.vae.scale_from to one of {SCALE_SOURCES}; got {source!r}."
    )
  return measured_scale(vae, params, c.model.sample_size)


def measured_scale(vae, params, size: int) -> float:
  """1 / std of the VAE's latent means on fixed rendered shapes frames (LDM's scale_factor), at the
  autoencoder's training resolution: the same value for every stage, whatever its resolution."""
  import jax  # pylint: disable=g-import-not-at-top

  images = (
      np.stack(
          [
              shapes.make_example("image", "train", i, size=size)["image"]
              for i in range(SCALE_EXAMPLES)
          ]
      ).astype(np.float32)
      / 127.5
      - 1.0
  )
  encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode").mean)
  return float(1.0 / np.std(np.asarray(encode(params, images))))


# ------------------------------------------------------------------------------ weights
def _load_weights(path: str, name: str):
  try:
    return convert.load_diffusers(path)[1]
  except (convert.ConversionError, OSError) as e:
    raise ComponentError(f"Cannot load the {name} weights in {path}: {e}") from e


def pretrained_params(config) -> Optional[dict]:
  """{'unet', 'text_encoder'} ({'unet'} for image-to-video) weights of the folders the stage starts
  from, or None when none comes from a folder. A component without a folder keeps its init."""
  out = {}
  for name in ("unet",) if image_conditioned(config) else ("unet", "text_encoder"):
    path = folder(config, name)
    if path:
      out[name] = _load_weights(path, name)
  return out or None


# ---------------------------------------------------------------------------- schedule
def _scheduler_config(config) -> Optional[dict]:
  path = folder(config, "scheduler")
  if not path:
    return None
  file = os.path.join(path, SCHEDULER_CONFIG)
  if not os.path.isfile(file):
    raise ComponentError(
        f"{path} has no {SCHEDULER_CONFIG}; the scheduler must be " f"{NEEDS['scheduler']}."
    )
  import json  # pylint: disable=g-import-not-at-top

  with open(file, encoding="utf-8") as f:
    return json.load(f)


def schedule_and_prediction(config) -> tuple[DiscreteSchedule, str, Optional[str], dict]:
  """(schedule, prediction type, the folder's sampler name or None, its sampler options): the
  config's `ldm.schedule` / `ldm.prediction_type` where set, else the scheduler folder's."""
  c = config.ldm
  scheduler = _scheduler_config(config)
  name, options, schedule, prediction = None, {}, None, None
  if scheduler is not None:
    scheduler = dict(scheduler)
    if scheduler.get("_class_name") not in samplers.DIFFUSERS_SCHEDULERS:
      # e.g. SD 1.x's PNDMScheduler: its schedule and prediction type train as they are; it
      # samples with DDIM on the same schedule unless ldm.sampler.name says otherwise.
      scheduler["_class_name"] = FALLBACK_SCHEDULER
    try:
      name, schedule, options, prediction = samplers.from_scheduler_config(scheduler)
    except ValueError as e:
      raise ComponentError(f"Cannot use the scheduler of {folder(config, 'scheduler')}: {e}") from e
    if prediction == "v_prediction" and options.get("timestep_type") == "continuous":
      prediction = "v_edm"  # SVD: v-prediction on the network input c_noise = ¼ ln σ
  if c.get("schedule"):
    schedule = DiscreteSchedule(**c.schedule.to_dict())
  elif scheduler is None:
    raise ComponentError(
        "The stage has no noise schedule: set ldm.schedule, or a scheduler "
        "folder (ldm.pretrained or ldm.scheduler.folder)."
    )
  if c.get("prediction_type"):
    prediction = c.prediction_type
  elif scheduler is None:
    raise ComponentError(
        "The stage has no prediction type: set ldm.prediction_type ('epsilon' "
        "or 'v_prediction'), or a scheduler folder."
    )
  return schedule, prediction, name, options
