"""Tables from a synthetic results store with known numbers: means, stds, bold, dashes, CSV."""
import csv
import json

import numpy as np
import pytest

from iqa_jax import report as report_cli
from iqa_jax.analysis import report

SEEDS = (8, 19, 25)
DATASETS = ("clive", "koniq10k")
# Best-epoch SRCC per (head, dataset) and seed; PLCC is SRCC + 0.01.
SRCC = {("baseline", "clive"): (0.80, 0.82, 0.84), ("baseline", "koniq10k"): (0.90, 0.91, 0.92),
        ("sigmoid", "clive"): (0.86, 0.87, 0.88), ("sigmoid", "koniq10k"): (0.88, 0.89, 0.90),
        ("gated", "clive"): (0.85, 0.88, 0.91), ("gated", "koniq10k"): (0.93, 0.93, 0.93)}
CROSS = {"baseline": (0.70, 0.72, 0.74), "sigmoid": (0.78, 0.80, 0.82),
         "gated": (0.76, 0.79, 0.82)}


def _run(head, dataset, seed, srcc, status="done"):
  m = {"srcc": srcc, "plcc": srcc + 0.01}
  return {"kind": "run", "dataset": dataset, "head": head, "seed": seed, "model": "SigLIP2",
          "status": status, "best": {"epoch": 3, **m} if status == "done" else None,
          "final": {"epoch": 9, "srcc": srcc - 0.05, "plcc": srcc - 0.04}}


def _rows():
  rows = [_run(h, d, s, v)
          for (h, d), vals in SRCC.items() for s, v in zip(SEEDS, vals, strict=True)]
  rows += [{"kind": "cross", "train": "clive", "test": "koniq10k", "head": h, "seed": s,
            "model": "SigLIP2", "metrics": {"srcc": v, "plcc": v + 0.02}}
           for h, vals in CROSS.items() for s, v in zip(SEEDS, vals, strict=True)]
  return rows


def test_table1_means_plus_sig_column_and_bold_per_head():
  t = report.make_table(_rows(), "1")
  assert t.columns == ["Method", "+Sig", "clive SRCC", "clive PLCC", "koniq10k SRCC",
                       "koniq10k PLCC", "Average SRCC", "Average PLCC"]
  (base, sig) = t.rows  # gated runs go to Table 2
  assert base[:2] == ["SigLIP2", ""] and sig[:2] == ["SigLIP2", "✓"]
  assert base[2] == pytest.approx(0.82) and sig[4] == pytest.approx(0.89)
  assert base[6] == pytest.approx((0.82 + 0.91) / 2) and base[7] == pytest.approx(0.875)
  assert t.bold == set()  # one model per head group: nothing to compare within a group
  md = report.to_markdown(t)
  assert "| SigLIP2 |  | .820 | .830 | .910 | .920 | .865 | .875 |" in md
  assert "mean over seeds 8, 19, 25 (3 per cell)" in md


def test_table6_compares_heads_with_bold_best_per_column():
  t = report.make_table(_rows(), "6")
  assert [r[0] for r in t.rows] == ["LReLU + LReLU", "Sig + LReLU", "Gated + Gated"]
  md = report.to_markdown(t)
  # Gated is best everywhere: clive .880 (sigmoid .870), koniq10k .930, average (.88 + .93) / 2.
  assert "| Sig + LReLU | .870 | .880 | .890 | .900 | .880 | .890 |" in md
  assert "| Gated + Gated | **.880** | **.890** | **.930** | **.940** | **.905** | **.915** |" in md
  assert len(t.bold) == 6
  t_final = report.make_table(_rows(), "6", which="final")
  assert t_final.rows[0][1] == pytest.approx(0.77)


def test_table_s2_is_the_sample_std_over_seeds():
  t = report.make_table(_rows(), "S2")
  assert [r[0] for r in t.rows] == ["SigLIP2", "SigLIP2 + Sigmoid", "SigLIP2 + Activation Gating"]
  assert t.rows[2][1] == pytest.approx(np.std([0.85, 0.88, 0.91], ddof=1))
  md = report.to_markdown(t)
  assert "| SigLIP2 + Activation Gating | .0300 | .0300 | <.0001 | <.0001 |" in md


def test_table3_cross_means_and_s4_stds():
  t = report.make_table(_rows(), "3")
  assert t.columns == ["Method", "clive → koniq10k SRCC", "Average SRCC"]
  assert [r[0] for r in t.rows] == ["B", "B_Sig", "B_Gated"]
  assert t.rows[1][1] == pytest.approx(0.80)
  assert (1, 1) in t.bold and (1, 2) in t.bold and len(t.bold) == 2
  s4 = report.make_table(_rows(), "S4")
  assert s4.rows[0][1:] == pytest.approx([0.02, 0.02])


def test_a_nan_run_shows_a_dash_for_its_cell_only():
  rows = _rows()
  rows[0] = _run("baseline", "clive", 8, 0.0, status="failed")
  t = report.make_table(rows, "1")
  md = report.to_markdown(t)
  assert "| SigLIP2 |  | — | — | .910 | .920 | — | — |" in md


@pytest.mark.parametrize("value,digits,text", [(0.8754, 3, ".875"), (-0.0774, 3, "-.077"),
                                               (1.0, 3, "1.000"), (float("nan"), 3, "—"),
                                               (0.00004, 4, "<.0001"), (0.0174, 4, ".0174")])
def test_format_value_in_the_papers_style(value, digits, text):
  assert report.format_value(value, digits) == text


def test_cli_prints_markdown_and_writes_csv(tmp_path, capsys):
  store = tmp_path / "results.jsonl"
  store.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
  assert report_cli.main([str(store), "--table", "2"]) == 0
  out = capsys.readouterr().out
  assert "| SigLIP2 | .880 | .890 | .930 | .940 | .905 | .915 |" in out
  with open(tmp_path / "tables" / "table2.csv") as f:
    rows = list(csv.reader(f))
  assert rows[0][:2] == ["Method", "clive SRCC"]
  assert float(rows[1][1]) == pytest.approx(0.88)
  written = report.write_tables(_rows(), tmp_path / "all")
  assert sorted(p.name for p in written) == [f"table{t}.md" for t in sorted(report.TABLES)]


def test_an_empty_table_exits_1_and_keeps_the_earlier_csv(tmp_path, capsys):
  """Issue 23 item 5: "(no runs)", exit 0 and an overwritten CSV hid that nothing matched."""
  store = tmp_path / "results.jsonl"
  store.write_text("".join(json.dumps(r) + "\n" for r in _rows() if r["head"] == "gated"))
  earlier = tmp_path / "tables" / "table1.csv"
  earlier.parent.mkdir()
  earlier.write_text("kept\n")
  assert report_cli.main([str(store), "--table", "1"]) == 1  # Table 1 has no gated rows
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "Table 1" in err[0] and "nothing written" in err[0]
  assert earlier.read_text() == "kept\n"


def test_a_cut_results_jsonl_is_one_line_naming_the_file_and_line(tmp_path, capsys):
  """Issue 23 item 11: a crash mid-write left half a line; the JSON error named no file."""
  store = tmp_path / "results.jsonl"
  text = "".join(json.dumps(r) + "\n" for r in _rows())
  store.write_text(text[:-20])
  assert report_cli.main([str(store), "--table", "1"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"{store}:{len(_rows())}" in err[0]
  assert report_cli.main([str(tmp_path / "missing.jsonl")]) == 2
  assert "missing.jsonl not found" in capsys.readouterr().err
