"""Test helpers for the real-data recipes: `python -m vldm.<module>` in subprocesses with several CPU
devices, sharing a JAX compilation cache with the test process (`import recipe_runs`).

A program compiled once (a resumed run's step, the same pipeline rebuilt from an exported folder)
then comes back from disk in the next process.
"""

import contextlib
import os
import subprocess
import sys

import jax
from jax.experimental.compilation_cache import compilation_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def shared_compilation_cache(directory: str):
  """This process's JAX compilation cache in `directory` (every compile cached) while inside."""
  previous = (
      jax.config.jax_compilation_cache_dir,
      jax.config.jax_persistent_cache_min_compile_time_secs,
  )
  compilation_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  try:
    yield directory
  finally:
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
    compilation_cache.reset_cache()


def run(module, *args, inputs, devices=1, check=True):
  """`python -m vldm.<module> args…` with `devices` CPU devices and the compilation cache
  `inputs['cache']`; returns the completed process (an AssertionError with its stderr when it
  fails and `check`)."""
  xla = os.environ.get("XLA_FLAGS", "")
  env = dict(
      os.environ,
      XLA_FLAGS=f"{xla} --xla_force_host_platform_device_count={devices}",
      JAX_PLATFORMS="cpu",
      JAX_DEFAULT_MATMUL_PRECISION="highest",
      JAX_COMPILATION_CACHE_DIR=inputs["cache"],
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      PYTHONPATH=REPO,
  )
  result = subprocess.run(
      [sys.executable, "-m", f"vldm.{module}", *args],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=900,
  )
  if check and result.returncode:
    raise AssertionError(f"vldm.{module} failed ({result.returncode}):\n{result.stderr[-4000:]}")
  return result
