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
