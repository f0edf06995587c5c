"""Ahead-of-time compilation of a stage's training step (and SVD sampling) for a TPU topology.

  python -m vldm.train --config configs/video_ldm.py:stage=video,preset=sd15 \
      --compile_only --topology v5p-8 [--num_slices 2] [--search]

builds the sharded state and step exactly as `trainer.train_and_evaluate` does (the task, its mesh
rules, shardings, remat policy and dtypes: `state.StateBuilder.make_train_step`), but from shapes
alone: the parameters from `jax.eval_shape`, the frozen models from `task.abstract_frozen()`, the
batch from `task.abstract_batch()`. No weights, data or accelerator are needed, only libtpu; the
mesh is made of the topology's compile-only devices (`vldm.train.topology`). It reports per chip:
the compiled program's memory (`memory_analysis()`: arguments, outputs, temporaries, less what
donation aliases, plus code) against the chip's HBM, the compiled FLOPs (`cost_analysis()`, summed
over chips) beside the task's analytic count (`task.step_flops`: no recomputation, so the two
agree without remat), XLA's roofline time estimate (`optimal_seconds`) and the bytes the program's
collectives produce, by kind, read off the compiled HLO.

`search` compiles the choices that matter: the mesh's data × fsdp split of the chips, the remat
policy and the per-chip batch, and returns those that fit, fastest-looking first (least estimated
time per example), as config overrides to paste. The step fits when its total is at most
FIT_FRACTION of HBM (the runtime needs some room of its own).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from vldm.train import sharding as sharding_lib
from vldm.train import state as state_lib
from vldm.train import tasks as tasks_lib
from vldm.train import topology as topology_lib

FIT_FRACTION = 0.95
# Remat policies (vldm.models.unet_blocks.REMAT_POLICIES), least recomputation first.
REMAT_ORDER = ("none", "save_conv_and_attention", "dots_saveable", "full")
BATCHES = (1, 2, 4, 8, 16, 32, 64)
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_LINE = re.compile(
    r"=\s*(\([^=]*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\("
)
_ARRAY = re.compile(
    r"\b(pred|s4|s8|s16|s32|s64|u4|u8|u16|u32|u64|f8e\w+|bf16|f16|f32|f64)\[([\d,]*)\]"
)
_BITS = {"pred": 8, "bf16": 16, "f16": 16, "f32": 32, "f64": 64}


@dataclasses.dataclass
class Report:
  """One compiled program on one topology. Bytes are per chip; FLOPs per step over all chips."""

  what: str  # 'train_step', 'sample', 'decode'
  topology: str
  chip: str
  chips: int
  mesh: dict
  remat_policy: str
  batch_per_chip: int
  hbm_bytes: int
  attention: Optional[str] = None  # the config's attention_implementation (None: JAX's choice)
  argument_bytes: int = 0
  output_bytes: int = 0
  temp_bytes: int = 0
  alias_bytes: int = 0
  code_bytes: int = 0
  compiled_flops: Optional[float] = None
  analytic_flops: Optional[float] = None
  optimal_seconds: Optional[float] = None
  collective_bytes: dict = dataclasses.field(default_factory=dict)
  compile_seconds: float = 0.0
  error: Optional[str] = None

  @property
  def total_bytes(self) -> int:
    return (
        self.argument_bytes
        + self.output_bytes
        - self.alias_bytes
        + self.temp_bytes
        + self.code_bytes
    )

  @property
  def fits(self) -> bool:
    return self.error is None and self.total_bytes <= FIT_FRACTION * self.hbm_bytes

  @property
  def seconds_per_example(self) -> Optional[float]:
    """XLA's roofline estimate of the step over the examples it processes (per chip)."""
    if self.optimal_seconds is None:
      return None
    return self.optimal_seconds / self.batch_per_chip

  def overrides(self) -> str:
    """The config overrides that select this configuration."""
    mesh = tuple(self.mesh.items())
    out = (
        f'--config.mesh="{mesh}" --config.remat_policy={self.remat_policy} '
        f"--config.batch_size={self.batch_per_chip * self.chips}"
    )
    if self.attention:
      out += f" --config.attention_implementation={self.attention}"
    return out

  def summary(self) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    lines = [
        f"{self.what} on {self.topology}: mesh {self.mesh}, remat {self.remat_policy}, batch "
        f"{self.batch_per_chip} per chip ({self.batch_per_chip * self.chips} in all)"
        + (f", attention {self.attention}" if self.attention else "")
    ]
    if self.error:
      if self.total_bytes:  # XLA's out-of-memory message says how much the program needs
        lines.append(
            f"  DOES NOT FIT: needs {gib(self.total_bytes)} per chip of "
            f"{gib(self.hbm_bytes)} HBM ({self.chip})"
        )
      return "\n".join(lines + [f"  did not compile: {self.error}"])
    lines.append(
        f"  memory per chip: arguments {gib(self.argument_bytes)}, outputs {gib(self.output_bytes)}"
        f", temporaries {gib(self.temp_bytes)}, aliased (donated) {gib(self.alias_bytes)}, code "
        f"{gib(self.code_bytes)}; total {gib(self.total_bytes)} of {gib(self.hbm_bytes)} HBM "
        f"({self.chip}): {'fits' if self.fits else 'DOES NOT FIT'}"
    )
    if self.compiled_flops is not None:
      flops = (
          f"  FLOPs per step: compiled {self.compiled_flops / 1e12:.2f} T"
          if self.what == "train_step"  # XLA's cost analysis counts a loop body once
          else f"  FLOPs: compiled {self.compiled_flops / 1e12:.2f} T (a loop's body counted once)"
      )
      if self.analytic_flops:
        flops += (
            f", analytic {self.analytic_flops / 1e12:.2f} T (compiled / analytic "
            f"{self.compiled_flops / self.analytic_flops:.3f}; remat recomputes)"
        )
      lines.append(flops)
    if self.optimal_seconds is not None:
      lines.append(f"  XLA's roofline estimate: {self.optimal_seconds * 1e3:.1f} ms per step")
    if self.collective_bytes:
      lines.append(
          "  collectives per chip per step: "
          + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(self.collective_bytes.items()))
      )
    lines.append(f"  compiled in {self.compile_seconds:.0f} s")
    return "\n".join(lines)

  def row(self) -> dict:
    """JSON-ready fields (sizes in bytes)."""
    out = dataclasses.asdict(self)
    out.update(total_bytes=self.total_bytes, fits=self.fits, overrides=self.overrides())
    return out


def collective_bytes(hlo_text: str) -> dict:
  """{kind: bytes} of the results of the collectives in a compiled module's HLO text (the async
  '-start' forms count once; a tuple counts its largest array, the gathered or reduced one)."""
  out = {}
  for match in _COLLECTIVE_LINE.finditer(hlo_text):
    shape, kind = match.groups()
    sizes = []
    for dtype, dims in _ARRAY.findall(shape):
      bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype)[:2] or 8)
      sizes.append(math.prod(int(d) for d in dims.split(",") if d) * bits // 8)
    if sizes:
      out[kind] = out.get(kind, 0) + max(sizes)
  return out


def _with_shardings(tree, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def _analyse(report: Report, compiled) -> Report:
  memory = compiled.memory_analysis()
  report.argument_bytes = int(memory.argument_size_in_bytes)
  report.output_bytes = int(memory.output_size_in_bytes)
  report.temp_bytes = int(memory.temp_size_in_bytes)
  report.alias_bytes = int(memory.alias_size_in_bytes)
  report.code_bytes = int(memory.generated_code_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost and "flops" in cost:
    report.compiled_flops = float(cost["flops"]) * report.chips  # cost_analysis is per device
  if cost and cost.get("optimal_seconds", -1) > 0:
    report.optimal_seconds = float(cost["optimal_seconds"])
  report.collective_bytes = collective_bytes(compiled.as_text())
  return report


def configured(config, mesh=None, remat_policy=None, batch_per_chip=None, chips=None):
  """A copy of `config` with the mesh, remat policy and global batch of one candidate."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if mesh is not None:
      config.mesh = tuple(mesh)
    if remat_policy is not None:
      config.remat_policy = remat_policy
    if batch_per_chip is not None:
      config.batch_size = batch_per_chip * chips
      if "data" in config and "batch_size" in config.data:
        config.data.batch_size = config.batch_size
  return config


def _report(what, config, devices, topology, mesh) -> Report:
  chip = topology_lib.chip(devices[0])
  chips = len(devices)
  return Report(
      what=what,
      topology=topology,
      chip=chip.name,
      chips=chips,
      mesh={k: int(v) for k, v in mesh.shape.items()},
      remat_policy=config.get("remat_policy") or "none",
      batch_per_chip=config.batch_size // chips,
      hbm_bytes=chip.hbm_bytes,
      attention=config.get("attention_implementation"),
  )


def compile_train_step(config, devices: Sequence, topology: str = "") -> Report:
  """Compiles the stage's training step for `devices` (compile-only TPU devices, or any); a report
  with `error` set when the configuration cannot be built or compiled (e.g. the batch does not
  divide the mesh)."""
  task = tasks_lib.get_task(config)
  mesh = sharding_lib.make_mesh(config.mesh, devices=devices)
  report = _report("train_step", config, devices, topology, mesh)
  if config.batch_size % mesh.size:
    report.error = f"batch_size {config.batch_size} does not divide over the {mesh.size} chips"
    return report
  report.analytic_flops = task.step_flops(config.batch_size)
  started = time.perf_counter()
  try:
    builder = state_lib.StateBuilder(task, config, mesh)
    frozen = task.abstract_frozen()
    frozen_shardings = sharding_lib.tree_shardings(frozen, mesh, builder.rules, prefix="frozen/")
    data_sharding = sharding_lib.batch_sharding(mesh)
    batch = task.abstract_batch(config.batch_size)
    step = builder.make_train_step(frozen_shardings, data_sharding)
    lowered = step.lower(
        _with_shardings(builder.abstract_state, builder.state_shardings),
        _with_shardings(frozen, frozen_shardings),
        jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=data_sharding), batch
        ),
    )
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  # XLA's resource errors, among others
    return _failed(report, e, started)
  report.compile_seconds = time.perf_counter() - started
  return _analyse(report, compiled)


def compile_sampling(
    config,
    devices: Sequence,
    topology: str = "",
    *,
    num_steps: int = 25,
    batch_per_chip: int = 1,
    decode_chunk_size: Optional[int] = None,
):
  """Compiles an image-to-video stage's sampling (the conditioning encoders, `num_steps` guided
  Euler steps) and its VAE decode for `devices`, one clip per chip per `batch_per_chip`; parameters
  sharded by the config's rules. Returns (sample report, decode report)."""
  from vldm.pipelines import image_to_video  # pylint: disable=g-import-not-at-top

  task = tasks_lib.get_task(config)
  if not hasattr(task, "image_encoder"):
    raise ValueError("Sampling is compiled for image-to-video stages (configs/svd.py:stage=i2v).")
  mesh = sharding_lib.make_mesh(config.mesh, devices=devices)
  rules = tuple(tuple(r) for r in config.sharding.params)
  config = configured(config, batch_per_chip=batch_per_chip, chips=mesh.size)
  batch = config.batch_size
  frozen = task.abstract_frozen()
  params = {
      "unet": jax.eval_shape(task.init_params, jax.random.key(0))["unet"],
      "vae": frozen["vae"],
      "image_encoder": frozen["image_encoder"],
  }
  shardings = {
      name: sharding_lib.tree_shardings(tree, mesh, rules, prefix=f"{name}/")
      for name, tree in params.items()
  }
  pipe = image_to_video.ImageToVideoPipeline(
      unet=task.unet,
      vae=task.vae,
      image_encoder=task.image_encoder,
      params=params,
      sampler=task.sampler_settings(),
  )
  vae_factor = 2 ** (len(task.vae.block_out_channels) - 1)
  size, frames = task.size, task.frames
  data = sharding_lib.batch_sharding(mesh)
  sds = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=data)
  latent = (batch, frames, size // vae_factor, size // vae_factor, task.vae.latent_channels)
  replicated = sharding_lib.replicated(mesh)
  key = jax.eval_shape(lambda: jax.random.key(0))
  args = (
      {name: _with_shardings(tree, shardings[name]) for name, tree in params.items()},
      sds((batch, size, size, 3)),
      sds((batch, size, size, 3)),
      sds((batch, size, size, 3)),
      jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated),
      sds(latent),
      sds((batch, frames)),
      sds((batch, 3)),
      jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
  )
  reports = []
  programs = (
      (
          "sample",
          functools.partial(pipe._sample, num_steps=num_steps, use_guidance=True),  # pylint: disable=protected-access
          args,
      ),
      (
          "decode",
          lambda p, z: task.vae.apply(
              {"params": p}, z, decode_chunk_size=decode_chunk_size, method="decode"
          ),
          (args[0]["vae"], args[5]),
      ),
  )
  for what, fn, fn_args in programs:
    report = _report(what, config, devices, topology, mesh)
    started = time.perf_counter()
    try:
      compiled = jax.jit(fn).lower(*fn_args).compile()
    except Exception as e:  # pylint: disable=broad-except
      reports.append(_failed(report, e, started))
      continue
    report.compile_seconds = time.perf_counter() - started
    reports.append(_analyse(report, compiled))
  return tuple(reports)


def _failed(report: Report, error: Exception, started: float) -> Report:
  """`report` of a program that did not compile: XLA's reason, and its memory need when it ran
  out of HBM."""
  report.error = _short(error)
  report.compile_seconds = time.perf_counter() - started
  used = _hbm_used(str(error))
  if used is not None:
    report.temp_bytes = used  # XLA's total; the split is not reported
  return report


def _short(error: Exception, limit: int = 600) -> str:
  text = f"{type(error).__name__}: {error}".strip()
  return text if len(text) <= limit else text[:limit] + " …"


def mesh_options(
    chips: int, slices: int = 1, fsdp_sizes: Optional[Sequence[int]] = None
) -> list[tuple]:
  """data × fsdp splits to try: by default pure data parallelism, FSDP over 4 chips, and FSDP over
  all chips of a slice; FSDP stays within a slice, the data axis spans slices."""
  per_slice = chips // slices
  sizes = sorted(set(fsdp_sizes or {1, min(4, per_slice), per_slice}))
  bad = [n for n in sizes if n < 1 or per_slice % n]
  if bad:
    raise ValueError(f"FSDP sizes {bad} do not divide the {per_slice} chips of a slice.")
  return [(("data", chips // fsdp), ("fsdp", fsdp)) for fsdp in sizes]


def search(
    config,
    devices: Sequence,
    topology: str = "",
    *,
    remat_policies: Sequence[str] = REMAT_ORDER,
    batches: Sequence[int] = BATCHES,
    meshes: Optional[Sequence[tuple]] = None,
    attentions: Optional[Sequence[Optional[str]]] = None,
    known: Sequence[Report] = (),
    log=print,
) -> list[Report]:
  """Every compiled candidate, fitting ones first, fastest-looking first (`rank`).

  Per mesh, the (attention, remat policy) choices are tried from the least recomputation on: the
  config's attention with each policy, then 'chunked' attention (`attentions`: by default the
  config's, then 'chunked'), which recomputes attention scores in the backward pass but does not
  hold a layer's whole score matrix. Per choice the per-chip batch grows while the step fits:
  memory is affine in the batch, so after two fitting batches the largest one predicted to fit is
  compiled next (then halved until it fits), a few compiles a choice instead of one per batch. A
  choice that recomputes more is tried only from a larger batch than the ones before it reached,
  since at the same batch it is slower. `known` reports are reused, not recompiled.
  """
  chips = len(devices)
  meshes = meshes or mesh_options(chips, topology_lib.num_slices(devices))
  if attentions is None:
    own = config.get("attention_implementation")
    attentions = (own,) if own == "chunked" else (own, "chunked")
  choices = [(attention, policy) for attention in attentions for policy in remat_policies]
  key_of = lambda mesh, attention, policy, batch: (
      tuple((name, int(size)) for name, size in mesh),
      attention,
      policy,
      batch,
  )
  done = {key_of(r.mesh.items(), r.attention, r.remat_policy, r.batch_per_chip): r for r in known}
  reports = list(known)

  def compile_at(mesh, attention, policy, batch):
    key = key_of(mesh, attention, policy, batch)
    if key not in done:
      candidate = configured(
          config, mesh=mesh, remat_policy=policy, batch_per_chip=batch, chips=chips
      )
      with candidate.unlocked():  # None too: JAX's choice
        candidate.attention_implementation = attention
      report = done[key] = compile_train_step(candidate, devices, topology)
      reports.append(report)
      log(
          f"  mesh {report.mesh} attention {attention or 'default'} remat {policy} batch "
          f"{batch}/chip: "
          + (
              f"{report.total_bytes / 2**30:.2f} GiB, "
              f"{'fits' if report.fits else 'does not fit'}"
              if report.error is None
              else f"error ({report.error[:160]})"
          )
      )
    return done[key]

  hbm = topology_lib.chip(devices[0]).hbm_bytes
  for mesh in meshes:
    reached = 0
    for attention, policy in choices:
      fitting = []  # (batch, bytes) that fit, ascending
      batch = next((b for b in batches if b > reached), None)
      while batch is not None:
        report = compile_at(mesh, attention, policy, batch)
        while not report.fits and fitting and batch // 2 > fitting[-1][0]:
          batch //= 2  # the prediction overshot: back down toward the last fitting batch
          report = compile_at(mesh, attention, policy, batch)
        if not report.fits:
          break
        fitting.append((batch, report.total_bytes))
        larger = [b for b in batches if b > batch]
        if len(fitting) >= 2 and larger:  # predict the largest batch that fits from the last two
          b1, m1 = fitting[-2]
          b2, m2 = fitting[-1]
          limit = b2 + (FIT_FRACTION * hbm - m2) / max((m2 - m1) / (b2 - b1), 1.0)
          larger = [b for b in larger if b <= limit]
          batch = larger[-1] if larger else None
        else:
          batch = larger[0] if larger else None
      if fitting:
        reached = max(reached, fitting[-1][0])
  return rank(reports)


def rank(reports: Sequence[Report]) -> list[Report]:
  """Fitting reports first, least estimated cost per example first, then the larger batch, then
  less collective traffic. The cost is XLA's roofline time when every fitting report has one (it
  sees memory traffic as well as FLOPs), else the compiled FLOPs (recomputation included)."""
  fitting = [r for r in reports if r.fits]
  by_time = bool(fitting) and all(r.seconds_per_example is not None for r in fitting)

  def key(r: Report):
    if by_time and r.seconds_per_example is not None:
      per_example = r.seconds_per_example
    else:
      per_example = (r.compiled_flops or math.inf) / max(r.batch_per_chip * r.chips, 1)
    return (not r.fits, per_example, -r.batch_per_chip, sum(r.collective_bytes.values()))

  return sorted(reports, key=key)


def _hbm_used(error: str) -> Optional[int]:
  """Bytes XLA says the program needs, from its out-of-memory message ('Used 20.51G of 15.48G
  hbm', 'the total memory required for HLO temporaries (751.03G) exceeds available HBM'), else
  None (temporaries alone in the second form: a lower bound)."""
  match = re.search(r"Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm", error) or re.search(
      r"required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds", error
  )
  if not match:
    return None
  return int(float(match.group(1)) * 1024 ** ("KMGT".index(match.group(2)) + 1))


def run(
    config,
    topology: str,
    *,
    slices: int = 1,
    search_all: bool = False,
    sample: bool = False,
    fsdp_sizes: Optional[Sequence[int]] = None,
    remat_policies: Optional[Sequence[str]] = None,
    out: Optional[str] = None,
    log=print,
) -> int:
  """`python -m vldm.train --compile_only`: compiles the config's step for `topology`, prints the
  report, searches when asked or when it does not fit. Returns the exit status: 0 if the config as
  given fits, 1 if not (the message lists the fitting options found)."""
  import json  # pylint: disable=g-import-not-at-top

  devices_ = topology_lib.devices(topology, slices)
  meshes = mesh_options(len(devices_), slices, fsdp_sizes)
  remat_policies = tuple(remat_policies or REMAT_ORDER)
  unknown = set(remat_policies) - set(REMAT_ORDER)
  if unknown:
    raise ValueError(f"Unknown remat policies {sorted(unknown)}; vldm has {REMAT_ORDER}.")
  log(f"Compiling for {topology_lib.describe(topology, devices_)}, ahead of time (no TPU needed).")
  reports = [compile_train_step(config, devices_, topology)]
  log(reports[0].summary())
  if sample:
    for report in compile_sampling(
        config, devices_, topology, num_steps=config.ldm.sampler.num_steps
    ):
      reports.append(report)
      log(report.summary())
  status = 0 if all(r.fits for r in reports) else 1
  found = []
  if search_all or not reports[0].fits:
    log(f"Searching mesh × remat × per-chip batch on {topology}:")
    found = search(
        config,
        devices_,
        topology,
        meshes=meshes,
        remat_policies=remat_policies,
        known=reports[:1],
        log=log,
    )
    fitting = [r for r in found if r.fits]
    if fitting:
      log("Fitting configurations, fastest-looking first:")
      for r in fitting[:5]:
        cost = (
            f"{1e3 * r.seconds_per_example:.2f} ms" if r.seconds_per_example is not None else "? ms"
        )  # XLA gives no roofline estimate for some programs
        flops = (r.compiled_flops or 0) / (r.batch_per_chip * r.chips)
        log(
            f"  {r.total_bytes / 2**30:6.2f} GiB/chip, {cost} and {flops / 1e9:.1f} GFLOPs per "
            f"example: {r.overrides()}"
        )
    else:
      log(f"Nothing fits {topology}: try a larger topology or chip (v5p: 95 GiB HBM a chip).")
  if out:
    with open(out, "w", encoding="utf-8") as f:
      json.dump(
          {
              "topology": topology,
              "slices": slices,
              "reports": [r.row() for r in reports],
              "search": [r.row() for r in found],
          },
          f,
          indent=1,
      )
    log(f"Wrote {out}")
  if status:
    what = ", ".join(r.what for r in reports if not r.fits)
    best = [r for r in found if r.fits][:3]
    log(
        f"vldm.train: {what} does not fit {topology}"
        + ("; fitting: " + " | ".join(r.overrides() for r in best) if best else ".")
    )
  return status
