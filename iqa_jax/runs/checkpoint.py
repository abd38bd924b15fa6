"""Run checkpoints with orbax: `ckpt/last` and `ckpt/best`, each holding the trainable params,
the optimizer state, step, RNG and a JSON of (epoch, best metrics). Frozen pretrained weights
are not copied into runs: they are reloaded from `config.model.init`. With
`config.keep_epoch_checkpoints`, `ckpt/epochs/<n>` also keeps the trainable params after each
epoch n (1-based, as the training log counts) for Grad-CAM over training (Figure S6)."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from iqa_jax.runs.folder import HISTORY, RunFolderError, read_jsonl, saved_steps, write_text

SEP = "."
EPOCHS = "epochs"  # ckpt/epochs/<n>: params after epoch n (config.keep_epoch_checkpoints)


def _unreadable(path: Path, e: Exception) -> RunFolderError:
  """Orbax/TensorStore failures on a cut or corrupt checkpoint -> one line naming the folder."""
  first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
  return RunFolderError(
      f"{path} is unreadable ({type(e).__name__}: {first}); it was cut or corrupted. Restore it "
      f"from a backup, or train a new run (--restart or another --workdir).")


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
  flat, flat_labels = flatten(params), flatten(labels)
  return {k: v for k, v in flat.items() if save_frozen or flat_labels[k] != "frozen"}


def _save_over(mngr: ocp.CheckpointManager, step: int, args) -> None:
  """Saves `step`, replacing a step of that number a run cut before ckpt/last left behind."""
  if step in mngr.all_steps():
    mngr.delete(step)
  mngr.save(step, args=args, force=True)
  mngr.wait_until_finished()


class RunCheckpoints:
  def __init__(self, workdir, save_frozen: bool = False):
    self.root = Path(workdir).absolute() / "ckpt"
    self.save_frozen = save_frozen
    opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    self.managers = {k: ocp.CheckpointManager(self.root / k, options=opts)
                     for k in ("last", "best")}

  def save(self, state, labels, which: str, meta: dict) -> None:
    mngr = self.managers[which]
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(saved_params(state.params, labels, self.save_frozen)),
        train=ocp.args.StandardSave({"step": state.step, "rng": state.rng,
                                     "opt_state": state.opt_state}),
        meta=ocp.args.JsonSave(meta))
    _save_over(mngr, int(state.step), args)

  def save_epoch(self, state, labels, epoch: int) -> None:
    """The trainable params after 0-based `epoch`, kept in ckpt/epochs/<epoch + 1> for good (no
    optimizer state: these are for looking at, not resuming)."""
    if "epochs" not in self.managers:
      self.managers["epochs"] = ocp.CheckpointManager(
          self.root / EPOCHS, options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True))
    _save_over(self.managers["epochs"], epoch + 1, ocp.args.Composite(
        params=ocp.args.StandardSave(saved_params(state.params, labels, self.save_frozen)),
        meta=ocp.args.JsonSave({"epoch": epoch, "step": int(state.step)})))

  def _restore(self, which: str, state, labels):
    mngr = self.managers[which]
    step = mngr.latest_step()
    if step is None:
      return None
    template = {"step": state.step, "rng": state.rng, "opt_state": state.opt_state}
    try:
      r = mngr.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(), train=ocp.args.StandardRestore(template),
          meta=ocp.args.JsonRestore()))
      params = unflatten_into(state.params, r["params"])
    except Exception as e:  # noqa: BLE001 - any failure to read it is reported as one line
      raise _unreadable(self.root / which / str(step), e) from None
    new = state.replace(step=r["train"]["step"], rng=r["train"]["rng"],
                        opt_state=r["train"]["opt_state"], params=params)
    return new, r["meta"]

  def best_meta(self) -> dict | None:
    """The meta ({'epoch', 'best'}) ckpt/best was saved with; None without one."""
    mngr = self.managers["best"]
    step = mngr.latest_step()
    if step is None:
      return None
    try:
      return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - any failure to read it is reported as one line
      raise _unreadable(self.root / "best" / str(step), e) from None

  def restore_last(self, state, labels):
    return self._restore("last", state, labels)

  def restore_best(self, state, labels):
    r = self._restore("best", state, labels)
    return None if r is None else r[0]

  def close(self) -> None:
    for m in self.managers.values():
      m.close()


def epoch_numbers(workdir) -> list[int]:
  """The 1-based epochs whose params ckpt/epochs keeps ([] when the run kept none)."""
  path = Path(workdir).absolute() / "ckpt" / EPOCHS
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.is_dir() else []


def load_params(workdir, which: str = "best", step: int | None = None) -> tuple[dict, dict]:
  """-> (flat saved params, meta) of a run, for scoring and evaluation. which='epochs' with
  step=n: the params after epoch n (config.keep_epoch_checkpoints)."""
  path = Path(workdir).absolute() / "ckpt" / which
  mngr = ocp.CheckpointManager(path)
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    mngr.close()
    where = path if step is None else path / str(step)
    if which == "best" and step is None and saved_steps(path.parent / "last"):
      raise FileNotFoundError(  # a run killed before its first validation, or all-NaN SRCC
          f"No 'best' checkpoint in {where}, but {path.parent / 'last'} holds one: pass "
          f"--which last, or finish training with `python -m iqa_jax.train --workdir {workdir}`")
    raise FileNotFoundError(f"No '{which}' checkpoint in {where}; train first with "
                            f"`python -m iqa_jax.train --config ... --workdir {workdir}`")
  try:
    r = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                   meta=ocp.args.JsonRestore()))
  except Exception as e:  # noqa: BLE001 - any failure to read it is reported as one line
    raise _unreadable(path / str(step), e) from None
  finally:
    mngr.close()
  return r["params"], r["meta"]


def read_history(workdir) -> list[dict]:
  return read_jsonl(Path(workdir) / HISTORY)


def write_history(workdir, history: list[dict]) -> None:
  write_text(Path(workdir) / HISTORY, "".join(json.dumps(h) + "\n" for h in history))
