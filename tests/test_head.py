"""Quality head: Eq. 3 against numpy, its init (§4), float32 gates, and the named heads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from iqa_jax.models.head import GatedActivation, QualityHead, resolve_head


def _eq3(x, g, alpha, beta, gamma, a):
  def sig(z):
    return 1 / (1 + np.exp(-z))
  w = sig(g)
  return w * gamma * sig(alpha * x + beta) + (1 - w) * np.where(x >= 0, x, a * x)


def test_gated_activation_init_and_eq3():
  x = np.random.RandomState(0).randn(5, 7).astype(np.float32) * 3
  mod = GatedActivation()
  p = mod.init(jax.random.PRNGKey(0), x)["params"]
  for name, v in dict(g=0, alpha=1, beta=0, gamma=2, a=0.25).items():
    np.testing.assert_array_equal(p[name], np.full(7, v, np.float32))
    assert p[name].dtype == jnp.float32
  # At init: 0.5 * 2 * sigmoid(x) + 0.5 * LReLU_0.25(x); worked value at x = 0: 0.5.
  np.testing.assert_allclose(mod.apply({"params": p}, jnp.zeros((1, 7))), 0.5, atol=1e-7)
  rng = np.random.RandomState(1)
  q = {k: rng.randn(7).astype(np.float32) for k in p}
  np.testing.assert_allclose(mod.apply({"params": q}, x),
                             _eq3(x, q["g"], q["alpha"], q["beta"], q["gamma"], q["a"]),
                             rtol=1e-5, atol=1e-6)


def test_gated_activation_stays_float32_on_bf16_input():
  mod = GatedActivation()
  x = jnp.ones((2, 3), jnp.bfloat16)
  p = mod.init(jax.random.PRNGKey(0), x)["params"]
  assert mod.apply({"params": p}, x).dtype == jnp.float32


@pytest.mark.parametrize("acts,torch_acts", [
    (("lrelu", "lrelu"), (torch.nn.LeakyReLU(), torch.nn.LeakyReLU())),
    (("sigmoid", "lrelu"), (torch.nn.Sigmoid(), torch.nn.LeakyReLU())),
    (("gelu", "tanh"), (torch.nn.GELU(), torch.nn.Tanh())),
    (("relu", "sigmoid"), (torch.nn.ReLU(), torch.nn.Sigmoid())),
])
def test_fixed_heads_match_torch_mlp(acts, torch_acts):
  d = 24
  head = QualityHead(acts=acts, hidden=16)
  x = np.random.RandomState(0).randn(4, d).astype(np.float32)
  p = head.init(jax.random.PRNGKey(0), x)["params"]
  ref = torch.nn.Sequential(torch.nn.Linear(d, 16), torch_acts[0], torch.nn.Linear(16, 16),
                            torch_acts[1], torch.nn.Linear(16, 1))
  with torch.no_grad():
    for i, name in zip((0, 2, 4), ("fc1", "fc2", "fc3"), strict=True):
      ref[i].weight.copy_(torch.from_numpy(np.asarray(p[name]["kernel"]).T))
      ref[i].bias.copy_(torch.from_numpy(np.asarray(p[name]["bias"])))
    want = ref(torch.from_numpy(x))[:, 0].numpy()
  got, out = head.apply({"params": p}, x)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert out["hidden2"].shape == (4, 16)


def test_named_heads_and_bad_names():
  assert resolve_head("baseline") == ("lrelu", "lrelu")
  assert resolve_head("sigmoid") == ("sigmoid", "lrelu")
  assert resolve_head("gated") == ("gated", "gated")
  assert resolve_head("gelu,lrelu") == ("gelu", "lrelu")
  with pytest.raises(ValueError, match="model.head"):
    resolve_head("swish,lrelu")


def test_head_param_count_is_the_papers():
  """d=1152: 1152*512+512 + 512*512+512 + 512+1 + 2 gates * 5 * 512 ~ 0.8 M (§2: an 800 K head)."""
  head = QualityHead(acts=("gated", "gated"))
  p = head.init(jax.random.PRNGKey(0), jnp.zeros((1, 1152)))["params"]
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(p))
  assert n == 1152 * 512 + 512 + 512 * 512 + 512 + 512 + 1 + 2 * 5 * 512
