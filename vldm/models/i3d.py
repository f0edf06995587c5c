"""Inflated Inception-v1 (I3D, Carreira & Zisserman 2017): the feature network of FVD.

The network of piergiaj's PyTorch port (`pytorch_i3d.InceptionI3d`) as the `cd-fvd` package ships
and runs it (`cdfvd/third_party/i3d`) with the Kinetics-400 weights `i3d_pretrained_400.pt`. Module
names follow the PyTorch state-dict keys, so the checkpoint loads by name
(`vldm.convert.torch_state.load_i3d_params`). Channels-last (NDHWC); BatchNorm in inference mode
(running statistics, eps 1e-5 as the port's BatchNorm3d).

  variables = torch_state.load_i3d_params('i3d_pretrained_400.pt')  # vldm.convert
  feats = jax.jit(features)(variables, videos)  # [B, 400] float32

The FVD feature is what cd-fvd's `get_i3d_logits` takes: the port's `forward`, i.e. the 400
Kinetics logits (no softmax) of the final 2×7×7 average pool and 1×1×1 `logits` conv, averaged
over the remaining time steps (one for 16 frames). Input contract of `features` / `preprocess`:

  videos  [B, T, H, W, 3] RGB, values on the 0–255 scale: uint8, or float (not rounded; cd-fvd
          itself feeds uint8, its loaders truncating `video * 255` with `.byte()`), any H and W.
  frames  T ≥ 9 (the network downsamples time 8× and pools 2 steps); FVD uses 16.
  scaling bilinear resize of every frame to 224×224 (PyTorch `F.interpolate`, align_corners=False,
          no antialiasing, reproduced exactly by `resize_bilinear`), then 2 · x / 255 − 1 ∈ [−1, 1].

The port's "SAME" padding is TensorFlow's, computed from each input's size (`same_padding`):
asymmetric (one more at the end) when the padding is odd; max pools pad with zeros, not −∞.
"""

# linen modules define `__call__` with their own arguments.
# pylint: disable=arguments-differ
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Triple = tuple[int, int, int]

BN_EPS = 1e-5  # pytorch_i3d's BatchNorm3d(eps=1e-5), not TF I3D's 1e-3
NUM_CLASSES = 400
RESOLUTION = 224  # cd-fvd's TARGET_RESOLUTION
MIN_FRAMES = 9  # fewer leave the final 2-step time pool nothing to pool
FINAL_SPATIAL = 7  # the final average pool is 7×7 with no padding: the map must be exactly 7×7
SPATIAL_STRIDE = 32
# The Inception modules in order: (name, output channels of branch 0, 1a, 1b, 2a, 2b, 3b), with
# the strided max pools between them as (name, kernel, stride).
_BLOCKS = (
    ("MaxPool3d_3a_3x3", (1, 3, 3), (1, 2, 2)),
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
)


def same_padding(sizes: Sequence[int], kernel: Sequence[int], stride: Sequence[int]):
  """pytorch_i3d's `compute_pad` per axis → ((front, back), ...): TensorFlow's "SAME".

  Total padding max(k − s, 0) when the size divides by the stride, else max(k − size % s, 0);
  the front gets the smaller half. Output size ceil(size / stride).
  """
  pads = []
  for n, k, s in zip(sizes, kernel, stride):
    total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
    pads.append((total // 2, total - total // 2))
  return tuple(pads)


def max_pool_same(x, kernel: Triple, stride: Triple):
  """pytorch_i3d's `MaxPool3dSamePadding` on [..., T, H, W, C]: zero padding, then a VALID pool.

  The port pads with `F.pad` (zeros), so a padded window's max is at least 0; its inputs follow
  ReLUs, but padding with zeros rather than −∞ keeps that true for any input.
  """
  pads = ((0, 0),) * (x.ndim - 4) + same_padding(x.shape[-4:-1], kernel, stride) + ((0, 0),)
  x = jnp.pad(x, pads)
  return nn.max_pool(x, kernel, strides=stride, padding="VALID")


class Unit3D(nn.Module):
  """pytorch_i3d's `Unit3D`: "SAME"-padded Conv3d (`conv3d`) → BatchNorm3d (`bn`) → ReLU."""

  features: int
  kernel: Triple = (1, 1, 1)
  stride: Triple = (1, 1, 1)
  use_batch_norm: bool = True
  use_bias: bool = False
  activation: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(
        self.features,
        self.kernel,
        strides=self.stride,
        padding=same_padding(x.shape[-4:-1], self.kernel, self.stride),
        use_bias=self.use_bias,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        precision=self.precision,
        name="conv3d",
    )(x)
    if self.use_batch_norm:
      x = nn.BatchNorm(
          use_running_average=True,
          epsilon=BN_EPS,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name="bn",
      )(x)
    return nn.relu(x) if self.activation else x


class InceptionModule(nn.Module):
  """pytorch_i3d's `InceptionModule`: 1×1; 1×1 → 3×3×3; 1×1 → 3×3×3; 3×3×3 max pool → 1×1,
  concatenated on channels (branch names b0, b1a, b1b, b2a, b2b, b3b as the port's)."""

  channels: Sequence[int]  # branch 0, 1a, 1b, 2a, 2b, 3b
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    c0, c1a, c1b, c2a, c2b, c3b = self.channels
    b0 = Unit3D(c0, name="b0", **kw)(x)
    b1 = Unit3D(c1b, (3, 3, 3), name="b1b", **kw)(Unit3D(c1a, name="b1a", **kw)(x))
    b2 = Unit3D(c2b, (3, 3, 3), name="b2b", **kw)(Unit3D(c2a, name="b2a", **kw)(x))
    b3 = Unit3D(c3b, name="b3b", **kw)(max_pool_same(x, (3, 3, 3), (1, 1, 1)))
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionI3d(nn.Module):
  """I3D: videos [B, T, H, W, 3] in [−1, 1] (see `preprocess`) → logits [B, num_classes] float32.

  The logits are averaged over time, as the port's `forward` (cd-fvd's FVD feature). H and W must
  give a 7×7 final map (193 to 224 px; `preprocess` resizes to 224) and T ≥ 9: the port returns no
  [B, 400] vector otherwise. `dtype` is the compute dtype (bfloat16 on accelerators), parameters
  stay `param_dtype`; `precision` goes to every convolution (None: JAX's default, which is
  reduced-precision float32 on TPU / TF32 GPUs; `jax.lax.Precision.HIGHEST` for exact float32).
  """

  num_classes: int = NUM_CLASSES
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    if x.ndim != 5 or x.shape[-1] != 3:
      raise ValueError(f"Expected videos [B, T, H, W, 3], got shape {x.shape}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    x = jnp.asarray(x, self.dtype)
    x = Unit3D(64, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7", **kw)(x)
    x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3
    x = Unit3D(64, name="Conv3d_2b_1x1", **kw)(x)
    x = Unit3D(192, (3, 3, 3), name="Conv3d_2c_3x3", **kw)(x)
    for name, *spec in _BLOCKS:
      if name.startswith("MaxPool"):
        x = max_pool_same(x, *spec)
      else:
        x = InceptionModule(spec[0], name=name, **kw)(x)
    t, h, w = x.shape[-4:-1]
    if t < 2 or (h, w) != (FINAL_SPATIAL, FINAL_SPATIAL):
      raise ValueError(
          f"I3D needs ≥ {MIN_FRAMES} frames of {6 * SPATIAL_STRIDE + 1}–{RESOLUTION} px per side "
          f"(a {t}×{h}×{w} final map here); resize frames with `preprocess`."
      )
    # Logits: 2×7×7 average pool (stride 1, no padding), dropout (identity at inference), a 1×1×1
    # conv with bias, then the mean over the remaining time steps, in the port's order.
    x = nn.avg_pool(x, (2, FINAL_SPATIAL, FINAL_SPATIAL), strides=(1, 1, 1), padding="VALID")
    x = Unit3D(
        self.num_classes, use_batch_norm=False, use_bias=True, activation=False, name="logits", **kw
    )(x)
    return jnp.mean(x[:, :, 0, 0, :].astype(jnp.float32), axis=1)

  def example_inputs(self, batch: int = 1, frames: int = 16) -> tuple:
    return (jnp.zeros((batch, frames, RESOLUTION, RESOLUTION, 3), jnp.float32),)


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of PyTorch's 1-D linear interpolation (align_corners=False, no antialias).

  As ATen's CPU `upsample_bilinear2d`: source index max(s · (i + 0.5) − 0.5, 0) with s = in/out in
  float32, taps floor and floor + 1 (clamped to the last pixel), weights 1 − frac and frac. The
  index is rounded once, as the compiler's fused multiply-add computes it there (x86-64 wheels,
  tests/test_i3d.py checks): two roundings would shift weights by up to 1.5e-5 at 300 → 224.
  Two taps also when shrinking: frames are sampled, not averaged (no antialiasing).
  """
  scale = np.float32(in_size / out_size)
  # float64 holds the float32 product exactly, so one cast to float32 is the FMA's one rounding.
  src = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  frac = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
  m = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), 1 - frac)
  np.add.at(m, (rows, i1), frac)
  return m


def resize_bilinear(x, height: int, width: int):
  """[..., h, w, C] → [..., height, width, C] as `F.interpolate(mode='bilinear',
  align_corners=False)` (antialias off, its default): its weights exactly, applied as two matmuls
  at full float32 precision (the sums agree to float32 rounding)."""
  rows = jnp.asarray(_bilinear_matrix(x.shape[-3], height))
  cols = jnp.asarray(_bilinear_matrix(x.shape[-2], width))
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,...hwc->...owc", rows, x, precision=hi)
  return jnp.einsum("pw,...owc->...opc", cols, x, precision=hi)


def preprocess(videos, resolution: int | Sequence[int] = RESOLUTION):
  """cd-fvd's `preprocess_i3d`: videos [B, T, H, W, 3] on the 0–255 scale (uint8 or float) →
  [B, T, h, w, 3] float32 in [−1, 1], (h, w) = `resolution` (an int: square; FVD uses 224).

  Every frame is resized bilinearly (PyTorch's, see `resize_bilinear`) — aspect ratio not kept,
  as cd-fvd — then scaled as 2 · x / 255 − 1. Channels-last, where the reference returns
  [B, 3, T, h, w]. Jit-able with `resolution` static.
  """
  height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
  videos = jnp.asarray(videos)
  if videos.ndim != 5 or videos.shape[-1] != 3:
    raise ValueError(f"Expected RGB videos [B, T, H, W, 3], got shape {videos.shape}.")
  x = videos.astype(jnp.float32)
  if x.shape[-3:-1] != (height, width):
    x = resize_bilinear(x, height, width)
  return 2.0 * x / 255.0 - 1.0


def features(
    variables,
    videos,
    dtype: Dtype = jnp.float32,
    precision: Any = None,
    resolution: int | Sequence[int] = RESOLUTION,
):
  """FVD features: videos [B, T, H, W, 3] on the 0–255 scale → I3D logits [B, 400] float32.

  `preprocess` then `InceptionI3d`, as cd-fvd's `get_i3d_logits`. Jit with `dtype`, `precision`
  and `resolution` static (or bound); keep `resolution` at 224 for FVD (other sizes the network
  takes, 193 to 224 per side, are for tests).
  """
  model = InceptionI3d(dtype=dtype, precision=precision)
  return model.apply(variables, preprocess(videos, resolution))
