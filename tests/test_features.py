"""The feature cache: a head trained on stored features equals one trained end to end with the
frozen backbone; extraction resumes after a kill; a cache of another backbone is refused."""
import json

import numpy as np
import pytest
from conftest import tiny_demo_config

from iqa_jax import checkpoint, features, train


@pytest.fixture(scope="module")
def frozen_runs(tiny_demo_dir, tmp_path_factory):
  """(end-to-end frozen run, feature cache, run trained from the cache), one epoch each."""
  root = tmp_path_factory.mktemp("features")
  frozen = {"model.finetune": "frozen", "optim.epochs": 1}
  e2e = train.train_and_evaluate(tiny_demo_config(tiny_demo_dir, **frozen), str(root / "e2e"))
  feats = features.extract_features(tiny_demo_config(tiny_demo_dir, **frozen), str(root / "feats"),
                                    batch_size=64, progress=False)
  cached = train.train_and_evaluate(
      tiny_demo_config(tiny_demo_dir, **frozen, **{"data.features": str(feats)}),
      str(root / "cached"))
  return root, e2e, feats, cached


def test_head_from_cache_equals_end_to_end_frozen_training(frozen_runs):
  root, e2e, _, cached = frozen_runs
  a, _ = checkpoint.load_params(root / "e2e", "last")
  b, _ = checkpoint.load_params(root / "cached", "last")
  assert sorted(b) == sorted(k for k in a if k.startswith("head."))  # the head, nothing else
  # Float32 on CPU: measured max |difference| 0.0 (same features, same batches, same RNG).
  for key in b:
    np.testing.assert_allclose(np.asarray(b[key]), np.asarray(a[key]), rtol=0, atol=1e-6)
  assert cached["best"]["srcc"] == pytest.approx(e2e["best"]["srcc"], abs=1e-6)
  assert cached["best"]["plcc"] == pytest.approx(e2e["best"]["plcc"], abs=1e-6)


def test_cached_rows_are_the_backbone_feature_of_each_image(frozen_runs, tiny_demo_dir):
  from iqa_jax.data import pp
  from iqa_jax.models.model import create_model
  _, _, feats, _ = frozen_runs
  index = json.loads((feats / "index.json").read_text())
  rows = np.load(feats / "features.npy")
  assert rows.shape == (240, 32) and len(index["paths"]) == 240
  config = tiny_demo_config(tiny_demo_dir, **{"model.finetune": "frozen"})
  model, params, prep = create_model(config)
  load = pp.get_preprocess_fn(pp.run_pp(config.data, prep))
  picks = [0, 117, 239]
  images = np.stack([load({"path": index["paths"][i]})["image"] for i in picks])
  _, out = model.apply({"params": params}, images)
  np.testing.assert_allclose(rows[picks], np.asarray(out["feature"]), atol=2e-6)


def test_extraction_resumes_after_a_kill(frozen_runs, tiny_demo_dir, tmp_path, monkeypatch):
  _, _, feats, _ = frozen_runs
  config = tiny_demo_config(tiny_demo_dir, **{"model.finetune": "frozen"})
  real = features.pipeline.make_eval_loader

  def dying(*a, **kw):
    for i, batch in enumerate(real(*a, **kw)):
      if i == 3:
        raise KeyboardInterrupt("simulated kill")
      yield batch

  monkeypatch.setattr(features.pipeline, "make_eval_loader", dying)
  with pytest.raises(KeyboardInterrupt):
    features.extract_features(config, str(tmp_path / "f"), batch_size=32, flush_every=1,
                              progress=False)
  assert json.loads((tmp_path / "f" / "progress.json").read_text())["done"] == 96
  assert not (tmp_path / "f" / "index.json").exists()
  monkeypatch.setattr(features.pipeline, "make_eval_loader", real)
  features.extract_features(config, str(tmp_path / "f"), batch_size=32, progress=False)
  np.testing.assert_allclose(np.load(tmp_path / "f" / "features.npy"),
                             np.load(feats / "features.npy"), atol=2e-6)
  assert not (tmp_path / "f" / "progress.json").exists()


def test_wrong_cache_or_finetune_stops_with_the_field_named(frozen_runs, tiny_demo_dir, tmp_path):
  _, _, feats, _ = frozen_runs
  other_seed = tiny_demo_config(tiny_demo_dir, **{"model.finetune": "frozen", "seed": 19,
                                                  "data.features": str(feats)})
  with pytest.raises(ValueError, match="seed is 8 in the cache but 19 here"):
    train.train_and_evaluate(other_seed, str(tmp_path / "a"))
  lora = tiny_demo_config(tiny_demo_dir, **{"model.finetune": "lora", "data.features": str(feats)})
  with pytest.raises(ValueError, match="finetune=frozen"):
    train.train_and_evaluate(lora, str(tmp_path / "b"))
  # Extracting another backbone into a finished cache is refused, the cache left as it was.
  before = (feats / "features.npy").read_bytes()
  with pytest.raises(ValueError, match="already holds a feature cache"):
    features.extract_features(other_seed, str(feats), progress=False)
  assert (feats / "features.npy").read_bytes() == before


def test_matrix_hook_points_frozen_runs_at_a_cache(frozen_runs, tiny_demo_dir, tmp_path):
  _, _, feats, _ = frozen_runs
  frozen = tiny_demo_config(tiny_demo_dir, **{"model.finetune": "frozen"})
  hooked = features.cache_for_frozen_run(frozen, tmp_path / "features")
  assert hooked.data.features.startswith(str(tmp_path / "features" / "demo-"))
  np.testing.assert_allclose(np.load(f"{hooked.data.features}/features.npy"),
                             np.load(feats / "features.npy"), atol=2e-6)
  full = tiny_demo_config(tiny_demo_dir)
  assert features.cache_for_frozen_run(full, tmp_path / "features") is full
