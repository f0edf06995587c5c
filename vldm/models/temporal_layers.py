"""Video LDM's temporal alignment res blocks, shared by SVD's temporal VAE decoder and its UNet.

diffusers `TemporalResnetBlock` and `SpatioTemporalResBlock` (diffusers/models/resnet.py): a
per-frame ResnetBlock2D, then a res block of (3,1,1) convolutions over frames, blended with the
per-frame result by a learned α (`AlphaBlender`). The temporal VAE decoder uses them without a time
embedding (merge_strategy 'learned', switch_spatial_to_temporal_mix=True); the SVD UNet with one
(merge_strategy 'learned_with_images', merge_factor 0.5).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from vldm.models import layers

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
