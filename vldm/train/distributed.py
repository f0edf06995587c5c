"""`jax.distributed.initialize()` when this process is one of several.

VLDM_DISTRIBUTED=1 always initialises, =0 never; unset, it initialises when the environment says
there are several processes (SLURM_NTASKS, OMPI_COMM_WORLD_SIZE or JAX_NUM_PROCESSES above 1).
JAX then detects the coordinator, process count and id itself on Cloud TPU pods, SLURM, Open MPI
and Kubernetes; elsewhere give JAX_COORDINATOR_ADDRESS (host:port of process 0),
JAX_NUM_PROCESSES and JAX_PROCESS_ID.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping

_COUNT_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES")


def wanted(env: Mapping[str, str] = os.environ) -> bool:
  flag = env.get("VLDM_DISTRIBUTED", "").strip().lower()
  if flag in ("1", "true", "yes"):
    return True
  if flag in ("0", "false", "no"):
    return False
  if flag:
    raise ValueError(f"VLDM_DISTRIBUTED={flag!r}; accepted: 1 or 0 (unset: auto-detect).")
  return any(int(env.get(name, "1") or 1) > 1 for name in _COUNT_VARIABLES)


def maybe_initialize(env: Mapping[str, str] = os.environ) -> bool:
  """Initialises JAX's multi-process runtime if wanted; returns whether it did."""
  if not wanted(env):
    return False
  import jax  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if env.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
  if env.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True
