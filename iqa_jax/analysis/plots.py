"""PNGs of a run and of a run matrix: python -m iqa_jax.plots RUN_DIR | MATRIX_DIR

A run: training curves, predicted vs MOS with the VQEG logistic fit, and for gated heads the
distribution of the gate weight w = sigmoid(g) across channels per epoch (Fig. 2 / S7).
A matrix: mean best SRCC per dataset and head over seeds (and per cross-dataset pair).
Figures are drawn on matplotlib's Agg canvas directly, so pyplot's global state is never touched.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from iqa_jax import metrics
from iqa_jax.analysis import report
from iqa_jax.runs.folder import HISTORY, read_jsonl

HEAD_COLORS = {"baseline": "tab:blue", "sigmoid": "tab:orange", "gated": "tab:green"}


def read_history(workdir: str | Path) -> list[dict]:
  """history.jsonl's epochs; a cut line is one error naming the file and line."""
  return read_jsonl(Path(workdir) / HISTORY, "Plot after the run's next epoch rewrites it, or "
                    "restore it from a backup.")


def plot_training_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
  """Train loss (and gradient norm when logged) and validation SRCC / PLCC per epoch."""
  epochs = [h["epoch"] + 1 for h in history]
  fig = Figure(figsize=(10, 4), layout="constrained")
  ax_loss, ax_val = fig.subplots(1, 2)
  ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:red",
               label="train loss")
  ax_loss.set(xlabel="epoch", ylabel="loss (Eq. 2)", title="training loss")
  if all("grad_norm" in h for h in history) and history:
    ax_norm = ax_loss.twinx()
    ax_norm.plot(epochs, [h["grad_norm"] for h in history], "s--", color="tab:gray",
                 label="grad norm")
    ax_norm.set_ylabel("mean gradient norm")
    ax_norm.legend(loc="upper right")
  ax_loss.legend(loc="upper left")
  for key, style in (("srcc", "o-"), ("plcc", "s-"), ("plcc_logistic", "^--"), ("krcc", "v:")):
    values = [h["val"].get(key, math.nan) for h in history]
    if not all(math.isnan(v) for v in values):
      ax_val.plot(epochs, values, style, label=metrics.METRIC_LABELS[key])
  if history:
    best = max(history, key=lambda h: -math.inf if math.isnan(h["val"]["srcc"])
               else h["val"]["srcc"])
    ax_val.axvline(best["epoch"] + 1, color="k", lw=0.8, ls=":", label="best SRCC epoch")
  ax_val.set(xlabel="epoch", ylabel="validation correlation", title="validation")
  ax_val.legend(loc="lower right", fontsize=8)
  for ax in (ax_loss, ax_val):
    ax.xaxis.get_major_locator().set_params(integer=True)
  if title:
    fig.suptitle(title)
  fig.savefig(path, dpi=110)
  return Path(path)


def read_predictions(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
  """(pred, mos) of a val_predictions.csv or an eval_<dataset>.csv."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  return (np.array([float(r["pred"]) for r in rows]), np.array([float(r["mos"]) for r in rows]))


def plot_scatter(pred, mos, path: str | Path, title: str = "") -> Path:
  """Predicted score vs MOS with the fitted 4-parameter logistic (VQEG) drawn over it."""
  pred, mos = np.asarray(pred, np.float64), np.asarray(mos, np.float64)
  m = metrics.compute_metrics(pred, mos)
  fig = Figure(figsize=(5.5, 5), layout="constrained")
  ax = fig.subplots()
  ax.scatter(pred, mos, s=8, alpha=0.35, edgecolors="none", label=f"images (n={len(pred)})")
  if len(pred) > 4 and np.ptp(pred) > 0:  # else there is no curve to fit
    try:
      beta = metrics.fit_logistic(pred, mos)
      x = np.linspace(pred.min(), pred.max(), 200)
      ax.plot(x, metrics.logistic4(x, *beta), "r-", lw=2, label="4-param logistic fit")
    except (RuntimeError, ValueError):
      pass  # no convergence: the points alone
  ax.set(xlabel="predicted score", ylabel="MOS (normalised)")
  ax.set_title((title + "\n" if title else "") +
               f"SRCC {m['srcc']:.3f}  PLCC {m['plcc']:.3f}  "
               f"PLCC(logistic) {m['plcc_logistic']:.3f}", fontsize=9)
  ax.legend(loc="upper left", fontsize=8)
  fig.savefig(path, dpi=110)
  return Path(path)


def plot_gate_weights(history: list[dict], path: str | Path, title: str = "") -> Path | None:
  """Per layer: w = sigmoid(g) across channels at each epoch (Fig. S7) and at the last (Fig. 2)."""
  history = [h for h in history if h.get("gate_w")]
  if not history:
    return None
  layers = list(history[-1]["gate_w"])
  fig = Figure(figsize=(11, 3.2 * len(layers)), layout="constrained")
  axes = np.atleast_2d(fig.subplots(len(layers), 2, gridspec_kw={"width_ratios": [2.2, 1]}))
  epochs = [h["epoch"] + 1 for h in history]
  for (ax_epochs, ax_last), layer in zip(axes, layers, strict=True):
    per_epoch = [np.asarray(h["gate_w"][layer]) for h in history]
    spread = [i for i, w in enumerate(per_epoch) if np.ptp(w) > 1e-9]
    if spread:  # a KDE needs spread; a layer that has not moved is drawn as a tick
      ax_epochs.violinplot([per_epoch[i] for i in spread], [epochs[i] for i in spread],
                           showmedians=True, widths=0.8)
    flat = [i for i in range(len(per_epoch)) if i not in spread]
    ax_epochs.plot([epochs[i] for i in flat], [per_epoch[i][0] for i in flat], "k_", ms=20)
    ax_epochs.axhline(0.5, color="gray", lw=0.8, ls=":")  # g = 0 at initialisation
    ax_epochs.set(xlabel="epoch", ylabel=f"{layer}: w = σ(g)",
                  title=f"{layer}: gate weight per channel across epochs (Fig. S7)")
    ax_epochs.xaxis.get_major_locator().set_params(integer=True)
    last = per_epoch[-1]
    ax_last.hist(last, bins=40, color="tab:green", alpha=0.8)
    ax_last.axvline(0.5, color="gray", lw=0.8, ls=":")
    ax_last.set(xlabel="w  (1: sigmoid branch, 0: LeakyReLU)", ylabel="channels",
                title=f"epoch {epochs[-1]}: mean w {last.mean():.3f} (Fig. 2)")
  if title:
    fig.suptitle(title)
  fig.savefig(path, dpi=110)
  return Path(path)


def plot_run(workdir: str | Path) -> list[Path]:
  """curves.png, scatter_val.png (best epoch) and, for gated heads, gate_weights.png."""
  workdir = Path(workdir)
  labels = json.loads((workdir / "run.json").read_text()) if (workdir / "run.json").exists() \
      else {}
  title = " ".join(str(labels[k]) for k in ("dataset", "head") if k in labels)
  if "seed" in labels:
    title += f" seed {labels['seed']}"
  history = read_history(workdir)
  written = [plot_training_curves(history, workdir / "curves.png", title)] if history else []
  if (workdir / "val_predictions.csv").exists():
    pred, mos = read_predictions(workdir / "val_predictions.csv")
    written.append(plot_scatter(pred, mos, workdir / "scatter_val.png",
                                f"{title} (validation, best epoch)"))
  for eval_csv in sorted(workdir.glob("cross/*/eval_*.csv")):
    pred, mos = read_predictions(eval_csv)
    written.append(plot_scatter(pred, mos, eval_csv.parent / "scatter.png",
                                f"{title} → {eval_csv.parent.name}"))
  gates = plot_gate_weights(history, workdir / "gate_weights.png", title)
  return written + ([gates] if gates else [])


def _bars(ax, groups: list[str], heads: list[str], values: dict, ylabel: str, title: str):
  """Grouped bars: mean over seeds with a ±1 std whisker and each seed as a dot."""
  width = 0.8 / max(len(heads), 1)
  for k, head in enumerate(heads):
    for g, group in enumerate(groups):
      seeds = [v for v in values.get((group, head), []) if not math.isnan(v)]
      x = g + (k - (len(heads) - 1) / 2) * width
      if not seeds:
        ax.text(x, 0, "—", ha="center", va="bottom")
        continue
      std = float(np.std(seeds, ddof=1)) if len(seeds) > 1 else 0.0
      ax.bar(x, np.mean(seeds), width * 0.9, yerr=std, capsize=3,
             color=HEAD_COLORS.get(head), label=head if g == 0 else None)
      ax.plot([x] * len(seeds), seeds, "k.", ms=4)
      ax.text(x, np.mean(seeds), f"{np.mean(seeds):.3f}", ha="center", va="bottom", fontsize=7)
  ax.set_xticks(range(len(groups)), [g.replace(":", ":\n", 1) for g in groups], fontsize=8)
  ax.set(ylabel=ylabel, title=title)
  ax.axhline(0, color="k", lw=0.6)
  ax.legend(title="head", fontsize=8)


def plot_head_comparison(rows: list[dict], path: str | Path, which: str = "best") -> Path | None:
  """Per dataset (and per cross pair): SRCC of each head, mean ± std over seeds."""
  runs = [r for r in rows if r.get("kind", "run") == "run"]
  cross = [r for r in rows if r.get("kind") == "cross"]
  if not runs:
    return None
  heads = report.sorted_heads(r["head"] for r in runs)
  data = list(dict.fromkeys(r["dataset"] for r in runs))
  within: dict = {}
  for r in runs:
    within.setdefault((r["dataset"], r["head"]), []).append(report.run_value(r, which, "srcc"))
  panels = [(data, within, f"SRCC ({which} epoch, validation)", "within dataset")]
  if cross:
    pairs = list(dict.fromkeys(f"{r['train']} → {r['test']}" for r in cross))
    across: dict = {}
    for r in cross:
      across.setdefault((f"{r['train']} → {r['test']}", r["head"]), []).append(
          float(r["metrics"].get("srcc", math.nan)))
    panels.append((pairs, across, "SRCC (whole test set)", "cross dataset (Table 3)"))
  fig = Figure(figsize=(5 + 2.2 * sum(len(p[0]) for p in panels), 4.5), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(panels),
                                    gridspec_kw={"width_ratios": [len(p[0]) for p in panels]}))
  for ax, (groups, values, ylabel, title) in zip(axes, panels, strict=True):
    _bars(ax, groups, heads, values, ylabel, title)
  models = sorted({r["model"] for r in runs})
  fig.suptitle(f"{', '.join(models)}: heads compared, mean ± std over seeds")
  fig.savefig(path, dpi=110)
  return Path(path)


def plot_matrix(rows: list[dict], out: str | Path) -> list[Path]:
  """out/heads_by_dataset.png for a run matrix."""
  path = plot_head_comparison(rows, Path(out) / "heads_by_dataset.png")
  return [path] if path else []
