"""Export formats: which class save_diffusers writes for a UNet, vldm's own 'VldmUNet' folders,
temporal-layer files, and diffusers scheduler configs from vldm's sampler settings."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import parity
from parity import jit_quick, relative_error
from vldm import convert
from vldm.convert import core, native, registry
from vldm.convert import unet as unet_convert
from vldm.diffusion import samplers
from vldm.diffusion.schedules import DiscreteSchedule
from vldm.models import inflate
from vldm.models.unet import UNet

B, F, SIZE, L, D = 1, 2, 8, 3, 24

# SD1-style (conv projections, 8 groups): inflated, it is a Video LDM text-to-video UNet.
IMAGE_UNET = UNet(
    block_out_channels=(32, 64),
    norm_num_groups=8,
    cross_attention_dim=D,
    num_attention_heads=2,
    layers_per_block=1,
    sample_size=16,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
# diffusers' own tiny UNetSpatioTemporalConditionModel config.
SVD_CONFIG = dict(
    block_out_channels=[32, 64],
    cross_attention_dim=32,
    num_attention_heads=8,
    in_channels=8,
    layers_per_block=2,
    addition_time_embed_dim=32,
    projection_class_embeddings_input_dim=96,
    down_block_types=["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
    up_block_types=["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
)


def _svd_unet():
  return registry.format_for("UNetSpatioTemporalConditionModel").from_config(SVD_CONFIG)




def _assert_params_equal(actual, expected):
  actual, expected = traverse_util.flatten_dict(actual), traverse_util.flatten_dict(expected)
  assert set(actual) == set(expected)
  for path, value in expected.items():
    assert np.asarray(actual[path]).dtype == np.float32, path
    np.testing.assert_array_equal(actual[path], value, err_msg="/".join(path))


def _video_inputs(module):
  rng = np.random.default_rng(0)
  return (
      rng.standard_normal((B, F, SIZE, SIZE, module.in_channels)).astype(np.float32),
      np.array([300.0], np.float32),
      rng.standard_normal((B, L, D)).astype(np.float32),
  )


# ---- which class save_diffusers writes ----------------------------------------------------------
def test_format_choice_for_the_three_unet_kinds():
  assert convert.export_class_of(IMAGE_UNET) == "UNet2DConditionModel"
  assert convert.export_class_of(_svd_unet()) == "UNetSpatioTemporalConditionModel"
  video_ldm = inflate.video_config_from_image(IMAGE_UNET)
  assert convert.export_class_of(video_ldm) == "VldmUNet"
  # Video LDM options that no diffusers class has, even on the SVD layout.
  assert convert.export_class_of(_svd_unet().clone(text_motion_embedding=True)) == "VldmUNet"
  assert convert.export_class_of(_svd_unet().clone(merge_strategy="learned")) == "VldmUNet"
  assert convert.export_class_of(IMAGE_UNET.clone(eps_convention="svd")) == "VldmUNet"
  # Fields that do not change the weights or the function keep the diffusers class.
  assert (
      convert.export_class_of(IMAGE_UNET.clone(merge_factor=0.2, num_frames=3, remat_policy="full"))
      == "UNet2DConditionModel"
  )
  assert (
      convert.export_class_of(
          _svd_unet().clone(temporal_conv_implementation="conv3d", dtype=jnp.bfloat16)
      )
      == "UNetSpatioTemporalConditionModel"
  )
  # A forced class still says why it cannot hold the UNet.
  with pytest.raises(
      convert.ConversionError, match="the classes for it: UNet2DConditionModel, VldmUNet"
  ):
    convert.save_diffusers(IMAGE_UNET, {}, "unused", class_name="AutoencoderKL")
  with pytest.raises(convert.ConversionError, match="use_linear_projection=False"):
    convert.save_diffusers(video_ldm, {}, "unused", class_name="UNetSpatioTemporalConditionModel")


def test_a_field_the_diffusers_config_would_lose_selects_the_native_class(monkeypatch):
  """The diffusers class is chosen only when reloading its config rebuilds the same UNet."""
  module = IMAGE_UNET.clone(norm_eps=1e-6)
  assert convert.export_class_of(module) == "UNet2DConditionModel"
  monkeypatch.setattr(
      unet_convert, "_SD_KEYS", tuple(k for k in unet_convert._SD_KEYS if k != "norm_eps")
  )
  problems = registry.format_for("UNet2DConditionModel").problems(module)
  assert problems == ["norm_eps=1e-06 would load back as 1e-05"]
  assert convert.export_class_of(module) == "VldmUNet"
  with pytest.raises(convert.ConversionError, match="norm_eps=1e-06 would load back"):
    convert.save_diffusers(module, {}, "unused", class_name="UNet2DConditionModel")


def test_sd_unet_is_saved_for_diffusers(tmp_path):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  params = parity.random_params(IMAGE_UNET, 0)
  convert.save_diffusers(IMAGE_UNET, params, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["_class_name"] == "UNet2DConditionModel"
  reference = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path)).eval()
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((2, SIZE, SIZE, 4)).astype(np.float32)
  timesteps = np.array([10, 500])
  context = rng.standard_normal((2, L, D)).astype(np.float32)
  with torch.no_grad():
    expected = reference(
        torch.from_numpy(np.moveaxis(sample, -1, 1)),
        torch.from_numpy(timesteps),
        torch.from_numpy(context),
    ).sample.numpy()
  actual = jit_quick(lambda p, *a: IMAGE_UNET.apply({"params": p}, *a))(
      params, sample, timesteps, context
  )
  err = relative_error(np.asarray(actual), np.moveaxis(expected, 1, -1))
  print(f"saved UNet2DConditionModel vs vldm: relative error {err:.2e}")
  assert err <= 1e-4
  module, loaded = convert.load_diffusers(str(tmp_path))
  assert module == IMAGE_UNET
  _assert_params_equal(loaded, params)


# ---- VldmUNet folders ---------------------------------------------------------------------------
def test_native_image_unet_round_trip(tmp_path):
  module = IMAGE_UNET.clone(
      eps_convention="svd",
      only_cross_attention=(True, False),
      transformer_layers_per_block=(2, 1),
      flip_sin_to_cos=False,
      freq_shift=1,
      sample_size=(16, 24),
      upcast_attention=True,
  )
  params = parity.random_params(module, 1)
  convert.save_diffusers(module, params, str(tmp_path))  # chosen: no diffusers class fits
  with open(tmp_path / "config.json") as f:
    config = json.load(f)
  assert config["_class_name"] == native.CLASS_NAME == "VldmUNet"
  assert config["_vldm_version"] and config["_vldm_format"] == native.FORMAT_VERSION
  assert config["sample_size"] == [16, 24] and config["eps_convention"] == "svd"
  assert not set(config) & set(native.COMPUTE_FIELDS)
  loaded_module, loaded = convert.load_diffusers(str(tmp_path))
  assert loaded_module == module
  _assert_params_equal(loaded, params)
  forward = jit_quick(lambda m, p, *a: m.apply({"params": p}, *a), static_argnums=0)
  sample, timesteps, context = _video_inputs(module)
  np.testing.assert_array_equal(
      forward(loaded_module, loaded, sample[:, 0], timesteps, context),
      forward(module, params, sample[:, 0], timesteps, context),
  )
  # An SD-describable UNet, forced into the native class, round-trips as well.
  params = parity.random_params(IMAGE_UNET, 2)
  convert.save_diffusers(IMAGE_UNET, params, str(tmp_path / "forced"), class_name="VldmUNet")
  forced_module, forced = convert.load_diffusers(str(tmp_path / "forced"))
  assert forced_module == IMAGE_UNET
  _assert_params_equal(forced, params)


def test_native_video_unet_round_trip(tmp_path):
  video = inflate.video_config_from_image(
      IMAGE_UNET,
      merge_strategy="learned",
      merge_factor=0.3,
      text_motion_embedding=True,
      temporal_conv_implementation="conv3d",
      num_frames=7,
  )
  params = parity.random_params(video, 3)
  # Computation settings are not saved: the loaded UNet has the defaults until a run sets them.
  convert.save_diffusers(
      video.clone(remat_policy="full", dtype=jnp.bfloat16), params, str(tmp_path)
  )
  with open(tmp_path / "config.json") as f:
    config = json.load(f)
  assert config["_class_name"] == "VldmUNet"
  assert config["down_block_types"] == [
      "CrossAttnDownBlockSpatioTemporal",
      "DownBlockSpatioTemporal",
  ]
  keys = core.read_safetensors(str(tmp_path / registry.DIFFUSERS_WEIGHTS))
  assert "down_blocks_0/resnets_0/spatial_res_block/conv1/kernel" in keys
  assert keys["conv_in/kernel"].shape == (3, 3, 4, 32)  # Flax layout
  loaded_module, loaded = convert.load_diffusers(str(tmp_path))
  assert loaded_module == video
  _assert_params_equal(loaded, params)
  forward = jit_quick(lambda m, p, *a: m.apply({"params": p}, *a), static_argnums=0)
  inputs = _video_inputs(video)
  np.testing.assert_array_equal(
      forward(loaded_module, loaded, *inputs), forward(video, params, *inputs)
  )


def test_native_folder_errors(tmp_path):
  video = inflate.video_config_from_image(IMAGE_UNET)
  convert.save_diffusers(video, parity.random_params(video, 0), str(tmp_path))
  config_path = tmp_path / "config.json"
  config = json.loads(config_path.read_text())
  for change, message in [
      ({"unknown_field": 1}, r"unknown fields \['unknown_field'\]"),
      ({"dtype": "bfloat16"}, r"computation settings \['dtype'\]"),
      ({"_vldm_format": 99}, "reads formats up to 1"),
      ({"merge_strategy": "bogus"}, "Unknown merge_strategy 'bogus'"),
  ]:
    config_path.write_text(json.dumps({**config, **change}))
    with pytest.raises(convert.ConversionError, match=message):
      convert.load_diffusers(str(tmp_path))
  # Weights of another architecture: every misfit named by its path.
  config_path.write_text(json.dumps({**config, "text_motion_embedding": True}))
  with pytest.raises(
      convert.ConversionError, match=r"missing in the weights \(\d+\): .*text_motion_embed"
  ):
    convert.load_diffusers(str(tmp_path))
  config_path.write_text(json.dumps({**config, "block_out_channels": [32, 32]}))
  with pytest.raises(convert.ConversionError, match=r"shape mismatches .*weights \(.*\) vs model"):
    convert.load_diffusers(str(tmp_path))


# ---- temporal-layer files -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
  """A 'trained' Video LDM UNet: random spatial and temporal weights."""
  video = inflate.video_config_from_image(IMAGE_UNET)
  return video, parity.random_params(video, 4)


def test_temporal_layers_file_round_trip(trained, tmp_path):
  video, params = trained
  path = str(tmp_path / "motion.safetensors")
  convert.save_temporal_layers(params, path, metadata={"base": "tiny-sd", "steps": "1200"})
  _, temporal = inflate.split_params(params)
  state = core.read_safetensors(path)
  assert all(inflate.is_temporal(k.split("/")) for k in state)
  assert len(state) == len(traverse_util.flatten_dict(temporal))
  loaded = convert.load_temporal_layers(path)
  _assert_params_equal(loaded, temporal)
  assert convert.temporal_layers_metadata(path) == {"base": "tiny-sd", "steps": "1200"}

  # Onto another image model's inflated params: its spatial layers, these temporal layers.
  other_image = jax.tree_util.tree_map(lambda x: x + 0.5, inflate.spatial_params(params))
  other_video = inflate.transplant_temporal(parity.random_params(video, 9), other_image)
  applied = convert.apply_temporal_layers(other_video, loaded)
  spatial, temporal_applied = inflate.split_params(applied)
  _assert_params_equal(temporal_applied, temporal)
  _assert_params_equal(spatial, inflate.split_params(other_video)[0])
  # Without initialising temporal layers first: the same parameters.
  _assert_params_equal(convert.attach_temporal_layers(other_image, video, loaded), applied)
  # Onto the model they came from: the trained parameters exactly.
  _assert_params_equal(
      convert.apply_temporal_layers(
          inflate.transplant_temporal(other_video, inflate.spatial_params(params)), loaded
      ),
      params,
  )


def test_temporal_layers_errors(trained, tmp_path):
  video, params = trained
  path = str(tmp_path / "motion.safetensors")
  convert.save_temporal_layers(params, path)
  loaded = convert.load_temporal_layers(path)
  with pytest.raises(convert.ConversionError, match="no temporal layers"):
    convert.save_temporal_layers(inflate.spatial_params(params), str(tmp_path / "x.safetensors"))
  with pytest.raises(convert.ConversionError, match="str to str"):
    convert.save_temporal_layers(params, str(tmp_path / "x.safetensors"), metadata={"steps": 5})
  # A model with other temporal layers: the missing ones are named.
  motion = inflate.video_config_from_image(IMAGE_UNET, text_motion_embedding=True)
  motion_params = jax.eval_shape(lambda: motion.init(jax.random.key(0), *motion.example_inputs()))
  with pytest.raises(
      convert.ConversionError, match=r"missing in the temporal layers \(\d+\): .*text_motion_embed"
  ):
    convert.apply_temporal_layers(motion_params["params"], loaded)
  # Another width: the shapes are named.
  wide = inflate.video_config_from_image(IMAGE_UNET.clone(block_out_channels=(32, 32)))
  with pytest.raises(convert.ConversionError, match=r"shape mismatches \(\d+\): .*temporal layers"):
    convert.attach_temporal_layers(
        parity.random_params(IMAGE_UNET.clone(block_out_channels=(32, 32)), 0), wide, loaded
    )
  # A whole-UNet weights file is not a temporal-layers file.
  convert.save_diffusers(video, params, str(tmp_path / "unet"))
  with pytest.raises(convert.ConversionError, match="not a vldm temporal-layers file"):
    convert.load_temporal_layers(str(tmp_path / "unet" / registry.DIFFUSERS_WEIGHTS))


# ---- scheduler configs --------------------------------------------------------------------------
# Non-default settings per sampler (each diffusers class can express them).
_OPTIONS = {
    "ddpm": dict(
        timestep_spacing="trailing",
        steps_offset=1,
        variance_type="fixed_large",
        clip_sample=True,
        clip_sample_range=2.0,
    ),
    "ddim": dict(timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=True),
    "euler": dict(
        timestep_spacing="leading",
        steps_offset=1,
        use_karras_sigmas=True,
        sigma_min=0.002,
        sigma_max=700.0,
        final_sigmas_type="sigma_min",
        timestep_type="continuous",
    ),
    "euler_ancestral": dict(timestep_spacing="trailing", steps_offset=1),
    "heun": dict(timestep_spacing="trailing", use_exponential_sigmas=True),
    "dpmpp_2m": dict(
        solver_order=1,
        solver_type="heun",
        lower_order_final=False,
        euler_at_final=True,
        use_karras_sigmas=True,
        final_sigmas_type="sigma_min",
        lambda_min_clipped=-5.1,
    ),
}


def _diffusers_class(name):
  diffusers = pytest.importorskip("diffusers")
  return getattr(diffusers, {v: k for k, v in samplers.DIFFUSERS_SCHEDULERS.items()}[name])


def _assert_diffusers_accepts(name, config):
  """diffusers' from_config keeps every entry (an unknown key would be dropped)."""
  scheduler = _diffusers_class(name).from_config(json.loads(json.dumps(config)))
  for key, value in config.items():
    if key != "_class_name":
      assert scheduler.config[key] == value, key


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_scheduler_config_round_trip(name):
  # What from_scheduler_config makes of diffusers' own default config comes back unchanged.
  default = dict(_diffusers_class(name)().config, _class_name=_diffusers_class(name).__name__)
  x = samplers.from_scheduler_config(default)
  assert samplers.from_scheduler_config(samplers.to_scheduler_config(*x)) == x
  # Non-default settings: the schedule, the options and the prediction type come back.
  schedule = DiscreteSchedule(
      num_train_timesteps=500,
      beta_start=0.00085,
      beta_end=0.012,
      beta_schedule="scaled_linear",
      rescale_betas_zero_snr=name != "heun",
  )
  x = (name, schedule, _OPTIONS[name], "v_prediction")
  config = samplers.to_scheduler_config(*x)
  assert config["_class_name"] == _diffusers_class(name).__name__
  back = samplers.from_scheduler_config(json.loads(json.dumps(config)))  # through the JSON file
  assert back[0:2] + back[3:] == (name, schedule, "v_prediction")
  # Options diffusers' class lacks are left out when they hold the one value it runs (DDIM eta=0).
  defaults = samplers.SAMPLERS[name].defaults
  assert {**defaults, **back[2]} == {**defaults, **_OPTIONS[name]}
  _assert_diffusers_accepts(name, config)
  # Trained betas and the sample prediction type.
  betas = tuple(np.linspace(1e-4, 0.03, 50).astype(np.float32).tolist())
  schedule = DiscreteSchedule(num_train_timesteps=50, trained_betas=betas)
  config = samplers.to_scheduler_config(name, schedule, {}, "sample")
  _, schedule_back, _, prediction_type = samplers.from_scheduler_config(config)
  assert (schedule_back, prediction_type) == (schedule, "sample")
  _assert_diffusers_accepts(name, config)


def test_scheduler_configs_diffusers_cannot_express():
  schedule = DiscreteSchedule()
  for args, message in [
      (("ddim", schedule, {"eta": 1.0}), r"eta=1.0 \(it runs eta=0.0\)"),
      (("heun", schedule, {"sigma_min": 0.1}), "sigma_min=0.1"),
      (("heun", DiscreteSchedule(rescale_betas_zero_snr=True), {}), "rescale_betas_zero_snr"),
      (("euler", schedule, {"timestep_type": "continuous"}), "only with v_prediction"),
      (("euler", schedule, {"bogus": 1}), r"Unknown option\(s\) \['bogus'\]"),
      (("lms", schedule, {}), "Unknown sampler 'lms'"),
  ]:
    with pytest.raises(ValueError, match=message):
      samplers.to_scheduler_config(*args)
  with pytest.raises(ValueError, match="Unknown prediction_type for a diffusers scheduler 'edm'"):
    samplers.to_scheduler_config("euler", schedule, {}, "edm")
