"""Video sources: the video-folder builder (skips bad files) and the standard TFDS datasets."""

import collections
import json
import logging
import os

import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow_datasets as tfds

from vldm.data import config as config_lib
from vldm.data import motion
from vldm.data import pipeline as pipeline_lib
from vldm.data import sources
from vldm.data import standard
from vldm.data import transforms
from vldm.data import video_folder

import media


def write_videos(folder):
  """Real tiny GIF / MP4 / WebM files, a corrupt one, a too-short one, and a missing entry."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)

  def clip(frames, h, w):
    ramp = np.linspace(0, 255, frames).astype(np.uint8)  # brightness grows with time
    return np.broadcast_to(ramp[:, None, None, None], (frames, h, w, 3)).copy()

  iio.imwrite(os.path.join(folder, "ramp.gif"), clip(10, 24, 40), duration=100, loop=0)
  iio.imwrite(os.path.join(folder, "ramp.mp4"), clip(12, 32, 48), fps=12)
  iio.imwrite(
      os.path.join(folder, "noise.webm"),
      rng.integers(0, 255, (9, 32, 32, 3), dtype=np.uint8),
      fps=24,
      codec="libvpx",
  )
  iio.imwrite(os.path.join(folder, "short.gif"), clip(3, 24, 40), duration=100, loop=0)
  with open(os.path.join(folder, "corrupt.mp4"), "wb") as f:
    f.write(b"\x00\x00\x00\x18ftypmp42 but not really a video" * 20)
  return [
      ("ramp.gif", "a gif ramp"),
      ("ramp.mp4", "an mp4 ramp"),
      ("noise.webm", "webm noise"),
      ("short.gif", "too short"),
      ("corrupt.mp4", "corrupt"),
      ("gone.mp4", "missing"),
  ]


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
  builder = video_folder.video_folder_builder(
      folder, name, resolution=16, min_frames=8, data_dir=str(tmp_path / "tfds")
  )
  with caplog.at_level(logging.WARNING, logger="vldm.data.video_folder"):
    builder.download_and_prepare(file_format="array_record")
  # Skipped files: counted, listed, logged.
  assert video_folder.skipped_files(builder) == {
      "missing": ["gone.mp4"],
      "unreadable": ["corrupt.mp4"],
      "too_short": ["short.gif"],
  }
  assert video_folder.skipped_count(builder) == 3
  log = caplog.text
  assert "corrupt.mp4" in log and "short.gif" in log and "skipped 3 file(s)" in log
  # The good files are there, resized, with their captions and frame rates.
  source = builder.as_data_source("train")
  examples = {e["file"].decode(): e for e in (source[i] for i in range(len(source)))}
  assert set(examples) == {"ramp.gif", "ramp.mp4", "noise.webm"}
  expected = {
      "ramp.gif": (10, "a gif ramp", 10.0),
      "ramp.mp4": (12, "an mp4 ramp", 12.0),
      "noise.webm": (9, "webm noise", 24.0),
  }
  for file, (frames, caption, fps) in expected.items():
    video = np.stack(examples[file]["video"])
    assert video.shape == (frames, 16, 16, 3) and video.dtype == np.uint8
    assert examples[file]["caption"].decode() == caption
    assert examples[file]["fps"] == pytest.approx(fps)
  ramp = np.stack(examples["ramp.gif"]["video"]).mean(axis=(1, 2, 3))
  assert (np.diff(ramp) > 0).all()  # frames kept in order
  # The count survives a reload of the prepared dataset.
  reloaded = video_folder.video_folder_builder(
      folder, name, resolution=16, min_frames=8, data_dir=str(tmp_path / "tfds")
  )
  assert reloaded.is_prepared() and video_folder.skipped_count(reloaded) == 3
  # And it streams through the pipeline.
  batch = next(
      pipeline_lib.Pipeline(
          source, global_batch_size=3, frames=4, frame_stride=2, process_index=0, process_count=1
      )
  )
  assert batch["video"].shape == (3, 4, 16, 16, 3)
  assert sorted(batch["fps"].tolist()) == pytest.approx([5.0, 6.0, 12.0])


def test_video_folder_config_and_errors(tmp_path):
  folder = str(tmp_path / "clips")
  write_videos(folder)
  with open(os.path.join(folder, "captions.csv"), "w") as f:
    f.write("file,caption,split\nramp.gif,one,train\nramp.mp4,two,validation\n")
  c = config_lib.data_config(
      "video_folder",
      folder=folder,
      resolution=8,
      frames=4,
      batch_size=1,
      data_dir=str(tmp_path / "tfds"),
  )
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


# --- clips at a target frame rate, segments, errors (real MP4s from tests/media.py) ------------


def _examples(builder, split="train"):
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


def test_target_fps_strides_each_file_and_skips_bad_ones(tmp_path):
  summary = media.write_video_folder(str(tmp_path / "videos"), missing=True)
  builder = video_folder.video_folder_builder(
      summary["folder"], resolution=16, min_frames=4, target_fps=8, data_dir=str(tmp_path / "tfds")
  )
  builder.download_and_prepare(file_format="array_record")
  examples = {e["file"].decode(): e for e in _examples(builder)}
  assert set(examples) == set(summary["good"])
  for file in summary["good"]:
    info, example = summary["files"][file], examples[file]
    stride = max(1, int(info["fps"] / 8 + 0.5))  # 8 fps: 1, 12: 2, 24: 3, 30: 4 (3.75)
    video = np.stack(example["video"])
    assert video.shape == (-(-info["frames"] // stride), 16, 16, 3), file
    assert example["fps"] == pytest.approx(info["fps"] / stride), file
    assert example["start_frame"] == 0
    assert example["caption"].decode() == info["caption"]
  assert examples["square_30fps.mp4"]["fps"] == pytest.approx(7.5)
  assert video_folder.skipped_files(builder) == summary["bad"]
  # Any size and aspect comes out square; the 64x48 clip at stride 2 matches a direct decode.
  path = os.path.join(summary["folder"], "square_12fps.mp4")
  expected = transforms.resize_and_crop(iio.imread(path)[::2], 16)
  np.testing.assert_array_equal(np.stack(examples["square_12fps.mp4"]["video"]), expected)


def test_long_video_gives_segments_spread_over_it(tmp_path):
  folder = str(tmp_path / "long")
  os.makedirs(folder)
  path = media.write_video(os.path.join(folder, "long.mp4"), media.make_clip(100, 16, 16), 10)
  media.write_captions(os.path.join(folder, "captions.csv"), [("long.mp4", "a long one")])
  decoded = iio.imread(path)
  # Stride 1, segments of 8: 12 full ones and a remainder of 4 (< min_frames 6, dropped); a cap
  # of 4 takes segments 0, 4, 7 and 11, from the start to the end of the video.
  capped = video_folder.video_folder_builder(
      folder,
      resolution=16,
      min_frames=6,
      max_frames=8,
      clips_per_video=4,
      data_dir=str(tmp_path / "tfds"),
  )
  capped.download_and_prepare(file_format="array_record")
  examples = sorted(_examples(capped), key=lambda e: int(e["start_frame"]))
  assert [int(e["start_frame"]) for e in examples] == [0, 32, 56, 88]
  for e in examples:
    start = int(e["start_frame"])  # traceable: the stored clip is the file's frames from there
    np.testing.assert_array_equal(np.stack(e["video"]), decoded[start : start + 8])
    assert e["fps"] == pytest.approx(10.0)
  # At 5 fps (stride 2): 50 frames, 6 segments of 8 and a remainder of 2 (dropped); no cap.
  strided = video_folder.video_folder_builder(
      folder,
      resolution=16,
      min_frames=2,
      max_frames=8,
      target_fps=5,
      clips_per_video=0,
      data_dir=str(tmp_path / "tfds"),
  )
  assert strided.builder_config.name != capped.builder_config.name  # options -> own dataset
  strided.download_and_prepare(file_format="array_record")
  examples = sorted(_examples(strided), key=lambda e: int(e["start_frame"]))
  assert [(int(e["start_frame"]), len(e["video"])) for e in examples] == [
      (0, 8),
      (16, 8),
      (32, 8),
      (48, 8),
      (64, 8),
      (80, 8),
      (96, 2),
  ]
  assert {float(e["fps"]) for e in examples} == {5.0}
  np.testing.assert_array_equal(np.stack(examples[-1]["video"]), decoded[96::2])


def test_examples_carry_a_motion_score(tmp_path):
  folder = str(tmp_path / "motion")
  os.makedirs(folder)
  moving = media.make_clip(16, 32, 32)  # a square moving a pixel per frame
  media.write_video(os.path.join(folder, "moving.mp4"), moving, 8)
  media.write_video(os.path.join(folder, "still.mp4"), np.repeat(moving[:1], 16, axis=0), 8)
  media.write_captions(
      os.path.join(folder, "captions.csv"), [("moving.mp4", "moves"), ("still.mp4", "stays")]
  )
  builder = video_folder.video_folder_builder(
      folder, resolution=32, min_frames=4, data_dir=str(tmp_path / "tfds")
  )
  assert str(builder.info.version) == "1.4.0"
  builder.download_and_prepare(file_format="array_record")
  source = builder.as_data_source("train")
  examples = {e["file"].decode(): e for e in (source[i] for i in range(len(source)))}
  still, move = float(examples["still.mp4"]["motion"]), float(examples["moving.mp4"]["motion"])
  assert 0 <= still < 1e-2 < move
  # The stored score is motion_score of the stored frames at the stored fps.
  video = np.stack(examples["moving.mp4"]["video"])
  assert move == pytest.approx(motion.motion_score(video, 8.0), rel=1e-5)
  # And it reaches the batches, float32 [B].
  batch = next(
      pipeline_lib.Pipeline(
          source, global_batch_size=2, frames=4, shuffle=False, process_index=0, process_count=1
      )
  )
  assert batch["motion"].dtype == np.float32 and batch["motion"].shape == (2,)
  expected = [float(source[int(i)]["motion"]) for i in batch["index"]]
  np.testing.assert_allclose(batch["motion"], expected)


def test_segment_planning():
  assert video_folder.frame_stride(30, None) == 1
  assert video_folder.frame_stride(30, 8) == 4 and video_folder.frame_stride(12, 8) == 2
  assert video_folder.frame_stride(5, 8) == 1  # never upsamples
  assert video_folder.num_segments(100, 1, 6, 8) == 12  # remainder 4 < 6
  assert video_folder.num_segments(100, 2, 2, 8) == 7  # 50 frames: 6 x 8 + 2
  assert video_folder.num_segments(5, 1, 6, 0) == 0 and video_folder.num_segments(6, 1, 6, 0) == 1
  assert video_folder.chosen_segments(12, 4) == [0, 4, 7, 11]
  assert video_folder.chosen_segments(12, 0) is None and video_folder.chosen_segments(3, 4) is None
  assert video_folder.chosen_segments(12, 1) == [0]


def test_jsonl_fallback_and_config_keys_through_make_source(tmp_path):
  summary = media.write_video_folder(str(tmp_path / "videos"), captions_format="jsonl")
  assert not os.path.exists(os.path.join(summary["folder"], "captions.csv"))
  c = config_lib.data_config(
      "video_folder",
      folder=summary["folder"],
      resolution=8,
      frames=4,
      max_frames=4,
      target_fps=12,
      clips_per_video=2,
      batch_size=1,
      data_dir=str(tmp_path / "tfds"),
  )
  assert c.captions == "captions.csv"  # the default, absent: captions.jsonl is read instead
  examples = list(sources.make_source(c, "train"))
  by_file = collections.defaultdict(list)
  for e in examples:
    by_file[e["file"].decode()].append(int(e["start_frame"]))
  # 8 fps -> stride 1: 12 frames, 3 segments of 4, capped to 2 (first and last); 12 fps -> 1;
  # 24 fps -> 2 (24 frames, 6 segments); 30 fps -> 3 (round(2.5) up; 20 frames, 5 segments).
  assert {f: sorted(s) for f, s in by_file.items()} == {
      "square_8fps.mp4": [0, 8],
      "square_12fps.mp4": [0, 24],
      "square_24fps.mp4": [0, 40],
      "square_30fps.mp4": [0, 48],
  }
  assert all(len(e["video"]) == 4 for e in examples)


def test_no_captions_file_is_a_clear_error(tmp_path):
  folder = str(tmp_path / "uncaptioned")
  os.makedirs(folder)
  media.write_video(os.path.join(folder, "a.mp4"), media.make_clip(8, 16, 16), 8)
  c = config_lib.data_config(
      "video_folder", folder=folder, resolution=8, frames=4, data_dir=str(tmp_path / "tfds")
  )
  with pytest.raises(ValueError, match=r"No captions file.*captions\.csv.*captions\.jsonl"):
    sources.make_source(c, "train")
  c.captions = "mine.csv"  # a name of one's own: no fallback
  with pytest.raises(ValueError, match=r"looked for '[^']*mine\.csv'\. Add one"):
    sources.make_source(c, "train")


def test_no_readable_video_is_a_clear_error(tmp_path):
  folder = str(tmp_path / "bad")
  os.makedirs(folder)
  with open(os.path.join(folder, "garbage.mp4"), "wb") as f:
    f.write(b"not a video" * 50)
  media.write_video(os.path.join(folder, "short.mp4"), media.make_clip(2, 16, 16), 8)
  media.write_captions(
      os.path.join(folder, "captions.csv"),
      [("garbage.mp4", "x"), ("short.mp4", "y"), ("gone.mp4", "z")],
  )
  c = config_lib.data_config(
      "video_folder", folder=folder, resolution=8, frames=4, data_dir=str(tmp_path / "tfds")
  )
  with pytest.raises(ValueError, match="No video of split 'train'") as error:
    sources.make_source(c, "train")
  message = str(error.value)
  assert "'missing': 1, 'unreadable': 1, 'too_short': 1" in message
  for file in ("garbage.mp4", "short.mp4", "gone.mp4"):
    assert file in message
  assert not video_folder.video_folder_builder(
      folder, resolution=8, min_frames=4, data_dir=str(tmp_path / "tfds")
  ).is_prepared()


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


@pytest.mark.parametrize(
    "name,split,caption",
    [
        ("ucf101", "train", r"a video of [a-z ]+"),
        ("moving_mnist", "test", r"digits moving"),
        ("bair_robot_pushing_small", "train", r"a robot arm pushing objects"),
    ],
)
def test_standard_datasets_through_the_pipeline(name, split, caption, monkeypatch):
  with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    source = standard.standard_source(name, split, data_dir="/nonexistent")
    assert len(source) == 2
    example = source[0]
    assert example["video"].ndim == 4 and example["video"].shape[-1] == 3
    import re  # pylint: disable=g-import-not-at-top

    assert re.fullmatch(caption, example["caption"]), example["caption"]
    batch = next(
        pipeline_lib.Pipeline(
            source, global_batch_size=2, frames=4, resolution=16, process_index=0, process_count=1
        )
    )
  assert batch["video"].shape == (2, 4, 16, 16, 3)
  assert batch["fps"].tolist() == [standard.STANDARD_DATASETS[name].fps] * 2


def test_label_caption_adapter_on_a_fake_source():
  spec = standard.STANDARD_DATASETS["ucf101"]
  fake = [{"video": np.zeros((5, 4, 4, 3), np.uint8), "label": 1}]
  source = standard.LabeledVideoSource(fake, spec, ["ApplyLipstick", "BoxingPunchingBag"])
  assert source[0]["caption"] == "a video of boxing punching bag"
  gray = standard.LabeledVideoSource(
      [{"image_sequence": np.zeros((5, 4, 4, 1), np.uint8)}],
      standard.STANDARD_DATASETS["moving_mnist"],
  )
  assert gray[0]["video"].shape == (5, 4, 4, 3) and gray[0]["caption"] == "digits moving"
  with pytest.raises(ValueError, match="no class label"):
    standard.LabeledVideoSource(
        [], standard.STANDARD_DATASETS["moving_mnist"], template="a video of {label}"
    )
