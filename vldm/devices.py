"""This process's devices for data-parallel sampling and benchmarks, and XLA:CPU's device count.

Below vldm.train (whose meshes and sharding rules are for training): pipelines, data and commands
use these without importing the trainer.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def _local_mesh() -> Mesh:
  """One 'data' axis over this process's devices."""
  return Mesh(np.asarray(jax.local_devices()), ("data",))


def split_batch(*arrays):
  """The arrays (None passes through) with their leading (batch) axis split over this process's
  devices, so that a jitted function of them runs data-parallel: computation follows the data.
  Unchanged on one device, in a multi-host run (pipelines sample per process) or when a batch does
  not divide by the device count."""
  devices = jax.local_devices()
  batches = [np.shape(a)[0] for a in arrays if a is not None]
  if len(devices) == 1 or jax.process_count() > 1 or any(b % len(devices) for b in batches):
    return arrays
  sharding = NamedSharding(_local_mesh(), P("data"))
  return tuple(None if a is None else jax.device_put(a, sharding) for a in arrays)


def replicate(tree):
  """The tree's arrays on every one of this process's devices: the operands (weights, optimizer
  state) that `split_batch`'s arrays meet in one jitted function."""
  return jax.device_put(tree, NamedSharding(_local_mesh(), P()))


def cpu_cores_as_devices(batch_sizes: Sequence[int]) -> int:
  """Makes XLA:CPU one device per core, each computing on a single thread, when the core count
  divides every batch size; returns that device count (0: left alone, as on one core, a core count
  that does not divide, or a device count already in XLA_FLAGS).

  Call before jax starts its backends (its first computation): they read XLA_FLAGS once. Only the
  CPU backend reads these flags. On a 2-core machine, data parallelism over two single-threaded
  devices beats one device whose thread pool splits each small operation over both cores: the
  shapes demo on an Intel Xeon VM 1963 → 1074 s; on an AMD EPYC VM its image step 1.32×, video
  step 1.14×, sampling 1.29× (README). Not at batch 1 per device: the gradient sum then costs more.
  """
  cores = len(os.sched_getaffinity(0))
  if (cores < 2 or any(b % cores for b in batch_sizes)
      or "device_count" in os.environ.get("XLA_FLAGS", "")):
    return 0
  split_cpu_into_devices(cores)
  return cores


def split_cpu_into_devices(count: int) -> None:
  """Makes XLA:CPU `count` devices, each computing on a single thread (XLA_FLAGS; call before jax
  starts its backends)."""
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count={count} "
                             "--xla_cpu_multi_thread_eigen=false").strip()
