"""Data curation (vldm.curate) on tiny synthetic MP4s: cuts and fades are found, motion orders
clips by speed, unreadable files are skipped and counted, percentile filters drop the expected
clips, and a killed-and-rerun run writes the same clips.jsonl as an uninterrupted one."""

import json
import os

import cv2
import ml_collections
import numpy as np
import pytest

import media
import recipe_runs
from configs import curate as curate_config
from vldm.curate import cuts as cuts_lib
from vldm.curate import pipeline

SIZE, FPS = 64, 10
SCENE = 15  # frames per scene of the cut video
CUTS = (SCENE, 2 * SCENE)
FADE_START, FADE_LEN, BLACK_LEN = 15, 5, 4  # scene A, fade out, black, fade in, scene B
SPEEDS = {"motion_0_still.mp4": 0.0, "motion_1_slow.mp4": 0.5, "motion_2_fast.mp4": 2.0}
CONTRACT_KEYS = {"file", "start_frame", "end_frame", "fps", "motion", "kept", "dropped_by"}


def texture_clip(frames, speed=0.0, seed=0, tint=(1.0, 1.0, 1.0)):
  """A smooth random texture panning at `speed` px per frame: uint8 [frames, 64, 64, 3]."""
  # pylint: disable=no-member  # cv2 is a compiled extension: pylint cannot list its members
  rng = np.random.default_rng(seed)
  texture = cv2.GaussianBlur(rng.random((192, 192)).astype(np.float32), (0, 0), 3.0)
  texture = (texture - texture.min()) / (texture.max() - texture.min())
  out = []
  for t in range(frames):
    frame = cv2.getRectSubPix(texture, (SIZE, SIZE), (64 + 0.8 * speed * t, 64 + 0.6 * speed * t))
    out.append(np.rint(frame[..., None] * 255 * np.asarray(tint)).clip(0, 255))
  return np.stack(out).astype(np.uint8)


def fade_clip():
  """Scene A, a fade to black, black, a fade back in to scene B."""
  a = texture_clip(FADE_START + FADE_LEN, 0.3, seed=1, tint=(1.0, 0.6, 0.3))
  b = texture_clip(FADE_LEN + SCENE, 0.3, seed=2, tint=(0.3, 0.7, 1.0))
  ramp = np.linspace(1.0, 0.0, FADE_LEN + 1)[1:]
  a[FADE_START:] = (a[FADE_START:] * ramp[:, None, None, None]).astype(np.uint8)
  b[:FADE_LEN] = (b[:FADE_LEN] * ramp[::-1][:, None, None, None]).astype(np.uint8)
  return np.concatenate([a, np.zeros((BLACK_LEN, SIZE, SIZE, 3), np.uint8), b])


def write_folder(path):
  os.makedirs(path, exist_ok=True)
  scenes = [
      texture_clip(SCENE, 0.3, seed=s, tint=t)
      for s, t in ((3, (1, 0.5, 0.2)), (4, (0.2, 1, 0.4)), (5, (0.5, 0.3, 1)))
  ]
  media.write_video(os.path.join(path, "cuts.mp4"), np.concatenate(scenes), FPS)
  media.write_video(os.path.join(path, "fade.mp4"), fade_clip(), FPS)
  for seed, (file, speed) in enumerate(SPEEDS.items()):
    media.write_video(os.path.join(path, file), texture_clip(20, speed, seed=10 + seed), FPS)
  with open(os.path.join(path, "zz_broken.mp4"), "wb") as f:
    f.write(b"\x00\x00\x00\x18ftypmp42 not a video " * 8)
  with open(os.path.join(path, "captions.jsonl"), "w", encoding="utf-8") as f:
    for file, caption in (
        ("cuts.mp4", "three scenes"),
        ("cuts.mp4", "colour changes"),
        ("fade.mp4", "a fade to black"),
    ):
      f.write(json.dumps({"file": file, "caption": caption}) + "\n")
  return path


def small_config(**overrides):
  config = curate_config.get_config()
  config.min_frames = 6
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope="module", name="folder")
def folder_fixture(tmp_path_factory):
  return write_folder(str(tmp_path_factory.mktemp("videos")))


@pytest.fixture(scope="module", name="full_run")
def full_run_fixture(folder, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("out_full"))
  return out, pipeline.run(small_config(), folder, out, host=0, host_count=1)


def _rows(result, file):
  return [r for r in result["rows"] if r["file"] == file]


def _record(result, file):
  return next(r for r in result["records"] if r["file"] == file)


def test_hard_cuts_found_within_two_frames(full_run):
  _, result = full_run
  found = _record(result, "cuts.mp4")["cuts"]
  assert len(found) == len(CUTS), found
  assert all(abs(f - c) <= 2 for f, c in zip(found, CUTS)), found
  ranges = [(r["start_frame"], r["end_frame"]) for r in _rows(result, "cuts.mp4")]
  assert len(ranges) == 3 and ranges[0][0] == 0 and ranges[-1][1] == 3 * SCENE


def test_fade_detected(full_run):
  _, result = full_run
  found = _record(result, "fade.mp4")["cuts"]
  assert found and all(FADE_START <= c <= FADE_START + 2 * FADE_LEN + BLACK_LEN for c in found)


def test_motion_orders_clips_by_speed(full_run):
  _, result = full_run
  motion = [_rows(result, file)[0]["motion"] for file in SPEEDS]
  assert motion[0] < min(r["motion"] for r in result["rows"] if r["file"] not in SPEEDS)
  assert motion == sorted(motion) and motion[0] < 1e-3 < motion[1]


def test_unreadable_skipped_and_counted(full_run):
  out, result = full_run
  assert [r["file"] for r in result["records"] if "error" in r] == ["zz_broken.mp4"]
  assert not _rows(result, "zz_broken.mp4")
  with open(os.path.join(out, "report.html"), encoding="utf-8") as f:
    report = f.read()
  assert "zz_broken.mp4" in report and "<th>unreadable videos</th><td>1</td>" in report
  assert os.path.isfile(os.path.join(out, "report", "hist-motion.png"))
  assert os.path.isfile(os.path.join(out, "report", "sheet-motion-dropped.png"))


def test_a_bug_is_not_skipped_as_an_unreadable_video(folder, tmp_path, monkeypatch):
  """Only the decoder's failures turn into skipped files: an error in vldm's own code (here a
  failing motion score) stops the run instead of marking every video unreadable."""

  def broken(*_):
    raise AttributeError("a bug")

  monkeypatch.setattr(pipeline.motion_lib, "motion_score", broken)
  with pytest.raises(AttributeError, match="a bug"):
    pipeline.run(small_config(), folder, str(tmp_path), host=0, host_count=1)


def test_clips_jsonl_contract(full_run):
  out, result = full_run
  with open(os.path.join(out, "clips.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == len(result["rows"]) == 3 + 2 + len(SPEEDS)
  assert all(CONTRACT_KEYS <= set(r) for r in rows)
  assert rows == sorted(rows, key=lambda r: (r["file"], r["start_frame"]))
  assert {r["file"]: r.get("captions") for r in rows}["cuts.mp4"] == [
      "three scenes",
      "colour changes",
  ]
  assert {r["file"]: r.get("caption") for r in rows}["fade.mp4"] == "a fade to black"
  assert not {"caption", "captions", "clip_score", "aesthetic", "text_area"} & set(
      next(r for r in rows if r["file"] in SPEEDS)
  )


def test_percentile_filter_drops_lowest_motion(full_run):
  _, result = full_run
  rows = result["rows"]
  expected = sorted(rows, key=lambda r: r["motion"])[: round(len(rows) * 0.25)]
  assert [r for r in rows if not r["kept"]] == sorted(
      expected, key=lambda r: (r["file"], r["start_frame"])
  )
  assert all(r["dropped_by"] == ["motion"] for r in expected)
  assert _rows(result, "motion_0_still.mp4")[0]["dropped_by"] == ["motion"]


def test_filters_percentile_and_threshold():
  rows = [
      {"file": f"v{i}", "start_frame": 0, "motion": float(i), "text_area": i / 10} for i in range(8)
  ]
  filters = {
      "motion": {"percentile": 25.0, "threshold": None},
      "text_area": {"percentile": 25.0, "threshold": None},
      "aesthetic": {"percentile": 25.0, "threshold": None},
  }
  summary = pipeline.apply_filters(rows, filters)
  assert [r["dropped_by"] for r in rows] == [["motion"]] * 2 + [[]] * 4 + [["text_area"]] * 2
  assert summary["motion"]["threshold"] == 1.5 and "aesthetic" not in summary
  filters["motion"]["threshold"] = 3.0
  pipeline.apply_filters(rows, filters)
  assert [r["kept"] for r in rows] == [False] * 3 + [True] * 3 + [False] * 2


def test_merge_cuts_and_clip_ranges():
  assert cuts_lib.merge_cuts([10, 11, 12, 30, 0, 45], 3, 45) == [10, 30]
  assert cuts_lib.clip_ranges([10], 40, 4, 12) == [(0, 10), (10, 22), (22, 34), (34, 40)]
  assert cuts_lib.clip_ranges([3], 10, 4, 0) == [(3, 10)]


def test_killed_and_rerun_gives_same_clips(folder, full_run, tmp_path):
  full_out, _ = full_run
  out = str(tmp_path)
  pipeline.run(small_config(max_videos=1), folder, out, host=0, host_count=1)
  with open(pipeline.scores_path(out, 0), "a", encoding="utf-8") as f:
    f.write('{"file": "fade.mp4", "clips": [')  # killed while writing the next record
  pipeline.run(small_config(), folder, out, host=0, host_count=1)
  files = [r["file"] for r in pipeline.read_records(pipeline.scores_path(out, 0))]
  assert sorted(files) == files and len(set(files)) == len(files) == 6  # none scored twice
  with open(os.path.join(out, "clips.jsonl"), "rb") as a, open(
      os.path.join(full_out, "clips.jsonl"), "rb"
  ) as b:
    assert a.read() == b.read()


def test_sharded_hosts_merge_to_the_same_clips(folder, full_run, tmp_path):
  full_out, _ = full_run
  out = str(tmp_path)
  pipeline.run(small_config(), folder, out, host=1, host_count=2)  # host 1 only scores
  assert not os.path.exists(os.path.join(out, "clips.jsonl"))
  pipeline.run(small_config(), folder, out, host=0, host_count=2)
  with open(os.path.join(out, "clips.jsonl"), "rb") as a, open(
      os.path.join(full_out, "clips.jsonl"), "rb"
  ) as b:
    assert a.read() == b.read()


def test_bad_input_errors(tmp_path):
  with pytest.raises(pipeline.CurationError, match="existing folder"):
    pipeline.run(small_config(), str(tmp_path / "nope"), str(tmp_path / "out"), 0, 1)
  with pytest.raises(pipeline.CurationError, match="No videos found"):
    pipeline.run(small_config(), str(tmp_path), str(tmp_path / "out"), 0, 1)


def test_cli(folder, full_run, tmp_path):
  full_out, _ = full_run
  out = str(tmp_path / "cli")
  recipe_runs.run(
      "curate",
      "--input",
      folder,
      "--out",
      out,
      "--config.min_frames=6",
      inputs={"cache": str(tmp_path / "cache")},
  )
  with open(os.path.join(out, "clips.jsonl"), "rb") as a, open(
      os.path.join(full_out, "clips.jsonl"), "rb"
  ) as b:
    assert a.read() == b.read()


def write_tiny_clip(folder):
  """A tiny random transformers CLIPModel folder with a CLIP BPE tokenizer; returns the model."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from sd_folders import write_clip_vocab  # pylint: disable=import-outside-toplevel

  vocab_size = write_clip_vocab(folder)
  torch.manual_seed(0)
  tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
  config = transformers.CLIPConfig(
      text_config=dict(
          vocab_size=vocab_size,
          max_position_embeddings=16,
          bos_token_id=vocab_size - 2,
          eos_token_id=vocab_size - 1,
          pad_token_id=vocab_size - 1,
          **tower,
      ),
      vision_config=dict(image_size=32, patch_size=8, **tower),
      projection_dim=16,
  )
  model = transformers.CLIPModel(config).eval()
  model.save_pretrained(folder)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=16)
  tokenizer.save_pretrained(folder)
  return model, tokenizer


def test_clip_score_matches_transformers(folder, tmp_path):
  import torch  # pylint: disable=import-outside-toplevel

  from vldm.curate import scorers  # pylint: disable=import-outside-toplevel

  clip_dir = str(tmp_path / "clip")
  model, tokenizer = write_tiny_clip(clip_dir)
  scorer = scorers.ClipScorer(clip_dir, batch_size=4)
  frames = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  captions = ["a red circle", "red"]
  ours = scorer.similarity(scorer.image_embeds(frames), scorer.caption_embeds(captions))
  mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
  std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
  pixels = (torch.tensor(frames).permute(0, 3, 1, 2) / 255.0 - mean) / std
  ids = tokenizer(captions, padding="max_length", max_length=16, return_tensors="pt").input_ids
  with torch.no_grad():
    outputs = model(input_ids=ids, pixel_values=pixels)  # normalised embeddings
  assert ours == pytest.approx(
      float((outputs.image_embeds @ outputs.text_embeds.T).mean()), abs=1e-4
  )

  out = str(tmp_path / "out")
  result = pipeline.run(small_config(clip=clip_dir, score_size=32), folder, out, 0, 1)
  scored = [r for r in result["rows"] if "clip_score" in r]
  assert {r["file"] for r in scored} == {"cuts.mp4", "fade.mp4"}  # the captioned videos
  assert sum("clip_score" in r["dropped_by"] for r in result["rows"]) == 3  # 50 % of 5, half up


def test_curated_clip_list_is_training_data(full_run, tmp_path):
  """The recipes' video-folder dataset reads clips.jsonl: kept clips only, each from its frame
  range; `data=OUT/clips.jsonl` finds the folder the curation read."""
  # pylint: disable=g-import-not-at-top
  from configs import common as configs_common
  from vldm.data import config as data_config_lib
  from vldm.data import video_folder

  out, result = full_run
  clip_list = os.path.join(out, "clips.jsonl")
  data = data_config_lib.data_config("video_folder", folder=out)  # what data=DIR would set
  config = ml_collections.ConfigDict(dict(data=data))
  config.batch_size = 2
  configs_common.link_data(config, clip_list, str(tmp_path))
  assert config.data.captions == clip_list
  with open(os.path.join(out, video_folder.CURATION_MANIFEST), encoding="utf-8") as f:
    folder = json.load(f)["input"]
  assert config.data.folder == video_folder.clip_list_folder(clip_list) == folder
  builder = video_folder.video_folder_builder(
      config.data.folder,
      clip_list,
      resolution=16,
      min_frames=4,
      max_frames=4,
      clips_per_video=0,
      data_dir=str(tmp_path / "tfds"),
  )
  builder.download_and_prepare(file_format="array_record")
  source = builder.as_data_source("train")
  examples = [source[i] for i in range(len(source))]
  kept = [r for r in result["rows"] if r["kept"]]
  dropped = [r for r in result["rows"] if not r["kept"]]
  assert kept and dropped
  ranges = {(r["file"], r["start_frame"], r["end_frame"]) for r in kept}
  for e in examples:
    file, start = e["file"].decode(), int(e["start_frame"])
    assert any(f == file and s <= start and start + 4 <= end for f, s, end in ranges), (file, start)
  # Every kept clip gives all its 4-frame segments, and nothing else is read.
  assert {(e["file"].decode()) for e in examples} == {r["file"] for r in kept}
  assert len(examples) == sum((r["end_frame"] - r["start_frame"]) // 4 for r in kept)
