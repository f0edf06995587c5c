"""The FID InceptionV3: pool3 features (2048-d) exactly as the FID reference computes them.

FID (Heusel et al. 2017) is defined by one network: the TensorFlow Inception graph of 2015-12-05
(`pool_3:0`), not torchvision's InceptionV3. This is its PyTorch port as torch-fidelity
(`torch_fidelity/feature_extractor_inceptionv3.py`, weights `weights-inception-2015-12-05-*.pth`)
and pytorch-fid (`fid_inception_v3`, `pt_inception-2015-12-05-*.pth`) run it: torchvision's
layout with TensorFlow's quirks, namely BatchNorm eps 1e-3, average pools that do not count the
padding (Mixed_5*, Mixed_6b–e, Mixed_7b), a max pool in Mixed_7c's pool branch and 1008 classes.
Module names follow the state-dict keys, so the published file loads by name
(`vldm.convert.torch_state.load_fid_inception_params`). NHWC; BatchNorm in inference mode.

Input contract (`preprocess`, as torch-fidelity's extractor): uint8 RGB images [..., H, W, 3] of
any size, values 0–255, quantised the way the images are saved (FID compares uint8 images; round
and clip generated frames before). They are resized to 299 × 299 with TensorFlow 1.x's bilinear
resize (`align_corners=False`: source pixel = output pixel × in/out, no half-pixel offset, no
antialiasing; torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`), in float32 on the
0–255 values, then scaled to (x − 128) / 128, i.e. [−1, 0.9921875].

  variables = torch_state.load_fid_inception_params('weights-inception-2015-12-05-6726825d.pth')
  feats = features(variables, frames_uint8)  # [B, 2048] float32, the statistics FID compares
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

INPUT_SIZE = 299
FEATURES = 2048
NUM_CLASSES = 1008  # the 2015 graph's softmax: 1000 ImageNet classes and 8 unused
BN_EPS = 1e-3  # TensorFlow's; torchvision's InceptionV3 also uses 1e-3


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """conv (no bias) → BatchNorm (eps 1e-3) → ReLU; parameters `conv` and `bn` as in PyTorch."""

  features: int
  kernel_size: int | Sequence[int]
  stride: int = 1
  padding: int | Sequence[int] = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    ph, pw = _pair(self.padding)
    x = nn.Conv(
        self.features,
        _pair(self.kernel_size),
        strides=_pair(self.stride),
        padding=((ph, ph), (pw, pw)),
        use_bias=False,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        precision=self.precision,
        name="conv",
    )(x)
    x = nn.BatchNorm(
        use_running_average=True,
        epsilon=BN_EPS,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="bn",
    )(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # TensorFlow's average pool divides by the number of real (unpadded) pixels under the window.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride: int, pad: int):
  # Flax pads max pools with −inf, as PyTorch does.
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class _Block(nn.Module):
  """Shared attributes of the Inception blocks; `conv` makes a named BasicConv2d."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  def conv(self, name: str, channels: int, kernel, stride: int = 1, padding=0) -> BasicConv2d:
    return BasicConv2d(
        channels,
        kernel,
        stride,
        padding,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        precision=self.precision,
        name=name,
    )


class InceptionA(_Block):
  """Mixed_5b–d (35 × 35): 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg pool→1×1 (`pool_features`)."""

  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 64, 1)(x)
    b5 = self.conv("branch5x5_2", 64, 5, padding=2)(self.conv("branch5x5_1", 48, 1)(x))
    b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
    b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
    b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
    bp = self.conv("branch_pool", self.pool_features, 1)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Mixed_6a (35 → 17): 3×3/2 | 1×1→3×3→3×3/2 | max pool 3×3/2."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3", 384, 3, stride=2)(x)
    bd = self.conv("branch3x3dbl_1", 64, 1)(x)
    bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
    bd = self.conv("branch3x3dbl_3", 96, 3, stride=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionC(_Block):
  """Mixed_6b–e (17 × 17): 1×1 | 1×1→1×7→7×1 | 1×1→7×1→1×7→7×1→1×7 | avg pool→1×1."""

  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = self.conv("branch1x1", 192, 1)(x)
    b7 = self.conv("branch7x7_1", c7, 1)(x)
    b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
    bd = self.conv("branch7x7dbl_1", c7, 1)(x)
    bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
    bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
    bp = self.conv("branch_pool", 192, 1)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """Mixed_7a (17 → 8): 1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | max pool 3×3/2."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3_2", 320, 3, stride=2)(self.conv("branch3x3_1", 192, 1)(x))
    b7 = self.conv("branch7x7x3_1", 192, 1)(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv("branch7x7x3_4", 192, 3, stride=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionE(_Block):
  """Mixed_7b / 7c (8 × 8): 1×1 | 1×1→(1×3, 3×1) | 1×1→3×3→(1×3, 3×1) | pool→1×1.

  The pool branch averages in Mixed_7b and takes the maximum in Mixed_7c (`max_pool`): so the
  2015 graph has it (pytorch-fid's FIDInceptionE_1 / E_2), though the paper averages in both.
  """

  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 320, 1)(x)
    b3 = self.conv("branch3x3_1", 384, 1)(x)
    b3 = [
        self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
        self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3),
    ]
    bd = self.conv("branch3x3dbl_1", 448, 1)(x)
    bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(bd)
    bd = [
        self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
        self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd),
    ]
    pooled = _max_pool_3x3(x, 1, 1) if self.max_pool else _avg_pool_3x3(x)
    bp = self.conv("branch_pool", 192, 1)(pooled)
    return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """Preprocessed images [B, 299, 299, 3] (see `preprocess`) → (pool3 [B, 2048], logits [B, 1008]).

  pool3 is what FID, KID and precision/recall compare; logits (with the fc bias) feed the
  Inception Score. Under jit, the logits cost nothing when unused (dead code). `precision` is the
  convolutions' and fc's: HIGHEST by default, so that float32 stays float32 on GPUs and TPUs, whose
  default precision may round the operands (TF32, bfloat16 passes) and move the statistics.
  """

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3", **kw)(x)  # 149
    x = BasicConv2d(32, 3, name="Conv2d_2a_3x3", **kw)(x)  # 147
    x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3", **kw)(x)
    x = _max_pool_3x3(x, 2, 0)  # 73
    x = BasicConv2d(80, 1, name="Conv2d_3b_1x1", **kw)(x)
    x = BasicConv2d(192, 3, name="Conv2d_4a_3x3", **kw)(x)  # 71
    x = _max_pool_3x3(x, 2, 0)  # 35
    x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x)
    x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x)
    x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x)
    x = InceptionB(name="Mixed_6a", **kw)(x)  # 17
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(channels_7x7=c7, name=name, **kw)(x)
    x = InceptionD(name="Mixed_7a", **kw)(x)  # 8
    x = InceptionE(max_pool=False, name="Mixed_7b", **kw)(x)
    x = InceptionE(max_pool=True, name="Mixed_7c", **kw)(x)
    pool3 = jnp.mean(x.astype(jnp.float32), axis=(-3, -2))
    logits = nn.Dense(
        NUM_CLASSES,
        dtype=jnp.float32,
        param_dtype=self.param_dtype,
        precision=self.precision,
        name="fc",
    )(pool3)
    return pool3, logits

  def example_inputs(self, batch: int = 1) -> tuple:
    return (jnp.zeros((batch, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32),)


def _tf1_bilinear_taps(in_size: int, out_size: int):
  """Source rows (low, high) and weights of TF 1.x's bilinear resize without aligned corners, in
  float32 as torch-fidelity computes them: position = i × float32(in / out), truncated, the upper
  neighbour clamped to the edge."""
  pos = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
  lo = pos.astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, pos - lo.astype(np.float32)


def resize_bilinear_tf1(x, height: int, width: int):
  """Float images [..., h, w, C] → [..., height, width, C] as TF 1.x `resize_bilinear`
  (align_corners=False) and torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`
  ('slow', its default): the same taps and the same order of float32 operations.

  Not `jax.image.resize`: that samples at half-pixel centres and antialiases when shrinking.
  """
  y_lo, y_hi, dy = _tf1_bilinear_taps(x.shape[-3], height)
  x_lo, x_hi, dx = _tf1_bilinear_taps(x.shape[-2], width)
  top, bottom = jnp.take(x, y_lo, axis=-3), jnp.take(x, y_hi, axis=-3)
  dx = jnp.asarray(dx)[:, None]
  row_lo = top[..., x_lo, :] + (top[..., x_hi, :] - top[..., x_lo, :]) * dx
  row_hi = bottom[..., x_lo, :] + (bottom[..., x_hi, :] - bottom[..., x_lo, :]) * dx
  return row_lo + (row_hi - row_lo) * jnp.asarray(dy)[:, None, None]


def preprocess(images):
  """uint8 RGB images [..., H, W, 3] → network input [..., 299, 299, 3] float32 in [−1, 1).

  torch-fidelity's extractor: TF 1.x bilinear resize of the 0–255 values to 299 × 299 (also when
  already 299, where it is the identity), then (x − 128) / 128. Jit-able.
  """
  images = jnp.asarray(images)
  if images.ndim < 3 or images.shape[-1] != 3:
    raise ValueError(f"Expected RGB images [..., H, W, 3], got shape {images.shape}.")
  if images.dtype != jnp.uint8:
    # The reference refuses other dtypes too: FID is defined on quantised images, and a float
    # input in [0, 1] or [-1, 1] would pass silently as nearly black.
    raise ValueError(f"Expected uint8 images (0–255), got {images.dtype}.")
  x = resize_bilinear_tf1(images.astype(jnp.float32), INPUT_SIZE, INPUT_SIZE)
  return (x - 128.0) / 128.0


@jax.jit
def features(variables, images):
  """uint8 RGB images [B, H, W, 3] → FID pool3 features [B, 2048] float32 (`preprocess`, then
  `FIDInceptionV3` at float32, HIGHEST precision)."""
  pool3, _ = FIDInceptionV3().apply(variables, preprocess(images))
  return pool3
