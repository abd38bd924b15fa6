"""PNGs of a real tiny gated run and of a synthetic matrix: written, readable, not blank."""
import json
import shutil

import numpy as np
import pytest
from matplotlib import image
from test_report import _rows

from iqa_jax import metrics
from iqa_jax import plots as plots_cli  # the command
from iqa_jax.analysis import plots


def _png(path):
  img = image.imread(path)
  assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 400, img.shape
  assert img[..., :3].std() > 0.05  # something was drawn
  return img


def test_plot_run_of_a_gated_run(trained_run, tmp_path):
  _, workdir, _ = trained_run
  for name in ("history.jsonl", "val_predictions.csv"):  # plot a copy: the fixture is shared
    shutil.copy(workdir / name, tmp_path / name)
  (tmp_path / "run.json").write_text(json.dumps({"dataset": "demo", "head": "gated", "seed": 8}))
  written = plots.plot_run(tmp_path)
  assert [p.name for p in written] == ["curves.png", "scatter_val.png", "gate_weights.png"]
  for p in written:
    _png(p)
  # Two gated layers, one row each: the gate figure is taller than it is for one layer.
  history = plots.read_history(tmp_path)
  assert set(history[-1]["gate_w"]) == {"act1", "act2"}
  assert _png(tmp_path / "gate_weights.png").shape[0] > 600


def test_no_gate_plot_without_gates_and_flat_gates_still_draw(tmp_path):
  history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val": {"srcc": 0.5 + 0.1 * e,
              "plcc": 0.4 + 0.1 * e}} for e in range(3)]
  assert plots.plot_gate_weights(history, tmp_path / "g.png") is None
  history[0]["gate_w"] = {"act1": [0.5] * 16}  # at init every w is 0.5: no spread for a KDE
  history[1]["gate_w"] = {"act1": list(np.linspace(0.3, 0.7, 16))}
  _png(plots.plot_gate_weights(history[:2], tmp_path / "g.png"))
  history[2]["grad_norm"] = 1.0
  _png(plots.plot_training_curves(history, tmp_path / "c.png"))


def test_scatter_with_the_logistic_fit(tmp_path):
  x = np.linspace(0, 1, 200)
  mos = metrics.logistic4(x, 1.0, 0.0, 0.5, 0.1) + np.random.default_rng(0).normal(0, 0.05, 200)
  _png(plots.plot_scatter(x, mos, tmp_path / "s.png", "synthetic"))
  _png(plots.plot_scatter(np.full(10, 0.5), np.linspace(0, 1, 10), tmp_path / "flat.png"))


def test_head_comparison_bar_chart(tmp_path):
  written = plots.plot_matrix(_rows(), tmp_path)
  assert [p.name for p in written] == ["heads_by_dataset.png"]
  img = _png(written[0])
  assert img.shape[1] > img.shape[0]  # within-dataset and cross panels side by side
  assert plots.plot_matrix([], tmp_path / "empty") == []


def test_cli_plots_a_matrix_folder(tmp_path):
  (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
  assert plots_cli.main([str(tmp_path)]) == 0
  assert (tmp_path / "heads_by_dataset.png").exists()
  with pytest.raises(SystemExit) as e:  # argparse's usage line
    plots_cli.main([])
  assert e.value.code == 2


def test_cli_help_a_missing_folder_and_a_cut_history(trained_run, tmp_path, capsys):
  """Issue 23 items 9, 10: `plots --help` and `plots MISSING` exited 1 printing nothing; a cut
  history.jsonl was a JSONDecodeError traceback."""
  with pytest.raises(SystemExit) as e:
    plots_cli.main(["--help"])
  assert e.value.code == 0 and "run folder" in capsys.readouterr().out
  assert plots_cli.main([str(tmp_path / "missing")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "missing is not a folder" in err[0]
  _, workdir, _ = trained_run
  lines = (workdir / "history.jsonl").read_text().splitlines()
  (tmp_path / "history.jsonl").write_text(lines[0] + "\n" + lines[1][:40])  # killed mid-write
  assert plots_cli.main([str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"{tmp_path / 'history.jsonl'}:2 is not valid JSON" in err[0]
  empty = tmp_path / "empty"
  empty.mkdir()
  assert plots_cli.main([str(empty)]) == 1
  assert "nothing to plot" in capsys.readouterr().err
