"""The KL autoencoders of latent diffusion: the SD VAE and SVD's VAE with a temporal decoder.

`AutoencoderKL` mirrors diffusers' `AutoencoderKL` and `AutoencoderKLTemporalDecoder` mirrors
diffusers' class of that name (same encoder; a decoder with Video LDM's temporal res blocks and a
final (3,1,1) conv over frames). Module names follow the diffusers state-dict keys, so weights load
by name (`vldm.convert.load_diffusers`).

  vae.apply({'params': p}, images[B,H,W,3], method='encode')   -> DiagonalGaussian(mean, logvar)
  vae.apply({'params': p}, latents[B,h,w,c], method='decode')  -> images[B,H,W,3]        (KL)
  vae.apply({'params': p}, latents[B,F,h,w,c], method='decode') -> video[B,F,H,W,3]     (temporal)

`DiagonalGaussian` is a named tuple, so `mean, logvar = encode(...)` works. The `scaling_factor`
is configuration only: as in diffusers, callers multiply latents by it after encoding and divide
before decoding.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vldm.models import layers
from vldm.models.temporal_layers import SpatioTemporalResBlock

Dtype = layers.Dtype

# What the ports support; diffusers' other block types (attention or skip variants) are not VAEs
# that any published checkpoint uses.
DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
ACT_FNS = ("silu", "swish")  # the same function in diffusers' get_activation
# diffusers' temporal decoder (and its encoder, built with defaults) hard-codes 32 groups.
TEMPORAL_DECODER_GROUPS = 32
LOGVAR_RANGE = (-30.0, 20.0)


class DiagonalGaussian(NamedTuple):
  """The encoder's posterior N(mean, exp(logvar)), logvar already clamped to [-30, 20]."""
  mean: jax.Array
  logvar: jax.Array

  @property
  def std(self):
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng):
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self):
    return self.mean

  def kl(self):
    """KL(q ‖ N(0, I)) per example, summed over all non-batch axes (diffusers' `kl()`)."""
    terms = jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar
    return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))


def diagonal_gaussian(moments) -> DiagonalGaussian:
  """Splits (…, 2c) encoder moments into mean and clamped logvar, as diffusers does."""
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return DiagonalGaussian(mean, jnp.clip(logvar, *LOGVAR_RANGE))


def _check_images(images, channels: int, levels: int):
  factor = 2 ** (levels - 1)
  if (images.ndim != 4 or images.shape[-1] != channels or images.shape[1] % factor
      or images.shape[2] % factor):
    raise ValueError(f"Expected images of layout (B, H, W, {channels}) with H and W divisible by "
                     f"{factor} (2**(levels-1) for {levels} levels); got shape "
                     f"{tuple(images.shape)}.")


def _check_latents(latents, channels: int, layout: str):
  if latents.ndim != layout.count(",") + 1 or latents.shape[-1] != channels:
    raise ValueError(f"Expected latents of layout {layout.format(channels)}; got shape "
                     f"{tuple(latents.shape)}.")


def _check_channels(block_out_channels, groups: int):
  bad = [c for c in block_out_channels if c % groups]
  if bad:
    raise ValueError(f"block_out_channels {tuple(block_out_channels)} must all be multiples of the "
                     f"GroupNorm group count {groups}; {bad} are not.")


def block_types(types: Optional[Sequence[str]], default: str, levels: int) -> tuple[str, ...]:
  """A block-type field as config.json spells it: None stands for `default` at every level."""
  return (default,) * levels if types is None else tuple(types)


def _check_block_types(name: str, types: Optional[Sequence[str]], accepted: Sequence[str],
                       levels: int):
  types = block_types(types, accepted[0], levels)
  unsupported = [t for t in types if t not in accepted]
  if unsupported:
    raise ValueError(f"Unsupported {name} {unsupported}; accepted: {list(accepted)}.")
  if len(types) != levels:
    raise ValueError(f"{name} has {len(types)} entries but block_out_channels has {levels}; "
                     "they must match.")


class MidBlockAttention(nn.Module):
  """The VAE mid-block attention: GroupNorm → self-attention over H·W (q/k/v/out with bias) + x.

  Keys `group_norm`, `to_q`, `to_k`, `to_v`, `to_out.0` (older checkpoints: query, key, value,
  proj_attn; renamed on load). diffusers gives it one head as wide as the channels.
  """
  groups: int
  eps: float = 1e-6
  heads: int = 1
  attention_implementation: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    tokens = layers.GroupNorm(self.groups, self.eps, name="group_norm", **kw)(x)
    tokens = tokens.reshape(b, h * w, c)
    q, k, v = (nn.Dense(c, name=name, **kw)(tokens) for name in ("to_q", "to_k", "to_v"))
    out = layers.attend(q, k, v, self.heads, implementation=self.attention_implementation)
    return x + nn.Dense(c, name="to_out_0", **kw)(out).reshape(b, h, w, c)


class DownEncoderBlock2D(nn.Module):
  """`num_layers` ResnetBlock2D (no time embedding), then a padding-0 Downsample2D unless last."""
  out_channels: int
  num_layers: int
  add_downsample: bool
  groups: int
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = layers.ResnetBlock2D(self.out_channels, groups=self.groups, eps=self.eps,
                               name=f"resnets_{i}", **kw)(x)
    if self.add_downsample:
      x = layers.Downsample2D(self.out_channels, padding=0, name="downsamplers_0", **kw)(x)
    return x


class UpDecoderBlock2D(nn.Module):
  """`num_layers` ResnetBlock2D (no time embedding), then an Upsample2D unless last."""
  out_channels: int
  num_layers: int
  add_upsample: bool
  groups: int
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = layers.ResnetBlock2D(self.out_channels, groups=self.groups, eps=self.eps,
                               name=f"resnets_{i}", **kw)(x)
    if self.add_upsample:
      x = layers.Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
    return x


class UNetMidBlock2D(nn.Module):
  """resnets.0 → attentions.0 (when `add_attention`) → resnets.1, channels unchanged."""
  groups: int
  eps: float = 1e-6
  add_attention: bool = True
  attention_implementation: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.ResnetBlock2D(groups=self.groups, eps=self.eps, name="resnets_0", **kw)(x)
    if self.add_attention:
      x = MidBlockAttention(self.groups, self.eps, name="attentions_0",
                            attention_implementation=self.attention_implementation, **kw)(x)
    return layers.ResnetBlock2D(groups=self.groups, eps=self.eps, name="resnets_1", **kw)(x)


class Encoder(nn.Module):
  """images [B,H,W,C] → moments [B,H/2^(n-1),W/2^(n-1),2·latent_channels] (diffusers `Encoder`)."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  attention_implementation: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    groups = self.norm_num_groups
    x = layers.conv(self.block_out_channels[0], 3, name="conv_in", **kw)(x)
    for i, channels in enumerate(self.block_out_channels):
      x = DownEncoderBlock2D(channels, self.layers_per_block,
                             add_downsample=i < len(self.block_out_channels) - 1, groups=groups,
                             name=f"down_blocks_{i}", **kw)(x)
    x = UNetMidBlock2D(groups, add_attention=self.mid_block_add_attention,
                       attention_implementation=self.attention_implementation, name="mid_block",
                       **kw)(x)
    x = nn.silu(layers.GroupNorm(groups, 1e-6, name="conv_norm_out", **kw)(x))
    return layers.conv(2 * self.latent_channels, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
  """latents [B,h,w,c] → images [B,h·2^(n-1),w·2^(n-1),out_channels] (diffusers `Decoder`)."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int = 3
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  attention_implementation: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    groups = self.norm_num_groups
    x = layers.conv(self.block_out_channels[-1], 3, name="conv_in", **kw)(z)
    x = UNetMidBlock2D(groups, add_attention=self.mid_block_add_attention,
                       attention_implementation=self.attention_implementation, name="mid_block",
                       **kw)(x)
    for i, channels in enumerate(reversed(self.block_out_channels)):
      x = UpDecoderBlock2D(channels, self.layers_per_block + 1,
                           add_upsample=i < len(self.block_out_channels) - 1, groups=groups,
                           name=f"up_blocks_{i}", **kw)(x)
    x = nn.silu(layers.GroupNorm(groups, 1e-6, name="conv_norm_out", **kw)(x))
    return layers.conv(self.out_channels, 3, name="conv_out", **kw)(x)


def _decoder_res_block(channels: int, name: str, impl: str, kw: dict) -> SpatioTemporalResBlock:
  """The temporal decoder's res block: no time embedding, α = σ(m) on the *temporal* path."""
  return SpatioTemporalResBlock(channels, groups=TEMPORAL_DECODER_GROUPS, eps=1e-6,
                                temporal_eps=1e-5, merge_factor=0.0, merge_strategy="learned",
                                switch_spatial_to_temporal_mix=True,
                                temporal_conv_implementation=impl, name=name, **kw)


class MidBlockTemporalDecoder(nn.Module):
  """diffusers `MidBlockTemporalDecoder`: resnets.0 → attentions.0 → resnets.1.

  diffusers builds `num_layers` res blocks and one attention but its forward zips resnets[1:] with
  the attentions: with num_layers=1 the attention is never applied, and res blocks past the second
  never run. Their weights still exist, so they are created (at init only) for loading and saving.
  """
  num_layers: int
  attention_implementation: Optional[str] = None
  temporal_conv_implementation: str = "shifted_matmul"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, image_only_indicator):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = x.shape[-1]
    res = [_decoder_res_block(channels, f"resnets_{i}", self.temporal_conv_implementation, kw)
           for i in range(self.num_layers)]
    attention = MidBlockAttention(TEMPORAL_DECODER_GROUPS, 1e-6,
                                  attention_implementation=self.attention_implementation,
                                  name="attentions_0", **kw)
    x = res[0](x, None, image_only_indicator)
    if self.num_layers >= 2:
      x = res[1](attention(x), None, image_only_indicator)
    if self.is_initializing():  # weights diffusers holds but never uses
      if self.num_layers < 2:
        attention(x)
      for block in res[2:]:
        block(x, None, image_only_indicator)
    return x


class UpBlockTemporalDecoder(nn.Module):
  """`num_layers` spatio-temporal res blocks, then an Upsample2D unless last."""
  out_channels: int
  num_layers: int
  add_upsample: bool
  temporal_conv_implementation: str = "shifted_matmul"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, image_only_indicator):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = _decoder_res_block(self.out_channels, f"resnets_{i}", self.temporal_conv_implementation,
                             kw)(x, None, image_only_indicator)
    if self.add_upsample:
      x = layers.Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
    return x


class TemporalDecoder(nn.Module):
  """latents [B,F,h,w,c] → video [B,F,H,W,out_channels] (diffusers `TemporalDecoder`).

  Frames are decoded jointly: the temporal convolutions and the GroupNorms of the temporal res
  blocks see all F frames of a clip. The image-only indicator is zeros (every frame is video).
  """
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int = 3
  attention_implementation: Optional[str] = None
  temporal_conv_implementation: str = "shifted_matmul"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    impl = self.temporal_conv_implementation
    batch, frames = z.shape[:2]
    indicator = jnp.zeros((batch, frames), self.dtype)
    x = layers.conv(self.block_out_channels[-1], 3, name="conv_in", **kw)(
        z.reshape((batch * frames,) + z.shape[2:]))
    x = MidBlockTemporalDecoder(self.layers_per_block,
                                attention_implementation=self.attention_implementation,
                                temporal_conv_implementation=impl, name="mid_block",
                                **kw)(x, indicator)
    for i, channels in enumerate(reversed(self.block_out_channels)):
      x = UpBlockTemporalDecoder(channels, self.layers_per_block + 1,
                                 add_upsample=i < len(self.block_out_channels) - 1,
                                 temporal_conv_implementation=impl, name=f"up_blocks_{i}",
                                 **kw)(x, indicator)
    x = nn.silu(layers.GroupNorm(TEMPORAL_DECODER_GROUPS, 1e-6, name="conv_norm_out", **kw)(x))
    x = layers.conv(self.out_channels, 3, name="conv_out", **kw)(x)
    x = x.reshape((batch, frames) + x.shape[1:])
    return layers.TemporalConv(self.out_channels, 3, implementation=impl, name="time_conv_out",
                               **kw)(x)


class AutoencoderKL(nn.Module):
  """diffusers `AutoencoderKL` (the SD VAE). Fields are its config.json keys.

  encode: images [B,H,W,in_channels] → DiagonalGaussian(mean, logvar), each [B,h,w,latent_channels]
  with h = H / 2**(len(block_out_channels)-1); decode: latents [B,h,w,latent_channels] →
  images [B,H,W,out_channels]; __call__: decode(encode(images).mean). Metadata fields
  (sample_size, scaling_factor, shift_factor, latents_mean/std, force_upcast) are kept for the
  config round trip and callers; none is applied inside.
  """
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: Optional[Sequence[str]] = None  # None: DownEncoderBlock2D at every level
  up_block_types: Optional[Sequence[str]] = None  # None: UpDecoderBlock2D at every level
  block_out_channels: Sequence[int] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: Any = 32
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None
  latents_mean: Optional[Sequence[float]] = None
  latents_std: Optional[Sequence[float]] = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  attention_implementation: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def check_config(self) -> None:
    """Raises ValueError for a configuration this port does not implement."""
    levels = len(self.block_out_channels)
    _check_block_types("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES, levels)
    _check_block_types("up_block_types", self.up_block_types, UP_BLOCK_TYPES, levels)
    if self.act_fn not in ACT_FNS:
      raise ValueError(f"Unsupported act_fn {self.act_fn!r}; accepted: {list(ACT_FNS)}.")
    _check_channels(self.block_out_channels, self.norm_num_groups)

  def setup(self):
    self.check_config()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    common = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                  mid_block_add_attention=self.mid_block_add_attention,
                  attention_implementation=self.attention_implementation, **kw)
    self.encoder = Encoder(latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    if self.use_quant_conv:
      self.quant_conv = layers.conv(2 * self.latent_channels, 1, name="quant_conv", **kw)
    if self.use_post_quant_conv:
      self.post_quant_conv = layers.conv(self.latent_channels, 1, name="post_quant_conv", **kw)

  def encode(self, images) -> DiagonalGaussian:
    _check_images(images, self.in_channels, len(self.block_out_channels))
    moments = self.encoder(images)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    return diagonal_gaussian(moments)

  def decode(self, latents):
    _check_latents(latents, self.latent_channels, "(B, h, w, {})")
    if self.use_post_quant_conv:
      latents = self.post_quant_conv(latents)
    return self.decoder(latents)

  def __call__(self, images):
    return self.decode(self.encode(images).mean)


class AutoencoderKLTemporalDecoder(nn.Module):
  """diffusers `AutoencoderKLTemporalDecoder` (the SVD VAE). Fields are its config.json keys.

  encode: images [B,H,W,in_channels] → DiagonalGaussian(mean, logvar), each [B,h,w,latent_channels]
  (frames go through the encoder independently: flatten them into B). decode: latents
  [B,F,h,w,latent_channels] → video [B,F,H,W,out_channels]. __call__: video [B,F,H,W,C] →
  decode(encode(frames).mean), used for init.

  `decode_chunk_size=k` (a Python int, static under jit) decodes k frames at a time, through a
  sequential `nn.scan` over chunks so that activation memory is that of k frames. Each chunk is a
  clip of its own, which is what diffusers' StableVideoDiffusionPipeline does
  (`vae.decode(latents[i:i+k], num_frames=k)`). Because the
  temporal layers mix frames, the result then differs from decoding all F frames together; it
  matches the pipeline's. Chunks run along each clip's frames (the last one may be shorter); for a
  batch of several clips whose F is not a multiple of k the pipeline, which chunks the flattened
  B·F axis, would also mix frames of neighbouring clips — vldm never does.
  """
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: Optional[Sequence[str]] = None  # None: DownEncoderBlock2D at every level
  block_out_channels: Sequence[int] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  sample_size: Any = 32
  scaling_factor: float = 0.18215
  force_upcast: bool = True
  attention_implementation: Optional[str] = None
  temporal_conv_implementation: str = "shifted_matmul"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def check_config(self) -> None:
    """Raises ValueError for a configuration this port does not implement."""
    levels = len(self.block_out_channels)
    _check_block_types("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES, levels)
    _check_channels(self.block_out_channels, TEMPORAL_DECODER_GROUPS)
    if self.temporal_conv_implementation not in layers.TEMPORAL_CONV_IMPLEMENTATIONS:
      raise ValueError("Unknown temporal_conv_implementation "
                       f"{self.temporal_conv_implementation!r}; "
                       f"accepted: {layers.TEMPORAL_CONV_IMPLEMENTATIONS}.")

  def setup(self):
    self.check_config()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(tuple(self.block_out_channels), self.layers_per_block,
                           self.latent_channels, norm_num_groups=TEMPORAL_DECODER_GROUPS,
                           attention_implementation=self.attention_implementation, **kw)
    self.quant_conv = layers.conv(2 * self.latent_channels, 1, name="quant_conv", **kw)
    self.decoder = TemporalDecoder(tuple(self.block_out_channels), self.layers_per_block,
                                   out_channels=self.out_channels,
                                   attention_implementation=self.attention_implementation,
                                   temporal_conv_implementation=self.temporal_conv_implementation,
                                   **kw)

  def encode(self, images) -> DiagonalGaussian:
    _check_images(images, self.in_channels, len(self.block_out_channels))
    return diagonal_gaussian(self.quant_conv(self.encoder(images)))

  def decode(self, latents, decode_chunk_size: Optional[int] = None):
    _check_latents(latents, self.latent_channels, "(B, F, h, w, {})")
    frames = latents.shape[1]
    if decode_chunk_size is not None and decode_chunk_size < 1:
      raise ValueError("decode_chunk_size must be a positive number of frames, got "
                       f"{decode_chunk_size}.")
    chunk = frames if decode_chunk_size is None else min(decode_chunk_size, frames)
    if chunk == frames or self.is_initializing():
      return self.decoder(latents)
    whole = frames // chunk * chunk
    # (B, n·k, …) → (B, n, k, …); the scan walks axis 1, one batch of k-frame clips per step.
    chunks = latents[:, :whole].reshape((latents.shape[0], whole // chunk, chunk)
                                        + latents.shape[2:])
    scan = nn.scan(lambda decoder, carry, z: (carry, decoder(z)), variable_broadcast="params",
                   split_rngs={"params": False}, in_axes=1, out_axes=1)
    _, video = scan(self.decoder, None, chunks)
    video = video.reshape((video.shape[0], whole) + video.shape[3:])
    if whole < frames:
      video = jnp.concatenate([video, self.decoder(latents[:, whole:])], axis=1)
    return video

  def __call__(self, video):
    if video.ndim != 5:
      raise ValueError("Expected a video of layout (B, F, H, W, C); got shape "
                       f"{tuple(video.shape)}.")
    batch, frames = video.shape[:2]
    mean = self.encode(video.reshape((batch * frames,) + video.shape[2:])).mean
    return self.decode(mean.reshape((batch, frames) + mean.shape[1:]))


def downsampling_factor(block_out_channels: Sequence[int]) -> int:
  """Pixels per latent along H and W: 2**(levels-1) (8 for the SD and SVD VAEs)."""
  return 2 ** (len(block_out_channels) - 1)
