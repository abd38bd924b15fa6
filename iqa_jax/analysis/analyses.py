"""The paper's ablation tables and sweep figures from run matrices (python -m iqa_jax.report).

Table 4 (feature masking by magnitude), S3 (dropout), S1 (frozen / LoRA / full fine-tuning),
5 (our rows beside the published state of the art), S5 (compute profile), Figures S4 (LoRA
rank) and S5 (Perception Encoder tap layer). Each run's ablation setting is read from its own
`config.json`, so one matrix per setting (`--config.model.feature_keep_percentile=70 --out
runs/mask70`) and a report over all of them (`report runs/mask*/results.jsonl --table 4`).
A sweep figure (`--figure S4|S5`) prints and writes the table behind it too, with the change
from the paper's setting (rank 4, block 20) as Δ columns.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from iqa_jax.analysis import report
from iqa_jax.runs.folder import CONFIG, HISTORY, read_json, read_jsonl

# Table 4 / S3 group the datasets: synthetic distortions and AI-generated images vs in the wild.
SYNTHETIC = ("agiqa1k", "agiqa3k", "kadid10k", "demo")
HEAD_NAME = {"baseline": "LReLU", "sigmoid": "Sigmoid", "gated": "Gated"}
PAPER_DATASETS = ("clive", "koniq10k", "flive", "spaq", "agiqa3k", "agiqa1k", "kadid10k")

# Table 5 as printed in the paper (SRCC, PLCC per dataset in PAPER_DATASETS order, then the
# average; 0.875 written .875; "-": no number). These are PUBLISHED figures, not reruns.
PUBLISHED_TABLE5 = """\
(a) ILNIQE [39] .508 .508 .523 .537 - - .713 .712 - - - - .534 .558 .570 .579
(a) BRISQUE [21] .629 .629 .681 .685 .303 .341 .809 .817 - - - - .528 .567 .590 .608
(a) WaDIQaM [3] .682 .671 .804 .807 .455 .467 - - - - - - .739 .752 .670 .674
(a) DBCNN [41] .851 .869 .875 .884 .545 .551 .911 .915 - - - - .851 .856 .807 .815
(a) TIQA [38] .845 .861 .892 .903 .541 .581 - - - - - - .850 .855 .782 .800
(a) MetaIQA [44] .835 .802 .887 .856 .540 .507 - - - - - - .762 .775 .756 .735
(a) P2P-BM [37] .844 .842 .872 .885 .526 .598 - - - - - - .840 .849 .770 .793
(a) HyperIQA [31] .859 .882 .906 .917 .544 .602 .911 .915 - - - - .852 .845 .814 .832
(a) TReS [10] .846 .877 .915 .928 .554 .625 - - - - - - .859 .859 .794 .822
(a) MUSIQ [16] .702 .746 .916 .928 .566 .661 .918 .921 - - - - .875 .872 .795 .826
(a) CONTRIQUE [19] - - - - - - - - .804 .868 .670 .708 - - .737 .788
(a) RE-IQA [26] .840 .854 .914 .923 .645 .733 .918 .925 .785 .845 .614 .670 .872 .885 .798 .834
(a) GenZIQA [4] - - - - - - - - .832 .892 .840 .861 - - .836 .877
(a) LoDA [36] .876 .899 .932 .944 .578 .679 .925 .928 - - - - .931 .936 .848 .877
(a) QCN [28] .875 .893 .934 .945 .644 .741 .923 .928 - - - - - - - -
(a) B (paper) .875 .905 .932 .943 .533 .641 .927 .931 .865 .917 .857 .889 .961 .964 .850 .884
(a) B_Sig (paper) .909 .930 .938 .947 .521 .608 .921 .926 .878 .923 .872 .897 .939 .943 .854 .882
(a) B_Gated (paper) .887 .912 .953 .962 .556 .647 .928 .932 .867 .919 .873 .892 .970 .973 .862 .891
(b) DP-IQA [8] .893 .913 .942 .951 .579 .683 .923 .926 - - - - - - .834 .868
(b) LGDM [27] .908 .940 .967 .972 .705 .812 .947 .948 .863 .929 .891 .903 .958 .961 .891 .924
"""


def published_table5() -> list[tuple[str, str, list[float]]]:
  """[(part 'a'|'b', method, 16 values)] parsed from PUBLISHED_TABLE5; NaN for '-'."""
  rows = []
  for line in PUBLISHED_TABLE5.splitlines():
    tokens = line.split()
    values = [math.nan if t == "-" else float(t) for t in tokens[-16:]]
    rows.append((tokens[0][1], " ".join(tokens[1:-16]), values))
  return rows


def load_runs(results: Sequence[str | Path]) -> list[dict]:
  """Run rows of one or more results.jsonl, each with its config as '_config' (as the row
  records it, else its run folder's config.json) and its per-epoch log as '_history'.

  A row with neither stops with one line naming the missing folder: filling in defaults would
  label runs with settings they were not trained with."""
  rows = []
  for path in results:
    path = Path(path)
    root = path if path.is_dir() else path.parent
    for row in report.load_rows(path):
      if row.get("kind", "run") != "run":
        continue
      workdir = root / row.get("workdir", "")
      config = row.get("config")
      if config is None:
        if not (workdir / CONFIG).is_file():
          raise FileNotFoundError(
              f"{path}: run {row.get('workdir', '?')} has no {CONFIG} in {workdir} (moved or "
              f"deleted?), and its row records no config, so its settings are unknown. Put the "
              f"run folder back, or rerun `python -m iqa_jax.experiments` with the same --out to "
              f"rewrite results.jsonl (its rows now record each run's config).")
        config = read_json(workdir / CONFIG)
      rows.append(dict(row, _config=config,
                       _history=read_jsonl(workdir / HISTORY) if row.get("workdir") else []))
  return rows


def _model_field(row: dict, key: str, default):
  value = row["_config"].get("model", {}).get(key, default)
  return default if value is None else value


def keep_percent(row: dict, kind: str) -> int:
  """The k of Table 4 (masking percentile) or Table S3 (keep probability in %) of a run."""
  if kind == "mask":
    return int(round(float(_model_field(row, "feature_keep_percentile", 100.0))))
  return int(round(100 * (1 - float(_model_field(row, kind, 0.0)))))


def _ablation_kind(row: dict) -> str | None:
  """Which single ablation a run is: mask, input_dropout, head_dropout, or None (k=100: all)."""
  active = [k for k in ("mask", "input_dropout", "head_dropout") if keep_percent(row, k) != 100]
  return active[0] if len(active) == 1 else (None if not active else "mixed")


def _mean_over_seeds(rows: list[dict], metric: str) -> float:
  return report._mean([report.run_value(r, "best", metric) for r in rows])


def retention_table(rows: list[dict], table: str) -> report.Table:
  """Table 4 (kinds: mask) or S3 (input / layer dropout): per head and k, SRCC / PLCC per
  dataset and the mean change from k=100 over each group's datasets (the Δ columns)."""
  kinds = ("mask",) if table == "4" else ("head_dropout", "input_dropout")
  datasets = report._ordered(r["dataset"] for r in rows)
  groups = [("Group 1 (synthetic)", [d for d in datasets if d.split(":")[0] in SYNTHETIC]),
            ("Group 2 (natural)", [d for d in datasets if d.split(":")[0] not in SYNTHETIC])]
  groups = [(g, ds) for g, ds in groups if ds]
  label = {"mask": "(Masking)", "head_dropout": "w/ Dropout Layers",
           "input_dropout": "w/ Input Dropout"}
  columns, body = ["Method", "k"], []
  for g, ds in groups:
    columns += [f"{d} {m}" for d in ds for m in ("SRCC", "PLCC")]
    columns += [f"Δ {g} SRCC", f"Δ {g} PLCC"]
  for kind in kinds:
    for head in report.sorted_heads(r["head"] for r in rows):
      mine = [r for r in rows if r["head"] == head and _ablation_kind(r) in (kind, None)]
      ks = sorted({keep_percent(r, kind) for r in mine}, reverse=True)
      if ks == [100] or not ks:
        continue
      cell = {(k, d, m): _mean_over_seeds([r for r in mine if keep_percent(r, kind) == k
                                           and r["dataset"] == d], m)
              for k in ks for d in datasets for m in ("srcc", "plcc")}
      for k in ks:
        values: list = []
        for _, ds in groups:
          values += [cell[(k, d, m)] for d in ds for m in ("srcc", "plcc")]
          values += [report._mean([cell[(k, d, m)] - cell.get((100, d, m), math.nan)
                                   for d in ds]) for m in ("srcc", "plcc")]
        body.append([f"MLP-{HEAD_NAME.get(head, report.act_pair(head))} {label[kind]}", str(k)]
                    + values)
  what = ("feature-retention percentile k (masking by |feature|, train and eval)" if table == "4"
          else "dropout with keep probability k (rate 1 - k)")
  return report.Table(f"Table {table}: best SRCC / PLCC (raw) per {what}; Δ: mean change from "
                      "k = 100 over the group's datasets; mean over seeds.", columns, body)


def finetune_table(rows: list[dict]) -> report.Table:
  """Table S1: frozen vs LoRA vs full fine-tuning per head; bold: better of frozen and LoRA."""
  datasets = report._ordered(r["dataset"] for r in rows)
  columns = ["Method", "Fine-tuning"] + [f"{d} {m}" for d in datasets for m in ("SRCC", "PLCC")]
  body, pairs = [], []
  for head in report.sorted_heads(r["head"] for r in rows):
    members = {}
    for mode in ("frozen", "lora", "full"):
      mine = [r for r in rows if r["head"] == head and _model_field(r, "finetune", "lora") == mode]
      if not mine:
        continue
      members[mode] = len(body)
      ranks = sorted({int(_model_field(r, "lora", {}).get("rank", 4)) for r in mine})
      lora = f"LoRA (r={', '.join(map(str, ranks))})"
      body.append([f"SigLIP2 + {HEAD_NAME.get(head, report.act_pair(head))} MLP",
                   {"frozen": "Frozen", "lora": lora, "full": "Full FT"}[mode]]
                  + [_mean_over_seeds([r for r in mine if r["dataset"] == d], m)
                     for d in datasets for m in ("srcc", "plcc")])
    pairs.append([members[m] for m in ("frozen", "lora") if m in members])
  t = report.Table("Table S1: frozen backbone vs LoRA vs full fine-tuning, best SRCC / PLCC "
                   "(raw), mean over seeds; bold: the better of frozen and LoRA.", columns, body)
  report._bold_best(t, 2, pairs)
  return t


def sota_table(rows: list[dict]) -> report.Table:
  """Table 5: the published state of the art (labelled "published") beside our reruns."""
  columns = ["Method", "Source"] + [f"{d} {m}" for d in PAPER_DATASETS + ("Average",)
                                    for m in ("SRCC", "PLCC")]
  body = [[f"{name} [{'non-diffusion' if part == 'a' else 'diffusion'}]",
           "published (paper Table 5)"] + values for part, name, values in published_table5()]
  short = {"baseline": "B", "sigmoid": "B_Sig", "gated": "B_Gated"}
  for head in report.sorted_heads(r["head"] for r in rows):
    for model in report._ordered(r["model"] for r in rows if r["head"] == head):
      mine = [r for r in rows if r["head"] == head and r["model"] == model]
      values = [_mean_over_seeds([r for r in mine if r["dataset"] == d], m)
                for d in PAPER_DATASETS for m in ("srcc", "plcc")]
      avg = [report._mean([v for v in values[i::2] if not math.isnan(v)]) for i in (0, 1)]
      body.append([f"{short.get(head, report.act_pair(head))} ({model})",
                   f"this rerun, seeds {sorted({r['seed'] for r in mine})}"] + values + avg)
  return report.Table("Table 5: SRCC / PLCC on the seven benchmarks. Rows marked 'published' are "
                      "copied from the paper's Table 5 (not rerun here); 'this rerun' rows are "
                      "means over seeds of the given results, averaged over the datasets they "
                      "cover.", columns, body)


def compute_table(rows: list[dict]) -> report.Table:
  """Table S5: params, GMACs, memory at batch 1 per (model, head) variant of the runs."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  from iqa_jax.analysis.compute import compute_profile  # pylint: disable=g-import-not-at-top
  columns = ["Variant", "Input (HxW)", "Patch", "Params backbone", "Params head", "MACs (G)",
             "Matmul MACs (G)", "Mem (MiB)", "Batch", "Precision", "Framework", "Counter"]
  body, seen = [], set()
  for r in rows:
    key = (r["model"], r["head"])
    if key in seen:
      continue
    seen.add(key)
    p = compute_profile(ml_collections.ConfigDict(r["_config"]))
    body.append([f"{r['model']} + {HEAD_NAME.get(r['head'], report.act_pair(r['head']))}",
                 p["input"], str(p["patch"] or "—"), str(p["params_backbone"]),
                 str(p["params_head"]), p["gmacs_xla"], p["gmacs_matmul"],
                 p["memory_mib"], "1", p["precision"], p["framework"],
                 f"{p['counter']} ({p['device']})"])
  return report.Table("Table S5: compute profile per variant at batch 1. MACs = XLA cost "
                      "analysis FLOPs / 2 (attention included); matmul MACs count dot and conv "
                      "multiply-adds only (what fvcore counts); Mem = compiled program memory.",
                      columns, body, digits=4)


SWEEP_AXIS = {"S4": "LoRA rank", "S5": "Perception Encoder layer"}
# The paper's choices (App. B): rank 4 (Fig. S4) and PE block 20 (Fig. S5); the Δ columns of a
# sweep's table are changes from these (from the deepest tap / largest rank when not swept).
SWEEP_REFERENCE = {"S4": 4, "S5": 20}


def _pe_depth(row: dict) -> int:
  """Blocks of a PE run's tower (its variant with config.model.arch), to place tap -1 etc."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  from iqa_jax.models import pe, tower  # pylint: disable=g-import-not-at-top
  model = ml_collections.ConfigDict(row["_config"].get("model", {}))
  return tower.variant_config(model, pe.VARIANTS, "vit_pe_core_large_patch14_336").depth


def sweep_x(row: dict, figure: str) -> int | None:
  """A run's place on Figure S4's axis (LoRA rank; LoRA runs only) or S5's (PE tap layer,
  0-based; a negative tap counts from the last block, as config.model.tap_layer does)."""
  if figure == "S4":
    if _model_field(row, "finetune", "lora") != "lora":
      return None
    return int(_model_field(row, "lora", {}).get("rank", 4))
  if row.get("backbone") != "pe":
    return None
  tap = int(_model_field(row, "tap_layer", 20))
  return tap % _pe_depth(row) if tap < 0 else tap


def sweep_points(rows: list[dict], figure: str) -> dict:
  """{(dataset, head, metric): [(x, mean best value over seeds, std ddof=1 or 0, seeds)]}."""
  points = {}
  for dataset in report._ordered(r["dataset"] for r in rows):
    for head in report.sorted_heads(r["head"] for r in rows):
      mine = [r for r in rows if r["dataset"] == dataset and r["head"] == head
              and sweep_x(r, figure) is not None]
      for m in ("srcc", "plcc"):
        line = []
        for x in sorted({sweep_x(r, figure) for r in mine}):
          v = [report.run_value(r, "best", m) for r in mine if sweep_x(r, figure) == x]
          line.append((x, float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                       len(v)))
        if line:
          points[(dataset, head, m)] = line
  if not points:
    raise ValueError(f"no runs with a {SWEEP_AXIS[figure]} setting in these results (Figure "
                     f"{figure} needs " + ("LoRA runs)" if figure == "S4" else "backbone=pe runs)"))
  return points


def sweep_table(rows: list[dict], figure: str) -> report.Table:
  """The numbers behind Figure S4 / S5: per dataset, head and setting, best SRCC / PLCC (mean
  and std over seeds) and the change from the paper's setting (rank 4, layer 20), or from the
  largest swept value when the paper's is not in the sweep."""
  points = sweep_points(rows, figure)
  axis = SWEEP_AXIS[figure]
  columns = ["Dataset", "Head", axis, "Seeds", "SRCC", "SRCC std", "PLCC", "PLCC std",
             "Δ from", "Δ SRCC", "Δ PLCC"]
  body = []
  for (dataset, head, m), line in points.items():
    if m != "srcc":
      continue
    plcc = {x: (mean, std) for x, mean, std, _ in points[(dataset, head, "plcc")]}
    srcc = {x: (mean, std, n) for x, mean, std, n in line}
    ref = SWEEP_REFERENCE[figure] if SWEEP_REFERENCE[figure] in srcc else max(srcc)
    for x, (mean, std, n) in srcc.items():
      spread = (std, plcc[x][1]) if n > 1 else (math.nan, math.nan)  # "—": one seed, no std
      body.append([dataset, HEAD_NAME.get(head, report.act_pair(head)), str(x), str(n), mean,
                   spread[0], plcc[x][0], spread[1], str(ref), mean - srcc[ref][0],
                   plcc[x][0] - plcc[ref][0]])
  title, what = {"S4": ("Figure S4: LoRA rank", "rank"),
                 "S5": ("Figure S5: Perception Encoder tap layer (0-based block)", "layer")}[figure]
  return report.Table(f"{title}; best validation SRCC / PLCC (raw), mean and std (ddof=1) over "
                      f"seeds; Δ: change from the {what} in 'Δ from' (the paper's "
                      f"{SWEEP_REFERENCE[figure]} when swept, else the largest).", columns, body)


def _val_curves(rows: list[dict], figure: str) -> dict:
  """{(dataset, head, x): validation SRCC per epoch, mean over seeds} from the runs' history."""
  curves: dict = {}
  for r in rows:
    x = sweep_x(r, figure)
    history = r.get("_history") or []
    if x is None or r.get("status") != "done" or not history:
      continue
    curves.setdefault((r["dataset"], r["head"], x), []).append(
        [h["val"]["srcc"] for h in history])
  return {k: np.mean([c[:min(map(len, v))] for c in v], axis=0) for k, v in curves.items()}


def sweep_figure(rows: list[dict], figure: str, path: str | Path) -> Path:
  """Figure S4 (best SRCC / PLCC vs LoRA rank) or S5 (vs Perception Encoder tap layer):
  mean over seeds with the standard deviation as error bars, one line per dataset and head;
  a third panel shows validation SRCC per epoch for each setting (Fig. S4's "rank 4
  converges faster")."""
  points = sweep_points(rows, figure)
  curves = _val_curves(rows, figure)
  fig = Figure(figsize=(13 if curves else 9, 3.6), layout="constrained")
  panels = fig.subplots(1, 3 if curves else 2)
  axes = dict(zip(("srcc", "plcc"), panels[:2], strict=True))
  for (dataset, head, m), line in points.items():
    xs, means, stds, _ = zip(*line, strict=True)
    axes[m].errorbar(xs, means, yerr=stds, marker="o", capsize=3,
                     label=f"{dataset} {HEAD_NAME.get(head, head)}")
  for m, ax in axes.items():
    ax.set(xlabel=SWEEP_AXIS[figure], ylabel=f"best validation {m.upper()}",
           title=f"{m.upper()} vs {SWEEP_AXIS[figure]}")
    if figure == "S4":  # ranks double from one setting to the next
      ax.set_xscale("log", base=2)
    ticks = sorted({x for line in points.values() for x, *_ in line})
    ax.set_xticks(ticks, [str(x) for x in ticks])
    ax.minorticks_off()
    ax.legend(fontsize=7)
  if curves:
    ax = panels[2]
    for (dataset, head, x), srcc in sorted(curves.items(), key=lambda kv: kv[0][2]):
      ax.plot(np.arange(1, len(srcc) + 1), srcc, marker=".",
              label=f"{x}" + (f" ({dataset} {HEAD_NAME.get(head, head)})"
                              if len({k[:2] for k in curves}) > 1 else ""))
    ax.set(xlabel="epoch", ylabel="validation SRCC", title="validation SRCC per epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(title=SWEEP_AXIS[figure], fontsize=7, title_fontsize=7)
  fig.suptitle({"S4": "Figure S4: LoRA rank ablation",
                "S5": "Figure S5: Perception Encoder layer ablation"}[figure])
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=80)
  return Path(path)


ANALYSIS_TABLES = ("4", "S3", "S1", "5", "S5")
FIGURES = ("S4", "S5")


def make_analysis_table(results: Sequence[str | Path], table: str) -> report.Table:
  rows = load_runs(results)
  if table in ("4", "S3"):
    return retention_table(rows, table)
  return {"S1": finetune_table, "5": sota_table, "S5": compute_table}[table](rows)
