"""Benchmark vldm against diffusers PyTorch: `python -m vldm.benchmark --suite NAME --out FILE.json`.

Each case runs vldm (jitted JAX) and diffusers (eager PyTorch) on the same config and weights,
alternately on this machine, and writes a row {name, jax_s, reference_s, ratio (= vldm /
reference), flops, jax_tflops_per_s, compile_s, jax_peak_bytes, reference_peak_bytes,
relative_error, …} (medians of --repeats after --warmup calls; compile time apart). The JSON also
records the machine, its load average before and after, and a Markdown table.

  python -m vldm.benchmark --suite cpu_small --out cpu_small.json
  python -m vldm.benchmark --suite gpu_svd --dry_run --out gpu_svd_plan.json   # configs + FLOPs
  python -m vldm.benchmark --suite gpu_svd --cases 'attention' --out attention.json
"""
from __future__ import annotations

import json
import os

from absl import app
from absl import flags

_SUITE = flags.DEFINE_string("suite", "cpu_small", "Suite name: cpu_small, gpu_svd or smoke.")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per framework and case (median).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls per framework before timing.")
_CASES = flags.DEFINE_string("cases", None, "Only cases whose name matches this regex.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Build the cases' configs and count their FLOPs; "
                             "run nothing.")
_PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops", None, "The accelerator's dense bf16 peak, for MFU (default: looked up from the "
    "GPU's name, e.g. 989 for H100 / H200).")
_CPU_DEVICES = flags.DEFINE_string(
    "cpu_devices", "1", "XLA:CPU devices for vldm, the batch split over them: a count ('1': one "
    "device whose thread pool spans the cores; N: N single-threaded devices) or 'auto' (one per "
    "core where the cores divide every case's batch, as the demo runs; else one).")
_TORCH_THREADS = flags.DEFINE_list(
    "torch_threads", None, "Thread counts to time diffusers with, the fastest reported (default on "
    "CPU: 1 and all cores; on GPU: torch's default).")


def run_benchmark(suite: str, out: str, *, repeats: int = 5, warmup: int = 1,
                  select: str | None = None, dry_run: bool = False,
                  torch_threads=None, peak_tflops=None, log=print) -> dict:
  """Runs (or dry-runs) a suite and writes `out`; returns the written dict.

  `torch_threads`: see `suites.run`; None: 1 and all cores for CPU suites, torch's default else.
  `peak_tflops`: the accelerator's dense bf16 peak for the MFU of bf16 GPU cases (None: looked up
  by `measure.peak_bf16_tflops`).
  """
  from vldm.benchmark import measure  # pylint: disable=g-import-not-at-top
  from vldm.benchmark import suites  # pylint: disable=g-import-not-at-top
  cases = suites.get_suite(suite, select)
  if dry_run:
    rows = suites.dry_run(cases)
  else:
    if torch_threads is None:
      on_cpu = all(c.config.get("device", "cpu") == "cpu" for c in cases)
      torch_threads = sorted({1, os.cpu_count() or 1}) if on_cpu else ()
    rows = suites.run(cases, repeats=repeats, warmup=warmup,
                      torch_threads=[int(n) for n in torch_threads], peak_tflops=peak_tflops,
                      log=log)
  result = dict(suite=suite, dry_run=dry_run, repeats=repeats, warmup=warmup,
                machine=measure.machine_info(), load_average=measure.load_average(), rows=rows,
                table=suites.table(rows))
  directory = os.path.dirname(os.path.abspath(out))
  os.makedirs(directory, exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  return result


def _use_cpu_devices(setting: str, suite: str, select) -> None:
  """Sets XLA:CPU's device count (before jax starts its backends) for CPU suites."""
  from vldm.benchmark import suites  # pylint: disable=g-import-not-at-top
  from vldm import devices  # pylint: disable=g-import-not-at-top
  if setting != "auto" and not (setting.isdigit() and int(setting) >= 1):
    raise app.UsageError(f"--cpu_devices must be 'auto' or a count ≥ 1, got {setting!r}.")
  try:
    cases = suites.get_suite(suite, select)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if any(c.config.get("device", "cpu") != "cpu" for c in cases) or setting == "1":
    return
  if setting == "auto":
    devices.cpu_cores_as_devices([c.config["batch"] for c in cases])
  else:
    devices.split_cpu_into_devices(int(setting))


def main(argv):
  # Spinning OpenMP workers stall torch by orders of magnitude when other processes share the
  # cores (measured: 13 s instead of 0.4 s a call); sleeping ones cost nothing on an idle machine.
  # Set before torch is first imported.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  # JAX and PyTorch share one GPU: JAX must not take 75 % of its memory up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _OUT.value:
    raise app.UsageError("--out FILE.json is required.")
  _use_cpu_devices(_CPU_DEVICES.value, _SUITE.value, _CASES.value)
  if _REPEATS.value < 1 or _WARMUP.value < 0:
    raise app.UsageError("--repeats must be ≥ 1 and --warmup ≥ 0.")
  try:
    result = run_benchmark(_SUITE.value, _OUT.value, repeats=_REPEATS.value, warmup=_WARMUP.value,
                           select=_CASES.value, dry_run=_DRY_RUN.value,
                           torch_threads=_TORCH_THREADS.value, peak_tflops=_PEAK_TFLOPS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  print(result["table"])
  print(f"load average {result['load_average']}; wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
