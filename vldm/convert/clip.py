"""transformers CLIP folders (config.json + model.safetensors) ↔ vldm.models.clip.

Registers CLIPTextModel, CLIPTextModelWithProjection and CLIPVisionModelWithProjection. Text
checkpoints come with the `text_model.` prefix (SD's text_encoder, transformers 4) or without it
(CLIPTextModel saved by transformers 5); both load, and vldm writes the prefixed form, which every
transformers version reads.
"""
from __future__ import annotations

import re

import jax.numpy as jnp

from vldm.convert import registry
from vldm.convert.core import ConversionError
from vldm.models import clip

_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
              "bos_token_id", "eos_token_id", "pad_token_id")
_VISION_KEYS = ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                "num_attention_heads", "num_channels", "image_size", "patch_size", "hidden_act",
                "layer_norm_eps")
# Buffers older transformers saved with the weights.
_POSITION_IDS = (r"(text|vision)_model\.embeddings\.position_ids",)
_TEXT_MODEL_PARTS = re.compile(r"(embeddings|encoder|final_layer_norm)\.")


def _pick(config: dict, keys) -> dict:
  """The config entries named in `keys` (never `dtype` & co., which name other things here)."""
  return {k: config[k] for k in keys if k in config and config[k] is not None}


def _single_int(config: dict, key: str) -> dict:
  """Configs may hold a one-element list (eos_token_id) or a square pair (image_size)."""
  value = config.get(key)
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ConversionError(f"config.json {key}={value!r}: vldm's CLIP supports a single value "
                            f"(a square image, one end-of-text id).")
    return {key: value[0]}
  return {}


def _text_from_config(config: dict) -> clip.CLIPTextModel:
  kwargs = _pick(config, _TEXT_KEYS) | _single_int(config, "eos_token_id")
  if registry.class_name_of(config) == "CLIPTextModelWithProjection":
    return clip.CLIPTextModelWithProjection(**kwargs, **_pick(config, ("projection_dim",)))
  return clip.CLIPTextModel(**kwargs)


def _text_to_config(module: clip.CLIPTextModel) -> dict:
  config = registry.module_fields(module, _TEXT_KEYS)
  if isinstance(module, clip.CLIPTextModelWithProjection):
    config["projection_dim"] = module.projection_dim
  return {"architectures": [type(module).__name__], "model_type": "clip_text_model", **config}


def _add_text_model_prefix(state: dict) -> dict:
  """transformers 5 saves CLIPTextModel without the `text_model.` prefix; vldm's names have it."""
  return {f"text_model.{k}" if _TEXT_MODEL_PARTS.match(k) else k: v for k, v in state.items()}


def _text_init_args(module):
  return (jnp.zeros((1, 1), jnp.int32),)


def _vision_from_config(config: dict) -> clip.CLIPVisionModelWithProjection:
  kwargs = (_pick(config, _VISION_KEYS) | _single_int(config, "image_size")
            | _single_int(config, "patch_size"))
  return clip.CLIPVisionModelWithProjection(**kwargs)


def _vision_to_config(module: clip.CLIPVisionModelWithProjection) -> dict:
  return {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
          **registry.module_fields(module, _VISION_KEYS)}


def _vision_init_args(module):
  return (jnp.zeros((1, module.image_size, module.image_size, module.num_channels), jnp.float32),)


for _name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
  registry.register(registry.ModelFormat(
      class_name=_name, weights_file=registry.TRANSFORMERS_WEIGHTS,
      from_config=_text_from_config, to_config=_text_to_config, init_args=_text_init_args,
      rename_keys=_add_text_model_prefix, ignore=_POSITION_IDS))

registry.register(registry.ModelFormat(
    class_name="CLIPVisionModelWithProjection", weights_file=registry.TRANSFORMERS_WEIGHTS,
    from_config=_vision_from_config, to_config=_vision_to_config, init_args=_vision_init_args,
    ignore=_POSITION_IDS))
