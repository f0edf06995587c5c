"""Test-wide settings: full-precision matmuls for float32 parity; XLA flags for quick compiles."""

import os

# Set before jax starts its CPU backend. Tests spend most of their time compiling small programs:
# LLVM at -O0 without its expensive passes and the older loop emitters cut XLA:CPU's compile time
# by about a quarter (the runlocal video train step: 16–18 → 11–15 s). Code generation only; the math and
# the parity tests' tolerances are unchanged.
_FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
    "--xla_cpu_use_fusion_emitters=false"
)
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

# The CPU backend only: where libtpu is installed (the compile-only tests), JAX would otherwise try
# to open a TPU in every process and hold libtpu's one-process lock.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
