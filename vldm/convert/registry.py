"""Which vldm module stands for which diffusers / transformers class, and how to move between them."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import numpy as np

from vldm.convert import core

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class ModelFormat:
  """How one reference class maps onto a vldm module.

  from_config:   reference config.json dict → vldm module.
  to_config:     vldm module → reference config.json dict (with `_class_name` / `architectures`).
  init_args:     module → example inputs for `module.init` (tiny shapes, only traced for shapes).
  init_method:   the module method `init` runs through (None: __call__).
  rename_keys:   state dict → state dict, for legacy key names (applied before matching).
  ignore:        regexes of reference keys to drop (non-parameter buffers).
  """
  class_name: str
  weights_file: str
  from_config: Callable[[dict], nn.Module]
  to_config: Callable[[nn.Module], dict]
  init_args: Callable[[nn.Module], tuple]
  init_method: Any = None
  rename_keys: Callable[[dict], dict] = lambda state: state
  ignore: tuple[str, ...] = ()

  def param_shapes(self, module: nn.Module):
    kw = {} if self.init_method is None else {"method": self.init_method}
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *self.init_args(module), **kw))
    return variables["params"]


_FORMATS: dict[str, ModelFormat] = {}


def register(fmt: ModelFormat) -> ModelFormat:
  _FORMATS[fmt.class_name] = fmt
  return fmt


def supported_classes() -> list[str]:
  return sorted(_FORMATS)


def read_config(path: str) -> dict:
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise core.ConversionError(f"{path} is not a diffusers or transformers model folder: it has no "
                               f"config.json. Supported classes: {', '.join(supported_classes())}.")
  with open(config_path) as f:
    return json.load(f)


def class_name_of(config: dict) -> str:
  """diffusers configs name their class in `_class_name`; transformers ones in `architectures`."""
  if "_class_name" in config:
    return config["_class_name"]
  architectures = config.get("architectures") or []
  return architectures[0] if architectures else config.get("model_type", "<unnamed>")


def format_for(name: str) -> ModelFormat:
  if name not in _FORMATS:
    raise core.ConversionError(f"Unsupported model class {name!r}. Supported classes: "
                               f"{', '.join(supported_classes())}.")
  return _FORMATS[name]


def load_diffusers(path: str):
  """Loads a diffusers model folder or a transformers CLIP folder → (flax module, params).

  The class comes from config.json; see DESIGN.md for each class's call signature.
  """
  config = read_config(path)
  fmt = format_for(class_name_of(config))
  module = fmt.from_config(config)
  state = fmt.rename_keys(core.read_safetensors(os.path.join(path, fmt.weights_file)))
  state = {k: v.astype(np.float32) if v.dtype != np.float32 else v for k, v in state.items()}
  params = core.torch_to_flax(state, fmt.param_shapes(module), ignore=fmt.ignore)
  return module, params


def save_diffusers(module: nn.Module, params, path: str) -> None:
  """Writes `module` and `params` as a folder that diffusers / transformers `from_pretrained` load."""
  fmt = _format_of_module(module)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(fmt.to_config(module), f, indent=2, sort_keys=True)
  core.write_safetensors(core.flax_to_torch(params), os.path.join(path, fmt.weights_file))


def _format_of_module(module: nn.Module) -> ModelFormat:
  name = getattr(module, "reference_class", type(module).__name__)
  return format_for(name)


def module_fields(module: nn.Module, names: Iterable[str]) -> dict:
  """The given dataclass fields of a module as JSON-ready values (tuples → lists)."""
  out = {}
  for name in names:
    value = getattr(module, name)
    out[name] = list(value) if isinstance(value, tuple) else value
  return out


def config_kwargs(cls, config: dict, rename: dict | None = None) -> dict:
  """The entries of a reference config that are fields of `cls` (tuples for lists)."""
  rename = rename or {}
  fields = {f.name for f in dataclasses.fields(cls)}
  out = {}
  for key, value in config.items():
    key = rename.get(key, key)
    if key in fields:
      out[key] = tuple(value) if isinstance(value, list) else value
  return out
