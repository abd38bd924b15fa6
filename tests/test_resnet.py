"""ResNet against transformers.ResNetModel (pooler_output), LoraConv against peft's Conv2d LoRA."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import require, train_two_steps, zeros_like_init

from iqa_jax.models import hf_io, resnet

torch = require("torch")
transformers = require("transformers")

TINY = dict(embedding_size=8, hidden_sizes=[16, 32], depths=[2, 2], layer_type="bottleneck")


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.ResNetModel(transformers.ResNetConfig(**TINY)).eval()
  with torch.no_grad():  # perturb weights and BN statistics so every tensor is exercised
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.add_(0.1 * torch.randn_like(b))
      elif name.endswith("running_var"):
        b.mul_(torch.exp(0.3 * torch.randn_like(b)))
  folder = tmp_path_factory.mktemp("tiny_resnet")
  model.save_pretrained(folder)
  transformers.ConvNextImageProcessorPil(size={"shortest_edge": 224}, crop_pct=0.875,
                                         resample=3).save_pretrained(folder)
  return model, folder


def test_pooler_output_matches_hf(tiny_resnet):
  model, folder = tiny_resnet
  module, params, pp = resnet.load_hf_resnet(str(folder), lora_rank=4, remat="nothing")
  images = np.random.RandomState(0).randn(2, 45, 38, 3).astype(np.float32)  # odd sizes: padding
  params = hf_io.merge_loaded(zeros_like_init(module, images), params)  # LoRA B = 0
  feature, out = jax.jit(module.apply)({"params": params}, jnp.asarray(images))
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  err = np.abs(np.asarray(feature) - ref.pooler_output.flatten(1).numpy()).max()
  print(f"ResNet pooler_output max abs error vs HF: {err:.2e}")
  assert err <= 1e-5
  hidden = ref.last_hidden_state.numpy().transpose(0, 2, 3, 1)
  assert np.abs(np.asarray(out["encoded"]) - hidden).max() <= 1e-5
  assert (pp["size"], pp["crop"], pp["resample"]) == (256, 224, "bicubic")


@pytest.mark.parametrize("kernel,stride", [(3, 2), (1, 1)])
def test_lora_conv_matches_peft(kernel, stride):
  peft = require("peft")
  torch.manual_seed(1)
  net = torch.nn.Sequential()
  net.add_module("conv", torch.nn.Conv2d(6, 10, kernel, stride, kernel // 2, bias=False))
  net = peft.get_peft_model(net, peft.LoraConfig(r=3, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["conv"]))
  lora = net.base_model.model.conv
  with torch.no_grad():
    lora.lora_B["default"].weight.normal_()  # B starts at zero; make the update visible
  x = np.random.RandomState(2).randn(2, 9, 11, 6).astype(np.float32)
  with torch.no_grad():
    ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  params = {
      "kernel": lora.base_layer.weight.detach().numpy().transpose(2, 3, 1, 0),
      "lora_a": lora.lora_A["default"].weight.detach().numpy().transpose(2, 3, 1, 0),
      "lora_b": lora.lora_B["default"].weight.detach().numpy()[:, :, 0, 0].T,
  }
  y = resnet.LoraConv(10, kernel, stride, rank=3, alpha=8.0).apply({"params": params}, x)
  assert np.abs(np.asarray(y) - ref).max() <= 1e-5


def test_lora_placement_and_frozen_statistics(tiny_resnet):
  _, folder = tiny_resnet
  cfg = ml_collections.ConfigDict(dict(
      backbone="resnet", init=str(folder), finetune="lora",
      lora=dict(rank=2, alpha=8.0, dropout=0.0), dtype="float32", remat="none"))
  bb = resnet.build(cfg)
  x = np.random.RandomState(3).randn(2, 16, 16, 3).astype(np.float32)
  params = hf_io.merge_loaded(zeros_like_init(bb.module, x), bb.params)
  paths = ["/".join(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  lora = [p for p in paths if "lora_" in p]
  # 2 stages x 2 blocks x 3 convs x (A, B); never the stem or a shortcut.
  assert len(lora) == 24 and not any("shortcut" in p or p.startswith("embedder") for p in lora)

  def loss(p):
    return bb.module.apply({"params": p}, x, train=True)[0].sum()

  grads = jax.jit(jax.grad(loss))(params)
  flat = {"/".join(k.key for k in p): g for p, g in jax.tree_util.tree_leaves_with_path(grads)}
  stats = [g for p, g in flat.items() if "running_" in p]
  assert stats and all(float(jnp.abs(g).max()) == 0.0 for g in stats)
  assert float(jnp.abs(flat["embedder/normalization/scale"]).max()) > 0.0


def test_two_train_steps_through_the_train_loop(tmp_path):
  """configs/resnet.py with a tiny random tower: 8 train images (6 val), batch 4 = 2 x 2."""
  results, history = train_two_steps(tmp_path, "resnet", dict(TINY, depths=[1, 1]))
  assert results["status"] == "done" and history[0]["step"] == 2
  assert np.isfinite(history[0]["train_loss"])
