"""Shared fixtures: tiny random HF models saved to temporary folders."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


TINY_SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   patch_size=8, image_size=32, layer_norm_eps=1e-6)


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory):
  """A random transformers.SiglipVisionModel saved with save_pretrained, plus its preprocessor."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY_SIGLIP)).eval()
  # Random init leaves some tensors at zero or one; perturb all so every weight is exercised.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp("tiny_siglip")
  model.save_pretrained(folder)
  # resample=2 (bilinear) as in the released google/siglip2-so400m-patch16-512 preprocessor_config.json
  transformers.SiglipImageProcessor(size={"height": 32, "width": 32}, resample=2).save_pretrained(folder)
  return folder


@pytest.fixture(scope="session")
def tiny_demo_dir(tmp_path_factory):
  """A small demo set: 4 photos x 3 tiles x 4 distortions x 5 levels = 240 images."""
  from iqa_jax.data import demo
  folder = tmp_path_factory.mktemp("demo_data")
  demo.build_demo(str(folder), size=32, photos=("astronaut", "camera", "chelsea", "coffee"), tiles=3)
  return folder


def tiny_demo_config(data_dir, **overrides):
  """configs/demo.py shrunk for tests: 32 px, 1-layer tower, 2 epochs."""
  import importlib.util
  from pathlib import Path
  spec = importlib.util.spec_from_file_location(
      "demo_config", Path(__file__).resolve().parent.parent / "configs" / "demo.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(f"dir={data_dir},epochs=2,batch=8")
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
  """(config, workdir, results) of a 2-epoch run of the tiny demo config, shared by tests."""
  from iqa_jax import train
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_demo_config(tiny_demo_dir)
  return config, workdir, train.train_and_evaluate(config, str(workdir))
