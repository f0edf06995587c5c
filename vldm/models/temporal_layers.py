"""Temporal layers: Video LDM's temporal alignment res blocks, AnimateDiff's motion modules and
ModelScope's temporal convolutions.

diffusers `TemporalResnetBlock` and `SpatioTemporalResBlock` (diffusers/models/resnet.py): a
per-frame ResnetBlock2D, then a res block of (3,1,1) convolutions over frames, blended with the
per-frame result by a learned α (`AlphaBlender`). The temporal VAE decoder uses them without a time
embedding (merge_strategy 'learned', switch_spatial_to_temporal_mix=True); the SVD UNet with one
(merge_strategy 'learned_with_images', merge_factor 0.5).

`MotionModule` is AnimateDiff's temporal layer (diffusers AnimateDiffTransformer3D): attention over
frames at each pixel, with fixed sinusoidal frame positions, added to its input (no α). Without
the frame positions it is ModelScope's TransformerTemporalModel (UNet3DConditionModel's
`transformer_in` and `temp_attentions`).

`TemporalConvLayer` is ModelScope's (diffusers TemporalConvLayer): four (3,1,1) convolutions over
frames, each after a GroupNorm and SiLU, added to the input.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vldm.models import layers
from vldm.models import transformer

Dtype = layers.Dtype


class TemporalResnetBlock(nn.Module):
  """GN → SiLU → (3,1,1) conv → (+ time embedding) → GN → SiLU → (3,1,1) conv, + shortcut.

  Runs on (B, F, H, W, C) so that both GroupNorms take their statistics over all frames of a clip,
  as diffusers' do on its 5-D (B, C, F, H, W) tensors. `temb` is (B, F, D) or None; the time
  projection `time_emb_proj` exists only when a `temb` is passed. A (1,1,1) `conv_shortcut` is
  created when the channel count changes.
  """
  out_channels: Optional[int] = None
  groups: int = 32
  eps: float = 1e-6
  temporal_conv_implementation: str = "shifted_matmul"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    if x.ndim != 5:
      raise ValueError(f"TemporalResnetBlock expects (B, F, H, W, C), got shape {x.shape}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    out_channels = self.out_channels or x.shape[-1]
    temporal_conv = lambda features, kernel, name: layers.TemporalConv(
        features, kernel, implementation=self.temporal_conv_implementation, name=name, **kw)
    h = nn.silu(layers.GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
    h = temporal_conv(out_channels, 3, "conv1")(h)
    if temb is not None:
      if temb.shape[:2] != x.shape[:2]:
        raise ValueError(f"temb must be (B, F, D) = {x.shape[:2]} + (D,), got shape {temb.shape}.")
      t = nn.Dense(out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
      h = h + t[:, :, None, None, :]
    h = nn.silu(layers.GroupNorm(self.groups, self.eps, name="norm2", **kw)(h))
    h = temporal_conv(out_channels, 3, "conv2")(h)
    if x.shape[-1] != out_channels:
      x = temporal_conv(out_channels, 1, "conv_shortcut")(x)
    return x + h


class SpatioTemporalResBlock(nn.Module):
  """A per-frame ResnetBlock2D, then a TemporalResnetBlock, mixed by a learned α.

  Call: `(x[B*F, H, W, C], temb[B*F, D] or None, image_only_indicator[B, F]) -> [B*F, H, W, C']`.
  The indicator gives the number of frames (as in diffusers, it is required for every strategy) and,
  for 'learned_with_images', flags still images whose temporal path is switched off. Keys:
  `spatial_res_block.*`, `temporal_res_block.*`, `time_mixer.mix_factor`. `temporal_eps=None`
  means the spatial `eps`.
  """
  out_channels: Optional[int] = None
  groups: int = 32
  eps: float = 1e-6
  temporal_eps: Optional[float] = None
  merge_factor: float = 0.5
  merge_strategy: str = "learned_with_images"
  switch_spatial_to_temporal_mix: bool = False
  temporal_conv_implementation: str = "shifted_matmul"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None, image_only_indicator=None):
    if image_only_indicator is None or image_only_indicator.ndim != 2:
      raise ValueError("SpatioTemporalResBlock needs image_only_indicator of shape (B, F), got "
                       f"{None if image_only_indicator is None else image_only_indicator.shape}.")
    batch, frames = image_only_indicator.shape
    if x.ndim != 4 or x.shape[0] != batch * frames:
      raise ValueError(f"SpatioTemporalResBlock expects x of shape (B*F, H, W, C) with B*F = "
                       f"{batch}*{frames} (from image_only_indicator), got {x.shape}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.ResnetBlock2D(self.out_channels, groups=self.groups, eps=self.eps,
                             name="spatial_res_block", **kw)(x, temb)
    video = h.reshape((batch, frames) + h.shape[1:])
    temb_video = None if temb is None else temb.reshape(batch, frames, temb.shape[-1])
    eps = self.eps if self.temporal_eps is None else self.temporal_eps
    h_temporal = TemporalResnetBlock(
        h.shape[-1], groups=self.groups, eps=eps,
        temporal_conv_implementation=self.temporal_conv_implementation,
        name="temporal_res_block", **kw)(video, temb_video)
    return layers.AlphaBlender(
        self.merge_factor, merge_strategy=self.merge_strategy,
        switch_spatial_to_temporal_mix=self.switch_spatial_to_temporal_mix,
        name="time_mixer")(h, h_temporal.reshape(h.shape), image_only_indicator)


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
  """diffusers SinusoidalPositionalEmbedding's table (length, dim), float32: sin on even channels,
  cos on odd ones, frequencies exp(-ln(10⁴)·2i/dim)."""
  if dim % 2:
    raise ValueError(f"Sinusoidal positions need an even width; got {dim}.")
  position = np.arange(length, dtype=np.float32)[:, None]
  div = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
  table = np.zeros((length, dim), np.float32)
  table[:, 0::2] = np.sin(position * div)
  table[:, 1::2] = np.cos(position * div)
  return table


class MotionModule(nn.Module):
  """AnimateDiff's motion module (diffusers AnimateDiffTransformer3D), on (B·F, H, W, C).

  GroupNorm (eps 1e-6) over each clip's (F, H, W, C/groups) → (B·H·W, F, C) → proj_in (Linear) →
  `num_layers` BasicTransformerBlocks with two self-attentions over frames, the sinusoidal frame
  positions added to the normalised input of each → proj_out → + input. Heads have width
  `attention_head_dim` (None: C // heads). The positions table is a constant (diffusers'
  `pos_embed.pe` buffer), so clips may not be longer than `max_seq_length` frames.
  `frame_positions=False`: no positions (and no length limit): diffusers' TransformerTemporalModel
  as ModelScope's UNet3DConditionModel builds it.

  Call: `(x[B·F, H, W, C], image_only_indicator[B, F]) -> [B·F, H, W, C]`; the indicator gives the
  number of frames and, where 1, marks a clip of stills whose motion update is dropped (vldm's
  joint image-video training; all zeros in diffusers).
  """
  num_attention_heads: int = 8
  num_layers: int = 1
  norm_num_groups: int = 32
  max_seq_length: int = 32
  attention_head_dim: Optional[int] = None
  frame_positions: bool = True
  attention_implementation: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, image_only_indicator):
    if image_only_indicator is None or image_only_indicator.ndim != 2:
      raise ValueError("MotionModule needs image_only_indicator of shape (B, F), got "
                       f"{None if image_only_indicator is None else image_only_indicator.shape}.")
    batch, frames = image_only_indicator.shape
    n, height, width, channels = x.shape
    if n != batch * frames:
      raise ValueError(f"MotionModule expects x of shape (B*F, H, W, C) with B*F = "
                       f"{batch}*{frames} (from image_only_indicator), got {x.shape}.")
    if self.frame_positions and frames > self.max_seq_length:
      raise ValueError(f"{frames} frames are more than this motion module's "
                       f"{self.max_seq_length} frame positions (motion_max_seq_length).")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    head_dim = self.attention_head_dim or channels // self.num_attention_heads
    inner = self.num_attention_heads * head_dim
    h = layers.GroupNorm(self.norm_num_groups, 1e-6, name="norm", **kw)(
        x.reshape(batch, frames, height, width, channels))
    h = h.transpose(0, 2, 3, 1, 4).reshape(batch * height * width, frames, channels)
    h = nn.Dense(inner, name="proj_in", **kw)(h)
    positions = None
    if self.frame_positions:
      positions = jnp.asarray(sinusoidal_positions(frames, inner), self.dtype)
    for k in range(self.num_layers):
      h = transformer.BasicTransformerBlock(
          self.num_attention_heads, head_dim, double_self_attention=True,
          attention_implementation=self.attention_implementation,
          name=f"transformer_blocks_{k}", **kw)(h, None, positions)
    h = nn.Dense(channels, name="proj_out", **kw)(h)
    h = h.reshape(batch, height, width, frames, channels).transpose(0, 3, 1, 2, 4)
    moving = (1 - image_only_indicator).astype(h.dtype)[:, :, None, None, None]
    return x + (h * moving).reshape(x.shape)


class TemporalConvLayer(nn.Module):
  """ModelScope's temporal convolutions (diffusers TemporalConvLayer), on (B·F, H, W, C).

  `conv1`…`conv4`, each GroupNorm (eps 1e-5, statistics over the clip's frames) → SiLU →
  (dropout, conv2–4) → (3,1,1) convolution over frames; the result is added to the input. Keys as
  diffusers' nn.Sequential indices: `conv1.0` / `conv1.2` (norm / conv), `conv{2,3,4}.0` /
  `conv{2,3,4}.3`. Dropout is a training option of diffusers' and is not applied here.

  Call: `(x[B·F, H, W, C], image_only_indicator[B, F]) -> [B·F, H, W, C]`; where the indicator is
  1 the clip is a set of stills and its temporal update is dropped (all zeros in diffusers).
  """
  norm_num_groups: int = 32
  eps: float = 1e-5
  temporal_conv_implementation: str = "shifted_matmul"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, image_only_indicator):
    if image_only_indicator is None or image_only_indicator.ndim != 2:
      raise ValueError("TemporalConvLayer needs image_only_indicator of shape (B, F), got "
                       f"{None if image_only_indicator is None else image_only_indicator.shape}.")
    batch, frames = image_only_indicator.shape
    if x.ndim != 4 or x.shape[0] != batch * frames:
      raise ValueError(f"TemporalConvLayer expects x of shape (B*F, H, W, C) with B*F = "
                       f"{batch}*{frames} (from image_only_indicator), got {x.shape}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = x.shape[-1]
    h = x.reshape((batch, frames) + x.shape[1:])
    for k, conv_index in ((1, 2), (2, 3), (3, 3), (4, 3)):
      h = nn.silu(layers.GroupNorm(self.norm_num_groups, self.eps, name=f"conv{k}_0", **kw)(h))
      h = layers.TemporalConv(channels, 3, implementation=self.temporal_conv_implementation,
                              name=f"conv{k}_{conv_index}", **kw)(h)
    moving = (1 - image_only_indicator).astype(h.dtype)[:, :, None, None, None]
    return x + (h * moving).reshape(x.shape)
