"""Video sources: the video-folder builder (skips bad files) and the standard TFDS datasets."""
import json
import logging
import os

import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow_datasets as tfds

from vldm.data import config as config_lib
from vldm.data import pipeline as pipeline_lib
from vldm.data import sources
from vldm.data import standard
from vldm.data import video_folder


def write_videos(folder):
  """Real tiny GIF / MP4 / WebM files, a corrupt one, a too-short one, and a missing entry."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)

  def clip(frames, h, w):
    ramp = np.linspace(0, 255, frames).astype(np.uint8)  # brightness grows with time
    return np.broadcast_to(ramp[:, None, None, None], (frames, h, w, 3)).copy()

  iio.imwrite(os.path.join(folder, "ramp.gif"), clip(10, 24, 40), duration=100, loop=0)
  iio.imwrite(os.path.join(folder, "ramp.mp4"), clip(12, 32, 48), fps=12)
  iio.imwrite(os.path.join(folder, "noise.webm"),
              rng.integers(0, 255, (9, 32, 32, 3), dtype=np.uint8), fps=24, codec="libvpx")
  iio.imwrite(os.path.join(folder, "short.gif"), clip(3, 24, 40), duration=100, loop=0)
  with open(os.path.join(folder, "corrupt.mp4"), "wb") as f:
    f.write(b"\x00\x00\x00\x18ftypmp42 but not really a video" * 20)
  return [("ramp.gif", "a gif ramp"), ("ramp.mp4", "an mp4 ramp"), ("noise.webm", "webm noise"),
          ("short.gif", "too short"), ("corrupt.mp4", "corrupt"), ("gone.mp4", "missing")]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_video_folder_skips_bad_files(tmp_path, fmt, caplog):
  folder = str(tmp_path / "videos")
  rows = write_videos(folder)
  if fmt == "csv":
    name = "captions.csv"
    with open(os.path.join(folder, name), "w") as f:
      f.write("file,caption\n" + "".join(f'{file},"{caption}"\n' for file, caption in rows))
  else:
    name = "captions.jsonl"
    with open(os.path.join(folder, name), "w") as f:
      f.writelines(json.dumps({"video": file, "text": caption}) + "\n" for file, caption in rows)
  builder = video_folder.video_folder_builder(folder, name, resolution=16, min_frames=8,
                                              data_dir=str(tmp_path / "tfds"))
  with caplog.at_level(logging.WARNING, logger="vldm.data.video_folder"):
    builder.download_and_prepare(file_format="array_record")
  # Skipped files: counted, listed, logged.
  assert video_folder.skipped_files(builder) == {
      "missing": ["gone.mp4"], "unreadable": ["corrupt.mp4"], "too_short": ["short.gif"]}
  assert video_folder.skipped_count(builder) == 3
  log = caplog.text
  assert "corrupt.mp4" in log and "short.gif" in log and "skipped 3 file(s)" in log
  # The good files are there, resized, with their captions and frame rates.
  source = builder.as_data_source("train")
  examples = {e["file"].decode(): e for e in (source[i] for i in range(len(source)))}
  assert set(examples) == {"ramp.gif", "ramp.mp4", "noise.webm"}
  expected = {"ramp.gif": (10, "a gif ramp", 10.0), "ramp.mp4": (12, "an mp4 ramp", 12.0),
              "noise.webm": (9, "webm noise", 24.0)}
  for file, (frames, caption, fps) in expected.items():
    video = np.stack(examples[file]["video"])
    assert video.shape == (frames, 16, 16, 3) and video.dtype == np.uint8
    assert examples[file]["caption"].decode() == caption
    assert examples[file]["fps"] == pytest.approx(fps)
  ramp = np.stack(examples["ramp.gif"]["video"]).mean(axis=(1, 2, 3))
  assert (np.diff(ramp) > 0).all()  # frames kept in order
  # The count survives a reload of the prepared dataset.
  reloaded = video_folder.video_folder_builder(folder, name, resolution=16, min_frames=8,
                                               data_dir=str(tmp_path / "tfds"))
  assert reloaded.is_prepared() and video_folder.skipped_count(reloaded) == 3
  # And it streams through the pipeline.
  batch = next(pipeline_lib.Pipeline(source, global_batch_size=3, frames=4, frame_stride=2,
                                     process_index=0, process_count=1))
  assert batch["video"].shape == (3, 4, 16, 16, 3)
  assert sorted(batch["fps"].tolist()) == pytest.approx([5.0, 6.0, 12.0])


def test_video_folder_config_and_errors(tmp_path):
  folder = str(tmp_path / "clips")
  write_videos(folder)
  with open(os.path.join(folder, "captions.csv"), "w") as f:
    f.write("file,caption,split\nramp.gif,one,train\nramp.mp4,two,validation\n")
  c = config_lib.data_config("video_folder", folder=folder, resolution=8, frames=4, batch_size=1,
                             data_dir=str(tmp_path / "tfds"))
  train = sources.make_pipeline(c, process_index=0, process_count=1)
  assert next(train)["video"].shape == (1, 4, 8, 8, 3)
  evaluation = sources.make_pipeline(c, train=False, process_index=0, process_count=1)
  assert [b["caption"] for b in evaluation] == [["two"]]
  with pytest.raises(ValueError, match="splits"):
    sources.make_source(c, "test")
  with open(os.path.join(folder, "bad.csv"), "w") as f:
    f.write("name,caption\nramp.gif,x\n")
  with pytest.raises(ValueError, match="file"):
    video_folder.read_captions(os.path.join(folder, "bad.csv"))
  with pytest.raises(ValueError, match="folder"):
    config_lib.data_config("video_folder")


# --- standard TFDS datasets --------------------------------------------------------------------


def test_standard_dataset_not_present_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="not present.*never downloads"):
    standard.standard_source("moving_mnist", "test", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="Unknown standard"):
    standard.standard_source("kinetics600", "train", data_dir=str(tmp_path))


def test_humanize():
  assert standard.humanize("ApplyEyeMakeup") == "apply eye makeup"
  assert standard.humanize("YoYo") == "yo yo"
  assert standard.humanize("push_ups") == "push ups"
  assert standard.humanize("PlayingDhol") == "playing dhol"


@pytest.mark.parametrize("name,split,caption", [
    ("ucf101", "train", r"a video of [a-z ]+"),
    ("moving_mnist", "test", r"digits moving"),
    ("bair_robot_pushing_small", "train", r"a robot arm pushing objects"),
])
def test_standard_datasets_through_the_pipeline(name, split, caption, monkeypatch):
  with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    source = standard.standard_source(name, split, data_dir="/nonexistent")
    assert len(source) == 2
    example = source[0]
    assert example["video"].ndim == 4 and example["video"].shape[-1] == 3
    import re  # pylint: disable=g-import-not-at-top
    assert re.fullmatch(caption, example["caption"]), example["caption"]
    batch = next(pipeline_lib.Pipeline(source, global_batch_size=2, frames=4, resolution=16,
                                       process_index=0, process_count=1))
  assert batch["video"].shape == (2, 4, 16, 16, 3)
  assert batch["fps"].tolist() == [standard.STANDARD_DATASETS[name].fps] * 2


def test_label_caption_adapter_on_a_fake_source():
  spec = standard.STANDARD_DATASETS["ucf101"]
  fake = [{"video": np.zeros((5, 4, 4, 3), np.uint8), "label": 1}]
  source = standard.LabeledVideoSource(fake, spec, ["ApplyLipstick", "BoxingPunchingBag"])
  assert source[0]["caption"] == "a video of boxing punching bag"
  gray = standard.LabeledVideoSource(
      [{"image_sequence": np.zeros((5, 4, 4, 1), np.uint8)}], standard.STANDARD_DATASETS[
          "moving_mnist"])
  assert gray[0]["video"].shape == (5, 4, 4, 3) and gray[0]["caption"] == "digits moving"
  with pytest.raises(ValueError, match="no class label"):
    standard.LabeledVideoSource([], standard.STANDARD_DATASETS["moving_mnist"],
                                template="a video of {label}")
