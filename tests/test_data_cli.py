"""`python -m vldm.data`: streams a tiny shapes config, writes summary.json and batch.gif."""
import json
import os
import re
import subprocess
import sys

import imageio.v3 as iio
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTION = re.compile(r"a (red|green|blue|yellow|magenta|cyan) (circle|square|triangle) moving "
                     r"(left|right|up|down)")


def test_cli_summary_and_gif(tmp_path):
  out = tmp_path / "out"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  command = [sys.executable, "-m", "vldm.data",
             "--config", os.path.join(REPO, "configs", "data_shapes.py") + ":runlocal",
             f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.data.resolution=24",
             "--batches", "3", "--out", str(out)]
  result = subprocess.run(command, cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((out / "summary.json").read_text())
  batch_size = 8  # runlocal
  assert summary["batch_shape"] == [batch_size, 8, 24, 24, 3]
  assert sum(summary["captions"].values()) == 3 * batch_size
  for caption in summary["captions"]:
    assert caption == "" or CAPTION.fullmatch(caption), caption
  assert summary["clips_per_s"] > 0
  assert -1 <= summary["value_range"][0] < summary["value_range"][1] <= 1
  frames = iio.imread(out / "batch.gif", index=None)
  # 8 clips in a 3x3 grid of 24-pixel cells with 1-pixel gutters, 8 frames.
  assert frames.shape[:3] == (8, 3 * 25 - 1, 3 * 25 - 1)
  assert frames[..., :3].max() > 200 and np.mean(frames[..., :3] == 0) > 0.3  # shapes on black
