"""The model scores of curation: caption–frame CLIP similarity, LAION aesthetics, CRAFT text area.

Each scorer takes the key frames of a video's clips (first, middle, last: uint8 [N, 3, H, W, 3])
and returns one float per clip. The networks are jitted once per scorer and run on batches of a
fixed size (the last one padded), so a video's scores do not depend on the other videos of the
run: a resumed run scores exactly as an uninterrupted one. Each batch is split over this host's
devices (`vldm.devices.split_batch`, the weights replicated), so a TPU VM's or a GPU host's chips
score together; hosts score their own videos.

  clip_score   mean cosine similarity of the caption embeddings with the frame embeddings (over
               the 3 frames and over the clip's captions); None for clips without captions.
  aesthetic    the LAION MLP on the CLIP image embeddings, mean over the 3 frames.
  text_area    CRAFT's fraction of the frame covered by text boxes, the max over the 3 frames
               (a caption or logo in any of them is enough to drop the clip).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from vldm import devices
from vldm.convert import torch_state
from vldm.eval import features
from vldm.models import aesthetic
from vldm.models import craft


class ClipScorer(features.ClipEmbedder):
  """CLIP image embeddings of key frames, and their similarity with captions."""

  @staticmethod
  def similarity(image_embeds, caption_embeds):
    """Mean cosine similarity of image embeddings [K, P] with normalised caption embeddings."""
    images = features.l2_normalize(image_embeds)
    return float((images @ caption_embeds.T).mean())


class AestheticScorer:
  """LAION's aesthetic MLP on CLIP image embeddings."""

  def __init__(self, path, embed_dim):
    if not os.path.isfile(path):
      raise ValueError(
          f"config.aesthetic_weights={path!r} is not a file; it must be the LAION predictor's "
          "PyTorch state dict (sac+logos+ava1-l14-linearMSE.pth)."
      )
    params = torch_state.load_aesthetic_params(path, embed_dim)
    module = aesthetic.AestheticMLP(embed_dim)
    self._apply = jax.jit(lambda embeds: module.apply({"params": params}, embeds))

  def __call__(self, image_embeds):
    return np.asarray(self._apply(jnp.asarray(image_embeds, jnp.float32)))


class CraftScorer:
  """Fraction of each frame covered by CRAFT text boxes."""

  def __init__(self, path, long_side=512, batch_size=8):
    if not os.path.isfile(path):
      raise ValueError(
          f"config.craft_weights={path!r} is not a file; it must be CRAFT's PyTorch state dict "
          "(craft_mlt_25k.pth)."
      )
    self._variables = devices.replicate(torch_state.load_craft_params(path))
    self.long_side = long_side
    self.batch_size = batch_size
    self._apply = {}

  def _fn(self, size):
    if size not in self._apply:
      module = craft.CRAFT()
      self._apply[size] = jax.jit(
          lambda variables, frames: module.apply(variables, craft.preprocess(frames, size))[0]
      )
    return self._apply[size]

  def __call__(self, frames):
    """uint8 [N, H, W, 3] → text area fractions float32 [N]."""
    frames = np.asarray(frames)
    size = craft.input_size(frames.shape[1], frames.shape[2], self.long_side)
    fn = self._fn(size)
    out = [
        craft.text_area(np.asarray(fn(self._variables, *devices.split_batch(batch)))[:n])
        for batch, n in features.batches(frames, self.batch_size)
    ]
    return np.concatenate(out)


class Scorers:
  """The model scorers the config's weights allow; `names` lists those that run."""

  def __init__(self, config):
    self.clip = self.aesthetic = self.craft = None
    if config.aesthetic_weights and not config.clip:
      raise ValueError(
          "config.aesthetic_weights needs config.clip too: the aesthetic MLP scores CLIP image "
          "embeddings (a CLIP ViT-L/14 CLIPModel folder for the published weights)."
      )
    if config.clip:
      self.clip = ClipScorer(config.clip, config.batch_size)
    if config.aesthetic_weights:
      self.aesthetic = AestheticScorer(config.aesthetic_weights, self.clip.projection_dim)
    if config.craft_weights:
      self.craft = CraftScorer(config.craft_weights, config.craft_long_side, config.batch_size)
    self.names = [
        n
        for n, s in (
            ("clip_score", self.clip),
            ("aesthetic", self.aesthetic),
            ("text_area", self.craft),
        )
        if s is not None
    ]

  def score(self, key_frames, captions):
    """key_frames uint8 [N, 3, H, W, 3] (first, middle, last of N clips), captions of the video
    (list, maybe empty) → {score name: [N] floats or None}."""
    out = {}
    if not self.names or len(key_frames) == 0:
      return out
    n = len(key_frames)
    flat = key_frames.reshape((-1,) + key_frames.shape[2:])
    if self.clip is not None:
      embeds = self.clip.image_embeds(flat).reshape((n, 3, -1))
      if captions:
        texts = self.clip.caption_embeds(captions)
        out["clip_score"] = [self.clip.similarity(e, texts) for e in embeds]
      if self.aesthetic is not None:
        out["aesthetic"] = [float(x) for x in self.aesthetic(embeds).mean(axis=1)]
    if self.craft is not None:
      out["text_area"] = [float(x) for x in self.craft(flat).reshape(n, 3).max(axis=1)]
    return out
