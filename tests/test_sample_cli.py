"""python -m vldm.sample: image-to-video from a diffusers folder writes the clips and
samples.json; a workdir without a trained stage is a clear error; sampler flags left unset keep
the pipeline's defaults."""
import json
import os
import subprocess
import sys
import textwrap

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


# vldm.sample with its pipeline replaced by one that records each call's settings (a subprocess:
# vldm.sample's flags would clash with vldm.demo's in this process).
RECORDING = textwrap.dedent("""
    import json
    import numpy as np
    from absl import app
    from vldm import sample

    class Recording:
      def __call__(self, conditions, rng, **kwargs):
        print("CALL" + json.dumps(kwargs))
        return np.zeros((len(conditions), 2, 8, 8, 3), np.float32)

    sample.load_pipeline = Recording
    app.run(sample.main)
""")


def _recorded_call(tmp_path, *flags):
  result = subprocess.run(
      [sys.executable, "-c", RECORDING, "--pretrained", str(tmp_path), "--prompt", "a red circle",
       "--out", str(tmp_path / "out"), *flags], cwd=REPO, capture_output=True, text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  (line,) = [l for l in result.stdout.splitlines() if l.startswith("CALL")]
  return json.loads(line[len("CALL"):])


def test_sampler_flags_pass_only_when_given(tmp_path):
  """Unset sampler flags leave the pipeline's defaults (a trained stage's) in force."""
  sizes = dict(num_frames=None, height=None, width=None, decode_chunk_size=None)
  assert _recorded_call(tmp_path) == dict(sizes, negative_prompt="")
  given = _recorded_call(tmp_path, "--num_steps", "4", "--guidance_scale", "2", "--fps", "5")
  assert given == dict(sizes, negative_prompt="", num_steps=4, guidance_scale=2.0, fps=5)
