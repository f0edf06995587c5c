"""ModelScope / ZeroScope: UNet3DConditionModel parity against diffusers at several configs,
export back to diffusers, inflation from an image UNet, and bad configs."""

import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from parity import diffusers_video_unet_out, jit_quick, perturb_, relative_error, video_unet_inputs

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from vldm.convert import (  # noqa: E402
    ConversionError,
    export_class_of,
    load_diffusers,
    save_diffusers,
)
from vldm.models import inflate  # noqa: E402
from vldm.models import unet as unet_lib  # noqa: E402

_3D = ("CrossAttnDownBlock3D", "DownBlock3D", "UpBlock3D", "CrossAttnUpBlock3D")
# UNet3DConditionModel configs (with the frames each runs).
CONFIGS = {
    # diffusers' own test config: 2 levels, heads of width 2 (2 and 4 heads), 4 groups.
    "diffusers": (
        dict(
            block_out_channels=(4, 8),
            norm_num_groups=4,
            cross_attention_dim=8,
            attention_head_dim=2,
            layers_per_block=1,
            sample_size=16,
            down_block_types=_3D[:2],
            up_block_types=_3D[2:],
        ),
        4,
    ),
    # Two layers per block, heads of width 16 (2 and 3 heads; transformer_in 128 wide on 32
    # channels), a context of another width, another norm eps, 5 frames.
    "two_layers": (
        dict(
            block_out_channels=(32, 48),
            norm_num_groups=8,
            cross_attention_dim=24,
            attention_head_dim=16,
            layers_per_block=2,
            norm_eps=1e-6,
            down_block_types=_3D[:2],
            up_block_types=_3D[2:],
        ),
        5,
    ),
    # Attention at every level, one head at level 0 (width 16 = the channels), a mid-block output
    # scale, 3 frames.
    "all_attention": (
        dict(
            block_out_channels=(16, 32),
            norm_num_groups=4,
            cross_attention_dim=12,
            attention_head_dim=16,
            layers_per_block=1,
            mid_block_scale_factor=1.5,
            down_block_types=("CrossAttnDownBlock3D",) * 2,
            up_block_types=("CrossAttnUpBlock3D",) * 2,
        ),
        3,
    ),
}
SIZE, TOKENS = 4, 3

_COMPILED = {}


def _apply(module):
  """The module's jitted apply, one per module (equal modules share it: no second compile)."""
  if module not in _COMPILED:
    _COMPILED[module] = jit_quick(lambda params, *args: module.apply({"params": params}, *args))
  return _COMPILED[module]


def _reference_out(model, sample, timesteps, context):
  """diffusers' model on vldm's inputs (UNet3DConditionModel repeats the per-clip context per frame itself)."""
  return diffusers_video_unet_out(model, sample, timesteps, context, context_per_frame=False)


def _inputs(frames, channels, context_dim, seed=0):
  return video_unet_inputs(frames, channels, context_dim, SIZE, TOKENS, seed)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
  name = request.param
  config, frames = CONFIGS[name]
  torch.manual_seed(0)
  reference = perturb_(diffusers.UNet3DConditionModel(**config), seed=1)
  path = str(tmp_path_factory.mktemp(name))
  reference.save_pretrained(path)
  module, params = load_diffusers(path)
  inputs = _inputs(frames, 4, config["cross_attention_dim"])
  return dict(
      name=name,
      config=config,
      module=module,
      params=params,
      inputs=inputs,
      expected=_reference_out(reference, *inputs),
      actual=np.asarray(_apply(module)(params, *inputs)),
  )


def test_unet3d_parity(case):
  module = case["module"]
  assert module.temporal and module.is_modelscope and not module.has_motion_modules
  assert module.reference_class == "UNet3DConditionModel"
  heads = tuple(c // case["config"]["attention_head_dim"] for c in module.block_out_channels)
  assert module.per_level("num_attention_heads") == heads
  err = relative_error(case["actual"], case["expected"])
  print(f"UNet3DConditionModel {case['name']}: relative error {err:.2e}")
  assert err <= 1e-4


def test_per_frame_context_agrees(case):
  """The context given per frame (B, F, L, D) computes the same function."""
  if case["name"] != "diffusers":
    pytest.skip("one config is enough")
  sample, timesteps, context = case["inputs"]
  per_frame = np.repeat(context[:, None], sample.shape[1], axis=1)
  out = _apply(case["module"])(case["params"], sample, timesteps, per_frame)
  assert relative_error(out, case["actual"]) <= 1e-5


def test_export_round_trip(case, tmp_path):
  """save_diffusers writes a UNet3DConditionModel that diffusers loads and runs to the same
  output, and vldm reads back to the same module and weights."""
  if case["name"] != "two_layers":
    pytest.skip("one config is enough")
  module, params = case["module"], case["params"]
  assert export_class_of(module) == "UNet3DConditionModel"
  save_diffusers(module, params, str(tmp_path / "unet"))
  config = json.loads((tmp_path / "unet" / "config.json").read_text())
  assert config["_class_name"] == "UNet3DConditionModel"
  assert config["attention_head_dim"] == case["config"]["attention_head_dim"]
  reloaded = diffusers.UNet3DConditionModel.from_pretrained(str(tmp_path / "unet")).eval()
  out = _reference_out(reloaded, *case["inputs"])
  assert relative_error(out, case["actual"]) <= 1e-4
  module_again, params_again = load_diffusers(str(tmp_path / "unet"))
  assert module_again == module
  jax.tree.map(np.testing.assert_array_equal, params_again, params)


def test_inflated_from_an_image_unet_starts_as_it(case):
  """An image UNet made a ModelScope video UNet (`video_config_from_image`) with its temporal
  outputs at zero computes the image UNet frame by frame; the temporal layers are the
  `temp_convs_j`, `temp_attentions_j` and `transformer_in`."""
  if case["name"] != "diffusers":
    pytest.skip("one config is enough")
  module, params = case["module"], case["params"]
  image = module.clone(
      temporal=False,
      temporal_kind="alignment",
      down_block_types=tuple(unet_lib.block_type_for(t, False) for t in module.down_block_types),
      mid_block_type="UNetMidBlock2DCrossAttn",
      up_block_types=tuple(unet_lib.block_type_for(t, False) for t in module.up_block_types),
  )
  video = inflate.video_config_from_image(image, temporal_kind="modelscope")
  assert video == module
  image_params, temporal_params = inflate.split_params(params)
  temporal_names = {
      n for p in traverse_util.flatten_dict(temporal_params) for n in p if inflate.is_temporal((n,))
  }
  assert {n.rsplit("_", 1)[0] if n[-1].isdigit() else n for n in temporal_names} == {
      "temp_convs",
      "temp_attentions",
      "transformer_in",
  }
  zeroed = inflate.merge_params(image_params, unet_lib.zero_temporal_outputs(temporal_params))
  sample, timesteps, context = case["inputs"]
  out = _apply(module)(zeroed, sample, timesteps, context)
  frames = sample.shape[1]
  flat = sample.reshape((-1,) + sample.shape[2:])
  expected = _apply(image)(
      image_params, flat, np.repeat(timesteps, frames), np.repeat(context, frames, 0)
  )
  assert relative_error(out, np.asarray(expected).reshape(out.shape)) <= 1e-5


def test_bad_configs_are_named(case, tmp_path):
  if case["name"] != "diffusers":
    pytest.skip("one config is enough")
  base = {"_class_name": "UNet3DConditionModel", **case["config"]}
  path = tmp_path / "unet"
  path.mkdir()

  def load(**changes):
    (path / "config.json").write_text(json.dumps({**base, **changes}))
    with pytest.raises(ConversionError) as e:
      load_diffusers(str(path))
    return str(e.value)

  message = load(attention_head_dim=3)
  assert "attention_head_dim=3" in message and "divide" in message
  assert "attention_head_dim=[2, 2]" in load(attention_head_dim=[2, 2])
  assert "time_cond_proj_dim=16" in load(time_cond_proj_dim=16)
  assert "act_fn='gelu'" in load(act_fn="gelu")

  module, params = case["module"], case["params"]
  with pytest.raises(ConversionError, match="one head width"):
    save_diffusers(
        module.clone(num_attention_heads=(1, 1)),
        params,
        str(tmp_path / "out"),
        class_name="UNet3DConditionModel",
    )
  with pytest.raises(ValueError, match="text_motion_embedding"):
    module.clone(text_motion_embedding=True).check_config()
  with pytest.raises(ValueError, match="divisible"):
    module.clone(num_attention_heads=(3, 3)).check_config()


# ----------------------------------------------------------------------------------- pipeline
def _text_to_video_pipeline(root):
  """A tiny TextToVideoSDPipeline (ModelScope layout, DDIM), perturbed."""
  import sd_folders  # pylint: disable=g-import-not-at-top

  transformers = pytest.importorskip("transformers")
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
  unet = diffusers.UNet3DConditionModel(
      block_out_channels=(16, 32),
      layers_per_block=1,
      sample_size=8,
      norm_num_groups=8,
      down_block_types=_3D[:2],
      up_block_types=_3D[2:],
      cross_attention_dim=32,
      attention_head_dim=8,
  )
  vae = diffusers.AutoencoderKL(
      block_out_channels=[32, 32],
      latent_channels=4,
      layers_per_block=1,
      down_block_types=["DownEncoderBlock2D"] * 2,
      up_block_types=["UpDecoderBlock2D"] * 2,
  )
  for seed, model in enumerate((unet, vae, text_encoder)):
    perturb_(model, seed)
  scheduler = diffusers.DDIMScheduler(
      beta_start=0.00085,
      beta_end=0.012,
      beta_schedule="scaled_linear",
      clip_sample=False,
      set_alpha_to_one=False,
  )
  pipe = diffusers.TextToVideoSDPipeline(
      vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
  )
  pipe.set_progress_bar_config(disable=True)
  return pipe


@pytest.mark.slow
def test_pipeline_matches_text_to_video_sd(tmp_path):
  """A TextToVideoSDPipeline folder samples the clip diffusers' (deprecated) pipeline samples from
  the same latents (guidance, DDIM); vldm's export of it is a TextToVideoSDPipeline folder that
  diffusers samples the same."""
  from vldm.pipelines import folder as folder_lib  # pylint: disable=g-import-not-at-top

  reference = _text_to_video_pipeline(tmp_path)
  folder = str(tmp_path / "modelscope")
  reference.save_pretrained(folder)
  frames, steps, scale = 4, 3, 6.0
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
  assert pipe.unet.is_modelscope and pipe.sampler.sampler == "ddim"
  actual = pipe(
      "a red circle",
      num_frames=frames,
      height=16,
      width=16,
      num_steps=steps,
      guidance_scale=scale,
      noise=latents.permute(0, 2, 3, 4, 1).numpy(),
  )
  error = relative_error(actual, expected)
  print(f"text-to-video vs TextToVideoSDPipeline: {error:.2e}")
  assert error <= 1e-3

  exported = str(tmp_path / "exported")
  folder_lib.save_pipeline(pipe, exported)
  assert json.loads((tmp_path / "exported" / "model_index.json").read_text())["_class_name"] == (
      "TextToVideoSDPipeline"
  )
  again = diffusers.TextToVideoSDPipeline.from_pretrained(exported)
  again.set_progress_bar_config(disable=True)
  error = relative_error(again("a red circle", latents=latents, **call).frames, expected)
  print(f"vldm's exported TextToVideoSDPipeline folder in diffusers: {error:.2e}")
  assert error <= 1e-4


@pytest.mark.slow
def test_sample_cli_on_a_text_to_video_sd_folder(tmp_path):
  """python -m vldm.sample --pretrained on a TextToVideoSDPipeline folder writes its clips (the
  size from the UNet's sample_size), finite at 2 DDIM steps (whose last step has ᾱ_prev = ᾱ)."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from vldm import video_io  # pylint: disable=g-import-not-at-top

  folder, out = str(tmp_path / "modelscope"), tmp_path / "out"
  _text_to_video_pipeline(tmp_path).save_pretrained(folder)
  command = [
      sys.executable,
      "-m",
      "vldm.sample",
      "--pretrained",
      folder,
      "--prompt",
      "a red circle",
  ]
  command += ["--num_frames", "3", "--num_steps", "2", "--out", str(out)]
  result = subprocess.run(
      command,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env=dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu"),
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "invalid value" not in result.stderr  # NaN frames cast to uint8
  samples = json.loads((out / "samples.json").read_text())
  assert [s["prompt"] for s in samples] == ["a red circle"]
  assert video_io.read_frames(str(out / samples[0]["file"])).shape == (3, 16, 16, 3)
