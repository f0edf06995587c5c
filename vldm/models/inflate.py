"""Video LDM's stage hand-off: an image UNet becomes a video UNet by inserting temporal layers.

The video UNet (`UNet(temporal=True)`) holds the image UNet's layers unchanged. With Video LDM's
alignment layers they are under the spatio-temporal naming: `…resnets_j/<res block>` →
`…resnets_j/spatial_res_block/<res block>`; transformers keep their names. Everything else in it
is new ('temporal'): temporal res blocks, temporal transformer blocks, frame position embeddings,
α blenders (`time_mixer`) and, when enabled, the added-time-ids embedding. With the image-only
indicator set (or α fixed to 1) the video UNet computes exactly the image UNet, frame by frame.
With AnimateDiff's motion modules (`temporal_kind='motion_module'`) every image layer keeps its
own name and the temporal layers are the `motion_modules_j`; with ModelScope's
(`temporal_kind='modelscope'`) likewise, the temporal layers being `temp_convs_j`,
`temp_attentions_j` and `transformer_in`.

  video = video_config_from_image(image, merge_strategy='learned_with_images')
  video_params = inflate(image_params, video, rng)
  labels = label_params(video_params)          # 'spatial' / 'temporal', for optax.multi_transform
  spatial, temporal = split_params(video_params)  # train `temporal` only; merge_params to apply
  personal = transplant_temporal(video_params, dreambooth_image_params)
"""
from __future__ import annotations

import re
from typing import Any

import jax
from flax import traverse_util
from flax.core import unfreeze

from vldm.models import unet as unet_lib

SPATIAL, TEMPORAL = "spatial", "temporal"

# Options a video UNet may set beyond its image UNet's (the spatial layers stay as they are).
TEMPORAL_OPTIONS = ("merge_factor", "merge_strategy", "temporal_conv_implementation",
                    "text_motion_embedding", "zero_init_temporal_outputs",
                    "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                    "num_frames", "eps_convention", "attention_implementation", "remat_policy",
                    "dtype", "param_dtype", "temporal_kind", "motion_num_attention_heads",
                    "motion_max_seq_length", "temporal_transformer_layers_per_block",
                    "temporal_transformer_layers_per_mid_block", "use_motion_mid_block")

# Module names that exist only in the video UNet.
_TEMPORAL_NAMES = re.compile(
    r"temporal_res_block|time_mixer|time_pos_embed|temporal_transformer_blocks_\d+|add_embedding|"
    r"text_motion_embed|motion_modules_\d+|temp_convs_\d+|temp_attentions_\d+|transformer_in")
_RESNET = re.compile(r"resnets_\d+")
_SPATIAL_RES_BLOCK = "spatial_res_block"


def video_config_from_image(image_unet: unet_lib.UNet, **temporal_options) -> unet_lib.UNet:
  """The video UNet matching `image_unet`: same spatial layers, temporal layers switched on.

  `temporal_options` (see TEMPORAL_OPTIONS): α blenders (`merge_factor` is the initial mix
  parameter; `merge_strategy` 'learned_with_images' / 'learned' / 'fixed'), the temporal conv
  implementation, SVD-style added-time-ids micro-conditioning (`addition_time_embed_dim`,
  `projection_class_embeddings_input_dim`; off by default, as in Video LDM), `eps_convention='svd'`
  (the per-block norm epsilons diffusers' SVD UNet hard-codes, for a UNet exported in its layout),
  and computation settings. `temporal_kind='motion_module'` inserts AnimateDiff's motion modules
  instead (their options: `motion_num_attention_heads`, `motion_max_seq_length`, ...; see `UNet`).
  """
  if image_unet.temporal:
    raise ValueError("video_config_from_image takes an image UNet (temporal=False).")
  unknown = sorted(set(temporal_options) - set(TEMPORAL_OPTIONS))
  if unknown:
    raise ValueError(f"Unknown temporal options {unknown}; accepted: {', '.join(TEMPORAL_OPTIONS)}. "
                     f"(Spatial options come from the image UNet.)")
  names = unet_lib.block_names(True, temporal_options.get("temporal_kind", "alignment"))
  options = dict(addition_time_embed_dim=None, projection_class_embeddings_input_dim=None)
  options.update(temporal_options)
  video = image_unet.clone(
      parent=None, temporal=True,
      down_block_types=tuple(names.get(t, t) for t in image_unet.down_block_types),
      mid_block_type=names.get(image_unet.mid_block_type, image_unet.mid_block_type),
      up_block_types=tuple(names.get(t, t) for t in image_unet.up_block_types), **options)
  video.check_config()
  return video


def is_temporal(path) -> bool:
  """Whether a parameter path (tuple of names) belongs to a layer the image UNet does not have."""
  return any(_TEMPORAL_NAMES.fullmatch(name) for name in path)


def video_path(image_path, wrap_resnets: bool = True) -> tuple:
  """Where an image-UNet parameter lives in the video UNet (`wrap_resnets=False`: a UNet with
  motion modules, where it keeps its path)."""
  out = []
  for name in image_path:
    out.append(name)
    if wrap_resnets and _RESNET.fullmatch(name):
      out.append(_SPATIAL_RES_BLOCK)
  return tuple(out)


def image_path(video_path_) -> tuple:
  """The inverse of `video_path`, for a spatial parameter of the video UNet."""
  return tuple(name for name in video_path_ if name != _SPATIAL_RES_BLOCK)


def _flat(params) -> dict:
  return traverse_util.flatten_dict(unfreeze(params))


def label_params(video_params) -> Any:
  """A pytree shaped like `video_params` with 'spatial' or 'temporal' at each leaf.

  Use with `optax.multi_transform({'spatial': optax.set_to_zero(), 'temporal': opt}, labels)` to
  freeze the image layers, as Video LDM does.
  """
  return traverse_util.unflatten_dict(
      {path: TEMPORAL if is_temporal(path) else SPATIAL for path in _flat(video_params)})


def temporal_mask(video_params) -> Any:
  """True at temporal leaves (for `optax.masked`)."""
  return traverse_util.unflatten_dict({path: is_temporal(path) for path in _flat(video_params)})


def split_params(video_params) -> tuple[dict, dict]:
  """(spatial, temporal) parameter subtrees; `merge_params` puts them back together.

  Differentiating a loss of `merge_params(spatial, temporal)` with respect to `temporal` alone
  computes no gradient for the frozen spatial layers.
  """
  flat = _flat(video_params)
  spatial = {p: v for p, v in flat.items() if not is_temporal(p)}
  temporal = {p: v for p, v in flat.items() if is_temporal(p)}
  return traverse_util.unflatten_dict(spatial), traverse_util.unflatten_dict(temporal)


def merge_params(spatial, temporal) -> dict:
  return traverse_util.unflatten_dict({**_flat(spatial), **_flat(temporal)})


def spatial_params(video_params) -> dict:
  """The image UNet's parameters inside a video UNet (image naming)."""
  flat = _flat(video_params)
  return traverse_util.unflatten_dict(
      {image_path(p): v for p, v in flat.items() if not is_temporal(p)})


def _replace_spatial(video_params, image_params) -> dict:
  """`video_params` with every spatial leaf taken from `image_params` (all of them must fit).

  Spatial leaves of `video_params` may be shape placeholders (jax.ShapeDtypeStruct).
  """
  target = _flat(video_params)
  # Alignment-layer UNets wrap every res block; motion-module UNets leave them as they are.
  wrapped = any(_SPATIAL_RES_BLOCK in path for path in target)
  unexpected, wrong_shape = [], []
  out = dict(target)
  seen = set()
  for path, value in _flat(image_params).items():
    dest = video_path(path, wrapped)
    if dest not in target or is_temporal(dest):
      unexpected.append("/".join(path))
      continue
    seen.add(dest)
    if tuple(value.shape) != tuple(target[dest].shape):
      wrong_shape.append(f"{'/'.join(path)}: image {tuple(value.shape)} vs video "
                         f"{tuple(target[dest].shape)}")
    else:
      out[dest] = value
  missing = ["/".join(image_path(p)) for p in target if not is_temporal(p) and p not in seen]
  problems = []
  for what, names in (("missing in the image params", missing),
                      ("not in the video UNet", unexpected), ("shape mismatches", wrong_shape)):
    if names:
      more = f" … and {len(names) - 10} more" if len(names) > 10 else ""
      problems.append(f"{what} ({len(names)}): {', '.join(sorted(names)[:10])}{more}")
  if problems:
    raise ValueError("The image UNet's parameters do not fit the video UNet's spatial layers: "
                     + "; ".join(problems) + ". Build the video UNet with "
                     "video_config_from_image(image_unet).")
  return traverse_util.unflatten_dict(out)


def inflate(image_params, video_module: unet_lib.UNet, rng) -> dict:
  """Video-UNet parameters: the image UNet's weights, temporal layers freshly initialised."""
  if not video_module.temporal:
    raise ValueError("inflate needs a video UNet (temporal=True); see video_config_from_image.")
  inputs = video_module.example_inputs()
  shapes = jax.eval_shape(lambda: video_module.init(rng, *inputs))["params"]
  # Only the temporal layers are initialised: XLA drops the spatial initialisers.
  temporal = jax.jit(lambda key: split_params(video_module.init(key, *inputs)["params"])[1])(rng)
  return _replace_spatial(merge_params(split_params(shapes)[0], temporal), image_params)


def transplant_temporal(video_params, image_params) -> dict:
  """The temporal layers of a trained video UNet on another image UNet of the same architecture.

  Video LDM's personalised text-to-video: e.g. a DreamBooth-tuned image model animated by temporal
  layers trained on the base model. For motion-module UNets this is what diffusers'
  `UNetMotionModel.from_unet2d(image_unet, motion_adapter)` builds.
  """
  return _replace_spatial(video_params, image_params)
