"""Parity of the Flax SigLIP tower with transformers.SiglipVisionModel (float32 and bf16)."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from iqa_jax.models import siglip
from iqa_jax.models.posemb import resample_grid


def _torch_out(folder, x_nchw, **kw):
  model = transformers.SiglipVisionModel.from_pretrained(folder).eval()
  with torch.no_grad():
    return model(torch.from_numpy(x_nchw), **kw)


def _images(n=3, size=32, seed=0):
  return np.random.RandomState(seed).randn(n, 3, size, size).astype(np.float32)


def test_float32_parity_last_hidden_and_pooled(tiny_siglip_dir):
  x = _images()
  ref = _torch_out(tiny_siglip_dir, x)
  module, params, pp = siglip.load_hf_siglip(str(tiny_siglip_dir))
  pooled, out = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  err = np.abs(np.asarray(pooled) - ref.pooler_output.numpy()).max()
  print(f"SigLIP pooler_output max abs error vs HF: {err:.2e}")
  np.testing.assert_allclose(out["encoded"], ref.last_hidden_state.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), atol=1e-5, rtol=0)
  assert pp == {"size": 32, "crop": None, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                "resample": "bilinear"}


def test_unscanned_and_remat_match_scan(tiny_siglip_dir):
  x = jnp.asarray(_images().transpose(0, 2, 3, 1))
  module, params, _ = siglip.load_hf_siglip(str(tiny_siglip_dir))
  ref, _ = module.apply({"params": params}, x)
  loop, p2, _ = siglip.load_hf_siglip(str(tiny_siglip_dir), scan=False)
  got, out = loop.apply({"params": p2}, x)
  np.testing.assert_allclose(got, ref, atol=1e-5)
  assert "layer_1" in out
  remat, p3, _ = siglip.load_hf_siglip(str(tiny_siglip_dir), remat="nothing")
  np.testing.assert_allclose(remat.apply({"params": p3}, x)[0], ref, atol=1e-5)


def test_bfloat16_within_stated_tolerance(tiny_siglip_dir):
  """bf16 compute (params float32): pooled output within 0.05 abs of the float32 reference."""
  x = _images()
  ref = _torch_out(tiny_siglip_dir, x)
  module, params, _ = siglip.load_hf_siglip(str(tiny_siglip_dir), dtype=jnp.bfloat16)
  pooled, _ = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  err = np.abs(np.asarray(pooled, np.float32) - ref.pooler_output.numpy()).max()
  scale = np.abs(ref.pooler_output.numpy()).max()
  assert err < 0.05 * max(1.0, scale), err


def test_interpolated_position_embedding_matches_hf(tiny_siglip_dir):
  x = _images(2, 48)  # native grid 4x4 -> 6x6
  ref = _torch_out(tiny_siglip_dir, x, interpolate_pos_encoding=True)
  module, params, _ = siglip.load_hf_siglip(str(tiny_siglip_dir))
  pooled, out = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(out["encoded"], ref.last_hidden_state.numpy(), atol=1e-5)


def test_resample_grid_equals_torch_bicubic():
  table = np.random.RandomState(1).randn(7 * 7, 5).astype(np.float32)
  grid = torch.from_numpy(table.reshape(1, 7, 7, 5)).permute(0, 3, 1, 2)
  want = torch.nn.functional.interpolate(grid, size=(10, 4), mode="bicubic", align_corners=False)
  want = want.permute(0, 2, 3, 1).reshape(40, 5).numpy()
  np.testing.assert_allclose(resample_grid(jnp.asarray(table), (7, 7), (10, 4)), want, atol=1e-5)


def test_sharded_safetensors_and_siglipmodel_prefix(tmp_path, tiny_siglip_dir):
  """A full SiglipModel (text+vision, 'vision_model.' prefix) saved in several shards loads."""
  vcfg = transformers.SiglipVisionConfig.from_pretrained(tiny_siglip_dir)
  tcfg = transformers.SiglipTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, vocab_size=50)
  torch.manual_seed(3)
  full = transformers.SiglipModel(transformers.SiglipConfig(text_config=tcfg.to_dict(),
                                                            vision_config=vcfg.to_dict())).eval()
  full.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  x = _images(2)
  with torch.no_grad():
    want = full.vision_model(torch.from_numpy(x)).pooler_output.numpy()
  module, params, _ = siglip.load_hf_siglip(str(tmp_path))
  got, _ = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_missing_checkpoint_error_says_what_to_pass(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.model.init"):
    siglip.load_hf_siglip(str(tmp_path / "nope"))
