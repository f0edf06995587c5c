"""Parity of vldm's autoencoders and temporal res blocks with diffusers, and their weight I/O."""
import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parity import perturb_, relative_error, to_nchw, to_nhwc
from vldm.convert import ConversionError, core, load_diffusers, save_diffusers
from vldm.models import autoencoder, temporal_layers

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-4

# Beyond diffusers' own tiny configs: 2 and 3 levels, 1 and 2 layers per block, several latent
# widths, mid attention and quant convs on and off.
KL_CONFIGS = {
    "2lvl_l1_attn": dict(block_out_channels=[8, 16], norm_num_groups=4, layers_per_block=1,
                         latent_channels=4),
    "3lvl_l2_attn": dict(block_out_channels=[8, 16, 16], norm_num_groups=4, layers_per_block=2,
                         latent_channels=3),
    "3lvl_l1_bare": dict(block_out_channels=[8, 16, 24], norm_num_groups=8, layers_per_block=1,
                         latent_channels=6, mid_block_add_attention=False, use_quant_conv=False,
                         use_post_quant_conv=False),
}
# The temporal decoder hard-codes 32 groups. With one layer per block diffusers' temporal mid block
# holds an attention it never applies.
TEMPORAL_CONFIGS = {
    "2lvl_l1_f3": (dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4), 3),
    "3lvl_l2_f5": (dict(block_out_channels=[32, 32, 64], layers_per_block=2, latent_channels=3), 5),
}
SIDE = 16  # image side for the encoder parity checks


def _kl_config(cfg):
  levels = len(cfg["block_out_channels"])
  return dict(cfg, down_block_types=["DownEncoderBlock2D"] * levels,
              up_block_types=["UpDecoderBlock2D"] * levels)


def _temporal_config(cfg):
  return dict(cfg, down_block_types=["DownEncoderBlock2D"] * len(cfg["block_out_channels"]))


def _save(torch_model, path):
  torch_model.save_pretrained(str(path), safe_serialization=True)
  return str(path)


def _randn(seed, *shape):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


@pytest.fixture(scope="module", params=sorted(KL_CONFIGS))
def kl(request, tmp_path_factory):
  cfg = _kl_config(KL_CONFIGS[request.param])
  torch.manual_seed(0)  # diffusers' own init draws from the global generator
  torch_model = perturb_(diffusers.AutoencoderKL(**cfg), seed=len(request.param))
  path = _save(torch_model, tmp_path_factory.mktemp(request.param))
  module, params = load_diffusers(path)
  return types.SimpleNamespace(name=request.param, torch_model=torch_model, path=path,
                               module=module, params=params)


@pytest.fixture(scope="module", params=sorted(TEMPORAL_CONFIGS))
def temporal(request, tmp_path_factory):
  cfg, frames = TEMPORAL_CONFIGS[request.param]
  torch.manual_seed(0)
  torch_model = perturb_(diffusers.AutoencoderKLTemporalDecoder(**_temporal_config(cfg)), seed=3)
  path = _save(torch_model, tmp_path_factory.mktemp(request.param))
  module, params = load_diffusers(path)
  return types.SimpleNamespace(name=request.param, frames=frames, torch_model=torch_model,
                               path=path, module=module, params=params)


def _encode_decode(module):
  """One jit per model: encode images and decode latents in the same compiled call."""
  @jax.jit
  def run(params, images, latents):
    variables = {"params": params}
    mean, logvar = module.apply(variables, images, method="encode")
    return mean, logvar, module.apply(variables, latents, method="decode")
  return run


def test_kl_parity(kl):
  name, torch_model, module, params = kl.name, kl.torch_model, kl.module, kl.params
  levels = len(module.block_out_channels)
  side = SIDE // 2 ** (levels - 1)
  images = _randn(0, 2, 3, SIDE, SIDE)
  latents = _randn(1, 2, module.latent_channels, side, side)
  with torch.no_grad():
    posterior = torch_model.encode(torch.from_numpy(images)).latent_dist
    decoded = torch_model.decode(torch.from_numpy(latents)).sample
  mean, logvar, out = _encode_decode(module)(params, to_nhwc(images), to_nhwc(latents))
  errors = {"mean": relative_error(mean, to_nhwc(posterior.mean)),
            "logvar": relative_error(logvar, to_nhwc(posterior.logvar)),
            "decode": relative_error(out, to_nhwc(decoded))}
  print(f"AutoencoderKL {name}: {errors}")
  assert max(errors.values()) <= TOL, errors


def test_temporal_parity(temporal):
  name, frames, torch_model = temporal.name, temporal.frames, temporal.torch_model
  module, params = temporal.module, temporal.params
  levels = len(module.block_out_channels)
  side = 2  # latent side
  images = _randn(0, 2, 3, side * 2 ** (levels - 1), side * 2 ** (levels - 1))
  latents = _randn(1, 2 * frames, module.latent_channels, side, side)  # (B·F, c, h, w)
  with torch.no_grad():
    posterior = torch_model.encode(torch.from_numpy(images)).latent_dist
    decoded = torch_model.decode(torch.from_numpy(latents), num_frames=frames).sample
  video_latents = to_nhwc(latents).reshape((2, frames) + to_nhwc(latents).shape[1:])
  mean, logvar, out = _encode_decode(module)(params, to_nhwc(images), video_latents)
  errors = {"mean": relative_error(mean, to_nhwc(posterior.mean)),
            "logvar": relative_error(logvar, to_nhwc(posterior.logvar)),
            "decode": relative_error(out, to_nhwc(decoded).reshape(out.shape))}
  print(f"AutoencoderKLTemporalDecoder {name} ({frames} frames): {errors}")
  assert out.shape == (2, frames, images.shape[2], images.shape[3], 3)
  assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("temporal", ["2lvl_l1_f3"], indirect=True)
def test_temporal_chunked_decoding_matches_the_svd_pipeline(temporal):
  """decode_chunk_size=k decodes k frames at a time as clips of their own, like
  StableVideoDiffusionPipeline.decode_latents, so it differs from a whole-clip decode."""
  torch_model, module, params = temporal.torch_model, temporal.module, temporal.params
  frames, chunk = 5, 2  # two whole chunks (the scan) and a shorter last one
  latents = _randn(5, 2, frames, 2, 2, module.latent_channels)
  expected = []
  with torch.no_grad():
    for clip in latents:  # the pipeline with one clip: B·F = F
      parts = [torch_model.decode(torch.from_numpy(to_nchw(clip[i:i + chunk])),
                                  num_frames=len(clip[i:i + chunk])).sample
               for i in range(0, frames, chunk)]
      expected.append(to_nhwc(torch.cat(parts)))
  decode = jax.jit(lambda p, z, k: module.apply({"params": p}, z, k, method="decode"),
                   static_argnums=2)
  chunked = decode(params, latents, chunk)
  error = relative_error(chunked, np.stack(expected))
  print(f"AutoencoderKLTemporalDecoder {temporal.name}: chunked ({chunk} of {frames} frames) "
        f"decode vs the pipeline's: {error:.2e}")
  assert error <= TOL
  assert relative_error(chunked, decode(params, latents, None)) > 1e-3  # chunks are clips


@pytest.mark.parametrize("with_temb", [True, False])
def test_spatio_temporal_res_block_parity(with_temb):
  """The UNet's form (time embedding, learned_with_images, some frames flagged as images) and the
  temporal decoder's (no embedding, learned, switched mix), each with a channel change."""
  from diffusers.models.resnet import SpatioTemporalResBlock as TorchBlock
  batch, frames, side, c_in, c_out, temb_dim = 2, 3, 4, 32, 64, 16
  torch.manual_seed(0)
  if with_temb:
    kw = dict(eps=1e-5, merge_factor=0.5, merge_strategy="learned_with_images",
              switch_spatial_to_temporal_mix=False)
    torch_block = TorchBlock(c_in, c_out, temb_channels=temb_dim, **kw)
  else:
    kw = dict(eps=1e-6, temporal_eps=1e-5, merge_factor=0.0, merge_strategy="learned",
              switch_spatial_to_temporal_mix=True)
    torch_block = TorchBlock(c_in, c_out, temb_channels=None, **kw)
  perturb_(torch_block, seed=7)
  x = _randn(0, batch * frames, c_in, side, side)
  temb = _randn(1, batch * frames, temb_dim) if with_temb else None
  indicator = np.zeros((batch, frames), np.float32)
  indicator[1, 0] = 1.0  # a still image in the second clip
  with torch.no_grad():
    expected = torch_block(torch.from_numpy(x), None if temb is None else torch.from_numpy(temb),
                           image_only_indicator=torch.from_numpy(indicator))
  block = temporal_layers.SpatioTemporalResBlock(
      c_out, temporal_conv_implementation="shifted_matmul" if with_temb else "conv3d", **kw)
  args = (to_nhwc(x), temb, indicator)
  template = jax.eval_shape(block.init, jax.random.key(0), *args)["params"]
  state = {k: v.numpy() for k, v in torch_block.state_dict().items()}
  params = core.torch_to_flax(state, template)
  out = jax.jit(lambda p, *a: block.apply({"params": p}, *a))(params, *args)
  error = relative_error(out, to_nhwc(expected))
  print(f"SpatioTemporalResBlock temb={with_temb}: {error:.2e}")
  assert error <= TOL


def test_posterior_sample_and_kl():
  mean, logvar = jnp.full((2, 4, 4, 3), 0.5), jnp.full((2, 4, 4, 3), 100.0)
  posterior = autoencoder.diagonal_gaussian(jnp.concatenate([mean, logvar], -1))
  assert float(posterior.logvar.max()) == 20.0  # clamped like diffusers
  sample = posterior.sample(jax.random.key(0))
  assert sample.shape == mean.shape and not np.allclose(sample, mean)
  assert np.array_equal(posterior.mode(), mean)
  zero = autoencoder.DiagonalGaussian(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)))
  np.testing.assert_allclose(zero.kl(), [0.0])


# ---- weight and config I/O ---------------------------------------------------------------------

def test_kl_round_trip_through_diffusers(kl, tmp_path):
  torch_model, path, module, params = kl.torch_model, kl.path, kl.module, kl.params
  save_diffusers(module, params, str(tmp_path))
  reloaded = diffusers.AutoencoderKL.from_pretrained(str(tmp_path)).eval()
  original = torch_model.state_dict()
  for key, value in reloaded.state_dict().items():
    assert torch.equal(value, original[key]), key
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  for key, value in reloaded.config.items():
    if not key.startswith("_"):
      assert config[key] == (list(value) if isinstance(value, tuple) else value), key
  module2, params2 = load_diffusers(str(tmp_path))
  assert module2 == module
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_temporal_round_trip_through_diffusers(temporal, tmp_path):
  name, frames, torch_model = temporal.name, temporal.frames, temporal.torch_model
  path, module, params = temporal.path, temporal.module, temporal.params
  save_diffusers(module, params, str(tmp_path))
  reloaded = diffusers.AutoencoderKLTemporalDecoder.from_pretrained(str(tmp_path)).eval()
  original = torch_model.state_dict()
  assert sorted(reloaded.state_dict()) == sorted(original)
  for key, value in reloaded.state_dict().items():
    assert torch.equal(value, original[key]), key
  latents = torch.from_numpy(_randn(2, frames, module.latent_channels, 2, 2))
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded.decode(latents, num_frames=frames).sample,
                                  torch_model.decode(latents, num_frames=frames).sample)
  with open(os.path.join(tmp_path, "config.json")) as f:
    saved = json.load(f)
  assert saved["_class_name"] == "AutoencoderKLTemporalDecoder"
  assert saved["block_out_channels"] == TEMPORAL_CONFIGS[name][0]["block_out_channels"]


def _random_params(module, *args):
  """Random values in the module's parameter shapes (a Flax init compiles slowly on CPU)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  rng = np.random.RandomState(0)
  return jax.tree.map(lambda x: (0.3 * rng.randn(*x.shape)).astype(np.float32), shapes)


@pytest.mark.parametrize("cls_name", ["AutoencoderKL", "AutoencoderKLTemporalDecoder"])
def test_vldm_params_run_the_same_in_diffusers(cls_name, tmp_path):
  """A module built in Python (block types left to their per-level default) → save_diffusers →
  diffusers from_pretrained computes what vldm computes."""
  frames = 2
  if cls_name == "AutoencoderKL":
    module = autoencoder.AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4,
                                       latent_channels=2, scaling_factor=0.5)
    params = _random_params(module, jnp.zeros((1, 4, 4, 3)))
  else:
    module = autoencoder.AutoencoderKLTemporalDecoder(block_out_channels=(32, 32),
                                                      latent_channels=2)
    params = _random_params(module, jnp.zeros((1, frames, 4, 4, 3)))
  save_diffusers(module, params, str(tmp_path))
  torch_model = getattr(diffusers, cls_name).from_pretrained(str(tmp_path)).eval()
  assert torch_model.config.scaling_factor == module.scaling_factor
  images, latents = _randn(0, 2, 3, 8, 8), _randn(1, 2, 2, 4, 4)
  with torch.no_grad():
    posterior = torch_model.encode(torch.from_numpy(images)).latent_dist
    kw = {} if cls_name == "AutoencoderKL" else {"num_frames": frames}
    decoded = to_nhwc(torch_model.decode(torch.from_numpy(latents), **kw).sample)
  z = to_nhwc(latents)
  if cls_name != "AutoencoderKL":
    z = z.reshape((1, frames) + z.shape[1:])
  mean, logvar, out = _encode_decode(module)(params, to_nhwc(images), z)
  assert relative_error(mean, to_nhwc(posterior.mean)) <= TOL
  assert relative_error(logvar, to_nhwc(posterior.logvar)) <= TOL
  assert relative_error(out, decoded.reshape(out.shape)) <= TOL


def _copy_with_state(src, dst, edit):
  shutil.copytree(src, dst)
  weights = os.path.join(dst, "diffusion_pytorch_model.safetensors")
  state = edit(core.read_safetensors(weights))
  core.write_safetensors(state, weights)
  return str(dst)


def test_legacy_attention_names_load(kl, tmp_path):
  path, module, params = kl.path, kl.module, kl.params
  if not module.mid_block_add_attention:
    pytest.skip("no mid-block attention in this config")
  legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

  def to_legacy(state):
    out = {}
    for key, value in state.items():
      for new, old in legacy.items():
        if ".mid_block.attentions.0." in key and f".{new}." in key:
          key = key.replace(f".{new}.", f".{old}.")
          if key.endswith("weight") and key.startswith("encoder"):
            value = value[:, :, None, None]  # the 1×1 conv shape of original LDM checkpoints
      out[key] = value
    return out

  legacy_path = _copy_with_state(path, tmp_path / "legacy", to_legacy)
  _, legacy_params = load_diffusers(legacy_path)
  jax.tree.map(np.testing.assert_array_equal, legacy_params, params)


def test_missing_and_unexpected_weights_are_named(temporal, tmp_path):
  path = temporal.path
  dropped = "decoder.mid_block.resnets.0.time_mixer.mix_factor"

  def edit(state):
    del state[dropped]
    state["decoder.extra_layer.weight"] = np.zeros(3, np.float32)
    return state

  with pytest.raises(ConversionError) as info:
    load_diffusers(_copy_with_state(path, tmp_path / "edited", edit))
  assert dropped in str(info.value) and "decoder.extra_layer.weight" in str(info.value)


def test_truncated_weights_file(temporal, tmp_path):
  path = temporal.path
  broken = tmp_path / "broken"
  shutil.copytree(path, broken)
  weights = broken / "diffusion_pytorch_model.safetensors"
  data = weights.read_bytes()
  weights.write_bytes(data[:len(data) // 2])
  with pytest.raises(ConversionError, match="truncated"):
    load_diffusers(str(broken))


@pytest.mark.parametrize("change, message", [
    (dict(down_block_types=["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]),
     "AttnDownEncoderBlock2D"),
    (dict(up_block_types=["UpDecoderBlock2D"]), "up_block_types has 1 entries"),
    (dict(act_fn="gelu"), "act_fn 'gelu'"),
    (dict(norm_num_groups=3), "multiples of the GroupNorm group count 3"),
])
def test_unsupported_configs_are_rejected(tmp_path, change, message):
  config = dict(_kl_config(KL_CONFIGS["2lvl_l1_attn"]), _class_name="AutoencoderKL", **change)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(ConversionError, match=message):
    load_diffusers(str(tmp_path))


def test_kl_wrong_input_shapes(kl):
  module, params = kl.module, kl.params
  variables = {"params": params}
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):  # channels first
    module.apply(variables, jnp.zeros((1, 3, 16, 16)), method="encode")
  with pytest.raises(ValueError, match="divisible by"):
    module.apply(variables, jnp.zeros((1, 16, 17, 3)), method="encode")
  with pytest.raises(ValueError, match=r"\(B, h, w, "):
    module.apply(variables, jnp.zeros((1, 2, 2, 2, module.latent_channels)), method="decode")


def test_temporal_wrong_input_shapes(temporal):
  t_module, t_params = temporal.module, temporal.params
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    t_module.apply({"params": t_params}, jnp.zeros((1, 2, 8, 8, 3)), method="encode")
  with pytest.raises(ValueError, match=r"\(B, F, h, w, "):
    t_module.apply({"params": t_params}, jnp.zeros((2, 2, 2, t_module.latent_channels)),
                   method="decode")
  with pytest.raises(ValueError, match="decode_chunk_size"):
    t_module.apply({"params": t_params}, jnp.zeros((1, 2, 2, 2, t_module.latent_channels)), 0,
                   method="decode")
