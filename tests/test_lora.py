"""LoRA against peft, and the optax partition: frozen leaves keep no state and never move."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import peft
import pytest
import torch
import transformers

from iqa_jax.defaults import base_config
from iqa_jax.models import siglip
from iqa_jax.models.hf_io import merge_loaded
from iqa_jax.models.lora import LoraDense
from iqa_jax.training.optim import make_optimizer
from iqa_jax.training.steps import TrainState, make_train_step


def test_lora_output_equals_peft(tiny_siglip_dir):
  torch.manual_seed(0)
  base = transformers.SiglipVisionModel.from_pretrained(tiny_siglip_dir)
  cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "k_proj"])
  model = peft.get_peft_model(base, cfg).eval()
  with torch.no_grad():  # peft starts B at zero; give both factors values so the update shows
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(0.3 * torch.randn_like(p))
  x = np.random.RandomState(0).randn(2, 3, 32, 32).astype(np.float32)
  with torch.no_grad():
    want = model(pixel_values=torch.from_numpy(x)).pooler_output.numpy()

  module, params, _ = siglip.load_hf_siglip(str(tiny_siglip_dir), lora_rank=4, lora_alpha=8.0,
                                            lora_dropout=0.05)
  init = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  params = merge_loaded(jax.device_get(init), params)
  layers = params["encoder_layers"]["self_attn"]
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  for proj in ("q_proj", "k_proj"):
    name = "base_model.model.encoder.layers.{}.self_attn.{}.lora_{}.default.weight"
    a = [sd[name.format(i, proj, "A")].T for i in range(2)]
    b = [sd[name.format(i, proj, "B")].T for i in range(2)]
    layers[proj]["lora_a"], layers[proj]["lora_b"] = np.stack(a), np.stack(b)
  got, _ = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  print(f"SigLIP + LoRA pooler_output max abs error vs peft: {np.abs(got - want).max():.2e}")
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_lora_init_matches_peft_and_starts_at_identity():
  layer = LoraDense(16, rank=4, alpha=8.0)
  p = layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 64)))["params"]
  assert np.all(p["lora_b"] == 0)
  bound = 1 / np.sqrt(64)  # peft: kaiming_uniform_(a=sqrt(5)) on (r, in)
  assert np.abs(p["lora_a"]).max() <= bound and np.abs(p["lora_a"]).max() > 0.8 * bound
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 64))
  np.testing.assert_allclose(layer.apply({"params": p}, x),
                             x @ p["kernel"] + p["bias"], atol=1e-6)
  # scale alpha / r = 2 (§3.1: rank 4, alpha 8)
  p2 = dict(p, lora_b=jnp.ones((4, 16)))
  want = x @ p["kernel"] + p["bias"] + 2.0 * (x @ p["lora_a"]) @ jnp.ones((4, 16))
  np.testing.assert_allclose(layer.apply({"params": p2}, x), want, atol=1e-5)


def _tiny_config(finetune):
  c = base_config()
  c.model.init = None
  c.model.arch = ml_collections.ConfigDict(dict(hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   patch_size=8, image_size=32))
  c.model.finetune = finetune
  c.model.dtype = "float32"
  c.optim.schedule = "constant"
  c.optim.batch_size, c.optim.grad_accum = 4, 2
  return c


@pytest.mark.parametrize("finetune", ["lora", "frozen", "full", "lora_full"])
def test_frozen_leaves_bit_identical_and_stateless(finetune):
  from iqa_jax.models.model import create_model
  config = _tiny_config(finetune)
  model, params, _ = create_model(config)
  tx, labels = make_optimizer(config, params, steps_per_epoch=10)
  opt_state = tx.init(params)
  n_state = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(opt_state))
  flat_p = jax.tree.leaves(params)
  flat_l = jax.tree.leaves(labels)
  trainable = sum(int(np.prod(p.shape))
                  for p, label in zip(flat_p, flat_l, strict=True) if label != "frozen")
  # Adam keeps mu and nu for trainable leaves only (plus scalar counts).
  assert 2 * trainable <= n_state <= 2 * trainable + 8
  state = TrainState(jnp.zeros((), jnp.int32), params, opt_state, jax.random.PRNGKey(0))
  step = jax.jit(make_train_step(model, tx, labels, grad_accum=2))
  rng = np.random.RandomState(0)
  batch = {"image": jnp.asarray(rng.randn(4, 32, 32, 3), jnp.float32),
           "mos": jnp.asarray([0.1, 0.5, 0.9, 0.3], jnp.float32)}
  new, _ = step(state, batch)
  new, _ = step(new, batch)
  moved = {"frozen": [], "trainable": []}
  for a, b, label in zip(jax.tree.leaves(params), jax.tree.leaves(new.params), flat_l,
                         strict=True):
    same = np.array_equal(np.asarray(a), np.asarray(b))
    (moved["frozen"] if label == "frozen" else moved["trainable"]).append(not same)
  assert not any(moved["frozen"])
  assert all(moved["trainable"])  # lora_a moves from the second step, once B is non-zero
  expected = {"lora": {"head", "lora", "frozen"}, "frozen": {"head", "frozen"},
              "full": {"head", "backbone"},
              # the official train.py: LoRA and every backbone weight (requires_grad_(True))
              "lora_full": {"head", "lora", "backbone"}}[finetune]
  assert set(flat_l) == expected
