"""Aggregates of oracle records (`oracle.judge_all`): accuracies, seen vs held-out, a report table.

  summary = summarize(records)
  summary['seen']['all'], summary['held_out']['all'], summary['consistency']
  print(markdown_table(summary))
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

ATTRIBUTES = ("color", "shape", "direction", "all")
GROUPS = ("seen", "held_out", "overall")


def _group(records: Sequence[dict]) -> dict:
  if not records:
    return dict(clips=0, consistency=float("nan"), **{a: float("nan") for a in ATTRIBUTES})
  out = {a: float(np.mean([r["correct"][a] for r in records])) for a in ATTRIBUTES}
  out["consistency"] = float(np.mean([r["consistency"] for r in records]))
  out["clips"] = len(records)
  return out


def summarize(records: Sequence[dict]) -> dict:
  """{'seen' | 'held_out' | 'overall': {color, shape, direction, all, consistency, clips},
  'consistency': the overall mean, 'prompts': correct clips per prompt}."""
  groups = dict(seen=_group([r for r in records if not r["held_out"]]),
                held_out=_group([r for r in records if r["held_out"]]),
                overall=_group(records))
  per_prompt = {}
  for r in records:
    hits, total = per_prompt.get(r["prompt"], (0, 0))
    per_prompt[r["prompt"]] = (hits + int(r["correct"]["all"]), total + 1)
  return dict(groups, consistency=groups["overall"]["consistency"], prompts=per_prompt)


def markdown_table(summary: dict) -> str:
  """Accuracy per attribute and group, and temporal consistency, as a Markdown table."""
  lines = ["| compositions | clips | color | shape | direction | all attributes | consistency |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for group in GROUPS:
    g = summary[group]
    cells = [f"{100 * g[a]:.1f}%" for a in ATTRIBUTES]
    lines.append(f"| {group.replace('_', '-')} | {g['clips']} | " + " | ".join(cells)
                 + f" | {g['consistency']:.3f} |")
  return "\n".join(lines)
