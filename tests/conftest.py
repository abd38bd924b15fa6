"""Shared fixtures: tiny random HF models saved to temporary folders."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import importlib  # noqa: E402

import pytest  # noqa: E402


def missing(message: str):
  """Skips the test (or module) for a missing reference package; under CI (the CI environment
  variable set, as .ci/run does) it fails instead, so a broken install step cannot pass."""
  if os.environ.get("CI"):
    pytest.fail(f"{message} (CI is set: every reference must be installed)", pytrace=False)
  pytest.skip(message, allow_module_level=True)


def require(module: str, install: str = "pip install -e '.[test]'"):
  """`module` imported, or `missing` with the command that installs it."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    missing(f"{module} is not installed ({e}): {install}")


def compile_cache(folder):
  """jax's persistent compilation cache in `folder` (None: off) while the block runs."""
  from iqa_jax.parallel import persistent_compile_cache
  return persistent_compile_cache(folder, min_compile_s=0.2)


@pytest.fixture(scope="session", autouse=True)
def session_compilation_cache(tmp_path_factory):
  """XLA programs cached on disk for this pytest session only (a fresh folder each run): a test
  that compiles a program an earlier test compiled (the same tiny train step in another run
  folder, a resume after a kill) loads it instead of compiling again. Same programs, same
  numbers; tests that set their own cache (experiments, config.compilation_cache) still do.
  IQA_TEST_COMPILE_CACHE=0 turns it off."""
  if os.environ.get("IQA_TEST_COMPILE_CACHE", "1") == "0":
    yield None
    return
  with compile_cache(tmp_path_factory.mktemp("jax_compile_cache")) as folder:
    yield folder


def compile_cache_env(folder) -> dict:
  """Environment variables that give a subprocess the compilation cache in `folder` (None:
  none), with the settings `compile_cache` uses."""
  if folder is None:
    return {}
  return {"JAX_COMPILATION_CACHE_DIR": str(folder),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture
def fresh_compiles():
  """No compilation cache in this test: every program it runs is compiled anew."""
  with compile_cache(None):
    yield


TINY_SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   patch_size=8, image_size=32, layer_norm_eps=1e-6)


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory):
  """A random transformers.SiglipVisionModel saved with save_pretrained, plus its preprocessor."""
  torch = require("torch")
  transformers = require("transformers")
  torch.manual_seed(0)
  model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY_SIGLIP)).eval()
  # Random init leaves some tensors at zero or one; perturb all so every weight is exercised.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp("tiny_siglip")
  model.save_pretrained(folder)
  # resample=2 (bilinear), as the released google/siglip2-so400m-patch16-512 preprocessor has
  transformers.SiglipImageProcessor(size={"height": 32, "width": 32},
                                    resample=2).save_pretrained(folder)
  return folder


@pytest.fixture(scope="session")
def tiny_demo_dir(tmp_path_factory):
  """A small demo set: 4 photos x 3 tiles x 4 distortions x 5 levels = 240 images."""
  from iqa_jax.data import demo
  folder = tmp_path_factory.mktemp("demo_data")
  demo.build_demo(str(folder), size=32, photos=("astronaut", "camera", "chelsea", "coffee"),
                  tiles=3)
  return folder


def load_config(name: str, arg: str | None = None):
  """configs/<name>.py's get_config(arg), as the train CLI loads it."""
  from pathlib import Path

  from iqa_jax.defaults import load_config_file
  path = Path(__file__).resolve().parent.parent / "configs" / f"{name}.py"
  return load_config_file(f"{path}:{arg}" if arg else path)


def zeros_like_init(module, x):
  """The module's param tree, all zeros: cheaper than compiling init's random number generators."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.asarray(x))["params"]
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def tiny_csv_set(folder, n=14):
  """n random photos (odd sizes) and labels.csv: the csv dataset adapter's layout."""
  import numpy as np
  from PIL import Image
  rs = np.random.RandomState(0)
  rows = ["path,mos"]
  for i in range(n):
    Image.fromarray(rs.randint(0, 256, (30 + i, 41, 3), np.uint8)).save(folder / f"{i}.png")
    rows.append(f"{i}.png,{rs.rand():.3f}")
  (folder / "labels.csv").write_text("\n".join(rows) + "\n")
  return folder


def train_two_steps(tmp_path, config_name: str, arch: dict, data: dict | None = None, **model):
  """configs/<name>.py with a tiny random tower through the real train loop: 8 train images
  (6 val), batch 4 = 2 micro-batches x 2, one epoch -> two optimizer steps.
  -> (results, history)."""
  from iqa_jax.runs import checkpoint
  from iqa_jax.training import loop as train
  config = load_config(config_name, "head=gated")
  config.model.update(init=None, arch=arch, dtype="float32", remat="nothing", **model)
  config.data.update(name="csv", dir=str(tiny_csv_set(tmp_path)), image_size=32,
                     val_fraction=6 / 14, **(data or {}))
  config.optim.update(epochs=1, batch_size=4, grad_accum=2)
  config.update(eval_batch_size=4, progress=False)
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  return results, checkpoint.read_history(tmp_path / "run")


def tiny_demo_config(data_dir, **overrides):
  """configs/demo.py shrunk for tests: 32 px, 1-layer tower, 2 epochs."""
  c = load_config("demo", f"dir={data_dir},epochs=2,batch=8")
  c.model.arch = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, patch_size=8, image_size=32)
  c.data.image_size = 32
  c.eval_batch_size = 16
  c.progress = False
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


@pytest.fixture(scope="session")
def trained_run(tiny_demo_dir, tmp_path_factory):
  """(config, workdir, results) of a 2-epoch run of the tiny demo config, shared by tests; it
  keeps each epoch's params (ckpt/epochs/1, 2) for Grad-CAM over training."""
  from iqa_jax.training import loop as train
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_demo_config(tiny_demo_dir, keep_epoch_checkpoints=True)
  return config, workdir, train.train_and_evaluate(config, str(workdir))
