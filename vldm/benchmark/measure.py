"""Timing and memory measurement: alternating runs, medians, peak memory, machine load.

Two implementations of the same work are timed in turns (A, B, A, B, …) after warm-up, so that a
change of machine load (a shared CI box) touches both alike; the median of each is reported.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Optional, Sequence


def timed(fn: Callable[[], object]) -> float:
  """Seconds for one call; `fn` must block until its result is ready."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def alternate(fns: Sequence[Optional[Callable[[], object]]], repeats: int,
              warmup: int = 1) -> list[list[float]]:
  """Times each function `repeats` times, in turns, after `warmup` untimed calls of each.

  Returns one list of seconds per function ([] for a None entry).
  """
  if repeats < 1 or warmup < 0:
    raise ValueError(f"Need repeats ≥ 1 and warmup ≥ 0, got {repeats}, {warmup}.")
  for _ in range(warmup):
    for fn in fns:
      if fn is not None:
        fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, out in zip(fns, times):
      if fn is not None:
        out.append(timed(fn))
  return times


def median(times: Sequence[float]) -> Optional[float]:
  return statistics.median(times) if times else None


# ------------------------------------------------------------------------------------- memory
# Peak memory is what one call adds at its peak on top of what already exists (weights, optimizer
# state, inputs), counted exactly by each framework's allocator: XLA's buffer assignment for JAX,
# the caching allocator (CUDA) or the profiler's allocation events (CPU) for torch.


def _memory_analysis(compiled):
  try:
    return compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None


def jax_work_bytes(compiled) -> Optional[int]:
  """Temporaries + outputs − outputs aliased to donated inputs of a compiled program."""
  m = _memory_analysis(compiled)
  if m is None:
    return None
  return int(m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def jax_total_bytes(compiled) -> Optional[int]:
  """Everything the program holds at once: arguments + temporaries + outputs − aliased."""
  m = _memory_analysis(compiled)
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def torch_peak_bytes(fn: Callable[[], object], device: str = "cpu") -> Optional[int]:
  """Bytes one call of `fn` allocates beyond what was allocated before it, at its peak."""
  import torch  # pylint: disable=g-import-not-at-top
  if device == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)
  import json  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from torch import profiler  # pylint: disable=g-import-not-at-top
  with profiler.profile(activities=[profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
    fn()
  with tempfile.NamedTemporaryFile(suffix=".json") as f:
    prof.export_chrome_trace(f.name)
    events = json.load(open(f.name))["traceEvents"]
  # The running sum of the allocations and frees ("Bytes" < 0) made during the call.
  deltas = sorted((e["ts"], e["args"]["Bytes"]) for e in events if e.get("name") == "[memory]")
  running, peak = 0, 0
  for _, size in deltas:
    running += size
    peak = max(peak, running)
  return int(peak)


# -------------------------------------------------------------------------------------- machine

# Dense bf16 peaks (TFLOP/s) by GPU name, for MFU; the first name contained in the device's wins.
BF16_PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0))


def peak_bf16_tflops(device_name: Optional[str] = None) -> Optional[float]:
  """The dense bf16 peak of a CUDA device (default: torch's device 0), None when unknown."""
  if device_name is None:
    try:
      import torch  # pylint: disable=g-import-not-at-top
      if not torch.cuda.is_available():
        return None
      device_name = torch.cuda.get_device_name(0)
    except ImportError:
      return None
  for name, peak in BF16_PEAK_TFLOPS:
    if name in device_name:
      return peak
  return None



def load_average() -> Optional[list[float]]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def machine_info() -> dict:
  """What ran the benchmark: CPU, core count, accelerator, library versions, XLA flags."""
  import jax  # pylint: disable=g-import-not-at-top
  info = {
      "platform": platform.platform(), "processor": _cpu_model(), "cpu_count": os.cpu_count(),
      "jax": jax.__version__, "jax_backend": jax.default_backend(),
      "jax_devices": [d.device_kind for d in jax.devices()],
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
  }
  try:
    import torch  # pylint: disable=g-import-not-at-top
    info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                torch_cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    import diffusers  # pylint: disable=g-import-not-at-top
    info.update(diffusers=diffusers.__version__)
  except ImportError:
    pass
  return info


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()
