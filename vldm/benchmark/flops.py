"""Analytic FLOP counts of vldm's UNets, autoencoders and CLIP encoders, and two graph counters.

FLOPs are 2 × multiply-accumulates of the convolutions, the dense layers (projections, MLPs) and
attention (QKᵀ and AV), the work that dominates these models; norms, activations, softmax and adds
are left out. Counts come from the module's configuration alone (no parameters are built), so the
full-size models cost nothing to count:

  unet_flops(UNet(...), height=64, width=64, context_length=77).total      # SD 1.5: 0.80 TFLOPs
  unet_flops(svd_unet, height=72, width=128, frames=14, context_length=1)  # SVD: 44.8 TFLOPs

Each count is a `Flops` (FLOPs by kind: 'conv', 'linear', 'attention'). A convolution's count is
nominal (every kernel tap, as papers and profilers count it). `exclude_padding=True` counts what the
program multiplies, as XLA's cost analysis does: a convolution op skips the taps that land in its
zero padding, but the implementations that materialise the padding and multiply it are counted in
full (the im2col matmul of small inputs, `layers.conv_as_matmul`, and the shifted-matmul temporal
convolution).

Two counters of real graphs check the analytic ones:
  `jaxpr_flops(fn, *args)`    the dot_general and conv_general_dilated ops of the traced program;
  `compiled_flops(fn, *args)` `jax.jit(fn).lower(*args).compile().cost_analysis()['flops']`
                              (everything XLA runs, elementwise ops included; best-effort).
A training step costs about 3 × the forward (`TRAIN_FACTOR`) when every weight trains;
`unet_training_flops` counts a step where only some do (Video LDM's video stage: spatial layers
frozen, temporal layers trained), op by op:

  step = Σ_ops F_op · (1 + g_in + g_w)

F_op the op's forward FLOPs; g_in = 1 when its input depends on a trained weight (the gradient
flows back through it: dx, one product of F_op's size), g_w = 1 when its weights train (dW, one
more). Attention's two products count their operands so: backward = F/2 · ([q or kv] + [q] + 2·[kv])
(dP, dQ, dK and dV), i.e. 2·F for self-attention after a trained layer and F for cross-attention
to a context that no trained weight touches. With the spatial layers frozen, the ops before the
first temporal layer (conv_in, the time embedding, the first spatial res block) have no backward,
the spatial layers after it have dx only, the temporal ones dx and dW, and the spatial
cross-attention's K/V projections of the (frozen, precomputed) text context none.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import numpy as np

from vldm.models import layers
from vldm.models import transformer
from vldm.models import unet as unet_lib

# Forward + backward (two matmuls per forward one) ≈ 3 × the forward's FLOPs.
TRAIN_FACTOR = 3
KINDS = ("conv", "linear", "attention")
# Temporal convolution implementations that multiply their zero-padded frames too.
_TEMPORAL_CONV_MULTIPLIES_PADDING = {"shifted_matmul": True, "conv3d": False}


@dataclasses.dataclass
class Flops:
  """FLOP counts by kind ('conv', 'linear', 'attention') and by part of the model.

  `by_part` files the same FLOPs under a descriptive name ('spatial_res', 'temporal_attention', …)
  so that a profile can say where the work is.
  """

  by_kind: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  by_part: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  @property
  def total(self) -> float:
    return float(sum(self.by_kind.values()))

  def add(self, kind: str, part: str, flops: float) -> None:
    if kind not in KINDS:
      raise ValueError(f"Unknown FLOP kind {kind!r}; accepted: {KINDS}.")
    self.by_kind[kind] += flops
    self.by_part[part] += flops

  def __add__(self, other: "Flops") -> "Flops":
    return Flops(self.by_kind + other.by_kind, self.by_part + other.by_part)

  def scaled(self, factor: float) -> "Flops":
    return Flops(
        collections.Counter({k: v * factor for k, v in self.by_kind.items()}),
        collections.Counter({k: v * factor for k, v in self.by_part.items()}),
    )

  def fractions(self, by: str = "kind") -> dict:
    counts = self.by_kind if by == "kind" else self.by_part
    return {k: v / self.total for k, v in sorted(counts.items())}

  def as_dict(self) -> dict:
    return {"total": self.total, **{k: float(v) for k, v in sorted(self.by_kind.items())}}


# ---------------------------------------------------------------------------------- primitives


def _valid_taps(size: int, kernel: int, stride: int, pad: int) -> int:
  """Kernel taps, summed over one axis's output positions, that fall inside the input."""
  out = (size + 2 * pad - kernel) // stride + 1
  return sum(sum(1 for k in range(kernel) if 0 <= o * stride - pad + k < size) for o in range(out))


class _Counter:
  """Adds primitive layer costs to a `Flops`; `exclude_padding` as in the module docstring.

  With `trainable` (a predicate on part names: do that part's weights train?) it also counts the
  backward pass into `backward`, following which activations depend on a trained weight (the
  module docstring's formula): `flowing` says whether the running activation does. Each primitive
  takes `grad_in` (does its input carry a gradient? None: the running activation's `flowing`; False
  for side inputs such as the text context) and `train` (None: `trainable(part)`).
  """

  def __init__(
      self,
      exclude_padding: bool = False,
      temporal_conv_implementation: str = "shifted_matmul",
      trainable: Optional[Callable[[str], bool]] = None,
  ):
    if temporal_conv_implementation not in _TEMPORAL_CONV_MULTIPLIES_PADDING:
      raise ValueError(
          f"Unknown temporal conv implementation {temporal_conv_implementation!r}; "
          f"accepted: {tuple(_TEMPORAL_CONV_MULTIPLIES_PADDING)}."
      )
    self.flops = Flops()
    self.backward = Flops()
    self.trainable = trainable
    self.flowing = False
    self.exclude_padding = exclude_padding
    self.temporal_padding_multiplied = _TEMPORAL_CONV_MULTIPLIES_PADDING[
        temporal_conv_implementation
    ]

  def trains(self, part: str) -> bool:
    return bool(self.trainable and self.trainable(part))

  def _add(
      self, kind: str, part: str, flops: float, grad_in: Optional[bool], train: Optional[bool]
  ) -> bool:
    """One product of weights (or constants) and an activation: forward, then dx and dW.

    Returns whether its output carries a gradient. An op on the running activation (`grad_in`
    None) updates `flowing`; a side op (explicit `grad_in`) leaves it to the caller, who knows
    where its output joins the main path.
    """
    self.flops.add(kind, part, flops)
    if self.trainable is None:
      return False
    main = grad_in is None
    grad_in = self.flowing if main else grad_in
    train = self.trains(part) if train is None else train
    if grad_in or train:
      self.backward.add(kind, part, (int(grad_in) + int(train)) * flops)
    if main:
      self.flowing = bool(grad_in or train)
    return bool(grad_in or train)

  def norm(self, part: str) -> None:
    """A norm with a scale and bias (no FLOPs counted): its output carries a gradient when they
    train, even if its input does not."""
    if self.trains(part):
      self.flowing = True

  def conv(
      self,
      part: str,
      n: int,
      h: int,
      w: int,
      cin: int,
      cout: int,
      kernel: int = 3,
      stride: int = 1,
      pad: Optional[int] = None,
      kind: str = "conv",
      grad_in: Optional[bool] = None,
      train: Optional[bool] = None,
  ) -> tuple[int, int]:
    """A square 2-D conv on n images of h×w (torch padding, default kernel // 2) → (h', w')."""
    pad = kernel // 2 if pad is None else pad
    ho, wo = (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1
    if self.exclude_padding and not layers.conv_as_matmul(h, w, kernel, stride, pad):
      taps = _valid_taps(h, kernel, stride, pad) * _valid_taps(w, kernel, stride, pad)
    else:
      taps = ho * wo * kernel * kernel
    self._add(kind, part, 2.0 * n * taps * cin * cout, grad_in, train)
    return ho, wo

  def temporal_conv(
      self,
      part: str,
      batch: int,
      frames: int,
      pixels: int,
      cin: int,
      cout: int,
      kernel: int = 3,
      grad_in: Optional[bool] = None,
  ):
    """A (k,1,1) conv over frames with zero padding k//2, on (B, F, pixels, C)."""
    taps = (
        _valid_taps(frames, kernel, 1, kernel // 2)
        if self.exclude_padding and not self.temporal_padding_multiplied
        else frames * kernel
    )
    self._add("conv", part, 2.0 * batch * pixels * taps * cin * cout, grad_in, None)

  def dense(
      self,
      part: str,
      tokens: int,
      din: int,
      dout: int,
      grad_in: Optional[bool] = None,
      train: Optional[bool] = None,
  ) -> bool:
    return self._add("linear", part, 2.0 * tokens * din * dout, grad_in, train)

  def attention(
      self,
      part: str,
      batch: int,
      tq: int,
      tk: int,
      width: int,
      q_grad: Optional[bool] = None,
      kv_grad: Optional[bool] = None,
  ):
    """QKᵀ and AV for all heads: width = heads × head_dim. `q_grad` / `kv_grad`: whether the
    queries / keys and values carry a gradient (None: the running activation's `flowing`)."""
    flops = 4.0 * batch * tq * tk * width
    self.flops.add("attention", part, flops)
    if self.trainable is None:
      return
    q = self.flowing if q_grad is None else q_grad
    kv = q if kv_grad is None else kv_grad
    products = int(q or kv) + int(q) + 2 * int(kv)  # dP, dQ, dK and dV, each F/2
    if products:
      self.backward.add("attention", part, products * flops / 2)
    self.flowing = bool(q or kv)  # the attention output continues the main path

  def attention_layer(
      self,
      part: str,
      rows: int,
      tq: int,
      width: int,
      kv_rows: int,
      tk: int,
      kv_width: int,
      out_width: Optional[int] = None,
      query_width=None,
      cross: bool = False,
  ):
    """q/k/v/out projections + attention. `rows` query groups of tq tokens; `kv_rows` groups of
    tk context tokens (kv_rows divides rows: groups share their context, as vldm batches it).
    `cross`: keys and values come from the context (no gradient flows into it)."""
    query_width = query_width or width
    grad_in = self.flowing
    q = self.dense(part, rows * tq, query_width, width)
    kv = self.dense(part, 2 * kv_rows * tk, kv_width, width, grad_in=not cross and grad_in)
    self.attention(part, kv_rows, (rows // kv_rows) * tq, tk, width, q_grad=q, kv_grad=kv)
    self.dense(part, rows * tq, width, out_width or query_width)

  def geglu(self, part: str, tokens: int, dim: int, mult: int = 4):
    self.dense(part, tokens, dim, 2 * mult * dim)
    self.dense(part, tokens, mult * dim, dim)


# ---------------------------------------------------------------------------------------- UNet


def _resnet(
    c: _Counter,
    part: str,
    n: int,
    h: int,
    w: int,
    cin: int,
    cout: int,
    temb_dim: Optional[int],
    temb_grad: bool = False,
):
  """ResnetBlock2D on n images: conv1, (time_emb_proj), conv2, (1×1 shortcut).
  `temb_grad`: whether the time embedding carries a gradient (training counts)."""
  x_grad = c.flowing
  c.norm(part)
  c.conv(part, n, h, w, cin, cout)
  if temb_dim and c.dense(part, n, temb_dim, cout, grad_in=temb_grad):
    c.flowing = True  # added to the conv's output
  c.norm(part)
  c.conv(part, n, h, w, cout, cout)
  if cin != cout:
    c.conv(part, n, h, w, cin, cout, kernel=1, grad_in=x_grad)


def _temporal_resnet(
    c: _Counter,
    part: str,
    batch: int,
    frames: int,
    pixels: int,
    channels: int,
    temb_dim: Optional[int],
    temb_grad: bool = False,
):
  """TemporalResnetBlock (channels unchanged): two (3,1,1) convs and the time projection."""
  c.norm(part)
  c.temporal_conv(part, batch, frames, pixels, channels, channels)
  if temb_dim and c.dense(part, batch * frames, temb_dim, channels, grad_in=temb_grad):
    c.flowing = True
  c.norm(part)
  c.temporal_conv(part, batch, frames, pixels, channels, channels)


def _unet_resnet(
    c: _Counter,
    unet,
    batch: int,
    frames: int,
    h: int,
    w: int,
    cin: int,
    cout: int,
    temb_dim: int,
    temb_grad: bool = False,
):
  _resnet(c, "spatial_res", batch * frames, h, w, cin, cout, temb_dim, temb_grad)
  if unet.temporal:
    before = c.flowing  # the spatial path, blended with the temporal one by α
    _temporal_resnet(c, "temporal_res", batch, frames, h * w, cout, temb_dim, temb_grad)
    c.flowing = c.flowing or before or c.trains("temporal_res")


def _unet_transformer(
    c: _Counter,
    unet,
    batch: int,
    frames: int,
    h: int,
    w: int,
    channels: int,
    heads: int,
    num_layers: int,
    only_cross: bool,
    context_length: int,
    context_dim: int,
    per_frame_context: bool,
):
  n, tokens = batch * frames, h * w
  width = heads * (channels // heads)
  ctx_rows = n if per_frame_context else batch
  project = (
      (lambda part, cin, cout: c.dense(part, n * tokens, cin, cout))
      if unet.use_linear_projection
      else (lambda part, cin, cout: c.conv(part, n, h, w, cin, cout, kernel=1, kind="linear"))
  )
  c.norm("spatial_attention")
  project("spatial_attention", channels, width)
  positions_grad = False  # whether the frame positions added before each temporal block do
  if unet.temporal:  # frame position MLP, on the F frame indices
    hidden = c.dense("temporal_attention", frames, width, 4 * width, grad_in=False)
    positions_grad = c.dense("temporal_attention", frames, 4 * width, width, grad_in=hidden)
  if unet.text_motion_embedding:  # text contracted per clip, then frame, then the H·W positions
    fdim, sdim = transformer.MOTION_FRAME_DIM, transformer.MOTION_SPACE_DIM
    per_clip = c.dense(
        "temporal_attention", batch, context_dim, fdim * (sdim + 1) * channels, grad_in=False
    )
    # The frame and position sinusoids are constants: only the per-clip tensor's gradient.
    c.dense(
        "temporal_attention",
        batch * frames,
        fdim * (sdim + 1),
        channels,
        grad_in=per_clip,
        train=False,
    )
    c.dense(
        "temporal_attention", batch * frames * tokens, sdim, channels, grad_in=per_clip, train=False
    )
    positions_grad = positions_grad or per_clip
  for _ in range(num_layers):
    c.norm("spatial_attention")
    if only_cross:
      c.attention_layer(
          "spatial_attention", n, tokens, width, ctx_rows, context_length, context_dim, cross=True
      )
    else:
      c.attention_layer("spatial_attention", n, tokens, width, n, tokens, width)
    c.norm("spatial_attention")
    c.attention_layer(
        "spatial_attention", n, tokens, width, ctx_rows, context_length, context_dim, cross=True
    )
    c.norm("spatial_feed_forward")
    c.geglu("spatial_feed_forward", n * tokens, width)
    if unet.temporal:  # per pixel over frames; cross-attends to the first frame's context (B rows)
      before = c.flowing  # the spatial path, blended with the temporal one by α
      c.flowing = c.flowing or positions_grad
      rows = batch * tokens
      c.norm("temporal_feed_forward")
      c.geglu("temporal_feed_forward", rows * frames, width)
      c.norm("temporal_attention")
      c.attention_layer("temporal_attention", rows, frames, width, rows, frames, width)
      c.norm("temporal_attention")
      c.attention_layer(
          "temporal_attention", rows, frames, width, batch, context_length, context_dim, cross=True
      )
      c.norm("temporal_feed_forward")
      c.geglu("temporal_feed_forward", rows * frames, width)
      c.flowing = c.flowing or before or c.trains("temporal_attention")  # α is a temporal weight
  project("spatial_attention", width, channels)


def unet_flops(
    unet,
    height: int,
    width: int,
    *,
    batch: int = 1,
    frames: int = 1,
    context_length: int = 77,
    per_frame_context: bool = False,
    exclude_padding: bool = False,
) -> Flops:
  """Forward FLOPs of a `vldm.models.unet.UNet` on latents (batch, [frames,] height, width).

  `context_length` is the number of encoder_hidden_states tokens (77 for CLIP text, 1 for SVD's
  image embedding); `per_frame_context`: a (B, F, L, D) context instead of one per clip.
  """
  c = _Counter(exclude_padding, unet.temporal_conv_implementation)
  _count_unet(c, unet, height, width, batch, frames, context_length, per_frame_context)
  return c.flops


# Which weights train, by the counter's part names: the video stage's temporal layers are those
# `vldm.models.inflate.is_temporal` names (temporal res blocks and transformer blocks, frame
# position MLPs, α blenders, added-time-ids embedding).
TRAINABLE = {
    "all": lambda part: True,
    "temporal": lambda part: part.startswith("temporal_") or part == "add_embedding",
    # + the input conv (counted with the output conv: both are "conv_in_out")
    "temporal_and_input": lambda part: (
        part.startswith("temporal_") or part in ("add_embedding", "conv_in_out")
    ),
}


def unet_training_flops(
    unet,
    height: int,
    width: int,
    *,
    batch: int = 1,
    frames: int = 1,
    context_length: int = 77,
    per_frame_context: bool = False,
    exclude_padding: bool = False,
    trainable="temporal",
) -> Flops:
  """Model FLOPs of a training step (forward + backward, no recomputation) of a UNet whose
  `trainable` weights alone get gradients: 'temporal' (Video LDM's video stage: spatial layers
  frozen), 'all', or a predicate on part names. The module docstring gives the formula; the loss
  and the optimizer update are elementwise and not counted. The conditioning context is taken
  as an input (a frozen text encoder's output): no gradient flows into it.
  """
  predicate = TRAINABLE[trainable] if isinstance(trainable, str) else trainable
  c = _Counter(exclude_padding, unet.temporal_conv_implementation, trainable=predicate)
  _count_unet(c, unet, height, width, batch, frames, context_length, per_frame_context)
  return c.flops + c.backward


def _count_unet(
    c: _Counter,
    unet,
    height: int,
    width: int,
    batch: int,
    frames: int,
    context_length: int,
    per_frame_context: bool,
) -> None:
  unet.check_config()
  # A wrong count would pass for a right one.
  if getattr(unet, "has_motion_modules", False) or getattr(unet, "is_modelscope", False):
    raise NotImplementedError("The analytic FLOP count covers image UNets and Video LDM / SVD "
                              "alignment layers, not AnimateDiff's motion modules or ModelScope's "
                              "temporal layers.")
  factor = 2 ** (unet.num_levels - 1)
  if height % factor or width % factor:
    raise ValueError(f"height and width ({height}, {width}) must be divisible by {factor}.")
  frames = frames if unet.temporal else 1
  n = batch * frames
  channels = tuple(unet.block_out_channels)
  heads = unet.per_level("num_attention_heads")
  num_layers = unet.per_level("layers_per_block")
  transformer_layers = unet.per_level("transformer_layers_per_block")
  only_cross = unet.per_level("only_cross_attention")
  temb_dim = 4 * channels[0]
  # The time embedding of the timesteps (no gradient comes in), and SVD's added time ids.
  hidden = c.dense("embedding", batch, channels[0], temb_dim, grad_in=False)
  temb_grad = c.dense("embedding", batch, temb_dim, temb_dim, grad_in=hidden)
  if unet.num_time_ids:
    train = c.trains("add_embedding")
    hidden = c.dense(
        "embedding",
        batch,
        unet.projection_class_embeddings_input_dim,
        temb_dim,
        grad_in=False,
        train=train,
    )
    temb_grad = (
        c.dense("embedding", batch, temb_dim, temb_dim, grad_in=hidden, train=train) or temb_grad
    )
  resnet = lambda h, w, cin, cout: _unet_resnet(
      c, unet, batch, frames, h, w, cin, cout, temb_dim, temb_grad
  )
  transformer = lambda h, w, ch, level, layers, cross: _unet_transformer(
      c,
      unet,
      batch,
      frames,
      h,
      w,
      ch,
      heads[level],
      layers,
      cross,
      context_length,
      unet.context_dim,
      per_frame_context,
  )

  h, w = height, width
  c.flowing = False  # the noisy latents: data
  c.conv("conv_in_out", n, h, w, unet.in_channels, channels[0])
  skips = [channels[0]]
  cin = channels[0]
  for i, block_type in enumerate(unet.down_block_types):
    for _ in range(num_layers[i]):
      resnet(h, w, cin, channels[i])
      cin = channels[i]
      if unet_lib.DOWN_BLOCK_TYPES[block_type]:
        transformer(h, w, cin, i, transformer_layers[i], only_cross[i])
      skips.append(cin)
    if i < unet.num_levels - 1:
      h, w = c.conv("sampling", n, h, w, cin, cin, stride=2, pad=unet.downsample_padding)
      skips.append(cin)

  resnet(h, w, cin, cin)
  transformer(h, w, cin, unet.num_levels - 1, transformer_layers[-1], False)
  resnet(h, w, cin, cin)

  for i, block_type in enumerate(unet.up_block_types):
    level = unet.num_levels - 1 - i
    for _ in range(num_layers[level] + 1):
      # The concatenated skip may carry no gradient (conv_in's), but dx is computed for the whole
      # concatenated input.
      resnet(h, w, cin + skips.pop(), channels[level])
      cin = channels[level]
      if unet_lib.UP_BLOCK_TYPES[block_type]:
        transformer(h, w, cin, level, transformer_layers[level], only_cross[level])
    if i < unet.num_levels - 1:
      h, w = 2 * h, 2 * w
      c.conv("sampling", n, h, w, cin, cin)
  c.norm("conv_in_out")
  c.conv("conv_in_out", n, h, w, cin, unet.out_channels)


# --------------------------------------------------------------------------------- autoencoders


def _vae_attention(c: _Counter, n: int, h: int, w: int, channels: int):
  """The mid-block attention: one head over h·w tokens, q/k/v/out projections."""
  c.attention_layer("attention", n, h * w, channels, n, h * w, channels)


def _encoder(c: _Counter, vae, n: int, h: int, w: int, mid_attention: bool) -> tuple[int, int]:
  channels = tuple(vae.block_out_channels)
  c.conv("encoder", n, h, w, vae.in_channels, channels[0])
  cin = channels[0]
  for i, ch in enumerate(channels):
    for _ in range(vae.layers_per_block):
      _resnet(c, "encoder", n, h, w, cin, ch, None)
      cin = ch
    if i < len(channels) - 1:  # (0,1,0,1) pad, then a padding-0 stride-2 conv
      h, w = c.conv("encoder", n, h + 1, w + 1, cin, cin, stride=2, pad=0)
  _resnet(c, "encoder", n, h, w, cin, cin, None)
  if mid_attention:
    _vae_attention(c, n, h, w, cin)
  _resnet(c, "encoder", n, h, w, cin, cin, None)
  c.conv("encoder", n, h, w, cin, 2 * vae.latent_channels)
  return h, w


def _decoder_resnet(
    c, temporal: bool, batch: int, frames: int, h: int, w: int, cin: int, cout: int
):
  _resnet(c, "decoder", batch * frames, h, w, cin, cout, None)
  if temporal:
    _temporal_resnet(c, "decoder_temporal", batch, frames, h * w, cout, None)


def _decoder(c: _Counter, vae, batch: int, frames: int, h: int, w: int, temporal: bool):
  """The decoder on `batch` clips of `frames` latents (the 2-D decoder: frames = 1)."""
  channels = tuple(vae.block_out_channels)
  n = batch * frames
  cin = channels[-1]
  c.conv("decoder", n, h, w, vae.latent_channels, cin)
  _decoder_resnet(c, temporal, batch, frames, h, w, cin, cin)
  if temporal:  # diffusers applies the attention and resnets.1 only with ≥ 2 layers
    if vae.layers_per_block >= 2:
      _vae_attention(c, n, h, w, cin)
      _decoder_resnet(c, temporal, batch, frames, h, w, cin, cin)
  else:
    if vae.mid_block_add_attention:
      _vae_attention(c, n, h, w, cin)
    _decoder_resnet(c, temporal, batch, frames, h, w, cin, cin)
  for i, ch in enumerate(reversed(channels)):
    for _ in range(vae.layers_per_block + 1):
      _decoder_resnet(c, temporal, batch, frames, h, w, cin, ch)
      cin = ch
    if i < len(channels) - 1:
      h, w = 2 * h, 2 * w
      c.conv("decoder", n, h, w, cin, cin)
  c.conv("decoder", n, h, w, cin, vae.out_channels)
  if temporal:
    c.temporal_conv("decoder_temporal", batch, frames, h * w, vae.out_channels, vae.out_channels)


def autoencoder_flops(
    vae,
    height: int,
    width: int,
    *,
    batch: int = 1,
    frames: int = 1,
    part: str = "decode",
    exclude_padding: bool = False,
) -> Flops:
  """Forward FLOPs of an `AutoencoderKL` / `AutoencoderKLTemporalDecoder` at image size
  height × width (pixels). `part`: 'encode', 'decode' or 'both'. `frames` multiplies the encoder's
  images and is the clip length of the temporal decoder (frames are decoded jointly)."""
  if part not in ("encode", "decode", "both"):
    raise ValueError(f"part must be 'encode', 'decode' or 'both', got {part!r}.")
  vae.check_config()
  temporal = type(vae).__name__ == "AutoencoderKLTemporalDecoder"
  factor = 2 ** (len(vae.block_out_channels) - 1)
  if height % factor or width % factor:
    raise ValueError(f"height and width ({height}, {width}) must be divisible by {factor}.")
  c = _Counter(exclude_padding, getattr(vae, "temporal_conv_implementation", "conv3d"))
  n = batch * frames
  h, w = height // factor, width // factor
  mid_attention = True if temporal else vae.mid_block_add_attention
  if part in ("encode", "both"):
    _encoder(c, vae, n, height, width, mid_attention)
    if temporal or vae.use_quant_conv:
      c.conv("encoder", n, h, w, 2 * vae.latent_channels, 2 * vae.latent_channels, kernel=1)
  if part in ("decode", "both"):
    if not temporal and vae.use_post_quant_conv:
      c.conv("decoder", n, h, w, vae.latent_channels, vae.latent_channels, kernel=1)
    if temporal:
      _decoder(c, vae, batch, frames, h, w, True)
    else:
      _decoder(c, vae, n, 1, h, w, False)
  return c.flops


# ---------------------------------------------------------------------------------------- CLIP


def _clip_layers(c: _Counter, batch: int, tokens: int, width: int, intermediate: int, layers: int):
  for _ in range(layers):
    c.attention_layer("attention", batch, tokens, width, batch, tokens, width)
    c.dense("mlp", batch * tokens, width, intermediate)
    c.dense("mlp", batch * tokens, intermediate, width)


def clip_text_flops(clip, *, batch: int = 1, length: Optional[int] = None) -> Flops:
  """Forward FLOPs of a CLIPTextModel(WithProjection) on `length` tokens (default: all positions).
  The causal mask hides half the scores but XLA computes them all; they are counted."""
  length = clip.max_position_embeddings if length is None else length
  c = _Counter()
  _clip_layers(c, batch, length, clip.hidden_size, clip.intermediate_size, clip.num_hidden_layers)
  if hasattr(clip, "projection_dim") and type(clip).__name__.endswith("WithProjection"):
    c.dense("projection", batch, clip.hidden_size, clip.projection_dim)
  return c.flops


def clip_vision_flops(clip, *, batch: int = 1) -> Flops:
  """Forward FLOPs of a CLIPVisionModelWithProjection (SVD's image encoder)."""
  c = _Counter()
  grid = clip.image_size // clip.patch_size
  c.conv(
      "patch_embedding",
      batch,
      clip.image_size,
      clip.image_size,
      clip.num_channels,
      clip.hidden_size,
      kernel=clip.patch_size,
      stride=clip.patch_size,
      pad=0,
  )
  _clip_layers(
      c, batch, grid * grid + 1, clip.hidden_size, clip.intermediate_size, clip.num_hidden_layers
  )
  c.dense("projection", batch, clip.hidden_size, clip.projection_dim)
  return c.flops


# ------------------------------------------------------------------------------- graph counters


def _dot_flops(eqn) -> tuple[str, float]:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
  contract = math.prod(lhs[d] for d in lc)
  batch = math.prod(lhs[d] for d in lb)
  free_l = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
  free_r = math.prod(
      s for d, s in enumerate(rhs) if d not in rc and d not in eqn.params["dimension_numbers"][1][1]
  )
  # Batched products of two activations are attention (QKᵀ, AV); the rest are layers' weights.
  return ("attention" if lb else "linear"), 2.0 * batch * contract * free_l * free_r


def _conv_flops(eqn, exclude_padding: bool) -> float:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  out = eqn.outvars[0].aval.shape
  dn = eqn.params["dimension_numbers"]
  spatial_out = [out[d] for d in dn.out_spec[2:]]
  kernel = [rhs[d] for d in dn.rhs_spec[2:]]
  in_features = rhs[dn.rhs_spec[1]]
  out_features = out[dn.out_spec[1]]
  batch = out[dn.out_spec[0]]
  if exclude_padding:
    strides, padding = eqn.params["window_strides"], eqn.params["padding"]
    if any(d != 1 for d in eqn.params["lhs_dilation"] + eqn.params["rhs_dilation"]):
      raise ValueError("exclude_padding is implemented for undilated convolutions only.")
    taps = math.prod(
        _valid_taps(lhs[d], k, s, lo)
        for d, k, s, (lo, _) in zip(dn.lhs_spec[2:], kernel, strides, padding)
    )
  else:
    taps = math.prod(spatial_out) * math.prod(kernel)
  return 2.0 * batch * taps * in_features * out_features


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for item in (value if isinstance(value, (tuple, list)) else (value,)):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _count_jaxpr(jaxpr, flops: Flops, scale: float, exclude_padding: bool):
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      kind, n = _dot_flops(eqn)
      flops.add(kind, kind, scale * n)
    elif name == "conv_general_dilated":
      flops.add("conv", "conv", scale * _conv_flops(eqn, exclude_padding))
    elif name == "cond":  # count the most expensive branch
      counts = []
      for branch in eqn.params["branches"]:
        sub = Flops()
        _count_jaxpr(branch.jaxpr, sub, scale, exclude_padding)
        counts.append(sub)
      best = max(counts, key=lambda f: f.total)
      flops.by_kind.update(best.by_kind)
      flops.by_part.update(best.by_part)
    elif name == "while":
      raise ValueError("jaxpr_flops cannot count a while loop (unknown trip count); use scan.")
    else:
      inner = scale * (eqn.params["length"] if name == "scan" else 1)
      for sub in _subjaxprs(eqn):
        _count_jaxpr(sub, flops, inner, exclude_padding)


def jaxpr_flops(fn: Callable, *args, exclude_padding: bool = False, **kwargs) -> Flops:
  """FLOPs of the dot_general / conv_general_dilated ops of `fn`'s traced program (no compute;
  args may be `jax.ShapeDtypeStruct`s). Batched dot_generals count as attention."""
  closed = jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args)
  flops = Flops()
  _count_jaxpr(closed.jaxpr, flops, 1.0, exclude_padding)
  return flops


def compiled_flops(fn: Callable, *args, compiled: Any = None) -> float:
  """XLA's `cost_analysis()['flops']` of `jax.jit(fn)` on args (or of an already `compiled`)."""
  compiled = compiled or jax.jit(fn).lower(*args).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
    analysis = analysis[0]
  return float(analysis.get("flops", np.nan))


def training_flops(forward: Flops) -> Flops:
  """A training step's FLOPs: forward + backward ≈ 3 × the forward."""
  return forward.scaled(TRAIN_FACTOR)
