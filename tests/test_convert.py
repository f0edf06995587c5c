"""The generic conversion core: key mapping, layouts, registry errors."""
import json

import numpy as np
import pytest

from vldm import convert
from vldm.convert import core


@pytest.mark.parametrize("key", [
    "down_blocks.0.resnets.1.conv1.weight", "time_embedding.linear_1.weight",
    "up_blocks.2.attentions.0.transformer_blocks.1.ff.net.0.proj.bias",
    "mid_block.attentions.0.to_out.0.weight", "text_model.encoder.layers.11.mlp.fc2.bias",
    "down_blocks.1.resnets.0.time_mixer.mix_factor"])
def test_key_mapping_round_trips(key):
  path = core.torch_key_to_flax_path(key)
  assert all("." not in part for part in path)
  assert core.flax_path_to_torch_key(path) == key


def test_layouts_round_trip_by_leaf_name_and_rank():
  rng = np.random.default_rng(0)
  state = {"conv.weight": rng.standard_normal((8, 3, 3, 3)),      # Conv2d (O, I, kh, kw)
           "conv3d.weight": rng.standard_normal((8, 4, 3, 1, 1)),  # Conv3d (O, I, t, kh, kw)
           "dense.weight": rng.standard_normal((5, 7)),            # Linear (out, in)
           "norm.weight": rng.standard_normal((5,)), "dense.bias": rng.standard_normal((5,))}
  template = {"conv": {"kernel": np.zeros((3, 3, 3, 8))},
              "conv3d": {"kernel": np.zeros((3, 1, 1, 4, 8))},
              "dense": {"kernel": np.zeros((7, 5)), "bias": np.zeros((5,))},
              "norm": {"scale": np.zeros((5,))}}
  params = core.torch_to_flax(state, template)
  np.testing.assert_array_equal(params["conv3d"]["kernel"][:, 0, 0, 1, 2], state["conv3d.weight"][2, 1, :, 0, 0])
  np.testing.assert_array_equal(params["conv"]["kernel"][0, 2, 1, 4], state["conv.weight"][4, 1, 0, 2])
  np.testing.assert_array_equal(params["dense"]["kernel"], state["dense.weight"].T)
  back = core.flax_to_torch(params)
  assert set(back) == set(state)
  for key, value in state.items():
    np.testing.assert_allclose(back[key], value, rtol=1e-6)


def test_missing_unexpected_and_mis_shaped_weights_are_named():
  template = {"a": {"kernel": np.zeros((2, 3))}, "b": {"bias": np.zeros((3,))},
              "c": {"bias": np.zeros((4,))}}
  state = {"a.weight": np.zeros((3, 2)), "c.bias": np.zeros((5,)), "zzz.weight": np.zeros(1)}
  with pytest.raises(core.ConversionError) as info:
    core.torch_to_flax(state, template)
  message = str(info.value)
  assert "missing weights (1): b.bias" in message
  assert "unexpected weights (1): zzz.weight" in message
  assert "c.bias: file (5,) vs model (4,)" in message


def test_unsupported_class_names_the_supported_ones(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"_class_name": "I2VGenXLUNet"}))
  with pytest.raises(convert.ConversionError) as info:
    convert.load_diffusers(str(tmp_path))
  for name in ("I2VGenXLUNet", "UNet3DConditionModel", "UNet2DConditionModel",
               "UNetSpatioTemporalConditionModel", "AutoencoderKL", "AutoencoderKLTemporalDecoder",
               "CLIPTextModel", "CLIPVisionModelWithProjection"):
    assert name in str(info.value)


def test_folder_without_config_is_explained(tmp_path):
  with pytest.raises(convert.ConversionError, match="no config.json"):
    convert.load_diffusers(str(tmp_path))


def test_missing_weights_file_is_explained(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
  with pytest.raises(convert.ConversionError, match="No weights file"):
    convert.load_diffusers(str(tmp_path))
