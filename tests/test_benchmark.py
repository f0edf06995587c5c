"""The benchmark harness: suites build their cases (dry run), the CLI writes its rows, and a micro
case runs end to end against diffusers (1 repeat). The full cpu_small run is behind `slow`."""
import json
import os
import subprocess
import sys

import pytest

from vldm.benchmark import __main__ as cli
from vldm.benchmark import cases, measure, suites

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = {"name", "jax_s", "reference_s", "ratio", "flops", "what", "config"}


def test_gpu_suite_dry_run_builds_every_case(tmp_path):
  out = tmp_path / "gpu_svd.json"
  result = cli.run_benchmark("gpu_svd", str(out), dry_run=True)
  rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
  assert rows.keys() == {c.name for c in suites.gpu_svd()}
  assert all(ROW_KEYS <= r.keys() and r["jax_s"] is None for r in rows.values())
  # Full-size SVD work: 3 × 44.8 TFLOPs a 72×128 training step, 2.24 PFLOPs a guided sampling run.
  assert rows["train_14x72x128_cudnn"]["flops"] == pytest.approx(3 * 44.8e12, rel=0.03)
  assert rows["sample_14x576x1024_25steps"]["flops"] == pytest.approx(2.24e15, rel=0.03)
  assert rows["train_14x40x64"]["config"]["dtype"] == "bfloat16"
  assert rows["train_14x72x128_cudnn_remat"]["config"]["options"]["remat_policy"] \
      == "save_conv_and_attention"
  for name in ("spatial_attention_cudnn", "temporal_attention_xla_train", "temporal_conv_conv3d"):
    assert name in rows
  assert "train_14x40x64" in result["table"]


def test_gpu_suite_configs_are_valid_vldm_unets():
  for case in suites.gpu_svd():
    if case.config["kind"] in ("train", "sample"):
      setup = cases.UNetSetup.make(case.config["unet"], 1, 14, *case.config["latent"],
                                   options=case.config["options"])
      setup.vldm_module().check_config()


def test_cpu_suite_dry_run_and_selection():
  rows = suites.dry_run(suites.get_suite("cpu_small", select="train|sample"))
  assert [r["name"] for r in rows] == ["train_step", "sample_euler25_cfg"]
  assert rows[0]["config"]["batch"] == 2 and rows[0]["config"]["frames"] == 8
  # A sampling run is 25 UNet calls at the guided batch (2 × 2 clips).
  per_call = cases.UNetSetup.make(suites.TINY_SVD_UNET, 4, 8, 16, 16).forward_flops().total
  assert rows[1]["flops"] == pytest.approx(25 * per_call)


def test_bad_requests_are_named():
  with pytest.raises(ValueError, match="Unknown suite"):
    suites.get_suite("tpu_huge")
  with pytest.raises(ValueError, match="No case"):
    suites.get_suite("cpu_small", select="nothing_like_this")
  with pytest.raises(ValueError, match="dtype"):
    cases.UNetSetup.make(suites.TINY_SVD_UNET, 1, 2, 8, 8, dtype="float16")
  with pytest.raises(ValueError, match="repeats"):
    measure.alternate([lambda: None], repeats=0)


def test_alternate_interleaves_and_skips_missing():
  calls = []
  times = measure.alternate([lambda: calls.append("a"), None, lambda: calls.append("b")],
                            repeats=2, warmup=1)
  assert calls == ["a", "b"] * 3
  assert len(times[0]) == 2 and times[1] == [] and len(times[2]) == 2


def test_micro_case_runs_against_diffusers(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  out = tmp_path / "smoke.json"
  result = cli.run_benchmark("smoke", str(out), repeats=1, warmup=0, select="sample",
                             torch_threads=[1], log=lambda _: None)
  (row,) = json.loads(out.read_text())["rows"]
  assert "error" not in row, row.get("traceback")
  assert ROW_KEYS <= row.keys()
  assert row["ratio"] == pytest.approx(row["jax_s"] / row["reference_s"])
  assert row["jax_tflops_per_s"] == pytest.approx(row["flops"] / row["jax_s"] / 1e12)
  assert row["compile_s"] > 0 and row["reference_threads"] == 1
  # The same weights and inputs: both loops reach the same latents.
  assert row["relative_error"] < 1e-3
  assert "load_average" in result and result["machine"]["jax_backend"] == "cpu"


@pytest.mark.slow  # ≈ 40 s on 2 cores: keeps the default suite under 15 min
def test_training_step_splits_over_cpu_devices(tmp_path):
  """`--cpu_devices 2`: vldm's batch split over two XLA:CPU devices, the gradients summed over
  them; the first step's loss is still diffusers'."""
  pytest.importorskip("diffusers")
  out = tmp_path / "two.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  subprocess.run([sys.executable, "-m", "vldm.benchmark", "--suite", "smoke", "--cases", "train",
                  "--cpu_devices", "2", "--repeats", "1", "--warmup", "0", "--torch_threads", "1",
                  "--out", str(out)], env=env, check=True, timeout=600, capture_output=True)
  result = json.loads(out.read_text())
  assert result["machine"]["jax_devices"] == ["cpu", "cpu"]
  (row,) = result["rows"]
  assert "error" not in row, row.get("traceback")
  assert row["relative_error"] < 1e-4


@pytest.mark.slow
def test_cpu_small_suite(tmp_path):
  result = cli.run_benchmark("cpu_small", str(tmp_path / "cpu_small.json"), repeats=3)
  rows = {r["name"]: r for r in result["rows"]}
  print(result["table"], result["load_average"])
  for name in ("train_step", "sample_euler25_cfg"):
    assert "error" not in rows[name], rows[name].get("traceback")
    assert rows[name]["relative_error"] < 1e-3


def test_mfu_only_for_bf16_gpu_cases():
  gpu_train = next(c for c in suites.gpu_svd() if c.name == "train_14x40x64")
  assert suites._mfu(gpu_train, 296.7, 989.0) == pytest.approx(0.3)
  cpu_train = suites.get_suite("cpu_small", select="^train_step$")[0]
  assert suites._mfu(cpu_train, 0.1, 989.0) is None
  assert suites._mfu(gpu_train, 296.7, None) is None
  assert measure.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert measure.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
  assert measure.peak_bf16_tflops("Some Future GPU") is None
