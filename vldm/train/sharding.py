"""Device mesh, parameter sharding strategies and activation axis rules.

The mesh comes from the config as named axes, e.g. `(('data', -1), ('fsdp', 1))`, where -1 takes
the devices left over. Batches are split over every mesh axis ('data' and 'fsdp' are both
data-parallel); parameters, optimizer state and EMA are sharded by strategy rules.

Parameter strategies (`config.sharding.params`, a sequence of `(regex, strategy)`; the first regex
that `re.search`-matches a leaf's path picks its strategy; paths look like 'params/conv_in/kernel',
'opt_state/1/0/mu/conv_in/kernel', 'ema_params/...' or 'frozen/...'):
  - 'fsdp': shard the leaf's largest axis that divides by the size of the 'fsdp' mesh axis over
    'fsdp' (ZeRO-3 style; big_vision's strategy). Convolution and dense kernels shard on their
    channel axes this way. Vectors (biases, norm scales: tiny, so replicating them saves
    collectives), scalars and leaves with no divisible axis are replicated.
  - 'replicate': a full copy on every device.
Leaves that no rule matches are replicated.

Activations: models may call `nn.with_logical_constraint(x, ('batch', ...))`; the logical names
map to mesh axes with `config.sharding.activations`, active inside the train step.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

STRATEGIES = ("fsdp", "replicate")


def make_mesh(axes: Sequence[tuple[str, int]], devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A mesh with the named axes; one size may be -1 for "the devices left over"."""
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(name for name, _ in axes)
  sizes = [int(size) for _, size in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"Mesh {tuple(axes)}: at most one axis may have size -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if known <= 0 or len(devices) % known:
      raise ValueError(f"Mesh {tuple(axes)} does not divide the {len(devices)} devices.")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f"Mesh {tuple(axes)} needs {math.prod(sizes)} devices, but there are "
        f"{len(devices)}; use -1 for one axis to take the rest."
    )
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices > 1:
    return _multislice_mesh(axes, sizes, names, devices, slices)
  return jax.make_mesh(
      tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names), devices=devices
  )


def _multislice_mesh(axes, sizes, names, devices, slices: int) -> Mesh:
  """Several TPU slices (multislice): the first axis (data) spans the slices over the data-center
  network, the others stay within a slice (FSDP's gathers on the fast interconnect)."""
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top

  if sizes[0] % slices:
    raise ValueError(
        f"Mesh {tuple(axes)} on {slices} slices: the first axis ({names[0]}, "
        f"{sizes[0]}) must be a multiple of the slice count; the other axes stay "
        f"within a slice."
    )
  per_slice = [sizes[0] // slices] + sizes[1:]
  dcn = [slices] + [1] * (len(sizes) - 1)
  grid = mesh_utils.create_hybrid_device_mesh(per_slice, dcn, devices=devices)
  return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """Every mesh axis is data-parallel for the batch."""
  return tuple(mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over all devices; other axes whole."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def path_str(path) -> str:
  """'params/down_blocks_0/conv1/kernel' for a jax key path."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def fsdp_spec(shape: Sequence[int], fsdp_size: int, axis: str = "fsdp") -> P:
  """Shards the largest axis that divides by `fsdp_size` (the last such one on ties).

  Leaves of fewer than two dimensions stay replicated.
  """
  if fsdp_size == 1 or len(shape) < 2:
    return P()
  candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
  if not candidates:
    return P()
  best = max(candidates, key=lambda i: (shape[i], i))
  spec = [None] * len(shape)
  spec[best] = axis
  return P(*spec)


def leaf_spec(path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[tuple[str, str]]) -> P:
  for pattern, strategy in rules:
    if strategy not in STRATEGIES:
      raise ValueError(
          f"Unknown sharding strategy {strategy!r} for {pattern!r}; " f"accepted: {STRATEGIES}."
      )
    if re.search(pattern, path):
      if strategy == "fsdp" and "fsdp" in mesh.shape:
        return fsdp_spec(shape, mesh.shape["fsdp"])
      return P()
  return P()


def tree_shardings(tree, mesh: Mesh, rules: Sequence[tuple[str, str]], prefix: str = ""):
  """NamedShardings for every leaf (arrays or ShapeDtypeStructs) of `tree` by the rules."""

  def one(path, leaf):
    name = prefix + path_str(path)
    return NamedSharding(mesh, leaf_spec(name, np.shape(leaf), mesh, rules))

  return jax.tree_util.tree_map_with_path(one, tree)


def place(tree, shardings):
  """Puts jax.Arrays, or host arrays identical on every process, onto global shardings."""

  def put(x, sharding):
    if isinstance(x, jax.Array):
      return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree, shardings)


def describe(tree, shardings) -> str:
  """One line per leaf: path, shape and partition spec (for logs and tests)."""
  lines = []
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  for (path, leaf), sharding in zip(flat, jax.tree.leaves(shardings)):
    lines.append(f"{path_str(path)} {tuple(np.shape(leaf))} {sharding.spec}")
  return "\n".join(lines)
