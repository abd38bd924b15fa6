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


class TorchGatedBlend(torch.nn.Module):
  """The official GatedBlend, written here from its description (issue 22): w = s(g),
  w * s(clamp(alpha x + beta, -20, 20)) + (1 - w) * PReLU_a(x); submodule names as its
  state_dict has them (sig_act.alpha, sig_act.beta, lrelu_act.a, g)."""

  def __init__(self, dim):
    super().__init__()
    self.sig_act = torch.nn.Module()
    self.sig_act.alpha = torch.nn.Parameter(torch.ones(dim))
    self.sig_act.beta = torch.nn.Parameter(torch.zeros(dim))
    self.lrelu_act = torch.nn.Module()
    self.lrelu_act.a = torch.nn.Parameter(torch.full((dim,), 0.25))
    self.g = torch.nn.Parameter(torch.zeros(dim))

  def forward(self, x):
    w = torch.sigmoid(self.g)
    z = (self.sig_act.alpha * x + self.sig_act.beta).clamp(-20.0, 20.0)
    prelu = torch.where(x >= 0, x, self.lrelu_act.a * x)
    return w * torch.sigmoid(z) + (1 - w) * prelu


class TorchPReLU(torch.nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.a = torch.nn.Parameter(torch.full((dim,), 0.25))

  def forward(self, x):
    return torch.where(x >= 0, x, self.a * x)


class TorchAGMHead(torch.nn.Module):
  """fc1 -> GatedBlend -> fc2 -> per-channel PReLU -> fc3 (the official MLP3_Gated's layout)."""

  def __init__(self, d, hidden=512):
    super().__init__()
    self.fc1, self.act1 = torch.nn.Linear(d, hidden), TorchGatedBlend(hidden)
    self.fc2, self.act2 = torch.nn.Linear(hidden, hidden), TorchPReLU(hidden)
    self.fc3 = torch.nn.Linear(hidden, 1)

  def forward(self, x):
    return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


def perturb_gates(head: torch.nn.Module, seed: int = 0) -> None:
  """Gate parameters away from their init (and alpha large enough to hit the +-20 clamp)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in head.named_parameters():
      if name.startswith(("act1", "act2")):
        p.add_(torch.randn(p.shape, generator=gen))
    head.act1.sig_act.alpha[:4] = 60.0


def agm_params_from_torch(head: TorchAGMHead) -> dict:
  sd = {k: v.detach().numpy() for k, v in head.state_dict().items()}
  return {"fc1": {"kernel": sd["fc1.weight"].T, "bias": sd["fc1.bias"]},
          "act1": {"g": sd["act1.g"], "alpha": sd["act1.sig_act.alpha"],
                   "beta": sd["act1.sig_act.beta"], "a": sd["act1.lrelu_act.a"]},
          "fc2": {"kernel": sd["fc2.weight"].T, "bias": sd["fc2.bias"]},
          "act2": {"a": sd["act2.a"]},
          "fc3": {"kernel": sd["fc3.weight"].T, "bias": sd["fc3.bias"]}}


def test_agm_head_init_and_torch_transcription():
  """The official MLP3_Gated as model.head=agm: its init (g=0, alpha=1, beta=0, a=0.25, no
  gamma) and its forward against a torch transcription with perturbed gates and clamped logits.
  Measured max |diff| 6.0e-8 on scores up to 0.45 (float32); tolerance 1e-6 as issue 22 sets."""
  d, hidden = 24, 16
  head = QualityHead(acts=resolve_head("agm"), hidden=hidden)
  x = np.random.RandomState(0).randn(6, d).astype(np.float32) * 2
  p = head.init(jax.random.PRNGKey(0), x)["params"]
  assert set(p["act1"]) == {"g", "alpha", "beta", "a"} and set(p["act2"]) == {"a"}
  for name, v in dict(g=0, alpha=1, beta=0, a=0.25).items():
    np.testing.assert_array_equal(p["act1"][name], np.full(hidden, v, np.float32))
  np.testing.assert_array_equal(p["act2"]["a"], np.full(hidden, 0.25, np.float32))
  torch.manual_seed(0)
  ref = TorchAGMHead(d, hidden)
  perturb_gates(ref)
  with torch.no_grad():
    want = ref(torch.from_numpy(x))[:, 0].numpy()
  got, _ = head.apply({"params": agm_params_from_torch(ref)}, x)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)


def test_official_relu_baseline_is_a_named_head():
  assert resolve_head("relu") == ("relu", "relu")
  assert resolve_head("agm") == ("blend", "prelu")
