"""Cloud TPU topologies for ahead-of-time compilation on any machine (with libtpu installed).

  devices("v5p-8")              4 compile-only "TPU v5" devices (v5p-8 = 8 TensorCores = 4 chips)
  devices("v5e:4x4")            16 "TPU v5 lite" devices, by libtpu's own topology name
  devices("v4-32", slices=2)    two v4-32 slices (32 chips), joined over the data-center network
  chip(devices[0])              its HBM and peak bf16 FLOP/s

Names: Cloud TPU's accelerator types (`v4-N` and `v5p-N` count TensorCores, 2 per chip; `v5e-N`
(`v5litepod-N`) and `v6e-N` count chips) or libtpu's `<version>:<chip grid>` names. The devices
come from `jax.experimental.topologies`, which needs libtpu (`pip install 'jax[tpu]'`) but no TPU.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip: HBM per chip and dense bf16 peak (Cloud TPU's published figures)."""

  name: str
  hbm_bytes: int
  peak_bf16_tflops: float
  cores_per_chip: int  # TensorCores the accelerator type counts per chip
  grid_dims: int  # 2: a 2-D torus of chips (v5e, v6e); 3: 3-D (v4, v5p)


CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275.0, 2, 3),
    "v5e": Chip("v5e", 16 * GIB, 197.0, 1, 2),
    "v5p": Chip("v5p", 95 * GIB, 459.0, 2, 3),
    "v6e": Chip("v6e", 32 * GIB, 918.0, 1, 2),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
# libtpu's device_kind of each chip.
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e"}
# Chip grids of the slice sizes Cloud TPU offers (chips → grid), as MaxText's accelerator map.
GRIDS_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}
GRIDS_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}


class TopologyError(ValueError):
  """A topology name libtpu or this table does not know, or libtpu missing."""


def libtpu_name(name: str) -> tuple[str, Chip]:
  """('v5p:2x2x1', Chip) of 'v5p-8', 'v5e-16', 'v5litepod-16', 'v4-32' or 'v5e:2x2'."""
  name = name.strip().lower()
  match = re.fullmatch(r"(v\d+[a-z]*)[:](\d+(?:x\d+)+)", name)
  if match:
    version = ALIASES.get(match.group(1), match.group(1))
    if version not in CHIPS:
      raise TopologyError(f"Unknown TPU version {match.group(1)!r}; known: {sorted(CHIPS)}.")
    return f"{version}:{match.group(2)}", CHIPS[version]
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
  if not match:
    raise TopologyError(
        f"Topology {name!r}: give a Cloud TPU type like v5p-8, v5e-16, v4-32, "
        f"or a chip grid like v5e:2x2 or v5p:2x2x1."
    )
  version = ALIASES.get(match.group(1), match.group(1))
  if version not in CHIPS:
    raise TopologyError(f"Unknown TPU version {match.group(1)!r}; known: {sorted(CHIPS)}.")
  spec = CHIPS[version]
  count = int(match.group(2))
  if count % spec.cores_per_chip:
    raise TopologyError(f"{name}: {version} types count {spec.cores_per_chip} TensorCores a chip.")
  chips = count // spec.cores_per_chip
  grids = GRIDS_3D if spec.grid_dims == 3 else GRIDS_2D
  if chips not in grids:
    raise TopologyError(
        f"{name} ({chips} chips) is not a {version} slice size; known: "
        f"{', '.join(f'{version}-{c * spec.cores_per_chip}' for c in grids)}."
    )
  return f"{version}:{grids[chips]}", spec


def devices(name: str, slices: int = 1) -> list:
  """Compile-only devices of `slices` slices of topology `name` (no TPU needed, libtpu is)."""
  topology_name, spec = libtpu_name(name)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  kwargs = {"num_slices": slices} if slices > 1 else {}
  if spec.cores_per_chip > 1:  # a device a chip, as the runtime makes them (v4's default: a core)
    kwargs["chip_config_name"] = "megacore"
  grid = [int(d) for d in topology_name.split(":")[1].split("x")]
  if math.prod(grid) < 4:  # libtpu's default host is 2x2x1 chips; smaller slices are one host
    kwargs["chips_per_host_bounds"] = tuple(grid + [1] * (3 - len(grid)))
  try:
    return list(
        topologies.get_topology_desc(topology_name=topology_name, platform="tpu", **kwargs).devices
    )
  except Exception as e:  # pylint: disable=broad-except  # no libtpu, or a grid it rejects
    raise TopologyError(
        f"Cannot make the TPU topology {topology_name!r} ({slices} slice(s)): {e}. Compiling for "
        f"TPU needs libtpu: pip install 'jax[tpu]=={jax.__version__}'."
    ) from e


def chip(device) -> Chip:
  """The Chip of a (compile-only) TPU device."""
  version = DEVICE_KINDS.get(device.device_kind)
  if version is None:
    raise TopologyError(f"No chip figures for device kind {device.device_kind!r}.")
  return CHIPS[version]


def num_slices(device_list) -> int:
  return len({getattr(d, "slice_index", 0) for d in device_list})


def describe(name: str, device_list) -> str:
  """'v5p-8 (v5p:2x2x1, 4 chips)', with the slice count where there are several."""
  topology_name, _ = libtpu_name(name)
  slices = num_slices(device_list)
  per_slice = len(device_list) // slices
  return f"{name} ({topology_name}, {per_slice} chips" + (
      f" × {slices} slices)" if slices > 1 else ")"
  )


def chips_needed(name: str, slices: int = 1) -> int:
  topology_name, _ = libtpu_name(name)
  return slices * math.prod(int(d) for d in topology_name.split(":")[1].split("x"))
