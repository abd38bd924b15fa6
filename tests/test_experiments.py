"""The run matrix: argument parsing, one real tiny run with a cross pair through the CLI, skip of
finished runs, resume of a killed one, and a NaN run recorded as failed."""
import csv
import json

import numpy as np
import pytest
from conftest import tiny_demo_config
from scipy import stats

from iqa_jax import experiments
from iqa_jax.analysis import report
from iqa_jax.runs import folder as run_folder
from iqa_jax.training import loop as train

BLUR, NOISE = "demo:gaussian_blur+pixelate", "demo:white_noise+jpeg"


def test_dataset_specs_heads_and_cross_pairs():
  blur = experiments.parse_dataset(BLUR)
  assert (blur.name, blur.options) == ("demo", (("distortions", "gaussian_blur,pixelate"),))
  assert blur.slug == "demo-gaussian_blur+pixelate"
  assert experiments.parse_dataset("koniq10k:512x384").options == (("resolution", "512x384"),)
  with pytest.raises(ValueError, match="unknown demo distortion"):
    experiments.parse_dataset("demo:gaussian_blurr")
  with pytest.raises(ValueError, match="Unknown dataset"):
    experiments.parse_dataset("koniq")
  noise = experiments.parse_dataset(NOISE)
  assert experiments.parse_cross(f"{BLUR}:{NOISE}", [blur, noise]) == (blur, noise)
  clive, koniq = experiments.parse_dataset("clive"), experiments.parse_dataset("koniq10k")
  assert experiments.parse_cross("koniq10k:clive", [clive, koniq]) == (koniq, clive)
  with pytest.raises(ValueError, match="TRAIN:TEST"):
    experiments.parse_cross("flive:clive", [clive, koniq])
  assert experiments.parse_head("sigmoid+gelu") == "sigmoid,gelu"
  with pytest.raises(ValueError):
    experiments.parse_head("sigmod")


def test_run_config_sets_dataset_head_seed():
  base = tiny_demo_config("/data/demo")
  c = experiments.run_config(base, experiments.parse_dataset(NOISE), "sigmoid,gelu", 25, "/x")
  assert (c.seed, c.model.head, c.data.name, c.data.dir) == (25, "sigmoid,gelu", "demo", "/x")
  assert c.data.options.distortions == "white_noise,jpeg"
  assert base.seed == 8 and base.data.options.distortions == ""  # the base is untouched
  assert experiments.model_label(base) == "SigLIP2 (FT, random init)"
  with pytest.raises(ValueError, match="no adapter option 'resolutoin'"):
    experiments.run_config(base, experiments.parse_dataset("koniq10k:resolutoin=1"), "gated", 8,
                           "/x")
  spec = experiments.parse_dataset("clive")
  assert experiments.data_dir_for(spec, base, {"clive": "/c"}, "/root") == "/c"
  assert experiments.data_dir_for(spec, base, {}, "/root") == "/root/clive"
  assert experiments.data_dir_for(spec, base, {}, "") == "/data/demo"


def test_spec_options_are_typed_like_their_config_field():
  """Issue 10 item 15: 'clive:drop_practice=false' used to stay the string 'false', and setting
  the bool config field with it raised TypeError."""
  base = tiny_demo_config("/data/demo")
  for text, value in (("false", False), ("False", False), ("0", False), ("true", True)):
    spec = experiments.parse_dataset(f"clive:drop_practice={text}")
    assert spec.options == (("drop_practice", value),)
    c = experiments.run_config(base, spec, "gated", 8, "/x")
    assert c.data.options.drop_practice is value
  assert base.data.options.drop_practice is True
  with pytest.raises(ValueError, match="drop_practice is true or false, got 'maybe'"):
    experiments.parse_dataset("clive:drop_practice=maybe")
  assert experiments.parse_dataset("koniq10k:512x384").options == (("resolution", "512x384"),)


def _cli_args(data_dir, out):
  return ["experiments", "--config", f"configs/demo.py:dir={data_dir},epochs=1,batch=8",
          "--config.model.arch.hidden_size=32", "--config.model.arch.intermediate_size=64",
          "--config.model.arch.num_hidden_layers=1", "--config.model.arch.num_attention_heads=2",
          "--config.model.arch.image_size=32", "--config.data.image_size=32",
          "--config.eval_batch_size=16", "--config.progress=False",
          "--datasets", BLUR, "--seeds", "8", "--heads", "gated",
          "--cross", f"{BLUR}:{NOISE}", "--out", str(out)]


@pytest.fixture(scope="module")
def matrix(tiny_demo_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("matrix")
  assert experiments.main(_cli_args(tiny_demo_dir, out)) == 0
  return out


def test_matrix_writes_runs_results_tables_and_plots(matrix):
  rows = report.load_rows(matrix / "results.jsonl")
  run, cross = [r for r in rows if r["kind"] == "run"], [r for r in rows if r["kind"] == "cross"]
  assert len(run) == 1 and len(cross) == 1
  workdir = matrix / run[0]["workdir"]
  assert workdir == matrix / "runs" / "demo-gaussian_blur+pixelate" / "gated" / "seed8"
  results = json.loads((workdir / "results.json").read_text())
  assert run[0]["best"] == results["best"] and run[0]["status"] == "done"
  assert set(run[0]["best"]) >= {"srcc", "plcc", "plcc_logistic", "krcc", "rmse_logistic"}
  # Cross: the best checkpoint scored on the whole noise+jpeg subset.
  assert (cross[0]["train"], cross[0]["test"], cross[0]["seed"]) == (BLUR, NOISE, 8)
  with open(workdir / "cross" / "demo-white_noise+jpeg" / "eval_demo.csv") as f:
    rows_csv = list(csv.DictReader(f))
  assert len(rows_csv) == cross[0]["n"] == 120  # 4 photos x 3 tiles x 2 distortions x 5 levels
  srcc = stats.spearmanr([float(r["pred"]) for r in rows_csv], [float(r["mos"]) for r in rows_csv])
  assert cross[0]["metrics"]["srcc"] == pytest.approx(srcc[0], abs=1e-5)
  for name in ("table2.md", "table2.csv", "table3.md", "table6.md"):
    assert (matrix / "tables" / name).exists(), name
  assert f"{BLUR} → {NOISE} SRCC" in (matrix / "tables" / "table3.md").read_text()
  for png in ("curves.png", "scatter_val.png", "gate_weights.png",
              "cross/demo-white_noise+jpeg/scatter.png"):
    assert (workdir / png).stat().st_size > 10_000, png
  assert (matrix / "heads_by_dataset.png").exists()


def test_rerun_skips_finished_runs(matrix, tiny_demo_dir, monkeypatch, capsys):
  before = (matrix / "results.jsonl").read_text()

  def must_not_train(*_):
    raise AssertionError("a finished run was trained again")
  monkeypatch.setattr(experiments.train, "train_and_evaluate", must_not_train)
  from iqa_jax.inference import evaluate
  monkeypatch.setattr(evaluate, "evaluate_run", lambda *a, **k: pytest.fail("re-evaluated"))
  assert experiments.main(_cli_args(tiny_demo_dir, matrix) + ["--noplots"]) == 0
  assert (matrix / "results.jsonl").read_text() == before
  # Another config over the same runs is refused (issue 10 item 2), not skipped as done.
  assert experiments.main(_cli_args(tiny_demo_dir, matrix) + ["--config.optim.lr=5e-4"]) == 2
  assert "optim.lr (0.001 -> 0.0005)" in capsys.readouterr().err
  assert (matrix / "results.jsonl").read_text() == before


def test_killed_run_resumes(matrix, tiny_demo_dir):
  """A run killed after its last checkpoint but before results.json finishes without training."""
  workdir = matrix / "runs" / "demo-gaussian_blur+pixelate" / "gated" / "seed8"
  done = json.loads((workdir / "results.json").read_text())
  (workdir / "results.json").unlink()
  # The matrix's config (configs/demo.py:epochs=1 sets milestones (1, 1)): a resume needs it.
  config = tiny_demo_config(tiny_demo_dir, **{"optim.epochs": 1, "optim.milestones": (1, 1)})
  rows = experiments.run_matrix(config, [BLUR], [8], ["gated"], matrix, plots=False)
  resumed = json.loads((workdir / "results.json").read_text())
  assert resumed["best"] == done["best"] and resumed["final"] == done["final"]
  assert [r["status"] for r in rows if r["kind"] == "run"] == ["done"]


def test_nan_run_is_recorded_failed_skipped_and_shown_as_a_dash(tmp_path, monkeypatch):
  calls = []

  def nan_train(config, workdir):
    calls.append(config.seed)
    if config.seed == 19:
      raise train.NonFiniteLossError("Loss became nan at step 7 (epoch 1); stopping.")
    return {"status": "done", "best": {"epoch": 0, "srcc": 0.5, "plcc": 0.6},
            "final": {"epoch": 0, "srcc": 0.5, "plcc": 0.6}, "test": None}
  monkeypatch.setattr(experiments.train, "train_and_evaluate", nan_train)
  base = tiny_demo_config(tmp_path / "nodata")
  rows = experiments.run_matrix(base, ["demo"], [8, 19], ["sigmoid"], tmp_path / "m",
                                plots=False, compile_cache=None)
  assert [(r["seed"], r["status"]) for r in rows] == [(8, "done"), (19, "failed")]
  assert "step 7" in rows[1]["error"]
  table1 = (tmp_path / "m" / "tables" / "table1.md").read_text()
  assert "| SigLIP2 (FT, random init) | ✓ | — | — | — | — |" in table1
  experiments.run_matrix(base, ["demo"], [8, 19], ["sigmoid"], tmp_path / "m", plots=False,
                         compile_cache=None)
  assert calls == [8, 19]  # neither the done nor the failed run is tried again
  experiments.run_matrix(base, ["demo"], [8, 19], ["sigmoid"], tmp_path / "m", plots=False,
                         compile_cache=None, retry_failed=True)
  assert calls == [8, 19, 19]
  assert np.isnan(report.run_value(rows[1], "best", "srcc"))


def test_cli_help_and_usage_errors(capsys, tmp_path):
  assert experiments.main(["experiments", "--help"]) == 0
  assert "--cross" in capsys.readouterr().out
  assert experiments.main(["experiments", "--config", "configs/demo.py"]) == 2  # no --out
  assert experiments.main(["experiments", "--config", "configs/demo.py",
                           "--out", str(tmp_path / "m"), "--datasets", "demo:blurry"]) == 2
  assert "unknown demo distortion" in capsys.readouterr().err
  assert not (tmp_path / "m").exists()


def test_nan_only_validation_is_a_failed_run_and_the_matrix_goes_on(tiny_demo_dir, tmp_path,
                                                                    monkeypatch, capsys):
  """Issue 10 item 4: constant predictions (a collapsed head) make every validation SRCC NaN."""
  monkeypatch.setattr(train, "predict", lambda _fn, _params, loader, **_: np.full(
      sum(int(np.sum(b["valid"])) for b in loader), 0.5, np.float32))
  base = tiny_demo_config(tiny_demo_dir, **{"optim.epochs": 1})
  rows = experiments.run_matrix(base, [BLUR], [8], ["gated"], tmp_path / "m",
                                cross=[f"{BLUR}:{NOISE}"], plots=False, compile_cache=None)
  workdir = tmp_path / "m" / "runs" / "demo-gaussian_blur+pixelate" / "gated" / "seed8"
  # Strict JSON: no -Infinity/NaN constants in results.json.
  results = json.loads((workdir / "results.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
  assert results["status"] == "failed" and results["best"] is None
  assert "validation SRCC was NaN in all 1 epochs" in results["error"]
  assert not run_folder.saved_steps(workdir / "ckpt" / "best")  # no best epoch to save
  assert [(r["kind"], r["status"]) for r in rows] == [("run", "failed")]  # cross skipped
  stored = report.load_rows(tmp_path / "m" / "results.jsonl")
  assert [(r["status"], r["error"]) for r in stored] == [("failed", results["error"])]
  train.print_results_table(results)  # the CLI's table: no TypeError
  assert "run failed: validation SRCC was NaN" in capsys.readouterr().out
