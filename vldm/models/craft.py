"""CRAFT text detector (Baek et al. 2019, "Character Region Awareness for Text Detection").

The network of EasyOCR's `easyocr/craft.py` (from clovaai/CRAFT-pytorch), which loads the published
`craft_mlt_25k.pth`: a VGG16-BN backbone cut into torchvision's slices (`easyocr/model/modules.py`
`vgg16_bn`: features[0:12], [12:19], [19:29], [29:39], then fc6/fc7 as a 3×3 max pool, a 3×3 conv
dilated 6 and a 1×1 conv), four `double_conv` up blocks with bilinear upsampling and the `conv_cls`
head. Module names follow the PyTorch state-dict keys, so the checkpoint loads by name
(`vldm.convert.torch_state.load_craft_params`). NHWC; BatchNorm in inference mode (running
statistics, eps 1e-5).

  variables = torch_state.load_craft_params('craft_mlt_25k.pth')  # vldm.convert
  y, feature = CRAFT().apply(variables, preprocess(frames, (H, W)))
  # y [B, H/2, W/2, 2]: region (character) and affinity (link) scores; feature [B, H/2, W/2, 32]
  text_area(np.asarray(y))  # [B] fraction of each frame covered by detected text boxes

Data curation (Stable Video Diffusion) drops clips whose frames carry much text: `text_area` is
SVD's "total area of detected bounding boxes", the boxes found exactly as EasyOCR's
`craft_utils.getDetBoxes_core` finds them.
"""

# linen modules define `__call__` with their own arguments.
# pylint: disable=arguments-differ
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vldm.models.layers import conv

Dtype = Any

# torchvision's VGG16 'D' configuration with batch norm: each number is conv3×3 (pad 1) →
# BatchNorm2d → ReLU, 'M' a 2×2 max pool. Layer indices (as in `vgg16_bn().features`) name the
# parameters, so the backbone is built from this list rather than from hand-written indices.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# EasyOCR's slices of `features` (end exclusive): conv2_2, conv3_3, conv4_3, conv5_3 (before ReLU).
VGG_SLICES = ((0, 12), (12, 19), (19, 29), (29, 39))
BN_EPS = 1e-5
# EasyOCR's `imgproc.normalizeMeanVariance`: ImageNet statistics on 0–255 RGB.
MEAN_RGB = (0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0)
STD_RGB = (0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0)
# EasyOCR's `readtext` defaults for `getDetBoxes`.
TEXT_THRESHOLD = 0.7
LINK_THRESHOLD = 0.4
LOW_TEXT = 0.4
MIN_COMPONENT_SIZE = 10  # pixels of the score map; smaller components are noise
SIZE_MULTIPLE = 32  # the backbone halves the input 4 times and the head works at 1/2


def vgg16_bn_layers() -> list[tuple[str, int]]:
  """torchvision's `vgg16_bn().features`, one (kind, channels) per index; kinds 'conv', 'bn',
  'relu', 'pool'."""
  layers = []
  for v in VGG16_CFG:
    if v == "M":
      layers.append(("pool", 0))
    else:
      layers += [("conv", v), ("bn", v), ("relu", v)]
  return layers


def _batch_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.BatchNorm:
  return nn.BatchNorm(
      use_running_average=True, epsilon=BN_EPS, dtype=dtype, param_dtype=param_dtype, name=name
  )


def upsample_bilinear(x, height: int, width: int):
  """(B, h, w, C) → (B, height, width, C) as `F.interpolate(mode='bilinear', align_corners=False)`.

  jax.image.resize samples at half-pixel centres like PyTorch; without antialiasing its triangle
  kernel is PyTorch's two-tap interpolation, and dropping the out-of-range tap at the borders
  equals PyTorch's clamping of the source index (tests/test_craft.py checks both).
  """
  shape = x.shape[:-3] + (height, width, x.shape[-1])
  return jax.image.resize(x, shape, method="bilinear", antialias=False)


class VGG16BN(nn.Module):
  """EasyOCR's `vgg16_bn`: returns (fc7, relu5_3, relu4_3, relu3_2, relu2_2) as it does.

  The names are EasyOCR's, not what the slices end with: each slice ends with a BatchNorm, and
  the next slice starts with an in-place ReLU, which in PyTorch also rectifies the tensor returned
  for the previous slice. So relu2_2, relu3_2 and relu4_3 come back rectified and relu5_3 (followed
  by slice5's max pool, not a ReLU) does not; the published weights were trained that way.
  """

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    layers = vgg16_bn_layers()
    sources = []
    for s, (start, end) in enumerate(VGG_SLICES, start=1):
      for i in range(start, end):
        kind, channels = layers[i]
        name = f"slice{s}_{i}"
        if kind == "conv":
          x = conv(channels, 3, padding=1, name=name, **kw)(x)
        elif kind == "bn":
          x = _batch_norm(name, **kw)(x)
        elif kind == "relu":
          x = nn.relu(x)
        else:
          x = nn.max_pool(x, (2, 2), strides=(2, 2))
      sources.append(x)
    # The in-place ReLUs that open slices 2–4 (see the class docstring).
    relu2_2, relu3_2, relu4_3, relu5_3 = [nn.relu(h) for h in sources[:3]] + [sources[3]]
    # fc6, fc7: no ReLU between or after them, as in EasyOCR.
    h = nn.max_pool(relu5_3, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    h = nn.Conv(
        1024, (3, 3), padding=((6, 6), (6, 6)), kernel_dilation=(6, 6), name="slice5_1", **kw
    )(h)
    fc7 = conv(1024, 1, name="slice5_2", **kw)(h)
    return fc7, relu5_3, relu4_3, relu3_2, relu2_2


class DoubleConv(nn.Module):
  """EasyOCR's `double_conv`: 1×1 conv → BN → ReLU → 3×3 conv → BN → ReLU (`conv.{0,1,3,4}`)."""

  mid_channels: int
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.relu(_batch_norm("conv_1", **kw)(conv(self.mid_channels, 1, name="conv_0", **kw)(x)))
    x = conv(self.out_channels, 3, padding=1, name="conv_3", **kw)(x)
    return nn.relu(_batch_norm("conv_4", **kw)(x))


class CRAFT(nn.Module):
  """CRAFT: images [B, H, W, 3] (normalised, see `preprocess`) → (y, feature).

  y [B, H/2, W/2, 2] holds the region score (channel 0) and the affinity score (channel 1);
  feature [B, H/2, W/2, 32] is the last up block's output. H and W should be multiples of 32
  (other sizes run, as in PyTorch, with floor-divided pooling).
  """

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    fc7, relu5_3, relu4_3, relu3_2, relu2_2 = VGG16BN(name="basenet", **kw)(x)
    y = DoubleConv(512, 256, name="upconv1", **kw)(jnp.concatenate([fc7, relu5_3], axis=-1))
    for i, (mid, out, skip) in enumerate(
        ((256, 128, relu4_3), (128, 64, relu3_2), (64, 32, relu2_2)), start=2
    ):
      y = upsample_bilinear(y, skip.shape[-3], skip.shape[-2])
      y = DoubleConv(mid, out, name=f"upconv{i}", **kw)(jnp.concatenate([y, skip], axis=-1))
    feature = y
    for i, (channels, kernel) in enumerate(((32, 3), (32, 3), (16, 3), (16, 1))):
      y = nn.relu(conv(channels, kernel, name=f"conv_cls_{2 * i}", **kw)(y))
    y = conv(2, 1, name="conv_cls_8", **kw)(y)
    return y, feature

  def example_inputs(self, batch: int = 1, height: int = 64, width: int = 64) -> tuple:
    return (jnp.zeros((batch, height, width, 3), jnp.float32),)


def input_size(height: int, width: int, long_side: int) -> tuple[int, int]:
  """The (H, W) of `preprocess` for frames of (height, width): long side `long_side`, aspect
  ratio kept to the nearest multiple of 32 on each side (at least 32)."""
  scale = long_side / max(height, width)

  def side(n):
    return max(SIZE_MULTIPLE, SIZE_MULTIPLE * round(n * scale / SIZE_MULTIPLE))

  return side(height), side(width)


def preprocess(frames, size: Sequence[int]):
  """uint8 RGB frames [..., h, w, 3] → CRAFT input [..., H, W, 3] float32, (H, W) = `size`.

  Bilinear resize (OpenCV's INTER_LINEAR, which EasyOCR uses: half-pixel centres, no
  antialiasing; in float, where EasyOCR's uint8 resize rounds) straight to `size`, then EasyOCR's
  `normalizeMeanVariance`. EasyOCR instead keeps the aspect ratio and zero-pads up to a multiple of
  32; resizing to a fixed size (pick it with `input_size`: at most 16 px of stretch per side) keeps
  batch shapes static and makes score-map fractions fractions of the frame. Jit-able with `size`
  static.
  """
  height, width = (int(s) for s in size)
  if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
    raise ValueError(f"CRAFT input size {(height, width)} must be multiples of {SIZE_MULTIPLE}.")
  frames = jnp.asarray(frames)
  if frames.ndim < 3 or frames.shape[-1] != 3:
    raise ValueError(f"Expected RGB frames [..., H, W, 3], got shape {frames.shape}.")
  x = frames.astype(jnp.float32)
  if x.shape[-3:-1] != (height, width):
    x = jax.image.resize(x, x.shape[:-3] + (height, width, 3), method="linear", antialias=False)
  return (x - jnp.asarray(MEAN_RGB, jnp.float32)) / jnp.asarray(STD_RGB, jnp.float32)


def detect_boxes(
    region,
    affinity,
    text_threshold: float = TEXT_THRESHOLD,
    link_threshold: float = LINK_THRESHOLD,
    low_text: float = LOW_TEXT,
) -> list[np.ndarray]:
  """Text boxes (4×2 float32 corner arrays, x then y, in score-map pixels) from one frame's region
  and affinity maps [h, w], as EasyOCR's `craft_utils.getDetBoxes_core` finds them.

  Pixels with region > low_text or affinity > link_threshold form 4-connected components; a
  component of at least 10 pixels whose peak region score reaches text_threshold is a word. Its
  pixels (minus pure-link ones) are dilated by a square of side 1 + niter, niter = int(2 ·
  sqrt(size · min(w, h) / (w · h))) (region scores peak at character centres, so the thresholded
  area is smaller than the characters), and the box is their minimum-area rectangle (axis-aligned
  when nearly square).
  """
  import cv2  # pylint: disable=g-import-not-at-top

  # pylint: disable=no-member  # cv2 is a compiled extension: pylint cannot list its members
  region = np.asarray(region, np.float32)
  affinity = np.asarray(affinity, np.float32)
  img_h, img_w = region.shape
  text_score = region > low_text
  link_score = affinity > link_threshold
  n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(
      (text_score | link_score).astype(np.uint8), connectivity=4
  )
  boxes = []
  for k in range(1, n_labels):
    size = stats[k, cv2.CC_STAT_AREA]
    if size < MIN_COMPONENT_SIZE or region[labels == k].max() < text_threshold:
      continue
    segmap = np.zeros(region.shape, np.uint8)
    segmap[labels == k] = 255
    segmap[link_score & ~text_score] = 0  # link-only pixels join characters, are not text
    x, y = stats[k, cv2.CC_STAT_LEFT], stats[k, cv2.CC_STAT_TOP]
    w, h = stats[k, cv2.CC_STAT_WIDTH], stats[k, cv2.CC_STAT_HEIGHT]
    niter = int(math.sqrt(size * min(w, h) / (w * h)) * 2)
    sx, sy = max(x - niter, 0), max(y - niter, 0)
    ex, ey = min(x + w + niter + 1, img_w), min(y + h + niter + 1, img_h)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (1 + niter, 1 + niter))
    segmap[sy:ey, sx:ex] = cv2.dilate(segmap[sy:ey, sx:ex], kernel)
    points = np.roll(np.array(np.where(segmap != 0)), 1, axis=0).transpose().reshape(-1, 2)
    box = cv2.boxPoints(cv2.minAreaRect(points))
    bw, bh = np.linalg.norm(box[0] - box[1]), np.linalg.norm(box[1] - box[2])
    if abs(1 - max(bw, bh) / (min(bw, bh) + 1e-5)) <= 0.1:  # near-square: axis-aligned box
      left, right = points[:, 0].min(), points[:, 0].max()
      top, bottom = points[:, 1].min(), points[:, 1].max()
      box = np.array([[left, top], [right, top], [right, bottom], [left, bottom]], np.float32)
    boxes.append(np.roll(box, 4 - box.sum(axis=1).argmin(), 0))  # clockwise from top-left
  return boxes


def text_area(
    scores,
    text_threshold: float = TEXT_THRESHOLD,
    link_threshold: float = LINK_THRESHOLD,
    low_text: float = LOW_TEXT,
):
  """Fraction of the frame covered by detected text: CRAFT's y [..., h, w, 2] → [...] in [0, 1].

  The boxes of `detect_boxes` (EasyOCR's, thresholds as its `readtext`) are filled on the score
  map's pixel grid (corners rounded, boundary pixels included) and their union counted, so
  overlapping boxes count once; divided by h · w. Host-side (OpenCV), per frame.
  """
  import cv2  # pylint: disable=g-import-not-at-top

  # pylint: disable=no-member  # cv2 is a compiled extension: pylint cannot list its members
  scores = np.asarray(scores, np.float32)
  if scores.ndim < 3 or scores.shape[-1] != 2:
    raise ValueError(f"Expected CRAFT scores [..., h, w, 2], got shape {scores.shape}.")
  flat = scores.reshape((-1,) + scores.shape[-3:])
  out = np.zeros(len(flat), np.float32)
  for i, frame in enumerate(flat):
    boxes = detect_boxes(frame[..., 0], frame[..., 1], text_threshold, link_threshold, low_text)
    if boxes:
      mask = np.zeros(frame.shape[:2], np.uint8)
      cv2.fillPoly(mask, [np.round(b).astype(np.int32) for b in boxes], 1)
      out[i] = mask.mean()
  return out.reshape(scores.shape[:-3])
