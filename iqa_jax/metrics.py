"""IQA metrics. SRCC and raw PLCC are the paper's headline numbers (Tables 1-6); the VQEG set
(PLCC and RMSE after a 4-parameter logistic mapping, KRCC) is reported beside them."""
from __future__ import annotations

import warnings

import numpy as np
from scipy import optimize, stats

# Every key compute_metrics returns, with the label tables and plots print for it.
METRIC_LABELS = {
    "srcc": "SRCC",
    "plcc": "PLCC (raw)",
    "krcc": "KRCC",
    "plcc_logistic": "PLCC (after 4-param logistic)",
    "rmse": "RMSE (raw, normalised MOS)",
    "rmse_logistic": "RMSE (after 4-param logistic, normalised MOS)",
}


def srcc(pred, mos) -> float:
  """Spearman rank correlation (the paper's SRCC)."""
  return float(stats.spearmanr(pred, mos)[0])


def plcc(pred, mos) -> float:
  """Raw Pearson correlation, without a logistic mapping (the paper's PLCC)."""
  return float(stats.pearsonr(pred, mos)[0])


def krcc(pred, mos) -> float:
  """Kendall rank correlation (tau-b, ties counted as scipy does)."""
  return float(stats.kendalltau(pred, mos)[0])


def rmse(pred, mos) -> float:
  return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - np.asarray(mos, np.float64)) ** 2)))


def logistic4(x, b1: float, b2: float, b3: float, b4: float):
  """VQEG 4-parameter logistic: (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2."""
  z = np.clip(-(np.asarray(x, np.float64) - b3) / max(abs(b4), 1e-12), -500.0, 500.0)
  return (b1 - b2) / (1.0 + np.exp(z)) + b2


def fit_logistic(pred, mos) -> np.ndarray:
  """Least-squares (b1, b2, b3, b4) of logistic4 mapping predictions onto MOS (VQEG)."""
  pred, mos = np.asarray(pred, np.float64), np.asarray(mos, np.float64)
  spread = float(np.std(pred)) or 1.0
  lo, hi = float(np.min(mos)), float(np.max(mos))
  if plcc(pred, mos) < 0:  # a decreasing curve starts from the decreasing end
    lo, hi = hi, lo
  start = np.array([hi, lo, float(np.median(pred)), spread])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optimize.OptimizeWarning)
    beta, _ = optimize.curve_fit(logistic4, pred, mos, p0=start, maxfev=20000)
  return beta


def logistic_plcc_rmse(pred, mos) -> tuple[float, float]:
  """(PLCC, RMSE) of the logistic-mapped predictions vs MOS; NaN if the fit fails.

  PLCC takes the sign of the fitted curve's direction (b1 < b2: decreasing), so an
  anti-correlated predictor stays negative, as its raw PLCC and SRCC are.
  """
  if len(pred) <= 4:  # four parameters need more than four points
    return float("nan"), float("nan")
  try:
    beta = fit_logistic(pred, mos)
  except (RuntimeError, ValueError):  # no convergence
    return float("nan"), float("nan")
  mapped = logistic4(pred, *beta)
  if np.ptp(mapped) == 0:
    return float("nan"), rmse(mapped, mos)
  return float(np.sign(beta[0] - beta[1])) * plcc(mapped, mos), rmse(mapped, mos)


def compute_metrics(pred, mos) -> dict[str, float]:
  """All METRIC_LABELS keys for predictions vs MOS (both on the normalised [0, 1] scale)."""
  pred, mos = np.asarray(pred, np.float64), np.asarray(mos, np.float64)
  if len(pred) < 2 or np.ptp(pred) == 0 or np.ptp(mos) == 0:  # correlations are undefined
    nan = float("nan")
    return {"srcc": nan, "plcc": nan, "krcc": nan, "plcc_logistic": nan,
            "rmse": rmse(pred, mos) if len(pred) else nan, "rmse_logistic": nan}
  plcc_mapped, rmse_mapped = logistic_plcc_rmse(pred, mos)
  return {"srcc": srcc(pred, mos), "plcc": plcc(pred, mos), "krcc": krcc(pred, mos),
          "plcc_logistic": plcc_mapped, "rmse": rmse(pred, mos), "rmse_logistic": rmse_mapped}
