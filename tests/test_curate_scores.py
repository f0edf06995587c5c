"""vldm.curate's model scores end to end, on videos the tests write, where the answer is known:
a caption that matches its frames scores a higher CLIP similarity than a mismatched one (a tiny
CLIP trained here on colours), and a clip with drawn text scores the largest text area (a text
detector whose answer is known stands in for CRAFT's network; the scorer, CRAFT's box
post-processing and the pipeline are vldm's own)."""

import json
import os

import cv2
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

import media
from test_curate import FPS, SIZE, small_config, texture_clip, write_tiny_clip
from vldm.convert import torch_state
from vldm.curate import pipeline
from vldm.curate import scorers
from vldm.models import craft

COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240)}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _write(folder, videos, captions):
  os.makedirs(folder, exist_ok=True)
  for file, frames in videos.items():
    media.write_video(os.path.join(folder, file), frames, FPS)
  with open(os.path.join(folder, "captions.jsonl"), "w", encoding="utf-8") as f:
    for file, caption in captions:
      f.write(json.dumps({"file": file, "caption": caption}) + "\n")
  return folder


def _tinted(color, seed):
  """A panning texture in one colour: brightness from the texture, hue from `color`."""
  return texture_clip(12, 0.5, seed=seed, tint=tuple(c / 255 for c in COLORS[color]))


def train_color_clip(folder, steps=150):
  """The tiny CLIP of test_curate, trained with CLIP's loss to pair frames of one colour (random
  brightness per pixel, as the textures have) with the colour's name; saved to `folder`."""
  torch = pytest.importorskip("torch")
  model, tokenizer = write_tiny_clip(folder)
  names = list(COLORS)
  ids = tokenizer(names, padding="max_length", max_length=16, return_tensors="pt").input_ids
  rgb = torch.tensor([COLORS[n] for n in names], dtype=torch.float32)
  mean = torch.tensor(CLIP_MEAN)[:, None, None]
  std = torch.tensor(CLIP_STD)[:, None, None]
  gen = torch.Generator().manual_seed(0)
  optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
  model.train()
  for _ in range(steps):
    labels = torch.randint(0, len(names), (24,), generator=gen)
    brightness = torch.rand(24, 1, 32, 32, generator=gen)
    pixels = (rgb[labels][:, :, None, None] * brightness / 255.0 - mean) / std
    logits = model(input_ids=ids, pixel_values=pixels).logits_per_image  # [24, colours]
    loss = torch.nn.functional.cross_entropy(logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
  model.eval().save_pretrained(folder)
  return float(loss.detach())


def test_matching_caption_scores_higher_clip_similarity(tmp_path):
  clip_dir = str(tmp_path / "clip")
  assert train_color_clip(clip_dir) < 0.2  # the colours are learned
  videos, captions = {}, []
  for seed, color in enumerate(("red", "blue")):
    other = "blue" if color == "red" else "red"
    videos[f"{color}_matched.mp4"] = videos[f"{color}_mismatched.mp4"] = _tinted(color, seed)
    captions += [(f"{color}_matched.mp4", color), (f"{color}_mismatched.mp4", other)]
  folder = _write(str(tmp_path / "videos"), videos, captions)
  result = pipeline.run(
      small_config(clip=clip_dir, score_size=32), folder, str(tmp_path / "out"), 0, 1
  )
  score = {r["file"]: r["clip_score"] for r in result["rows"]}
  assert len(score) == 4, score  # one clip a video, every one captioned
  for color in ("red", "blue"):
    assert score[f"{color}_matched.mp4"] > score[f"{color}_mismatched.mp4"] + 0.5, score
  # Percentile filter at 50 %: the mismatched half goes.
  dropped = {r["file"] for r in result["rows"] if "clip_score" in r["dropped_by"]}
  assert dropped == {"red_mismatched.mp4", "blue_mismatched.mp4"}


class WhiteTextDetector(nn.Module):
  """Stands in for CRAFT's network with a known answer: region score 1 on a 2×2 cell with a
  near-white pixel (CRAFT's score maps are at half the input resolution), else 0; affinity 0. Its
  input is CRAFT's (`craft.preprocess`: EasyOCR's mean/std normalisation)."""

  @nn.compact
  def __call__(self, x):  # pylint: disable=arguments-differ
    white = jnp.all(x > (240.0 - jnp.asarray(craft.MEAN_RGB)) / jnp.asarray(craft.STD_RGB), -1)
    b, h, w = white.shape
    region = white.astype(jnp.float32).reshape(b, h // 2, 2, w // 2, 2).max((2, 4))
    return jnp.stack([region, jnp.zeros_like(region)], -1), None


def _text_clip(text, seed):
  """A dim texture with `text` drawn in white in its middle; also returns the text's box."""
  frames = (texture_clip(12, 0.5, seed=seed) * 0.6).astype(np.uint8)
  font, scale, thickness = cv2.FONT_HERSHEY_SIMPLEX, 0.45, 2  # pylint: disable=no-member
  (w, h), _ = cv2.getTextSize(text, font, scale, thickness)  # pylint: disable=no-member
  x, y = (SIZE - w) // 2, (SIZE + h) // 2
  for frame in frames:
    cv2.putText(frame, text, (x, y), font, scale, (255, 255, 255), thickness)  # pylint: disable=no-member
  return frames, w * h / SIZE**2


def test_drawn_text_scores_the_largest_text_area(tmp_path, monkeypatch):
  monkeypatch.setattr(scorers.craft, "CRAFT", WhiteTextDetector)
  monkeypatch.setattr(torch_state, "load_craft_params", lambda path: {})
  weights = tmp_path / "craft.pth"
  weights.write_bytes(b"the stand-in detector has no weights")
  text, text_fraction = _text_clip("TEXT", seed=1)
  small, _ = _text_clip("OK", seed=2)
  videos = {"plain.mp4": (texture_clip(12, 0.5, seed=3) * 0.6).astype(np.uint8)}
  videos.update({"text.mp4": text, "small_text.mp4": small})
  folder = _write(str(tmp_path / "videos"), videos, [])
  config = small_config(craft_weights=str(weights), craft_long_side=64, score_size=64)
  result = pipeline.run(config, folder, str(tmp_path / "out"), 0, 1)
  area = {r["file"]: r["text_area"] for r in result["rows"]}
  assert area["plain.mp4"] == 0.0
  assert area["text.mp4"] > area["small_text.mp4"] > 0.0
  # CRAFT's boxes, one a character grown a little, cover about the drawn text's box.
  assert 0.7 * text_fraction < area["text.mp4"] < 2 * text_fraction
  # The text filter drops the 25 % with the most text: of 3 clips, the one with the most.
  dropped = [r["file"] for r in result["rows"] if "text_area" in r["dropped_by"]]
  assert dropped == ["text.mp4"]
