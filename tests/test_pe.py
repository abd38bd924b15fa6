"""Perception Encoder against timm's Eva (vit_pe_core_*), the public implementation holding PE.

timm imports torchvision at module level (transforms, datasets, FrozenBatchNorm2d), but the Eva
forward pass never calls it, and torchvision does not import beside the CPU torch these tests
use. Where torchvision is missing or broken, placeholder `torchvision.*` modules stand in while
timm is imported and the reference built (a placeholder raises if anything instantiates it), and
are removed before any other test runs. CI installs timm alone, `pip install --no-deps timm`: its
other requirements (torch, safetensors, huggingface_hub, pyyaml) are test dependencies already.
"""
import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import missing, require, train_two_steps, zeros_like_init

from iqa_jax.models import hf_io, pe, posemb

torch = require("torch")

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, ref_feat_shape=(4, 4),
            attn_pool_num_heads=2)
ARCH = "vit_pe_core_large_patch14_336"


class _AnyAttr(type):
  def __getattr__(cls, name):
    if name.startswith("__"):
      raise AttributeError(name)
    member = _AnyAttr(name, (cls,), {})  # distinct per name, so enum-like members stay distinct
    setattr(cls, name, member)
    return member


class _Placeholder(metaclass=_AnyAttr):
  def __init__(self, *args, **kwargs):
    raise RuntimeError("torchvision is a placeholder in this test; timm's Eva should not need it")


class _PlaceholderModule(types.ModuleType):
  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return _Placeholder


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  def find_spec(self, name, path, target=None):
    if name == "torchvision" or name.startswith("torchvision."):
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    module = _PlaceholderModule(spec.name)
    module.__path__ = []
    return module

  def exec_module(self, module):
    pass


@contextlib.contextmanager
def _timm():
  """Yields timm; placeholder torchvision modules exist only inside: other tests never see them."""
  if importlib.util.find_spec("timm") is None:
    missing("timm is not installed: pip install --no-deps timm==1.0.29")
  try:
    import torchvision  # noqa: F401
    placeholder = None
  except Exception:  # noqa: BLE001 - missing, or "operator torchvision::nms does not exist"
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
      del sys.modules[name]  # a half-imported broken build
    placeholder = _PlaceholderFinder()
    sys.meta_path.insert(0, placeholder)
  try:
    import timm
    yield timm
  finally:
    if placeholder is not None:
      sys.meta_path.remove(placeholder)
      for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def tiny_pe(tmp_path_factory):
  """A perturbed random timm PE-Core saved as the hub's timm checkpoints are (safetensors, json)."""
  from safetensors.torch import save_file
  torch.manual_seed(0)
  with _timm() as timm:
    model = timm.create_model(ARCH, pretrained=False, num_classes=16, dynamic_img_size=True,
                              **TINY).eval()
  with torch.no_grad():  # perturb so every weight (biases, LN affine, latent) is exercised
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
    model.head.weight.normal_(0.0, 0.3)  # timm scales the head init by 1e-3: make outputs O(1)
  folder = tmp_path_factory.mktemp("tiny_pe")
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            folder / "model.safetensors")
  (folder / "config.json").write_text(json.dumps({
      "architecture": ARCH, "num_classes": 16, "model_args": TINY,
      "pretrained_cfg": {"input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 1.0,
                         "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
  return model, folder


@pytest.mark.parametrize("n_in,n_out", [(4, 6), (6, 4), (24, 36), (7, 3), (5, 5)])
def test_antialiased_bicubic_matches_torch(n_in, n_out):
  x = torch.randn(1, 1, n_in, 3, dtype=torch.float64)
  ref = torch.nn.functional.interpolate(x, size=(n_out, 3), mode="bicubic", antialias=True)
  ours = posemb.torch_aa_bicubic_matrix(n_in, n_out) @ x[0, 0].numpy()
  assert np.abs(ours - ref[0, 0].numpy()).max() <= 1e-9


@pytest.mark.parametrize("tap,scan", [(2, True), (-1, False)])
def test_tapped_pooled_projection_matches_timm(tiny_pe, tap, scan):
  import copy
  model, folder = tiny_pe
  images = np.random.RandomState(0).randn(2, 48, 40, 3).astype(np.float32)  # 6x5 grid vs 4x4
  module, params, pp = pe.load_timm_pe(str(folder), tap_layer=tap, scan=scan, lora_rank=2)
  params = hf_io.merge_loaded(zeros_like_init(module, images), params)  # LoRA leaves 0
  feature, out = jax.jit(module.apply)({"params": params}, jnp.asarray(images))
  # timm's own way to read block `tap`: truncate the blocks, keep the final norm and the head.
  reference = copy.deepcopy(model)
  reference.prune_intermediate_layers(indices=[tap % TINY["depth"]], prune_norm=False,
                                      prune_head=False)
  with torch.no_grad():
    ref = reference(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  err = np.abs(np.asarray(feature) - ref).max()
  print(f"PE tap {tap} projected feature max abs error vs timm: {err:.2e}")
  assert err <= 1e-5
  assert len(reference.blocks) == module.tap_layer % TINY["depth"] + 1
  assert (pp["size"], pp["crop"], pp["resample"], pp["mean"]) == (32, None, "bicubic", (0.5,) * 3)


def test_build_lora_on_q_and_k_only():
  cfg = ml_collections.ConfigDict(dict(
      backbone="pe", init=None, finetune="lora", lora=dict(rank=2, alpha=8.0, dropout=0.05),
      variant=ARCH, arch=dict(TINY, num_classes=16), tap_layer=1, dtype="float32", remat="none",
      scan=True, attention="xla"))
  bb = pe.build(cfg)
  params = zeros_like_init(bb.module, np.zeros((1, 32, 32, 3), np.float32))
  paths = ["/".join(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert sorted(p for p in paths if "lora_" in p) == [
      f"blocks/attn/{p}/lora_{f}" for p in "kq" for f in "ab"]
  assert params["blocks"]["norm1"]["scale"].shape[0] == 2  # blocks past the tap are not built


def test_two_train_steps_through_the_train_loop(tmp_path):
  """configs/pe.py, tiny random tower tapped at block 2: 8 train images (6 val), batch 4 = 2 x 2."""
  results, history = train_two_steps(tmp_path, "pe", dict(TINY, num_classes=16), tap_layer=2)
  assert results["status"] == "done" and history[0]["step"] == 2
  assert np.isfinite(history[0]["train_loss"])
