"""Parity of vldm's CLIP encoders with transformers 5 at perturbed random weights (float32, jit)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from parity import perturb_, relative_error, to_nchw, to_nhwc
from vldm import convert
from vldm.convert import core
from vldm.models import clip

TOL = 1e-4

# Beyond transformers' tiny test configs: widths, depths, heads, activations, both pooling rules.
TEXT_CONFIGS = {
    # Legacy eos 2: pooled at argmax(input_ids).
    "legacy_eos2_quick_gelu": dict(vocab_size=1000, hidden_size=32, intermediate_size=37,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=16, hidden_act="quick_gelu",
                                   bos_token_id=0, eos_token_id=2, pad_token_id=1),
    # SD2-like: gelu, eos is the last id, pooled at the first eos, padding after it.
    "eos_last_gelu": dict(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=6, max_position_embeddings=20, hidden_act="gelu",
                          bos_token_id=510, eos_token_id=511, pad_token_id=0),
    # Wide heads, tanh GELU, full-length input.
    "eos_last_gelu_new_full": dict(vocab_size=300, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=4, num_attention_heads=2,
                                   max_position_embeddings=24, hidden_act="gelu_new",
                                   bos_token_id=298, eos_token_id=299, pad_token_id=299,
                                   layer_norm_eps=1e-6),
}
VISION_CONFIGS = {
    "patch1": dict(hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=2,
                   num_attention_heads=4, image_size=8, patch_size=1, hidden_act="quick_gelu"),
    "patch4": dict(hidden_size=48, intermediate_size=64, projection_dim=24, num_hidden_layers=3,
                   num_attention_heads=3, image_size=32, patch_size=4, hidden_act="gelu"),
    "patch4_ragged": dict(hidden_size=40, intermediate_size=80, projection_dim=16,
                          num_hidden_layers=2, num_attention_heads=5, image_size=18, patch_size=4,
                          hidden_act="gelu_new"),  # 18 = 4·4 + 2 left over, as torch's conv drops
}


def _text_ids(config, lengths, seq_len, seed, pad_id=None):
  """Rows of bos, random tokens, eos, then padding (pad_id, default the config's)."""
  rng = np.random.default_rng(seed)
  eos, bos = config["eos_token_id"], config["bos_token_id"]
  pad = config["pad_token_id"] if pad_id is None else pad_id
  low = 3
  high = min(bos, eos) if min(bos, eos) > low else config["vocab_size"]
  ids = np.full((len(lengths), seq_len), pad, np.int64)
  for row, n in zip(ids, lengths):
    row[0] = bos
    row[1:n - 1] = rng.integers(low, high, n - 2)
    row[n - 1] = eos
  return ids


def _save_reference(model, path):
  model.save_pretrained(path)
  return convert.load_diffusers(str(path))


@pytest.fixture(scope="module", params=sorted(TEXT_CONFIGS))
def text_case(request, tmp_path_factory):
  name = request.param
  config = TEXT_CONFIGS[name]
  torch.manual_seed(0)
  ref = perturb_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)), seed=1)
  module, params = _save_reference(ref, tmp_path_factory.mktemp(name))
  apply = jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask,
                                                    output_hidden_states=True))
  return name, config, ref, module, params, apply


def test_text_model_matches_transformers(text_case):
  name, config, ref, module, params, apply = text_case
  assert isinstance(module, clip.CLIPTextModel)
  seq_len = config["max_position_embeddings"] if name.endswith("full") else 12
  ids = _text_ids(config, [4, 9, seq_len], seq_len, seed=2)
  with torch.no_grad():
    expected = ref(torch.from_numpy(ids), output_hidden_states=True)
    # diffusers' clip_skip=1: final_layer_norm(hidden_states[-2]).
    expected_skip = ref.final_layer_norm(expected.hidden_states[-2])
  last, pooled, hidden = apply(params, jnp.asarray(ids, jnp.int32), None)
  skip = jax.jit(module.apply, static_argnames="method")(
      {"params": params}, hidden[-2], method=clip.CLIPTextModel.final_layer_norm)
  errors = {"last_hidden_state": relative_error(last, expected.last_hidden_state),
            "pooled": relative_error(pooled, expected.pooler_output),
            "hidden_states[-2]": relative_error(hidden[-2], expected.hidden_states[-2]),
            "clip_skip": relative_error(skip, expected_skip)}
  print(f"\nCLIPTextModel {name}: {errors}")
  assert len(hidden) == config["num_hidden_layers"] + 1
  assert max(errors.values()) <= TOL, errors


def test_text_model_attention_mask_matches_transformers(text_case):
  name, config, ref, module, params, apply = text_case
  ids = _text_ids(config, [3, 7, 12], 12, seed=4)
  mask = np.zeros_like(ids)
  for row, n in zip(mask, [3, 7, 12]):
    row[:n] = 1
  with torch.no_grad():
    expected = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  last, pooled, _ = apply(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
  error = max(relative_error(last, expected.last_hidden_state),
              relative_error(pooled, expected.pooler_output))
  print(f"\nCLIPTextModel {name} with attention_mask: {error:.2e}")
  assert error <= TOL


def test_pooling_takes_first_eos_when_padding_with_eos():
  """SD1 pads with eos itself: the pooled state is the first eos, not a later one."""
  config = TEXT_CONFIGS["eos_last_gelu"]
  module = clip.CLIPTextModel(**config)
  ids = jnp.asarray(_text_ids(config, [3, 5], 8, seed=5, pad_id=config["eos_token_id"]), jnp.int32)
  hidden = jnp.arange(2 * 8, dtype=jnp.float32).reshape(2, 8, 1)
  pooled = module.apply({}, hidden, ids, method=clip.CLIPTextModel.pool)
  np.testing.assert_array_equal(pooled[:, 0], [2, 8 + 4])


def test_text_model_with_projection_matches_transformers(tmp_path):
  config = dict(TEXT_CONFIGS["eos_last_gelu"], projection_dim=40)
  torch.manual_seed(0)
  ref = perturb_(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**config)), 7)
  module, params = _save_reference(ref, tmp_path)
  assert isinstance(module, clip.CLIPTextModelWithProjection)
  ids = _text_ids(config, [4, 10], 10, seed=8)
  with torch.no_grad():
    expected = ref(torch.from_numpy(ids))
  last, embeds = jax.jit(module.apply)({"params": params}, jnp.asarray(ids, jnp.int32))
  errors = (relative_error(last, expected.last_hidden_state),
            relative_error(embeds, expected.text_embeds))
  print(f"\nCLIPTextModelWithProjection: last {errors[0]:.2e}, text_embeds {errors[1]:.2e}")
  assert max(errors) <= TOL


@pytest.mark.parametrize("name", sorted(VISION_CONFIGS))
def test_vision_model_matches_transformers(name, tmp_path):
  config = VISION_CONFIGS[name]
  torch.manual_seed(0)
  ref = perturb_(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**config)),
                 seed=9)
  module, params = _save_reference(ref, tmp_path)
  assert isinstance(module, clip.CLIPVisionModelWithProjection)
  size = config["image_size"]
  pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(10))
  with torch.no_grad():
    expected = ref(pixels).image_embeds
  actual = jax.jit(module.apply)({"params": params}, jnp.asarray(to_nhwc(pixels)))
  error = relative_error(actual, expected)
  print(f"\nCLIPVisionModelWithProjection {name}: image_embeds {error:.2e}")
  assert error <= TOL


# ---------------------------------------------------------------- vldm → transformers round trip


def _random_params(module, *args):
  """Random parameters of the module's shapes, drawn in numpy: compiling `module.init`'s random
  initialisers costs seconds on CPU. Norm scales around 1, kernels scaled by fan-in."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  rng = np.random.default_rng(11)

  def draw(path, leaf):
    x = rng.normal(size=leaf.shape)
    name = path[-1].key
    if name == "scale":
      x = 1.0 + 0.1 * x
    elif name == "kernel":
      x = x / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      x = 0.1 * x
    return x.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("cls", [clip.CLIPTextModel, clip.CLIPTextModelWithProjection])
def test_text_round_trip_through_transformers(cls, tmp_path):
  config = TEXT_CONFIGS["eos_last_gelu"]
  module = cls(**config)
  ids = _text_ids(config, [4, 9], 9, seed=13)
  params = _random_params(module, jnp.asarray(ids, jnp.int32))
  convert.save_diffusers(module, params, str(tmp_path))
  ref = getattr(transformers, cls.__name__).from_pretrained(str(tmp_path)).eval()
  for key, value in config.items():
    assert getattr(ref.config, key) == value, key
  with torch.no_grad():
    expected = ref(torch.from_numpy(ids))
  last, second = jax.jit(module.apply)({"params": params}, jnp.asarray(ids, jnp.int32))
  projected = cls is clip.CLIPTextModelWithProjection
  ref_second = expected.text_embeds if projected else expected.pooler_output
  assert relative_error(last, expected.last_hidden_state) <= TOL
  assert relative_error(second, ref_second) <= TOL
  reloaded, reloaded_params = convert.load_diffusers(str(tmp_path))
  assert reloaded == module
  jax.tree.map(np.testing.assert_array_equal, reloaded_params, params)


def test_vision_round_trip_through_transformers(tmp_path):
  config = VISION_CONFIGS["patch4"]
  module = clip.CLIPVisionModelWithProjection(**config)
  pixels = np.random.default_rng(14).normal(size=(2, 32, 32, 3)).astype(np.float32)
  params = _random_params(module, pixels)
  convert.save_diffusers(module, params, str(tmp_path))
  ref = transformers.CLIPVisionModelWithProjection.from_pretrained(str(tmp_path)).eval()
  with torch.no_grad():
    expected = ref(torch.from_numpy(to_nchw(pixels))).image_embeds
  assert relative_error(jax.jit(module.apply)({"params": params}, pixels), expected) <= TOL
  assert convert.load_diffusers(str(tmp_path))[0] == module


def test_legacy_text_folder_with_position_ids_buffer_loads(tmp_path):
  """SD1 text_encoder folders: `text_model.` keys plus a saved position_ids buffer."""
  config = TEXT_CONFIGS["legacy_eos2_quick_gelu"]
  module = clip.CLIPTextModel(**config)
  params = _random_params(module, jnp.zeros((1, 4), jnp.int32))
  convert.save_diffusers(module, params, str(tmp_path))
  weights = os.path.join(tmp_path, "model.safetensors")
  state = core.read_safetensors(weights)
  assert all(k.startswith("text_model.") for k in state)
  state["text_model.embeddings.position_ids"] = np.arange(16)[None]
  core.write_safetensors(state, weights)
  _, loaded = convert.load_diffusers(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


# ----------------------------------------------------------------------------------- bad input


def test_bad_inputs_have_clear_errors(tmp_path):
  text = clip.CLIPTextModel(**TEXT_CONFIGS["legacy_eos2_quick_gelu"])
  params = jax.eval_shape(text.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="max_position_embeddings=16"):
    text.apply(params, jnp.zeros((1, 17), jnp.int32))
  with pytest.raises(ValueError, match=r"\[batch, length\]"):
    text.apply(params, jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="integers"):
    text.apply(params, jnp.zeros((1, 4), jnp.float32))
  vision = clip.CLIPVisionModelWithProjection(**VISION_CONFIGS["patch4"])
  with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\)"):
    vision.init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match="accepted"):
    clip.activation("gelu_42")
  with open(os.path.join(tmp_path, "config.json"), "w") as f:
    json.dump({"architectures": ["CLIPTextModel"], "eos_token_id": [2, 3]}, f)
  with pytest.raises(convert.ConversionError, match="eos_token_id"):
    convert.load_diffusers(str(tmp_path))


@pytest.mark.parametrize("name", sorted(clip.ACTIVATIONS))
def test_activations_match_transformers(name):
  from transformers.activations import ACT2FN  # pylint: disable=g-import-not-at-top
  x = np.linspace(-6, 6, 301, dtype=np.float32)
  expected = ACT2FN[name](torch.from_numpy(x)).numpy()
  assert relative_error(clip.activation(name)(jnp.asarray(x)), expected) <= 1e-6


# ------------------------------------------------------------------------- SVD preprocessing


def _svd_reference_preprocess(images01):
  """StableVideoDiffusionPipeline._encode_image's steps on a PIL / numpy image in [0, 1]."""
  # pylint: disable=g-import-not-at-top
  from diffusers.pipelines.stable_video_diffusion import pipeline_stable_video_diffusion as svd
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  # pylint: enable=g-import-not-at-top
  resized = (svd._resize_with_antialiasing(images01 * 2.0 - 1.0, (224, 224)) + 1.0) / 2.0
  return CLIPImageProcessorPil()(images=resized, do_normalize=True, do_center_crop=False,
                                 do_resize=False, do_rescale=False, return_tensors="pt").pixel_values


@pytest.mark.parametrize("height,width", [(320, 480), (100, 150), (576, 1024), (224, 224)])
def test_preprocess_for_clip_matches_diffusers(height, width):
  images01 = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(15),
                        dtype=torch.float64)
  actual = jax.jit(clip.preprocess_for_clip)(jnp.asarray(to_nhwc(images01 * 2.0 - 1.0), jnp.float32))
  # The same filters exactly: against the float64 reference only float32 rounding remains. The
  # pipeline itself runs in float32, where torch's own resize rounding is ~2e-5.
  error64 = relative_error(actual, to_nhwc(_svd_reference_preprocess(images01)))
  error32 = relative_error(actual, to_nhwc(_svd_reference_preprocess(images01.float())))
  print(f"\npreprocess_for_clip {height}x{width}: vs float64 {error64:.2e}, vs float32 {error32:.2e}")
  assert error64 <= 2e-6
  assert error32 <= 1e-4
