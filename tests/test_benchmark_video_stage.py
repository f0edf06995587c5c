"""The video-stage training-step benchmark: its toy size runs one step on CPU with finite numbers
and trains only the temporal layers, its FLOP count equals the traced step's, its model is SD 1.5's
UNet, it imports without ml_collections / TensorFlow / TFDS / diffusers (absent on the GPU host),
and the suite runner takes its reference-less rows."""
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vldm.benchmark import flops, suites
from vldm.benchmark import video_stage as vs
from vldm.models import inflate
from vldm.models.unet import UNet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSENT_ON_GPU_HOST = ("ml_collections", "tensorflow", "tensorflow_datasets", "diffusers")


def test_imports_without_tensorflow_ml_collections_or_diffusers():
  blocked = ", ".join(map(repr, ABSENT_ON_GPU_HOST))
  code = (f"import sys\nfor name in ({blocked},):\n  sys.modules[name] = None  # import fails\n"
          "import vldm.benchmark.video_stage, vldm.benchmark.suites\n"
          "vldm.benchmark.suites.get_suite('gpu_video_ldm')\n"
          "vldm.benchmark.video_stage.abstract_params(vldm.benchmark.video_stage.SIZES['tiny'])\n"
          "print('ok')")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_tiny_step_runs_and_trains_only_the_temporal_layers():
  size = vs.SIZES["tiny"]
  bench = vs.Bench(size)
  row = vs.measure_config(bench, vs.StepConfig(1), steps=1, warmup=1)
  assert row["param_dtype"] == "float32" and row["dtype"] == "float32" and row["frames"] == 2
  for key in ("step_s", "pipelined_step_s", "compile_s", "trace_s", "flops", "forward_flops",
              "tflops_per_s", "first_loss", "last_loss", "final_loss", "grad_norm"):
    assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
  assert row["mfu"] is None  # no bf16 peak on CPU
  assert row["temp_bytes"] > 0 and row["argument_bytes"] > 0
  assert 0 < row["temporal_params"] < row["params"]
  # Three steps ran (warm-up, timed, queued) from the host weights: spatial leaves untouched,
  # every temporal leaf moved (AdamW's first steps move each leaf with a nonzero gradient).
  before = traverse_util.flatten_dict(vs.host_params(bench.abstract, seed=0))
  after = traverse_util.flatten_dict(jax.device_get(bench.state.params))
  assert before.keys() == after.keys()
  changed = {path for path in before if not np.array_equal(before[path], after[path])}
  temporal = {path for path in before if inflate.is_temporal(path)}
  assert temporal and changed == temporal
  assert int(bench.state.step) == 3
  table = vs.table([row, dict(name="b8_full_cudnn", batch=8, remat_policy="full",
                              attention="cudnn", error="skipped: time budget (200 s)")])
  assert "b1_none_xla" in table and "skipped" in table


def test_step_flops_equal_the_traced_step():
  """The analytic count (forward + dx after the first temporal layer + dW of the temporal layers)
  equals the matmuls and convolutions of the jitted step's program: optimizer, EMA and loss add
  none."""
  size = vs.SIZES["tiny"]
  config = vs.StepConfig(2)
  bench = vs.Bench(size)
  builder = bench.builder(config)
  batch = jax.eval_shape(lambda: bench.batch(config.batch))
  step = builder.make_train_step({}, jax.tree.map(lambda _: None, batch))
  traced = flops.jaxpr_flops(step, builder.abstract_state, {}, batch)
  counted = vs.step_flops(size, config)
  assert counted["flops"] == pytest.approx(traced.total, rel=1e-12)
  # Frozen spatial layers: less than the 3 × forward of training everything, more than 2 ×.
  assert 2 < counted["flops"] / counted["forward_flops"] < 3
  assert counted["all_trainable_flops"] == pytest.approx(3 * counted["forward_flops"])


def _svd_like_unet():
  return UNet(block_out_channels=(32, 64), num_attention_heads=(2, 4), cross_attention_dim=24,
              in_channels=6, out_channels=3, layers_per_block=(2, 1),
              transformer_layers_per_block=(2, 1), only_cross_attention=(True, False),
              addition_time_embed_dim=8, projection_class_embeddings_input_dim=24, temporal=True,
              use_linear_projection=True, eps_convention="svd",
              down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
              up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"))


def test_training_flops_equal_the_traced_gradient():
  """Another layout too: added time ids (a trained embedding: the time embedding then carries a
  gradient), one context per frame, only-cross attention, two transformer layers. 4×4 latents: the
  strided convolutions run as matmuls (the traced count of a strided convolution's input gradient
  would also count its dilation's zeros)."""
  unet, batch, frames, length = _svd_like_unet(), 2, 3, 2
  context = (batch, frames, length, 24)
  args = (jnp.zeros((batch, frames, 4, 4, 6)), jnp.zeros((batch,)), jnp.zeros(context),
          jnp.zeros((batch, 3)))
  params = jax.eval_shape(lambda: unet.init(jax.random.key(0), *args))["params"]
  frozen, train = inflate.split_params(params)

  def loss(train, frozen, *inputs):
    out = unet.apply({"params": inflate.merge_params(frozen, train)}, *inputs)
    return jnp.mean(jnp.square(out))

  traced = flops.jaxpr_flops(jax.grad(loss), train, frozen, *args)
  counted = flops.unet_training_flops(unet, 4, 4, batch=batch, frames=frames,
                                      context_length=length, per_frame_context=True,
                                      trainable="temporal")
  assert counted.total == pytest.approx(traced.total, rel=1e-12)
  assert counted.by_kind["attention"] == pytest.approx(traced.by_kind["attention"], rel=1e-12)


def test_sd15_video_unet_matches_the_diffusers_config():
  import vldm.convert  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from vldm.convert import registry  # pylint: disable=g-import-not-at-top
  config = dict(
      _class_name="UNet2DConditionModel", sample_size=64, in_channels=4, out_channels=4,
      block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8,
      cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
      center_input_sample=False, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
      mid_block_scale_factor=1, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
      up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
  converted = registry.format_for("UNet2DConditionModel").from_config(config)
  ours = vs.SIZES["sd15"].image_unet()
  fields = [f for f in type(ours).__dataclass_fields__ if f not in ("parent", "name")]
  assert {f: getattr(ours, f) for f in fields} == {f: getattr(converted, f) for f in fields}
  video = vs.StepConfig(1, "full", "cudnn").video_unet(vs.SIZES["sd15"])
  assert video.temporal and video.num_frames == 16 and video.remat_policy == "full"
  assert video.attention_implementation == "cudnn" and video.param_dtype == np.float32
  assert video.merge_strategy == "learned_with_images" and video.dtype == np.dtype("bfloat16")
  # SD 1.5 at 16 × 32×32: 4.7 TFLOPs forward per clip.
  assert vs.step_flops(vs.SIZES["sd15"], vs.StepConfig(1))["forward_flops"] == pytest.approx(
      4.73e12, rel=0.01)


def test_configs_parse_and_bad_ones_are_named():
  assert vs.parse_configs("8:full:cudnn, 1:none:default") == [
      vs.StepConfig(8, "full", "cudnn"), vs.StepConfig(1, "none", None)]
  with pytest.raises(ValueError, match="batch:remat_policy:attention"):
    vs.StepConfig.parse("8:full")
  with pytest.raises(ValueError, match="remat_policy"):
    vs.StepConfig.parse("1:sometimes:xla")
  with pytest.raises(ValueError, match="attention"):
    vs.StepConfig.parse("1:none:flash")


@pytest.mark.slow  # ≈ 40 s on 2 cores: keeps the default suite under 15 min
def test_suite_rows_without_a_reference():
  names = [c.name for c in suites.get_suite("gpu_video_ldm")]
  assert names == ["video_stage_b1_none_cudnn", "video_stage_b2_none_cudnn",
                   "video_stage_b8_full_cudnn", "video_stage_b1_none_xla"]
  rows = suites.dry_run(suites.get_suite("gpu_video_ldm", select="b2"))
  assert rows[0]["config"]["device"] == "cuda" and rows[0]["config"]["dtype"] == "bfloat16"
  # Twice batch 1's, but for the frame-position MLPs (computed once per step).
  assert rows[0]["flops"] == pytest.approx(
      2 * vs.step_flops(vs.SIZES["sd15"], vs.StepConfig(1))["flops"], rel=1e-3)
  # The runner takes the cases, with no reference (reference columns empty): the toy size's.
  case = vs.case("video_stage_tiny", vs.SIZES["tiny"], vs.StepConfig(1))
  [row] = suites.run([case], repeats=1, warmup=1, log=lambda _: None)
  assert "error" not in row, row.get("traceback")
  assert row["jax_s"] > 0 and row["reference_s"] is None and row["reference_min_s"] is None
  assert row["ratio"] is None and row["jax_mfu"] is None  # float32 on CPU: no MFU
  assert row["temporal_params"] > 0 and row["jax_peak_bytes"] > 0
  assert "video_stage_tiny" in suites.table([row])
