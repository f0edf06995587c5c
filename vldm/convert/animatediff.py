"""AnimateDiff: diffusers UNetMotionModel and MotionAdapter ↔ a vldm video UNet with motion modules.

  unet, params = load_diffusers("animatediff/unet")                 # a UNetMotionModel folder
  unet, params = load_animatediff("sd15/unet", "motion_adapter")     # UNet2D + MotionAdapter
  unet, params = attach_motion_adapter(image_unet, image_params, "motion_adapter")
  out = unet.apply({"params": params}, sample[B,F,H,W,C], timesteps, context[B,L,D])
  save_diffusers(unet, params, "exported/unet")                     # a UNetMotionModel folder
  save_motion_adapter(unet, params, "exported/motion_adapter")      # the motion modules alone

The UNet is `UNet(temporal=True, temporal_kind='motion_module')`: the image UNet's layers under
their own names plus `…motion_modules_j`, the keys of both diffusers classes, so weights map by
name. What diffusers does, and vldm with it:
- UNetMotionModel takes encoder_hidden_states per frame, (B·F, L, D) (AnimateDiffPipeline repeats
  them); vldm's UNet takes them per clip, (B, L, D), or per frame, (B, F, L, D).
- The motion modules' GroupNorms have the UNet's norm_num_groups; the adapter's
  motion_norm_num_groups is not used (`from_unet2d` builds them from the UNet's config).
- `pos_embed.pe` is a fixed sinusoid table: ignored on load, recomputed on save.
- UNetMotionModel fixes flip_sin_to_cos=True, freq_shift=0, no input centring and no
  only_cross_attention; an image UNet with other values keeps them here (its weights were trained
  with them) and is then written as vldm's 'VldmUNet' rather than as a UNetMotionModel.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import traverse_util

from vldm.convert import core
from vldm.convert import registry
from vldm.convert import temporal as temporal_convert
from vldm.convert import unet as unet_convert
from vldm.convert.core import ConversionError
from vldm.models import inflate
from vldm.models import temporal_layers
from vldm.models import unet as unet_lib

CLASS_NAME = "UNetMotionModel"
ADAPTER_CLASS = "MotionAdapter"
# AnimateDiffPipeline's default clip length: the pipelines' default number of frames.
DEFAULT_FRAMES = 16
# The motion modules' fixed sinusoid buffers (recomputed, not loaded).
POSITION_BUFFERS = r".*\.pos_embed\.pe"
_MOTION_MODULE = "motion_modules"

# Config keys copied to UNet fields as they are (when present), with UNetMotionModel's defaults.
_DEFAULTS = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlockMotion",) * 3 + ("DownBlockMotion",),
    "up_block_types": ("UpBlockMotion",) + ("CrossAttnUpBlockMotion",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "temporal_transformer_layers_per_block": 1,
    "temporal_transformer_layers_per_mid_block": 1,
    "use_linear_projection": False,
    "num_attention_heads": 8,
    "motion_max_seq_length": 32,
    "motion_num_attention_heads": 8,
    "use_motion_mid_block": True,
}
_KEYS = tuple(_DEFAULTS)
# UNetMotionModel's fixed wiring.
_FIXED = {
    "temporal": True,
    "temporal_kind": "motion_module",
    "mid_block_type": "UNetMidBlockCrossAttnMotion",
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "only_cross_attention": False,
    "eps_convention": "uniform",
}
# UNetMotionModel options vldm does not implement: key → the values it accepts.
_ACCEPTED = {
    "act_fn": ("silu", "swish"),
    "mid_block_layers": (1,),
    "encoder_hid_dim_type": (None,),
    "addition_embed_type": (None,),
    "time_cond_proj_dim": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "reverse_temporal_transformer_layers_per_block": (None,),
}
# Fields UNetMotionModel does not carry: computation, initialisation, the sampling default
# num_frames, and the alignment layers' options.
_UNUSED = unet_convert.UNUSED_BY_DIFFUSERS + (
    "merge_strategy",
    "num_frames",
    "projection_class_embeddings_input_dim",
    "upcast_attention",
)


def _single(value, name: str, bad: list):
  """A mid-block option given per mid-block layer: UNetMotionModel builds one such layer."""
  if isinstance(value, (list, tuple)):
    if len(value) != 1:
      bad.append(f"{name}={list(value)!r} (one mid-block layer)")
      return 1
    return value[0]
  return value


def _from_config(config: dict) -> unet_lib.UNet:
  bad = unet_convert.unsupported_options(config, _ACCEPTED)
  kwargs = {**_DEFAULTS, **unet_convert.config_tuples(config, _KEYS), **_FIXED}
  kwargs["temporal_transformer_layers_per_mid_block"] = _single(
      kwargs["temporal_transformer_layers_per_mid_block"],
      "temporal_transformer_layers_per_mid_block",
      bad,
  )
  spatial_mid = _single(
      config.get("transformer_layers_per_mid_block"), "transformer_layers_per_mid_block", bad
  )
  layers = kwargs["transformer_layers_per_block"]
  last = layers[-1] if isinstance(layers, tuple) else layers
  if spatial_mid is not None and spatial_mid != last:  # vldm's mid block has the last level's
    bad.append(
        f"transformer_layers_per_mid_block={spatial_mid} (accepted: None or the last "
        f"level's transformer_layers_per_block, {last})"
    )
  if bad:
    raise ConversionError(f"{CLASS_NAME} options not supported by vldm: " + "; ".join(bad) + ".")
  kwargs["num_frames"] = min(DEFAULT_FRAMES, kwargs["motion_max_seq_length"])
  return unet_convert.build_unet(kwargs)


def _to_config(module: unet_lib.UNet) -> dict:
  if not module.has_motion_modules:
    raise ConversionError(
        f"Cannot save as {CLASS_NAME}: it has no motion modules (needs "
        "temporal=True, temporal_kind='motion_module')."
    )
  problems = unet_convert.fixed_option_problems(module, _FIXED)
  if module.addition_time_embed_dim is not None:
    problems.append("it has added-time-ids conditioning")
  if problems:
    raise ConversionError(f"Cannot save as {CLASS_NAME}: " + "; ".join(problems) + ".")
  config = {k: unet_convert.json_value(getattr(module, k)) for k in _KEYS}
  for key in ("down_block_types", "up_block_types"):
    config[key] = [unet_lib.block_type_for(t, True, "motion_module") for t in getattr(module, key)]
  return {
      "_class_name": CLASS_NAME,
      "act_fn": "silu",
      "mid_block_layers": 1,
      "transformer_layers_per_mid_block": None,
      **config,
  }


def _check(module: unet_lib.UNet) -> list[str]:
  return unet_convert.check_describes(_to_config, _from_config, _UNUSED, module)


def position_buffers(module: unet_lib.UNet, params) -> dict[str, np.ndarray]:
  """diffusers' `…transformer_blocks.k.pos_embed.pe` buffers (1, motion_max_seq_length, width)
  of every motion-module layer in `params`, keyed as in its state dict."""
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    if path[-2:] == ("norm1", "scale") and any(p.startswith(_MOTION_MODULE) for p in path):
      key = core.flax_path_to_torch_key(path[:-2] + ("pos_embed", "pe"))
      table = temporal_layers.sinusoidal_positions(module.motion_max_seq_length, value.shape[0])
      out[key] = table[None]
  return out


registry.register(
    registry.ModelFormat(
        class_name=CLASS_NAME,
        weights_file=registry.DIFFUSERS_WEIGHTS,
        from_config=_from_config,
        to_config=_to_config,
        init_args=lambda module: module.example_inputs(),
        ignore=(POSITION_BUFFERS,),
        check=_check,
        buffers=position_buffers,
    )
)
registry.register_hint(
    ADAPTER_CLASS,
    "it holds AnimateDiff's motion modules alone. Put them on an image UNet with "
    "vldm.convert.load_animatediff(unet_dir, adapter_dir) or attach_motion_adapter.",
)


# ------------------------------------------------------------------------------- MotionAdapter
def adapter_config(module: unet_lib.UNet) -> dict:
  """The MotionAdapter config.json of a motion-module UNet's motion modules."""
  if not module.has_motion_modules:
    raise ConversionError(
        "A MotionAdapter holds motion modules: this UNet has none (it needs "
        "temporal=True, temporal_kind='motion_module')."
    )
  per_level = lambda name: list(module.per_level(name))
  return {
      "_class_name": ADAPTER_CLASS,
      "block_out_channels": list(module.block_out_channels),
      "motion_layers_per_block": per_level("layers_per_block"),
      "motion_transformer_layers_per_block": per_level("temporal_transformer_layers_per_block"),
      "motion_mid_block_layers_per_block": 1,
      "motion_transformer_layers_per_mid_block": module.temporal_transformer_layers_per_mid_block,
      "motion_num_attention_heads": per_level("motion_num_attention_heads"),
      "motion_norm_num_groups": module.norm_num_groups,
      "motion_max_seq_length": module.motion_max_seq_length,
      "use_motion_mid_block": module.use_motion_mid_block,
      "conv_in_channels": None,
  }


def save_motion_adapter(module: unet_lib.UNet, params, path: str) -> None:
  """Writes the motion modules of a motion-module UNet as a diffusers MotionAdapter folder
  (`MotionAdapter.from_pretrained` loads it; `attach_motion_adapter` puts it on an image UNet)."""
  config = adapter_config(module)
  _, motion = inflate.split_params(params)
  state = core.flax_to_torch(motion)
  state.update(position_buffers(module, motion))
  os.makedirs(path, exist_ok=True)
  registry.write_config(config, path)
  core.write_safetensors(state, os.path.join(path, registry.DIFFUSERS_WEIGHTS))


def _per_level(config: dict, name: str, levels: int, bad: list):
  """An adapter option as the UNet field takes it (one value, or a tuple of one per level)."""
  value = config[name]
  if not isinstance(value, (list, tuple)):
    return value
  if len(value) != levels or any(isinstance(v, (list, tuple)) for v in value):
    bad.append(f"{name}={value!r} (accepted: one value or one per level)")
  return tuple(value)


def motion_unet_for(image_unet: unet_lib.UNet, config: dict) -> unet_lib.UNet:
  """The motion-module video UNet of `image_unet` with a MotionAdapter (its config.json dict)
  attached, as `UNetMotionModel.from_unet2d` builds it. A ConversionError says why they do not
  fit."""
  if image_unet.temporal:
    raise ConversionError(
        f"A MotionAdapter goes on an image UNet (UNet2DConditionModel); this one "
        f"is already a video UNet ({image_unet.reference_class})."
    )
  config = {**_ADAPTER_DEFAULTS, **config}
  levels = image_unet.num_levels
  channels = tuple(config["block_out_channels"])
  if channels != tuple(image_unet.block_out_channels):
    raise ConversionError(
        f"The MotionAdapter's block_out_channels {channels} do not fit the UNet's "
        f"{tuple(image_unet.block_out_channels)}: its motion modules are built for those widths."
    )
  bad = []
  layers = _per_level(config, "motion_layers_per_block", levels, bad)
  heads = _per_level(config, "motion_num_attention_heads", levels, bad)
  transformer_layers = _per_level(config, "motion_transformer_layers_per_block", levels, bad)
  unet_layers = image_unet.per_level("layers_per_block")
  if not bad and (layers if isinstance(layers, tuple) else (layers,) * levels) != unet_layers:
    bad.append(
        f"motion_layers_per_block={layers!r} while the UNet has layers_per_block="
        f"{list(unet_layers)} (one motion module per layer)"
    )
  if config["motion_mid_block_layers_per_block"] != 1:
    bad.append(
        f"motion_mid_block_layers_per_block={config['motion_mid_block_layers_per_block']} "
        f"(UNetMotionModel builds one mid-block layer)"
    )
  if config["conv_in_channels"]:
    bad.append(f"conv_in_channels={config['conv_in_channels']} (PIA's input convolution)")
  mid = _single(
      config["motion_transformer_layers_per_mid_block"],
      "motion_transformer_layers_per_mid_block",
      bad,
  )
  if bad:
    raise ConversionError("The MotionAdapter does not fit this UNet: " + "; ".join(bad) + ".")
  try:
    return inflate.video_config_from_image(
        image_unet,
        temporal_kind="motion_module",
        motion_num_attention_heads=heads,
        motion_max_seq_length=config["motion_max_seq_length"],
        temporal_transformer_layers_per_block=transformer_layers,
        temporal_transformer_layers_per_mid_block=mid,
        use_motion_mid_block=config["use_motion_mid_block"],
        num_frames=min(DEFAULT_FRAMES, config["motion_max_seq_length"]),
    )
  except ValueError as e:
    raise ConversionError(f"The MotionAdapter does not fit this UNet: {e}") from e


# MotionAdapter's defaults, for keys a config leaves out.
_ADAPTER_DEFAULTS = {
    "block_out_channels": (320, 640, 1280, 1280),
    "motion_layers_per_block": 2,
    "motion_transformer_layers_per_block": 1,
    "motion_mid_block_layers_per_block": 1,
    "motion_transformer_layers_per_mid_block": 1,
    "motion_num_attention_heads": 8,
    "motion_max_seq_length": 32,
    "use_motion_mid_block": True,
    "conv_in_channels": None,
}


def attach_motion_adapter(image_unet: unet_lib.UNet, image_params, adapter_path: str):
  """(video UNet, params): `image_unet` with the motion modules of the MotionAdapter folder
  `adapter_path`, as diffusers' `UNetMotionModel.from_unet2d(image_unet, adapter)`."""
  config = registry.read_config(adapter_path)
  name = registry.class_name_of(config)
  if name != ADAPTER_CLASS:
    raise ConversionError(f"{adapter_path} holds a {name}, not a {ADAPTER_CLASS}.")
  video = motion_unet_for(image_unet, config)
  shapes = jax.eval_shape(lambda: video.init(jax.random.key(0), *video.example_inputs()))["params"]
  state = core.read_safetensors(os.path.join(adapter_path, registry.DIFFUSERS_WEIGHTS))
  state = {k: v.astype(np.float32) for k, v in state.items()}
  motion = core.torch_to_flax(state, inflate.split_params(shapes)[1], ignore=(POSITION_BUFFERS,))
  params = temporal_convert.apply_temporal_layers(shapes, motion)
  return video, inflate.transplant_temporal(params, image_params)


def load_animatediff(unet_path: str, adapter_path: str):
  """(video UNet, params) from a UNet2DConditionModel folder and a MotionAdapter folder, as
  AnimateDiffPipeline builds its UNet from the two."""
  image_unet, image_params = registry.load_diffusers(unet_path)
  if not isinstance(image_unet, unet_lib.UNet):
    raise ConversionError(f"{unet_path} holds a {type(image_unet).__name__}, not a UNet.")
  return attach_motion_adapter(image_unet, image_params, adapter_path)
