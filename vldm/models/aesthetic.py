"""LAION's improved aesthetic predictor: an MLP on CLIP ViT-L/14 image embeddings → a 1–10 score.

The `MLP` of christophschuhmann/improved-aesthetic-predictor (`simple_inference.py`) with the
published `sac+logos+ava1-l14-linearMSE.pth` weights: five Linear layers with no activations
between them (the "linear" of linearMSE; the ReLUs are commented out in the original), Dropout
after the first three. Dropout is the identity at inference and omitted here; the Linear layers
keep their `nn.Sequential` indices (`layers_0, 2, 4, 6, 7` ↔ `layers.{0,2,4,6,7}.weight`), so the
checkpoint loads by name (`vldm.convert.torch_state.load_aesthetic_params`).

  params = torch_state.load_aesthetic_params('sac+logos+ava1-l14-linearMSE.pth')  # vldm.convert
  scores = AestheticMLP().apply({'params': params}, image_embeds)  # [..., 768] → [...]

`image_embeds` are CLIP ViT-L/14 image embeddings (OpenAI CLIP's `encode_image`, i.e. the
projected `image_embeds` of `vldm.models.clip.CLIPVisionModelWithProjection`), unnormalised: the
model L2-normalises them itself, as the original inference script does before the MLP.
"""

# linen modules define `__call__` with their own arguments.
# pylint: disable=arguments-differ
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

CLIP_L14_WIDTH = 768
# (Sequential index, output width) of each Linear; indices 1, 3, 5 are the Dropouts.
LAYERS = ((0, 1024), (2, 128), (4, 64), (6, 16), (7, 1))


def l2_normalize(x, axis: int = -1):
  """x / ‖x‖₂ along `axis`; all-zero vectors stay zero (the original divides them by 1)."""
  x = jnp.asarray(x, jnp.float32)
  norm = jnp.linalg.norm(x, axis=axis, keepdims=True)
  return x / jnp.where(norm == 0, 1.0, norm)


class AestheticMLP(nn.Module):
  """CLIP image embeddings [..., embed_dim] → aesthetic scores [...] (higher is better).

  `embed_dim` is the embedding width (768 for ViT-L/14); embeddings are L2-normalised first.
  """

  embed_dim: int = CLIP_L14_WIDTH
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_embeds):
    if image_embeds.shape[-1] != self.embed_dim:
      raise ValueError(
          f"Expected embeddings of width {self.embed_dim}, got shape {image_embeds.shape}."
      )
    x = l2_normalize(image_embeds).astype(self.dtype)
    for index, features in LAYERS:
      x = nn.Dense(
          features, dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{index}"
      )(x)
    return x[..., 0]

  def example_inputs(self):
    return (jnp.zeros((1, self.embed_dim), jnp.float32),)
