"""DINOv3 ViT against transformers.DINOv3ViTModel (float32, tiny random config, RoPE, registers)."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import require, train_two_steps, zeros_like_init

from iqa_jax.models import dinov3, hf_io

torch = require("torch")
transformers = require("transformers")

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            patch_size=8, image_size=32, num_register_tokens=2, use_gated_mlp=True,
            hidden_act="silu", layerscale_value=0.5)


def _save_tiny(tmp_path_factory, **overrides):
  torch.manual_seed(0)
  model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**{**TINY, **overrides})).eval()
  with torch.no_grad():  # perturb so every weight (biases, LN affine, layer scales) is exercised
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp("tiny_dinov3")
  model.save_pretrained(folder)
  # The hub's preprocessor_config.json (the processor class itself needs torchvision).
  (folder / "preprocessor_config.json").write_text(json.dumps({
      "size": {"height": 32, "width": 32}, "resample": 2, "do_center_crop": False,
      "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
  return model, folder


def _compare(model, folder, images, **kwargs):
  module, params, pp = dinov3.load_hf_dinov3(str(folder), **kwargs)
  params = hf_io.merge_loaded(zeros_like_init(module, images), params)  # LoRA leaves 0
  feature, out = jax.jit(module.apply)({"params": params}, jnp.asarray(images))
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state
  assert np.abs(np.asarray(out["encoded"]) - ref.numpy()).max() <= 1e-5
  return np.abs(np.asarray(feature) - ref.mean(dim=1).numpy()).max(), pp


@pytest.mark.parametrize("scan", [True, False])
def test_mean_feature_matches_hf_gated_with_registers(tmp_path_factory, scan):
  model, folder = _save_tiny(tmp_path_factory)
  images = np.random.RandomState(0).randn(2, 48, 40, 3).astype(np.float32)  # 6x5 grid, not square
  err, pp = _compare(model, folder, images, scan=scan, lora_rank=4, remat="nothing")
  print(f"DINOv3 mean feature max abs error vs HF: {err:.2e}")
  assert err <= 1e-5
  assert (pp["size"], pp["crop"], pp["resample"]) == (32, None, "bilinear")


def test_plain_mlp_without_registers(tmp_path_factory):
  model, folder = _save_tiny(tmp_path_factory, use_gated_mlp=False, hidden_act="gelu",
                             num_register_tokens=0, key_bias=True)
  images = np.random.RandomState(1).randn(1, 32, 32, 3).astype(np.float32)
  err, _ = _compare(model, folder, images)
  assert err <= 1e-5


def test_build_lora_and_train_time_rope_augmentation():
  cfg = ml_collections.ConfigDict(dict(
      backbone="dinov3", init=None, finetune="lora", lora=dict(rank=2, alpha=8.0, dropout=0.0),
      arch=dict(TINY), dtype="float32", remat="none", scan=True, attention="xla"))
  module = dinov3.build(cfg).module
  x = np.random.RandomState(2).randn(1, 32, 32, 3).astype(np.float32)
  rs = np.random.RandomState(3)
  params = jax.tree.map(lambda z: (0.2 * rs.randn(*z.shape)).astype(z.dtype),
                        zeros_like_init(module, x))
  paths = ["/".join(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert sorted(p for p in paths if "lora_" in p) == [
      "layer/attention/k_proj/lora_a", "layer/attention/k_proj/lora_b",
      "layer/attention/q_proj/lora_a", "layer/attention/q_proj/lora_b"]
  run = jax.jit(lambda p, rng, train: module.apply({"params": p}, x, train=train,
                                                   rngs={"dropout": rng})[0], static_argnums=2)
  evaluated = run(params, jax.random.PRNGKey(0), False)
  trained = run(params, jax.random.PRNGKey(0), True)  # pos_embed_rescale=2.0 rescales RoPE
  assert float(jnp.abs(trained - evaluated).max()) > 1e-6


def test_two_train_steps_through_the_train_loop(tmp_path):
  """configs/dinov3.py with a tiny random tower: 8 train images (6 val), batch 4 = 2 x 2."""
  results, history = train_two_steps(tmp_path, "dinov3", dict(TINY))
  assert results["status"] == "done" and history[0]["step"] == 2
  assert np.isfinite(history[0]["train_loss"])
