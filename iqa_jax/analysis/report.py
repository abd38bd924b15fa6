"""Paper-style tables from a results store: python -m iqa_jax.report DIR/results.jsonl --table 1
(and one HTML page of a run's or a score CSV's images: python -m iqa_jax.report gallery --help)

Tables 1/2 (model x dataset SRCC / raw PLCC; Table 1 the baseline and +Sig heads, Table 2 the
gated head), S2 (their standard deviations over seeds), 3 (cross-dataset SRCC), S4 (its standard
deviations) and 6 (activation pairs). Cells are means over seeds, "—" where a run is missing or
stopped on a NaN; bold marks the best value per column. Markdown is printed, CSV written.
"""
from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from iqa_jax.models.head import resolve_head
from iqa_jax.runs.folder import read_jsonl

TABLES = ("1", "2", "S2", "3", "S4", "6")
ACT_NAMES = {"lrelu": "LReLU", "relu": "ReLU", "gelu": "GELU", "tanh": "Tanh", "sigmoid": "Sig",
             "gated": "Gated", "blend": "GatedBlend", "prelu": "PReLU"}  # the last two: agm
# Table 3's and Table S2's names of the three heads.
SHORT_HEAD = {"baseline": "B", "sigmoid": "B_Sig", "gated": "B_Gated"}
LONG_HEAD = {"baseline": "", "sigmoid": " + Sigmoid", "gated": " + Activation Gating"}


@dataclasses.dataclass
class Table:
  title: str
  columns: list[str]
  rows: list[list]  # label cells (str) then values (float; NaN prints as "—")
  bold: set[tuple[int, int]] = dataclasses.field(default_factory=set)
  digits: int = 3


def load_rows(path: str | Path) -> list[dict]:
  """Rows of a results.jsonl (or of the one inside a matrix folder)."""
  path = Path(path)
  if path.is_dir():
    path = path / "results.jsonl"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: pass a results.jsonl written by "
                            f"`python -m iqa_jax.experiments` (or its matrix folder)")
  return read_jsonl(path, "Rewrite it by rerunning `python -m iqa_jax.experiments` with the same "
                    "--out (finished runs are skipped).")


def act_pair(head: str) -> str:
  """'sigmoid' -> 'Sig + LReLU' (Table 6's row names)."""
  return " + ".join(ACT_NAMES[a] for a in resolve_head(head))


def run_value(row: dict, which: str, metric: str) -> float:
  """A run's metric at its best or final epoch, or on its test split; NaN if it has none."""
  if row.get("status") != "done" or not row.get(which):
    return math.nan
  value = row[which].get(metric)
  return math.nan if value is None else float(value)


def _ordered(values) -> list:
  return list(dict.fromkeys(values))


def sorted_heads(heads) -> list[str]:
  """baseline, sigmoid, gated first (the paper's order), then activation pairs as they come."""
  named = list(SHORT_HEAD)
  return sorted(_ordered(heads), key=lambda h: named.index(h) if h in named else len(named))


def _mean(xs: list[float]) -> float:
  return float(np.mean(xs)) if xs and not any(math.isnan(x) for x in xs) else math.nan


def _std(xs: list[float]) -> float:
  """Sample standard deviation over seeds (ddof=1); NaN below two seeds."""
  if len(xs) < 2 or any(math.isnan(x) for x in xs):
    return math.nan
  return float(np.std(xs, ddof=1))


def _seeds_note(groups: dict) -> str:
  seeds = sorted({s for g in groups.values() for s, _ in g})
  counts = {len(g) for g in groups.values()}
  n = f"{min(counts)}" if len(counts) == 1 else f"{min(counts)}-{max(counts)}"
  return f"seeds {', '.join(map(str, seeds))} ({n} per cell)"


def _bold_best(table: Table, first_value: int, groups: Sequence[Sequence[int]]) -> None:
  """Bolds the maximum of each value column within each group of row indices."""
  for j in range(first_value, len(table.columns)):
    for members in groups:
      vals = [(table.rows[i][j], i) for i in members if not math.isnan(table.rows[i][j])]
      if len(vals) > 1:
        best = max(v for v, _ in vals)
        table.bold |= {(i, j) for v, i in vals if v == best}


def _collect(rows, kind: str, key: Callable[[dict], tuple], value: Callable[[dict], float]):
  """{key: [(seed, value), ...]} over the rows of one kind."""
  groups: dict[tuple, list] = {}
  for r in rows:
    if r.get("kind", "run") == kind:
      groups.setdefault(key(r), []).append((r["seed"], value(r)))
  return groups


def dataset_table(rows: list[dict], table: str, which: str = "best") -> Table:
  """Tables 1, 2, 6 (means) and S2 (std): one row per model and head, SRCC / PLCC per dataset."""
  runs = [r for r in rows if r.get("kind", "run") == "run"]
  if table == "1":
    baseline_or_sig = (("lrelu", "lrelu"), ("sigmoid", "lrelu"))
    runs = [r for r in runs if resolve_head(r["head"]) in baseline_or_sig]
  elif table == "2":
    runs = [r for r in runs if resolve_head(r["head"]) == ("gated", "gated")]
  data = _ordered(r["dataset"] for r in runs)
  heads = sorted_heads(r["head"] for r in runs)
  models = _ordered(r["model"] for r in runs)
  metric_cols = [(d, m) for d in data for m in ("srcc", "plcc")]
  groups = {c: _collect(runs, "run", lambda r: (r["model"], r["head"], r["dataset"]),
                        lambda r, m=c: run_value(r, which, m))
            for c in ("srcc", "plcc")}
  reduce = _std if table == "S2" else _mean
  body, head_groups = [], []
  for head in heads:
    members = []
    for model in models:
      cells = [reduce([v for _, v in groups[m].get((model, head, d), [])]) for d, m in metric_cols]
      if all(not groups[m].get((model, head, d)) for d, m in metric_cols):
        continue
      if table == "1":
        labels = [model, "✓" if resolve_head(head)[0] == "sigmoid" else ""]
      elif table == "2":
        labels = [model]
      elif table == "6":
        labels = [act_pair(head) if len(models) == 1 else f"{model} {act_pair(head)}"]
      else:
        labels = [model + LONG_HEAD.get(head, f" + {act_pair(head)}")]
      if table != "S2":
        cells += [_mean(cells[0::2]), _mean(cells[1::2])]  # average over datasets
      members.append(len(body))
      body.append(labels + cells)
    head_groups.append(members)
  label_cols = {"1": ["Method", "+Sig"], "2": ["Method"], "6": ["Act1 + Act2"]}.get(table,
                                                                                   ["Experiment"])
  columns = label_cols + [f"{d} {m.upper()}" for d, m in metric_cols]
  if table != "S2":
    columns += ["Average SRCC", "Average PLCC"]
  note = _seeds_note(groups["srcc"]) if groups["srcc"] else "no runs"
  titles = {
      "1": "Table 1: SRCC / PLCC (raw) with the baseline head; ✓: first activation Sigmoid "
           "(+Sig)",
      "2": "Table 2: SRCC / PLCC (raw) with the channel-wise gated head (Eq. 3)",
      "6": "Table 6: activation pairs of the head (Act1 for the first hidden layer, Act2 for the "
           "second), SRCC / PLCC (raw)",
      "S2": "Table S2: standard deviation (ddof=1) of SRCC / PLCC (raw) across seeds"}
  t = Table(f"{titles[table]}; {which} epoch, mean over {note}." if table != "S2"
            else f"{titles[table]}; {which} epoch, {note}.", columns, body,
            digits=4 if table == "S2" else 3)
  if table != "S2":
    bold_groups = head_groups if table == "1" else [list(range(len(body)))]
    _bold_best(t, len(label_cols), bold_groups)
  return t


def cross_table(rows: list[dict], table: str = "3") -> Table:
  """Table 3 (mean SRCC per train -> test pair) and S4 (std of SRCC / PLCC), best checkpoints."""
  cross = [r for r in rows if r.get("kind") == "cross"]
  pairs = _ordered((r["train"], r["test"]) for r in cross)
  heads = sorted_heads(r["head"] for r in cross)
  models = _ordered(r["model"] for r in cross)
  metrics = ("srcc",) if table == "3" else ("srcc", "plcc")
  groups = {m: _collect(cross, "cross", lambda r: (r["model"], r["head"], r["train"], r["test"]),
                        lambda r, m=m: float(r["metrics"].get(m, math.nan)))
            for m in metrics}
  body = []
  for model in models:
    for head in heads:
      if not any(groups["srcc"].get((model, head) + p) for p in pairs):
        continue
      name = SHORT_HEAD.get(head, act_pair(head)) if table == "3" else \
          model + LONG_HEAD.get(head, f" + {act_pair(head)}")
      if table == "3" and len(models) > 1:
        name = f"{model} {name}"
      reduce = _mean if table == "3" else _std
      cells = [reduce([v for _, v in groups[m].get((model, head) + p, [])])
               for p in pairs for m in metrics]
      if table == "3":
        cells.append(_mean(cells))
      body.append([name] + cells)
  columns = ["Method"] + [f"{a} → {b} {m.upper()}" for a, b in pairs for m in metrics]
  note = _seeds_note(groups["srcc"]) if groups["srcc"] else "no runs"
  if table == "3":
    columns.append("Average SRCC")
    t = Table(f"Table 3: cross-dataset SRCC (train → test, whole test set, best checkpoint), "
              f"mean over {note}.", columns, body)
    _bold_best(t, 1, [list(range(len(body)))])
    return t
  return Table(f"Table S4: standard deviation (ddof=1) of cross-dataset SRCC / PLCC (raw), {note}.",
               columns, body, digits=4)


def make_table(rows: list[dict], table: str, which: str = "best") -> Table:
  if table not in TABLES:
    raise ValueError(f"--table must be one of {TABLES}, got {table!r}")
  return cross_table(rows, table) if table in ("3", "S4") else dataset_table(rows, table, which)


def format_value(v: float, digits: int) -> str:
  """The paper's style: .875, -.077; '—' for a missing or NaN cell, '<.0001' below precision."""
  if isinstance(v, str):
    return v
  if math.isnan(v):
    return "—"
  if 0 <= v < 0.5 * 10 ** -digits and digits >= 4:
    return "<." + "0" * (digits - 1) + "1"
  s = f"{v:.{digits}f}"
  return s.replace("0.", ".", 1) if s.startswith(("0.", "-0.")) else s


def to_markdown(t: Table) -> str:
  lines = [t.title, "", "| " + " | ".join(t.columns) + " |",
           "|" + "|".join("---" if j == 0 else ":---:" for j in range(len(t.columns))) + "|"]
  for i, row in enumerate(t.rows):
    cells = [format_value(v, t.digits) for v in row]
    cells = [f"**{c}**" if (i, j) in t.bold else c for j, c in enumerate(cells)]
    lines.append("| " + " | ".join(cells) + " |")
  if not t.rows:
    lines.append("| (no runs) |" + " |" * (len(t.columns) - 1))
  return "\n".join(lines) + "\n"


def write_csv(t: Table, path: str | Path) -> Path:
  """The same layout, unrounded (6 decimals), empty cells for missing values."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(t.columns)
    for row in t.rows:
      w.writerow([v if isinstance(v, str) else ("" if math.isnan(v) else f"{v:.6f}")
                  for v in row])
  return path


def write_tables(rows: list[dict], out_dir: str | Path, which: str = "best") -> list[Path]:
  """table<ID>.md and .csv for every table the rows can fill; returns the Markdown paths."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for table in TABLES:
    t = make_table(rows, table, which)
    if t.rows:
      md = out_dir / f"table{table}.md"
      md.write_text(to_markdown(t))
      write_csv(t, md.with_suffix(".csv"))
      written.append(md)
  return written
