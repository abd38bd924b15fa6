"""Run checkpoints with orbax: `ckpt/last` and `ckpt/best`, each holding the trainable params,
the optimizer state, step, RNG and a JSON of (epoch, best metrics). Frozen pretrained weights
are not copied into runs: they are reloaded from `config.model.init`."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

SEP = "."


def flatten(tree) -> dict[str, np.ndarray]:
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    flat[SEP.join(str(getattr(k, "key", k)) for k in path)] = leaf
  return flat


def unflatten_into(params, flat: dict):
  """Replace the leaves of `params` that `flat` holds; others stay (frozen pretrained weights)."""
  def pick(path, leaf):
    key = SEP.join(str(getattr(k, "key", k)) for k in path)
    if key not in flat:
      return leaf
    value = np.asarray(flat[key])
    if value.shape != tuple(leaf.shape):
      raise ValueError(f"checkpoint leaf {key} has shape {value.shape}, model wants {leaf.shape}")
    return value.astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(pick, params)


def saved_params(params, labels, save_frozen: bool) -> dict:
  keep = lambda l: save_frozen or l != "frozen"
  flat, flat_labels = flatten(params), flatten(labels)
  return {k: v for k, v in flat.items() if keep(flat_labels[k])}


class RunCheckpoints:
  def __init__(self, workdir, save_frozen: bool = False):
    self.root = Path(workdir).absolute() / "ckpt"
    self.save_frozen = save_frozen
    opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    self.managers = {k: ocp.CheckpointManager(self.root / k, options=opts) for k in ("last", "best")}

  def save(self, state, labels, which: str, meta: dict) -> None:
    mngr = self.managers[which]
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(saved_params(state.params, labels, self.save_frozen)),
        train=ocp.args.StandardSave({"step": state.step, "rng": state.rng,
                                     "opt_state": state.opt_state}),
        meta=ocp.args.JsonSave(meta))
    mngr.save(int(state.step), args=args, force=True)
    mngr.wait_until_finished()

  def _restore(self, which: str, state, labels):
    mngr = self.managers[which]
    step = mngr.latest_step()
    if step is None:
      return None
    template = {"step": state.step, "rng": state.rng, "opt_state": state.opt_state}
    r = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), train=ocp.args.StandardRestore(template),
        meta=ocp.args.JsonRestore()))
    params = unflatten_into(state.params, r["params"])
    new = state.replace(step=r["train"]["step"], rng=r["train"]["rng"],
                        opt_state=r["train"]["opt_state"], params=params)
    return new, r["meta"]

  def restore_last(self, state, labels):
    return self._restore("last", state, labels)

  def restore_best(self, state, labels):
    r = self._restore("best", state, labels)
    return None if r is None else r[0]

  def close(self) -> None:
    for m in self.managers.values():
      m.close()


def load_params(workdir, which: str = "best") -> tuple[dict, dict]:
  """-> (flat saved params, meta) of a run, for scoring and evaluation."""
  path = Path(workdir).absolute() / "ckpt" / which
  mngr = ocp.CheckpointManager(path)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"No '{which}' checkpoint in {path}; train first with "
                            f"`python -m iqa_jax.train --config ... --workdir {workdir}`")
  r = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                 meta=ocp.args.JsonRestore()))
  mngr.close()
  return r["params"], r["meta"]


def read_history(workdir) -> list[dict]:
  f = Path(workdir) / "history.jsonl"
  if not f.exists():
    return []
  return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def write_history(workdir, history: list[dict]) -> None:
  f = Path(workdir) / "history.jsonl"
  tmp = f.with_suffix(".tmp")
  tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
  tmp.replace(f)
