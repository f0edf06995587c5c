"""PyTorch `.pth` state-dict files → Flax variables, for models published as bare state dicts.

Some networks vldm uses (the curation scorers: CRAFT, the LAION aesthetic MLP; the metrics' I3D
and FID Inception) are published as `torch.save(model.state_dict())` pickles, not as diffusers /
transformers folders. Reading them needs torch (`weights_only=True`: tensors only, no code runs).
Keys saved from `nn.DataParallel` start with `module.`; the prefix is dropped.

BatchNorm running statistics are buffers in PyTorch but the `batch_stats` collection in Flax:
`torch_to_flax_variables` maps `running_mean` / `running_var` to `mean` / `var` there, and checks
parameters and statistics together (`core.torch_to_flax`), so one error lists every misfit.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

import jax
import numpy as np
from flax import traverse_util

from vldm.convert import core
from vldm.models import aesthetic
from vldm.models import craft
from vldm.models import fid_inception
from vldm.models import i3d

DATA_PARALLEL_PREFIX = "module."
# Flax BatchNorm statistic → PyTorch buffer name.
_STAT_TO_TORCH = {"mean": "running_mean", "var": "running_var"}
_TORCH_TO_STAT = {v: k for k, v in _STAT_TO_TORCH.items()}
# A BatchNorm's update counter: training bookkeeping, no part of the inference computation.
_BATCH_COUNTERS = (r".*\.num_batches_tracked",)


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A `torch.save`d state dict → {key: numpy array}; float tensors as float32.

  Accepts a bare state dict or one under 'state_dict' (Lightning checkpoints); strips the
  `module.` prefix of DataParallel checkpoints.
  """
  if not os.path.isfile(path):
    raise core.ConversionError(f"No weights file at {path}.")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"Reading the PyTorch checkpoint {path} needs torch (CPU build is enough): "
        "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    ) from e
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises pickle, zip and its own errors for broken files
    raise core.ConversionError(
        f"Cannot read {path} ({os.path.getsize(path)} bytes) as a PyTorch state dict: {e}"
    ) from e
  if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
    state = state["state_dict"]
  if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
    raise core.ConversionError(
        f"{path} holds a {type(state).__name__}, not a state dict of tensors (key → tensor)."
    )
  out = {}
  for key, value in state.items():
    if key.startswith(DATA_PARALLEL_PREFIX):
      key = key[len(DATA_PARALLEL_PREFIX) :]
    value = value.detach().cpu()
    out[key] = (value.float() if value.is_floating_point() else value).numpy()
  return out


def torch_to_flax_variables(
    state: Mapping[str, np.ndarray], template, literal_names: Iterable[str] = ()
) -> dict:
  """PyTorch-named state dict → {'params': ..., 'batch_stats': ...} shaped like `template`.

  `template` holds the two collections (e.g. `jax.eval_shape(module.init, ...)`); a model without
  BatchNorm may omit 'batch_stats'. Missing, unexpected and mis-shaped weights (running statistics
  included) are listed by PyTorch key in one `ConversionError`.
  """
  flat_params = traverse_util.flatten_dict(template["params"])
  flat_stats = traverse_util.flatten_dict(template.get("batch_stats", {}))
  # Statistics join the parameter tree under their PyTorch buffer names (leaves of the same
  # module path), so one renaming pass covers both.
  joint = dict(flat_params)
  joint.update({path[:-1] + (_STAT_TO_TORCH[path[-1]],): v for path, v in flat_stats.items()})
  flat = traverse_util.flatten_dict(
      core.torch_to_flax(
          state,
          traverse_util.unflatten_dict(joint),
          ignore=_BATCH_COUNTERS,
          literal_names=literal_names,
      )
  )
  params = {p: v for p, v in flat.items() if p[-1] not in _TORCH_TO_STAT}
  stats = {p[:-1] + (_TORCH_TO_STAT[p[-1]],): v for p, v in flat.items() if p[-1] in _TORCH_TO_STAT}
  variables = {"params": traverse_util.unflatten_dict(params)}
  if stats:
    variables["batch_stats"] = traverse_util.unflatten_dict(stats)
  return variables


def load_craft_params(path: str) -> dict:
  """A CRAFT PyTorch state dict (`craft_mlt_25k.pth`) → {'params': ..., 'batch_stats': ...}.

  Keys may carry DataParallel's `module.` prefix (the published file's do) or not. A file of
  another network raises `ConversionError` (a ValueError) naming the missing and unexpected keys.
  """
  module = craft.CRAFT()
  template = jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())
  return torch_to_flax_variables(read_torch_state_dict(path), template)


def load_aesthetic_params(path: str, embed_dim: int = aesthetic.CLIP_L14_WIDTH) -> dict:
  """The predictor's PyTorch state dict (`sac+logos+ava1-l14-linearMSE.pth`) → Flax params.

  A file of another network (or another embedding width) raises `ConversionError` (a ValueError)
  naming the missing, unexpected and mis-shaped keys.
  """
  module = aesthetic.AestheticMLP(embed_dim)
  template = jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())
  state = read_torch_state_dict(path)
  return torch_to_flax_variables(state, template)["params"]


def load_fid_inception_params(path: str) -> dict:
  """The FID InceptionV3's PyTorch state dict → {'params': ..., 'batch_stats': ...}.

  Takes torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` or pytorch-fid's
  `pt_inception-2015-12-05-6726825d.pth` (the same keys: torchvision's InceptionV3 names, no aux
  classifier; names such as `branch3x3_1` are names, not list indices). A file of another network
  raises `ConversionError` (a ValueError) naming the missing and unexpected keys.
  """
  module = fid_inception.FIDInceptionV3()
  template = jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())
  names = {
      name
      for collection in template.values()
      for path in traverse_util.flatten_dict(collection)
      for name in path[:-1]
  }
  return torch_to_flax_variables(read_torch_state_dict(path), template, literal_names=names)


def load_i3d_params(path: str) -> dict:
  """cd-fvd's I3D PyTorch state dict (`i3d_pretrained_400.pt`) → {'params', 'batch_stats'}.

  A file of another network raises `ConversionError` (a ValueError) naming the missing and
  unexpected keys.
  """
  module = i3d.InceptionI3d()
  template = jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())
  return torch_to_flax_variables(read_torch_state_dict(path), template)
