"""AnimateDiff: UNetMotionModel parity against diffusers at several configs, a
UNet2DConditionModel + MotionAdapter pair, moving an adapter onto another image UNet (= diffusers'
from_unet2d), export back to diffusers, the text-to-video pipeline against AnimateDiffPipeline,
and bad input."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from parity import diffusers_video_unet_out, jit_quick, perturb_, random_params, relative_error
from parity import video_unet_inputs

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import sd_folders  # noqa: E402
from vldm import convert, video_io  # noqa: E402
from vldm.convert import ConversionError, load_diffusers, registry, save_diffusers  # noqa: E402
from vldm.models import inflate  # noqa: E402
from vldm.models import unet as unet_lib  # noqa: E402
from vldm.pipelines import TextToVideoPipeline, folder as folder_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MOTION = ("CrossAttnDownBlockMotion", "DownBlockMotion", "UpBlockMotion", "CrossAttnUpBlockMotion")
# UNetMotionModel configs (with the frames each runs).
CONFIGS = {
    # diffusers' own test config: 2 levels, 2 heads, 8 motion heads, a mid-block motion module.
    "diffusers": (
        dict(
            block_out_channels=(16, 32),
            norm_num_groups=16,
            cross_attention_dim=16,
            num_attention_heads=2,
            layers_per_block=1,
            sample_size=16,
            down_block_types=_MOTION[:2],
            up_block_types=_MOTION[2:],
        ),
        4,
    ),
    # Three levels, linear projections, per-level heads and motion heads, two motion layers in the
    # middle level, no mid-block motion module, 8 frame positions, 5 frames.
    "three_levels_no_mid": (
        dict(
            block_out_channels=(32, 48, 64),
            norm_num_groups=16,
            cross_attention_dim=24,
            num_attention_heads=(2, 3, 4),
            motion_num_attention_heads=(2, 4, 8),
            temporal_transformer_layers_per_block=(1, 2, 1),
            use_motion_mid_block=False,
            motion_max_seq_length=8,
            use_linear_projection=True,
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlockMotion",) * 2 + ("DownBlockMotion",),
            up_block_types=("UpBlockMotion",) + ("CrossAttnUpBlockMotion",) * 2,
        ),
        5,
    ),
    # Per-level layers (two, then one), motion heads that do not divide the channels (width 30 of
    # 32), two motion layers in the mid block, another norm eps and mid-block output scale.
    "deep_mid": (
        dict(
            block_out_channels=(32, 64),
            norm_num_groups=8,
            cross_attention_dim=20,
            num_attention_heads=4,
            motion_num_attention_heads=(3, 4),
            layers_per_block=(2, 1),
            temporal_transformer_layers_per_mid_block=2,
            motion_max_seq_length=24,
            norm_eps=1e-6,
            mid_block_scale_factor=1.5,
            down_block_types=_MOTION[:2],
            up_block_types=_MOTION[2:],
        ),
        3,
    ),
}
SIZE, TOKENS = 8, 3


_COMPILED = {}


def _apply(module):
  """The module's jitted apply, one per module (equal modules share it: no second compile)."""
  if module not in _COMPILED:
    _COMPILED[module] = jit_quick(lambda params, *args: module.apply({"params": params}, *args))
  return _COMPILED[module]


def _reference_out(model, sample, timesteps, context):
  """diffusers' model on vldm's inputs (UNetMotionModel takes its context per frame)."""
  return diffusers_video_unet_out(model, sample, timesteps, context, context_per_frame=True)


def _inputs(frames, channels, context_dim, seed=0):
  return video_unet_inputs(frames, channels, context_dim, SIZE, TOKENS, seed)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
  name = request.param
  config, frames = CONFIGS[name]
  torch.manual_seed(0)
  reference = perturb_(diffusers.UNetMotionModel(**config), seed=1)
  path = str(tmp_path_factory.mktemp(name))
  reference.save_pretrained(path)
  module, params = load_diffusers(path)
  inputs = _inputs(frames, 4, config["cross_attention_dim"])
  return dict(
      name=name,
      reference=reference,
      module=module,
      params=params,
      inputs=inputs,
      expected=_reference_out(reference, *inputs),
      actual=np.asarray(_apply(module)(params, *inputs)),
  )


def test_unet_motion_parity(case):
  module = case["module"]
  assert module.temporal and module.has_motion_modules
  assert module.reference_class == "UNetMotionModel"
  err = relative_error(case["actual"], case["expected"])
  print(f"UNetMotionModel {case['name']}: relative error {err:.2e}")
  assert err <= 1e-4


def test_export_round_trip(case, tmp_path):
  """save_diffusers writes a UNetMotionModel diffusers loads and runs to the same output; its
  motion modules alone, a MotionAdapter, hold the reference's motion-module weights."""
  if case["name"] != "three_levels_no_mid":
    pytest.skip("one config is enough")
  module, params = case["module"], case["params"]
  save_diffusers(module, params, str(tmp_path / "unet"))
  config = json.loads((tmp_path / "unet" / "config.json").read_text())
  assert config["_class_name"] == "UNetMotionModel"
  reloaded = diffusers.UNetMotionModel.from_pretrained(str(tmp_path / "unet")).eval()
  out = _reference_out(reloaded, *case["inputs"])
  assert relative_error(out, case["actual"]) <= 1e-4
  module_again, params_again = load_diffusers(str(tmp_path / "unet"))
  assert module_again == module
  jax.tree.map(np.testing.assert_array_equal, params_again, params)

  convert.save_motion_adapter(module, params, str(tmp_path / "adapter"))
  adapter = diffusers.MotionAdapter.from_pretrained(str(tmp_path / "adapter"))
  expected = {k: v for k, v in case["reference"].state_dict().items() if "motion_modules" in k}
  actual = adapter.state_dict()
  assert set(actual) == set(expected)  # the position buffers included
  for key, value in expected.items():  # the sinusoid tables to float32 rounding (numpy vs torch)
    np.testing.assert_allclose(
        actual[key].numpy(),
        value.numpy(),
        rtol=0,
        atol=1e-6 if key.endswith(".pe") else 0,
        err_msg=key,
    )


# An SD-1.5-layout image UNet (cross-attention levels then a plain one, conv projections; three
# levels to stay tiny) and an adapter for it: per-level motion heads and layers, a mid block.
SD15 = dict(
    block_out_channels=(16, 32, 32),
    norm_num_groups=8,
    cross_attention_dim=16,
    attention_head_dim=2,
    layers_per_block=1,
    sample_size=8,
    down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2,
)
ADAPTER = dict(
    block_out_channels=(16, 32, 32),
    motion_layers_per_block=1,
    motion_num_attention_heads=(2, 4, 8),
    motion_norm_num_groups=8,
    motion_max_seq_length=16,
    motion_transformer_layers_per_block=(1, 2, 1),
)


@pytest.fixture(scope="module")
def adapter_pair(tmp_path_factory):
  """Two SD-1.5-layout image UNets and one MotionAdapter, saved by diffusers, and vldm's UNet
  from the first with the adapter."""
  root = tmp_path_factory.mktemp("adapter")
  torch.manual_seed(0)
  unets = [perturb_(diffusers.UNet2DConditionModel(**SD15), seed=s) for s in (1, 2)]
  adapter = perturb_(diffusers.MotionAdapter(**ADAPTER), seed=3)
  for i, unet in enumerate(unets):
    unet.save_pretrained(str(root / f"unet{i}"))
  adapter.save_pretrained(str(root / "adapter"))
  video = convert.load_animatediff(str(root / "unet0"), str(root / "adapter"))
  return dict(root=root, unets=unets, adapter=adapter, video=video)


def test_unet2d_with_motion_adapter_matches_from_unet2d(adapter_pair):
  module, params = adapter_pair["video"]
  reference = diffusers.UNetMotionModel.from_unet2d(
      adapter_pair["unets"][0], adapter_pair["adapter"]
  ).eval()
  inputs = _inputs(6, 4, SD15["cross_attention_dim"], seed=1)
  err = relative_error(_apply(module)(params, *inputs), _reference_out(reference, *inputs))
  print(f"UNet2DConditionModel + MotionAdapter (SD-1.5 layout): relative error {err:.2e}")
  assert err <= 1e-4


def test_transplant_is_from_unet2d(adapter_pair, tmp_path):
  """The motion modules of one AnimateDiff UNet moved onto another image UNet are what diffusers'
  UNetMotionModel.from_unet2d(other_unet, adapter) holds, weight for weight."""
  root, unets, adapter = adapter_pair["root"], adapter_pair["unets"], adapter_pair["adapter"]
  _, video_params = adapter_pair["video"]
  other_unet, other_params = load_diffusers(str(root / "unet1"))
  moved = inflate.transplant_temporal(video_params, other_params)
  diffusers.UNetMotionModel.from_unet2d(unets[1], adapter).save_pretrained(str(tmp_path))
  module, expected = load_diffusers(str(tmp_path))
  assert module == inflate.video_config_from_image(
      other_unet, **{k: getattr(module, k) for k in inflate.TEMPORAL_OPTIONS}
  )
  moved, expected = traverse_util.flatten_dict(moved), traverse_util.flatten_dict(expected)
  assert set(moved) == set(expected)
  for path, value in expected.items():
    np.testing.assert_array_equal(moved[path], value, err_msg="/".join(path))
  labels = traverse_util.flatten_dict(inflate.label_params(traverse_util.unflatten_dict(moved)))
  assert {p for p, label in labels.items() if label == inflate.TEMPORAL} == {
      p for p in moved if any(n.startswith("motion_modules_") for n in p)
  }


def test_zero_initialised_motion_modules_leave_the_image_unet(case):
  """Motion modules inserted by inflation (`video_config_from_image`) with proj_out at zero, as
  AnimateDiff initialises them, leave the image UNet as it is, frame by frame."""
  if case["name"] != "diffusers":
    pytest.skip("one config is enough")
  module = case["module"]
  image = module.clone(
      temporal=False,
      temporal_kind="alignment",
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      mid_block_type="UNetMidBlock2DCrossAttn",
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
  )
  image_params = inflate.spatial_params(case["params"])
  video = inflate.video_config_from_image(
      image, **{k: getattr(module, k) for k in inflate.TEMPORAL_OPTIONS}
  )
  assert video == module  # the same UNet as diffusers' UNetMotionModel
  fresh = unet_lib.zero_temporal_outputs(inflate.split_params(random_params(video, 0))[1])
  assert all(not np.any(v) for p, v in traverse_util.flatten_dict(fresh).items() if "proj_out" in p)
  params = inflate.merge_params(image_params, fresh)
  sample, timesteps, context = case["inputs"]
  frames = sample.shape[1]
  flat = lambda x: np.asarray(x).reshape((-1,) + x.shape[2:])
  per_frame = _apply(image)(
      image_params, flat(sample), np.repeat(timesteps, frames), np.repeat(context, frames, axis=0)
  )
  out = _apply(video)(params, sample, timesteps, context)  # compiled already for the case
  np.testing.assert_allclose(flat(out), per_frame, rtol=0, atol=1e-5)


def test_remat_and_bfloat16_trace(case):
  """Every remat policy differentiates through motion modules; bfloat16 compute stays bf16."""
  if case["name"] != "diffusers":
    pytest.skip("one config is enough")
  module, params = case["module"], case["params"]
  loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, *case["inputs"]) ** 2)
  grads = jax.eval_shape(
      jax.grad(loss(module.clone(remat_policy="save_conv_and_attention"))), params
  )
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  half = jax.eval_shape(
      lambda: module.clone(dtype=jnp.bfloat16).apply({"params": params}, *case["inputs"])
  )
  assert half.dtype == jnp.bfloat16


def test_bad_input_is_named(adapter_pair, tmp_path):
  root = adapter_pair["root"]
  module, params = adapter_pair["video"]
  sample, timesteps, context = _inputs(17, 4, SD15["cross_attention_dim"])
  with pytest.raises(ValueError, match=r"17 frames.* at most 16 \(motion_max_seq_length\)"):
    jax.eval_shape(lambda: module.apply({"params": params}, sample, timesteps, context))

  image, _ = load_diffusers(str(root / "unet0"))
  for name, options, message in (
      (
          "narrow",
          dict(block_out_channels=(8, 16, 16), motion_norm_num_groups=8),
          r"block_out_channels \(8, 16, 16\) do not fit the UNet's \(16, 32, 32\)",
      ),
      (
          "levels",
          dict(block_out_channels=(16, 32), motion_norm_num_groups=8),
          r"block_out_channels \(16, 32\) do not fit the UNet's \(16, 32, 32\)",
      ),
      (
          "layers",
          dict(ADAPTER, motion_layers_per_block=2),
          r"motion_layers_per_block=2 while the UNet has layers_per_block=\[1, 1, 1\]",
      ),
  ):
    diffusers.MotionAdapter(**options).save_pretrained(str(tmp_path / name))
    with pytest.raises(ConversionError, match=message):
      convert.load_animatediff(str(root / "unet0"), str(tmp_path / name))
  with pytest.raises(ConversionError, match="already a video UNet"):
    convert.attach_motion_adapter(module, params, str(root / "adapter"))
  with pytest.raises(
      ConversionError, match="MotionAdapter folder is not a model of its own.*" "load_animatediff"
  ):
    load_diffusers(str(root / "adapter"))
  with pytest.raises(ConversionError, match="holds a UNet2DConditionModel, not a MotionAdapter"):
    convert.attach_motion_adapter(image, params, str(root / "unet1"))
  with pytest.raises(ConversionError, match="Cannot save as UNetMotionModel: it has no motion"):
    registry.format_for("UNetMotionModel").to_config(image)


# ----------------------------------------------------------------------------------- pipeline
def _animatediff_pipeline(root):
  """A tiny AnimateDiffPipeline (SD-1.5 style, DDIM as AnimateDiff recommends), perturbed."""
  torch.manual_seed(0)
  vocab = str(root / "vocab")
  vocab_size = sd_folders.write_clip_vocab(vocab)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(vocab, model_max_length=12)
  text_encoder = transformers.CLIPTextModel(
      transformers.CLIPTextConfig(
          vocab_size=vocab_size,
          hidden_size=32,
          intermediate_size=37,
          num_hidden_layers=2,
          num_attention_heads=4,
          max_position_embeddings=12,
          bos_token_id=tokenizer.bos_token_id,
          eos_token_id=tokenizer.eos_token_id,
          pad_token_id=tokenizer.pad_token_id,
      )
  )
  unet = diffusers.UNet2DConditionModel(
      block_out_channels=(32, 64),
      layers_per_block=1,
      sample_size=8,
      norm_num_groups=16,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=32,
      attention_head_dim=2,
  )
  adapter = diffusers.MotionAdapter(
      block_out_channels=(32, 64),
      motion_layers_per_block=1,
      motion_num_attention_heads=4,
      motion_norm_num_groups=16,
      motion_max_seq_length=8,
  )
  vae = diffusers.AutoencoderKL(
      block_out_channels=[32, 32],
      latent_channels=4,
      layers_per_block=1,
      down_block_types=["DownEncoderBlock2D"] * 2,
      up_block_types=["UpDecoderBlock2D"] * 2,
  )
  for seed, model in enumerate((unet, adapter, vae, text_encoder)):
    perturb_(model, seed)
  scheduler = diffusers.DDIMScheduler(
      beta_start=0.00085,
      beta_end=0.012,
      beta_schedule="linear",
      clip_sample=False,
      timestep_spacing="linspace",
      steps_offset=1,
  )
  pipe = diffusers.AnimateDiffPipeline(
      vae=vae,
      text_encoder=text_encoder,
      tokenizer=tokenizer,
      unet=unet,
      motion_adapter=adapter,
      scheduler=scheduler,
  )
  pipe.set_progress_bar_config(disable=True)
  return pipe, unet


def test_pipeline_matches_animatediff(tmp_path):
  """An AnimateDiffPipeline folder samples the clip diffusers' pipeline samples from the same
  latents (guidance, DDIM); its unet/ as a UNet2DConditionModel + motion_adapter/ loads to the
  same UNet; vldm's export of it is an AnimateDiffPipeline folder diffusers samples the same."""
  reference, unet2d = _animatediff_pipeline(tmp_path)
  folder = str(tmp_path / "animatediff")
  reference.save_pretrained(folder)
  frames, steps, scale = 5, 3, 6.0
  latents = torch.randn((1, 4, frames, 8, 8), generator=torch.Generator().manual_seed(0))
  call = dict(
      num_frames=frames,
      height=16,
      width=16,
      num_inference_steps=steps,
      guidance_scale=scale,
      output_type="np",
  )
  expected = reference("a red circle", latents=latents, **call).frames
  pipe = folder_lib.load_pipeline(folder)
  assert pipe.unet.has_motion_modules and pipe.sampler.sampler == "ddim"
  noise = latents.permute(0, 2, 3, 4, 1).numpy()
  actual = pipe(
      "a red circle",
      num_frames=frames,
      height=16,
      width=16,
      num_steps=steps,
      guidance_scale=scale,
      noise=noise,
  )
  error = relative_error(actual, expected)
  print(f"text-to-video vs AnimateDiffPipeline: {error:.2e}")
  assert error <= 1e-3
  with pytest.raises(ValueError, match=r"9 frames; .* at most 8 \(motion_max_seq_length\)"):
    pipe("a red circle", num_frames=9, height=16, width=16, num_steps=steps, rng=0)

  # AnimateDiffPipeline users' layout: an image UNet and the adapter next to it.
  shutil.rmtree(os.path.join(folder, "unet"))
  unet2d.save_pretrained(os.path.join(folder, "unet"))
  index_path = os.path.join(folder, "model_index.json")
  with open(index_path, encoding="utf-8") as f:
    index = json.load(f)
  with open(index_path, "w", encoding="utf-8") as f:
    json.dump(dict(index, unet=["diffusers", "UNet2DConditionModel"]), f)
  pipe_2d = TextToVideoPipeline.from_pretrained(folder)
  assert pipe_2d.unet == pipe.unet
  jax.tree.map(np.testing.assert_array_equal, pipe_2d.params, pipe.params)

  exported = str(tmp_path / "exported")
  folder_lib.save_pipeline(pipe, exported)
  with open(os.path.join(exported, "model_index.json"), encoding="utf-8") as f:
    assert json.load(f)["_class_name"] == "AnimateDiffPipeline"
  again = diffusers.AnimateDiffPipeline.from_pretrained(exported)
  again.set_progress_bar_config(disable=True)
  error = relative_error(again("a red circle", latents=latents, **call).frames, expected)
  print(f"vldm's exported AnimateDiffPipeline folder in diffusers: {error:.2e}")
  assert error <= 1e-4


@pytest.mark.slow
def test_sample_cli_on_an_animatediff_folder(tmp_path):
  """python -m vldm.sample --pretrained on an AnimateDiffPipeline folder writes its clips (the
  size from the UNet's sample_size)."""
  reference, _ = _animatediff_pipeline(tmp_path)
  folder, out = str(tmp_path / "animatediff"), tmp_path / "out"
  reference.save_pretrained(folder)
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "vldm.sample",
          "--pretrained",
          folder,
          "--prompt",
          "a red circle",
          "--num_frames",
          "3",
          "--num_steps",
          "2",
          "--out",
          str(out),
      ],
      cwd=REPO,
      env=dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu"),
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  samples = json.loads((out / "samples.json").read_text())
  assert [s["prompt"] for s in samples] == ["a red circle"]
  assert video_io.read_frames(str(out / samples[0]["file"])).shape == (3, 16, 16, 3)
