"""diffusers `AutoencoderKL` and `AutoencoderKLTemporalDecoder` folders ↔ vldm autoencoders.

config.json keys map one to one onto the module fields; the weights map by name (see core.py).
Old AutoencoderKL checkpoints name the mid-block attention projections query / key / value /
proj_attn: they are renamed on load as diffusers' `from_pretrained` does.
"""
from __future__ import annotations

import re

import jax.numpy as jnp

from vldm.convert import core, registry
from vldm.models import autoencoder

KL_CONFIG_KEYS = (
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
    "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
    "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")
TEMPORAL_CONFIG_KEYS = (
    "in_channels", "out_channels", "down_block_types", "block_out_channels", "layers_per_block",
    "latent_channels", "sample_size", "scaling_factor", "force_upcast")

_LEGACY_ATTENTION = re.compile(
    r"((?:encoder|decoder)\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_WEIGHT = re.compile(
    r"(?:encoder|decoder)\.mid_block\.attentions\.0\.(?:to_q|to_k|to_v|to_out\.0)\.weight")


def rename_legacy_attention(state: dict) -> dict:
  """query/key/value/proj_attn → to_q/to_k/to_v/to_out.0 in the mid blocks (diffusers does this in
  `_fix_state_dict_keys_on_load`); 1×1-conv-shaped (O, I, 1, 1) projection weights of original LDM
  checkpoints become Linear (O, I) ones (diffusers' single-file converter does that)."""
  out = {}
  for key, value in state.items():
    match = _LEGACY_ATTENTION.fullmatch(key)
    if match:
      prefix, name, leaf = match.groups()
      key = f"{prefix}.{_LEGACY_NAMES[name]}.{leaf}"
    if _ATTENTION_WEIGHT.fullmatch(key) and value.ndim == 4 and value.shape[2:] == (1, 1):
      value = value[:, :, 0, 0]
    out[key] = value
  return out


def _builder(cls, keys):
  def from_config(config: dict):
    module = cls(**registry.config_kwargs(cls, {k: v for k, v in config.items() if k in keys}))
    try:
      module.check_config()
    except ValueError as e:
      raise core.ConversionError(f"Cannot build {cls.__name__} from this config.json: {e}") from e
    return module
  return from_config


def _writer(class_name, keys):
  def to_config(module) -> dict:
    config = {"_class_name": class_name, **registry.module_fields(module, keys)}
    levels = len(module.block_out_channels)
    for key, default in (("down_block_types", autoencoder.DOWN_BLOCK_TYPES[0]),
                         ("up_block_types", autoencoder.UP_BLOCK_TYPES[0])):
      if key in config:
        config[key] = list(autoencoder.block_types(config[key], default, levels))
    return config
  return to_config


def _example_images(module):
  side = autoencoder.downsampling_factor(module.block_out_channels)
  return (jnp.zeros((1, side, side, module.in_channels), module.dtype),)


def _example_video(module):
  return (_example_images(module)[0][:, None],)


registry.register(registry.ModelFormat(
    class_name="AutoencoderKL",
    weights_file=registry.DIFFUSERS_WEIGHTS,
    from_config=_builder(autoencoder.AutoencoderKL, KL_CONFIG_KEYS),
    to_config=_writer("AutoencoderKL", KL_CONFIG_KEYS),
    init_args=_example_images,
    rename_keys=rename_legacy_attention,
))

registry.register(registry.ModelFormat(
    class_name="AutoencoderKLTemporalDecoder",
    weights_file=registry.DIFFUSERS_WEIGHTS,
    from_config=_builder(autoencoder.AutoencoderKLTemporalDecoder, TEMPORAL_CONFIG_KEYS),
    to_config=_writer("AutoencoderKLTemporalDecoder", TEMPORAL_CONFIG_KEYS),
    init_args=_example_video,
))
