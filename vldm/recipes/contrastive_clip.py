"""A CLIP image tower trained contrastively on captioned frames: `ContrastiveClipTask`.

Stable Video Diffusion's image-to-video model reads its conditioning frame twice: the VAE latents
(layout, colour) and a frozen CLIP image embedding (what is in the frame). Published SVD folders
bring a trained CLIP ViT-H; data of one's own without a fitting CLIP (the shapes clips, whose
frames no published CLIP has seen) need one trained on it, or the embedding says nothing (a random
tower's embedding carries colour at most). This stage trains one as CLIP is trained (Radford et
al. 2021): an image tower (`CLIPVisionModelWithProjection`, the class SVD's image encoder has) and
a text tower (`CLIPTextModel` + a linear projection) map a frame and its caption to unit vectors;
the loss is the symmetric cross-entropy of their scaled cosine similarities, with a learned
temperature. Captions repeat within a batch of a small vocabulary, so every frame whose caption
equals a text's counts as its match (the targets spread over them): plain InfoNCE would push
equal captions apart.

Config (`ldm.*` as the latent-diffusion stages name the same parts): `ldm.image_encoder.model`
(CLIPVisionConfig fields), `ldm.text_encoder.model`, `ldm.tokenizer`, `ldm.projection_dim`;
`data` an image dataset with captions (no caption dropout). Parameters: {'image_encoder',
'text_encoder', 'text_projection', 'logit_scale'}. An image-to-video stage reads the image tower
with `ldm.image_encoder.workdir` set to this stage's workdir.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vldm.pipelines import image_to_video as i2v_pipeline
from vldm.recipes import common
from vldm.recipes import components as components_lib
from vldm.train import tasks as tasks_lib

INITIAL_TEMPERATURE = 0.07  # CLIP's: logit scale ln(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the learned scale at 100


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def matching_targets(input_ids):
  """[B, B] row-stochastic targets: row i spreads over the examples whose token ids equal i's."""
  same = jnp.all(input_ids[:, None, :] == input_ids[None, :, :], axis=-1).astype(jnp.float32)
  return same / jnp.sum(same, axis=-1, keepdims=True)


def contrastive_loss(image_embeds, text_embeds, logit_scale, targets):
  """(loss, image→text accuracy): CLIP's symmetric cross-entropy on unit embeddings [B, P]; an
  image's prediction is right when its best text is one of its targets."""
  logits = jnp.exp(logit_scale) * _unit(image_embeds) @ _unit(text_embeds).T
  per_image = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=1), axis=1)
  per_text = -jnp.sum(targets.T * jax.nn.log_softmax(logits.T, axis=1), axis=1)
  loss = 0.5 * (jnp.mean(per_image) + jnp.mean(per_text))
  best = jnp.argmax(logits, axis=1)
  accuracy = jnp.mean(jnp.take_along_axis(targets, best[:, None], axis=1)[:, 0] > 0)
  return loss, accuracy


class ContrastiveClipTask(tasks_lib.Task):
  """CLIP's contrastive training of an image and a text tower (see the module docstring)."""

  def __init__(self, config):
    super().__init__(config)
    c = config.ldm
    if config.data.kind != "image":
      raise components_lib.ComponentError(
          f"The contrastive CLIP stage trains on captioned images (data.kind 'image'); got "
          f"{config.data.kind!r}."
      )
    if config.data.get("caption_dropout", 0.0):
      raise components_lib.ComponentError(
          "data.caption_dropout must be 0 for the contrastive CLIP stage: a dropped caption is an "
          "empty text that would match every other dropped one."
      )
    self.tokenizer = components_lib.make_tokenizer(config)
    self.text_encoder = components_lib.make_text_encoder(config, self.tokenizer)
    self.image_encoder = components_lib.make_image_encoder(config, c.projection_dim)
    self.clip_mean, self.clip_std = components_lib.clip_normalization(config)

  def init_params(self, rng):
    image_key, text_key, projection_key = jax.random.split(rng, 3)
    size = self.image_encoder.image_size
    pixels = jnp.zeros((1, size, size, 3), jnp.float32)
    ids = jnp.zeros((1, self.tokenizer.max_length), jnp.int32)
    width = self.text_encoder.hidden_size
    return {
        "image_encoder": self.image_encoder.init(image_key, pixels)["params"],
        "text_encoder": self.text_encoder.init(text_key, ids)["params"],
        "text_projection": jax.random.normal(
            projection_key, (width, self.config.ldm.projection_dim), jnp.float32
        )
        / math.sqrt(width),
        "logit_scale": jnp.asarray(-math.log(INITIAL_TEMPERATURE), jnp.float32),
    }

  def embeddings(self, params, images, input_ids):
    """(image embeds [B, P] of images [B, H, W, 3] in [-1, 1], text embeds [B, P])."""
    image_embeds = i2v_pipeline.image_embeddings(
        self.image_encoder,
        params["image_encoder"],
        images,
        clip_mean=self.clip_mean,
        clip_std=self.clip_std,
    )[:, 0]
    pooled = self.text_encoder.apply({"params": params["text_encoder"]}, input_ids)[1]
    return image_embeds, pooled @ params["text_projection"]

  def loss_fn(self, params, frozen, batch, rng):
    del frozen, rng
    image_embeds, text_embeds = self.embeddings(params, batch["image"], batch["input_ids"])
    scale = jnp.minimum(params["logit_scale"], MAX_LOGIT_SCALE)
    loss, accuracy = contrastive_loss(
        image_embeds, text_embeds, scale, matching_targets(batch["input_ids"])
    )
    return loss, dict(accuracy=accuracy, temperature=jnp.exp(-scale))

  def make_data(self, sharding, process_index, process_count):
    return common.make_data(
        self.config.data, sharding, process_index, process_count, self.tokenizer
    )
