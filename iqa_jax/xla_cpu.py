"""Which kernels XLA's CPU backend runs the dense dots with: per-program compiler options.

On jax 0.10 the CPU backend hands every dot to YNNPACK (`__ynn_fusion`); on this project's
2-core AVX-512 machine that reaches ~104 GFLOP/s on the ViT-B MLP's 3136x768x3072 matmul,
where XLA's own Eigen dot emitter reaches ~130 and PyTorch's oneDNN ~160 (docs/performance.md,
issue 24). `compiler_options(devices, dots, params, program)` gives the options that pick
the kernels, for `jax.jit(..., compiler_options=...)`, so the choice belongs to each compiled
program and a user's XLA_FLAGS are left alone:

  "auto"    (default) on the CPU: "onednn" for a model whose largest weight matrix has at least
            ONEDNN_MIN_KERNEL entries (ViT-S and up), "eigen" for smaller ones, for heads on
            stored features (the train loop passes no params; not measured with oneDNN) and
            where this XLA has no oneDNN; nothing elsewhere
  "eigen"   YNNPACK keeps its convolutions and reductions, the dots go to XLA's Eigen emitter
  "onednn"  the dots go to oneDNN matmuls, those it does not take to Eigen (as "eigen"); in a
            train step YNNPACK keeps only the convolutions (_TRAIN)
  "ynnpack" XLA's own default: no options

The kernels differ only in float32 rounding (tests/test_xla_cpu.py). Against Eigen, oneDNN
trains a B/16 at 224 px 13% faster (batch 8, with _TRAIN) and scores it 5% faster (batch 16;
~20% at 32), ViT-S 9% / 13% (before _TRAIN); a 128-wide tower trains level and scores 11%
faster; the demo's 64-wide tower runs 20% slower, its dots too small for oneDNN's calls
(docs/performance.md). The choice depends on the model and the setting alone, never on
whether a persistent compilation cache is on: a cache changes no number. jax 0.10.2 cannot store
oneDNN programs in that cache ("ToProto is not implemented for thunk kind: onednn-fusion"), so
they are compiled in every process; `cache_note` says so in one line where a command was given
a cache, and jax's own warning is silenced. An XLA that does not know an option (older or newer
jaxlib) compiles with its defaults, and says so once.
"""
from __future__ import annotations

import functools
import math
import os
import warnings

DOTS = ("auto", "eigen", "onednn", "ynnpack")
# 'auto' takes oneDNN for a model whose largest weight matrix has at least this many entries.
ONEDNN_MIN_KERNEL = 2 ** 17
ENV = "IQA_JAX_CPU_DOTS"  # overrides "auto" where no config says otherwise

_YNN_TYPE = "xla_cpu_experimental_ynn_fusion_type"  # what YNNPACK keeps (no dots below)
_CONVOLUTIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
_EIGEN_DOTS = {_YNN_TYPE: _CONVOLUTIONS + ",LIBRARY_FUSION_TYPE_REDUCE"}
_OPTIONS = {
    "eigen": _EIGEN_DOTS,
    "onednn": {"xla_cpu_use_onednn": True,  # and the dots oneDNN does not take go to Eigen
               "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
               **_EIGEN_DOTS},
    "ynnpack": {},
}
PROGRAMS = ("train", "eval")  # a train step (or epoch), or a forward that scores or extracts
# A oneDNN train step leaves the reductions to XLA: YNNPACK's reduce fusions take in the
# attention's batched dots with the softmax around them, and the B/16 train step ran 8% slower
# with them (3.23 against 2.98 img/s, docs/performance.md); scoring ran 7% faster with them.
_TRAIN = {"onednn": {_YNN_TYPE: _CONVOLUTIONS}}


def resolve(dots: str | None, params=None) -> str:
  """'auto' (or None) -> $IQA_JAX_CPU_DOTS, else the module docstring's choice for a model with
  `params` (a tree of arrays or shapes; None: a small one); anything else must be one of DOTS."""
  dots = dots or "auto"
  if dots == "auto":
    dots = os.environ.get(ENV, "") or _auto(params)
    where = f"${ENV}"
  else:
    where = "cpu_dots"
  if dots not in _OPTIONS:
    raise ValueError(f"{where}={dots!r}: choose one of {', '.join(DOTS)}")
  return dots


def choose(devices, dots: str | None = "auto", params=None) -> str | None:
  """-> the kernels (a name in DOTS but 'auto') of a program over `devices` of the model with
  `params`; None where the devices are not CPUs (the choice is then XLA's own)."""
  devices = list(devices)
  if not devices or devices[0].platform != "cpu":
    return None
  return resolve(dots, params)


def largest_kernel(params) -> int:
  """Entries of the largest weight matrix of the backbone in `params` (its 'backbone' entry if it
  has one: the head's 512 x 512 is in every model); a stacked (layers, in, out) leaf counts one
  layer's in x out; 0 for a tree without matrices."""
  import jax
  if isinstance(params, dict) and "backbone" in params:
    params = params["backbone"]
  return max((math.prod(x.shape[-2:]) for x in jax.tree.leaves(params) if len(x.shape) >= 2),
             default=0)


def _auto(params) -> str:
  if params is None or largest_kernel(params) < ONEDNN_MIN_KERNEL:
    return "eigen"
  _quiet_unstorable()
  onednn = tuple(sorted(_OPTIONS["onednn"].items()))
  return "onednn" if _accepted(onednn, quiet=True) else "eigen"


def _quiet_unstorable() -> None:
  """Silences jax's warning at each compile of a oneDNN program while a persistent cache is on:
  the program runs, only uncached (the module docstring)."""
  warnings.filterwarnings("ignore", category=UserWarning, message=(
      "Error writing persistent compilation cache entry .*onednn-fusion"))


def cache_note(dots: str | None) -> str | None:
  """-> one line for a command given a compilation cache whose programs use `dots` (`choose`'s
  answer) that the cache cannot store, else None."""
  if dots != "onednn":
    return None
  return ("note: these CPU programs use oneDNN's dot kernels, which jax's compilation cache "
          f"cannot store, so they are compiled each run; set {ENV}=eigen (or cpu_dots=eigen) to "
          "cache them too (scores within float32 rounding, about 10% slower)")


def compiler_options(devices, dots: str | None = "auto", params=None,
                     program: str = "train") -> dict | None:
  """-> the `jax.jit(compiler_options=...)` for a `program` (PROGRAMS) over `devices` of the model
  with `params` (None where they are not CPUs, where the choice is XLA's default, or where this
  XLA rejects the options)."""
  if program not in PROGRAMS:
    raise ValueError(f"program must be one of {PROGRAMS}, got {program!r}")
  dots = choose(devices, dots, params)
  if dots is None:
    return None
  options = {**_OPTIONS[dots], **(_TRAIN.get(dots, {}) if program == "train" else {})}
  if dots == "onednn":
    _quiet_unstorable()
  return options if options and _accepted(tuple(sorted(options.items()))) else None


@functools.cache
def _accepted(options: tuple, quiet: bool = False) -> bool:
  """Whether this XLA compiles a small dot with `options` (checked once per process); says why
  not unless `quiet`."""
  import jax
  import jax.numpy as jnp
  x = jax.ShapeDtypeStruct((8, 8), jnp.float32)
  try:
    jax.jit(jnp.dot, compiler_options=dict(options)).lower(x, x).compile()
  except Exception as e:  # noqa: BLE001 - XLA raises its own runtime error types
    if quiet:
      return False
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
