"""Compile-only checks for TPU topologies (vldm.train.compile_only, vldm.train.topology).

The compiles need libtpu (`pip install -e ".[test]"` brings it, as `jax[tpu]`) but no TPU; they are
skipped where it is missing. Full-size checks (SD 1.5 / SVD shapes, minutes a compile on a CPU) are
marked slow.
"""

import json
import os
import subprocess
import sys

import pytest

from vldm.train import compile_only
from vldm.train import topology

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_libtpu():
  try:
    topology.devices("v5e:2x2")
  except topology.TopologyError:
    return False
  return True


needs_libtpu = pytest.mark.skipif(not _has_libtpu(), reason="libtpu is not installed")

# The SD 1.5 preset shrunk to test size by config overrides (the shapes, not the layout, change).
TINY = {
    "ldm.unet.model.block_out_channels": "(32,)",  # one level: a compile of ~20 s
    "ldm.unet.model.down_block_types": "('CrossAttnDownBlock2D',)",
    "ldm.unet.model.up_block_types": "('CrossAttnUpBlock2D',)",
    "ldm.unet.model.num_attention_heads": "2",
    "ldm.unet.model.layers_per_block": "1",
    "ldm.unet.model.norm_num_groups": "8",
    "ldm.unet.model.cross_attention_dim": "32",
    "ldm.text_encoder.model.hidden_size": "32",
    "ldm.text_encoder.model.intermediate_size": "64",
    "ldm.text_encoder.model.num_hidden_layers": "1",
    "ldm.text_encoder.model.num_attention_heads": "2",
    "ldm.tokenizer.ids.max_length": "8",
    "ldm.vae.model.block_out_channels": "(16, 32)",
    "ldm.vae.model.layers_per_block": "1",
    "ldm.vae.model.norm_num_groups": "8",
}


@pytest.mark.parametrize(
    "name, expected, chips",
    [
        ("v5p-8", "v5p:2x2x1", 4),
        ("v5e-16", "v5e:4x4", 16),
        ("v5litepod-4", "v5e:2x2", 4),
        ("v4-32", "v4:2x2x4", 16),
        ("v6e-8", "v6e:2x4", 8),
        ("v5e:2x2", "v5e:2x2", 4),
        ("V5P:2x2x4", "v5p:2x2x4", 16),
    ],
)
def test_topology_names(name, expected, chips):
  assert topology.libtpu_name(name)[0] == expected
  assert topology.chips_needed(name) == chips
  assert topology.chips_needed(name, slices=2) == 2 * chips


@pytest.mark.parametrize(
    "name, message",
    [
        ("v5p-7", "count 2 TensorCores a chip"),
        ("v5e-12", "not a v5e slice size"),
        ("v9-8", "Unknown TPU version 'v9'"),
        ("tpu", "give a Cloud TPU type like v5p-8"),
    ],
)
def test_topology_name_errors(name, message):
  with pytest.raises(topology.TopologyError, match=message):
    topology.libtpu_name(name)


def test_collective_bytes_reads_hlo_results():
  hlo = """
  %all-gather-start.1 = (f32[128]{0}, f32[512]{0}) all-gather-start(f32[128]{0} %p), dimensions={0}
  %all-gather-done.1 = f32[512]{0} all-gather-done((f32[128]{0}, f32[512]{0}) %all-gather-start.1)
  %reduce-scatter.2 = bf16[4,8]{1,0} reduce-scatter(bf16[16,8]{1,0} %g), dimensions={0}
  %all-reduce.3 = f32[] all-reduce(f32[] %l), to_apply=%add
  %fusion.4 = f32[1024]{0} fusion(f32[1024]{0} %x), kind=kLoop
  """
  assert compile_only.collective_bytes(hlo) == {
      "all-gather": 512 * 4,
      "reduce-scatter": 4 * 8 * 2,
      "all-reduce": 4,
  }


def test_hbm_need_from_out_of_memory_message():
  message = (
      "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
      "space hbm. Used 20.51G of 15.48G hbm. Exceeded hbm capacity by 5.03G."
  )
  assert compile_only._hbm_used(message) == int(20.51 * 2**30)  # pylint: disable=protected-access
  assert compile_only._hbm_used("INTERNAL: x") is None  # pylint: disable=protected-access
  message = (
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
      "temporaries (751.03G) exceeds available HBM (15.75G)."
  )
  assert compile_only._hbm_used(message) == int(751.03 * 2**30)  # pylint: disable=protected-access


def _report(fits_bytes, batch, seconds, policy="none", error=None):
  return compile_only.Report(
      what="train_step",
      topology="v5e:2x2",
      chip="v5e",
      chips=4,
      mesh={"data": 4, "fsdp": 1},
      remat_policy=policy,
      batch_per_chip=batch,
      hbm_bytes=16 * 2**30,
      temp_bytes=fits_bytes,
      optimal_seconds=seconds,
      error=error,
  )


def test_rank_puts_fitting_fastest_per_example_first():
  big = _report(20 * 2**30, 8, 0.8)  # fastest per example but does not fit
  slow = _report(10 * 2**30, 4, 0.8, policy="full")
  fast = _report(14 * 2**30, 4, 0.6)
  failed = _report(0, 16, None, error="RESOURCE_EXHAUSTED")
  assert compile_only.rank([big, slow, failed, fast])[:2] == [fast, slow]
  assert fast.overrides() == (
      "--config.mesh=\"(('data', 4), ('fsdp', 1))\" "
      "--config.remat_policy=none --config.batch_size=16"
  )


def test_mesh_options_split_chips_into_data_and_fsdp():
  assert compile_only.mesh_options(8) == [
      (("data", 8), ("fsdp", 1)),
      (("data", 2), ("fsdp", 4)),
      (("data", 1), ("fsdp", 8)),
  ]
  # Several slices: FSDP stays inside a slice, the data axis spans slices.
  assert (("data", 2), ("fsdp", 4)) in compile_only.mesh_options(8, slices=2)
  assert (("data", 1), ("fsdp", 8)) not in compile_only.mesh_options(8, slices=2)


def _train(*args, env=None):
  return subprocess.run(
      [sys.executable, "-m", "vldm.train", *args],
      cwd=REPO,
      text=True,
      capture_output=True,
      check=False,
      timeout=900,
      env=dict(os.environ, PYTHONPATH=REPO, **(env or {})),
  )


def test_compile_only_flag_errors():
  result = _train("--config", "configs/video_ldm.py:stage=image,preset=sd15", "--compile_only")
  assert result.returncode != 0 and "--compile_only needs --topology" in result.stderr
  result = _train(
      "--config",
      "configs/video_ldm.py:stage=image,preset=sd15",
      "--compile_only",
      "--topology",
      "v5p-6",
  )
  assert result.returncode != 0 and "v5p-6 (3 chips) is not a v5p slice size" in result.stderr


@pytest.mark.slow  # ≈ 25 s: the default suite's budget
@needs_libtpu
def test_compile_only_tiny_image_stage(tmp_path):
  """The CLI on a tiny SD-layout image stage for v5e:2x2 (data 2 × fsdp 2, latent cache): the
  compiled step's memory per chip, FLOPs beside the analytic count, and the JSON report."""
  out = tmp_path / "report.json"
  overrides = [f"--config.{k}={v}" for k, v in TINY.items()]
  result = _train(
      "--config",
      f"configs/video_ldm.py:stage=image,preset=sd15,resolution=32,root={tmp_path}",
      *overrides,
      "--config.mesh=(('data', 2), ('fsdp', 2))",
      "--config.batch_size=8",
      "--config.remat_policy=none",
      "--compile_only",
      "--topology",
      "v5e:2x2",
      "--compile_report",
      str(out),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "train_step on v5e:2x2: mesh {'data': 2, 'fsdp': 2}, remat none, batch 2 per chip" in (
      result.stdout
  )
  (report,) = json.loads(out.read_text())["reports"]
  assert report["fits"] and report["error"] is None and report["chip"] == "v5e"
  assert report["hbm_bytes"] == 16 * 2**30
  assert 0 < report["argument_bytes"] and 0 < report["temp_bytes"]
  assert report["total_bytes"] < 2**30  # a tiny model
  # XLA counts the elementwise work (norms, activations, the optimizer) that the analytic count of
  # matmuls and convolutions leaves out; at this size it is a large share, at full size a few %.
  assert 1.0 < report["compiled_flops"] / report["analytic_flops"] < 1.5
  # FSDP over 2 chips gathers parameters; data parallelism reduces gradients.
  assert report["collective_bytes"].get("all-gather", 0) > 0


class _FakeDevice:
  device_kind = "TPU v5 lite"
  slice_index = 0


def test_search_predicts_the_largest_fitting_batch(monkeypatch):
  """Memory affine in the batch (2 GiB + 1.5 GiB per example without remat, 0.5 GiB with full
  remat): the search compiles two batches per policy, jumps to the predicted largest one, and ranks
  the fitting configurations with the largest batch first."""
  compiled = []

  def fake_compile(config, devices, topology_name=""):
    mesh = dict(config.mesh)
    batch = config.batch_size // len(devices)
    compiled.append((config.remat_policy, batch))
    per_example = {"none": 1.5, "full": 0.5}[config.remat_policy]
    return compile_only.Report(
        what="train_step",
        topology=topology_name,
        chip="v5e",
        chips=len(devices),
        mesh=mesh,
        remat_policy=config.remat_policy,
        batch_per_chip=batch,
        hbm_bytes=16 * 2**30,
        temp_bytes=int((2 + per_example * batch) * 2**30),
        optimal_seconds=(1.0 if config.remat_policy == "none" else 1.3) * batch,
    )

  monkeypatch.setattr(compile_only, "compile_train_step", fake_compile)
  import ml_collections  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(
      dict(mesh=(("data", -1), ("fsdp", 1)), remat_policy="none", batch_size=4)
  )
  found = compile_only.search(
      config,
      [_FakeDevice()] * 4,
      "v5e:2x2",
      remat_policies=("none", "full"),
      attentions=(None,),
      meshes=[(("data", 4), ("fsdp", 1))],
      log=lambda _: None,
  )
  # none: 1, 2 fit, then 8 (predicted: 2 + 1.5·8 = 14 ≤ 15.2 GiB) fits; full from 16: 2 + 8 = 10,
  # 32 does not fit (18 GiB), so 16 it is.
  assert compiled == [("none", 1), ("none", 2), ("none", 8), ("full", 16), ("full", 32)]
  best = found[0]
  assert (best.remat_policy, best.batch_per_chip, best.fits) == ("none", 8, True)
  assert [r.fits for r in found].count(False) == 1


def _preset_config(spec, **overrides):
  from vldm.train import config_lib  # pylint: disable=g-import-not-at-top

  return config_lib.load_config(spec, overrides)


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("resolution", [128, 256])
def test_compiled_flops_match_the_analytic_count(resolution):
  """The SD-1.5-size video stage (16 frames, no remat) on v5p-8: XLA's FLOPs of the compiled step
  within 5 % of vldm's analytic count (vldm.benchmark.flops), at two sizes. Minutes a compile."""
  config = _preset_config(
      f"configs/video_ldm.py:stage=video,preset=sd15,resolution={resolution}",
      **{"mesh": (("data", 1), ("fsdp", 4)), "remat_policy": "none", "batch_size": 4},
  )
  report = compile_only.compile_train_step(config, topology.devices("v5p-8"), "v5p-8")
  assert report.error is None, report.error
  assert report.compiled_flops == pytest.approx(report.analytic_flops, rel=0.05)


def test_search_falls_back_to_chunked_attention(monkeypatch):
  """When no remat policy fits with the whole score matrix (SVD-size frames on a 16 GiB chip), the
  search tries chunked attention, and the override line selects it."""

  def fake_compile(config, devices, topology_name=""):
    batch = config.batch_size // len(devices)
    chunked = config.attention_implementation == "chunked"
    gib = (4 if chunked else 40) * batch + (0 if config.remat_policy == "full" else 20)
    return compile_only.Report(
        what="train_step",
        topology=topology_name,
        chip="v5e",
        chips=len(devices),
        mesh=dict(config.mesh),
        remat_policy=config.remat_policy,
        batch_per_chip=batch,
        hbm_bytes=16 * 2**30,
        temp_bytes=gib * 2**30,
        optimal_seconds=1.0 * batch,
        attention=config.attention_implementation,
    )

  monkeypatch.setattr(compile_only, "compile_train_step", fake_compile)
  import ml_collections  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(
      dict(
          mesh=(("data", 1), ("fsdp", 8)),
          remat_policy="none",
          batch_size=64,
          attention_implementation=None,
      )
  )
  found = compile_only.search(
      config,
      [_FakeDevice()] * 8,
      "v5e-8",
      remat_policies=("none", "full"),
      meshes=[(("data", 1), ("fsdp", 8))],
      log=lambda _: None,
  )
  best = found[0]
  assert best.fits and (best.attention, best.remat_policy, best.batch_per_chip) == (
      "chunked",
      "full",
      2,
  )
  assert best.overrides().endswith("--config.attention_implementation=chunked")


@needs_libtpu
@pytest.mark.slow
def test_svd_size_that_cannot_fit_a_v5e_gets_an_alternative_that_does():
  """SVD's i2v step at 14 × 768² (576×1024's pixel count), batch 8 per v5e chip without remat:
  reported as not fitting; the alternative (FSDP over the 8 chips, chunked attention, full remat,
  batch 1) compiles and fits. Minutes a compile."""
  config = _preset_config(
      "configs/svd.py:stage=i2v,preset=svd,resolution=768,frames=14",
      **{"mesh": (("data", 1), ("fsdp", 8)), "remat_policy": "none", "batch_size": 64},
  )
  devices = topology.devices("v5e-8")
  report = compile_only.compile_train_step(config, devices, "v5e-8")
  assert not report.fits and report.total_bytes > report.hbm_bytes
  found = compile_only.search(
      config,
      devices,
      "v5e-8",
      remat_policies=("full",),
      attentions=("chunked",),
      meshes=[(("data", 1), ("fsdp", 8))],
      batches=(1,),
      known=[report],
  )
  best = found[0]
  assert best.fits and best.error is None and best.batch_per_chip == 1
  assert best.overrides() == (
      "--config.mesh=\"(('data', 1), ('fsdp', 8))\" "
      "--config.remat_policy=full --config.batch_size=8 "
      "--config.attention_implementation=chunked"
  )


@needs_libtpu
def test_multislice_mesh_puts_the_data_axis_across_slices():
  from vldm.train import sharding  # pylint: disable=g-import-not-at-top

  devices = topology.devices("v5e:2x2", slices=2)
  assert len(devices) == 8 and topology.num_slices(devices) == 2
  mesh = sharding.make_mesh((("data", -1), ("fsdp", 2)), devices=devices)
  slice_of = [[d.slice_index for d in row] for row in mesh.devices]
  assert slice_of == [[0, 0], [0, 0], [1, 1], [1, 1]]  # fsdp pairs within a slice
  with pytest.raises(ValueError, match="must be a multiple of the slice count"):
    sharding.make_mesh((("data", 1), ("fsdp", 8)), devices=devices)


def test_rank_uses_flops_when_xla_gives_no_time_for_some():
  small = _report(1 * 2**30, 1, 0.0004)
  large = _report(2 * 2**30, 64, None)  # no roofline estimate: compare FLOPs per example
  small.compiled_flops, large.compiled_flops = 2.8e9 * 4, 150e9 * 4
  assert compile_only.rank([small, large]) == [large, small]


@needs_libtpu
@pytest.mark.slow
def test_cli_exits_1_when_it_does_not_fit_and_names_what_fits(tmp_path):
  """The tiny image stage at 16384 examples per v5e chip runs out of HBM: exit status 1, and the
  search (narrowed to one mesh and two policies) finds per-chip batches that fit. ~4 compiles."""
  out = tmp_path / "report.json"
  overrides = [f"--config.{k}={v}" for k, v in TINY.items()]
  result = _train(
      "--config",
      f"configs/video_ldm.py:stage=image,preset=sd15,resolution=32,root={tmp_path}",
      *overrides,
      "--config.mesh=(('data', 2), ('fsdp', 2))",
      "--config.batch_size=65536",
      "--config.remat_policy=none",
      "--compile_only",
      "--topology",
      "v5e:2x2",
      "--search_fsdp",
      "2",
      "--search_remat",
      "none,full",
      "--compile_report",
      str(out),
  )
  assert result.returncode == 1, result.stderr[-3000:]
  assert "DOES NOT FIT" in result.stdout
  assert "vldm.train: train_step does not fit v5e:2x2; fitting: --config.mesh=" in result.stdout
  report = json.loads(out.read_text())
  assert not report["reports"][0]["fits"] and report["reports"][0]["total_bytes"] > 16 * 2**30
  fitting = [r for r in report["search"] if r["fits"]]
  assert fitting and all(r["error"] is None for r in fitting)
  assert max(r["batch_per_chip"] for r in fitting) == 64
