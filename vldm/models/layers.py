"""Building blocks shared by the autoencoders, the UNets and CLIP.

Everything is NHWC (video: (B, F, H, W, C) or (B*F, H, W, C)). Module and parameter names follow the
diffusers / transformers state-dict names (`to_q`, `conv1`, `linear_1`, ...) so that weight import is
a mechanical rename (see `vldm.convert.core`). Every module has `dtype` (compute) and `param_dtype`.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Names accepted by `attention_implementation`; None lets JAX choose. 'chunked': queries in chunks
# of QUERY_CHUNK, each chunk's scores recomputed in the backward pass: memory O(chunk × keys)
# instead of O(queries × keys), on every backend (TPU's XLA path materialises the whole score
# matrix: for SVD's 9216-token frames, 14 frames × 5 heads × 9216² scores a layer).
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn", "chunked")
QUERY_CHUNK = 1024


def GroupNorm(
    num_groups: int,
    eps: float,
    *,
    name: str,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nn.GroupNorm:
  """GroupNorm with an explicit epsilon (Flax defaults to 1e-6, PyTorch to 1e-5).

  Statistics span every axis but the first and the channel groups, so a (B, F, H, W, C) input is
  normalised over all frames, as diffusers' GroupNorms on 5-D tensors are.
  """
  return nn.GroupNorm(
      num_groups=num_groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name
  )


def LayerNorm(
    eps: float, *, name: str, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32
) -> nn.LayerNorm:
  """LayerNorm over the last axis with an explicit epsilon."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


def attend(
    q,
    k,
    v,
    num_heads: int,
    *,
    mask=None,
    is_causal: bool = False,
    implementation: Optional[str] = None,
    query_chunk: int = QUERY_CHUNK,
):
  """Multi-head scaled dot-product attention on (batch, tokens, heads*head_dim) projections.

  The one attention implementation of vldm: `jax.nn.dot_product_attention` (BTNH layout), whose
  `implementation` ('xla' or 'cudnn'; None lets JAX choose) is selectable per model; 'chunked'
  runs it over `query_chunk` queries at a time (unmasked attention longer than a chunk).
  `mask` broadcasts to (batch, heads, q_tokens, kv_tokens), True where attention is allowed.
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(
        f"Unknown attention implementation {implementation!r}; "
        f"accepted: {ATTENTION_IMPLEMENTATIONS}."
    )
  b, tq, inner = q.shape
  if inner % num_heads:
    raise ValueError(f"Attention width {inner} does not divide into {num_heads} heads.")
  head_dim = inner // num_heads
  split = lambda t: t.reshape(t.shape[0], t.shape[1], num_heads, head_dim)
  if implementation == "chunked" and mask is None and not is_causal and tq > query_chunk:
    out = _query_chunked_attention(split(q), split(k), split(v), query_chunk)
  else:
    out = jax.nn.dot_product_attention(
        split(q),
        split(k),
        split(v),
        mask=mask,
        is_causal=is_causal,
        implementation=None if implementation == "chunked" else implementation,
    )
  return out.reshape(b, tq, inner)


def _query_chunked_attention(q, k, v, chunk: int):
  """Exact attention over (B, T, N, H) queries, `chunk` queries at a time (the last chunk padded),
  each chunk's softmax recomputed in the backward pass instead of stored."""
  b, tq, heads, head_dim = q.shape
  n = -(-tq // chunk)
  q = jnp.pad(q, ((0, 0), (0, n * chunk - tq), (0, 0), (0, 0)))
  chunks = q.reshape(b, n, chunk, heads, head_dim).swapaxes(0, 1)
  one = jax.checkpoint(lambda qc: jax.nn.dot_product_attention(qc, k, v, implementation="xla"))
  out = jax.lax.map(one, chunks)
  return out.swapaxes(0, 1).reshape(b, n * chunk, heads, head_dim)[:, :tq]


class Attention(nn.Module):
  """Self- or cross-attention with diffusers' projection names (to_q, to_k, to_v, to_out.0).

  `heads` is the number of heads and `dim_head` their width. `context=None` means self-attention.
  `proj_names` renames the projections for other layouts (CLIP: q_proj, k_proj, v_proj, out_proj).
  """

  heads: int
  dim_head: int
  out_dim: Optional[int] = None
  qkv_bias: bool = False
  out_bias: bool = True
  proj_names: Sequence[str] = ("to_q", "to_k", "to_v", "to_out_0")
  attention_implementation: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, mask=None, is_causal: bool = False):
    context = x if context is None else context
    inner = self.heads * self.dim_head
    dense = lambda features, bias, name: nn.Dense(
        features, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    q_name, k_name, v_name, out_name = self.proj_names
    q = dense(inner, self.qkv_bias, q_name)(x)
    k = dense(inner, self.qkv_bias, k_name)(context)
    v = dense(inner, self.qkv_bias, v_name)(context)
    h = attend(
        q,
        k,
        v,
        self.heads,
        mask=mask,
        is_causal=is_causal,
        implementation=self.attention_implementation,
    )
    return dense(self.out_dim or x.shape[-1], self.out_bias, out_name)(h)


class GEGLU(nn.Module):
  """Linear to 2×inner, then value · GELU(gate) with the exact (erf) GELU, as diffusers does."""

  dim_out: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(2 * self.dim_out, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
    value, gate = jnp.split(h, 2, axis=-1)
    return value * nn.gelu(gate, approximate=False)


class GELU(nn.Module):
  """Linear then GELU (`approximate`: tanh form, diffusers' 'gelu-approximate')."""

  dim_out: int
  approximate: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.dim_out, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
    return nn.gelu(h, approximate=self.approximate)


FEED_FORWARD_ACTIVATIONS = ("geglu", "gelu", "gelu-approximate")


class FeedForward(nn.Module):
  """diffusers FeedForward: net.0 = activation projection to mult·dim, net.2 = Linear back."""

  mult: int = 4
  dim_out: Optional[int] = None
  activation: str = "geglu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    inner = dim * self.mult
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.activation == "geglu":
      h = GEGLU(inner, name="net_0", **kw)(x)
    elif self.activation in ("gelu", "gelu-approximate"):
      h = GELU(inner, approximate=self.activation == "gelu-approximate", name="net_0", **kw)(x)
    else:
      raise ValueError(
          f"Unknown feed-forward activation {self.activation!r}; "
          f"accepted: {FEED_FORWARD_ACTIVATIONS}."
      )
    return nn.Dense(self.dim_out or dim, name="net_2", **kw)(h)


def conv_as_matmul(height: int, width: int, kernel: int, stride: int = 1, pad: int = 0) -> bool:
  """Whether `Conv2D` runs this convolution as one matmul over im2col patches.

  It does when the input or the output is narrower than the kernel (the lowest levels of a UNet
  on small latents, 2×2 or 1×1): XLA:CPU's convolution library does not take those and its
  fallback is ~20× slower than the matmul (measured: 5.6 ms vs 0.26 ms for 16×2×2×256→128).
  The matmul computes the same sums, padding taps included, on every backend.
  """
  out_h, out_w = (height + 2 * pad - kernel) // stride + 1, (width + 2 * pad - kernel) // stride + 1
  return kernel > 1 and min(height, width, out_h, out_w) < kernel


class Conv2D(nn.Module):
  """A square 2-D convolution with PyTorch's symmetric padding, named and initialised like
  `nn.Conv` (params `kernel` (k, k, C_in, C_out) and `bias`). Inputs are (..., H, W, C).

  Small inputs run as an im2col matmul (see `conv_as_matmul`), the rest as a convolution.
  """

  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, s, p = self.kernel_size, self.stride, self.padding
    kernel = self.param(
        "kernel",
        nn.initializers.lecun_normal(),
        (k, k, x.shape[-1], self.features),
        self.param_dtype,
    )
    bias = (
        self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        if self.use_bias
        else None
    )
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    leading, (height, width, channels) = x.shape[:-3], x.shape[-3:]
    x = x.reshape((-1, height, width, channels))
    if conv_as_matmul(height, width, k, s, p):
      out_h, out_w = (height + 2 * p - k) // s + 1, (width + 2 * p - k) // s + 1
      xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
      patches = jnp.concatenate(
          [
              xp[:, i : i + s * (out_h - 1) + 1 : s, j : j + s * (out_w - 1) + 1 : s]
              for i in range(k)
              for j in range(k)
          ],
          axis=-1,
      )  # taps in the kernel's (i, j, c) order
      y = jnp.einsum("nhwk,ko->nhwo", patches, kernel.reshape(k * k * channels, self.features))
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, (s, s), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
    if bias is not None:
      y = y + bias
    return y.reshape(leading + y.shape[1:])


def conv(
    features: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: Optional[int] = None,
    name: str,
    dtype: Dtype,
    param_dtype: Dtype,
    use_bias: bool = True,
) -> Conv2D:
  """A square 2-D convolution with PyTorch's symmetric padding (default: kernel // 2)."""
  pad = kernel // 2 if padding is None else padding
  return Conv2D(
      features,
      kernel,
      stride=stride,
      padding=pad,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      name=name,
  )


class ResnetBlock2D(nn.Module):
  """diffusers ResnetBlock2D: GN → SiLU → conv → (+ time embedding) → GN → SiLU → conv, + shortcut.

  A time embedding is projected and added when `temb` is passed (SD UNets), omitted otherwise
  (VAE). A 1×1 `conv_shortcut` is created when the channel count changes.
  """

  out_channels: Optional[int] = None
  groups: int = 32
  eps: float = 1e-6
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    out_channels = self.out_channels or x.shape[-1]
    h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
    h = conv(out_channels, 3, name="conv1", **kw)(h)
    if temb is not None:
      t = nn.Dense(out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
      h = h + t.reshape(t.shape[:1] + (1,) * (h.ndim - 2) + t.shape[-1:])
    h = nn.silu(GroupNorm(self.groups, self.eps, name="norm2", **kw)(h))
    h = conv(out_channels, 3, name="conv2", **kw)(h)
    if x.shape[-1] != out_channels:
      x = conv(out_channels, 1, name="conv_shortcut", **kw)(x)
    return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
  """Stride-2 3×3 conv. `padding=1` (UNet) or 0 with a (0,1,0,1) pad first (VAE encoder)."""

  out_channels: Optional[int] = None
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(
        self.out_channels or x.shape[-1],
        3,
        stride=2,
        padding=self.padding,
        name="conv",
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )(x)


def upsample_nearest(x, factor: int = 2):
  """Nearest-neighbour upsampling of the two axes before channels (exact, no transposed conv)."""
  return jnp.repeat(jnp.repeat(x, factor, axis=-3), factor, axis=-2)


class Upsample2D(nn.Module):
  """Nearest ×2 then a 3×3 conv (key `upsamplers.0.conv`)."""

  out_channels: Optional[int] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return conv(
        self.out_channels or x.shape[-1],
        3,
        name="conv",
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )(upsample_nearest(x))


def timestep_embedding(
    timesteps,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
):
  """Sinusoidal embedding of (possibly fractional) timesteps [N] → [N, dim], float32 (diffusers)."""
  timesteps = jnp.asarray(timesteps, jnp.float32)
  if timesteps.ndim != 1:
    raise ValueError(f"timesteps must be a 1-D array [N], got shape {timesteps.shape}.")
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = scale * timesteps[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """linear_1 → SiLU → linear_2 (diffusers TimestepEmbedding)."""

  time_embed_dim: int
  out_dim: Optional[int] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(nn.Dense(self.time_embed_dim, name="linear_1", **kw)(x))
    return nn.Dense(self.out_dim or self.time_embed_dim, name="linear_2", **kw)(h)


MERGE_STRATEGIES = ("fixed", "learned", "learned_with_images")


class AlphaBlender(nn.Module):
  """The learned α of Video LDM's temporal alignment layers: α·spatial + (1−α)·temporal.

  `fixed`: α = mix_factor (kept as a parameter for weight compatibility, never trained);
  `learned`: α = σ(mix_factor); `learned_with_images`: α = 1 on frames flagged by the image-only
  indicator (the temporal path is skipped for still images), σ(mix_factor) elsewhere.
  `switch_spatial_to_temporal_mix` swaps the roles (SVD's temporal decoder).

  Inputs are (B·F, ...) tensors; `image_only_indicator` is (B, F).
  """

  alpha: float
  merge_strategy: str = "learned_with_images"
  switch_spatial_to_temporal_mix: bool = False

  @nn.compact
  def __call__(self, x_spatial, x_temporal, image_only_indicator=None):
    if self.merge_strategy not in MERGE_STRATEGIES:
      raise ValueError(
          f"Unknown merge_strategy {self.merge_strategy!r}; accepted: {MERGE_STRATEGIES}."
      )
    mix = self.param("mix_factor", lambda _, shape: jnp.full(shape, self.alpha, jnp.float32), (1,))
    if self.merge_strategy == "fixed":
      alpha = jax.lax.stop_gradient(mix)
    elif self.merge_strategy == "learned":
      alpha = jax.nn.sigmoid(mix)
    else:
      if image_only_indicator is None:
        raise ValueError(
            "merge_strategy 'learned_with_images' needs an image_only_indicator (B, F)."
        )
      alpha = jnp.where(image_only_indicator.reshape(-1).astype(bool), 1.0, jax.nn.sigmoid(mix))
      alpha = alpha.reshape((-1,) + (1,) * (x_spatial.ndim - 1))
    alpha = alpha.astype(x_spatial.dtype)
    if self.switch_spatial_to_temporal_mix:
      alpha = 1.0 - alpha
    # α·x_s + (1 − α)·x_t, written so that it is exactly x_s where α = 1 (image frames) or where
    # the paths agree (zero-initialised temporal layers): inflation then starts bit-exact.
    return x_spatial + (1.0 - alpha) * (x_temporal - x_spatial)


TEMPORAL_CONV_IMPLEMENTATIONS = ("shifted_matmul", "conv3d")


class TemporalConv(nn.Module):
  """A (k,1,1) convolution over frames with zero padding k//2, on (B, F, H, W, C).

  The kernel is stored as (k, 1, 1, C_in, C_out) (a Flax Conv3D kernel, the transpose of a
  PyTorch Conv3d weight). `implementation='shifted_matmul'` sums k shifted 1×1 matmuls, which
  XLA fuses well; 'conv3d' uses a 3-D convolution. Both compute the same function.
  """

  features: int
  kernel_size: int = 3
  implementation: str = "shifted_matmul"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if x.ndim != 5:
      raise ValueError(f"TemporalConv expects (B, F, H, W, C), got shape {x.shape}.")
    k = self.kernel_size
    kernel = self.param(
        "kernel",
        nn.initializers.lecun_normal(),
        (k, 1, 1, x.shape[-1], self.features),
        self.param_dtype,
    )
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    pad = k // 2
    if self.implementation == "shifted_matmul":
      frames = x.shape[1]
      xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0), (0, 0), (0, 0)))
      y = sum(
          jnp.einsum("bfhwc,cd->bfhwd", xp[:, i : i + frames], kernel[i, 0, 0]) for i in range(k)
      )
    elif self.implementation == "conv3d":
      y = jax.lax.conv_general_dilated(
          x,
          kernel,
          (1, 1, 1),
          ((pad, pad), (0, 0), (0, 0)),
          dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
      )
    else:
      raise ValueError(
          f"Unknown temporal conv implementation {self.implementation!r}; "
          f"accepted: {TEMPORAL_CONV_IMPLEMENTATIONS}."
      )
    return y + bias
