"""Run folders as contracts (issue 10, items 1-7; issue 9 A1: the base checkpoint). Each test
starts from a copy of the shared 2-epoch demo run and checks the folder is refused or resumed
as the README says, with every file untouched where a rerun is refused."""
import json
import shutil

import numpy as np
import pytest
from conftest import load_config, tiny_csv_set, tiny_demo_config

from iqa_jax import experiments
from iqa_jax import score as score_cli  # the command
from iqa_jax.inference.loaded import load_run
from iqa_jax.runs import checkpoint
from iqa_jax.runs import folder as run_folder
from iqa_jax.runs.folder import RunFolderError
from iqa_jax.training import loop as train


def _files(folder):
  """path -> bytes of every file: a refused rerun must leave all of them as they were."""
  return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run_copy(trained_run, tmp_path):
  config, workdir, results = trained_run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  return config, copy, results


def test_item1_missing_last_checkpoint_is_refused_not_retrained(run_copy, tiny_demo_dir):
  _, workdir, _ = run_copy
  shutil.rmtree(workdir / "ckpt" / "last")
  before = _files(workdir)
  with pytest.raises(RunFolderError, match=r"ckpt/last is missing .* --restart"):
    train.train_and_evaluate(tiny_demo_config(tiny_demo_dir), str(workdir))
  assert _files(workdir) == before  # ckpt/best and results.json keep the trained run's


def test_item2_other_config_is_refused_before_any_write(run_copy, tiny_demo_dir):
  _, workdir, _ = run_copy
  before = _files(workdir)
  other = tiny_demo_config(tiny_demo_dir, **{"model.head": "sigmoid", "optim.lr": 5e-4})
  with pytest.raises(RunFolderError) as e:
    train.train_and_evaluate(other, str(workdir))
  assert "model.head ('gated' -> 'sigmoid')" in str(e.value) and "optim.lr" in str(e.value)
  assert "\n" not in str(e.value)
  assert _files(workdir) == before
  # score/evaluate: the recorded model
  assert load_run(str(workdir)).info["config"]["model"]["head"] == "gated"
  # --restart is the way out: the run's files go (others stay), the new config is recorded.
  (workdir / "notes.txt").write_text("mine")
  run_folder.open_run(workdir, other, restart=True)
  assert sorted(p.name for p in workdir.iterdir()) == ["base_checkpoint.json", "config.json",
                                                       "notes.txt"]
  assert json.loads((workdir / "config.json").read_text())["model"]["head"] == "sigmoid"


def test_item3_fewer_epochs_refused_more_epochs_extend(run_copy, tiny_demo_dir):
  _, workdir, _ = run_copy
  before = _files(workdir)
  with pytest.raises(RunFolderError, match=r"2 epochs are already trained.*epochs=1"):
    train.train_and_evaluate(tiny_demo_config(tiny_demo_dir, **{"optim.epochs": 1}),
                             str(workdir))
  assert _files(workdir) == before
  old = checkpoint.read_history(workdir)
  # More epochs extend the run; execution-only fields may differ meanwhile.
  more = tiny_demo_config(tiny_demo_dir, **{"optim.epochs": 3}, eval_batch_size=8, prefetch=0)
  extended = train.train_and_evaluate(more, str(workdir))
  new = checkpoint.read_history(workdir)
  assert [h["epoch"] for h in new] == [0, 1, 2] and new[:2] == old
  assert extended["final"] == {"epoch": 2, **new[2]["val"]}
  assert json.loads((workdir / "config.json").read_text())["optim"]["epochs"] == 3
  # ... to what an uninterrupted 3-epoch run of the same config gives. Training is the same
  # program on the same batches from the restored state (bit-identical); epochs 0 and 1 were
  # validated with batches of 16 in the first run, of 8 here: float32 rounding only.
  straight = train.train_and_evaluate(more, str(workdir.parent / "straight"))
  ref = checkpoint.read_history(workdir.parent / "straight")

  def trained(h):
    return {k: v for k, v in h.items() if k not in ("val", "time_s", "train_img_per_s")}
  assert [trained(h) for h in new] == [trained(h) for h in ref]  # losses, lr, gate weights
  assert new[2]["val"] == ref[2]["val"] and extended["final"] == straight["final"]
  for h, r in zip(new[:2], ref[:2], strict=True):
    assert h["val"] == pytest.approx(r["val"], abs=1e-6)  # measured 0.0 here
  last, _ = checkpoint.load_params(workdir, "last")
  for k, v in checkpoint.load_params(workdir.parent / "straight", "last")[0].items():
    np.testing.assert_array_equal(last[k], v, err_msg=k)


def _corrupt_largest_file(folder):
  f = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  f.write_bytes(b"\0garbage" * 64)
  return f


def test_item5_corrupt_files_give_one_line_naming_them(run_copy, tiny_demo_dir, tmp_path, capsys):
  config, workdir, _ = run_copy
  image = str(next((tiny_demo_dir / "images").glob("*.png")))
  out = str(tmp_path / "s.csv")
  # The largest data file of ckpt/best's params (TensorStore), through the score CLI.
  _corrupt_largest_file(next((workdir / "ckpt" / "best").glob("*/params/ocdbt.process_0")))
  assert score_cli.main(["--workdir", str(workdir), "--out", out, "--no-progress", image]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "ckpt/best/" in err and "unreadable" in err, err
  # ckpt/last's JSON item (epoch, best metrics) cut in half, on resume.
  meta = next((workdir / "ckpt" / "last").glob("*/meta/metadata"))
  meta.write_text(meta.read_text()[:10])
  with pytest.raises(RunFolderError, match=r"ckpt/last/\d+ is unreadable"):
    train.train_and_evaluate(tiny_demo_config(tiny_demo_dir), str(workdir))
  # Half-written JSON: config.json (score), history.jsonl (resume), results.json (the matrix).
  for name, call in [
      ("config.json", lambda: load_run(str(workdir))),
      ("history.jsonl", lambda: train.train_and_evaluate(tiny_demo_config(tiny_demo_dir),
                                                          str(workdir))),
      ("results.json", lambda: experiments.train_one(config, workdir, {}))]:
    f = workdir / name
    good = f.read_text()
    f.write_text(good[:len(good) // 2])
    with pytest.raises(RunFolderError, match=rf"{name}(:\d+)? is not valid JSON"):
      call()
    f.write_text(good)


def test_item6_only_process_0_writes(tmp_path, monkeypatch):
  class R:
    path, mos = "a.png", 0.5
  monkeypatch.setattr(run_folder.jax, "process_index", lambda: 1)
  checkpoint.write_history(tmp_path, [{"epoch": 0}])
  train.write_predictions(tmp_path / "val_predictions.csv", [R()], [0.25])
  run_folder.write_json(tmp_path / "results.json", {"status": "done"})
  assert list(tmp_path.iterdir()) == []
  monkeypatch.setattr(run_folder.jax, "process_index", lambda: 0)
  train.write_predictions(tmp_path / "val_predictions.csv", [R()], [0.25])
  assert (tmp_path / "val_predictions.csv").read_text().splitlines() == [
      "path,mos,pred", "a.png,0.500000,0.250000"]
  assert [p.name for p in tmp_path.iterdir()] == ["val_predictions.csv"]  # no temp file left


def test_item7_config_arguments_are_typed_and_checked(tmp_path, capsys):
  c = load_config("demo", "epochs=3,lr=5e-4,head=sigmoid,seed=19")
  assert (c.optim.epochs, c.optim.lr, c.model.head, c.seed) == (3, 5e-4, "sigmoid", 19)
  assert c.optim.milestones == (2, 2)  # computed from the typed epochs
  with pytest.raises(ValueError, match=r"unknown config argument 'lrr'.*allowed: .*\blr\b"):
    load_config("demo", "lrr=5")
  with pytest.raises(ValueError, match="epochs='three': expected int"):
    load_config("demo", "epochs=three")
  for name in ("siglip2_gated", "siglip2_baseline", "siglip2_sigmoid", "siglip2_naflex", "clip",
               "dinov2", "dinov3", "pe", "resnet", "demo"):
    assert load_config(name, "head=sigmoid").model.head == "sigmoid", name
  assert load_config("siglip2_baseline").model.head == "baseline"
  # Through a CLI: one line naming the argument, exit 2, nothing made.
  assert experiments.main(["experiments", "--config", "configs/demo.py:lrr=5",
                           "--out", str(tmp_path / "m")]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "'lrr'" in err and not (tmp_path / "m").exists()


def _perturbed_copy(src, dst, delta):
  """The tiny SigLIP checkpoint with every weight moved by `delta` (a fine-tune of one shape)."""
  from safetensors.numpy import load_file, save_file
  shutil.copytree(src, dst)
  if delta:
    f = dst / "model.safetensors"
    save_file({k: v + np.asarray(delta, v.dtype) for k, v in load_file(f).items()}, f,
              metadata={"format": "pt"})
  return dst


def test_issue9_base_checkpoint_recorded_and_checked(tiny_siglip_dir, tmp_path):
  """A LoRA run on a pretrained folder records it; scoring or resuming against other weights
  in that folder, or none, stops with one line naming both."""
  base = _perturbed_copy(tiny_siglip_dir, tmp_path / "base", 0)
  config = load_config("siglip2_gated", f"init={base}")
  config.data.update(name="csv", dir=str(tiny_csv_set(tmp_path)), image_size=32,
                     val_fraction=6 / 14)
  config.model.update(dtype="float32", remat="none")
  config.optim.update(epochs=1, batch_size=4, grad_accum=2)
  config.update(eval_batch_size=4, progress=False)
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  recorded = json.loads((workdir / "base_checkpoint.json").read_text())
  assert recorded["folder"] == str(base) and len(recorded["fingerprint"]) == 16
  assert recorded["fingerprint"] == run_folder.fingerprint(tiny_siglip_dir)  # same bytes
  load_run(str(workdir))  # the same weights: fine

  shutil.rmtree(base)
  _perturbed_copy(tiny_siglip_dir, base, 1e-3)
  before = _files(workdir)
  msg = rf"trained from base checkpoint {base} \(fingerprint {recorded['fingerprint']}\), but " \
        rf"config.model.init now gives {base} \(fingerprint [0-9a-f]{{16}}\)"
  with pytest.raises(RunFolderError, match=msg):
    load_run(str(workdir))
  with pytest.raises(RunFolderError, match=msg):
    train.train_and_evaluate(config, str(workdir))
  assert _files(workdir) == before
  shutil.rmtree(base)
  with pytest.raises(RunFolderError, match=rf"fingerprint {recorded['fingerprint']}\), but .* "
                                           rf"{base} \(missing\)"):
    load_run(str(workdir))


def test_readme_names_the_configs_that_take_init(tmp_path):
  """Issue 23 item 12: the README said every config takes `:init=`; configs/demo.py refuses it.
  Each config that takes it sets model.init from it; the README says which one does not."""
  from pathlib import Path
  names = sorted(p.stem for p in Path("configs").glob("*.py"))
  takes_init = [n for n in names if n != "demo"]
  for name in takes_init:
    assert load_config(name, f"init={tmp_path}").model.init == str(tmp_path), name
  with pytest.raises(ValueError, match="unknown config argument 'init'"):
    load_config("demo", f"init={tmp_path}")
  readme = " ".join(Path("README.md").read_text().split())
  assert "every file takes `:head=` and `:init=`" not in readme
  assert "`configs/demo.py` does not" in readme


def test_training_summary_of_a_killed_run_reads_history(run_copy):
  """Issue 23 item 8 (the run side of the model card): a killed run has no results.json; its
  best epoch comes from history.jsonl and it is marked unfinished, not "best (epoch 0), n/a"."""
  _, workdir, results = run_copy
  done = run_folder.training_summary(workdir)
  assert done["status"] == "done" and done["best"] == results["best"]
  (workdir / "results.json").unlink()  # killed after its last epoch, before results.json
  killed = run_folder.training_summary(workdir)
  assert (killed["status"], killed["epochs_done"], killed["epochs_planned"]) == ("unfinished", 2, 2)
  assert killed["best"] == results["best"]  # training's own rule, recomputed from the history
  lines = run_folder.describe_training(killed)
  assert lines[0] == "**unfinished**: 2 of 2 epochs trained (no results.json: killed, or still " \
                     "training)"
  assert lines[1] == (f"best epoch {results['best']['epoch'] + 1}: val SRCC "
                      f"{results['best']['srcc']:.4f}, PLCC {results['best']['plcc']:.4f} "
                      "(from history.jsonl)")
  history = (workdir / "history.jsonl").read_text().splitlines()
  (workdir / "history.jsonl").write_text(history[0] + "\n")  # killed in epoch 2
  first = run_folder.training_summary(workdir)
  assert first["epochs_done"] == 1 and first["best"]["epoch"] == 0
  assert first["best"]["srcc"] == json.loads(history[0])["val"]["srcc"]
