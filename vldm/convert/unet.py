"""diffusers UNet2DConditionModel and UNetSpatioTemporalConditionModel ↔ `vldm.models.unet.UNet`.

Both classes load into the one `UNet` module (`temporal=False` / `True`); weight names already
mirror the state-dict keys, so only the configs need mapping. Traps handled here:
UNet2DConditionModel's `attention_head_dim` is the NUMBER of heads (→ `num_attention_heads`);
the SVD UNet hard-codes 32 groups, linear projections and per-block epsilons (→ eps_convention='svd').

`save_diffusers` writes a UNet as one of these classes only when the class describes it exactly
(`_sd_check` / `_svd_check`: reloading the written config rebuilds the same UNet, up to the fields
the class does not use, `_SD_UNUSED` / `_SVD_UNUSED`); any other UNet, e.g. a Video LDM UNet
inflated from SD, is written as vldm's own 'VldmUNet' (`vldm.convert.native`).
AnimateDiff's UNetMotionModel, built on the same helpers, is in `vldm.convert.animatediff`.
"""

from __future__ import annotations

import dataclasses

from vldm.convert import registry
from vldm.convert.core import ConversionError
from vldm.models import unet as unet_lib

# Config keys copied to UNet fields as they are (when present).
_SD_KEYS = ("in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
            "down_block_types", "mid_block_type", "up_block_types", "only_cross_attention",
            "block_out_channels", "layers_per_block", "downsample_padding",
            "mid_block_scale_factor", "norm_num_groups", "norm_eps", "cross_attention_dim",
            "transformer_layers_per_block", "use_linear_projection", "upcast_attention",
            "sample_size")
_SVD_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types",
             "block_out_channels", "addition_time_embed_dim",
             "projection_class_embeddings_input_dim", "layers_per_block", "cross_attention_dim",
             "transformer_layers_per_block", "num_attention_heads", "num_frames", "sample_size")

# UNet2DConditionModel options vldm does not implement: key → the values it accepts.
_SD_ACCEPTED = {
    "class_embed_type": (None,), "num_class_embeds": (None,), "addition_embed_type": (None,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",), "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,), "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1.0,),
    "dual_cross_attention": (False,), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "cross_attention_norm": (None,),
    "act_fn": ("silu", "swish"), "dropout": (0.0,), "num_attention_heads": (None,),
    "reverse_transformer_layers_per_block": (None,),
}

# UNetSpatioTemporalConditionModel's defaults (for keys a config leaves out) and fixed wiring.
_SVD_DEFAULTS = {
    "in_channels": 8, "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
    "up_block_types": ("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
    "block_out_channels": (320, 640, 1280, 1280), "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 768, "layers_per_block": 2,
    "cross_attention_dim": 1024, "transformer_layers_per_block": 1,
    "num_attention_heads": (5, 10, 20, 20), "num_frames": 25, "sample_size": None,
}
_SVD_FIXED = {
    "temporal": True, "mid_block_type": "UNetMidBlockSpatioTemporal", "use_linear_projection": True,
    "norm_num_groups": 32, "eps_convention": "svd", "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
    "mid_block_scale_factor": 1.0, "only_cross_attention": False,
    "merge_strategy": "learned_with_images",
}
_SVD_NAMES = unet_lib.SPATIO_TEMPORAL_BLOCK_NAMES
_SD_NAMES = {v: k for k, v in _SVD_NAMES.items()}


def config_tuples(config: dict, keys) -> dict:
  """The `keys` a config has, lists as tuples."""
  return {k: tuple(config[k]) if isinstance(config[k], list) else config[k]
          for k in keys if k in config}



def build_unet(kwargs: dict) -> unet_lib.UNet:
  """`UNet(**kwargs)`, its config checked (a ConversionError says what it cannot build)."""
  module = unet_lib.UNet(**kwargs)
  try:
    module.check_config()
  except ValueError as e:
    raise ConversionError(f"Unsupported UNet config: {e}") from e
  return module


def _sd_from_config(config: dict) -> unet_lib.UNet:
  bad = [f"{k}={config[k]!r} (accepted: {', '.join(map(repr, ok))})"
         for k, ok in _SD_ACCEPTED.items() if k in config and config[k] not in ok]
  if config.get("norm_num_groups", 32) is None:
    bad.append("norm_num_groups=None (accepted: an int)")
  if bad:
    raise ConversionError("UNet2DConditionModel options not supported by vldm: " + "; ".join(bad)
                          + ".")
  kwargs = config_tuples(config, _SD_KEYS)
  if "attention_head_dim" in config:  # UNet2DConditionModel: this is the number of heads
    head_counts = config["attention_head_dim"]
    kwargs["num_attention_heads"] = tuple(head_counts) if isinstance(head_counts, list) \
        else head_counts
  return build_unet(kwargs)


def _svd_from_config(config: dict) -> unet_lib.UNet:
  kwargs = {**_SVD_DEFAULTS, **config_tuples(config, _SVD_KEYS), **_SVD_FIXED}
  return build_unet(kwargs)


def json_value(value):
  """A config value as config.json holds it (tuples as lists)."""
  return list(value) if isinstance(value, tuple) else value


def unsupported_options(config: dict, accepted: dict) -> list[str]:
  """'key=value (accepted: …)' for each config option outside its accepted values, as a motion or
  ModelScope UNet's config.json is checked before it is built."""
  bad = [
      f"{k}={config[k]!r} (accepted: {', '.join(map(repr, ok))})"
      for k, ok in accepted.items()
      if k in config and config[k] not in ok
  ]
  if config.get("norm_num_groups", 32) is None:
    bad.append("norm_num_groups=None (accepted: an int)")
  return bad


def fixed_option_problems(module: unet_lib.UNet, fixed: dict) -> list[str]:
  """'key=value (needs want)' for each option a diffusers class fixes that `module` sets otherwise.

  Block-type names are skipped (the options decide the layers); a per-level option counts as its
  one value when every level has the same, else as the tuple.
  """
  problems = []
  for key, want in fixed.items():
    if key.endswith("_type"):
      continue
    value = getattr(module, key)
    if key in ("only_cross_attention", "transformer_layers_per_block"):
      values = tuple(module.per_level(key))
      value = values[0] if len(set(values)) == 1 else values
    if value != want:
      problems.append(f"{key}={value!r} (needs {want!r})")
  return problems


def _sd_to_config(module: unet_lib.UNet) -> dict:
  problems = []
  if module.temporal:
    problems.append("it is a video UNet (temporal=True)")
  if module.eps_convention != "uniform":
    problems.append(f"eps_convention={module.eps_convention!r} (needs 'uniform')")
  if module.addition_time_embed_dim is not None:
    problems.append("it has added-time-ids conditioning")
  if problems:
    raise ConversionError("Cannot save as UNet2DConditionModel: " + "; ".join(problems) + ".")
  config = {k: json_value(getattr(module, k)) for k in _SD_KEYS}
  config["down_block_types"] = [_SD_NAMES.get(t, t) for t in module.down_block_types]
  config["up_block_types"] = [_SD_NAMES.get(t, t) for t in module.up_block_types]
  config["mid_block_type"] = _SD_NAMES.get(module.mid_block_type, module.mid_block_type)
  config["attention_head_dim"] = json_value(module.num_attention_heads)  # the number of heads
  config["num_attention_heads"] = None
  return {"_class_name": "UNet2DConditionModel", "act_fn": "silu", **config}


# Fields that the diffusers classes do not carry because they do not change the parameters' shapes
# or the function: computation settings, initialisation-only settings (the weights replace them),
# video-only fields of an image UNet, and what the SVD wiring fixes (its epsilons replace norm_eps).
UNUSED_BY_DIFFUSERS = (
    "attention_implementation",
    "remat_policy",
    "dtype",
    "param_dtype",
    "temporal_conv_implementation",
    "merge_factor",
    "zero_init_temporal_outputs",
)
# AnimateDiff's options, which neither class has (a motion-module UNet differs in temporal_kind).
MOTION_FIELDS = ("motion_num_attention_heads", "motion_max_seq_length",
                 "temporal_transformer_layers_per_block",
                 "temporal_transformer_layers_per_mid_block", "use_motion_mid_block")
_SD_UNUSED = UNUSED_BY_DIFFUSERS + ("merge_strategy", "num_frames",
                         "projection_class_embeddings_input_dim") + MOTION_FIELDS
_SVD_UNUSED = UNUSED_BY_DIFFUSERS + ("norm_eps", "upcast_attention") + MOTION_FIELDS
_PER_LEVEL = (
    "layers_per_block",
    "transformer_layers_per_block",
    "num_attention_heads",
    "cross_attention_dim",
    "only_cross_attention",
    "motion_num_attention_heads",
    "temporal_transformer_layers_per_block",
)


def _architecture(module: unet_lib.UNet, unused) -> dict:
  """The UNet's fields in a canonical form: per-level options one value per level, block types
  in the family its options pick (every family builds the same layers), sequences as tuples."""
  block_type = lambda t: unet_lib.block_type_for(t, module.temporal, module.temporal_kind)
  out = {}
  for field in dataclasses.fields(module):
    name = field.name
    if name in unused or name in ("parent", "name"):
      continue
    value = getattr(module, name)
    if name in _PER_LEVEL:
      value = module.per_level(name)
    elif name.endswith("_block_types"):
      value = tuple(block_type(t) for t in value)
    elif name == "mid_block_type":
      value = block_type(value)
    elif isinstance(value, list):
      value = tuple(value)
    out[name] = value
  return out


def _lost_fields(module, rebuilt, unused) -> list[str]:
  want, got = _architecture(module, unused), _architecture(rebuilt, unused)
  return [f"{k}={want[k]!r} would load back as {got[k]!r}" for k in want if want[k] != got[k]]


def check_describes(to_config, from_config, unused, module: unet_lib.UNet) -> list[str]:
  """Why a class with these config mappings cannot describe `module` exactly ([] if it can):
  what `to_config` refuses, or the fields (beyond `unused`) that the written config would load
  back differently."""
  try:
    rebuilt = from_config(to_config(module))
  except ConversionError as e:
    return [str(e)]
  return _lost_fields(module, rebuilt, unused)


def _sd_check(module: unet_lib.UNet) -> list[str]:
  return check_describes(_sd_to_config, _sd_from_config, _SD_UNUSED, module)


def _svd_check(module: unet_lib.UNet) -> list[str]:
  return check_describes(_svd_to_config, _svd_from_config, _SVD_UNUSED, module)


def _svd_to_config(module: unet_lib.UNet) -> dict:
  problems = []
  for key, want in _SVD_FIXED.items():
    value = getattr(module, key)
    if key.endswith("_type"):
      value = _SVD_NAMES.get(value, value)
    if key == "only_cross_attention" and not isinstance(value, bool):
      value = any(value)
    if value != want:
      problems.append(f"{key}={value!r} (needs {want!r})")
  if module.temporal_kind != "alignment":
    problems.append(f"temporal_kind={module.temporal_kind!r} (needs 'alignment')")
  if module.text_motion_embedding:
    problems.append("text_motion_embedding=True (vldm's own layer; the diffusers class has none)")
  if module.addition_time_embed_dim is None:
    problems.append("addition_time_embed_dim=None (the diffusers class always has added-time-ids "
                    "conditioning)")
  for channels, n in zip(module.block_out_channels, module.per_level("num_attention_heads")):
    if channels % n:
      problems.append(f"{channels} channels do not divide into {n} heads")
  if problems:
    raise ConversionError("Cannot save as UNetSpatioTemporalConditionModel: "
                          + "; ".join(problems) + ".")
  config = {k: json_value(getattr(module, k)) for k in _SVD_KEYS}
  config["down_block_types"] = [_SVD_NAMES.get(t, t) for t in module.down_block_types]
  config["up_block_types"] = [_SVD_NAMES.get(t, t) for t in module.up_block_types]
  return {"_class_name": "UNetSpatioTemporalConditionModel", **config}


registry.register(
    registry.ModelFormat(
        class_name="UNet2DConditionModel",
        weights_file=registry.DIFFUSERS_WEIGHTS,
        from_config=_sd_from_config,
        to_config=_sd_to_config,
        init_args=lambda module: module.example_inputs(),
        check=_sd_check,
    )
)
registry.register(
    registry.ModelFormat(
        class_name="UNetSpatioTemporalConditionModel",
        weights_file=registry.DIFFUSERS_WEIGHTS,
        from_config=_svd_from_config,
        to_config=_svd_to_config,
        init_args=lambda module: module.example_inputs(),
        check=_svd_check,
    )
)
