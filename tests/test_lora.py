"""LoRA files fused by vldm (`vldm.convert.apply_lora`) against diffusers / PEFT, and written back.

The LoRAs are made by PEFT on tiny perturbed models (a Stable Diffusion pipeline from
tests/sd_folders.py; a UNetSpatioTemporalConditionModel for temporal layers, which diffusers has
no loader for but PEFT adapts directly), their A and B drawn at random so that every term counts.
References: diffusers' `load_lora_weights` + `fuse_lora(lora_scale=…)`, and PEFT's adapted forward.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

import sd_folders
import transformers
from parity import jit_quick, perturb_, relative_error, to_nhwc
from vldm import convert
from vldm.convert import core
from vldm.models import lora as lora_lib

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

TOL = 1e-4
SCALE = 0.7  # fuse_lora(lora_scale=…) / apply_lora(scale=…)
UNET_CONFIG = dict(  # SD1's conv projections; LoCon on the 3×3 res-block convs, mixed r / alpha
    r=4,
    lora_alpha=8,
    target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"],
    rank_pattern={"proj_in": 2},
    alpha_pattern={"conv1": 3},
)
TEXT_CONFIG = dict(
    r=2, lora_alpha=3, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
)
SVD_UNET = dict(
    block_out_channels=(32, 64),
    cross_attention_dim=32,
    num_attention_heads=(2, 4),
    in_channels=8,
    out_channels=4,
    layers_per_block=1,
    addition_time_embed_dim=32,
    projection_class_embeddings_input_dim=96,
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    num_frames=3,
)
# A motion LoRA: the temporal attention projections and the (3,1,1) temporal convs (Conv3d LoCon).
MOTION_TARGETS = (
    r".*temporal_transformer_blocks.*attn.*to_(q|k|v|out\.0)|.*temporal_res_block\.conv1"
)


@pytest.fixture(scope="module", autouse=True)
def peft_for_transformers():
  """transformers 5.25 refuses to adapt a text encoder with peft < 0.22, but 0.21.2 is the newest
  on this machine's package index; it does all that diffusers' text-encoder LoRA uses here (inject,
  load, scale, merge), so the version check is lifted for these tests only."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(transformers.integrations.peft, "check_peft_version", lambda min_version: None)
    yield


def randomize_lora_(model, seed):
  """Draws every PEFT lora_A / lora_B at random (B starts at zero: nothing would be tested)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def unet_inputs():
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  context = rng.standard_normal((2, 5, 32)).astype(np.float32)
  return sample, np.array([10, 500]), context


# "a red circle", "circle" in the tiny vocabulary (bos 519, eos = padding 520), 16 positions.
IDS = np.array([[519, 320, 513, 518] + [520] * 12, [519, 518] + [520] * 14])


def torch_outputs(pipe):
  sample, t, context = unet_inputs()
  with torch.no_grad():
    unet = pipe.unet(*map(torch.from_numpy, (sample, t, context))).sample.numpy()
    text = pipe.text_encoder(torch.from_numpy(IDS)).last_hidden_state.numpy()
  return dict(unet=to_nhwc(unet), text_encoder=text)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  """The tiny SD pipeline's folder, its weights in vldm, the runners, and LoRA files saved by
  diffusers in three formats with the outputs diffusers gets from each."""
  root = tmp_path_factory.mktemp("lora_sd")
  base = str(root / "base")
  sd_folders.sd_pipeline(str(root), "sd1", seed=0).save_pretrained(base)
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
  unet_config, text_config = peft.LoraConfig(**UNET_CONFIG), peft.LoraConfig(**TEXT_CONFIG)
  pipe.unet.add_adapter(unet_config)
  pipe.text_encoder.add_adapter(text_config)
  randomize_lora_(pipe.unet, 1)
  randomize_lora_(pipe.text_encoder, 2)
  unet_state = peft.get_peft_model_state_dict(pipe.unet)
  text_state = peft.get_peft_model_state_dict(pipe.text_encoder)
  files = {}
  files["peft"] = str(root / "peft")
  diffusers.StableDiffusionPipeline.save_lora_weights(
      files["peft"],
      unet_lora_layers=unet_state,
      text_encoder_lora_layers=text_state,
      unet_lora_adapter_metadata=unet_config.to_dict(),
      text_encoder_lora_adapter_metadata=text_config.to_dict(),
  )
  files["kohya"] = write_kohya(root / "kohya.safetensors", unet_state, text_state)
  files["diffusers_old"] = write_old_diffusers(root / "old.safetensors", unet_state, text_state)
  unet, unet_params = convert.load_diffusers(os.path.join(base, "unet"))
  text, text_params = convert.load_diffusers(os.path.join(base, "text_encoder"))
  run = dict(
      unet=jit_quick(lambda p, *a: unet.apply({"params": p}, *a)),
      text_encoder=jit_quick(lambda p, ids: text.apply({"params": p}, ids)[0]),
  )
  expected = {}
  for name, path in files.items():
    ref = diffusers.StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    ref.load_lora_weights(path)
    ref.fuse_lora(lora_scale=SCALE if name == "peft" else 1.0)
    expected[name] = torch_outputs(ref)
  plain = diffusers.StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
  return dict(
      base=base,
      files=files,
      expected=expected,
      plain=torch_outputs(plain),
      run=run,
      params={"unet": unet_params, "text_encoder": text_params},
      unet=unet,
  )


KOHYA_UNET_ALPHA, KOHYA_TEXT_ALPHA = 2.0, 1.0  # one alpha per component (see docs/lora.md)


def write_kohya(path, unet_state, text_state):
  """kohya's names: the module path with '.' → '_', lora_unet_ / lora_te_ (with transformers'
  `text_model.`), lora_down / lora_up and a scalar alpha per module."""
  state = {}
  for prefix, module_state, alpha, extra in (
      ("lora_unet_", unet_state, KOHYA_UNET_ALPHA, ""),
      ("lora_te_", text_state, KOHYA_TEXT_ALPHA, "text_model."),
  ):
    for key, value in module_state.items():
      module, part = key.rsplit(".lora_", 1)
      name = prefix + (extra + module).replace(".", "_")
      state[f"{name}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = value.numpy()
      state[f"{name}.alpha"] = np.array(alpha, np.float32)
  core.write_safetensors(state, str(path))
  return str(path)


def write_old_diffusers(path, unet_state, text_state):
  """diffusers' older keys, no alpha (scale 1): the attention processors' to_q_lora.down … in the
  UNet and text encoder, `.lora.down` / `.lora_linear_layer.down` elsewhere."""
  names = {
      "to_q": "to_q",
      "to_k": "to_k",
      "to_v": "to_v",
      "to_out.0": "to_out",
      "q_proj": "to_q",
      "k_proj": "to_k",
      "v_proj": "to_v",
      "out_proj": "to_out",
  }
  state = {}
  for component, module_state in (("unet", unet_state), ("text_encoder", text_state)):
    for key, value in module_state.items():
      module, part = key.rsplit(".lora_", 1)
      direction = "down" if part.startswith("A") else "up"
      parent, _, leaf = module.rpartition(".")
      if module.endswith("to_out.0"):
        parent, leaf = module[: -len(".to_out.0")], "to_out.0"
      if leaf in names:
        new = f"{parent}.processor.{names[leaf]}_lora.{direction}.weight"
      elif component == "text_encoder":
        new = f"{module}.lora_linear_layer.{direction}.weight"
      else:
        new = f"{module}.lora.{direction}.weight"
      prefix = "text_model." if component == "text_encoder" else ""
      state[f"{component}.{prefix}{new}"] = value.numpy()
  core.write_safetensors(state, str(path))
  return str(path)


def outputs(sd, params):
  sample, t, context = unet_inputs()
  return dict(
      unet=np.asarray(sd["run"]["unet"](params["unet"], to_nhwc(sample), t, context)),
      text_encoder=np.asarray(sd["run"]["text_encoder"](params["text_encoder"], IDS)),
  )


@pytest.mark.parametrize("fmt", ["peft", "kohya", "diffusers_old"])
def test_fused_lora_matches_diffusers(sd, fmt):
  scale = SCALE if fmt == "peft" else 1.0
  fused = convert.apply_lora(sd["params"], sd["files"][fmt], scale=scale)
  actual, expected = outputs(sd, fused), sd["expected"][fmt]
  for part in ("unet", "text_encoder"):
    err = relative_error(actual[part], expected[part])
    moved = relative_error(sd["plain"][part], expected[part])  # how much the LoRA changes
    print(f"LoRA {fmt} {part}: relative error {err:.2e} (the LoRA moves it {moved:.2f})")
    assert err < TOL, (fmt, part, err)
    assert moved > 0.05, (fmt, part, moved)


def test_one_model_with_module_and_untouched_leaves(sd):
  fused = convert.apply_lora(sd["params"]["unet"], sd["files"]["peft"], scale=SCALE, module="unet")
  flat, base = (traverse_util.flatten_dict(t) for t in (fused, sd["params"]["unet"]))
  adapted = {lora_lib.module_name(p[:-1]) for p in flat if not np.array_equal(flat[p], base[p])}
  modules = lora_lib.weight_modules(sd["params"]["unet"])
  expected = {n for n in modules if lora_lib.matches(n, UNET_CONFIG["target_modules"])}
  assert adapted == expected  # every targeted kernel changed, nothing else (biases, norms) did
  both = convert.apply_lora(sd["params"], sd["files"]["peft"], scale=SCALE)
  for path, value in traverse_util.flatten_dict(both["unet"]).items():
    np.testing.assert_array_equal(value, flat[path])


def test_vldm_adapters_round_trip_through_the_file(sd, tmp_path):
  """save_lora → apply_lora is `vldm.models.lora.merge`, and the file is diffusers' layout."""
  params = sd["params"]["unet"]
  modules = lora_lib.select(params, ("to_q", "to_out.0", r".*resnets\.\d+\.conv1"))
  adapters = lora_lib.init_adapters(jax.random.key(0), params, modules, 3)
  adapters = jax.tree.map(
      lambda x: x + 0.3 * np.random.default_rng(1).standard_normal(x.shape), adapters
  )
  path = convert.save_lora({"unet": adapters}, str(tmp_path), alpha=1.5)
  assert os.path.basename(path) == "pytorch_lora_weights.safetensors"
  metadata = json.loads(core.read_safetensors_metadata(path)["lora_adapter_metadata"])
  assert metadata["unet.r"] == 3 and metadata["unet.lora_alpha"] == 1.5
  state = core.read_safetensors(path)
  key = "unet.down_blocks.0.resnets.0.conv1.lora_A.weight"
  assert state[key].shape == (3, 32, 3, 3)  # PEFT's Conv2d lora_A [r, in, kh, kw]
  assert state[key.replace("lora_A", "lora_B")].shape == (32, 3, 1, 1)
  fused = convert.apply_lora(params, str(tmp_path), module="unet")
  merged = lora_lib.merge(params, adapters, 1.5 / 3)
  for (p, a), b in zip(
      traverse_util.flatten_dict(fused).items(), traverse_util.flatten_dict(merged).values()
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, err_msg="/".join(p))


@pytest.fixture(scope="module")
def svd(tmp_path_factory):
  torch.manual_seed(0)
  model = perturb_(diffusers.UNetSpatioTemporalConditionModel(**SVD_UNET), seed=1)
  path = str(tmp_path_factory.mktemp("lora_svd"))
  model.save_pretrained(path)
  module, params = convert.load_diffusers(path)
  rng = np.random.default_rng(0)
  raw = (
      rng.standard_normal((1, 3, 8, 8, 8)).astype(np.float32),
      np.array([0.4], np.float32),
      rng.standard_normal((1, 1, 32)).astype(np.float32),
      np.array([[6, 127, 0.02]], np.float32),
  )
  run = jit_quick(lambda p, *a: module.apply({"params": p}, *a))
  inputs = (np.moveaxis(raw[0], 2, -1),) + raw[1:]
  return dict(path=path, params=params, raw=raw, vldm=lambda p: np.asarray(run(p, *inputs)))


def run_torch(model, raw):
  with torch.no_grad():
    return np.moveaxis(model(*map(torch.from_numpy, raw)).sample.numpy(), 2, -1)


def test_temporal_lora_matches_peft_both_ways(svd, tmp_path):
  """A motion LoRA on the SVD UNet (temporal attention + Conv3d) made by PEFT fuses in vldm as PEFT
  runs it; and vldm's adapters written by save_lora load into PEFT with the same output."""
  model = diffusers.UNetSpatioTemporalConditionModel.from_pretrained(svd["path"])
  config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=MOTION_TARGETS)
  model = peft.inject_adapter_in_model(config, model)
  randomize_lora_(model, 3)
  state = {f"unet.{k}": v.numpy() for k, v in peft.get_peft_model_state_dict(model).items()}
  assert any(k.endswith("temporal_res_block.conv1.lora_A.weight") for k in state)
  metadata = {f"unet.{k}": v for k, v in config.to_dict().items() if k in ("r", "lora_alpha")}
  file = str(tmp_path / "motion.safetensors")
  core.write_safetensors(
      state, file, {"format": "pt", "lora_adapter_metadata": json.dumps(metadata)}
  )
  expected = run_torch(model, svd["raw"])
  fused = convert.apply_lora(svd["params"], file, module="unet")
  err = relative_error(svd["vldm"](fused), expected)
  print(f"PEFT motion LoRA fused by vldm (SVD UNet): relative error {err:.2e}")
  assert err < TOL

  # vldm → PEFT: adapters of the same modules, chosen by vldm's own rule, drawn at random.
  modules = lora_lib.select(svd["params"], MOTION_TARGETS)
  assert {n.rsplit(".", 1)[-1] for n in modules} == {"to_q", "to_k", "to_v", "0", "conv1"}
  adapters = lora_lib.init_adapters(jax.random.key(1), svd["params"], modules, 2)
  adapters = jax.tree.map(
      lambda x: x + 0.2 * np.random.default_rng(2).standard_normal(x.shape), adapters
  )
  out = convert.save_lora({"unet": adapters}, str(tmp_path / "export"), alpha=3.0)
  metadata = json.loads(core.read_safetensors_metadata(out)["lora_adapter_metadata"])
  config = peft.LoraConfig(**{k[5:]: v for k, v in metadata.items()})
  model = peft.inject_adapter_in_model(
      config, diffusers.UNetSpatioTemporalConditionModel.from_pretrained(svd["path"])
  )
  loaded = {k[5:]: torch.from_numpy(v) for k, v in core.read_safetensors(out).items()}
  result = peft.set_peft_model_state_dict(model, loaded)
  assert not [k for k in result.unexpected_keys if "lora" in k]
  err = relative_error(
      svd["vldm"](lora_lib.merge(svd["params"], adapters, 1.5)), run_torch(model, svd["raw"])
  )
  print(f"vldm motion LoRA run by PEFT (SVD UNet): relative error {err:.2e}")
  assert err < TOL


# ---------------------------------------------------------------------------------- bad input
def write(tmp_path, state, name="bad.safetensors"):
  path = str(tmp_path / name)
  core.write_safetensors({k: np.asarray(v, np.float32) for k, v in state.items()}, path)
  return path


def test_bad_files_are_explained(sd, tmp_path):
  unet = sd["params"]["unet"]
  a, b = np.ones((2, 32)), np.ones((32, 2))
  q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
  wrong = q.replace("down_blocks.0", "down_blocks.7")
  with pytest.raises(
      convert.ConversionError,
      match=r"does not have \(1\).*down_blocks\.7.*"
      r"closest: down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q",
  ):
    convert.apply_lora(
        unet,
        write(tmp_path, {f"{wrong}.lora_A.weight": a, f"{wrong}.lora_B.weight": b}),
        module="unet",
    )
  with pytest.raises(convert.ConversionError, match=r"no LoRA format.*unet\.conv_in\.weight"):
    convert.apply_lora(unet, write(tmp_path, {"unet.conv_in.weight": a}), module="unet")
  with pytest.raises(convert.ConversionError, match=r"DoRA magnitudes"):
    convert.apply_lora(
        unet,
        write(
            tmp_path,
            {
                f"{q}.lora_A.weight": a,
                f"{q}.lora_B.weight": b,
                f"{q}.lora_magnitude_vector": np.ones(32),
            },
        ),
        module="unet",
    )
  with pytest.raises(convert.ConversionError, match=r"to_q: lora_B \(up\) missing"):
    convert.apply_lora(unet, write(tmp_path, {f"{q}.lora_A.weight": a}), module="unet")
  with pytest.raises(convert.ConversionError, match=r"does not fit the unet's weights.*to_q"):
    convert.apply_lora(
        unet,
        write(tmp_path, {f"{q}.lora_A.weight": np.ones((2, 7)), f"{q}.lora_B.weight": b}),
        module="unet",
    )
  with pytest.raises(convert.ConversionError, match=r"SDXL's second text encoder"):
    convert.apply_lora(unet, write(tmp_path, {"lora_te2_x.lora_down.weight": a}), module="unet")
  with pytest.raises(convert.ConversionError, match=r"adapts text_encoder, which the params lack"):
    convert.apply_lora({"unet": unet}, sd["files"]["peft"])
  os.makedirs(tmp_path / "empty")
  with pytest.raises(convert.ConversionError, match=r"holds no LoRA weights: looked for"):
    convert.apply_lora(unet, str(tmp_path / "empty"), module="unet")
  with pytest.raises(ValueError, match=r"select no Dense or convolution module.*closest names"):
    lora_lib.select(unet, ("to_qq",), what="the unet")
