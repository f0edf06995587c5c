"""Several captions per clip: captioner names from the captions file through curation and the
video-folder dataset, and the per-captioner draw in training (pixels and the latent cache), which
stays a pure function of (seed, epoch, index)."""

import collections
import json
import os

import numpy as np
import pytest

import media
from configs import curate as curate_config
from vldm.curate import pipeline as curate
from vldm.data import cache
from vldm.data import config as config_lib
from vldm.data import pipeline as pipeline_lib
from vldm.data import sources
from vldm.data import video_folder


def captioned_source(n=20, names=("a", "b", "c")):
  """Tiny images, each with one caption per captioner: 'a 3' is captioner a's of example 3."""
  return [
      {
          "image": np.full((4, 4, 3), i, np.uint8),
          "caption": f"{names[0]} {i}",
          "captions": [f"{name} {i}".encode() for name in names],  # bytes, as TFDS gives them
          "captioners": [name.encode() for name in names],
      }
      for i in range(n)
  ]


def stream(source, batch=5, **kwargs):
  return pipeline_lib.Pipeline(
      source,
      global_batch_size=batch,
      kind="image",
      process_index=0,
      process_count=1,
      num_workers=1,
      **kwargs,
  )


def captioner_counts(pipe, steps):
  counts = collections.Counter()
  for _ in range(steps):
    counts.update(c.split(" ")[0] for c in next(pipe)["caption"])
  pipe.close()
  return counts


# --- the draw --------------------------------------------------------------------------------


def test_captioner_weights_set_the_frequencies():
  # 20 examples x 100 epochs: 2000 draws; a binomial's std at 0.8 is 0.009.
  pipe = stream(captioned_source(), max_captions=3, caption_weights={"a": 0.8, "b": 0.2})
  counts = captioner_counts(pipe, 400)
  assert counts["c"] == 0  # not named in caption_weights: weight 0
  assert counts["a"] / 2000 == pytest.approx(0.8, abs=0.04)
  assert counts["b"] / 2000 == pytest.approx(0.2, abs=0.04)
  # Empty weights: uniform over the first max_captions captions.
  counts = captioner_counts(stream(captioned_source(), max_captions=2), 200)
  assert set(counts) == {"a", "b"} and counts["a"] / 1000 == pytest.approx(0.5, abs=0.05)


def test_unnamed_or_zero_weight_captions_draw_uniformly():
  assert pipeline_lib.caption_probabilities(["x", "y"], {"a": 1.0}).tolist() == [0.5, 0.5]
  assert pipeline_lib.caption_probabilities(["", "a"], {"a": 2.0}).tolist() == [0.0, 1.0]
  assert pipeline_lib.caption_probabilities(["a", "b"], {"a": 0.0, "b": 0.0}).tolist() == [
      0.5,
      0.5,
  ]
  # Captioner c is beyond max_captions=2; a and b weigh 0, so both are drawn.
  counts = captioner_counts(
      stream(captioned_source(), max_captions=2, caption_weights={"c": 1}), 40
  )
  assert set(counts) == {"a", "b"}
  # Unnamed captioners ('' or no 'captioners') weigh 0 where weights are given: uniform.
  source = captioned_source(names=("a", "b"))
  for example in source:
    del example["captioners"]
  counts = captioner_counts(stream(source, max_captions=2, caption_weights={"a": 1}), 40)
  assert set(counts) == {"a", "b"}
  # A source with one 'caption' only (shapes, standard datasets) keeps it.
  single = [{"image": np.zeros((4, 4, 3), np.uint8), "caption": f"only {i}"} for i in range(5)]
  batch = next(stream(single, max_captions=3, caption_weights={"a": 1}))
  assert batch["caption"] == [f"only {i}" for i in batch["index"]]


def test_the_draw_is_deterministic_and_resumes_exactly():
  kwargs = dict(max_captions=3, caption_weights={"a": 0.5, "b": 0.3, "c": 0.2}, seed=3)
  first = stream(captioned_source(), **kwargs)
  reference = [next(first) for _ in range(10)]  # 2.5 epochs
  second = stream(captioned_source(), **kwargs)
  for _ in range(3):
    next(second)
  state_after_3 = second.get_state()
  resumed = stream(captioned_source(), **kwargs)
  resumed.set_state(json.loads(json.dumps(state_after_3)))
  for want in reference[3:]:
    got = next(resumed)
    assert got["caption"] == want["caption"]
    np.testing.assert_array_equal(got["image"], want["image"])
  # Each epoch draws anew: an example's caption is not fixed across epochs.
  by_epoch = collections.defaultdict(dict)
  for step, batch in enumerate(reference[:8]):
    for i, caption in zip(batch["index"], batch["caption"]):
      by_epoch[step // 4][int(i)] = caption
  assert by_epoch[0] != by_epoch[1]
  for pipe in (first, second, resumed):
    pipe.close()


def test_one_caption_is_unchanged_and_the_draw_leaves_pixels_alone():
  """max_captions=1 reads 'caption' and draws nothing; > 1 draws last, so clips, crops and
  dropout are those of max_captions=1."""
  with_lists = captioned_source()
  without = [{"image": e["image"], "caption": e["caption"]} for e in with_lists]
  kwargs = dict(caption_dropout=0.3, seed=5, resolution=2, random_crop=True)
  a, b = stream(with_lists, **kwargs), stream(without, **kwargs)
  several = stream(with_lists, max_captions=3, **kwargs)
  for _ in range(8):
    x, y, z = next(a), next(b), next(several)
    assert x["caption"] == y["caption"]
    assert all(c == "" or c.startswith("a ") for c in x["caption"])
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["image"], z["image"])
    assert [c == "" for c in x["caption"]] == [c == "" for c in z["caption"]]  # same dropout


def test_caption_dropout_applies_after_the_draw():
  pipe = stream(captioned_source(), max_captions=3, caption_dropout=1.0)
  assert next(pipe)["caption"] == [""] * 5
  counts = captioner_counts(stream(captioned_source(), max_captions=3, caption_dropout=0.5), 40)
  assert counts[""] and counts["a"] and counts["b"] and counts["c"]


def test_bad_weights_and_max_captions_are_clear_errors():
  for weights, match in (
      ({"a": -1.0}, r"data.caption_weights\['a'\] must be a finite number >= 0"),
      ({"a": "0.8"}, r"data.caption_weights\['a'\]"),
      ({"a": float("nan")}, r"data.caption_weights\['a'\]"),
      ({"a": True}, r"data.caption_weights\['a'\]"),
  ):
    with pytest.raises(ValueError, match=match):
      config_lib.data_config(caption_weights=weights)
  with pytest.raises(ValueError, match="data.caption_weights must be a dict"):
    pipeline_lib.check_caption_weights("a=0.8", "data.caption_weights")
  with pytest.raises(ValueError, match=r"caption_weights\['b'\]"):
    stream(captioned_source(), max_captions=2, caption_weights={"b": -0.5})
  with pytest.raises(ValueError, match="data.max_captions must be an integer >= 1"):
    config_lib.data_config(max_captions=0)
  with pytest.raises(ValueError, match="max_captions must be an integer >= 1"):
    stream(captioned_source(), max_captions=1.5)
  c = config_lib.data_config(max_captions=3, caption_weights={"a": 0.8, "b": 0.2})
  assert c.max_captions == 3 and dict(c.caption_weights) == {"a": 0.8, "b": 0.2}


# --- the latent cache ------------------------------------------------------------------------


def toy_encode_text(captions):
  """list of str -> {'text_embedding': [B, 2, 3], 'pooled': [B, 3]}, distinct per caption."""
  codes = np.array([[sum(map(ord, c)), len(c)] for c in captions], np.float32)
  embedding = codes[:, :, None] * np.array([1.0, 0.5, 0.25], np.float32)
  return {"text_embedding": embedding, "pooled": embedding.sum(1)}


def toy_encode_image(pixels):
  return pixels[..., :1, :1, :]  # [B, 1, 1, 3]


def test_the_cache_stores_every_candidate_and_the_pipeline_draws_one(tmp_path):
  source = captioned_source(n=12)
  source[5]["captions"], source[5]["captioners"] = [b"b only"], [b"b"]  # padded: weight 0 after
  weights = {"a": 0.8, "b": 0.2}
  directory = str(tmp_path / "cache")
  build = dict(batch_size=4, kind="image", shard_size=5, process_index=0, process_count=1)
  rows = cache.build_latent_cache(
      source,
      directory,
      toy_encode_image,
      toy_encode_text,
      max_captions=2,
      caption_weights=weights,
      **build,
  )
  assert rows == 12
  with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
    meta = json.load(f)
  assert meta["max_captions"] == 2 and meta["caption_weights"] == weights
  cached = cache.LatentCache(directory)
  row = cached[3]
  assert row["captions"] == ["a 3", "b 3"] and row["caption"] == "a 3"
  np.testing.assert_allclose(row["caption_weights"], [0.8, 0.2], rtol=1e-6)
  assert row["text_embedding"].shape == (2, 2, 3) and row["pooled"].shape == (2, 3)
  np.testing.assert_array_equal(row["pooled"], toy_encode_text(["a 3", "b 3"])["pooled"])
  assert cached[5]["captions"] == ["b only", "b only"]
  np.testing.assert_array_equal(cached[5]["caption_weights"], [1.0, 0.0])
  # Read back: each row's text fields are the drawn caption's; dropout gives the null text.
  pipe = pipeline_lib.Pipeline(
      cached,
      global_batch_size=4,
      max_captions=2,
      caption_weights=weights,
      caption_dropout=0.2,
      process_index=0,
      process_count=1,
      num_workers=1,
  )
  counts = collections.Counter()
  null = toy_encode_text([""])
  for _ in range(150):  # 50 epochs
    batch = next(pipe)
    assert batch["text_embedding"].shape == (4, 2, 3) and "caption_weights" not in batch
    for k, caption in enumerate(batch["caption"]):
      want = toy_encode_text([caption]) if caption else null
      np.testing.assert_array_equal(batch["text_embedding"][k], want["text_embedding"][0])
      np.testing.assert_array_equal(batch["pooled"][k], want["pooled"][0])
    counts.update(c.split(" ")[0] for c in batch["caption"] if c)
  drawn = counts["a"] + counts["b"]
  assert counts["a"] / drawn == pytest.approx(0.8 * 11 / 12, abs=0.05)  # row 5 is always b
  # A cache is read with the max_captions and caption_weights it was built with.
  with pytest.raises(ValueError, match="built with max_captions=2"):
    pipeline_lib.Pipeline(cached, global_batch_size=4, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="built with caption_weights"):
    pipeline_lib.Pipeline(
        cached, global_batch_size=4, max_captions=2, process_index=0, process_count=1
    )
  pipe.close()


def test_a_one_caption_cache_keeps_the_single_caption_layout(tmp_path):
  directory = str(tmp_path / "cache")
  cache.build_latent_cache(
      captioned_source(n=6),
      directory,
      toy_encode_image,
      toy_encode_text,
      batch_size=3,
      kind="image",
      process_index=0,
      process_count=1,
  )
  with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
    meta = json.load(f)
  assert "max_captions" not in meta and "caption_weights" not in meta
  with open(os.path.join(directory, "p0-s00000.captions.json"), encoding="utf-8") as f:
    assert json.load(f) == [f"a {i}" for i in range(6)]
  cached = cache.LatentCache(directory)
  assert "caption_weights" not in cached.fields and cached[2]["text_embedding"].shape == (2, 3)
  with pytest.raises(ValueError, match="built with max_captions=1"):
    pipeline_lib.Pipeline(
        cached, global_batch_size=3, max_captions=2, process_index=0, process_count=1
    )


# --- captioners from the captions file, through curation, to the dataset ---------------------


def test_captioners_from_the_captions_file_to_training(tmp_path):
  folder = str(tmp_path / "videos")
  os.makedirs(folder)
  media.write_video(os.path.join(folder, "clip.mp4"), media.make_clip(12, 32, 32), 8)
  media.write_video(os.path.join(folder, "other.mp4"), media.make_clip(12, 32, 32, seed=1), 8)
  with open(os.path.join(folder, "captions.csv"), "w", encoding="utf-8") as f:
    f.write(
        "file,caption,captioner\nclip.mp4,a square moves,coca\nclip.mp4,"
        "a coloured square slides,llm\nother.mp4,another square,\n"
    )
  captions = curate.load_captions(folder)
  assert captions["clip.mp4"]["captioners"] == ["coca", "llm"]
  assert captions["other.mp4"]["captioners"] == [""]
  out = str(tmp_path / "curated")
  config = curate_config.get_config()
  config.min_frames = 6
  config.filters.motion.percentile = 0.0  # keep both clips
  result = curate.run(config, folder, out, host=0, host_count=1)
  clip_rows = {r["file"]: r for r in result["rows"]}
  assert clip_rows["clip.mp4"]["captions"] == ["a square moves", "a coloured square slides"]
  assert clip_rows["clip.mp4"]["captioners"] == ["coca", "llm"]
  other = clip_rows["other.mp4"]  # no captioner named: the clip list row is as before
  assert other["caption"] == "another square" and "captioners" not in other
  # The dataset built from the clip list stores both captions and their captioners.
  clip_list = os.path.join(out, "clips.jsonl")
  data = config_lib.data_config(
      "video_folder",
      kind="image",
      folder=folder,
      captions=clip_list,
      resolution=16,
      frames=1,
      min_frames=4,
      batch_size=2,
      caption_dropout=0.0,
      data_dir=str(tmp_path / "tfds"),
      max_captions=2,
      caption_weights={"llm": 1.0},
  )
  source = sources.make_source(data, "train")
  examples = {e["file"].decode(): e for e in (source[i] for i in range(len(source)))}
  clip = examples["clip.mp4"]
  assert [c.decode() for c in clip["captions"]] == ["a square moves", "a coloured square slides"]
  assert [c.decode() for c in clip["captioners"]] == ["coca", "llm"]
  assert clip["caption"].decode() == "a square moves"  # the first, for compatibility
  assert [c.decode() for c in examples["other.mp4"]["captioners"]] == [""]
  # data.max_captions / caption_weights reach the training stream: llm's caption only.
  pipe = sources.make_pipeline(data, process_index=0, process_count=1)
  for _ in range(3):
    batch = next(pipe)
    assert sorted(batch["caption"]) == ["a coloured square slides", "another square"]
  pipe.close()


def test_captioners_of_another_length_are_a_clear_error(tmp_path):
  path = str(tmp_path / "clips.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps({"file": "a.mp4", "captions": ["x", "y"], "captioners": ["p", "q"]}) + "\n")
    f.write(json.dumps({"file": "b.mp4", "captions": ["x", "y"], "captioners": ["p"]}) + "\n")
  with pytest.raises(ValueError, match=r"clips.jsonl, row 2: 'captioners' must be a list parallel"):
    video_folder.read_captions(path)
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps({"file": "a.mp4", "caption": "x", "captioners": "p"}) + "\n")
  with pytest.raises(ValueError, match="row 1: 'captioners'"):
    video_folder.read_captions(path)
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps({"file": "a.mp4", "captions": ["x", "y"], "captioner": "p"}) + "\n")
  assert video_folder.read_captions(path)[0]["captioners"] == ["p", "p"]
