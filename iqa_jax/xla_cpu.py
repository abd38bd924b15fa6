"""Which kernels XLA's CPU backend runs the dense dots with: per-program compiler options.

On jax 0.10 the CPU backend hands every dot to YNNPACK (`__ynn_fusion`); on this project's
2-core AVX-512 machine that reaches ~104 GFLOP/s on the ViT-B MLP's 3136x768x3072 matmul,
where XLA's own Eigen dot emitter reaches ~130 and PyTorch's oneDNN ~160 (docs/performance.md,
issue 24). `compiler_options(devices, dots)` gives the options that pick the kernels, for
`jax.jit(..., compiler_options=...)`, so the choice belongs to each compiled program and a
user's XLA_FLAGS are left alone:

  "auto"    (default) "eigen" on the CPU, nothing elsewhere
  "eigen"   YNNPACK keeps its convolutions and reductions, the dots go to XLA's Eigen emitter
  "onednn"  the dots go to oneDNN matmuls (the rest as "ynnpack")
  "ynnpack" XLA's own default: no options

The kernels differ only in float32 rounding (tests/test_xla_cpu.py). oneDNN programs cannot be
kept in the persistent compilation cache on jax 0.10.2 ("ToProto is not implemented for thunk
kind: onednn-fusion"), one reason "auto" is "eigen". An XLA that does not know
an option (older or newer jaxlib) compiles with its defaults, and says so once.
"""
from __future__ import annotations

import functools
import os
import warnings

DOTS = ("auto", "eigen", "onednn", "ynnpack")
ENV = "IQA_JAX_CPU_DOTS"  # overrides "auto" where no config says otherwise

_OPTIONS = {
    "eigen": {"xla_cpu_experimental_ynn_fusion_type":
              "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_REDUCE"},
    "onednn": {"xla_cpu_use_onednn": True,
               "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    "ynnpack": {},
}


def resolve(dots: str | None) -> str:
  """'auto' (or None) -> $IQA_JAX_CPU_DOTS or 'eigen'; anything else must be one of DOTS."""
  dots = dots or "auto"
  if dots == "auto":
    dots = os.environ.get(ENV, "") or "eigen"
    where = f"${ENV}"
  else:
    where = "cpu_dots"
  if dots not in _OPTIONS:
    raise ValueError(f"{where}={dots!r}: choose one of {', '.join(DOTS)}")
  return dots


def compiler_options(devices, dots: str | None = "auto") -> dict | None:
  """-> the `jax.jit(compiler_options=...)` for a program on `devices` (None where they are not
  CPUs, where the choice is XLA's default, or where this XLA rejects the options)."""
  devices = list(devices)
  if not devices or devices[0].platform != "cpu":
    return None
  options = _OPTIONS[resolve(dots)]
  return dict(options) if options and _accepted(tuple(sorted(options.items()))) else None


@functools.cache
def _accepted(options: tuple) -> bool:
  """Whether this XLA compiles a small dot with `options` (checked once per process)."""
  import jax
  import jax.numpy as jnp
  x = jax.ShapeDtypeStruct((8, 8), jnp.float32)
  try:
    jax.jit(jnp.dot, compiler_options=dict(options)).lower(x, x).compile()
  except Exception as e:  # noqa: BLE001 - XLA raises its own runtime error types
    warnings.warn(f"XLA on this machine does not take the CPU dot options {dict(options)} "
                  f"({str(e).splitlines()[0]}); compiling with its defaults", stacklevel=3)
    return False
  return True


@functools.cache
def unrolled_threefry() -> bool:
  """Lowers jax's threefry2x32 (every random draw: the LoRA dropout masks) on the CPU as jax
  lowers it elsewhere, its 20 rounds in a straight line, not as a while loop of 5 iterations.

  The bits are the same uint32s (tests/test_xla_cpu.py, with the Random123 known answers); XLA
  only fuses them into fewer kernels without the loop's carry copies: the 24 dropout masks of a
  B/16 train step at batch 8 take 3x less time and the step ~5% less (docs/performance.md).
  Once per process, for every program compiled after it. False where this jax has no such
  rule, which then keeps its own lowering."""
  try:
    from jax._src.random import threefry2x32 as threefry
    from jax.interpreters import mlir
    rule = threefry._threefry2x32_lowering_rule
  except (ImportError, AttributeError):  # another jax: its own lowering stands
    return False
  mlir.register_lowering(threefry.threefry2x32_p, rule, platform="cpu")
  return True
