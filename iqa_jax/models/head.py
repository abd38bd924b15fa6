"""The quality head: Dense d->512, act1, Dense 512->512, act2, Dense 512->1 (§3.1, §4).

`agm` and `relu` are the heads of the paper's official code (drkkgy/NR_IQA_AGM,
models/mlp_heads.py MLP3_Gated and mlp_3_layer; docs/official_code.md).
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Named heads of the paper: Table 1 baseline, Table 1 "+Sig" (Table 6), Table 2 gated (Eq. 3).
NAMED_HEADS = {
    "baseline": ("lrelu", "lrelu"),
    "sigmoid": ("sigmoid", "lrelu"),
    "gated": ("gated", "gated"),
    # The official code: MLP3_Gated (GatedBlend, then PReLU; no gamma) and its ReLU baseline.
    "agm": ("blend", "prelu"),
    "relu": ("relu", "relu"),
}
ACTIVATIONS = ("lrelu", "relu", "gelu", "tanh", "sigmoid", "gated", "blend", "prelu")
BLEND_CLAMP = 20.0  # the official ParamSigmoid2 clamps alpha x + beta to [-20, 20]


def _const(v):
  return lambda key, shape, dtype=jnp.float32: jnp.full(shape, v, dtype)


class GatedActivation(nn.Module):
  """Eq. 3: y = s(g) * gamma * s(alpha x + beta) + (1 - s(g)) * LReLU_a(x), per channel.

  Init (§4): g=0, alpha=1, beta=0, gamma=2, a=0.25. Parameters stay float32 (App. B.1).
  """

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    g = self.param("g", _const(0.0), (c,))
    alpha = self.param("alpha", _const(1.0), (c,))
    beta = self.param("beta", _const(0.0), (c,))
    gamma = self.param("gamma", _const(2.0), (c,))
    a = self.param("a", _const(0.25), (c,))
    x = x.astype(jnp.float32)
    w = jax.nn.sigmoid(g)
    lrelu = jnp.where(x >= 0, x, a * x)
    return w * gamma * jax.nn.sigmoid(alpha * x + beta) + (1.0 - w) * lrelu


class PReLU(nn.Module):
  """Per-channel learnable negative slope `a` (init 0.25): the official ParamLeakyReLU2."""

  @nn.compact
  def __call__(self, x):
    a = self.param("a", _const(0.25), (x.shape[-1],))
    x = x.astype(jnp.float32)
    return jnp.where(x >= 0, x, a * x)


class GatedBlend(nn.Module):
  """The official GatedBlend: s(g) * s(clip(alpha x + beta, +-20)) + (1 - s(g)) * PReLU_a(x).

  Unlike Eq. 3 there is no gamma. Init as the official code: g=0, alpha=1, beta=0, a=0.25.
  """

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    g = self.param("g", _const(0.0), (c,))
    alpha = self.param("alpha", _const(1.0), (c,))
    beta = self.param("beta", _const(0.0), (c,))
    a = self.param("a", _const(0.25), (c,))
    x = x.astype(jnp.float32)
    w = jax.nn.sigmoid(g)
    z = jnp.clip(alpha * x + beta, -BLEND_CLAMP, BLEND_CLAMP)
    return w * jax.nn.sigmoid(z) + (1.0 - w) * jnp.where(x >= 0, x, a * x)


def activation(name: str, layer_name: str):
  modules = {"gated": GatedActivation, "blend": GatedBlend, "prelu": PReLU}
  if name in modules:
    return modules[name](name=layer_name)
  fns = {
      # torch.nn.LeakyReLU's default slope, as in the paper's baseline head.
      "lrelu": lambda x: jax.nn.leaky_relu(x, 0.01),
      "relu": jax.nn.relu,
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "tanh": jnp.tanh,
      "sigmoid": jax.nn.sigmoid,
  }
  if name not in fns:
    raise ValueError(f"head activation must be one of {ACTIVATIONS}, got {name!r}")
  return fns[name]


def resolve_head(head: str | Sequence[str]) -> tuple[str, str]:
  """'gated' -> ('gated', 'gated'); 'sigmoid,lrelu' -> ('sigmoid', 'lrelu')."""
  if isinstance(head, str):
    if head in NAMED_HEADS:
      return NAMED_HEADS[head]
    head = tuple(h.strip() for h in head.split(","))
  acts = tuple(head)
  if len(acts) != 2 or any(a not in ACTIVATIONS for a in acts):
    raise ValueError(f"model.head must be one of {sorted(NAMED_HEADS)} or 'act1,act2' with acts "
                     f"from {ACTIVATIONS}; got {head!r}")
  return acts  # type: ignore[return-value]


def keep_top_percentile(feature, k: float):
  """Table 4 masking: per image, zero the features whose |f| is below the (100 - k)th percentile
  of that image's |f| (numpy's linear percentile), so the top k% by magnitude remain."""
  if k >= 100:
    return feature
  magnitude = jnp.abs(feature)
  threshold = jnp.percentile(magnitude, 100.0 - k, axis=-1, keepdims=True)
  return jnp.where(magnitude >= threshold, feature, 0.0)


class QualityHead(nn.Module):
  """The paper's three-layer MLP regressor, computed in float32.

  Ablations (all off by default): keep_percentile < 100 masks the feature by magnitude (Table 4);
  input_dropout / head_dropout are dropout rates 1 - k on the feature and after each hidden
  activation (Table S3, k the keep probability); dropout runs only when train=True.
  """
  acts: tuple[str, str] = NAMED_HEADS["gated"]
  hidden: int = 512
  keep_percentile: float = 100.0
  input_dropout: float = 0.0
  head_dropout: float = 0.0

  @nn.compact
  def __call__(self, feature, train: bool = False):
    out = {}
    x = feature.astype(jnp.float32)
    x = keep_top_percentile(x, self.keep_percentile)
    x = nn.Dropout(self.input_dropout, deterministic=not train)(x)
    x = nn.Dense(self.hidden, name="fc1")(x)
    x = activation(self.acts[0], "act1")(x)
    out["hidden1"] = x
    x = nn.Dropout(self.head_dropout, deterministic=not train)(x)
    x = nn.Dense(self.hidden, name="fc2")(x)
    x = activation(self.acts[1], "act2")(x)
    out["hidden2"] = x
    x = nn.Dropout(self.head_dropout, deterministic=not train)(x)
    score = nn.Dense(1, name="fc3")(x)[..., 0]
    return score, out
