"""Run logs on process 0: `WORKDIR/metrics.jsonl` and TensorBoard events.

TensorBoard events are written with `tf.summary.write` (TensorFlow is a dependency for the data
pipeline anyway; the `tensorboard` package, which `tf.summary.scalar` needs, is not). Each value is
tagged as the scalars plugin's, which is what `tf.summary.scalar` would write. TensorFlow is
imported on first use and kept off the accelerators.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Mapping

from etils import epath


def _tensorflow():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # JAX owns the accelerators
  return tf


def _scalar_metadata():
  from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
  return summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


class MetricWriter:
  """Appends one JSON object per logged step; mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = epath.Path(workdir) / "metrics.jsonl"
    # Object stores (gs://...) cannot append: there the file is rewritten whole at each log.
    self._rewrite = "://" in os.fspath(workdir)
    self._lines = []
    self._tb = None
    if enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if self._rewrite and self.path.exists():
        self._lines = self.path.read_text().splitlines(keepends=True)
      if tensorboard:
        self._tb = _tensorflow().summary.create_file_writer(
            os.fspath(epath.Path(workdir) / "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: _json_number(v) for k, v in scalars.items()})
    line = json.dumps(record) + "\n"
    if self._rewrite:
      self._lines.append(line)
      self.path.write_text("".join(self._lines))
    else:
      with self.path.open("a") as f:
        f.write(line)
    if self._tb is not None:
      tf = _tensorflow()
      with self._tb.as_default(step=int(step)):
        for name, value in scalars.items():
          tf.summary.write(name, tf.constant(float(value), tf.float32),
                           metadata=_scalar_metadata())
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _json_number(value) -> float | str:
  value = float(value)
  return value if math.isfinite(value) else str(value)  # 'nan' / 'inf' stay readable in JSON


def read_metrics(workdir: str) -> list[dict]:
  """The records of `WORKDIR/metrics.jsonl` (for tests and notebooks)."""
  text = (epath.Path(workdir) / "metrics.jsonl").read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]


class QuietOrbax(logging.Filter):
  """Drops Orbax's INFO chatter (a few lines per array and save) from a run's log."""

  def filter(self, record):
    return record.levelno > logging.INFO or "/orbax/" not in record.pathname
