"""UNet2DConditionModel / UNetSpatioTemporalConditionModel parity against diffusers, round trips,
and bad-input errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parity import jit_quick, perturb_, relative_error

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from vldm.convert import ConversionError, load_diffusers, save_diffusers  # noqa: E402
from vldm.models.unet import UNet, broadcast_timesteps  # noqa: E402

SD_CONFIGS = {
    # SD1-style: conv projections, one head count (8) for every level.
    "sd1": dict(
        block_out_channels=(32, 64),
        norm_num_groups=8,
        cross_attention_dim=24,
        attention_head_dim=8,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    # SD2-style: linear projections, per-level head counts, three levels.
    "sd2": dict(
        block_out_channels=(32, 64, 64),
        norm_num_groups=16,
        cross_attention_dim=40,
        attention_head_dim=[2, 4, 4],
        use_linear_projection=True,
        layers_per_block=1,
        norm_eps=1e-6,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    # Three levels of two layers, two transformer layers in the middle one, and the odd options.
    "deep": dict(
        block_out_channels=(32, 48, 64),
        norm_num_groups=16,
        cross_attention_dim=16,
        attention_head_dim=[2, 3, 4],
        layers_per_block=2,
        transformer_layers_per_block=[1, 2, 1],
        only_cross_attention=[False, True, False],
        freq_shift=1,
        flip_sin_to_cos=False,
        center_input_sample=True,
        mid_block_scale_factor=1.5,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
}
SVD_CONFIGS = {
    # diffusers' own test config: 2 levels, 8 heads.
    "svd_a": (
        dict(
            block_out_channels=(32, 64),
            cross_attention_dim=32,
            num_attention_heads=8,
            in_channels=8,
            layers_per_block=2,
            addition_time_embed_dim=32,
            projection_class_embeddings_input_dim=96,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        ),
        2,
    ),
    # Three levels, per-level heads, two transformer layers, other in/out channels, 5 frames.
    "svd_b": (
        dict(
            block_out_channels=(32, 64, 64),
            cross_attention_dim=24,
            num_attention_heads=(2, 4, 4),
            in_channels=6,
            out_channels=3,
            layers_per_block=1,
            transformer_layers_per_block=(1, 2, 1),
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24,
            down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 2
            + ("DownBlockSpatioTemporal",),
            up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 2,
        ),
        5,
    ),
}


def _apply(module):
  # Tiny models: LLVM's optimisations cost more compile time than they save.
  return jit_quick(lambda params, *args: module.apply({"params": params}, *args))


def _run_reference(model, *args):
  with torch.no_grad():
    return model(*(torch.from_numpy(np.asarray(a)) for a in args)).sample.numpy()


@pytest.fixture(scope="module", params=sorted(SD_CONFIGS))
def sd_case(request, tmp_path_factory):
  name = request.param
  torch.manual_seed(0)
  reference = perturb_(diffusers.UNet2DConditionModel(sample_size=16, **SD_CONFIGS[name]), seed=1)
  path = str(tmp_path_factory.mktemp(name))
  reference.save_pretrained(path)
  module, params = load_diffusers(path)
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
  timesteps = np.array([10, 500])
  context = rng.standard_normal((2, 5, SD_CONFIGS[name]["cross_attention_dim"])).astype(np.float32)
  expected = np.moveaxis(_run_reference(reference, sample, timesteps, context), 1, -1)
  inputs = (np.moveaxis(sample, 1, -1), timesteps, context)
  actual = np.asarray(_apply(module)(params, *inputs))
  return dict(
      name=name,
      module=module,
      params=params,
      inputs=inputs,
      expected=expected,
      actual=actual,
      raw=(sample, timesteps, context),
  )


@pytest.fixture(scope="module", params=sorted(SVD_CONFIGS))
def svd_case(request, tmp_path_factory):
  name = request.param
  config, frames = SVD_CONFIGS[name]
  torch.manual_seed(0)
  reference = perturb_(diffusers.UNetSpatioTemporalConditionModel(**config), seed=1)
  path = str(tmp_path_factory.mktemp(name))
  reference.save_pretrained(path)
  module, params = load_diffusers(path)
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((2, frames, config["in_channels"], 8, 8)).astype(np.float32)
  timesteps = np.array([0.3, -1.2], np.float32)  # SVD's continuous c_noise
  context = rng.standard_normal((2, 1, config["cross_attention_dim"])).astype(np.float32)
  time_ids = np.array([[6, 127, 0.02], [10, 30, 0.5]], np.float32)
  expected = np.moveaxis(_run_reference(reference, sample, timesteps, context, time_ids), 2, -1)
  inputs = (np.moveaxis(sample, 2, -1), timesteps, context, time_ids)
  actual = np.asarray(_apply(module)(params, *inputs))
  return dict(
      name=name,
      module=module,
      params=params,
      inputs=inputs,
      expected=expected,
      actual=actual,
      raw=(sample, timesteps, context, time_ids),
  )


def test_unet2d_parity(sd_case):
  assert sd_case["module"].reference_class == "UNet2DConditionModel"
  err = relative_error(sd_case["actual"], sd_case["expected"])
  print(f"UNet2DConditionModel {sd_case['name']}: relative error {err:.2e}")
  assert err <= 1e-4


def test_unet_spatio_temporal_parity(svd_case):
  assert svd_case["module"].temporal
  assert svd_case["actual"].shape == svd_case["expected"].shape
  err = relative_error(svd_case["actual"], svd_case["expected"])
  print(f"UNetSpatioTemporalConditionModel {svd_case['name']}: relative error {err:.2e}")
  assert err <= 1e-4


def test_head_count_trap(sd_case):
  """UNet2DConditionModel's attention_head_dim is the number of heads."""
  if sd_case["name"] != "sd1":
    pytest.skip("one config is enough")
  assert sd_case["module"].num_attention_heads == 8
  kernel = sd_case["params"]["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"]
  assert kernel.shape == (1, 1, 32, 32)  # SD1: a 1×1 conv projection


def test_bfloat16_compute(sd_case):
  """bf16 compute with the float32 weights stays close to the float32 result."""
  if sd_case["name"] != "sd1":
    pytest.skip("one config is enough")
  module = sd_case["module"].clone(dtype=jnp.bfloat16)
  out = _apply(module)(sd_case["params"], *sd_case["inputs"])
  assert out.dtype == jnp.bfloat16
  err = relative_error(np.asarray(out, np.float32), sd_case["actual"])
  print(f"bf16 compute vs float32: relative error {err:.2e}")
  assert err < 5e-2


def _round_trip(case, tmp_path, cls):
  save_diffusers(case["module"], case["params"], str(tmp_path))
  with open(os.path.join(tmp_path, "config.json")) as f:
    assert json.load(f)["_class_name"] == cls.__name__
  reloaded = cls.from_pretrained(str(tmp_path)).eval()
  return _run_reference(reloaded, *case["raw"])


def test_unet2d_round_trip(sd_case, tmp_path):
  if sd_case["name"] != "sd2":
    pytest.skip("one config is enough")
  out = np.moveaxis(_round_trip(sd_case, tmp_path, diffusers.UNet2DConditionModel), 1, -1)
  assert relative_error(out, sd_case["actual"]) <= 1e-4
  module, params = load_diffusers(str(tmp_path))
  assert module == sd_case["module"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, sd_case["params"])


def test_unet_spatio_temporal_round_trip(svd_case, tmp_path):
  if svd_case["name"] != "svd_b":
    pytest.skip("one config is enough")
  out = np.moveaxis(
      _round_trip(svd_case, tmp_path, diffusers.UNetSpatioTemporalConditionModel), 2, -1
  )
  assert relative_error(out, svd_case["actual"]) <= 1e-4
  module, _ = load_diffusers(str(tmp_path))
  assert module == svd_case["module"]


def test_scalar_timestep_broadcasts():
  np.testing.assert_array_equal(broadcast_timesteps(10, 3), [10, 10, 10])
  with pytest.raises(ValueError, match=r"scalar or \(3,\)"):
    broadcast_timesteps(np.zeros((2,)), 3)


def _shapes(module, *args):
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *args))


def test_bad_inputs_are_named():
  image = UNet(
      block_out_channels=(32, 32, 32),
      cross_attention_dim=40,
      num_attention_heads=2,
      down_block_types=("CrossAttnDownBlock2D",) * 3,
      up_block_types=("CrossAttnUpBlock2D",) * 3,
      layers_per_block=1,
  )
  video = image.clone(
      temporal=True,
      in_channels=8,
      addition_time_embed_dim=4,
      projection_class_embeddings_input_dim=12,
  )
  context = jnp.zeros((1, 5, 40))
  with pytest.raises(ValueError, match=r"divisible by 4 \(2\*\*\(levels-1\)"):
    _shapes(image, jnp.zeros((1, 10, 12, 4)), jnp.zeros((1,)), context)
  with pytest.raises(ValueError, match="in_channels = 4"):
    _shapes(image, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)), context)
  with pytest.raises(ValueError, match="cross_attention_dim = 40"):
    _shapes(image, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 5, 24)))
  with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
    _shapes(image, jnp.zeros((1, 2, 8, 8, 4)), jnp.zeros((1,)), context)
  with pytest.raises(ValueError, match="timesteps"):
    _shapes(image, jnp.zeros((2, 8, 8, 4)), jnp.zeros((3,)), jnp.zeros((2, 5, 40)))
  clip, t, ctx, ids = (
      jnp.zeros((2, 3, 8, 8, 8)),
      jnp.zeros((2,)),
      jnp.zeros((2, 1, 40)),
      jnp.zeros((2, 3)),
  )
  with pytest.raises(ValueError, match=r"added_time_ids of shape \(2, 3\)"):
    _shapes(video, clip, t, ctx)
  with pytest.raises(ValueError, match="image_only_indicator must be"):
    _shapes(video, clip, t, ctx, ids, jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match=r"\(B, F, H, W, C\)"):
    _shapes(video, clip[:, 0], t, ctx, ids)
  with pytest.raises(ValueError, match="encoder_hidden_states must be"):
    _shapes(video, clip, t, jnp.zeros((3, 1, 40)), ids)
  with pytest.raises(ValueError, match="no added-time-ids"):
    _shapes(video.clone(addition_time_embed_dim=None), clip, t, ctx, ids)
  assert _shapes(video, clip, t, ctx, ids)["params"]["add_embedding"]["linear_1"][
      "kernel"
  ].shape == (12, 128)


def test_bad_configs_are_named(tmp_path):
  with pytest.raises(ValueError, match="supported: down .*CrossAttnDownBlock2D"):
    UNet(down_block_types=("AttnDownBlock2D",) * 4).check_config()
  with pytest.raises(ValueError, match="accepted: none, full, dots_saveable"):
    UNet(remat_policy="most").check_config()
  tiny = UNet(
      block_out_channels=(32,),
      down_block_types=("CrossAttnDownBlock2D",),
      up_block_types=("CrossAttnUpBlock2D",),
      cross_attention_dim=8,
      num_attention_heads=2,
      layers_per_block=1,
      attention_implementation="flash",
  )
  with pytest.raises(ValueError, match="Unknown attention implementation 'flash'"):
    _shapes(tiny, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 3, 8)))
  config = {
      "_class_name": "UNet2DConditionModel",
      "class_embed_type": "timestep",
      "time_embedding_type": "fourier",
  }
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(ConversionError, match="class_embed_type='timestep'.*time_embedding_type"):
    load_diffusers(str(tmp_path))
  config = {
      "_class_name": "UNet2DConditionModel",
      "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
  }
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(ConversionError, match="Unsupported block types.*UNetMidBlock2DCrossAttn"):
    load_diffusers(str(tmp_path))


def test_chunked_attention_matches_the_whole_matrix():
  """'chunked' attention (queries 16 at a time, last chunk padded) equals jax.nn's: values and the
  gradients of q, k and v; cross-attention to a short context included."""
  from vldm.models import layers  # pylint: disable=g-import-not-at-top

  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (2, 37, 24))
  for tk in (37, 5):
    k, v = (jax.random.normal(key, (2, tk, 24)) for key in keys[1:3])
    cot = jax.random.normal(keys[3], (2, 37, 24))
    run = lambda impl, q, k, v: jnp.sum(
        cot * layers.attend(q, k, v, 3, implementation=impl, query_chunk=16)
    )
    whole, grads = jax.value_and_grad(lambda *a: run("xla", *a), argnums=(0, 1, 2))(q, k, v)
    chunked, chunked_grads = jax.value_and_grad(lambda *a: run("chunked", *a), argnums=(0, 1, 2))(
        q, k, v
    )
    assert relative_error(chunked, whole) < 1e-6
    for a, b in zip(chunked_grads, grads):
      assert relative_error(a, b) < 1e-5
