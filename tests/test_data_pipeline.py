"""The input pipeline: clips, normalisation, dropout, host sharding, global arrays, exact resume,
and the latent cache read back through it."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vldm.data import cache
from vldm.data import pipeline as pipeline_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_source(n=40, length=12, height=20, width=30, held_out=True):
  """Videos whose frame t is filled with 10 * t + example index % 10 (so clips can be decoded)."""
  examples = []
  for i in range(n):
    values = 10 * np.arange(length) + i % 10
    video = np.broadcast_to(values[:, None, None, None], (length, height, width, 3))
    example = {"video": video.astype(np.uint8), "caption": f"clip {i}".encode(), "fps": 24.0}
    if held_out:
      example["held_out"] = i % 7 == 0
    examples.append(example)
  return examples


def frame_values(video):
  """Recovers the source uint8 values from normalised frames."""
  return np.rint((np.asarray(video)[..., 0, 0, 0] + 1) * 127.5).astype(int)


def collect(stream, n):
  return [next(stream) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      if key == "caption":
        assert x[key] == y[key]
      else:
        np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]))


def test_clip_sampling_stride_fps_and_normalisation():
  stream = pipeline_lib.Pipeline(
      fake_source(), global_batch_size=8, frames=4, frame_stride=(1, 3), resolution=16, seed=3
  )
  seen_strides = set()
  for batch in collect(stream, 5):
    video = batch["video"]
    assert video.shape == (8, 4, 16, 16, 3) and video.dtype == np.float32
    assert video.min() >= -1 and video.max() <= 1
    values = frame_values(video)
    steps = np.diff(values // 10, axis=1)
    for row, fps, index in zip(steps, batch["fps"], batch["index"]):
      stride = row[0]
      assert (row == stride).all() and stride in (1, 3)
      assert fps == pytest.approx(24.0 / stride)  # effective fps for micro-conditioning
      seen_strides.add(stride)
    np.testing.assert_array_equal(values[:, 0] % 10, batch["index"] % 10)
    assert batch["caption"] == [f"clip {i}" for i in batch["index"]]
    np.testing.assert_array_equal(batch["held_out"], batch["index"] % 7 == 0)
  assert seen_strides == {1, 3}
  # Too short for any stride: a clear error.
  short = pipeline_lib.Pipeline(fake_source(length=3), global_batch_size=2, frames=4)
  with pytest.raises(ValueError, match="too short"):
    next(short)


def test_normalisation_endpoints_and_resize_crop():
  video = np.zeros((2, 40, 60, 3), np.uint8)
  video[:, :, 30:] = 255  # right half white
  source = [{"video": video, "caption": "x"}] * 4
  batch = next(pipeline_lib.Pipeline(source, global_batch_size=4, frames=2, resolution=20))
  v = batch["video"]
  assert v.shape == (4, 2, 20, 20, 3)
  assert v[0, 0, 0, 0, 0] == -1.0 and v[0, 0, 0, -1, 0] == 1.0  # centre crop keeps both halves
  images = next(pipeline_lib.Pipeline(source, global_batch_size=4, kind="image", resolution=20))
  assert images["image"].shape == (4, 20, 20, 3)
  with pytest.raises(ValueError, match="images"):
    next(pipeline_lib.Pipeline([{"image": video[0], "caption": ""}] * 2, global_batch_size=2))


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_caption_dropout(p):
  stream = pipeline_lib.Pipeline(
      fake_source(n=100), global_batch_size=50, frames=2, caption_dropout=p, seed=0
  )
  captions = sum((b["caption"] for b in collect(stream, 8)), [])
  rate = np.mean([c == "" for c in captions])
  assert rate == pytest.approx(p, abs=0.06)


def test_two_processes_disjoint_and_cover_the_epoch():
  source = fake_source(n=48)
  whole = pipeline_lib.Pipeline(
      source, global_batch_size=8, frames=2, seed=5, process_index=0, process_count=1
  )
  hosts = [
      pipeline_lib.Pipeline(
          source, global_batch_size=8, frames=2, seed=5, process_index=p, process_count=2
      )
      for p in range(2)
  ]
  steps = whole.steps_per_epoch
  assert steps == 6
  seen = [[], []]
  for _ in range(steps):
    full = next(whole)
    parts = [next(h) for h in hosts]
    for p, part in enumerate(parts):
      assert part["video"].shape[0] == 4
      seen[p].extend(part["index"].tolist())
    # The two local batches are exactly the rows of the single-host global batch.
    np.testing.assert_array_equal(np.concatenate([x["index"] for x in parts]), full["index"])
    np.testing.assert_array_equal(np.concatenate([x["video"] for x in parts]), full["video"])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(48))
  # The next epoch is a different permutation.
  assert hosts[0].local_indices(1, 0).tolist() != hosts[0].local_indices(0, 0).tolist()


@pytest.mark.parametrize("prefetch", [1, 3])
def test_resume_yields_the_same_stream(prefetch):
  def make():
    return pipeline_lib.Pipeline(
        fake_source(n=20),
        global_batch_size=6,
        frames=3,
        frame_stride=(1, 2),
        caption_dropout=0.3,
        seed=11,
        prefetch=prefetch,
        num_workers=2,
    )

  uninterrupted = collect(make(), 9)  # 3 steps per epoch: crosses two epoch boundaries
  first = make()
  collect(first, 4)
  state = first.get_state()
  assert state["epoch"] == 1 and state["position"] == 1
  first.close()
  resumed = make()
  resumed.set_state(dict(state))
  assert_batches_equal(collect(resumed, 5), uninterrupted[4:])
  # A state from another stream is refused.
  other = pipeline_lib.Pipeline(fake_source(n=20), global_batch_size=6, frames=3, seed=12)
  with pytest.raises(ValueError, match="seed"):
    other.set_state(state)


def test_finite_epochs_and_ragged_last_batch():
  stream = pipeline_lib.Pipeline(
      fake_source(n=10),
      global_batch_size=4,
      frames=2,
      shuffle=False,
      num_epochs=1,
      drop_remainder=False,
  )
  batches = list(stream)
  assert [len(b["caption"]) for b in batches] == [4, 4, 2]
  assert np.concatenate([b["index"] for b in batches]).tolist() == list(range(10))


def test_bad_arguments():
  with pytest.raises(ValueError, match="multiple"):
    pipeline_lib.Pipeline(fake_source(), global_batch_size=5, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="fewer than one"):
    pipeline_lib.Pipeline(fake_source(n=3), global_batch_size=4)
  with pytest.raises(ValueError, match="kind"):
    pipeline_lib.Pipeline(fake_source(), global_batch_size=4, kind="audio")


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from tests.test_data_pipeline import fake_source
    from vldm.data import pipeline as pipeline_lib
    assert jax.device_count() == 8, jax.devices()
    def make(**kw):
      return pipeline_lib.Pipeline(fake_source(n=48), global_batch_size=16, frames=3, seed=2, **kw)
    reference = [next(make()) for _ in range(1)][0]
    # 1. A NamedSharding over a 1-D data mesh.
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    batch = next(make(sharding=sharding))
    assert batch["caption"] == reference["caption"]
    for key in ("video", "fps", "index", "held_out"):
      array = batch[key]
      assert isinstance(array, jax.Array), key
      assert array.sharding == sharding, (key, array.sharding)
      assert array.shape == reference[key].shape
      shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start)
      assert len(shards) == 8
      for k, shard in enumerate(shards):
        assert shard.data.shape == (2,) + reference[key].shape[1:]
        np.testing.assert_array_equal(np.asarray(shard.data), reference[key][2 * k:2 * k + 2])
      np.testing.assert_array_equal(np.asarray(array), reference[key])
    # 2. A mesh + partition spec: batch over 'data' (4), replicated over 'model' (2).
    mesh2 = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    batch = next(make(mesh=mesh2, partition_spec=P("data")))
    video = batch["video"]
    assert video.sharding.is_equivalent_to(NamedSharding(mesh2, P("data")), video.ndim)
    assert {s.data.shape[0] for s in video.addressable_shards} == {4}
    np.testing.assert_array_equal(np.asarray(video), reference["video"])
    # 3. Default spec: the batch split over every mesh axis.
    video = next(make(mesh=mesh2))["video"]
    assert {s.data.shape[0] for s in video.addressable_shards} == {2}
    np.testing.assert_array_equal(np.asarray(video), reference["video"])
    # 4. A batch that does not split over the devices is refused clearly.
    try:
      pipeline_lib.Pipeline(fake_source(n=48), global_batch_size=12, sharding=sharding)
      raise SystemExit("expected a ValueError")
    except ValueError as e:
      assert "split" in str(e)
    print("SHARDED_OK")
""")


def test_global_batches_on_8_cpu_devices():
  env = dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=8",
      JAX_PLATFORMS="cpu",
      PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  result = subprocess.run(
      [sys.executable, "-c", SHARDED_SCRIPT],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0 and "SHARDED_OK" in result.stdout, result.stderr[-3000:]


# --- latent cache ------------------------------------------------------------------------------


def toy_encode_video(pixels):
  """[B, F, H, W, 3] -> [B, F, 2, 2, 4]: 2x2 average pool of a fixed channel mix."""
  b, f, h, w, _ = pixels.shape
  pooled = pixels.reshape(b, f, 2, h // 2, 2, w // 2, 3).mean(axis=(3, 5))
  return pooled @ np.arange(12, dtype=np.float32).reshape(3, 4)


def toy_encode_text(captions):
  """list of str -> {'text_embedding': [B, 3, 5], 'pooled': [B, 5]}."""
  codes = np.array([[len(c), sum(map(ord, c)) % 97, c.count("1")] for c in captions], np.float32)
  embedding = codes[:, :, None] * np.linspace(0.5, 1.5, 5, dtype=np.float32)
  return {"text_embedding": embedding, "pooled": embedding.sum(1)}


def test_latent_cache_roundtrip_through_the_pipeline(tmp_path):
  source = fake_source(n=22, height=8, width=8)
  directory = str(tmp_path / "cache")
  rows = [
      cache.build_latent_cache(
          source,
          directory,
          toy_encode_video,
          toy_encode_text,
          batch_size=6,
          frames=3,
          seed=4,
          shard_size=5,
          process_index=p,
          process_count=2,
      )
      for p in range(2)
  ]
  assert sum(rows) == 22
  cached = cache.LatentCache(directory)
  assert len(cached) == 22
  assert set(cached.fields) == {"latents", "text_embedding", "pooled", "fps", "held_out"}
  # Every row equals the encoders applied to the pipeline's clip of that example.
  pixels = pipeline_lib.Pipeline(
      source,
      global_batch_size=22,
      frames=3,
      seed=4,
      shuffle=False,
      num_epochs=1,
      process_index=0,
      process_count=1,
  )
  reference = next(pixels)
  expected = toy_encode_video(reference["video"])
  by_caption = {cached[i]["caption"]: cached[i] for i in range(len(cached))}
  assert len(by_caption) == 22
  for i, caption in enumerate(reference["caption"]):
    np.testing.assert_allclose(by_caption[caption]["latents"], expected[i], rtol=1e-6)
    np.testing.assert_allclose(
        by_caption[caption]["text_embedding"], toy_encode_text([caption])["text_embedding"][0]
    )
  # The training pipeline reads the cache like pixels, with caption dropout -> null embeddings.
  stream = pipeline_lib.Pipeline(
      cached, global_batch_size=11, caption_dropout=0.5, seed=1, process_index=0, process_count=1
  )
  batch = next(stream)
  assert batch["latents"].shape == (11, 3, 2, 2, 4) and batch["text_embedding"].shape == (11, 3, 5)
  assert "video" not in batch and batch["fps"].shape == (11,)
  null = toy_encode_text([""])
  dropped = [c == "" for c in batch["caption"]]
  assert 0 < sum(dropped) < 11
  for k, was_dropped in enumerate(dropped):
    if was_dropped:
      np.testing.assert_array_equal(batch["text_embedding"][k], null["text_embedding"][0])
      np.testing.assert_array_equal(batch["pooled"][k], null["pooled"][0])
    else:
      row = by_caption[batch["caption"][k]]
      np.testing.assert_array_equal(batch["latents"][k], row["latents"])


def test_motion_scores_reach_pixel_batches_and_the_cache(tmp_path):
  source = fake_source(n=8, height=8, width=8)
  for i, example in enumerate(source):
    example["motion"] = np.float32(0.01 * i)  # as the video-folder builder stores it
  batch = next(
      pipeline_lib.Pipeline(
          source,
          global_batch_size=4,
          frames=3,
          frame_stride=(1, 2),
          seed=2,
          process_index=0,
          process_count=1,
      )
  )
  assert batch["motion"].dtype == np.float32 and batch["motion"].shape == (4,)
  np.testing.assert_allclose(batch["motion"], 0.01 * batch["index"], rtol=1e-6)  # stride-free
  directory = str(tmp_path / "cache")
  cache.build_latent_cache(
      source,
      directory,
      toy_encode_video,
      toy_encode_text,
      batch_size=4,
      frames=3,
      process_index=0,
      process_count=1,
  )
  cached = cache.LatentCache(directory)
  assert "motion" in cached.fields
  stream = pipeline_lib.Pipeline(
      cached, global_batch_size=4, caption_dropout=1.0, seed=1, process_index=0, process_count=1
  )
  batch = next(stream)
  assert batch["motion"].dtype == np.float32 and batch["motion"].shape == (4,)
  by_index = {int(i): cached[int(i)] for i in batch["index"]}
  np.testing.assert_array_equal(
      batch["motion"], [by_index[int(i)]["motion"] for i in batch["index"]]
  )
  assert sorted(np.round(cached[i]["motion"] * 100) for i in range(8)) == list(range(8))
  # No source motion, no batch field.
  assert "motion" not in next(
      pipeline_lib.Pipeline(fake_source(n=4, height=8, width=8), global_batch_size=4, frames=3)
  )


def test_clip_start_windows_reach_batches_and_the_cache(tmp_path):
  """clip_start_prob: about that share of clips start their video (first frame 0), the rest are
  windows anywhere; batches and the latent cache carry which is which."""
  source = fake_source(n=64, length=12, height=8, width=8)
  stream = pipeline_lib.Pipeline(
      source,
      global_batch_size=64,
      frames=4,
      clip_start_prob=0.5,
      seed=3,
      process_index=0,
      process_count=1,
  )
  batch = next(stream)
  first = frame_values(batch["video"])[:, 0] // 10  # the source frame each clip starts at
  assert batch["clip_start"].dtype == np.bool_
  np.testing.assert_array_equal(batch["clip_start"], first == 0)
  assert 0.35 < batch["clip_start"].mean() < 0.75 and first.max() > 4
  assert "clip_start" not in next(pipeline_lib.Pipeline(source, global_batch_size=4, frames=4))
  directory = str(tmp_path / "cache")
  cache.build_latent_cache(
      source[:8],
      directory,
      toy_encode_video,
      toy_encode_text,
      batch_size=4,
      frames=4,
      clip_start_prob=1.0,
      process_index=0,
      process_count=1,
  )
  cached = cache.LatentCache(directory)
  batch = next(pipeline_lib.Pipeline(cached, global_batch_size=4, process_index=0, process_count=1))
  np.testing.assert_array_equal(batch["clip_start"], [True] * 4)
  with pytest.raises(ValueError, match="clip_start_prob must be in"):
    pipeline_lib.Pipeline(source, global_batch_size=4, clip_start_prob=1.5)


def test_incomplete_cache_is_refused(tmp_path):
  directory = str(tmp_path / "cache")
  cache.build_latent_cache(
      fake_source(n=6, height=8, width=8),
      directory,
      toy_encode_video,
      toy_encode_text,
      batch_size=2,
      frames=2,
      process_index=0,
      process_count=2,
  )
  with pytest.raises(FileNotFoundError, match="incomplete"):
    cache.LatentCache(directory)
  with pytest.raises(FileNotFoundError, match="not a latent cache"):
    cache.LatentCache(str(tmp_path))
