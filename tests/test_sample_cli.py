"""python -m vldm.sample: image-to-video from a diffusers folder writes the clips and
samples.json; a workdir without a trained stage is a clear error."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from test_pipelines import save_tiny_svd
from vldm import video_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "vldm.sample", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_image_to_video_from_a_diffusers_folder(tmp_path):
  folder, out, image = str(tmp_path / "svd"), tmp_path / "out", str(tmp_path / "img.png")
  save_tiny_svd(folder)
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
  result = _run("--pretrained", folder, "--image", image, "--num_samples", "2", "--seed", "3",
                "--num_frames", "2", "--height", "32", "--width", "32", "--num_steps", "2",
                "--out", str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  samples = json.loads((out / "samples.json").read_text())
  assert samples == [dict(file=f"{k}.gif", mp4=f"{k}.mp4", prompt=None, seed=3 + k, image=image)
                     for k in range(2)]
  clips = {}
  for k in range(2):
    for ext in ("gif", "mp4"):
      frames = video_io.read_frames(str(out / f"{k}.{ext}"))
      assert frames.shape == (2, 32, 32, 3), (k, ext, frames.shape)
      clips[k, ext] = frames
  assert np.abs(clips[0, "gif"].astype(int) - clips[1, "gif"]).max() > 0  # two seeds, two clips


def test_workdir_without_a_trained_stage_is_a_clear_error(tmp_path):
  result = _run("--workdir", str(tmp_path), "--prompt", "a red circle moving left", "--out",
                str(tmp_path / "out"))
  assert result.returncode != 0
  assert "holds no trained stage" in result.stderr
  assert os.path.join(str(tmp_path), "checkpoints", "<step>") in result.stderr
  assert "Traceback" not in result.stderr
