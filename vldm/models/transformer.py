"""The UNets' transformers: spatial (per frame) and, for video, temporal (per pixel over frames).

`Transformer2D` is diffusers' Transformer2DModel (continuous input) and, with `temporal=True`, its
TransformerSpatioTemporalModel: the same spatial path with a TemporalBasicTransformerBlock after
every spatial block, mixed back in by a learned α (Video LDM's temporal attention layers). One module,
so an image UNet's transformer weights drop into the video UNet unchanged.

Layouts: spatial attention runs on (B·F, H·W, C), temporal attention on (B·H·W, F, C).
Cross-attention groups queries by context: a context shared by all frames of a clip (B, L, D) is
attended once per clip with (B, F·H·W) queries instead of being repeated per frame (softmax is per
query, so this is exact), and the temporal blocks attend with (B, H·W·F) queries.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from vldm.models import layers

Dtype = layers.Dtype

# TextMotionEmbedding's sinusoid widths: of the frame index, and of the (x, y) position.
MOTION_FRAME_DIM, MOTION_SPACE_DIM = 8, 8

# Name given (jax.ad_checkpoint.checkpoint_name) to attention outputs, for remat policies.
ATTENTION_CHECKPOINT_NAME = "attention"


def attend_grouped(attention: nn.Module, x, context):
  """`attention(x, context)` with x (N, S, C) and context (M, L, D), N a multiple of M.

  Rows of x are grouped by the context they share: x[m·k : (m+1)·k] all attend to context[m].
  """
  n, m = x.shape[0], context.shape[0]
  if n == m:
    return attention(x, context)
  if n % m:
    raise ValueError(f"Cannot share {m} contexts among {n} query rows: {n} is not a multiple of {m}.")
  out = attention(x.reshape(m, (n // m) * x.shape[1], x.shape[2]), context)
  return out.reshape(x.shape[:2] + out.shape[-1:])


class BasicTransformerBlock(nn.Module):
  """diffusers BasicTransformerBlock (layer_norm): self-attention, cross-attention, GEGLU MLP.

  Pre-LN residual blocks: x += attn1(norm1 x); x += attn2(norm2 x, context); x += ff(norm3 x).
  `only_cross_attention`: attn1 attends to the context too. `double_self_attention`: attn2 is a
  second self-attention (no context; AnimateDiff's motion modules). `positions` (broadcasting to
  x), when given, are added to the normalised input of both attentions, as diffusers adds its
  sinusoidal `pos_embed`. x is (N, S, C); context (M, L, D).
  """
  num_attention_heads: int
  attention_head_dim: int
  only_cross_attention: bool = False
  double_self_attention: bool = False
  norm_eps: float = 1e-5
  attention_implementation: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, positions=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attention = lambda name: layers.Attention(
        self.num_attention_heads, self.attention_head_dim, name=name,
        attention_implementation=self.attention_implementation, **kw)
    norm = lambda name: layers.LayerNorm(self.norm_eps, name=name, **kw)
    place = lambda h: h if positions is None else h + positions
    h = place(norm("norm1")(x))
    if self.only_cross_attention:
      h = attend_grouped(attention("attn1"), h, context)
    else:
      h = attention("attn1")(h)
    x = x + checkpoint_name(h, ATTENTION_CHECKPOINT_NAME)
    h = place(norm("norm2")(x))
    if self.double_self_attention:
      h = attention("attn2")(h)
    else:
      h = attend_grouped(attention("attn2"), h, context)
    x = x + checkpoint_name(h, ATTENTION_CHECKPOINT_NAME)
    return x + layers.FeedForward(activation="geglu", name="ff", **kw)(norm("norm3")(x))


class TemporalBasicTransformerBlock(nn.Module):
  """diffusers TemporalBasicTransformerBlock: attention over frames at each pixel.

  x is (B·F, S, C) → (B·S, F, C); x = ff_in(norm_in x) + x; x += attn1(norm1 x);
  x += attn2(norm2 x, context); x += ff(norm3 x); back to (B·F, S, C). `context` is (B, L, D)
  (SVD: the first frame's encoder_hidden_states).
  """
  num_attention_heads: int
  attention_head_dim: int
  norm_eps: float = 1e-5
  attention_implementation: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, num_frames: int, context):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attention = lambda name: layers.Attention(
        self.num_attention_heads, self.attention_head_dim, name=name,
        attention_implementation=self.attention_implementation, **kw)
    norm = lambda name: layers.LayerNorm(self.norm_eps, name=name, **kw)
    batch_frames, tokens, channels = x.shape
    batch = batch_frames // num_frames
    x = x.reshape(batch, num_frames, tokens, channels).transpose(0, 2, 1, 3)
    x = x.reshape(batch * tokens, num_frames, channels)
    x = x + layers.FeedForward(activation="geglu", name="ff_in", **kw)(norm("norm_in")(x))
    h = attention("attn1")(norm("norm1")(x))
    x = x + checkpoint_name(h, ATTENTION_CHECKPOINT_NAME)
    h = attend_grouped(attention("attn2"), norm("norm2")(x), context)
    x = x + checkpoint_name(h, ATTENTION_CHECKPOINT_NAME)
    x = x + layers.FeedForward(activation="geglu", name="ff", **kw)(norm("norm3")(x))
    x = x.reshape(batch, tokens, num_frames, channels).transpose(0, 2, 1, 3)
    return x.reshape(batch_frames, tokens, channels)


class TextMotionEmbedding(nn.Module):
  """A per-clip position embedding of (frame, x, y) that depends on the text: (B, F, H·W, C).

  Trilinear in sinusoid(frame) ⊗ sinusoid(x, y) ⊗ text (plus a frame ⊗ text term), with text the
  context's last token (causal CLIP's last token has seen the whole prompt; SVD's context is one
  token). Why: a prompt such as "moving left" decides *where* the object is at *which* frame. The
  frame and position embeddings alone make that a product the temporal blocks must learn from
  separate factors, and at the start of training the gradient toward any one factor is zero (the
  text-free mean clip does not depend on the frame); this term is the product itself. Zero at
  init, like every non-kernel leaf of the recipes' host init: it grows from the data once the
  temporal blocks' zero-initialised outputs do. vldm's own option: diffusers'
  TransformerSpatioTemporalModel has no counterpart.
  """
  features: int
  frame_dim: int = MOTION_FRAME_DIM
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, text, frames: int, height: int, width: int):
    text_dim = text.shape[-1]
    frame = layers.timestep_embedding(jnp.arange(frames), self.frame_dim, flip_sin_to_cos=True)
    space = _space_sinusoids(height, width)
    frame_text = self.param("frame_text", nn.initializers.zeros,
                            (self.frame_dim, text_dim, self.features), self.param_dtype)
    frame_space_text = self.param("frame_space_text", nn.initializers.zeros,
                                  (self.frame_dim, space.shape[-1], text_dim, self.features),
                                  self.param_dtype)
    text, frame, space, frame_text, frame_space_text = nn.dtypes.promote_dtype(
        text, frame, space, frame_text, frame_space_text, dtype=self.dtype)
    # Contract the text first: the (F, H·W) grid then meets a (B, frame_dim, space, C) tensor.
    per_clip = jnp.einsum("bd,fsdc->bfsc", text, frame_space_text)
    out = jnp.einsum("if,js,bfsc->bijc", frame, space, per_clip)
    return out + jnp.einsum("if,bd,fdc->bic", frame, text, frame_text)[:, :, None, :]


def _space_sinusoids(height: int, width: int):
  """sin and cos of π·x and 2π·x for x, y in (0, 1) at pixel centres: (H·W, MOTION_SPACE_DIM)."""
  y, x = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width,
                     indexing="ij")
  angles = np.stack([np.pi * x, np.pi * y, 2 * np.pi * x, 2 * np.pi * y], -1).reshape(-1, 4)
  return jnp.asarray(np.concatenate([np.sin(angles), np.cos(angles)], -1), jnp.float32)


class Transformer2D(nn.Module):
  """diffusers Transformer2DModel; with `temporal=True`, TransformerSpatioTemporalModel.

  GroupNorm(eps 1e-6) → proj_in (1×1 conv, or Linear with `use_linear_projection`) → blocks →
  proj_out → + residual. Heads: `num_attention_heads` of width C // heads.
  Temporal: after each spatial block k, x_mix = x + time_pos_embed(frame index);
  x_mix = temporal_transformer_blocks.k(x_mix); x = time_mixer(x, x_mix) (one α for all layers).
  `text_motion_embedding` adds `TextMotionEmbedding` to x_mix's frame position embedding.

  Call: `(x[N, H, W, C], context[M, L, D], image_only_indicator[B, F] or None)` with N = B·F; the
  context is per image (M = N) or per clip (M = B).
  """
  num_attention_heads: int
  num_layers: int = 1
  norm_num_groups: int = 32
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  temporal: bool = False
  merge_factor: float = 0.5
  merge_strategy: str = "learned_with_images"
  text_motion_embedding: bool = False
  attention_implementation: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, image_only_indicator=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n, height, width, channels = x.shape
    head_dim = channels // self.num_attention_heads
    inner = self.num_attention_heads * head_dim
    if self.use_linear_projection:
      projection = lambda features, name: nn.Dense(features, name=name, **kw)
    else:
      projection = lambda features, name: layers.conv(features, 1, name=name, **kw)
    block_kw = dict(attention_implementation=self.attention_implementation, **kw)

    residual = x
    h = layers.GroupNorm(self.norm_num_groups, 1e-6, name="norm", **kw)(x)
    h = projection(inner, "proj_in")(h).reshape(n, height * width, inner)
    if self.temporal:
      if image_only_indicator is None or image_only_indicator.ndim != 2:
        raise ValueError("The spatio-temporal transformer needs image_only_indicator (B, F).")
      if inner != channels:
        raise ValueError(f"The spatio-temporal transformer needs channels ({channels}) divisible by "
                         f"its {self.num_attention_heads} heads.")
      batch, frames = image_only_indicator.shape
      # Frame positions: sinusoidal embedding of 0..F-1 through a 2-layer MLP (C → 4C → C).
      positions = layers.timestep_embedding(jnp.arange(frames), channels, flip_sin_to_cos=True)
      positions = layers.TimestepEmbedding(4 * channels, out_dim=channels, name="time_pos_embed",
                                           **kw)(positions.astype(self.dtype))
      positions = jnp.tile(positions, (batch, 1))[:, None, :]
      # The temporal blocks attend to the first frame's context.
      time_context = context
      if context.shape[0] == n:
        time_context = context.reshape((batch, frames) + context.shape[1:])[:, 0]
      if self.text_motion_embedding:
        motion = TextMotionEmbedding(channels, name="text_motion_embed", **kw)(
            time_context[:, -1], frames, height, width)
        positions = positions + motion.reshape(n, height * width, channels)
      mixer = layers.AlphaBlender(self.merge_factor, merge_strategy=self.merge_strategy,
                                  name="time_mixer")
    for k in range(self.num_layers):
      h = BasicTransformerBlock(self.num_attention_heads, head_dim, self.only_cross_attention,
                                name=f"transformer_blocks_{k}", **block_kw)(h, context)
      if self.temporal:
        h_mix = TemporalBasicTransformerBlock(
            self.num_attention_heads, head_dim, name=f"temporal_transformer_blocks_{k}",
            **block_kw)(h + positions, frames, time_context)
        h = mixer(h, h_mix, image_only_indicator)
    h = h.reshape(n, height, width, inner)
    return projection(channels, "proj_out")(h) + residual
