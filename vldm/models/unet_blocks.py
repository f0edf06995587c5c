"""The UNets' levels: down, mid and up blocks, shared by the image and the video UNet.

A block is built from the layer kinds that `BlockOptions` makes: a res block (ResnetBlock2D, or for
video SpatioTemporalResBlock), a transformer (`Transformer2D`, spatial or spatio-temporal) and,
for AnimateDiff, a motion module after each res block (+ transformer); for ModelScope
(`BlockOptions.modelscope`), temporal convolutions after each res block and a temporal transformer
after each transformer. The level, skip and up/down-sampling code is the same for all, so
diffusers' CrossAttnDownBlock2D, CrossAttnDownBlockSpatioTemporal, CrossAttnDownBlockMotion and
CrossAttnDownBlock3D (and so on) are one module each here, named like their keys: `resnets_{j}`,
`attentions_{j}`, `motion_modules_{j}`, `temp_convs_{j}`, `temp_attentions_{j}`, `downsamplers_0`,
`upsamplers_0`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vldm.models import layers
from vldm.models import temporal_layers
from vldm.models import transformer

Dtype = layers.Dtype


def _conv_saveable(prim, *_, **__) -> bool:
  return prim is jax.lax.conv_general_dilated_p


# Remat policies by name ('none': no remat; 'full': save nothing, recompute the whole block).
# 'save_conv_and_attention' keeps convolution outputs and the attention outputs that the
# transformer blocks name with `checkpoint_name`, and recomputes the rest (norms, MLPs, projections).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_conv_and_attention": jax.checkpoint_policies.save_from_both_policies(
        _conv_saveable,
        jax.checkpoint_policies.save_only_these_names(transformer.ATTENTION_CHECKPOINT_NAME)),
}


def check_remat_policy(name: str) -> None:
  if name not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat_policy {name!r}; accepted: {', '.join(REMAT_POLICIES)}.")


def maybe_remat(module_class, policy_name: str):
  """`module_class`, rematerialised under the named policy (unchanged for 'none')."""
  check_remat_policy(policy_name)
  if policy_name == "none":
    return module_class
  return nn.remat(module_class, policy=REMAT_POLICIES[policy_name])


@dataclasses.dataclass(frozen=True)
class BlockOptions:
  """What every res block and transformer of one UNet shares; makes them for the blocks."""
  temporal: bool = False
  norm_num_groups: int = 32
  use_linear_projection: bool = False
  merge_factor: float = 0.5
  merge_strategy: str = "learned_with_images"
  temporal_conv_implementation: str = "shifted_matmul"
  text_motion_embedding: bool = False
  motion_max_seq_length: int = 32
  modelscope: bool = False
  attention_implementation: Optional[str] = None
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def resnet(self, out_channels: int, eps: float, name: str, output_scale_factor: float = 1.0):
    """A res block as a function `(x, temb, image_only_indicator) -> x` (indicator: video only)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    if not self.temporal:
      block = maybe_remat(layers.ResnetBlock2D, self.remat_policy)(
          out_channels, groups=self.norm_num_groups, eps=eps,
          output_scale_factor=output_scale_factor, **kw)
      return lambda x, temb, image_only_indicator: block(x, temb)
    if output_scale_factor != 1.0:
      raise ValueError("The video UNet's res blocks have no output scale: mid_block_scale_factor "
                       f"must be 1, got {output_scale_factor}.")
    return maybe_remat(temporal_layers.SpatioTemporalResBlock, self.remat_policy)(
        out_channels, groups=self.norm_num_groups, eps=eps, merge_factor=self.merge_factor,
        merge_strategy=self.merge_strategy,
        temporal_conv_implementation=self.temporal_conv_implementation, **kw)

  def transformer(self, num_attention_heads: int, num_layers: int, only_cross_attention: bool,
                  name: str):
    """A transformer `(x, context, image_only_indicator) -> x`."""
    return maybe_remat(transformer.Transformer2D, self.remat_policy)(
        num_attention_heads, num_layers=num_layers, norm_num_groups=self.norm_num_groups,
        use_linear_projection=self.use_linear_projection,
        only_cross_attention=only_cross_attention, temporal=self.temporal,
        merge_factor=self.merge_factor, merge_strategy=self.merge_strategy,
        text_motion_embedding=self.text_motion_embedding,
        attention_implementation=self.attention_implementation, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)

  def motion_module(self, num_attention_heads: int, num_layers: int, name: str):
    """AnimateDiff's motion module `(x, image_only_indicator) -> x`."""
    return maybe_remat(temporal_layers.MotionModule, self.remat_policy)(
        num_attention_heads, num_layers=num_layers, norm_num_groups=self.norm_num_groups,
        max_seq_length=self.motion_max_seq_length,
        attention_implementation=self.attention_implementation, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)

  def temporal_conv(self, name: str):
    """ModelScope's temporal convolutions `(x, image_only_indicator) -> x`."""
    return maybe_remat(temporal_layers.TemporalConvLayer, self.remat_policy)(
        self.norm_num_groups, temporal_conv_implementation=self.temporal_conv_implementation,
        dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  def temporal_transformer(self, num_attention_heads: int, name: str):
    """ModelScope's temporal transformer (TransformerTemporalModel) `(x, image_only_indicator)
    -> x`: a motion module without frame positions."""
    return maybe_remat(temporal_layers.MotionModule, self.remat_policy)(
        num_attention_heads, norm_num_groups=self.norm_num_groups, frame_positions=False,
        attention_implementation=self.attention_implementation, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)


def _maybe_temporal_conv(block, x, j: int, image_only_indicator):
  """x through the block's temporal convolutions j (ModelScope), when it has them."""
  if not block.options.modelscope:
    return x
  return block.options.temporal_conv(f"temp_convs_{j}")(x, image_only_indicator)


def _maybe_temporal_transformer(block, x, j: int, image_only_indicator):
  """x through the block's temporal transformer j (ModelScope), when it has them."""
  if not block.options.modelscope:
    return x
  return block.options.temporal_transformer(block.num_attention_heads, f"temp_attentions_{j}")(
      x, image_only_indicator)


def _maybe_motion(block, x, j: int, image_only_indicator):
  """x through the block's motion module j, when the block has motion modules."""
  if not block.motion_num_attention_heads:
    return x
  return block.options.motion_module(block.motion_num_attention_heads, block.motion_layers,
                                     f"motion_modules_{j}")(x, image_only_indicator)


class DownBlock(nn.Module):
  """(res block [→ transformer] [→ motion module]) × num_layers, then a stride-2 conv; every
  output is a skip.

  diffusers CrossAttnDownBlock2D (`num_attention_heads` set) / DownBlock2D (None), their
  SpatioTemporal forms with `options.temporal`, and their Motion forms (AnimateDiff) with
  `motion_num_attention_heads` set (`motion_layers` transformer layers per motion module), and
  their 3D forms (ModelScope) with `options.modelscope`.
  """
  out_channels: int
  num_layers: int
  eps: float
  num_attention_heads: Optional[int] = None
  transformer_layers: int = 1
  only_cross_attention: bool = False
  add_downsample: bool = True
  downsample_padding: int = 1
  motion_num_attention_heads: Optional[int] = None
  motion_layers: int = 1
  options: BlockOptions = BlockOptions()

  @nn.compact
  def __call__(self, x, temb, context, image_only_indicator=None):
    skips = []
    for j in range(self.num_layers):
      x = self.options.resnet(self.out_channels, self.eps, f"resnets_{j}")(
          x, temb, image_only_indicator)
      x = _maybe_temporal_conv(self, x, j, image_only_indicator)
      if self.num_attention_heads:
        x = self.options.transformer(self.num_attention_heads, self.transformer_layers,
                                     self.only_cross_attention, f"attentions_{j}")(
                                         x, context, image_only_indicator)
        x = _maybe_temporal_transformer(self, x, j, image_only_indicator)
      x = _maybe_motion(self, x, j, image_only_indicator)
      skips.append(x)
    if self.add_downsample:
      x = layers.Downsample2D(self.out_channels, padding=self.downsample_padding,
                              dtype=self.options.dtype, param_dtype=self.options.param_dtype,
                              name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


class MidBlock(nn.Module):
  """res block → transformer [→ motion module] → res block (UNetMidBlock2DCrossAttn /
  UNetMidBlockSpatioTemporal / UNetMidBlockCrossAttnMotion); for ModelScope
  (UNetMidBlock3DCrossAttn) temporal convolutions after each res block and a temporal transformer
  after the transformer."""
  eps: float
  num_attention_heads: int
  transformer_layers: int = 1
  output_scale_factor: float = 1.0
  motion_num_attention_heads: Optional[int] = None
  motion_layers: int = 1
  options: BlockOptions = BlockOptions()

  @nn.compact
  def __call__(self, x, temb, context, image_only_indicator=None):
    channels = x.shape[-1]
    resnet = lambda name: self.options.resnet(channels, self.eps, name, self.output_scale_factor)
    x = resnet("resnets_0")(x, temb, image_only_indicator)
    x = _maybe_temporal_conv(self, x, 0, image_only_indicator)
    x = self.options.transformer(self.num_attention_heads, self.transformer_layers, False,
                                 "attentions_0")(x, context, image_only_indicator)
    x = _maybe_temporal_transformer(self, x, 0, image_only_indicator)
    x = _maybe_motion(self, x, 0, image_only_indicator)
    x = resnet("resnets_1")(x, temb, image_only_indicator)
    return _maybe_temporal_conv(self, x, 1, image_only_indicator)


class UpBlock(nn.Module):
  """(concat skip → res block [→ transformer] [→ motion module]) × num_layers, then nearest ×2
  and a conv.

  diffusers CrossAttnUpBlock2D / UpBlock2D and their SpatioTemporal, Motion and 3D forms. `skips`
  are consumed last first, as diffusers pops them.
  """
  out_channels: int
  num_layers: int
  eps: float
  num_attention_heads: Optional[int] = None
  transformer_layers: int = 1
  only_cross_attention: bool = False
  add_upsample: bool = True
  motion_num_attention_heads: Optional[int] = None
  motion_layers: int = 1
  options: BlockOptions = BlockOptions()

  @nn.compact
  def __call__(self, x, skips: Sequence, temb, context, image_only_indicator=None):
    if len(skips) != self.num_layers:
      raise ValueError(f"UpBlock with {self.num_layers} layers got {len(skips)} skips.")
    for j in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
      x = self.options.resnet(self.out_channels, self.eps, f"resnets_{j}")(
          x, temb, image_only_indicator)
      x = _maybe_temporal_conv(self, x, j, image_only_indicator)
      if self.num_attention_heads:
        x = self.options.transformer(self.num_attention_heads, self.transformer_layers,
                                     self.only_cross_attention, f"attentions_{j}")(
                                         x, context, image_only_indicator)
        x = _maybe_temporal_transformer(self, x, j, image_only_indicator)
      x = _maybe_motion(self, x, j, image_only_indicator)
    if self.add_upsample:
      x = layers.Upsample2D(self.out_channels, dtype=self.options.dtype,
                            param_dtype=self.options.param_dtype, name="upsamplers_0")(x)
    return x
