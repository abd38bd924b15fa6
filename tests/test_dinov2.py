"""DINOv2 against transformers.Dinov2Model (float32, tiny random config): mean last_hidden_state."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import require, train_two_steps, zeros_like_init

from iqa_jax.models import dinov2, hf_io

torch = require("torch")
transformers = require("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, patch_size=8,
            image_size=32)


def _save_tiny(tmp_path_factory, **extra):
  torch.manual_seed(0)
  model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY, **extra)).eval()
  with torch.no_grad():  # perturb so every weight (biases, LN affine, layer scales) is exercised
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp("tiny_dinov2")
  model.save_pretrained(folder)
  transformers.BitImageProcessorPil(size={"shortest_edge": 36},
                                    crop_size={"height": 32, "width": 32},
                                    image_mean=[0.485, 0.456, 0.406],
                                    image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
  return model, folder


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
  return _save_tiny(tmp_path_factory)


def _compare(model, folder, images, **kwargs):
  module, params, pp = dinov2.load_hf_dinov2(str(folder), **kwargs)
  params = hf_io.merge_loaded(zeros_like_init(module, images), params)  # LoRA leaves 0
  feature, out = jax.jit(module.apply)({"params": params}, jnp.asarray(images))
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state
  err = np.abs(np.asarray(feature) - ref.mean(dim=1).numpy()).max()
  assert np.abs(np.asarray(out["encoded"]) - ref.numpy()).max() <= 1e-5
  return err, pp


@pytest.mark.parametrize("scan", [True, False])
def test_mean_token_feature_matches_hf_at_non_native_size(tiny_dinov2, scan):
  model, folder = tiny_dinov2
  images = np.random.RandomState(0).randn(2, 48, 40, 3).astype(np.float32)  # grid 6x5 vs 4x4
  err, pp = _compare(model, folder, images, scan=scan, lora_rank=4)
  print(f"DINOv2 mean-token feature max abs error vs HF: {err:.2e}")
  assert err <= 1e-5
  assert pp["size"] == 36 and pp["crop"] == 32 and pp["resample"] == "bicubic"


def test_swiglu_variant_and_native_size(tmp_path_factory):
  model, folder = _save_tiny(tmp_path_factory, use_swiglu_ffn=True)
  images = np.random.RandomState(1).randn(1, 32, 32, 3).astype(np.float32)
  err, _ = _compare(model, folder, images, remat="nothing")
  assert err <= 1e-5


def test_build_lora_on_q_and_k_only():
  cfg = ml_collections.ConfigDict(dict(
      backbone="dinov2", init=None, finetune="lora", lora=dict(rank=2, alpha=8.0, dropout=0.05),
      arch=dict(TINY), dtype="float32", remat="none", scan=True, attention="xla"))
  bb = dinov2.build(cfg)
  params = zeros_like_init(bb.module, np.zeros((1, 32, 32, 3), np.float32))
  paths = ["/".join(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert sorted(p for p in paths if "lora_" in p) == [
      "encoder_layer/attention/k_proj/lora_a", "encoder_layer/attention/k_proj/lora_b",
      "encoder_layer/attention/q_proj/lora_a", "encoder_layer/attention/q_proj/lora_b"]


def test_two_train_steps_through_the_train_loop(tmp_path):
  """configs/dinov2.py with a tiny random tower: 8 train images (6 val), batch 4 = 2 x 2."""
  results, history = train_two_steps(tmp_path, "dinov2", dict(TINY))
  assert results["status"] == "done" and history[0]["step"] == 2
  assert np.isfinite(history[0]["train_loss"])
