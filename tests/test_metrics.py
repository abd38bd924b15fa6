"""Metrics against scipy and worked examples with known answers."""
import numpy as np
import pytest
from scipy import stats

from iqa_jax import metrics


def _noisy(n=300, seed=0):
  rng = np.random.default_rng(seed)
  mos = rng.uniform(0, 1, n)
  return mos + rng.normal(0, 0.1, n), mos


def test_correlations_match_scipy():
  pred, mos = _noisy()
  m = metrics.compute_metrics(pred, mos)
  assert m["srcc"] == pytest.approx(stats.spearmanr(pred, mos).statistic, abs=1e-12)
  assert m["plcc"] == pytest.approx(stats.pearsonr(pred, mos).statistic, abs=1e-12)
  assert m["krcc"] == pytest.approx(stats.kendalltau(pred, mos).statistic, abs=1e-12)
  assert m["rmse"] == pytest.approx(np.sqrt(np.mean((pred - mos) ** 2)), abs=1e-12)
  assert set(m) == set(metrics.METRIC_LABELS)


def test_worked_example_by_hand():
  # pred 1,2,3,4 vs mos 1,3,2,4: one discordant pair of six -> tau = (5 - 1) / 6;
  # rank differences 0,1,1,0 -> rho = 1 - 6 * 2 / (4 * 15) = 0.8; Pearson = 0.8 too.
  pred, mos = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]
  assert metrics.krcc(pred, mos) == pytest.approx(4 / 6)
  assert metrics.srcc(pred, mos) == pytest.approx(0.8)
  assert metrics.plcc(pred, mos) == pytest.approx(0.8)
  assert metrics.rmse(pred, mos) == pytest.approx(np.sqrt(0.5))


def test_logistic_fit_recovers_a_known_curve():
  beta = np.array([0.9, 0.1, 0.3, 0.15])
  x = np.linspace(-0.5, 1.0, 200)
  mos = metrics.logistic4(x, *beta)
  fitted = metrics.fit_logistic(x, mos)
  fitted[3] = abs(fitted[3])  # the curve depends on |b4| only
  np.testing.assert_allclose(fitted, beta, atol=1e-5)
  m = metrics.compute_metrics(x, mos)
  assert m["plcc_logistic"] == pytest.approx(1.0, abs=1e-9)
  assert m["rmse_logistic"] == pytest.approx(0.0, abs=1e-6)
  assert m["plcc"] < 0.99  # raw PLCC sees the curvature; SRCC does not
  assert m["srcc"] == pytest.approx(1.0)


def test_logistic_fit_on_a_decreasing_curve():
  x = np.linspace(0, 1, 100)
  mos = metrics.logistic4(x, 0.0, 1.0, 0.5, 0.1)  # b1 < b2: decreasing
  m = metrics.compute_metrics(x, mos)
  # The mapped scores follow MOS exactly; the sign keeps the predictor's direction.
  assert m["plcc_logistic"] == pytest.approx(-1.0, abs=1e-8)
  assert m["rmse_logistic"] == pytest.approx(0.0, abs=1e-6)
  assert m["srcc"] == pytest.approx(-1.0)


def test_logistic_mapping_never_hurts_pearson_on_noisy_data():
  pred, mos = _noisy(seed=3)
  pred = np.exp(3 * pred)  # a monotone distortion of the prediction scale
  m = metrics.compute_metrics(pred, mos)
  assert m["plcc_logistic"] > m["plcc"]
  assert m["rmse_logistic"] < np.std(mos)


def test_constant_predictions_give_nan_correlations():
  m = metrics.compute_metrics(np.full(10, 0.5), np.linspace(0, 1, 10))
  assert np.isnan(m["srcc"]) and np.isnan(m["plcc_logistic"])
  assert m["rmse"] == pytest.approx(np.sqrt(np.mean((0.5 - np.linspace(0, 1, 10)) ** 2)))


def test_too_few_points_for_the_logistic_give_nan_mapped_metrics():
  m = metrics.compute_metrics([0.1, 0.4, 0.2, 0.9], [0.0, 0.5, 0.25, 1.0])
  assert m["srcc"] == pytest.approx(1.0)
  assert np.isnan(m["plcc_logistic"]) and np.isnan(m["rmse_logistic"])


def test_anti_correlated_predictions_stay_negative_after_the_mapping():
  pred, mos = _noisy(seed=5)
  m = metrics.compute_metrics(-pred, mos)
  assert m["srcc"] < -0.9 and m["plcc_logistic"] < -0.9
  assert m["plcc_logistic"] == pytest.approx(-metrics.compute_metrics(pred, mos)["plcc_logistic"],
                                             abs=1e-6)
