"""Feature networks of the metrics and of curation, jitted, batched and split over devices.

  ClipEmbedder(folder)       CLIP image / text embeddings (a transformers CLIPModel folder)
  I3DFeatures(weights)       FVD's I3D: a clip's 400 Kinetics logits, averaged over time
  InceptionFeatures(weights) FID's InceptionV3: a frame's 2048-d pool3 features

Each runs a jitted function on batches of a fixed size (the last one padded, its padding dropped),
so a result does not depend on what else was in the batch, and each batch is split over this
host's devices (`vldm.devices.split_batch`; the weights replicated): the chips of a TPU VM or a GPU
host compute together. Inputs are uint8 frames; each network's own preprocessing (the reference
implementation's resize and value range) runs inside the jitted function.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from vldm import devices
from vldm.convert import clip as _clip_formats  # pylint: disable=unused-import  # registers CLIP
from vldm.convert import core
from vldm.convert import registry
from vldm.convert import torch_state
from vldm.data import transforms
from vldm.models import clip
from vldm.models import fid_inception
from vldm.models import i3d
from vldm.models import tokenizer as tokenizer_lib


def batches(inputs, batch_size):
  """Yields (batch padded to batch_size by repeating the last row, number of real rows)."""
  for i in range(0, len(inputs), batch_size):
    chunk = inputs[i : i + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    yield chunk, batch_size - pad


def run_batched(fn, params, inputs, batch_size, desc=None):
  """fn(params, batch) over `inputs` in fixed-size batches split over the devices → [N, ...];
  with `desc`, a progress bar (on a terminal)."""
  inputs = np.asarray(inputs)
  chunks = batches(inputs, batch_size)
  if desc:
    total = -(-len(inputs) // batch_size)
    chunks = tqdm.tqdm(chunks, desc=desc, total=total, disable=not sys.stderr.isatty())
  out = [np.asarray(fn(params, *devices.split_batch(batch)))[:n] for batch, n in chunks]
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def l2_normalize(x, axis=-1):
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def _split_state(state, prefixes):
  return {k: v for k, v in state.items() if k.startswith(prefixes)}


def load_clip_folder(path, flag="config.clip"):
  """A transformers CLIPModel folder (config.json, model.safetensors, tokenizer files) →
  (text module, text params, vision module, vision params, tokenizer).

  Reuses the converters registered for CLIPTextModelWithProjection and
  CLIPVisionModelWithProjection on the two halves of CLIPModel's state dict. `flag` names the
  option that gave the folder, for the errors.
  """
  if not os.path.isdir(path):
    raise ValueError(
        f"{flag}={path!r} is not a folder. It must be a transformers CLIPModel folder "
        "(config.json, model.safetensors, and the tokenizer's vocab.json + merges.txt or "
        "tokenizer.json), as CLIPModel.save_pretrained + CLIPTokenizer.save_pretrained write."
    )
  config = registry.read_config(path)
  if registry.class_name_of(config) != "CLIPModel" or "text_config" not in config:
    raise ValueError(
        f"{path}/config.json describes a {registry.class_name_of(config)!r}; {flag} needs a "
        "CLIPModel folder (text and vision towers with projections)."
    )
  weights = os.path.join(path, registry.TRANSFORMERS_WEIGHTS)
  if not os.path.isfile(weights):
    raise ValueError(f"{flag}={path!r} has no {registry.TRANSFORMERS_WEIGHTS}.")
  state = {k: v.astype(np.float32) for k, v in core.read_safetensors(weights).items()}
  projection_dim = config.get("projection_dim", 512)
  halves = []
  for class_name, sub, prefixes in (
      ("CLIPTextModelWithProjection", "text_config", ("text_model.", "text_projection.")),
      ("CLIPVisionModelWithProjection", "vision_config", ("vision_model.", "visual_projection.")),
  ):
    fmt = registry.format_for(class_name)
    module = fmt.from_config(
        {**config[sub], "architectures": [class_name], "projection_dim": projection_dim}
    )
    sub_state = fmt.rename_keys(_split_state(state, prefixes))
    halves += [module, core.torch_to_flax(sub_state, fmt.param_shapes(module), ignore=fmt.ignore)]
  return (*halves, tokenizer_lib.CLIPBPETokenizer(path))


def center_square(frames):
  """uint8 [N, H, W, 3] → the centred square crops (CLIP's own preprocessing crops too)."""
  h, w = frames.shape[1:3]
  side = min(h, w)
  top, left = transforms.crop_box(h, w, side)
  return frames[:, top : top + side, left : left + side]


class ClipEmbedder:
  """CLIP image embeddings of frames and text embeddings of captions.

  Frames are centre-cropped to a square, then resized as SVD's image encoder input is
  (`clip.preprocess_for_clip`: anti-aliased bicubic to the tower's size, CLIP's mean / std).
  """

  def __init__(self, path, batch_size=32, flag="config.clip"):
    text, text_params, vision, vision_params, self.tokenizer = load_clip_folder(path, flag)
    self._text_params, self._vision_params = devices.replicate((text_params, vision_params))
    self.batch_size = batch_size
    self.projection_dim = vision.projection_dim
    size = vision.image_size

    def embed_images(params, frames):
      pixels = clip.preprocess_for_clip(frames.astype(jnp.float32) / 127.5 - 1.0, size)
      return vision.apply({"params": params}, pixels)

    def embed_texts(params, ids):
      return text.apply({"params": params}, ids)[1]

    self._embed_images = jax.jit(embed_images)
    self._embed_texts = jax.jit(embed_texts)

  def image_embeds(self, frames):
    """uint8 [N, H, W, 3] → unnormalised image embeddings float32 [N, P]."""
    frames = center_square(np.asarray(frames))
    return run_batched(self._embed_images, self._vision_params, frames, self.batch_size)

  def text_embeds(self, captions):
    """Unnormalised text embeddings float32 [C, P]."""
    ids = self.tokenizer(list(captions))
    return run_batched(self._embed_texts, self._text_params, ids, self.batch_size)

  def caption_embeds(self, captions):
    """L2-normalised text embeddings [C, P] of the captions."""
    return l2_normalize(self.text_embeds(captions))


class _StateDictFeatures:
  """A feature network whose weights are a PyTorch state dict: loaded, replicated, jitted."""

  dim: int
  what: str  # the file, for the error

  def __init__(self, path, batch_size, flag, load, features_fn):
    if not os.path.isfile(path):
      raise ValueError(f"{flag}={path!r} is not a file; it must be {self.what}.")
    self._variables = devices.replicate(load(path))
    self.batch_size = batch_size
    self._fn = jax.jit(features_fn)

  def __call__(self, inputs):
    return run_batched(self._fn, self._variables, inputs, self.batch_size, type(self).__name__)


class I3DFeatures(_StateDictFeatures):
  """FVD's features: I3D's Kinetics-400 logits of clips uint8 [N, T, H, W, 3], averaged over time
  (cd-fvd's I3D) → float32 [N, 400]."""

  dim = i3d.NUM_CLASSES
  what = "the PyTorch I3D state dict that FVD uses (cd-fvd / TATS i3d_pretrained_400.pt)"

  def __init__(self, path, batch_size=8, flag="--i3d_weights"):
    super().__init__(path, batch_size, flag, torch_state.load_i3d_params, i3d.features)


class InceptionFeatures(_StateDictFeatures):
  """FID's features: the TF-ported InceptionV3's 2048-d pool3 (pytorch-fid's network) of frames
  uint8 [N, H, W, 3] → float32 [N, 2048]."""

  dim = fid_inception.FEATURES
  what = (
      "the PyTorch FID Inception state dict (pytorch-fid / torch-fidelity "
      "pt_inception-2015-12-05-6726825d.pth)"
  )

  def __init__(self, path, batch_size=32, flag="--inception_weights"):
    super().__init__(
        path, batch_size, flag, torch_state.load_fid_inception_params, fid_inception.features
    )
