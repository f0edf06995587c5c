"""Look at the training data: `python -m vldm.data --config FILE[:args] --batches N --out DIR`.

Streams N batches of the config's training data (`config.data`) through the input pipeline and
writes DIR/summary.json (caption -> count, clips_per_s, ...) and DIR/batch.gif (the first batch
as a grid). Overrides as usual: `--config.data.resolution=64`.
"""
import collections
import json
import os
import time

from absl import app
from absl import flags
import numpy as np
from ml_collections import config_flags

from vldm import video_io
from vldm.train import config_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python file whose get_config(arg) returns a ConfigDict with a .data field.")
_BATCHES = flags.DEFINE_integer("batches", 4, "Number of batches to stream.")
_OUT = flags.DEFINE_string("out", None, "Output folder for summary.json and batch.gif.")
_SPLIT = flags.DEFINE_string("split", None, "Split to read (default: config.data.train_split).")


def summarize(data_config, batches, out, split=None):
  """Streams `batches` batches and writes the summary and the grid; returns the summary dict."""
  from vldm.data import sources  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  t0 = time.perf_counter()
  source = sources.make_source(data_config, split or data_config.train_split)
  build_s = time.perf_counter() - t0
  stream = sources.make_pipeline(data_config, split, source=source, process_index=0,
                                 process_count=1)
  captions = collections.Counter()
  first = None
  t0 = time.perf_counter()
  for _ in range(batches):
    batch = next(stream)
    first = batch if first is None else first
    captions.update(batch["caption"])
  seconds = time.perf_counter() - t0
  stream.close()
  kind = data_config.kind
  from vldm.data import transforms  # pylint: disable=g-import-not-at-top
  frames = video_io.tile(transforms.denormalize(np.asarray(first[kind])))
  fps = float(np.mean(first["fps"])) if "fps" in first else 8.0
  video_io.write_gif(frames, os.path.join(out, "batch.gif"), fps=max(fps, 1e-3))
  clips = batches * data_config.batch_size
  summary = {
      "name": data_config.name, "kind": kind, "split": split or data_config.train_split,
      "num_examples": len(source), "batches": batches, "batch_shape": list(first[kind].shape),
      "clips": clips, "seconds": seconds, "clips_per_s": clips / max(seconds, 1e-9),
      "source_seconds": build_s, "captions": dict(captions.most_common()),
      "first_batch_captions": list(first["caption"]),
      "fps": [float(x) for x in np.asarray(first["fps"])],
      "value_range": [float(first[kind].min()), float(first[kind].max())],
  }
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None or "data" not in config:
    raise app.UsageError("--config must name a file whose get_config() has a .data field.")
  if not _OUT.value:
    raise app.UsageError("--out is required.")
  if _BATCHES.value < 1:
    raise app.UsageError("--batches must be >= 1.")
  summary = summarize(config.data, _BATCHES.value, _OUT.value, _SPLIT.value)
  print(json.dumps({k: summary[k] for k in ("name", "batch_shape", "clips_per_s", "captions")},
                   indent=1))


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
