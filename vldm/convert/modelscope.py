"""ModelScope / ZeroScope text-to-video: diffusers UNet3DConditionModel ↔ a vldm video UNet.

  unet, params = load_diffusers("zeroscope/unet")                  # a UNet3DConditionModel folder
  out = unet.apply({"params": params}, sample[B,F,H,W,C], timesteps, context[B,L,D])
  save_diffusers(unet, params, "exported/unet")                    # a UNet3DConditionModel folder

The UNet is `UNet(temporal=True, temporal_kind='modelscope')`: the image UNet's layers under their
own names plus `temp_convs_j`, `temp_attentions_j` and `transformer_in`, the keys of the diffusers
class, so weights map by name. What diffusers does, and vldm with it:
- `attention_head_dim` is the heads' width (UNet3DConditionModel passes it as the number of heads
  to its blocks, which build `channels // it` heads of width `it`): vldm's `num_attention_heads` is
  `block_out_channels[i] // attention_head_dim`, which must divide the channels. `transformer_in`
  has 8 heads of that width (8 × attention_head_dim wide, whatever the channels).
- The blocks get diffusers' `get_down_block` defaults: linear projections in the transformers,
  one transformer layer; the temporal convolutions' GroupNorms have eps 1e-5 (PyTorch's default).
- UNet3DConditionModel takes encoder_hidden_states per clip (B, L, D) and repeats them per frame;
  vldm's UNet takes them per clip, or per frame (B, F, L, D).
"""

from __future__ import annotations

from vldm.convert import registry
from vldm.convert import unet as unet_convert
from vldm.convert.core import ConversionError
from vldm.models import unet as unet_lib

CLASS_NAME = "UNet3DConditionModel"
# TextToVideoSDPipeline's default clip length: the pipelines' default number of frames.
DEFAULT_FRAMES = 16

# Config keys copied to UNet fields as they are (when present), with UNet3DConditionModel's
# defaults.
_DEFAULTS = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
    "up_block_types": ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1024,
}
_KEYS = tuple(_DEFAULTS)
# The width of the attention heads when the config leaves attention_head_dim out.
_DEFAULT_HEAD_DIM = 64
# UNet3DConditionModel's fixed wiring.
_FIXED = {
    "temporal": True,
    "temporal_kind": "modelscope",
    "mid_block_type": "UNetMidBlock3DCrossAttn",
    "use_linear_projection": True,
    "transformer_layers_per_block": 1,
    "only_cross_attention": False,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "eps_convention": "uniform",
    "addition_time_embed_dim": None,
    "text_motion_embedding": False,
}
# UNet3DConditionModel options vldm does not implement: key → the values it accepts.
_ACCEPTED = {
    "act_fn": ("silu", "swish"),
    "num_attention_heads": (None,),
    "time_cond_proj_dim": (None,),
}
# Fields UNet3DConditionModel does not carry: computation, initialisation, the sampling default
# num_frames, and the other temporal kinds' options.
_UNUSED = (
    unet_convert.UNUSED_BY_DIFFUSERS
    + unet_convert.MOTION_FIELDS
    + (
        "merge_strategy",
        "num_frames",
        "projection_class_embeddings_input_dim",
        "upcast_attention",
    )
)


def _from_config(config: dict) -> unet_lib.UNet:
  bad = unet_convert.unsupported_options(config, _ACCEPTED)
  kwargs = {**_DEFAULTS, **unet_convert.config_tuples(config, _KEYS), **_FIXED}
  if isinstance(kwargs["layers_per_block"], tuple):
    bad.append(f"layers_per_block={list(kwargs['layers_per_block'])!r} (accepted: an int)")
  head_dim = config.get("attention_head_dim", _DEFAULT_HEAD_DIM)
  channels = kwargs["block_out_channels"]
  if not isinstance(head_dim, int) or head_dim < 1:
    # diffusers' transformer_in is 8 × attention_head_dim wide: a list does not build there.
    bad.append(f"attention_head_dim={head_dim!r} (accepted: a positive int, the heads' width)")
  elif any(c % head_dim for c in channels):
    bad.append(
        f"attention_head_dim={head_dim} with block_out_channels={list(channels)} (the heads' "
        "width must divide every level's channels)"
    )
  if bad:
    raise ConversionError(f"{CLASS_NAME} options not supported by vldm: " + "; ".join(bad) + ".")
  kwargs["num_attention_heads"] = tuple(c // head_dim for c in channels)
  kwargs["num_frames"] = DEFAULT_FRAMES
  return unet_convert.build_unet(kwargs)


def _to_config(module: unet_lib.UNet) -> dict:
  if not module.is_modelscope:
    raise ConversionError(
        f"Cannot save as {CLASS_NAME}: it has no ModelScope temporal layers (needs "
        "temporal=True, temporal_kind='modelscope')."
    )
  problems = unet_convert.fixed_option_problems(module, _FIXED)
  layers = set(module.per_level("layers_per_block"))
  if len(layers) != 1:
    problems.append(
        f"layers_per_block={module.per_level('layers_per_block')} (needs one value for all levels)"
    )
  widths = {
      c // n for c, n in zip(module.block_out_channels, module.per_level("num_attention_heads"))
  }
  if len(widths) != 1:
    problems.append(
        f"num_attention_heads={module.per_level('num_attention_heads')} for block_out_channels="
        f"{tuple(module.block_out_channels)} (needs one head width for all levels)"
    )
  if problems:
    raise ConversionError(f"Cannot save as {CLASS_NAME}: " + "; ".join(problems) + ".")
  config = {k: unet_convert.json_value(getattr(module, k)) for k in _KEYS}
  config["layers_per_block"] = layers.pop()
  config["cross_attention_dim"] = module.context_dim
  for key in ("down_block_types", "up_block_types"):
    config[key] = [unet_lib.block_type_for(t, True, "modelscope") for t in getattr(module, key)]
  return {
      "_class_name": CLASS_NAME,
      "act_fn": "silu",
      "attention_head_dim": widths.pop(),
      "num_attention_heads": None,
      "time_cond_proj_dim": None,
      **config,
  }


def _check(module: unet_lib.UNet) -> list[str]:
  return unet_convert.check_describes(_to_config, _from_config, _UNUSED, module)


registry.register(
    registry.ModelFormat(
        class_name=CLASS_NAME,
        weights_file=registry.DIFFUSERS_WEIGHTS,
        from_config=_from_config,
        to_config=_to_config,
        init_args=lambda module: module.example_inputs(),
        check=_check,
    )
)
