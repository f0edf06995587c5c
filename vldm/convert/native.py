"""vldm's own UNet folder format, 'VldmUNet': any `vldm.models.unet.UNet`, image or video.

For UNets that no diffusers class describes, e.g. a Video LDM UNet (an SD UNet inflated by
`vldm.models.inflate`, with its merge strategy, text-motion embedding, temporal conv choice, ...).
`save_diffusers` picks it by itself for such UNets (see `registry.export_class_of`); any UNet can
be written this way with `save_diffusers(unet, params, path, class_name='VldmUNet')`.

  config.json                          {"_class_name": "VldmUNet", "_vldm_version": "0.1.0",
                                        "_vldm_format": 1, <every architecture field of UNet>}
  diffusion_pytorch_model.safetensors  {'down_blocks_0/resnets_0/spatial_res_block/conv1/kernel':
                                        float32, Flax layout, ...}: vldm's own parameter paths

Sequences are stored as JSON lists and read back as tuples. The computation settings
(`COMPUTE_FIELDS`: dtype, param_dtype, remat_policy, attention_implementation) are not saved: they
belong to the machine and run, not to the weights; the loaded UNet has the defaults (float32, no
remat, JAX's attention), and a run sets its own with `unet.clone(dtype=..., remat_policy=...)`, as
`vldm.recipes.components` does. Diffusers' `from_pretrained` cannot read these folders.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata

from vldm.convert import registry
from vldm.convert.core import ConversionError
from vldm.models import unet as unet_lib

CLASS_NAME = "VldmUNet"
# Bumped when the folder layout changes incompatibly; loaders refuse newer formats.
FORMAT_VERSION = 1
COMPUTE_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention_implementation")
ARCHITECTURE_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(unet_lib.UNet)
    if f.init and f.name not in ("parent", "name") + COMPUTE_FIELDS
)


def vldm_version() -> str:
  try:
    return importlib.metadata.version("vldm")
  except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
    return "unknown"


def _to_json(value):
  if isinstance(value, (tuple, list)):
    return [_to_json(v) for v in value]
  return value.item() if hasattr(value, "item") else value  # numpy scalars → Python


def _from_json(value):
  return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


def to_config(module: unet_lib.UNet) -> dict:
  problems = _check(module)
  if problems:
    raise ConversionError(f"Cannot save as {CLASS_NAME}: " + "; ".join(problems) + ".")
  config = {name: _to_json(getattr(module, name)) for name in ARCHITECTURE_FIELDS}
  return {
      "_class_name": CLASS_NAME,
      "_vldm_version": vldm_version(),
      "_vldm_format": FORMAT_VERSION,
      **config,
  }


def from_config(config: dict) -> unet_lib.UNet:
  version = config.get("_vldm_format", FORMAT_VERSION)
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise ConversionError(
        f"This {CLASS_NAME} folder has _vldm_format={version!r} (written by vldm "
        f"{config.get('_vldm_version', '?')}); this vldm reads formats up to "
        f"{FORMAT_VERSION}."
    )
  fields = {k: v for k, v in config.items() if not k.startswith("_")}  # '_…': bookkeeping
  compute = sorted(set(fields) & set(COMPUTE_FIELDS))
  if compute:
    raise ConversionError(
        f"{CLASS_NAME} config.json sets computation settings {compute}: they are "
        f"not part of a saved UNet; set them after loading with "
        f"unet.clone({compute[0]}=...)."
    )
  unknown = sorted(set(fields) - set(ARCHITECTURE_FIELDS))
  if unknown:
    raise ConversionError(
        f"{CLASS_NAME} config.json has unknown fields {unknown} (from a newer "
        f"vldm?); accepted: {', '.join(ARCHITECTURE_FIELDS)}."
    )
  module = unet_lib.UNet(**{k: _from_json(v) for k, v in fields.items()})
  try:
    module.check_config()
  except ValueError as e:
    raise ConversionError(f"Unsupported {CLASS_NAME} config: {e}") from e
  return module


def _check(module) -> list[str]:
  if not isinstance(module, unet_lib.UNet):
    return [f"it is a {type(module).__name__}; {CLASS_NAME} holds a vldm.models.unet.UNet"]
  return []  # every architecture field is saved


registry.register(
    registry.ModelFormat(
        class_name=CLASS_NAME,
        weights_file=registry.DIFFUSERS_WEIGHTS,
        from_config=from_config,
        to_config=to_config,
        init_args=lambda module: module.example_inputs(),
        check=_check,
        layout="vldm",
    )
)
registry.register_native(unet_lib.UNet, CLASS_NAME)
