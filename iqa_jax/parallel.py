"""Data parallelism over a 1-D 'data' mesh: batches split over devices, parameters replicated.

config.parallel picks how the train step runs on the mesh:
  "sharded" (default): `jax.jit` with explicit in/out shardings; XLA inserts the gradient
             all-reduce (GSPMD).
  "pmap":    `jax.pmap` of the per-device step with `lax.pmean` of the gradients.
Both take and return the same replicated TrainState, so evaluation, checkpoints and scoring do
not care which one trained. The global batch (config.optim.batch_size) is split over all
devices of all processes; docs/parallel.md has the arithmetic and the multi-host launch.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import os
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from iqa_jax import xla_cpu

AXIS = "data"
MODES = ("sharded", "pmap")


def initialize_distributed(enabled: bool = False) -> None:
  """`jax.distributed.initialize()` when asked: config.distributed or IQA_JAX_DISTRIBUTED=1.

  The cluster is auto-detected (SLURM, Open MPI, TPU pods) or read from JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID. Call before anything touches a device.
  """
  if not (enabled or os.environ.get("IQA_JAX_DISTRIBUTED") == "1"):
    return
  if jax.distributed.is_initialized():
    return
  kw = {}
  if "JAX_NUM_PROCESSES" in os.environ:
    kw["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
  if "JAX_PROCESS_ID" in os.environ:
    kw["process_id"] = int(os.environ["JAX_PROCESS_ID"])
  jax.distributed.initialize(**kw)


def enable_compilation_cache(path: str, min_compile_s: float = 1.0) -> None:
  """Persistent XLA compilation cache in `path` ('' leaves it off): reruns skip compiling."""
  if path:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)


@contextlib.contextmanager
def persistent_compile_cache(path, min_compile_s: float = 0.0):
  """jax's persistent XLA cache in `path` while the block runs (None: no cache in the block); the
  process's previous settings come back afterwards. The run matrix shares compiled programs
  across its runs this way (tiny CPU run 17 s -> 3 s, same numbers), the tests across tests."""
  from jax.experimental.compilation_cache import compilation_cache
  settings = {"jax_compilation_cache_dir": None if path is None else str(path),
              "jax_persistent_cache_min_compile_time_secs": min_compile_s,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  previous = {k: getattr(jax.config, k) for k in settings}
  compilation_cache.reset_cache()  # a cache opened earlier in the process would win otherwise
  for k, v in settings.items():
    jax.config.update(k, v)
  try:
    yield path
  finally:
    for k, v in previous.items():
      jax.config.update(k, v)
    compilation_cache.reset_cache()


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: every device of every process)."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, grad_accum: int, mesh: Mesh) -> None:
  """Each micro-batch (batch / grad_accum) must split evenly over the devices."""
  if batch_size % (grad_accum * mesh.size):
    raise ValueError(
        f"config.optim.batch_size={batch_size} must be a multiple of config.optim.grad_accum="
        f"{grad_accum} x {mesh.size} devices: each micro-batch is split over the devices "
        f"(docs/parallel.md). Change the batch size or grad_accum, or run on fewer devices "
        f"(CUDA_VISIBLE_DEVICES).")


def process_batch_size(batch_size: int) -> int:
  """This process's share of the global batch (its loader's batch size)."""
  if batch_size % jax.process_count():
    raise ValueError(f"config.optim.batch_size={batch_size} does not split over "
                     f"{jax.process_count()} processes")
  return batch_size // jax.process_count()


def put_replicated(tree, mesh: Mesh):
  """A copy of `tree` on every device of the mesh (params, optimizer state). Never an alias:
  donating the copy to a train step leaves `tree` intact."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    # device_put may reuse a source buffer for one replica even with may_alias=False.
    tree = jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, tree)
    return jax.device_put(tree, sharding)
  # Multi-host: every process holds the same values; each fills its own devices.
  return jax.tree.map(lambda x: jax.make_array_from_callback(
      np.shape(x), sharding, lambda idx: np.asarray(x)[idx]), tree)


def cast_frozen(params, labels, dtype: str | None):
  """Frozen float leaves stored once in `dtype` (e.g. bfloat16): half the memory, no casts per
  step. Trainable leaves keep float32 (App. B.1). None or 'float32' changes nothing."""
  if not dtype or jnp.dtype(dtype) == jnp.float32:
    return params
  def cast(p, label):
    return (p.astype(dtype) if label == "frozen" and jnp.issubdtype(p.dtype, jnp.floating)
            else p)
  return jax.tree.map(cast, params, labels)


def put_state(state, labels, mesh: Mesh, frozen_dtype: str | None = None):
  """TrainState -> replicated on the mesh, frozen weights in `frozen_dtype`."""
  state = state.replace(params=cast_frozen(state.params, labels, frozen_dtype))
  return put_replicated(state, mesh)


def _local_mesh(mesh: Mesh) -> Mesh:
  return mesh.local_mesh if jax.process_count() > 1 else mesh


def put_batch(batch: dict, mesh: Mesh, *, mode: str = "sharded", grad_accum: int = 1,
              keys: Iterable[str] | None = None) -> dict:
  """This process's host batch -> device arrays of shape (grad_accum, micro, ...).

  Micro-batch j is the j-th contiguous slice of the batch, as on one device; its examples are
  split over the 'data' axis. "sharded": one global array whose micro axis spans all processes'
  batches. "pmap": (grad_accum, local devices, per device, ...) on this process's devices.
  """
  keys = batch.keys() if keys is None else keys
  out = {}
  for key in keys:
    x = np.asarray(batch[key])
    x = x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:])
    if mode == "pmap":
      local = _local_mesh(mesh)
      x = x.reshape((grad_accum, local.size, x.shape[1] // local.size) + x.shape[2:])
      out[key] = jax.device_put(x, NamedSharding(local, P(None, AXIS)))
    else:
      out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, P(None, AXIS)), x)
  return out


def prefetch_to_device(batches: Iterable[dict], put: Callable[[dict], dict],
                       size: int = 2) -> Iterator[dict]:
  """Yields put(batch) while the next `size` batches are already on their way to the devices
  (device_put is asynchronous), so host-to-device copies overlap the running step."""
  it = iter(batches)
  queue = collections.deque(put(b) for b in itertools.islice(it, size))
  for b in it:
    queue.append(put(b))
    yield queue.popleft()
  while queue:
    yield queue.popleft()


def _options(mesh: Mesh, cpu_dots: str | None, program: str = "train") -> dict | None:
  return xla_cpu.compiler_options(mesh.devices.flat, cpu_dots, program=program)


def jit_train_step(make_step: Callable[..., Callable], mesh: Mesh, mode: str = "sharded",
                   donate: bool = True, cpu_dots: str = "auto",
                   split_layers=None) -> Callable:
  """-> step(state, batch) -> (state, metrics) on the mesh, batch from `put_batch(mode=mode)`.

  `make_step(**kw)` builds the per-step function (e.g. a partial of steps.make_train_step); it
  gets micro_batched=True, and axis_name in pmap mode. State and metrics come back replicated.
  cpu_dots: the dot kernels on a CPU mesh (xla_cpu.DOTS; "sharded" mode, pmap takes no options):
    xla_cpu.choose's answer for the model, since 'auto' alone knows no params and means "eigen".
  split_layers: a tree of bools like the params (steps.stacked_frozen), for layers unrolled in
    the step ("sharded" mode, one process): `LayerSplitStep`.
  """
  if mode not in MODES:
    raise ValueError(f"config.parallel must be one of {MODES}, got {mode!r}")
  rep = replicated(mesh)
  donate_argnums = (0,) if donate else ()
  if mode == "sharded":
    if split_layers is not None and any(jax.tree.leaves(split_layers)):
      return LayerSplitStep(make_step(micro_batched=True), split_layers, mesh, donate,
                            _options(mesh, cpu_dots))
    return jax.jit(make_step(micro_batched=True), donate_argnums=donate_argnums,
                   in_shardings=(rep, NamedSharding(mesh, P(None, AXIS))),
                   out_shardings=(rep, rep), compiler_options=_options(mesh, cpu_dots))
  pmapped = jax.pmap(make_step(micro_batched=True, axis_name=AXIS), AXIS, in_axes=(None, 1),
                     out_axes=None, donate_argnums=donate_argnums, devices=list(mesh.devices.flat))
  if jax.process_count() == 1:
    return pmapped

  def step(state, batch):
    # pmap hands multi-host outputs back as per-process arrays; keep the state global.
    from jax.experimental import multihost_utils
    state, metrics = pmapped(state, batch)
    return multihost_utils.host_local_array_to_global_array(state, mesh, P()), metrics
  return step


class LayerSplitStep:
  """A train step whose frozen stacked layer weights come in as one array per layer.

  Unrolled, a step reads layer i of a stacked (layers, ...) weight as a slice, and XLA copies
  every such slice each step (120 copies on a B/16). Fed each layer's weight as its own input
  and stacked inside, the step's slices fold away (slice of a concatenate). The per-layer copies
  are made once per state (a second copy of those weights in memory) and kept while the steps
  hand back the same frozen arrays: the stacked originals never enter the jitted step, so they
  come back as the very objects that went in. Same values, other program: within float32
  rounding of the plain step (tests/test_scan_unroll.py).
  """

  def __init__(self, step: Callable, split_layers, mesh: Mesh, donate: bool,
               compiler_options: dict | None):
    self._split = split_layers
    # (the stacked arrays, their per-layer copies): held, not their ids, which a freed array
    # could hand on to a new one
    self._held: tuple = ((), None)
    rep = replicated(mesh)
    self.jitted = jax.jit(functools.partial(self._inner, step), donate_argnums=(0,) if donate
                          else (), in_shardings=(rep, NamedSharding(mesh, P(None, AXIS)), rep),
                          out_shardings=(rep, rep), compiler_options=compiler_options)
    self._run = self.jitted  # or the executable `lower(...).compile()` gave (with_compiled)

  def _inner(self, step, state, batch, layers):
    params = jax.tree.map(lambda p, per_layer: p if per_layer is None else jnp.stack(per_layer),
                          state.params, layers, is_leaf=lambda x: x is None)
    state, metrics = step(state.replace(params=params), batch)
    return state.replace(params=self._without(state.params)), metrics

  def _without(self, params):
    return jax.tree.map(lambda p, split: None if split else p, params, self._split)

  def args(self, state, batch) -> tuple:
    """-> the jitted step's (state without the stacked weights, batch, per-layer copies)."""
    stacked = [p for p, split in zip(jax.tree.leaves(state.params),
                                     jax.tree.leaves(self._split), strict=True) if split]
    held = self._held[0]
    if len(held) != len(stacked) or any(p is not q for p, q in zip(held, stacked, strict=True)):
      split = jax.jit(lambda ps: [tuple(p[i] for i in range(p.shape[0])) for p in ps])(stacked)
      per_layer = iter(split)
      layers = jax.tree.map(lambda split: next(per_layer) if split else None, self._split)
      self._held = (tuple(stacked), layers)
    return state.replace(params=self._without(state.params)), batch, self._held[1]

  def lower(self, state, batch):
    return self.jitted.lower(*self.args(state, batch))

  def with_compiled(self, compiled) -> LayerSplitStep:
    """Runs `compiled` (this step's `lower(...).compile()`) from now on; -> self."""
    self._run = compiled
    return self

  def as_text(self) -> str:
    return self._run.as_text()

  def __call__(self, state, batch):
    new, metrics = self._run(*self.args(state, batch))
    params = jax.tree.map(lambda n, p, split: p if split else n, new.params, state.params,
                          self._split, is_leaf=lambda x: x is None)
    return new.replace(params=params), metrics


def jit_train_epoch(make_step: Callable[..., Callable], mesh: Mesh,
                    donate: bool = True, cpu_dots: str = "auto") -> Callable:
  """-> epoch(state, table, rows) -> (state, metrics stacked over steps): ONE jitted lax.scan of
  the train step over a whole epoch whose examples are already on the devices ("sharded" mode,
  one process).

  table: {key: (N, ...)} replicated (put_replicated); rows: (steps, grad_accum, micro) indices
  into it, each step's batch laid out as put_batch lays it out; the gathered micro-batches are
  split over the 'data' axis.
  """
  step = make_step(micro_batched=True)
  batch = NamedSharding(mesh, P(None, AXIS))

  def epoch(state, table, rows):
    def body(state, step_rows):
      return step(state, {k: jax.lax.with_sharding_constraint(v[step_rows], batch)
                          for k, v in table.items()})
    return jax.lax.scan(body, state, rows)

  rep = replicated(mesh)
  return jax.jit(epoch, donate_argnums=(0,) if donate else (),
                 in_shardings=(rep, rep, NamedSharding(mesh, P(None, None, AXIS))),
                 out_shardings=(rep, rep), compiler_options=_options(mesh, cpu_dots))


def jit_eval_step(eval_step: Callable, mesh: Mesh, cpu_dots: str = "auto") -> Callable:
  """-> fn(params, images) -> scores, the batch split over the mesh (both modes).

  Every process passes the same whole batch (eval loaders are not sharded) and gets every score.
  A batch that does not divide over the devices is zero-padded and the padding dropped.
  """
  data, rep = NamedSharding(mesh, P(AXIS)), replicated(mesh)
  jitted = jax.jit(eval_step, in_shardings=(rep, data), out_shardings=rep,
                   compiler_options=_options(mesh, cpu_dots, "eval"))

  def run(params, images):
    n = images.shape[0]
    if isinstance(images, jax.Array) and n % mesh.size == 0:
      return jitted(params, images)
    images = np.asarray(images)
    pad = -n % mesh.size
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    x = jax.make_array_from_callback(images.shape, data, lambda idx: images[idx])
    scores = jitted(params, x)
    return scores[:n] if pad else scores

  run.jitted = jitted
  return run
