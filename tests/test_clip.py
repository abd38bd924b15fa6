"""CLIP tower against transformers.CLIPVisionModelWithProjection (float32, tiny random config)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import require, train_two_steps, zeros_like_init

from iqa_jax.models import clip, hf_io

torch = require("torch")
transformers = require("transformers")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            patch_size=8, image_size=32, projection_dim=16)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY)).eval()
  with torch.no_grad():  # perturb so every weight (biases, LN affine) is exercised
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp("tiny_clip")
  model.save_pretrained(folder)
  transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                     crop_size={"height": 32, "width": 32}).save_pretrained(folder)
  return model, folder


def _reference(model, images_nhwc):
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2)),
                interpolate_pos_encoding=True)
  return out.image_embeds.numpy()


@pytest.mark.parametrize("scan", [True, False])
def test_image_embeds_match_hf_at_non_native_size(tiny_clip, scan):
  model, folder = tiny_clip
  module, params, pp = clip.load_hf_clip(str(folder), scan=scan, lora_rank=4)
  images = np.random.RandomState(0).randn(2, 48, 40, 3).astype(np.float32)  # grid 6x5 vs 4x4
  params = hf_io.merge_loaded(zeros_like_init(module, images), params)  # LoRA leaves 0
  feature, out = jax.jit(module.apply)({"params": params}, jnp.asarray(images))
  err = np.abs(np.asarray(feature) - _reference(model, images)).max()
  print(f"CLIP image_embeds max abs error vs HF: {err:.2e}")
  assert feature.shape == (2, 16)
  assert err <= 1e-5
  assert pp["crop"] == 32 and pp["resample"] == "bicubic"
  assert pp["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_native_size_and_intermediates(tiny_clip):
  model, folder = tiny_clip
  module, params, _ = clip.load_hf_clip(str(folder))
  images = np.random.RandomState(1).randn(1, 32, 32, 3).astype(np.float32)
  feature, out = jax.jit(module.apply)({"params": params}, jnp.asarray(images))
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                output_hidden_states=True)
  assert np.abs(np.asarray(feature) - ref.image_embeds.numpy()).max() <= 1e-5
  assert np.abs(np.asarray(out["encoded"]) - ref.last_hidden_state.numpy()).max() <= 1e-5
  assert out["layers"].shape == (2, 1, 17, 32)


def test_build_lora_on_q_and_k_only():
  cfg = ml_collections.ConfigDict(dict(
      backbone="clip", init=None, finetune="lora", lora=dict(rank=2, alpha=8.0, dropout=0.05),
      arch=dict(TINY), dtype="float32", remat="nothing", scan=True, attention="xla"))
  bb = clip.build(cfg)
  assert bb.params is None and bb.preprocessing["resample"] == "bicubic"
  params = zeros_like_init(bb.module, np.zeros((1, 32, 32, 3), np.float32))
  paths = ["/".join(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  lora = sorted(p for p in paths if "lora_" in p)
  assert lora == [f"encoder_layers/self_attn/{p}_proj/lora_{f}" for p in "kq" for f in "ab"]
  cfg.finetune = "frozen"
  assert clip.build(cfg).module.lora_rank == 0


def test_two_train_steps_through_the_train_loop(tmp_path):
  """configs/clip.py with a tiny random tower: 8 train images (6 val), batch 4 = 2 x 2."""
  results, history = train_two_steps(tmp_path, "clip", dict(TINY))
  assert results["status"] == "done" and history[0]["step"] == 2
  assert np.isfinite(history[0]["train_loss"])
