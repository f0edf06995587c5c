"""CLIP text and vision encoders, as transformers' CLIPTextModel / CLIPVisionModelWithProjection.

Parameters are named after the transformers state dict (`text_model.encoder.layers.0.self_attn.
q_proj`, `vision_model.pre_layrnorm`, ...), so `vldm.convert` loads published checkpoints (SD's
text_encoder, SVD's image_encoder) by name. Token ids are (B, L) integers; images are NHWC.

  CLIPTextModel:                 input_ids [B, L] → (last_hidden_state [B, L, D], pooled [B, D])
  CLIPTextModelWithProjection:   input_ids [B, L] → (last_hidden_state [B, L, D], text_embeds [B, P])
  CLIPVisionModelWithProjection: pixel_values [B, S, S, 3] → image_embeds [B, P]

`preprocess_for_clip` is the resize + normalisation SVD applies before its image encoder.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vldm.models.layers import Attention, LayerNorm, conv

Dtype = Any

_CLIP_PROJ_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj")


def _quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names that CLIP configs use. The tanh variants are one formula under
# several names.
ACTIVATIONS: dict[str, Callable] = {
    "quick_gelu": _quick_gelu,
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_fast": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


def activation(name: str) -> Callable:
  """The activation function for a transformers `hidden_act` name."""
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown CLIP hidden_act {name!r}; accepted: {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


class CLIPMLP(nn.Module):
  """fc1 → activation → fc2."""
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.Dense(self.intermediate_size, name="fc1", **kw)(x)
    return nn.Dense(x.shape[-1], name="fc2", **kw)(activation(self.hidden_act)(h))


class CLIPEncoderLayer(nn.Module):
  """Pre-LN transformer layer: x += attn(ln1 x); x += mlp(ln2 x)."""
  num_attention_heads: int
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_implementation: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, is_causal: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    if width % self.num_attention_heads:
      raise ValueError(f"hidden_size {width} is not a multiple of num_attention_heads "
                       f"{self.num_attention_heads}.")
    attn = Attention(self.num_attention_heads, width // self.num_attention_heads, qkv_bias=True,
                     proj_names=_CLIP_PROJ_NAMES,
                     attention_implementation=self.attention_implementation, name="self_attn", **kw)
    x = x + attn(LayerNorm(self.layer_norm_eps, name="layer_norm1", **kw)(x), mask=mask,
                 is_causal=is_causal)
    mlp = CLIPMLP(self.intermediate_size, self.hidden_act, name="mlp", **kw)
    return x + mlp(LayerNorm(self.layer_norm_eps, name="layer_norm2", **kw)(x))


class CLIPEncoder(nn.Module):
  """`num_hidden_layers` encoder layers (`layers.{i}`). Returns every hidden state, transformers'
  `hidden_states`: the input, then each layer's output (num_hidden_layers + 1 arrays)."""
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_implementation: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, is_causal: bool = False):
    hidden_states = [x]
    for i in range(self.num_hidden_layers):
      layer = CLIPEncoderLayer(self.num_attention_heads, self.intermediate_size, self.hidden_act,
                               self.layer_norm_eps, self.attention_implementation, dtype=self.dtype,
                               param_dtype=self.param_dtype, name=f"layers_{i}")
      hidden_states.append(layer(hidden_states[-1], mask=mask, is_causal=is_causal))
    return tuple(hidden_states)


def _encoder(model, name: str = "encoder") -> CLIPEncoder:
  """The encoder of a text or vision tower, configured from the tower's own fields."""
  return CLIPEncoder(model.num_hidden_layers, model.num_attention_heads, model.intermediate_size,
                     model.hidden_act, model.layer_norm_eps, model.attention_implementation,
                     dtype=model.dtype, param_dtype=model.param_dtype, name=name)


# ----------------------------------------------------------------------------------------- text


class CLIPTextEmbeddings(nn.Module):
  """Token embedding + learned absolute position embedding."""
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tokens = nn.Embed(self.vocab_size, self.hidden_size, name="token_embedding", **kw)(input_ids)
    positions = nn.Embed(self.max_position_embeddings, self.hidden_size, name="position_embedding",
                         **kw)(jnp.arange(input_ids.shape[-1]))
    return tokens + positions


class CLIPTextTransformer(nn.Module):
  """transformers' `text_model`: embeddings → causal encoder → final_layer_norm.

  Returns every hidden state (see CLIPEncoder) and the final-normed last one.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  max_position_embeddings: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_implementation: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embeddings = CLIPTextEmbeddings(self.vocab_size, self.hidden_size,
                                         self.max_position_embeddings, **kw)
    self.encoder = _encoder(self, name=None)
    self.final_layer_norm = LayerNorm(self.layer_norm_eps, name=None, **kw)

  def __call__(self, input_ids, attention_mask=None):
    # A padding mask hides padded keys; the causal mask is always on (CLIP's text tower is causal).
    mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
    hidden_states = self.encoder(self.embeddings(input_ids), mask=mask, is_causal=True)
    return hidden_states, self.final_layer_norm(hidden_states[-1])


class CLIPTextModel(nn.Module):
  """transformers CLIPTextModel. Fields are the CLIPTextConfig keys (defaults: CLIPTextConfig's).

  `__call__(input_ids [B, L], attention_mask=None, output_hidden_states=False)` →
  `(last_hidden_state [B, L, D], pooled [B, D])`, plus, with `output_hidden_states`, transformers'
  `hidden_states` (the embeddings, then each layer's output, before the final LayerNorm): SD2 and
  clip-skip use `hidden_states[-2]` (SD1 pipelines pass it through `final_layer_norm` again, see
  that method; SDXL does not). `attention_mask` ([B, L], 1 for real tokens) additionally hides
  padded keys; SD pipelines pass none. Pooling: the hidden state at argmax(input_ids) when
  `eos_token_id == 2` (legacy configs), else at the first `eos_token_id`.
  `bos_token_id` / `pad_token_id` only travel with the config.
  """
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  pad_token_id: int = 1
  attention_implementation: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.text_model = CLIPTextTransformer(
        self.vocab_size, self.hidden_size, self.intermediate_size, self.num_hidden_layers,
        self.num_attention_heads, self.max_position_embeddings, self.hidden_act,
        self.layer_norm_eps, self.attention_implementation, dtype=self.dtype,
        param_dtype=self.param_dtype)

  def _check_inputs(self, input_ids, attention_mask):
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length] integers, got shape {input_ids.shape}.")
    if input_ids.shape[1] > self.max_position_embeddings:
      raise ValueError(f"input_ids has {input_ids.shape[1]} tokens but the model has only "
                       f"max_position_embeddings={self.max_position_embeddings} positions; "
                       f"truncate to at most {self.max_position_embeddings}.")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"input_ids must be integers, got dtype {input_ids.dtype}.")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask shape {attention_mask.shape} differs from input_ids shape "
                       f"{input_ids.shape}.")

  def pool(self, last_hidden_state, input_ids):
    """The hidden state at each sequence's end-of-text token."""
    if self.eos_token_id == 2:  # legacy configs: eos is the largest id of the vocabulary
      index = jnp.argmax(input_ids, axis=-1)
    else:
      index = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
    return jnp.take_along_axis(last_hidden_state, index[:, None, None], axis=1)[:, 0]

  def final_layer_norm(self, hidden_state):
    """`text_model.final_layer_norm`, for clip-skip on an earlier hidden state."""
    return self.text_model.final_layer_norm(hidden_state)

  def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False):
    input_ids = jnp.asarray(input_ids)
    self._check_inputs(input_ids, attention_mask)
    hidden_states, last_hidden_state = self.text_model(input_ids, attention_mask)
    pooled = self.pool(last_hidden_state, input_ids)
    return (last_hidden_state, pooled) + ((hidden_states,) if output_hidden_states else ())


class CLIPTextModelWithProjection(CLIPTextModel):
  """transformers CLIPTextModelWithProjection (SDXL's second text encoder): as CLIPTextModel, with
  the pooled state projected by `text_projection` (no bias) to `projection_dim`.

  `__call__` → `(last_hidden_state [B, L, D], text_embeds [B, projection_dim])` (+ hidden_states).
  """
  projection_dim: int = 512

  def setup(self):
    super().setup()
    self.text_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                                    param_dtype=self.param_dtype)

  def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False):
    last_hidden_state, pooled, *rest = super().__call__(input_ids, attention_mask,
                                                        output_hidden_states)
    return (last_hidden_state, self.text_projection(pooled), *rest)


# --------------------------------------------------------------------------------------- vision


class CLIPVisionEmbeddings(nn.Module):
  """[class_embedding; patch embeddings] + position embeddings, on NHWC images."""
  hidden_size: int
  image_size: int
  patch_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b = pixel_values.shape[0]
    patches = conv(self.hidden_size, self.patch_size, stride=self.patch_size, padding=0,
                   use_bias=False, name="patch_embedding", **kw)(pixel_values)
    patches = patches.reshape(b, -1, self.hidden_size)  # row-major, as torch's flatten(2)
    class_embedding = self.param("class_embedding", nn.initializers.normal(1.0),
                                 (self.hidden_size,), self.param_dtype)
    cls = jnp.broadcast_to(class_embedding.astype(patches.dtype), (b, 1, self.hidden_size))
    tokens = jnp.concatenate([cls, patches], axis=1)
    num_positions = (self.image_size // self.patch_size) ** 2 + 1
    positions = nn.Embed(num_positions, self.hidden_size, name="position_embedding",
                         **kw)(jnp.arange(num_positions))
    return tokens + positions


class CLIPVisionModelWithProjection(nn.Module):
  """transformers CLIPVisionModelWithProjection (SVD's image encoder). Fields are CLIPVisionConfig
  keys. `__call__(pixel_values [B, image_size, image_size, num_channels])` → image_embeds [B, P]:
  embeddings → pre_layrnorm → encoder (no mask) → post_layernorm on the class token →
  visual_projection (no bias). Images must be CLIP-normalised (see `preprocess_for_clip`).
  """
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_implementation: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    expected = (self.image_size, self.image_size, self.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
      raise ValueError(f"pixel_values must be NHWC (B, {', '.join(map(str, expected))}) for this "
                       f"model (image_size={self.image_size}); got shape {pixel_values.shape}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = CLIPVisionTower(self.hidden_size, self.image_size, self.patch_size, self.num_hidden_layers,
                        self.num_attention_heads, self.intermediate_size, self.hidden_act,
                        self.layer_norm_eps, self.attention_implementation, name="vision_model",
                        **kw)(pixel_values)
    return nn.Dense(self.projection_dim, use_bias=False, name="visual_projection", **kw)(h)


class CLIPVisionTower(nn.Module):
  """transformers' `vision_model`; returns the post-normed class token (pooler_output) [B, D]."""
  hidden_size: int
  image_size: int
  patch_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_implementation: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = CLIPVisionEmbeddings(self.hidden_size, self.image_size, self.patch_size, name="embeddings",
                             **kw)(pixel_values)
    h = LayerNorm(self.layer_norm_eps, name="pre_layrnorm", **kw)(h)  # sic: the checkpoint's name
    h = _encoder(self)(h)[-1]
    return LayerNorm(self.layer_norm_eps, name="post_layernorm", **kw)(h[:, 0])


# ---------------------------------------------------------------------------- image preprocessing

# OpenAI CLIP normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _reflect(index: np.ndarray, n: int) -> np.ndarray:
  """torch 'reflect' padding (the edge sample is not repeated)."""
  index = np.abs(index)
  return np.where(index >= n, 2 * (n - 1) - index, index)


def _blur_matrix(n: int, sigma: float, kernel_size: int) -> np.ndarray:
  """[n, n] matrix of diffusers' Gaussian blur along one axis (odd kernel, reflect padding)."""
  offsets = np.arange(kernel_size) - kernel_size // 2
  weights = np.exp(-offsets.astype(np.float64) ** 2 / (2 * sigma ** 2))
  weights /= weights.sum()
  m = np.zeros((n, n))
  for offset, w in zip(offsets, weights):
    np.add.at(m, (np.arange(n), _reflect(np.arange(n) + offset, n)), w)
  return m


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] matrix of torch's bicubic interpolation (A = -0.75, align_corners=True,
  border indices clamped)."""
  a = -0.75
  scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
  src = np.arange(n_out) * scale
  base = np.floor(src).astype(np.int64)
  t = src - base
  cubic_near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1          # |x| <= 1
  cubic_far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a    # 1 < |x| < 2
  weights = (cubic_far(t + 1), cubic_near(t), cubic_near(1 - t), cubic_far(2 - t))
  m = np.zeros((n_out, n_in))
  for k, w in enumerate(weights):
    np.add.at(m, (np.arange(n_out), np.clip(base - 1 + k, 0, n_in - 1)), w)
  return m


def _antialiased_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """diffusers' `_resize_with_antialiasing` along one axis: Gaussian blur, then bicubic."""
  sigma = max((n_in / n_out - 1.0) / 2.0, 0.001)
  kernel_size = int(max(2.0 * 2 * sigma, 3))
  kernel_size += 1 - kernel_size % 2  # odd
  return _bicubic_matrix(n_in, n_out) @ _blur_matrix(n_in, sigma, kernel_size)


def preprocess_for_clip(images, size: int = 224):
  """SVD's image-encoder input: images [B, H, W, 3] in [-1, 1] → CLIP pixels [B, size, size, 3].

  As StableVideoDiffusionPipeline._encode_image does for PIL / numpy images: an anti-aliased resize
  to size×size (Gaussian blur with σ = (factor − 1)/2, then bicubic with align_corners=True, in
  [-1, 1]), back to [0, 1], then CLIP mean/std normalisation. Both axes are static linear maps,
  so this is two matrix products (jit-able; the matrices are built at trace time).
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be [B, H, W, 3] in [-1, 1], got shape {images.shape}.")
  _, h, w, _ = images.shape
  if min(h, w) < 2:
    raise ValueError(f"images must be at least 2×2 pixels, got {h}×{w}.")
  rows = jnp.asarray(_antialiased_resize_matrix(h, size), jnp.float32)
  cols = jnp.asarray(_antialiased_resize_matrix(w, size), jnp.float32)
  resized = jnp.einsum("ih,bhwc,jw->bijc", rows, images.astype(jnp.float32), cols,
                       precision=jax.lax.Precision.HIGHEST)
  mean, std = jnp.asarray(CLIP_MEAN, jnp.float32), jnp.asarray(CLIP_STD, jnp.float32)
  return ((resized + 1.0) / 2.0 - mean) / std
