"""Latent and text-embedding cache: run frozen encoders once over a dataset, train on the result.

`build_latent_cache` streams a source through the `Pipeline` once, in order (no shuffling, no
caption dropout), calls `encode_video(pixels) -> latents` and `encode_text(captions) ->
embeddings` on each batch and writes numpy shards plus an index:

  DIR/meta.json                   what was encoded (kind, frames, resolution, ...), process count
  DIR/null_text.npz               encode_text(['']): the caption-dropout replacement
  DIR/p{P}-s{S}.{field}.npy       shard S of process P, one file per field
  DIR/p{P}-s{S}.captions.json     its captions
  DIR/index.p{P}.json             written last by process P: its shards and row counts

Encoders return an array (stored as 'latents' / 'text_embedding') or a dict of arrays (stored
under their keys). `LatentCache(DIR)` is a random-access source of {fields..., 'caption', 'fps',
'motion', 'held_out', 'clip_start'} (the last three when the source has them) with
`null_text`, so later stages read it through the same Pipeline as pixels.

Several captions (max_captions K > 1; see vldm.data.pipeline): each row keeps its first K
captions, repeated in turn up to K, and encode_text sees all of them, so every text field (the
keys of null_text) is [K, ...] per row; the field 'caption_weights' float32 [K] holds their
probabilities from `caption_weights` (0 for the repeats), the captions file a list of K captions
per row, and meta.json max_captions and caption_weights. The Pipeline draws a row of the text
fields at read time, and refuses a cache built with another max_captions. With K = 1 the layout is
the single-caption one, unchanged (no such keys).
"""

import glob
import json
import os

import numpy as np

from vldm.data import pipeline as pipeline_lib

_META = "meta.json"
_NULL_TEXT = "null_text.npz"


def _as_fields(output, default_name):
  if isinstance(output, dict):
    return {k: np.asarray(v) for k, v in output.items()}
  return {default_name: np.asarray(output)}


class _ShardWriter:
  """Buffers rows of one process and writes them as fixed-size shards."""

  def __init__(self, directory, process_index, shard_size):
    self.directory, self.process_index, self.shard_size = directory, process_index, shard_size
    self.buffer, self.shards = {}, []

  def add(self, fields, captions):
    for key, value in fields.items():
      self.buffer.setdefault(key, []).extend(value)
    self.buffer.setdefault("captions", []).extend(captions)
    while len(self.buffer["captions"]) >= self.shard_size:
      self.flush(self.shard_size)

  def flush(self, count=None):
    count = len(self.buffer.get("captions", [])) if count is None else count
    if not count:
      return
    name = f"p{self.process_index}-s{len(self.shards):05d}"
    for key, rows in self.buffer.items():
      if key == "captions":
        with open(
            os.path.join(self.directory, f"{name}.captions.json"), "w", encoding="utf-8"
        ) as f:
          json.dump(rows[:count], f)
      else:
        np.save(os.path.join(self.directory, f"{name}.{key}.npy"), np.stack(rows[:count]))
      self.buffer[key] = rows[count:]
    self.shards.append({"name": name, "count": count})


def build_latent_cache(
    source,
    directory,
    encode_video,
    encode_text,
    *,
    batch_size=32,
    kind="video",
    frames=8,
    frame_stride=1,
    resolution=None,
    seed=0,
    shard_size=4096,
    process_index=None,
    process_count=None,
    clip_start_prob=0.0,
    max_captions=1,
    caption_weights=None,
):
  """Encodes every example of `source` once; returns the number of rows this process wrote.

  Each process encodes its rows of every batch (pass process_index/count in a multi-host job);
  pixels reach `encode_video` as the pipeline yields them (float32 in [-1, 1], [B, F, H, W, 3]
  or [B, H, W, 3]). Clip sampling is seeded by `seed`, so the cached clips are reproducible;
  with `clip_start_prob` (see Pipeline) each row also stores whether its clip starts its video.
  With `max_captions` > 1 every row's candidate captions are encoded (see the module docstring).
  """
  stream = pipeline_lib.Pipeline(
      source,
      global_batch_size=batch_size,
      kind=kind,
      frames=frames,
      frame_stride=frame_stride,
      resolution=resolution,
      caption_dropout=0.0,
      seed=seed,
      shuffle=False,
      num_epochs=1,
      drop_remainder=False,
      process_index=process_index,
      process_count=process_count,
      clip_start_prob=clip_start_prob,
      max_captions=max_captions,
      caption_weights=caption_weights,
      sample_captions=False,
  )
  several = stream.max_captions > 1
  os.makedirs(directory, exist_ok=True)
  index_path = os.path.join(directory, f"index.p{stream.process_index}.json")
  if os.path.exists(index_path):
    os.remove(index_path)  # a partial rebuild must not look complete
  if stream.process_index == 0:
    meta = dict(
        kind=kind,
        frames=frames,
        frame_stride=frame_stride,
        resolution=resolution,
        seed=seed,
        num_source_examples=len(source),
        process_count=stream.process_count,
    )
    if several:  # absent for one caption: such caches keep the single-caption layout
      meta.update(max_captions=stream.max_captions, caption_weights=stream.caption_weights)
    with open(os.path.join(directory, _META), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1)
    np.savez(
        os.path.join(directory, _NULL_TEXT),
        **{k: v[0] for k, v in _as_fields(encode_text([""]), "text_embedding").items()},
    )
  writer = _ShardWriter(directory, stream.process_index, shard_size)
  rows = 0
  for batch in stream:
    fields = _as_fields(encode_video(batch[kind]), "latents")
    if several:
      fields.update(_encode_candidates(encode_text, batch["caption"], stream.max_captions))
      fields["caption_weights"] = batch["caption_weights"]
    else:
      fields.update(_as_fields(encode_text(batch["caption"]), "text_embedding"))
    fields["fps"] = batch["fps"]
    if "motion" in batch:
      fields["motion"] = batch["motion"]
    for key in ("held_out", "clip_start"):
      if key in batch:
        fields[key] = batch[key]
    for key, value in fields.items():
      if len(value) != len(batch["caption"]):
        raise ValueError(
            f"Encoder output {key!r} has {len(value)} rows for a batch of "
            f"{len(batch['caption'])}; encoders must map rows one to one."
        )
    writer.add(fields, batch["caption"])
    rows += len(batch["caption"])
  writer.flush()
  stream.close()
  with open(index_path, "w", encoding="utf-8") as f:
    json.dump({"shards": writer.shards}, f)
  return rows


def _encode_candidates(encode_text, captions, k):
  """Text fields [B, k, ...] of B rows of k candidate captions, encoded in one call."""
  flat = [c for row in captions for c in row]
  fields = _as_fields(encode_text(flat), "text_embedding")
  for key, value in fields.items():
    if len(value) != len(flat):
      raise ValueError(
          f"Encoder output {key!r} has {len(value)} rows for {len(flat)} captions; "
          "encoders must map rows one to one."
      )
  return {key: value.reshape((len(captions), k) + value.shape[1:]) for key, value in fields.items()}


class LatentCache:
  """Random-access source over a cache written by `build_latent_cache` (memory-mapped)."""

  def __init__(self, directory):
    meta_path = os.path.join(directory, _META)
    if not os.path.exists(meta_path):
      raise FileNotFoundError(
          f"{directory} is not a latent cache (no {_META}); build it with "
          "vldm.data.cache.build_latent_cache."
      )
    with open(meta_path, encoding="utf-8") as f:
      self.meta = json.load(f)
    self.directory = directory
    self.shards = []
    for p in range(self.meta["process_count"]):
      path = os.path.join(directory, f"index.p{p}.json")
      if not os.path.exists(path):
        raise FileNotFoundError(
            f"Latent cache {directory} is incomplete: process {p} of "
            f"{self.meta['process_count']} has not finished ({path} missing)."
        )
      with open(path, encoding="utf-8") as f:
        self.shards.extend(json.load(f)["shards"])
    self.starts = np.cumsum([0] + [s["count"] for s in self.shards])
    first = self.shards[0]["name"] if self.shards else None
    self.fields = sorted(
        os.path.basename(p)[len(first) + 1 : -len(".npy")]
        for p in glob.glob(os.path.join(directory, f"{first}.*.npy"))
    )
    with np.load(os.path.join(directory, _NULL_TEXT)) as null:
      self.null_text = {k: null[k] for k in null.files}
    # The Pipeline checks these against its own (a text field's rows are the candidates).
    self.max_captions = int(self.meta.get("max_captions", 1))
    self.caption_weights = dict(self.meta.get("caption_weights", {}))
    self._open = {}

  def __len__(self):
    return int(self.starts[-1])

  def _shard(self, s):
    if s not in self._open:
      name = self.shards[s]["name"]
      arrays = {
          k: np.load(os.path.join(self.directory, f"{name}.{k}.npy"), mmap_mode="r")
          for k in self.fields
      }
      with open(os.path.join(self.directory, f"{name}.captions.json"), encoding="utf-8") as f:
        arrays["caption"] = json.load(f)
      self._open[s] = arrays
    return self._open[s]

  def __getitem__(self, index):
    if not 0 <= index < len(self):
      raise IndexError(f"Index {index} out of range for a cache of {len(self)} rows.")
    s = int(np.searchsorted(self.starts, index, side="right")) - 1
    shard, row = self._shard(s), index - int(self.starts[s])
    example = {k: (v[row] if k == "caption" else np.array(v[row])) for k, v in shard.items()}
    if self.max_captions > 1:  # the row's candidates; 'caption' is the first, as in pixel rows
      example["captions"] = example["caption"]
      example["caption"] = example["captions"][0]
    return example
