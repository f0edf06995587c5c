"""Temporal layers on their own: a small "motion module" file to share between image models.

Video LDM's temporal layers, trained on one image model, animate another of the same architecture
(e.g. a DreamBooth-tuned one). The file holds only the temporal parameters
(`vldm.models.inflate.is_temporal`), keyed by vldm's parameter paths ('/'-joined, Flax layout,
float32), with str → str metadata in the safetensors header.

  save_temporal_layers(video_params, 'motion.safetensors', metadata={'base': 'sd15'})
  temporal = load_temporal_layers('motion.safetensors')
  # Onto another image model, inflated with the same temporal options:
  video = inflate.video_config_from_image(other_image_unet, merge_strategy='learned_with_images')
  params = attach_temporal_layers(other_image_params, video, temporal)
  # or onto video params that already exist (replaces their temporal leaves only):
  params = apply_temporal_layers(video_params, temporal)
"""

from __future__ import annotations

from typing import Mapping

import jax
from flax import traverse_util
from flax.core import unfreeze

from vldm.convert import core
from vldm.models import inflate
from vldm.models import unet as unet_lib

# The header entries vldm writes; user metadata may not reuse these keys.
CONTENT_KEY, CONTENT = "vldm_content", "temporal_layers"
_HEADER = {"format": "flax", "layout": "vldm", CONTENT_KEY: CONTENT}


def save_temporal_layers(
    video_params, path: str, *, metadata: Mapping[str, str] | None = None
) -> None:
  """Writes the temporal parameters of a video UNet's `video_params` to a .safetensors file.

  `metadata`: str → str entries for the file header (e.g. the base model, the training run).
  """
  _, temporal = inflate.split_params(video_params)
  if not temporal:
    raise core.ConversionError(
        "These parameters have no temporal layers: pass the parameters of a "
        "video UNet (temporal=True), e.g. from inflate.inflate."
    )
  metadata = dict(metadata or {})
  bad = [
      f"{k!r}: {v!r}"
      for k, v in metadata.items()
      if not isinstance(k, str) or not isinstance(v, str)
  ]
  if bad:
    raise core.ConversionError(
        f"metadata must map str to str (safetensors headers hold strings); "
        f"got {', '.join(bad)}."
    )
  reserved = sorted(set(metadata) & set(_HEADER))
  if reserved:
    raise core.ConversionError(f"metadata keys {reserved} are written by vldm; use other names.")
  core.write_safetensors(
      core.params_to_vldm_state(temporal), path, metadata={**metadata, **_HEADER}
  )


def load_temporal_layers(path: str) -> dict:
  """The nested temporal parameter dict of a file written by `save_temporal_layers`."""
  header = core.read_safetensors_metadata(path)
  state = core.read_safetensors(path)
  params = core.vldm_state_to_params(state)
  spatial = [
      core.PATH_SEPARATOR.join(p)
      for p in traverse_util.flatten_dict(params)
      if not inflate.is_temporal(p)
  ]
  if header.get(CONTENT_KEY) != CONTENT or spatial:
    what = (
        f"{len(spatial)} of its keys are not temporal layers (e.g. {spatial[0]})"
        if spatial
        else f"its header has {CONTENT_KEY}={header.get(CONTENT_KEY)!r}"
    )
    raise core.ConversionError(
        f"{path} is not a vldm temporal-layers file: {what}. Write one with "
        f"vldm.convert.save_temporal_layers."
    )
  return params


def temporal_layers_metadata(path: str) -> dict[str, str]:
  """The user metadata saved with `save_temporal_layers` (vldm's own header entries left out)."""
  return {k: v for k, v in core.read_safetensors_metadata(path).items() if k not in _HEADER}


def apply_temporal_layers(video_params, temporal) -> dict:
  """`video_params` with every temporal leaf replaced by the one in `temporal`.

  The spatial leaves stay as they are (they may be shape placeholders, jax.ShapeDtypeStruct).
  `temporal` must hold exactly the temporal layers of the video UNet, shapes included: a
  ConversionError names each missing, unexpected or mis-shaped path.
  """
  flat = traverse_util.flatten_dict(unfreeze(video_params))
  target = {p: v for p, v in flat.items() if inflate.is_temporal(p)}
  if not target:
    raise core.ConversionError(
        "video_params has no temporal layers: pass a video UNet's " "parameters (temporal=True)."
    )
  source = traverse_util.flatten_dict(unfreeze(temporal))
  core.check_fits(source, target, source="temporal layers", target="video UNet")
  return traverse_util.unflatten_dict({**flat, **source})


def attach_temporal_layers(image_params, video_module: unet_lib.UNet, temporal) -> dict:
  """The video UNet `video_module` with `image_params`' spatial layers and `temporal`'s layers.

  `video_module` is the image UNet inflated with the temporal options the layers were trained
  with (`inflate.video_config_from_image`). Nothing is initialised: the parameter shapes come from
  tracing `video_module.init`.
  """
  if not video_module.temporal:
    raise core.ConversionError(
        "attach_temporal_layers needs a video UNet (temporal=True); see "
        "inflate.video_config_from_image."
    )
  shapes = jax.eval_shape(
      lambda: video_module.init(jax.random.key(0), *video_module.example_inputs())
  )["params"]
  return inflate.transplant_temporal(apply_temporal_layers(shapes, temporal), image_params)
