"""The train loop end to end on a tiny demo set: results, checkpoints, resume after a kill,
and the NaN stop. Values are compared exactly: CPU runs are deterministic."""
import csv
import json

import numpy as np
import pytest
from conftest import tiny_demo_config
from scipy import stats

from iqa_jax.runs import checkpoint
from iqa_jax.training import loop as train
from iqa_jax.training import steps


def test_run_writes_results_history_checkpoints_and_predictions(trained_run):
  config, workdir, results = trained_run
  history = checkpoint.read_history(workdir)
  assert [h["epoch"] for h in history] == [0, 1]
  best = max(history, key=lambda h: h["val"]["srcc"])
  assert results["best"]["srcc"] == best["val"]["srcc"]
  assert results["final"]["srcc"] == history[-1]["val"]["srcc"]
  assert results["n_train"] + results["n_val"] == 240
  # Content split: no reference photo on both sides.
  splits = json.loads((workdir / "splits.json").read_text())
  assert splits and (workdir / "ckpt" / "best").is_dir() and (workdir / "ckpt" / "last").is_dir()
  with open(workdir / "val_predictions.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == results["n_val"]
  srcc = stats.spearmanr([float(r["pred"]) for r in rows], [float(r["mos"]) for r in rows])[0]
  assert srcc == pytest.approx(results["best"]["srcc"], abs=1e-5)
  assert set(history[0]["gate_w"]) == {"act1", "act2"} and len(history[0]["gate_w"]["act1"]) == 512


def test_resume_after_kill_gives_the_uninterrupted_result(trained_run, tiny_demo_dir, tmp_path,
                                                          monkeypatch):
  config, _, uninterrupted = trained_run
  workdir = tmp_path / "killed"
  real = train.pipeline.make_train_loader

  class DyingLoader:
    """Epoch 2's loader: the process is killed after 8 of its batches."""
    def __init__(self, loader):
      self.loader = loader
    def __len__(self):
      return len(self.loader)
    def __iter__(self):
      for i, batch in enumerate(self.loader):
        if i == 8:
          raise KeyboardInterrupt("simulated kill")
        yield batch

  def loader_factory(*a, epoch, **kw):
    loader = real(*a, epoch=epoch, **kw)
    return DyingLoader(loader) if epoch == 1 else loader

  monkeypatch.setattr(train.pipeline, "make_train_loader", loader_factory)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(tiny_demo_config(tiny_demo_dir), str(workdir))
  assert [h["epoch"] for h in checkpoint.read_history(workdir)] == [0]
  monkeypatch.setattr(train.pipeline, "make_train_loader", real)
  resumed = train.train_and_evaluate(tiny_demo_config(tiny_demo_dir), str(workdir))
  assert resumed["best"] == uninterrupted["best"]
  assert resumed["final"] == uninterrupted["final"]


def _cut_and_resume(config, workdir, cut: str, cut_epoch: int, monkeypatch,
                    rerun=lambda: None) -> dict:
  """Trains `config` into `workdir` with Ctrl-C raised at `cut` in epoch `cut_epoch`'s
  bookkeeping, checks that epoch is not recorded as finished (unless cut after ckpt/last),
  then calls `rerun` and reruns it to the end."""
  real_save, real_predictions = checkpoint.RunCheckpoints.save, train.write_predictions

  def save(self, state, labels, which, meta):
    here = meta["epoch"] == cut_epoch
    if here and cut == f"before ckpt/{which}":  # or during it: orbax renames its temporary
      raise KeyboardInterrupt(cut)              # folder last
    real_save(self, state, labels, which, meta)
    if here and cut == f"after ckpt/{which}":
      raise KeyboardInterrupt(cut)

  def write_predictions(*a, **kw):
    real_predictions(*a, **kw)
    raise KeyboardInterrupt(cut)

  monkeypatch.setattr(checkpoint.RunCheckpoints, "save", save)
  if cut == "after val_predictions.csv":
    assert cut_epoch == 0
    monkeypatch.setattr(train, "write_predictions", write_predictions)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(workdir))
  assert [h["epoch"] for h in checkpoint.read_history(workdir)] == list(range(cut_epoch))
  monkeypatch.undo()
  rerun()
  return train.train_and_evaluate(config, str(workdir))


def _assert_same_run(workdir, resumed, done, uninterrupted):
  assert resumed["best"] == uninterrupted["best"] and resumed["final"] == uninterrupted["final"]
  timeless = [[{k: v for k, v in h.items() if k not in ("train_img_per_s", "time_s")}
               for h in checkpoint.read_history(w)] for w in (workdir, done)]
  assert timeless[0] == timeless[1]  # losses, metrics, learning rates and gates
  assert ((workdir / "val_predictions.csv").read_bytes()
          == (done / "val_predictions.csv").read_bytes())
  got, want = checkpoint.load_params(workdir), checkpoint.load_params(done)
  assert got[1] == want[1]  # the best epoch's meta
  for key, value in checkpoint.flatten(want[0]).items():
    np.testing.assert_array_equal(checkpoint.flatten(got[0])[key], value, err_msg=key)


@pytest.mark.parametrize("cut", ["after val_predictions.csv", "after ckpt/best",
                                 "before ckpt/last", "after ckpt/last"])
def test_a_cut_in_the_first_epochs_bookkeeping_resumes_to_the_uninterrupted_run(
    cut, trained_run, tiny_demo_dir, tmp_path, monkeypatch):
  """Ctrl-C or a kill can land between any two writes at an epoch's end. ckpt/last commits the
  epoch: a cut before it retrains the epoch and rewrites the same files; a cut after it
  rebuilds history.jsonl from ckpt/last. Before, history.jsonl came first, so a first epoch cut
  before ckpt/last left a folder that every rerun refused (ckpt/last missing beside results)."""
  _, done, uninterrupted = trained_run
  resumed = _cut_and_resume(tiny_demo_config(tiny_demo_dir), tmp_path / "cut", cut, 0,
                            monkeypatch)
  _assert_same_run(tmp_path / "cut", resumed, done, uninterrupted)


@pytest.mark.parametrize("cut", ["after ckpt/best", "before ckpt/last", "after ckpt/last"])
def test_a_cut_after_a_later_best_keeps_the_best_consistent(cut, tiny_demo_dir, tmp_path,
                                                            monkeypatch):
  """Epoch 2 improves (lr 3e-4), saves ckpt/best (replacing epoch 1's), and is cut before
  ckpt/last. The rerun takes the best from ckpt/best's record, so ckpt/best,
  val_predictions.csv and results.json agree, as in the uninterrupted run. Before, ckpt/last
  came first and a cut after it left ckpt/best an epoch behind the recorded best."""
  config = tiny_demo_config(tiny_demo_dir, **{"optim.lr": 3e-4})
  uninterrupted = train.train_and_evaluate(config, str(tmp_path / "done"))
  assert uninterrupted["best"]["epoch"] == 1  # the case this test is about
  resumed = _cut_and_resume(config, tmp_path / "cut", cut, 1, monkeypatch)
  _assert_same_run(tmp_path / "cut", resumed, tmp_path / "done", uninterrupted)


def test_a_cut_best_epoch_retrained_lower_elsewhere_stays_the_best(tiny_demo_dir, tmp_path,
                                                                    monkeypatch):
  """Resumed on another host, the cut epoch retrains with other rounding; where its first
  evaluation was a narrow improvement, the second may not be one (forced here: SRCC -1). The
  best is then still the cut epoch's first evaluation, which ckpt/best and val_predictions.csv
  hold, never the older epoch's record beside the newer weights."""
  config = tiny_demo_config(tiny_demo_dir, **{"optim.lr": 3e-4})
  real = train.metrics.compute_metrics

  def lower_once():
    calls = []

    def rounded_lower(*a, **kw):
      m = real(*a, **kw)
      calls.append(1)
      return {**m, "srcc": -1.0} if len(calls) == 1 else m
    monkeypatch.setattr(train.metrics, "compute_metrics", rounded_lower)

  resumed = _cut_and_resume(config, tmp_path / "cut", "before ckpt/last", 1, monkeypatch,
                            rerun=lower_once)
  params, meta = checkpoint.load_params(tmp_path / "cut")
  assert resumed["best"]["epoch"] == meta["epoch"] == 1
  assert resumed["best"] == meta["best"]


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tiny_demo_dir, tmp_path,
                                                                       monkeypatch):
  workdir = tmp_path / "nan"
  train.train_and_evaluate(tiny_demo_config(tiny_demo_dir, **{"optim.epochs": 1}), str(workdir))
  real_loss = steps.iqa_loss
  monkeypatch.setattr(steps, "iqa_loss",
                      lambda *a, **k: (lambda loss, p: (loss * np.nan, p))(*real_loss(*a, **k)))
  with pytest.raises(train.NonFiniteLossError, match=r"step 23 \(epoch 2\)"):
    train.train_and_evaluate(tiny_demo_config(tiny_demo_dir, **{"optim.epochs": 2}), str(workdir))
  _, meta = checkpoint.load_params(workdir, "last")
  assert meta["epoch"] == 0


def test_missing_pretrained_weights_error_says_what_to_pass(tiny_demo_dir, tmp_path):
  config = tiny_demo_config(tiny_demo_dir)
  config.model.init = str(tmp_path / "no_such_checkpoint")
  with pytest.raises(FileNotFoundError, match="--config.model.init"):
    train.train_and_evaluate(config, str(tmp_path / "w"))


def test_train_cli_overrides_and_exit_code(tiny_demo_dir, tmp_path, capsys):
  """`--config.a.b=v` reaches the run; a missing data folder exits 2 with a clear message."""
  import subprocess
  import sys
  cmd = [sys.executable, "-m", "iqa_jax.train", "--config", "configs/demo.py",
         "--config.data.name=koniq10k", f"--config.data.dir={tmp_path / 'nowhere'}",
         f"--workdir={tmp_path / 'cli'}"]
  import pathlib
  root = pathlib.Path(__file__).resolve().parent.parent
  p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2, p.stderr[-2000:]
  assert "nowhere" in p.stderr
  saved = json.loads((tmp_path / "cli" / "config.json").read_text())
  assert saved["data"]["name"] == "koniq10k"


def test_uint8_batches_normalised_on_device_score_like_host_normalised(trained_run, tiny_demo_dir):
  """data.normalize_on_device: the pp stops at uint8 and the model normalises; same scores."""
  from iqa_jax.data import pp
  from iqa_jax.models.model import create_model
  config, _, _ = trained_run
  model, params, prep = create_model(config)
  assert pp.run_pp(config.data, prep) == "decode|resize(32, 'bilinear')"
  host = pp.get_preprocess_fn(pp.native_pp(prep, size=32, normalize=True))
  device = pp.get_preprocess_fn(pp.run_pp(config.data, prep))
  paths = sorted((tiny_demo_dir / "images").glob("*.png"))[:6]
  as_float = np.stack([host({"path": str(p)})["image"] for p in paths])
  as_uint8 = np.stack([device({"path": str(p)})["image"] for p in paths])
  assert as_uint8.dtype == np.uint8 and as_float.dtype == np.float32
  a, _ = model.apply({"params": params}, as_float)
  b, _ = model.apply({"params": params}, as_uint8)
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


def test_official_recipe_trains_through_the_real_loop(tmp_path):
  """configs/siglip2_official.py (agm head, LoRA + every backbone weight, the swapped margin
  call) on a tiny random tower: two optimizer steps; the run keeps the whole tower (it all
  trains), LoRA factors included, and the agm gate weights are logged."""
  from conftest import TINY_SIGLIP, train_two_steps
  arch = {k: v for k, v in TINY_SIGLIP.items() if k != "layer_norm_eps"}
  results, history = train_two_steps(tmp_path, "siglip2_official", arch, head="agm")
  assert np.isfinite(history[-1]["train_loss"]) and "srcc" in results["best"]
  saved, _ = checkpoint.load_params(tmp_path / "run", "last")
  assert any(".lora_a" in k for k in saved)
  assert any(k.endswith("q_proj.kernel") for k in saved)  # the base q weight trains too
  assert set(history[-1]["gate_w"]) == {"act1"}  # GatedBlend gates; the PReLU has none
