"""Correlation metrics of IQA: SRCC and raw PLCC are the paper's headline numbers."""
from __future__ import annotations

import numpy as np
from scipy import stats


def srcc(pred, mos) -> float:
  return float(stats.spearmanr(pred, mos)[0])


def plcc(pred, mos) -> float:
  """Raw Pearson correlation, without a logistic mapping (the paper's PLCC)."""
  return float(stats.pearsonr(pred, mos)[0])


def compute_metrics(pred, mos) -> dict[str, float]:
  pred, mos = np.asarray(pred, np.float64), np.asarray(mos, np.float64)
  return {"srcc": srcc(pred, mos), "plcc": plcc(pred, mos)}
