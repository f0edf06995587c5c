"""Shared pieces of the config files: string arguments and the keys every run has.

A config file defines `get_config(arg=None)`; the string after ':' in
`--config configs/FILE.py:stage=video,runlocal=True` arrives as `arg`. Single keys are then
overridden with `--config.KEY=VALUE` (the config is locked: unknown keys are errors).
"""

import difflib
import os

import ml_collections
from ml_collections import config_dict


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  """Parses 'key=value,flag,...' against `defaults`, converting each value to its default's type.

  `parse_arg('stage=video,runlocal', stage='image', runlocal=False, res=32)` gives
  ConfigDict(stage='video', runlocal=True, res=32). A bare `name` sets a boolean to True.
  Unknown keys are errors naming the accepted ones.
  """
  result = ml_collections.ConfigDict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, has_value, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.5)
      raise ValueError(
          f"Unknown config argument {key!r} in {arg!r}"
          + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "")
          + f" Accepted: {sorted(defaults)}."
      )
    default = defaults[key]
    if not has_value:
      if not isinstance(default, bool):
        raise ValueError(f"Config argument {key!r} needs a value ({key}=...).")
      result[key] = True
    else:
      result[key] = _convert(key, value.strip(), default)
  return result


def _convert(key, value, default):
  if isinstance(default, bool):
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError(f"Config argument {key}={value} must be a boolean (True or False).")
  if default is None or isinstance(default, str):
    return value
  try:
    return type(default)(value)
  except ValueError:
    raise ValueError(
        f"Config argument {key}={value} must be of type {type(default).__name__}."
    ) from None


def base_config() -> ml_collections.ConfigDict:
  """The keys every training run has; task configs fill `task`, `model`/task sections, data."""
  config = ml_collections.ConfigDict()
  config.task = ""  # a registered task name (vldm.train.tasks) or 'module:Class'
  config.seed = 0
  # The train state's PRNG implementation (a jax name: 'threefry2x32', 'rbg', ...), whatever the
  # process default is: a run resumes only under the one it started with (the key's shape).
  config.prng_impl = "threefry2x32"
  config.total_steps = 1000
  config.batch_size = 32  # global: split over all devices and processes
  config.log_every = 50  # metrics.jsonl + TensorBoard
  config.checkpoint_every = 1000  # also at the end and on preemption; 0: only those
  config.keep_checkpoints = 3  # keep the newest N (0: all)
  config.async_checkpointing = True
  config.sample_every = 0  # sample GIFs with the task's sample_fn; 0: never
  # Metrics of samples every eval_every steps (tasks that generate; vldm.eval.evaluator), logged
  # as eval/<metric> in metrics.jsonl and TensorBoard. 0: never.
  config.eval_every = 0
  config.eval = ml_collections.ConfigDict(
      {
          "metrics": "clipsim",  # comma-separated: fvd, fid, clipsim, oracle
          "real": "",  # a folder of real clips (captions file): fvd / fid statistics, prompts
          "prompts": (),  # fixed prompts; default: the real clips' captions
          "num_clips": 16,  # clips per evaluation (and of the real set)
          "num_frames": 0,  # frames per clip; 0: the stage's
          "fid_frames": 0,  # frames per clip for FID; 0: all
          "i3d_weights": "",
          "inception_weights": "",
          "clip": "",  # a transformers CLIPModel folder
          "stats_cache": "",  # where the real statistics are cached ('': kept in memory only)
          "batch_size": 8,
      }
  )
  config.tensorboard = True
  config.progress_bar = True

  # Stage hand-off: start from another run's newest parameters (EMA where kept) through a named
  # transform ('as_is', 'copy_matching' or one the task provides). Ignored when resuming.
  config.init_from = ml_collections.ConfigDict()
  config.init_from.workdir = config_dict.placeholder(str)
  config.init_from.transform = "as_is"
  config.init_from.use_ema = True

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 1e-4
  config.optim.warmup_steps = 500
  config.optim.decay = "cosine"  # or 'constant'
  config.optim.end_lr_factor = 0.0
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.weight_decay = 0.0
  config.optim.grad_clip = 1.0  # global-norm clipping; 0: off
  config.ema_decay = 0.9999  # 0: no EMA

  # LoRA (vldm.train.lora; docs/lora.md): rank > 0 freezes the task's parameters (as init_from
  # or the pretrained weights give them) and trains rank-r adapters of the `targets` modules
  # (names or regexes over diffusers module names) of each of `components`, scaled alpha / rank.
  config.lora = ml_collections.ConfigDict()
  config.lora.rank = 0  # 0: off
  config.lora.alpha = config_dict.placeholder(float)  # None: alpha = rank (scale 1)
  config.lora.targets = ("to_q", "to_k", "to_v", "to_out.0")  # e.g. (".*temporal.*attn.*",)
  config.lora.components = ("unet",)

  config.dtype = "float32"  # compute dtype passed to the model; params stay float32
  config.remat_policy = config_dict.placeholder(str)  # a model's remat policy name (None: none)
  config.attention_implementation = config_dict.placeholder(str)  # 'xla', 'cudnn'; None: JAX's

  # Devices: named mesh axes, -1 = the rest. Batches split over all axes; parameters by rules.
  config.mesh = (("data", -1), ("fsdp", 1))
  config.sharding = ml_collections.ConfigDict()
  config.sharding.params = ((".*", "fsdp"),)  # (regex on 'params/...' paths, 'fsdp'|'replicate')
  config.sharding.activations = (("batch", ("data", "fsdp")),)  # logical name -> mesh axes
  return config


def link_data(config: ml_collections.ConfigDict, data: str, root: str) -> None:
  """The data section's batch size as the config's (one key: --config.batch_size), the prepared
  dataset in ROOT/data, and no folder when none was given (a preset compiles without data;
  training it says data.folder is missing). `data` may be a curated clip list (a .jsonl or .csv
  file, e.g. `python -m vldm.curate`'s OUT/clips.jsonl) instead of a folder."""
  if not data:
    config.data.folder = None
  elif os.path.isfile(data):
    from vldm.data import video_folder  # pylint: disable=g-import-not-at-top

    config.data.folder = video_folder.clip_list_folder(data)
    config.data.captions = os.path.abspath(data)
  config.data.batch_size = config.get_ref("batch_size")
  config.data.data_dir = os.path.join(root, "data") if root else config_dict.placeholder(str)


def use_preset(ldm: ml_collections.ConfigDict, name: str) -> None:
  """Every component of `ldm` from the architecture preset `name` (`vldm.models.presets`: sd15,
  sd21, svd) instead of folders: the real shapes without weights or a vocabulary, for
  `python -m vldm.train --compile_only`. Such a config compiles but cannot train or sample."""
  from vldm.models import presets  # pylint: disable=g-import-not-at-top

  preset = presets.get(name)
  ldm.pretrained = ""
  ldm.unet.model = ml_collections.ConfigDict(preset["unet"])
  if ldm.get("upsampler") and ldm.upsampler.factor:  # its module config states the full width
    ldm.unet.model.in_channels = 2 * preset["unet"]["in_channels"]
  if ldm.get("frame_conditioning") and ldm.frame_conditioning.get("mode"):
    from vldm.diffusion import frame_conditioning  # pylint: disable=g-import-not-at-top

    channels = preset["unet"]["in_channels"]
    ldm.unet.model.in_channels = frame_conditioning.conditioned_in_channels(channels)
  ldm.vae.model = ml_collections.ConfigDict(preset["vae"])
  ldm.vae.scaling_factor = preset["vae"]["scaling_factor"]
  if "text_encoder" in preset:
    ldm.text_encoder.model = ml_collections.ConfigDict(preset["text_encoder"])
    ldm.tokenizer.kind = "ids_only"
    ldm.tokenizer.ids = ml_collections.ConfigDict(preset["tokenizer"])
  if "image_encoder" in preset:  # its projection width is the UNet's cross-attention width
    ldm.image_encoder.model = ml_collections.ConfigDict(
        {k: v for k, v in preset["image_encoder"].items() if k != "projection_dim"}
    )
  ldm.schedule = ml_collections.ConfigDict(preset["schedule"])
  if ldm.prediction_type is None:
    ldm.prediction_type = preset["prediction_type"]


def pretrained_stage_config(task: str, stage: str, schedule: tuple, local: bool):
  """The base config of a stage fine-tuned from published weights (configs/video_ldm.py,
  configs/svd.py): `schedule` = (steps, batch size, peak learning rate, warmup), constant after
  warmup, EMA 0.9999, bf16 compute with float32 parameters; `local` (runlocal): 3 steps of batch
  8 in float32 (exact checks), without EMA, tiny models drawn on the host."""
  config = base_config()
  config.task = task
  config.stage = stage
  steps, batch, lr, warmup = schedule
  config.total_steps = 3 if local else steps
  config.batch_size = 8 if local else batch
  config.log_every = 1 if local else 50
  config.checkpoint_every = 0 if local else 1000
  config.sample_every = 0
  config.optim.lr = lr
  config.optim.warmup_steps = 1 if local else warmup
  config.optim.decay = "constant"
  config.ema_decay = 0.0 if local else 0.9999
  config.dtype = "float32" if local else "bfloat16"
  config.host_init = local  # large models use their own init, sharded
  return config
