"""Data parallel on 8 CPU devices (and 2 processes x 4) vs one device with the same global batch.

The device count is fixed when JAX starts and conftest pins it to 1, so the 8-device run is a
subprocess (this file run as a script) that prints JSON; the tests read its figures. The tower
computes in float32, so 8 devices differ from 1 only in the order of the batch reductions.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEVICES = 8
BATCH, ACCUM = 16, 2  # micro-batch 8: one example per device
# Absolute tolerances. Loss (about 0.3 and 10): 1e-5. Params and Adam moments after two Adam
# steps of lr 1e-3: 2e-5, i.e. 2% of one step (Adam divides each gradient element by its size,
# so elements with near-zero gradients carry the reduction-order noise up to the scale of lr;
# measured 5e-6). Eval scores: 2e-5. Scored CSV: 1e-5 (6 decimals).
LOSS_TOL, PARAM_TOL, SCORE_TOL = 1e-5, 2e-5, 1e-5


def tiny_config(dropout: float):
  from iqa_jax.defaults import base_config
  c = base_config()
  c.model.init = None
  c.model.arch = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, patch_size=8, image_size=32)
  c.model.dtype = "float32"
  c.model.lora.dropout = dropout
  c.data.name = "demo"
  c.data.image_size = 32
  c.optim.batch_size, c.optim.grad_accum = BATCH, ACCUM
  c.optim.lr = c.optim.backbone_lr = 1e-3
  c.optim.schedule = "constant"
  return c


def _max_diff(a, b) -> float:
  import jax
  import numpy as np
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _train_two_steps(mode: str, dropout: float) -> dict:
  """Two steps on one device (plain jit) and on the 8-device mesh; max |diff| of each output."""
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  from iqa_jax import parallel
  from iqa_jax.models.model import create_model, make_eval_step
  from iqa_jax.training.optim import make_optimizer
  from iqa_jax.training.steps import TrainState, make_train_step

  config = tiny_config(dropout)
  model, params, _ = create_model(config)
  tx, labels = make_optimizer(config, params, steps_per_epoch=10)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32),
              "mos": rng.uniform(size=BATCH).astype(np.float32)} for _ in range(2)]
  make_step = functools.partial(make_train_step, model, tx, labels, grad_accum=ACCUM)

  one = jax.jit(make_step())
  ref, ref_losses = state, []
  for b in batches:
    ref, m = one(ref, b)
    ref_losses.append(float(m["loss"]))

  mesh = parallel.make_mesh()
  step = parallel.jit_train_step(make_step, mesh, mode)
  par, losses = parallel.put_state(state, labels, mesh), []
  for b in batches:
    par, m = step(par, parallel.put_batch(b, mesh, mode=mode, grad_accum=ACCUM))
    losses.append(float(m["loss"]))

  scan = {}
  if mode == "sharded":  # the same two steps as one scan over examples held on the devices
    table = parallel.put_replicated({k: np.concatenate([b[k] for b in batches])
                                     for k in ("image", "mos")}, mesh)
    rows = np.arange(2 * BATCH).reshape(2, ACCUM, BATCH // ACCUM)
    scanned, m = parallel.jit_train_epoch(make_step, mesh)(
        parallel.put_state(state, labels, mesh), table, rows)
    scan = {"scan_loss": _max_diff(list(np.asarray(m["loss"])), ref_losses),
            "scan_params": _max_diff(scanned.params, ref.params)}

  images = rng.normal(size=(12, 32, 32, 3)).astype(np.float32)  # 12: padded to 16 on 8 devices
  eval_one = jax.jit(make_eval_step(model))(ref.params, images)
  eval_par = parallel.jit_eval_step(make_eval_step(model), mesh)(par.params, images)
  return {**scan, "devices": len(mesh.devices.flat), "losses": losses, "ref_losses": ref_losses,
          "loss": _max_diff(losses, ref_losses), "params": _max_diff(par.params, ref.params),
          "opt_state": _max_diff(par.opt_state, ref.opt_state),
          "param_change": _max_diff(ref.params, state.params), "step": int(par.step),
          "eval": _max_diff(eval_par, eval_one), "eval_shape": list(np.shape(eval_par)),
          "sharding": str(par.params["head"]["fc1"]["kernel"].sharding.spec)}


def _score_run(tmp: Path) -> dict:
  """score_paths on 8 devices vs the one-device eval step on the same preprocessed images."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from PIL import Image

  from iqa_jax.data import pp
  from iqa_jax.inference import score_csv as score
  from iqa_jax.models.model import create_model, make_eval_step
  from iqa_jax.runs import checkpoint
  from iqa_jax.training.optim import make_optimizer
  from iqa_jax.training.steps import TrainState

  config = tiny_config(0.0)
  model, params, preprocessing = create_model(config)
  params = jax.tree.map(lambda p: p + 0.01, params)  # LoRA B != 0: every partition matters
  tx, labels = make_optimizer(config, params, steps_per_epoch=10)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(1))
  run = tmp / "run"
  run.mkdir()
  (run / "config.json").write_text(config.to_json_best_effort())
  ckpt = checkpoint.RunCheckpoints(run, save_frozen=True)
  ckpt.save(state, labels, "best", {"epoch": 0, "best": {}})
  ckpt.close()
  rng = np.random.default_rng(0)
  paths = []
  for i in range(11):
    paths.append(str(tmp / f"im{i}.png"))
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(paths[-1])
  out = tmp / "scores.csv"
  summary = score.score_paths(str(run), paths, str(out), batch_size=6, progress=False)
  scored = np.loadtxt(out, delimiter=",", skiprows=1, usecols=1)
  prep = pp.get_preprocess_fn(pp.native_pp(preprocessing, size=32))
  images = np.stack([prep({"path": p})["image"] for p in paths])
  ref = np.asarray(jax.jit(make_eval_step(model))(params, images))
  return {"scored": summary["scored"], "score": float(np.max(np.abs(scored - ref)))}


def _multihost_worker(process_id: int, port: int, out_json: str) -> None:
  """One of 2 processes x 4 CPU devices: a global batch built from per-process halves."""
  import functools

  import jax
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
  import jax.numpy as jnp
  import numpy as np

  from iqa_jax import parallel
  from iqa_jax.models.model import create_model, make_eval_step
  from iqa_jax.training.optim import make_optimizer
  from iqa_jax.training.steps import TrainState, make_train_step

  assert jax.process_count() == 2 and jax.device_count() == DEVICES
  config = tiny_config(0.0)
  model, params, _ = create_model(config)
  tx, labels = make_optimizer(config, params, steps_per_epoch=10)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)  # the same global batch in both processes
  batch = {"image": rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32),
           "mos": rng.uniform(size=BATCH).astype(np.float32)}
  def half(x, p):
    return x.reshape((ACCUM, 2, -1) + x.shape[1:])[:, p].reshape((-1,) + x.shape[1:])
  local = {k: half(v, process_id) for k, v in batch.items()}  # micro j = [process 0, process 1]
  make_step = functools.partial(make_train_step, model, tx, labels, grad_accum=ACCUM)
  ref, m = jax.jit(make_step())(state, batch)
  result = {"ref_loss": float(m["loss"])}
  mesh = parallel.make_mesh()
  images = rng.normal(size=(12, 32, 32, 3)).astype(np.float32)
  eval_ref = jax.jit(make_eval_step(model))(ref.params, images)
  for mode in ("sharded", "pmap"):
    step = parallel.jit_train_step(make_step, mesh, mode)
    par, m = step(parallel.put_state(state, labels, mesh),
                  parallel.put_batch(local, mesh, mode=mode, grad_accum=ACCUM))
    scores = parallel.jit_eval_step(make_eval_step(model), mesh)(par.params, images)
    result[mode] = {"loss": abs(float(m["loss"]) - result["ref_loss"]),
                    "params": _max_diff(par.params, ref.params),
                    "eval": _max_diff(scores, eval_ref),
                    "global": not par.params["head"]["fc1"]["kernel"].is_fully_addressable}
  if process_id == 0:
    Path(out_json).write_text(json.dumps(result, indent=1))


def _worker(out_json: str, tmp: str) -> None:
  import jax
  assert jax.device_count() == DEVICES, jax.devices()
  result = {"sharded": _train_two_steps("sharded", 0.05),
            "pmap": _train_two_steps("pmap", 0.0),
            "scoring": _score_run(Path(tmp))}
  Path(out_json).write_text(json.dumps(result, indent=1))


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory, session_compilation_cache):
  """The worker compiles some programs twice (init, the eval steps of both modes): the session's
  compilation cache, in its own folder for 8 devices, holds them once."""
  from conftest import compile_cache_env
  tmp = tmp_path_factory.mktemp("parallel")
  cache = session_compilation_cache and session_compilation_cache / "8_devices"
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **compile_cache_env(cache))
  p = subprocess.run([sys.executable, __file__, str(tmp / "out.json"), str(tmp)], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  return json.loads((tmp / "out.json").read_text())


# LoRA dropout: the sharded step draws the same masks as one device (partitionable threefry);
# pmap draws per device, so its check runs without dropout.
@pytest.mark.parametrize("mode", ["sharded", "pmap"])
def test_one_step_on_8_devices_matches_one_device(eight_devices, mode):
  r = eight_devices[mode]
  assert r["devices"] == DEVICES and r["step"] == 2
  assert r["sharding"] == "P()"  # params replicated
  assert r["param_change"] > 1e-3  # the steps did move the params
  assert r["loss"] <= LOSS_TOL, r
  assert r["params"] <= PARAM_TOL, r
  assert r["opt_state"] <= PARAM_TOL, r


def test_an_epoch_scanned_on_8_devices_matches_one_device(eight_devices):
  r = eight_devices["sharded"]  # parallel.jit_train_epoch, the feature cache's in-memory epochs
  assert r["scan_loss"] <= LOSS_TOL, r
  assert r["scan_params"] <= PARAM_TOL, r


@pytest.mark.parametrize("mode", ["sharded", "pmap"])
def test_eval_runs_sharded_with_padding(eight_devices, mode):
  r = eight_devices[mode]
  assert r["eval_shape"] == [12]
  assert r["eval"] <= PARAM_TOL, r


def test_scoring_runs_sharded(eight_devices):
  r = eight_devices["scoring"]
  assert r["scored"] == 11
  assert r["score"] <= SCORE_TOL, r


def test_batch_that_does_not_split_over_devices_is_refused():
  from types import SimpleNamespace

  from iqa_jax import parallel
  parallel.check_batch_size(12, 6, parallel.make_mesh())  # the paper's 2 x 6 on one device
  parallel.check_batch_size(48, 6, SimpleNamespace(size=4))
  with pytest.raises(ValueError, match="multiple of config.optim.grad_accum=6 x 4 devices"):
    parallel.check_batch_size(12, 6, SimpleNamespace(size=4))


def test_prefetch_keeps_order_and_reads_ahead():
  from iqa_jax import parallel
  placed = []
  def put(b):
    return placed.append(b) or b
  it = parallel.prefetch_to_device(range(5), put, size=2)
  assert next(it) == 0 and placed == [0, 1, 2]
  assert list(it) == [1, 2, 3, 4]
  assert list(parallel.prefetch_to_device(range(3), lambda b: b, size=0)) == [0, 1, 2]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, session_compilation_cache):
  """2 processes x 4 CPU devices on this machine, as two hosts would run; each process has its
  own compilation cache folder (the two modes share an eval step), never written by the other."""
  import socket

  from conftest import compile_cache_env
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  out = tmp_path_factory.mktemp("multihost") / "out.json"
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES // 2}",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  cache = session_compilation_cache
  procs = [subprocess.Popen([sys.executable, __file__, "multihost", str(i), str(port), str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(env, **compile_cache_env(cache and cache / f"process_{i}")))
           for i in range(2)]
  errors = [p.communicate(timeout=600)[1] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errors)
  return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["sharded", "pmap"])
def test_two_processes_match_one_device(two_processes, mode):
  r = two_processes[mode]
  assert r["global"]  # the params span both processes' devices
  assert r["loss"] <= LOSS_TOL and r["params"] <= PARAM_TOL and r["eval"] <= PARAM_TOL, r


if __name__ == "__main__":
  if sys.argv[1] == "multihost":
    _multihost_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
  else:
    _worker(sys.argv[1], sys.argv[2])
