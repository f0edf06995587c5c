"""`python -m vldm.evaluate` on folders of clips: FVD and FID with weight files the test saves from
the PyTorch references (random weights), the JSON with its protocol, the report, and the real
statistics' cache. (On a trained shapes run, with --workdir: tests/test_recipe.py.)"""

import json
import os

import pytest

import media
import recipe_runs
from test_evaluator import moving_squares

torch = pytest.importorskip("torch")


def write_clips(folder, clips, captions):
  """MP4s and a samples.json as `vldm.sample` writes them."""
  os.makedirs(folder, exist_ok=True)
  records = []
  for i, (clip, caption) in enumerate(zip(clips, captions)):
    media.write_video(os.path.join(folder, f"{i}.mp4"), clip, 8)
    records.append({"file": f"{i}.mp4", "mp4": f"{i}.mp4", "prompt": caption, "seed": i})
  with open(os.path.join(folder, "samples.json"), "w", encoding="utf-8") as f:
    json.dump(records, f)
  return folder


def random_weight_files(folder):
  """The references' state dicts at random weights (He-initialised I3D: collapsed features would make FVD ~0)."""
  import reference_fid_inception  # pylint: disable=import-outside-toplevel
  import reference_i3d  # pylint: disable=import-outside-toplevel
  from parity import he_init_  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  i3d_path, inception_path = os.path.join(folder, "i3d.pt"), os.path.join(folder, "inception.pth")
  torch.save(
      he_init_(reference_i3d.InceptionI3d(400, in_channels=3), seed=1).state_dict(), i3d_path
  )
  inception = reference_fid_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
  torch.save(inception.state_dict(), inception_path)
  return i3d_path, inception_path


@pytest.mark.slow  # ≈ 2 min: full-size I3D (224 px) and Inception (299 px) compiled on the CPU
def test_evaluate_folders_fvd_and_fid(tmp_path):
  i3d_path, inception_path = random_weight_files(str(tmp_path))
  real = write_clips(str(tmp_path / "real"), moving_squares(4, frames=10, seed=0), ["real"] * 4)
  generated = write_clips(
      str(tmp_path / "generated"), moving_squares(4, frames=10, seed=1), ["a square"] * 4
  )
  out = str(tmp_path / "eval" / "result.json")
  args = [
      "--real", real, "--generated", generated, "--metrics", "fvd,fid",
      "--i3d_weights", i3d_path, "--inception_weights", inception_path,
      "--num_clips", "4", "--num_frames", "9", "--fid_frames", "2", "--out", out,
  ]  # fmt: skip
  inputs = {"cache": str(tmp_path / "jax_cache")}
  recipe_runs.run("evaluate", *args, inputs=inputs)
  result = json.load(open(out, encoding="utf-8"))
  assert result["fvd"] > 0 and result["fid"] > 0
  assert result["protocol"] == {
      "num_clips": 4, "num_frames": 9, "frame_stride": 1, "fid_frames": 2,
      "i3d_input": 224, "inception_input": 299,
  }  # fmt: skip
  assert result["counts"]["real_resolutions"] == ["32x32"] and result["counts"]["real_clips"] == 4
  assert result["counts"]["real_features"] == {"fvd": 4, "fid": 8}  # clips; 2 frames a clip
  assert result["counts"]["generated_features"] == {"fvd": 4, "fid": 8}
  report = open(out[: -len(".json")] + ".md", encoding="utf-8").read()
  assert "| fvd |" in report and "num_frames = 9" in report
  assert os.path.getsize(out[: -len(".json")] + "_clips.png") > 0
  (cached,) = os.listdir(tmp_path / "eval" / "stats")[:1]
  assert cached.startswith("real-")

  # The same set against itself: FVD and FID ~0.
  args[args.index("--generated") + 1] = real
  recipe_runs.run("evaluate", *args, inputs=inputs)
  again = json.load(open(out, encoding="utf-8"))
  assert abs(again["fvd"]) < 1e-3 * result["fvd"] and abs(again["fid"]) < 1e-3 * result["fid"]


def test_evaluate_bad_input(tmp_path):
  folder = write_clips(str(tmp_path / "clips"), moving_squares(2, frames=4), ["x", "y"])
  failed = recipe_runs.run(
      "evaluate", "--real", folder, "--generated", folder, "--metrics", "fvd",
      "--out", str(tmp_path / "o.json"), inputs={"cache": str(tmp_path / "c")}, check=False,
  )  # fmt: skip
  assert failed.returncode != 0 and "fvd needs --i3d_weights" in failed.stderr
