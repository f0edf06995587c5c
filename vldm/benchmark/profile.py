"""Where vldm and diffusers spend a case's time, op by op and by kind of work.

  python -m vldm.benchmark.profile --suite cpu_small --cases train_step

builds the case (the same weights and inputs as the benchmark), profiles the compiled JAX program
with `jax.profiler` and the PyTorch reference with `torch.profiler`, and prints both by category
(convolution, temporal convolution, dense layers, attention, norms, activations, copies,
optimizer; forward / backward apart) side by side, then the slowest JAX ops with the model code
that produced them. In Python:

  ops = op_profile(runner.jax_fn, runner.compiled.as_text(), repeats=3)
  print(format_profile(ops))

Each XLA op's trace events are summed (per call, over all threads) and attributed to the model
code through the op's `op_name` metadata in the compiled HLO text ("convolution in
up_blocks_0/resnets_1/spatial_res_block/conv1: 11 ms").
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Callable, Optional, Sequence

import jax

_OP_NAME = re.compile(r'op_name="([^"]*)"')
_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\S+) ([\w\-]+)\(")
# Runtime bookkeeping events of the CPU / GPU runtimes, not ops.
_NOT_OPS = re.compile(r"^(ThunkExecutor|PjitFunction|CommonPjRt|Handle inputs|ParseArguments|\$|"
                      r"end: |Execute|TfrtCpu|PjRt)")
# Flax module names of vldm's layers (they mirror the diffusers state-dict keys).
_DENSE = re.compile(r"^(to_q|to_k|to_v|to_out_0|proj|proj_in|proj_out|net_2|linear_\d|"
                    r"time_emb_proj|q_proj|k_proj|v_proj|out_proj|fc\d)$")
_CONV = re.compile(r"^(conv\d?|conv_in|conv_out|conv_shortcut|quant_conv|post_quant_conv|"
                   r"time_conv_out)$")
_TEMPORAL_CONV_PARENTS = ("temporal_res_block",)
CATEGORIES = ("convolution", "temporal convolution", "dense layers", "attention", "norms",
              "activations", "elementwise / other", "copy / transpose", "optimizer / loss")


@dataclasses.dataclass
class OpTime:
  name: str
  category: str  # the kind of op: convolution, dot (incl. library fusions), elementwise fusion, …
  ms: float  # per call, summed over threads
  count: int
  shape: str = ""
  source: str = ""  # the JAX op_name (model path) of the op


def _hlo_index(hlo_text: str) -> dict:
  """op name → (result shape, opcode / fusion kind, op_name metadata)."""
  index = {}
  for line in hlo_text.splitlines():
    m = _DEFINITION.match(line)
    if not m:
      continue
    name, shape, opcode = m.groups()
    kind = re.search(r"kind=(k\w+)", line)
    source = _OP_NAME.search(line)
    index[name] = (shape, opcode + (f":{kind.group(1)}" if kind else ""),
                   source.group(1) if source else "")
  return index


def _op_kind(name: str, opcode: str) -> str:
  if "convolution" in opcode or name.startswith("conv"):
    return "convolution"
  if opcode.startswith("dot") or name.startswith(("dot", "ynn_fusion", "xnn_fusion",
                                                    "onednn", "gemm", "cublas", "cudnn")):
    return "dot / library call"
  if "transpose" in name or "copy" in name:
    return "copy / transpose"
  if "reduce" in name:
    return "reduction"
  return "elementwise / other fusion"


def _trace_events(directory: str) -> list:
  files = glob.glob(os.path.join(directory, "**", "*perfetto_trace.json.gz"), recursive=True)
  if not files:
    raise RuntimeError(f"jax.profiler wrote no perfetto trace under {directory}.")
  with gzip.open(sorted(files)[-1]) as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def op_profile(fn: Callable[[], object], hlo_text: str = "", repeats: int = 3,
               directory: Optional[str] = None) -> list[OpTime]:
  """Runs `fn` (which blocks until done) `repeats` times under the profiler; ops by time, per call.

  `hlo_text`: the compiled program's `as_text()`, to attribute ops to model code (and to keep
  only its ops: runtime bookkeeping events are dropped).
  """
  index = _hlo_index(hlo_text)
  directory = directory or tempfile.mkdtemp(prefix="vldm_profile_")
  fn()  # keep first-call work out of the trace
  jax.profiler.start_trace(directory, create_perfetto_trace=True)
  try:
    for _ in range(repeats):
      fn()
  finally:
    jax.profiler.stop_trace()
  total, count = collections.Counter(), collections.Counter()
  for event in _trace_events(directory):
    name = event.get("name", "")
    if event.get("ph") != "X" or _NOT_OPS.match(name) or (index and name not in index):
      continue
    total[event["name"]] += event.get("dur", 0.0)
    count[event["name"]] += 1
  out = []
  for name, micros in total.items():
    shape, opcode, source = index.get(name, ("", "", ""))
    out.append(OpTime(name, _op_kind(name, opcode), micros / 1e3 / repeats,
                      count[name] // repeats, shape, source))
  return sorted(out, key=lambda op: -op.ms)


def phase(op: OpTime) -> str:
  """'backward' for ops of the gradient (JAX's transpose(jvp(...))), else 'forward'."""
  return "backward" if "transpose(" in op.source else "forward"


def category(op: OpTime) -> str:
  """The kind of model work an op does (one of CATEGORIES), from its model path and kind."""
  parts = op.source.split("/")
  modules = [p for p in parts if not re.match(r"^(jit|jvp|transpose|vmap)\(", p)]
  in_model = any(re.search(r"(^|\()[A-Z]\w*\)*$", p) for p in parts)
  if not in_model:
    return "copy / transpose" if op.category == "copy / transpose" else "optimizer / loss"
  for i, module in enumerate(modules):
    if _CONV.match(module):
      temporal = module == "time_conv_out" or (i and modules[i - 1] in _TEMPORAL_CONV_PARENTS)
      return "temporal convolution" if temporal else "convolution"
    if re.match(r"^attn\d$", module):
      inner = modules[i + 1] if i + 1 < len(modules) else ""
      if not _DENSE.match(inner):
        return "attention"
    if "norm" in module:
      return "norms"
    if _DENSE.match(module):
      return "dense layers"
    if module == "net_0":  # GEGLU / GELU: its `proj` is a dense layer, the rest the activation
      inner = modules[i + 1] if i + 1 < len(modules) else ""
      return "dense layers" if inner == "proj" else "activations"
  if re.search(r"(erfc?|gelu|silu|tanh|logistic|exp)$", op.source) or "jit(silu)" in op.source:
    return "activations"
  if op.category == "copy / transpose":
    return "copy / transpose"
  return "elementwise / other"


def by_category(ops: Sequence[OpTime], split_phase: bool = True) -> dict:
  """ms per call by (category, phase) — or by category alone."""
  totals = collections.Counter()
  for op in ops:
    totals[(category(op), phase(op)) if split_phase else category(op)] += op.ms
  return dict(totals)


def by_source(ops: Sequence[OpTime], pattern: str = r"(?<=/)(\w+)(?=/[^/]*$)") -> dict:
  """Time summed by a part of the op's model path (default: the innermost module name)."""
  totals = collections.Counter()
  for op in ops:
    m = re.search(pattern, op.source)
    totals[m.group(1) if m else "(other)"] += op.ms
  return dict(totals.most_common())


def format_profile(ops: Sequence[OpTime], top: int = 20) -> str:
  total = sum(op.ms for op in ops) or 1.0
  lines = [f"JAX op time per call, all threads: {total:.1f} ms ({len(ops)} ops)"]
  for (cat, ph), ms in sorted(by_category(ops).items(), key=lambda kv: -kv[1]):
    lines.append(f"  {cat + ' (' + ph + ')':40s} {ms:9.2f} ms {100 * ms / total:5.1f}%")
  lines.append(f"top {top} ops:")
  for op in list(ops)[:top]:
    where = op.source.split("/", 1)[-1] if op.source else ""
    lines.append(f"  {op.ms:8.2f} ms ×{op.count:<3d} {op.name:32s} {op.shape[:36]:36s} "
                 f"{where[-90:]}")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------- torch


def torch_category(name: str) -> str:
  """The kind of work of a PyTorch (aten) op, in the JAX categories' terms."""
  n = name.lower()
  if "conv3d" in n:
    return "temporal convolution"
  if "conv" in n:
    return "convolution"
  if "scaled_dot_product" in n or "flash_attention" in n or "bmm" in n or "baddbmm" in n:
    return "attention"
  if re.search(r"aten::(mm|addmm|linear|matmul)$", n):
    return "dense layers"
  if "norm" in n:
    return "norms"
  if re.search(r"gelu|silu|sigmoid|erf|tanh", n):
    return "activations"
  if re.search(r"copy|cat|clone|contiguous|transpose|permute|_to_copy", n):
    return "copy / transpose"
  return "elementwise / other"


def torch_profile(fn: Callable[[], object], repeats: int = 3) -> list[dict]:
  """Self time per call of each PyTorch op of `fn` (CPU), split by phase: 'forward', 'backward'
  (run by the autograd engine) and 'optimizer' (inside an optimizer's step).

  Returns [{name, phase, category, ms, count}], slowest first.
  """
  from torch import profiler  # pylint: disable=g-import-not-at-top
  fn()
  with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(repeats):
      fn()
  totals, counts = collections.Counter(), collections.Counter()
  for event in prof.events():
    if event.name.startswith(("Optimizer.", "autograd::engine", "ProfilerStep")):
      if not event.name.startswith("Optimizer.step"):
        continue
    ancestors, parent = [], event.cpu_parent
    while parent is not None:
      ancestors.append(parent.name)
      parent = parent.cpu_parent
    if any(a.startswith("Optimizer.step") for a in ancestors + [event.name]):
      where = "optimizer"
    elif any(a.startswith("autograd::engine") for a in ancestors):
      where = "backward"
    else:
      where = "forward"
    key = (event.name, where)
    totals[key] += event.self_cpu_time_total / 1e3 / repeats
    counts[key] += 1
  out = [dict(name=name, phase=where,
              category="optimizer / loss" if where == "optimizer" else torch_category(name),
              ms=ms, count=counts[(name, where)] // repeats)
         for (name, where), ms in totals.items()]
  return sorted(out, key=lambda r: -r["ms"])


def compare(jax_ops: Sequence[OpTime], torch_ops: Sequence[dict]) -> list[dict]:
  """Rows {category, phase, jax_ms, torch_ms} (the optimizer as one row), largest first."""
  rows = collections.defaultdict(lambda: [0.0, 0.0])
  for (cat, ph), ms in by_category(jax_ops).items():
    rows[(cat, "update" if cat == "optimizer / loss" else ph)][0] += ms
  for op in torch_ops:
    ph = "update" if op["phase"] == "optimizer" else op["phase"]
    rows[(op["category"], ph)][1] += op["ms"]
  out = [dict(category=c, phase=p, jax_ms=j, torch_ms=t) for (c, p), (j, t) in rows.items()]
  return sorted(out, key=lambda r: -(r["jax_ms"] + r["torch_ms"]))


def format_comparison(rows: Sequence[dict]) -> str:
  jax_total = sum(r["jax_ms"] for r in rows) or 1.0
  torch_total = sum(r["torch_ms"] for r in rows) or 1.0
  lines = ["| work | phase | vldm (ms) | share | diffusers (ms) | share | vldm / diffusers |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    ratio = f"{r['jax_ms'] / r['torch_ms']:.2f}" if r["torch_ms"] > 0.05 else "-"
    lines.append(f"| {r['category']} | {r['phase']} | {r['jax_ms']:.1f} "
                 f"| {100 * r['jax_ms'] / jax_total:.0f}% | {r['torch_ms']:.1f} "
                 f"| {100 * r['torch_ms'] / torch_total:.0f}% | {ratio} |")
  lines.append(f"| total (op time) | | {jax_total:.1f} | | {torch_total:.1f} | "
               f"| {jax_total / torch_total:.2f} |")
  return "\n".join(lines)


def profile_case(case, repeats: int = 3, torch_threads: int = 1) -> dict:
  """Builds a benchmark case and profiles both sides; returns {jax_ops, torch_ops, comparison}."""
  runner = case.build()
  if runner.compiled is None:
    raise ValueError(f"Case {case.name!r} exposes no compiled JAX program to profile.")
  jax_ops = op_profile(runner.jax_fn, runner.compiled.as_text(), repeats=repeats)
  torch_ops = []
  if runner.reference_fn is not None:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(torch_threads)
    torch_ops = torch_profile(runner.reference_fn, repeats=repeats)
  return dict(jax_ops=jax_ops, torch_ops=torch_ops, comparison=compare(jax_ops, torch_ops))


def main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top
  from vldm.benchmark import suites  # pylint: disable=g-import-not-at-top
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--suite", default="cpu_small")
  parser.add_argument("--cases", default="train_step", help="regex of case names")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--torch_threads", type=int, default=1)
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--out", default=None, help="JSON file for the per-op and category tables")
  args = parser.parse_args(argv)
  results = {}
  for case in suites.get_suite(args.suite, args.cases):
    result = profile_case(case, args.repeats, args.torch_threads)
    print(f"== {case.name}: {case.what}")
    print(format_comparison(result["comparison"]))
    print(format_profile(result["jax_ops"], top=args.top))
    print("top diffusers ops (self time):")
    for op in result["torch_ops"][:args.top]:
      print(f"  {op['ms']:8.2f} ms ×{op['count']:<4d} {op['phase']:9s} {op['name']}")
    results[case.name] = dict(comparison=result["comparison"],
                              jax_ops=[dataclasses.asdict(o) for o in result["jax_ops"]],
                              torch_ops=result["torch_ops"])
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
