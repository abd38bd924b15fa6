"""Ablation options of the head (Table 4 masking, Table S3 dropout) and Table S5's MAC count."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_demo_config

from iqa_jax.analysis import compute
from iqa_jax.models.head import QualityHead, keep_top_percentile
from iqa_jax.models.model import create_model


@pytest.mark.parametrize("k", [90, 70, 50, 30, 10])
def test_feature_mask_keeps_the_top_k_percent_by_magnitude_as_numpy(k):
  f = np.random.RandomState(k).randn(6, 200).astype(np.float32)
  threshold = np.percentile(np.abs(f), 100 - k, axis=-1, keepdims=True)
  want = np.where(np.abs(f) >= threshold, f, 0)
  got = np.asarray(keep_top_percentile(jnp.asarray(f), k))
  np.testing.assert_array_equal(got, want)
  assert ((got != 0).sum(-1) == 2 * k).all()  # 200 distinct magnitudes: exactly k% remain


def test_masked_head_is_the_plain_head_on_masked_features():
  f = np.random.RandomState(0).randn(4, 64).astype(np.float32)
  head = QualityHead(acts=("sigmoid", "lrelu"), hidden=16, keep_percentile=30)
  params = head.init(jax.random.PRNGKey(0), f)["params"]
  plain = QualityHead(acts=("sigmoid", "lrelu"), hidden=16)
  masked = np.where(np.abs(f) >= np.percentile(np.abs(f), 70, axis=-1, keepdims=True), f, 0)
  np.testing.assert_allclose(head.apply({"params": params}, f)[0],
                             plain.apply({"params": params}, masked)[0], rtol=1e-6, atol=1e-6)


def _identity_head(**dropout):
  """A head whose first two layers pass their input through (ReLU of identity on x > 0), so
  out['hidden1'] is the input after input dropout and out['hidden2'] that after layer dropout."""
  d = 512
  head = QualityHead(acts=("relu", "relu"), hidden=d, **dropout)
  x = jnp.asarray(np.random.RandomState(0).uniform(1, 2, (400, d)), jnp.float32)
  params = jax.tree.map(np.asarray, head.init(jax.random.PRNGKey(0), x)["params"])
  for fc in ("fc1", "fc2"):
    params[fc] = {"kernel": np.eye(d, dtype=np.float32), "bias": np.zeros(d, np.float32)}
  return head, params, np.asarray(x)


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.1])
def test_dropout_keep_rates_and_scaling(keep):
  head, params, x = _identity_head(input_dropout=1 - keep, head_dropout=1 - keep)
  _, out = head.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  h1, h2 = np.asarray(out["hidden1"]), np.asarray(out["hidden2"])
  # 204,800 draws each: binomial std of the kept fraction is at most 0.0011.
  assert (h1 != 0).mean() == pytest.approx(keep, abs=0.005)
  np.testing.assert_allclose(h1[h1 != 0], (x / keep)[h1 != 0], rtol=1e-6)  # inverted dropout
  assert (h2 != 0).mean() == pytest.approx(keep * keep, abs=0.005)  # input and layer dropout
  _, evaluation = head.apply({"params": params}, x, train=False)
  np.testing.assert_array_equal(np.asarray(evaluation["hidden1"]), x)  # off at evaluation


def test_config_fields_reach_the_head(tmp_path):
  c = tiny_demo_config(tmp_path, **{"model.feature_keep_percentile": 30.0,
                                    "model.input_dropout": 0.2, "model.head_dropout": 0.5})
  model, _, _ = create_model(c)
  assert (model.head.keep_percentile, model.head.input_dropout, model.head.head_dropout) == \
      (30.0, 0.2, 0.5)


def test_macs_of_a_tiny_tower_match_the_hand_count(tmp_path):
  """SigLIP width D=32, MLP M=64, 2 layers (scanned), patch 8 on 32 px (T=16), gated head."""
  D, M, T, P, L = 32, 64, 16, 8, 2
  patch = T * P * P * 3 * D                                  # 98,304
  layer = T * (4 * D * D + 2 * D * M) + 2 * T * T * D        # q,k,v,o + MLP + QK^T, AV
  pool = D * D + 2 * T * D * D + 2 * T * D + D * D + 2 * D * M  # MAP: q(probe), k,v, attn, o, MLP
  head = D * 512 + 512 * 512 + 512
  hand = patch + L * layer + pool + head
  assert hand == 712_192
  config = tiny_demo_config(tmp_path)
  config.model.arch.num_hidden_layers = L
  profile = compute.compute_profile(config)
  assert profile["gmacs_matmul"] * 1e9 == pytest.approx(hand, abs=0.5)
  # XLA also counts the element-wise work (norms, GELU, softmax, gates): measured +5.8% here.
  assert hand < profile["gmacs_xla"] * 1e9 < 1.07 * hand
  assert profile["params_head"] == D * 512 + 512 + 512 * 512 + 512 + 512 + 1 + 2 * 5 * 512


def _fake_matrix(folder, runs):
  """results.jsonl + each run's config.json, as iqa_jax.experiments writes them."""
  import json
  rows = []
  for i, (dataset, head, model_fields, srcc, plcc) in enumerate(runs):
    workdir = f"runs/{i}"
    (folder / workdir).mkdir(parents=True)
    (folder / workdir / "config.json").write_text(json.dumps({"model": model_fields}))
    rows.append({"kind": "run", "dataset": dataset, "head": head, "seed": 8, "model": "SigLIP2",
                 "backbone": "siglip", "status": "done", "workdir": workdir,
                 "best": {"srcc": srcc, "plcc": plcc}})
  (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return folder / "results.jsonl"


def test_retention_tables_delta_is_the_group_mean_change_from_k100(tmp_path, capsys):
  from iqa_jax import report as report_cli
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  full = _fake_matrix(tmp_path / "a", [("kadid10k", "baseline", {}, .80, .82),
                                       ("agiqa1k", "baseline", {}, .70, .74),
                                       ("clive", "baseline", {}, .60, .66)])
  masked = _fake_matrix(tmp_path / "b", [
      ("kadid10k", "baseline", {"feature_keep_percentile": 50.0}, .75, .80),
      ("agiqa1k", "baseline", {"feature_keep_percentile": 50.0}, .60, .70),
      ("clive", "baseline", {"feature_keep_percentile": 50.0}, .61, .60),
      ("clive", "baseline", {"input_dropout": 0.3}, .58, .65)])
  assert report_cli.main([str(full), str(masked), "--table", "4"]) == 0
  md = capsys.readouterr().out
  # k=50: Group 1 = mean of (.75-.80, .60-.70) = -.075 SRCC, mean of (-.02, -.04) = -.03 PLCC.
  assert "| MLP-LReLU (Masking) | 50 | .750 | .800 | .600 | .700 | -.075 | -.030 | .610 | .600 " \
         "| .010 | -.060 |" in md
  assert report_cli.main([str(full), str(masked), "--table", "S3"]) == 0
  md = capsys.readouterr().out
  assert "| MLP-LReLU w/ Input Dropout | 70 |" in md and "| -.020 | -.010 |" in md


def test_table5_labels_published_rows_and_adds_ours(tmp_path, capsys):
  from iqa_jax import report as report_cli
  from iqa_jax.analysis import analyses
  results = _fake_matrix(tmp_path, [("clive", "sigmoid", {}, .901, .925)])
  assert report_cli.main([str(results), "--table", "5"]) == 0
  md = capsys.readouterr().out
  assert "| LGDM [27] [diffusion] | published (paper Table 5) | .908 | .940 | .967 |" in md
  assert "| B_Sig (SigLIP2) | this rerun, seeds [8] | .901 | .925 | — |" in md
  published = {name: v for _, name, v in analyses.published_table5()}
  assert len(published) == 20 and published["B_Gated (paper)"][-2:] == [.862, .891]


def test_sweep_points_average_seeds_per_lora_rank(tmp_path):
  import json

  from iqa_jax.analysis import analyses
  results = _fake_matrix(tmp_path, [
      ("clive", "gated", {"finetune": "lora", "lora": {"rank": 2}}, .80, .85),
      ("clive", "gated", {"finetune": "lora", "lora": {"rank": 2}}, .84, .87),
      ("clive", "gated", {"finetune": "lora", "lora": {"rank": 8}}, .90, .91),
      ("clive", "gated", {"finetune": "frozen"}, .50, .50)])  # not on the LoRA-rank axis
  rows = [json.loads(line) for line in results.read_text().splitlines()]
  for i, r in enumerate(rows):  # two runs of rank 2 are two seeds
    r["seed"] = 8 + i
  results.write_text("".join(json.dumps(r) + "\n" for r in rows))
  points = analyses.sweep_points(analyses.load_runs([results]), "S4")
  (x2, mean2, std2, n2), (x8, mean8, std8, n8) = points[("clive", "gated", "srcc")]
  assert (x2, n2, x8, n8, mean8, std8) == (2, 2, 8, 1, .90, 0.0)
  assert mean2 == pytest.approx(.82) and std2 == pytest.approx(np.std([.80, .84], ddof=1))
  png = analyses.sweep_figure(analyses.load_runs([results]), "S4", tmp_path / "s4.png")
  assert png.stat().st_size > 0
  with pytest.raises(ValueError, match="backbone=pe"):
    analyses.sweep_points(analyses.load_runs([results]), "S5")


def test_table_s1_rows_per_finetune_mode_and_bold_the_better_of_frozen_and_lora(tmp_path):
  from iqa_jax.analysis import analyses
  results = _fake_matrix(tmp_path, [("clive", "baseline", {"finetune": "frozen"}, .80, .86),
                                    ("clive", "baseline", {"finetune": "lora"}, .85, .84),
                                    ("clive", "baseline", {"finetune": "full"}, .90, .92)])
  t = analyses.make_analysis_table([results], "S1")
  assert [r[1:] for r in t.rows] == [["Frozen", .80, .86], ["LoRA (r=4)", .85, .84],
                                     ["Full FT", .90, .92]]
  assert t.bold == {(1, 2), (0, 3)}  # full FT is shown but not in the frozen-vs-LoRA bolding


def _sweep_config(figure, value, data_dir):
  """The tiny demo config of one sweep point: LoRA rank `value`, or PE tapped at block `value`."""
  c = tiny_demo_config(data_dir, **{"optim.epochs": 1})
  if figure == "S4":
    c.model.finetune = "lora"
    c.model.lora.rank = value
  else:
    c.model.update(backbone="pe", variant="vit_pe_core_tiny_patch16_384", tap_layer=value)
    c.model.arch = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=8,
                        img_size=32, num_classes=0, ref_feat_shape=(4, 4), attn_pool_num_heads=2)
  return c


@pytest.mark.parametrize("figure", ["S4", "S5"])
def test_sweep_table_reads_each_run_folder(figure, tiny_demo_dir, tmp_path, capsys):
  """Run folders as the run matrix leaves them (run.json, config.json from the sweep's config,
  results.json, history.jsonl; results.jsonl by experiments.write_results), without training:
  the table behind the figure holds each run's best SRCC / PLCC, the x of a tap of -1 is its
  block number, and Δ is the change from rank 4 / the deepest tap."""
  import csv
  import json

  from iqa_jax import (
    experiments,
    report,  # the CLI
  )
  from iqa_jax.analysis import analyses
  settings = [2, 4] if figure == "S4" else [0, -1]
  results, want = [], []
  for i, value in enumerate(settings):
    config = _sweep_config(figure, value, tiny_demo_dir)
    out = tmp_path / f"sweep{value}"
    run = out / "runs/demo/gated/seed8"
    run.mkdir(parents=True)
    (run / "config.json").write_text(config.to_json_best_effort(indent=2))
    (run / "run.json").write_text(json.dumps({
        "dataset": "demo", "data_name": "demo", "head": "gated", "seed": 8,
        "model": experiments.model_label(config), "backbone": config.model.backbone,
        "finetune": config.model.finetune}))
    best = {"epoch": 0, "srcc": 0.5 + 0.1 * i, "plcc": 0.45 + 0.2 * i}
    (run / "results.json").write_text(json.dumps({"status": "done", "best": best}))
    (run / "history.jsonl").write_text(json.dumps({"epoch": 0, "val": best}) + "\n")
    results.append(experiments.write_results(out))
    want.append((str(value if value >= 0 else 1), best["srcc"], best["plcc"]))
  assert report.main([str(r) for r in results] + ["--figure", figure]) == 0
  assert f"png: {results[0].parent / 'tables' / f'figure{figure}.png'}" in capsys.readouterr().out
  with open(results[0].parent / "tables" / f"figure{figure}.csv") as f:
    table = list(csv.DictReader(f))
  assert [r[analyses.SWEEP_AXIS[figure]] for r in table] == [x for x, _, _ in want]
  for row, (_, srcc, plcc) in zip(table, want, strict=True):
    assert (float(row["SRCC"]), float(row["PLCC"])) == pytest.approx((srcc, plcc), abs=1e-9)
    assert row["Δ from"] == want[1][0] and row["Seeds"] == "1" and row["SRCC std"] == ""
    assert float(row["Δ SRCC"]) == pytest.approx(srcc - want[1][1], abs=1e-9)
    assert float(row["Δ PLCC"]) == pytest.approx(plcc - want[1][2], abs=1e-9)


# Each case trains and compiles two tiny runs (14-16 s on 2 busy cores); the test above checks
# the same table on run folders written without training.
@pytest.mark.slow
@pytest.mark.parametrize("figure", ["S4", "S5"])
def test_sweep_table_and_figure_from_real_runs(figure, tiny_demo_dir, tmp_path, capsys):
  """Two real one-epoch runs per sweep through the run matrix (LoRA rank 2 and 4; PE tapped at
  blocks 0 and 1 of 2, the second as tap -1): the report's table behind the figure holds each
  run's results.json best SRCC / PLCC, and Δ is the change from rank 4 / the deepest tap."""
  import csv
  import json

  from iqa_jax import experiments
  from iqa_jax import report as report_cli
  from iqa_jax.analysis import analyses
  from iqa_jax.runs.folder import read_jsonl
  settings = [2, 4] if figure == "S4" else [0, -1]
  results = []
  for value in settings:
    c = _sweep_config(figure, value, tiny_demo_dir)
    out = tmp_path / f"sweep{value}"
    experiments.run_matrix(c, ["demo"], [8], ["gated"], out, plots=False, compile_cache=None)
    results.append(out / "results.jsonl")
  assert report_cli.main([str(r) for r in results] + ["--figure", figure]) == 0
  printed = capsys.readouterr().out
  assert f"png: {results[0].parent / 'tables' / f'figure{figure}.png'}" in printed
  with open(results[0].parent / "tables" / f"figure{figure}.csv") as f:
    table = list(csv.DictReader(f))
  want = []
  for value, path in zip(settings, results, strict=True):
    run = json.loads((path.parent / "runs/demo/gated/seed8/results.json").read_text())
    want.append((str(value if value >= 0 else 1), run["best"]["srcc"], run["best"]["plcc"]))
  axis = analyses.SWEEP_AXIS[figure]
  assert [r[axis] for r in table] == [x for x, _, _ in want]
  for row, (_, srcc, plcc) in zip(table, want, strict=True):
    assert float(row["SRCC"]) == pytest.approx(srcc, abs=1e-6)
    assert float(row["PLCC"]) == pytest.approx(plcc, abs=1e-6)
    assert row["Δ from"] == want[1][0] and row["Seeds"] == "1" and row["SRCC std"] == ""
    assert float(row["Δ SRCC"]) == pytest.approx(srcc - want[1][1], abs=2e-6)
    assert float(row["Δ PLCC"]) == pytest.approx(plcc - want[1][2], abs=2e-6)
  curves = analyses._val_curves(analyses.load_runs(results), figure)
  for (x, _, _), path in zip(want, results, strict=True):
    history = read_jsonl(path.parent / "runs/demo/gated/seed8/history.jsonl")
    np.testing.assert_array_equal(curves[("demo", "gated", int(x))],
                                  [h["val"]["srcc"] for h in history])


def _retention_matrices(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  full = _fake_matrix(tmp_path / "a", [("clive", "baseline", {}, .60, .66)])
  masked = _fake_matrix(tmp_path / "b", [
      ("clive", "baseline", {"feature_keep_percentile": 50.0}, .55, .60)])
  return full, masked


def test_moved_run_folders_stop_the_report_naming_the_folder(tmp_path, capsys):
  """Issue 23 item 5: a missing config.json was read as {}, so k=50 became k=100, the table came
  out empty ("(no runs)"), exit 0, and an earlier table4.csv was overwritten."""
  import shutil

  from iqa_jax import report  # the CLI
  full, masked = _retention_matrices(tmp_path)
  assert report.main([str(full), str(masked), "--table", "4"]) == 0
  capsys.readouterr()
  csv_file = tmp_path / "a" / "tables" / "table4.csv"
  before = csv_file.read_text()
  assert ",50," in before
  shutil.rmtree(tmp_path / "b" / "runs")  # the matrix's run folders moved elsewhere
  assert report.main([str(full), str(masked), "--table", "4"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"{tmp_path / 'b' / 'runs' / '0'}" in err[0] and "config.json" in err[0]
  assert report.main([str(masked), "--table", "S1"]) == 2  # not "LoRA (r=4)" for a frozen run
  assert csv_file.read_text() == before


def test_tables_read_the_config_a_row_records_without_its_run_folder(tmp_path, capsys):
  """Rows written by experiments.collect_results carry the run's config: no folder needed."""
  import json
  import shutil

  from iqa_jax import report  # the CLI
  full, masked = _retention_matrices(tmp_path)
  for results in (full, masked):
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    for r in rows:
      r["config"] = json.loads((results.parent / r["workdir"] / "config.json").read_text())
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.rmtree(results.parent / "runs")
  assert report.main([str(full), str(masked), "--table", "4"]) == 0
  # k=50: clive .55 / .60, Δ from k=100 (.60 / .66) = -.05 / -.06.
  assert "| MLP-LReLU (Masking) | 50 | .550 | .600 | -.050 | -.060 |" in capsys.readouterr().out


def test_collect_results_records_each_runs_config(tmp_path):
  import json

  from iqa_jax import experiments
  workdir = tmp_path / "runs" / "demo" / "gated" / "seed8"
  workdir.mkdir(parents=True)
  (workdir / "run.json").write_text(json.dumps({"dataset": "demo", "head": "gated", "seed": 8}))
  config = {"model": {"finetune": "frozen", "feature_keep_percentile": 70.0}}
  (workdir / "config.json").write_text(json.dumps(config))
  (row,) = experiments.collect_results(tmp_path)
  assert row["config"] == config and row["status"] == "running"


def test_table_s1_labels_the_lora_rank_the_runs_used(tmp_path):
  from iqa_jax.analysis import analyses
  results = _fake_matrix(tmp_path, [("clive", "baseline",
                                     {"finetune": "lora", "lora": {"rank": 8}}, .85, .84)])
  (row,) = analyses.make_analysis_table([results], "S1").rows
  assert row[1] == "LoRA (r=8)"
