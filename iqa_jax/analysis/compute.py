"""Table S5: the compute profile of a model variant at batch 1 (parameters, GMACs, memory).

GMACs come from XLA's cost analysis of the compiled inference program (its FLOPs / 2, attention
included, like the paper's fvcore count); `matmul_macs` counts the multiply-adds of every
dot_general and convolution in the program's jaxpr, which is what fvcore counts.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def xla_flops(compiled, devices: int) -> float | None:
  """XLA's FLOP count of a compiled step, all devices (it counts one device's SPMD program)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  return float(cost["flops"]) * devices if cost and cost.get("flops") else None


def compiled_bytes(compiled) -> int | None:
  """What the compiled program asks of one device: arguments + outputs + scratch - aliased."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # noqa: BLE001
    return None


def _dot_macs(eqn) -> int:
  (lc, _), (lb, _) = eqn.params["dimension_numbers"]
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  contract = math.prod(lhs[i] for i in lc)
  batch = math.prod(lhs[i] for i in lb)
  free_l = math.prod(lhs) // (contract * batch)
  free_r = math.prod(rhs) // (contract * batch)
  return batch * free_l * free_r * contract


def _conv_macs(eqn) -> int:
  out = eqn.outvars[0].aval.shape
  rhs = eqn.invars[1].aval.shape  # kernel: output features x (input features / groups) x window
  dn = eqn.params["dimension_numbers"]
  out_features = rhs[dn.rhs_spec[0]]
  return math.prod(out) * (math.prod(rhs) // out_features)


def matmul_macs(fn, *args) -> int:
  """Multiply-adds of all matmuls and convolutions `fn(*args)` runs, through nested jaxprs."""
  def walk(jaxpr, times: int = 1) -> int:
    total = 0
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name == "dot_general":
        total += times * _dot_macs(eqn)
      elif name == "conv_general_dilated":
        total += times * _conv_macs(eqn)
      inner_times = times * (eqn.params.get("length", 1) if name == "scan" else 1)
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (list, tuple)) else [p]):
          inner = getattr(sub, "jaxpr", None)
          if inner is not None:
            total += walk(getattr(inner, "jaxpr", inner), inner_times)
    return total
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def compute_profile(config: ml_collections.ConfigDict) -> dict:
  """One variant of Table S5: params, GMACs (XLA and matmul count), compiled memory at batch 1."""
  from iqa_jax.models.model import create_model  # pylint: disable=g-import-not-at-top
  # XLA's cost analysis counts a while loop's body once, so a scanned encoder would count as
  # one block: profile the unrolled program (the same arithmetic).
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.scan = False
  model, params, prep = create_model(config)
  size = config.data.get("image_size") or prep["crop"] or prep["size"]
  images = jnp.zeros((1, size, size, 3), jnp.uint8)
  params = jax.tree.map(jnp.asarray, params)
  forward = lambda p, x: model.apply({"params": p}, x)[0]  # noqa: E731
  compiled = jax.jit(forward).lower(params, images).compile()
  flops = xla_flops(compiled, 1)
  memory = compiled_bytes(compiled)
  n_params = {k: int(sum(np.prod(x.shape) for x in jax.tree.leaves(v))) for k, v in params.items()}
  return {"input": f"{size}x{size}", "patch": config.model.get("arch", {}).get("patch_size"),
          "params_backbone": n_params.get("backbone", 0), "params_head": n_params.get("head", 0),
          "gmacs_xla": None if flops is None else flops / 2e9,
          "gmacs_matmul": matmul_macs(forward, params, images) / 1e9,
          "memory_mib": None if memory is None else memory / 2**20, "batch": 1,
          "precision": config.model.get("dtype", "float32"), "framework": f"JAX {jax.__version__}",
          "counter": "XLA cost analysis", "device": jax.devices()[0].platform}
