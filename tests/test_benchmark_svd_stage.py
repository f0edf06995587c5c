"""The SVD image-to-video training-step benchmark: its toy size runs on CPU with finite numbers and
trains every UNet weight (the encoders frozen), its FLOP count equals the traced step's, its
models are SVD's, and it imports without the packages the GPU host lacks."""

import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from vldm.benchmark import flops, suites
from vldm.benchmark import svd_stage as ss
from vldm.benchmark import video_stage as vs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSENT_ON_GPU_HOST = (
    "ml_collections",
    "tensorflow",
    "tensorflow_datasets",
    "diffusers",
    "transformers",
    "cv2",
)


def test_imports_without_packages_the_gpu_host_lacks():
  blocked = ", ".join(map(repr, ABSENT_ON_GPU_HOST))
  code = (
      f"import sys\nfor name in ({blocked},):\n  sys.modules[name] = None  # import fails\n"
      "import vldm.benchmark.svd_stage as ss, vldm.benchmark.suites as suites\n"
      "suites.get_suite('gpu_svd_i2v')\n"
      "ss.abstract_params(ss.SIZES['tiny'])\n"
      f"loaded = [n for n in ({blocked},) if sys.modules.get(n) is not None]\n"
      "print('ok' if not loaded else loaded)"
  )
  out = subprocess.run(
      [sys.executable, "-c", code],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (out.stdout, out.stderr[-3000:])


@pytest.mark.slow  # ≈ 1 min on 2 cores; the FLOP and import checks run by default
def test_tiny_step_runs_and_trains_the_whole_unet():
  bench = ss.Bench(ss.SIZES["tiny"])
  row = ss.measure_config(bench, ss.StepConfig(1, "none"), steps=1, warmup=1)
  for key in (
      "step_s",
      "pipelined_step_s",
      "compile_s",
      "trace_s",
      "flops",
      "unet_training_flops",
      "unet_forward_flops",
      "vae_encoder_flops",
      "image_encoder_flops",
      "tflops_per_s",
      "first_loss",
      "last_loss",
      "final_loss",
      "grad_norm",
      "sigma_aug",
      "xla_flops",
  ):
    assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
  assert row["flops"] == pytest.approx(
      sum(
          row[k]
          for k in (
              "unet_training_flops",
              "vae_encoder_flops",
              "image_encoder_flops",
              "clip_resize_flops",
          )
      )
  )
  assert row["mfu"] is None  # no bf16 peak on CPU
  assert row["temp_bytes"] > 0 and row["argument_bytes"] > 0
  assert row["state_bytes"] == row["param_bytes"] + row["opt_state_bytes"] + row["ema_bytes"] + 12
  assert row["fits_80gb"] is True and 0 < row["fsdp8_estimate_bytes"] < row["per_device_bytes"]
  assert row["unet_params"] > 0 and row["vae_encoder_params"] > 0
  assert row["image_encoder_params"] > 0
  # Three steps ran from the host weights: every UNet leaf moved (AdamW's first steps move each
  # leaf with a nonzero gradient) but the queries and keys of the cross-attention to SVD's one
  # context token and the norm before it (softmax over one key is 1: no gradient, in SVD too);
  # the frozen encoders are outside the state.
  before = traverse_util.flatten_dict(vs.host_params(bench.abstract["unet"], seed=0))
  after = traverse_util.flatten_dict(jax.device_get(bench.state.params))
  assert before.keys() == after.keys()
  unchanged = {p for p in before if np.array_equal(before[p], after[p])}
  single_token = {
      p
      for p in before
      if p[-3:] in (("attn2", "to_q", "kernel"), ("attn2", "to_k", "kernel"))
      or (p[-2] == "norm2" and "transformer_blocks" in p[-3])
  }
  assert single_token and unchanged == single_token
  assert int(bench.state.step) == 3
  table = ss.table(
      [
          row,
          dict(
              name="b2_full_xla",
              batch=2,
              remat_policy="full",
              attention="xla",
              error="skipped: time budget (420 s)",
          ),
      ]
  )
  assert "b1_none_xla" in table and "skipped" in table


def test_step_flops_equal_the_traced_step():
  """The analytic count equals the matmuls and convolutions of the jitted step's program (no
  remat): the optimizer, EMA, noise and loss add none."""
  size, config = ss.SIZES["tiny"], ss.StepConfig(2, "none")
  bench = ss.Bench(size)
  builder = bench.builder(config)
  batch = jax.eval_shape(lambda: bench.batch(config.batch))
  frozen = {k: bench.abstract[k] for k in ("vae", "image_encoder")}
  step = builder.make_train_step(
      jax.tree.map(lambda _: None, frozen), jax.tree.map(lambda _: None, batch)
  )
  traced = flops.jaxpr_flops(step, builder.abstract_state, frozen, batch)
  counted = ss.step_flops(size, config)
  assert counted["flops"] == pytest.approx(traced.total, rel=1e-9)
  assert counted["unet_training_flops"] == pytest.approx(
      3 * counted["unet_forward_flops"], rel=0.02
  )


def test_full_size_models_are_svds():
  size = ss.SIZES["svd"]
  unet = ss.StepConfig(1, "full", "cudnn").unet(size)
  assert unet.temporal and unet.in_channels == 8 and unet.num_time_ids == 3
  assert unet.context_dim == 1024 and unet.remat_policy == "full"
  assert unet.attention_implementation == "cudnn" and unet.param_dtype == np.float32
  assert unet.dtype == np.dtype("bfloat16") and size.latent == (72, 128)
  import vldm.convert  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from vldm.convert import registry  # pylint: disable=g-import-not-at-top

  converted = registry.format_for("UNetSpatioTemporalConditionModel").from_config(
      {"_class_name": "UNetSpatioTemporalConditionModel", "num_frames": 14}
  )
  fields = [
      f
      for f in type(unet).__dataclass_fields__
      if f not in ("parent", "name", "remat_policy", "attention_implementation", "dtype")
  ]
  assert {f: getattr(unet, f) for f in fields} == {f: getattr(converted, f) for f in fields}
  clip = size.clip_module()
  assert (clip.hidden_size, clip.num_hidden_layers, clip.patch_size, clip.projection_dim) == (
      1280,
      32,
      14,
      1024,
  )
  counted = ss.step_flops(size, ss.StepConfig(1))
  # SVD's UNet at 14 × 72×128: 44.7 TFLOPs forward (docs/performance.md), 3 × to train.
  assert counted["unet_forward_flops"] == pytest.approx(44.7e12, rel=0.01)
  assert counted["unet_training_flops"] == pytest.approx(134.1e12, rel=0.01)
  assert 0 < counted["image_encoder_flops"] < counted["vae_encoder_flops"] < counted["flops"]


def test_configs_parse_and_bad_ones_are_named():
  assert ss.parse_configs(ss.DEFAULT_CONFIGS["svd"])[1] == ss.StepConfig(1, "full", "xla")
  assert ss.parse_configs("2:save_conv_and_attention:default") == [
      ss.StepConfig(2, "save_conv_and_attention", None)
  ]
  with pytest.raises(ValueError, match="batch:remat_policy:attention"):
    ss.StepConfig.parse("1:full")
  with pytest.raises(ValueError, match="remat_policy"):
    ss.StepConfig.parse("1:sometimes:xla")
  with pytest.raises(ValueError, match="attention"):
    ss.StepConfig.parse("1:full:flash")


def test_suite_lists_the_default_rows():
  names = [c.name for c in suites.get_suite("gpu_svd_i2v")]
  assert names == [f"svd_stage_{c.name}" for c in ss.parse_configs(ss.DEFAULT_CONFIGS["svd"])]
  rows = suites.dry_run(suites.get_suite("gpu_svd_i2v", select="b1_full_xla"))
  assert rows[0]["config"]["device"] == "cuda" and rows[0]["flops"] > 1.5e14
