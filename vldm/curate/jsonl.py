"""JSON-lines files the curator rewrites whole: written to a temporary name, then renamed, so a
killed run leaves the old file or the new one, never half of one."""

import json
import os


def write_atomic(path, rows):
  """One JSON object a line (keys sorted, so reruns write identical bytes)."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, sort_keys=True) + "\n")
  os.replace(tmp, path)
