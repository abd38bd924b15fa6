"""SigLIP2 NaFlex against transformers.Siglip2VisionModel and Siglip2ImageProcessorPil (float32)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import require, train_two_steps, zeros_like_init

from iqa_jax.data import pp as pp_lib
from iqa_jax.models import hf_io
from iqa_jax.models import siglip2_naflex as naflex

torch = require("torch")
transformers = require("transformers")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            patch_size=4, num_patches=16)
BUDGET = 20  # max_num_patches: aspect ratios that leave padding


@pytest.fixture(scope="module")
def tiny_naflex(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**TINY)).eval()
  with torch.no_grad():  # perturb so every weight (biases, LN affine, probe) is exercised
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp("tiny_siglip2_naflex")
  model.save_pretrained(folder)
  processor = transformers.Siglip2ImageProcessorPil(patch_size=4, max_num_patches=BUDGET)
  processor.save_pretrained(folder)
  return model, processor, folder


def _hf(model, pixel_values, mask, shapes):
  with torch.no_grad():
    out = model(pixel_values=torch.as_tensor(pixel_values),
                pixel_attention_mask=torch.as_tensor(mask),
                spatial_shapes=torch.as_tensor(shapes))
  return out.pooler_output.numpy(), out.last_hidden_state.numpy()


def _load(folder, images, **kwargs):
  module, params, pp = naflex.load_hf_siglip2_naflex(str(folder), **kwargs)
  params = hf_io.merge_loaded(zeros_like_init(module, images), params)  # LoRA leaves 0
  return module, params, pp


def test_pp_matches_hf_processor_and_feature_matches_hf(tiny_naflex):
  model, processor, folder = tiny_naflex
  rs = np.random.RandomState(0)
  photos = [rs.randint(0, 256, (23, 50, 3), np.uint8), rs.randint(0, 256, (40, 17, 3), np.uint8)]
  ref = processor(images=photos, return_tensors="np")
  module, params, pp = _load(folder, np.zeros((1, 16, 16, 3), np.float32), scan=False, lora_rank=2)
  assert pp["max_num_patches"] == BUDGET and pp["patch_size"] == 4

  pp_fn = pp_lib.get_preprocess_fn(
      naflex.naflex_pp(4, BUDGET, pp["resample"], pp["mean"], pp["std"]))
  packed = np.stack([pp_fn({"image": p})["image"] for p in photos])
  np.testing.assert_array_equal(packed[:, 0, :2], ref["spatial_shapes"])
  assert np.abs(packed[:, 1:] - ref["pixel_values"]).max() <= 1e-5
  assert ref["pixel_attention_mask"].min() == 0  # the test covers padding

  feature, out = jax.jit(module.apply)({"params": params}, jnp.asarray(packed))
  pooled, hidden = _hf(model, ref["pixel_values"], ref["pixel_attention_mask"],
                       ref["spatial_shapes"])
  err = np.abs(np.asarray(feature) - pooled).max()
  print(f"SigLIP2 NaFlex pooler_output max abs error vs HF: {err:.2e}")
  assert err <= 1e-5
  valid = ref["pixel_attention_mask"].astype(bool)
  assert np.abs(np.asarray(out["encoded"])[valid] - hidden[valid]).max() <= 1e-5


def test_square_images_are_a_full_grid(tiny_naflex):
  model, _, folder = tiny_naflex
  images = np.random.RandomState(1).randn(2, 16, 12, 3).astype(np.float32)  # 4x3 grid
  module, params, _ = _load(folder, images, remat="nothing")
  feature, _ = jax.jit(module.apply)({"params": params}, jnp.asarray(images))
  patches = np.stack([naflex.patchify(im, 4) for im in images])
  pooled, _ = _hf(model, patches, np.ones(patches.shape[:2], np.int32), np.array([[4, 3]] * 2))
  assert np.abs(np.asarray(feature) - pooled).max() <= 1e-5


def test_naflex_size_agrees_with_hf():
  from transformers.models.siglip2.image_processing_pil_siglip2 import (
    get_image_size_for_max_num_patches,
  )
  rs = np.random.RandomState(2)
  for h, w, p, n in zip(rs.randint(8, 2000, 40), rs.randint(8, 2000, 40), [14, 16] * 20,
                        rs.choice([64, 256, 576, 1024], 40), strict=True):
    assert naflex.naflex_size(h, w, p, n) == get_image_size_for_max_num_patches(h, w, p, n)


def test_build_lora_on_q_and_k_and_padded_eval_rows_stay_finite():
  cfg = ml_collections.ConfigDict(dict(
      backbone="siglip2_naflex", init=None, finetune="lora", arch=dict(TINY),
      lora=dict(rank=2, alpha=8.0, dropout=0.0), dtype="float32", remat="none", scan=True,
      attention="xla"))
  module = naflex.build(cfg).module
  packed = np.zeros((2, 1 + BUDGET, 48), np.float32)  # row 1: an all-zero padded eval example
  packed[0, 0, :2] = (4, 5)
  packed[0, 1:21] = np.random.RandomState(3).randn(20, 48)
  params = zeros_like_init(module, packed)
  paths = ["/".join(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert sorted(p for p in paths if "lora_" in p) == [
      "encoder_layers/self_attn/k_proj/lora_a", "encoder_layers/self_attn/k_proj/lora_b",
      "encoder_layers/self_attn/q_proj/lora_a", "encoder_layers/self_attn/q_proj/lora_b"]
  rs = np.random.RandomState(4)
  params = jax.tree.map(lambda z: (0.1 * rs.randn(*z.shape)).astype(z.dtype), params)
  feature, _ = jax.jit(module.apply)({"params": params}, jnp.asarray(packed))
  assert np.isfinite(np.asarray(feature)).all()


def test_two_train_steps_through_the_train_loop(tmp_path):
  """configs/siglip2_naflex.py, native aspect, tiny random tower: 8 train images (6 val), 2 x 2."""
  results, history = train_two_steps(tmp_path, "siglip2_naflex", dict(TINY),
                                     data={"pp": naflex.naflex_pp(4, BUDGET)})  # native aspect
  assert results["status"] == "done" and history[0]["step"] == 2
  assert np.isfinite(history[0]["train_loss"])
