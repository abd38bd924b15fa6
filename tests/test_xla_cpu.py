"""The CPU dot kernels (iqa_jax/xla_cpu.py): each choice reaches the compiled program, and the
scores and a train step agree with XLA's default kernels up to float32 rounding."""
import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_parallel import _max_diff  # the max |diff| over two param trees

from iqa_jax import parallel, xla_cpu
from iqa_jax.defaults import base_config
from iqa_jax.models.model import create_model, make_eval_step
from iqa_jax.training.optim import make_optimizer
from iqa_jax.training.steps import TrainState, make_train_step

# Scores of the tiny tower below (up to 0.44 in size): measured at most 6e-7 apart between the
# kernels (B/16 at 224 px: 1.1e-6). Loss: 4.5e-8; gradient norm: 1.4e-6 of itself.
# Params after one Adam step of lr 1e-3: 1e-5 (eigen) and 1.3e-4 (onednn, reductions by XLA)
# apart, because Adam's first step is lr * g / |g| per element and so carries an element's
# rounding at the scale of lr where its gradient is near zero (a sign flip would be 2 lr); the
# bound is 0.3 lr.
SCORE_TOL, LOSS_TOL, GRAD_NORM_RTOL, PARAM_TOL = 1e-6, 1e-6, 5e-6, 3e-4


KERNELS = ("__ynn_fusion", "__onednn_fusion")


def _kernels(compiled_text: str) -> dict[str, int]:
  """How many library fusions of each kind the compiled program calls."""
  return {k: compiled_text.count(f'"kind":"{k}"') for k in KERNELS}


def _dot_kernels(dots: str) -> set[str]:
  x = jax.ShapeDtypeStruct((64, 32), jnp.float32)
  w = jax.ShapeDtypeStruct((32, 48), jnp.float32)
  options = xla_cpu.compiler_options(jax.devices(), dots)
  found = _kernels(jax.jit(jnp.dot, compiler_options=options).lower(x, w).compile().as_text())
  return {k for k, n in found.items() if n}


def test_each_choice_reaches_the_compiled_dot():
  assert _dot_kernels("ynnpack") == {"__ynn_fusion"}  # jax 0.10's default: YNNPACK
  assert _dot_kernels("eigen") == set()  # XLA's own dot thunk
  assert _dot_kernels("onednn") == {"__onednn_fusion"}
  assert _dot_kernels("auto") == _dot_kernels("eigen")  # a train step's


def _eval_dots(dots: str = "auto") -> set[str]:
  x = jax.ShapeDtypeStruct((64, 32), jnp.float32)
  scores = parallel.jit_eval_step(lambda w, x: x @ w, parallel.make_mesh(), dots)
  w = jax.ShapeDtypeStruct((32, 48), jnp.float32)
  found = _kernels(scores.jitted.lower(w, x).compile().as_text())
  return {k for k, n in found.items() if n}


class _Gpu:
  platform = "gpu"


def _shapes(*shapes):
  return {f"w{i}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(shapes)}


def test_auto_takes_onednn_for_models_from_vit_s_up(monkeypatch):
  """Measured (docs/performance.md): oneDNN wins from a ViT-S (384 x 1536 MLP) up, is level
  with Eigen in training at 128 x 512 and 20% slower on the demo's 64 x 128 tower."""
  monkeypatch.delenv(xla_cpu.ENV, raising=False)
  b16 = _shapes((12, 768, 3072), (12, 3072), (1, 196, 768))  # stacked layers: one layer's matrix
  assert xla_cpu.largest_kernel(b16) == 768 * 3072
  assert xla_cpu.largest_kernel({"a": None, "b": jnp.zeros(3)}) == 0
  assert xla_cpu.resolve("auto", b16) == xla_cpu.choose(jax.devices(), "auto", b16) == "onednn"
  assert xla_cpu.resolve("auto", _shapes((384, 1536))) == "onednn"
  assert xla_cpu.resolve("auto", _shapes((128, 512), (4, 128, 512))) == "eigen"
  tiny = create_model(_tiny())[1]  # the head's 512 x 512 does not count
  assert xla_cpu.resolve("auto", tiny) == "eigen"
  assert xla_cpu.resolve("auto", {**tiny, "backbone": b16}) == "onednn"
  assert xla_cpu.resolve("auto") == "eigen"  # no params: a small model
  assert xla_cpu.resolve("eigen", b16) == "eigen"  # a config's own choice stands
  assert xla_cpu.choose([_Gpu()], "auto", b16) is None


def test_a_persistent_cache_changes_no_kernel_and_keeps_no_onednn_program(monkeypatch, tmp_path):
  """A run with a cache and one without compile the same program and give the same scores to
  the last bit. The oneDNN program is left out of the cache, without jax's warning; an Eigen
  program is kept."""
  monkeypatch.delenv(xla_cpu.ENV, raising=False)
  b16 = _shapes((12, 768, 3072))
  w = np.random.default_rng(0).normal(size=(32, 48)).astype(np.float32)
  x = np.random.default_rng(1).normal(size=(64, 32)).astype(np.float32)

  def scores(dots):
    return np.asarray(parallel.jit_eval_step(lambda w, x: jnp.tanh(x @ w) @ w.T,
                                             parallel.make_mesh(), dots)(w, x))

  with parallel.persistent_compile_cache(None):
    assert xla_cpu.resolve("auto", b16) == "onednn"
    assert _eval_dots("onednn") == {"__onednn_fusion"}
    uncached = scores("onednn")
  cache = tmp_path / "cache"
  with parallel.persistent_compile_cache(cache), warnings.catch_warnings():
    warnings.simplefilter("error")  # jax's "Error writing persistent compilation cache entry"
    assert xla_cpu.resolve("auto", b16) == "onednn"
    cached = scores("onednn")
    assert not cache.exists() or not list(cache.iterdir())  # nothing of it stored
    scores("eigen")
    assert len(list(cache.iterdir())) == 1
  np.testing.assert_array_equal(cached, uncached)  # the same program


def test_the_cache_note_names_the_setting_where_programs_cannot_be_cached():
  assert "IQA_JAX_CPU_DOTS=eigen" in xla_cpu.cache_note("onednn")
  assert xla_cpu.cache_note("eigen") is xla_cpu.cache_note(None) is None


def test_auto_follows_the_environment_and_bad_names_say_where(monkeypatch):
  monkeypatch.delenv(xla_cpu.ENV, raising=False)
  assert xla_cpu.resolve("auto") == xla_cpu.resolve(None) == "eigen"
  monkeypatch.setenv(xla_cpu.ENV, "onednn")
  assert xla_cpu.resolve("auto") == "onednn"
  assert xla_cpu.resolve("ynnpack") == "ynnpack"  # a config's own choice wins
  monkeypatch.setenv(xla_cpu.ENV, "mkl")
  with pytest.raises(ValueError, match=r"\$IQA_JAX_CPU_DOTS='mkl': choose one of auto, eigen"):
    xla_cpu.resolve("auto")
  with pytest.raises(ValueError, match=r"^cpu_dots='fast'"):
    xla_cpu.resolve("fast")


def test_no_options_off_the_cpu_or_where_xla_rejects_them(monkeypatch):
  assert xla_cpu.compiler_options([_Gpu()], "eigen") is None
  assert xla_cpu.compiler_options(jax.devices(), "ynnpack") is None
  monkeypatch.setitem(xla_cpu._OPTIONS, "eigen", {"xla_cpu_no_such_option": True})
  with pytest.warns(UserWarning, match="does not take the CPU dot options"):
    assert xla_cpu.compiler_options(jax.devices(), "eigen") is None


def _tiny():
  c = base_config()
  c.model.init = None
  c.model.arch = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, patch_size=8, image_size=32)
  c.model.dtype = "float32"
  c.model.lora.dropout = 0.0
  c.data.image_size = 32
  c.optim.lr = c.optim.backbone_lr = 1e-3
  c.optim.schedule = "constant"
  return c


@pytest.fixture(scope="module")
def steps_by_kernel():
  config = _tiny()
  model, params, _ = create_model(config)
  tx, labels = make_optimizer(config, params, steps_per_epoch=10)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
  batch = {"image": images, "mos": rng.uniform(size=8).astype(np.float32)}
  mesh = parallel.make_mesh()
  out = {}
  for dots in ("ynnpack", "eigen", "onednn"):
    score = parallel.jit_eval_step(make_eval_step(model), mesh, dots)
    step = parallel.jit_train_step(functools.partial(make_train_step, model, tx, labels,
                                                     with_grad_norm=True), mesh,
                                   donate=False, cpu_dots=dots)
    new, metrics = step(state, parallel.put_batch(batch, mesh))
    out[dots] = {"scores": np.asarray(score(params, images)), "loss": float(metrics["loss"]),
                 "grad_norm": float(metrics["grad_norm"]),
                 "params": new.params,
                 "kernels": _kernels(score.jitted.lower(params, images).compile().as_text()),
                 "train_kernels": _kernels(step.lower(state, parallel.put_batch(batch, mesh))
                                           .compile().as_text())}
  return out


@pytest.mark.parametrize("dots", ["eigen", "onednn"])
def test_scores_and_a_train_step_match_the_default_kernels(steps_by_kernel, dots):
  ref, got = steps_by_kernel["ynnpack"], steps_by_kernel[dots]
  # Another program, not the default under a new name: fewer YNNPACK fusions (it keeps the
  # reductions), and oneDNN's where asked for.
  assert got["kernels"]["__ynn_fusion"] < ref["kernels"]["__ynn_fusion"]
  assert (got["kernels"]["__onednn_fusion"] > 0) == (dots == "onednn")
  # A oneDNN train step leaves the reductions to XLA (xla_cpu._TRAIN): YNNPACK keeps the
  # patch embedding's convolution alone, fewer fusions than under Eigen's dots.
  if dots == "onednn":
    assert got["train_kernels"]["__onednn_fusion"] > 0
    assert 0 < got["train_kernels"]["__ynn_fusion"] < \
        steps_by_kernel["eigen"]["train_kernels"]["__ynn_fusion"]
  assert np.abs(got["scores"] - ref["scores"]).max() <= SCORE_TOL
  assert abs(got["loss"] - ref["loss"]) <= LOSS_TOL
  assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=GRAD_NORM_RTOL)
  assert _max_diff(got["params"], ref["params"]) <= PARAM_TOL


# Threefry-2x32 (20 rounds) known answers from Random123's kat_vectors: (key, counter) -> bits.
THREEFRY_KAT = [((0, 0), (0, 0), (0x6b200159, 0x99ba4efe)),
                ((0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff), (0x1cb996fc, 0xbb002be7)),
                ((0x13198a2e, 0x03707344), (0x243f6a88, 0x85a308d3), (0xc4923a9c, 0x483df7a0))]


def test_the_unrolled_threefry_draws_the_same_bits_as_the_rolled_loop():
  from jax._src.random import threefry2x32 as threefry
  from jax.extend.random import threefry_2x32
  assert xla_cpu.unrolled_threefry()
  u32 = functools.partial(jnp.asarray, dtype=jnp.uint32)
  for key, count, bits in THREEFRY_KAT:
    assert [int(b) for b in jax.jit(threefry_2x32)(u32(key), u32(count))] == list(bits)
  # A dropout mask's program now lowers without the loop, and draws jax's rolled loop's bits.
  mask = jax.jit(lambda k: jax.random.bernoulli(k, 0.95, (8, 49, 96)))
  assert "while" not in mask.lower(jax.random.key(3)).as_text()
  shape = (8, 49, 96)
  k1, k2 = jnp.full(shape, 3, jnp.uint32), jnp.full(shape, 7, jnp.uint32)
  x1, x2 = (u32(np.random.default_rng(i).integers(0, 2**32, shape, dtype=np.uint32))
            for i in (0, 1))
  unrolled = jax.jit(threefry.threefry2x32_p.bind)(k1, k2, x1, x2)
  rolled_loop = jax.jit(functools.partial(threefry._threefry2x32_lowering,
                                          use_rolled_loops=True))
  assert "while" in rolled_loop.lower(k1, k2, x1, x2).as_text()
  rolled = rolled_loop(k1, k2, x1, x2)
  for a, b in zip(unrolled, rolled, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_fresh_process_draws_its_first_init_with_the_unrolled_threefry():
  """Every program of a process, the model's random init first, lowers threefry one way, so a
  run's init compiles alike whether or not a train step was built before it in that process."""
  script = ("import jax, jax.numpy as jnp; from conftest import tiny_demo_config; "
            "from iqa_jax.models.model import create_model; create_model(tiny_demo_config('.')); "
            "draw = jax.jit(lambda k: jax.random.normal(k, (4, 4)));"
            "print('rolled' if 'while' in draw.lower(jax.random.key(0)).as_text() else 'unrolled')")
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.split()[-1] == "unrolled"


def test_training_with_a_cache_says_its_onednn_programs_are_not_kept(tiny_demo_dir, tmp_path,
                                                                     capsys):
  from conftest import compile_cache, tiny_demo_config

  from iqa_jax.training import loop as train
  config = tiny_demo_config(tiny_demo_dir, **{"optim.epochs": 1, "cpu_dots": "onednn",
                                              "compilation_cache": str(tmp_path / "xla")})
  with compile_cache(None):  # the run's own cache setting is undone afterwards
    train.train_and_evaluate(config, str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert out.count("note: these CPU programs use oneDNN's dot kernels") == 1
