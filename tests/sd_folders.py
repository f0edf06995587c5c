"""Tiny random Stable Diffusion folders written by diffusers / transformers, for recipe tests.

`write_clip_vocab(folder)` writes a tiny CLIP BPE vocabulary (no download); `write_sd_folder(folder,
style)` a diffusers StableDiffusionPipeline folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/)
in the style of SD 1.x (ε-prediction, PNDM scheduler, padding with end-of-text) or SD 2.x
(v-prediction, DDIM scheduler, padding with "!"), with perturbed random weights.
"""

import json
import os

import diffusers
import torch
import transformers

from parity import perturb_

MERGES = [
    ("r", "e"),
    ("re", "d</w>"),
    ("c", "i"),
    ("ci", "r"),
    ("cir", "c"),
    ("circ", "l"),
    ("circl", "e</w>"),
]
STYLES = ("sd1", "sd2")
MAX_LENGTH = 16  # tokenizer model_max_length = text encoder positions


def write_clip_vocab(folder, merges=MERGES):
  """A tiny CLIP BPE vocabulary laid out as the real one: bytes, bytes + </w>, the merges, then
  <|startoftext|> and <|endoftext|> last. Returns its size."""
  bs = (
      list(range(ord("!"), ord("~") + 1))
      + list(range(ord("¡"), ord("¬") + 1))
      + list(range(ord("®"), ord("ÿ") + 1))
  )
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  vocab = [chr(c) for c in cs]
  vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump({v: i for i, v in enumerate(vocab)}, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return len(vocab)


def sd_pipeline(folder, style="sd1", seed=0):
  """A tiny random StableDiffusionPipeline in the given style (its tokenizer files in folder)."""
  if style not in STYLES:
    raise ValueError(f"style must be one of {STYLES}")
  torch.manual_seed(seed)
  vocab_dir = os.path.join(folder, "_vocab")
  vocab_size = write_clip_vocab(vocab_dir)
  pad = {"sd1": "<|endoftext|>", "sd2": "!"}[style]
  tokenizer = transformers.CLIPTokenizer.from_pretrained(
      vocab_dir, model_max_length=MAX_LENGTH, pad_token=pad
  )
  text_encoder = transformers.CLIPTextModel(
      transformers.CLIPTextConfig(
          vocab_size=vocab_size,
          hidden_size=32,
          intermediate_size=37,
          num_hidden_layers=2,
          num_attention_heads=4,
          max_position_embeddings=MAX_LENGTH,
          bos_token_id=tokenizer.bos_token_id,
          eos_token_id=tokenizer.eos_token_id,
          pad_token_id=tokenizer.pad_token_id,
          hidden_act="quick_gelu" if style == "sd1" else "gelu",
      )
  )
  unet = diffusers.UNet2DConditionModel(
      block_out_channels=(32, 64),
      layers_per_block=1,
      sample_size=8,
      in_channels=4,
      out_channels=4,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=32,
      attention_head_dim=2,
      norm_num_groups=32,
      use_linear_projection=style == "sd2",
  )
  vae = diffusers.AutoencoderKL(
      block_out_channels=[32, 32],
      down_block_types=["DownEncoderBlock2D"] * 2,
      up_block_types=["UpDecoderBlock2D"] * 2,
      latent_channels=4,
      layers_per_block=1,
      sample_size=32,
      scaling_factor=0.18215,
  )
  for i, model in enumerate((unet, vae, text_encoder)):
    perturb_(model, seed + i)
  common = dict(
      beta_start=0.00085,
      beta_end=0.012,
      beta_schedule="scaled_linear",
      steps_offset=1,
      set_alpha_to_one=False,
  )
  if style == "sd1":
    scheduler = diffusers.PNDMScheduler(skip_prk_steps=True, **common)
  else:
    scheduler = diffusers.DDIMScheduler(prediction_type="v_prediction", clip_sample=False, **common)
  return diffusers.StableDiffusionPipeline(
      vae=vae,
      text_encoder=text_encoder,
      tokenizer=tokenizer,
      unet=unet,
      scheduler=scheduler,
      safety_checker=None,
      feature_extractor=None,
      requires_safety_checker=False,
  )


def write_sd_folder(folder, style="sd1", seed=0) -> str:
  """Writes `sd_pipeline(...)` with save_pretrained to folder/<style>; returns that path."""
  path = os.path.join(folder, style)
  sd_pipeline(folder, style, seed).save_pretrained(path)
  return path
