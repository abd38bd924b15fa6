"""Grad-CAM against a model whose map is known in closed form, on every backbone family; t-SNE
silhouettes against the formula, worked by hand, on known clusters."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_demo_config

from iqa_jax import explain as explain_cli  # the command
from iqa_jax.analysis import explain


class LinearTokens(nn.Module):
  """tokens A = patches @ W (B, T, D), or a (B, H, W, D) map; feature = mean of A;
  score = feature @ v. Grad-CAM: d score / d A_tc = v_c / T for every token, so the map is
  ReLU(A_t . v) / T exactly."""
  spatial: bool = False

  @nn.compact
  def __call__(self, images, train=False):
    b, h, w, _ = images.shape
    patches = images.reshape(b, h // 4, 4, w // 4, 4, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, h // 4, w // 4, 48)
    a = nn.Dense(8, name="proj")(patches if self.spatial else patches.reshape(b, -1, 48))
    feature = a.mean(axis=(1, 2) if self.spatial else 1)
    score = nn.Dense(1, use_bias=False, name="v")(feature)[:, 0]
    return score, {"encoded": a, "feature": feature}


@pytest.mark.parametrize("spatial", [False, True])
def test_gradcam_equals_the_closed_form(spatial):
  model = LinearTokens(spatial=spatial)
  x = jnp.asarray(np.random.RandomState(0).randn(3, 16, 24, 3), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  maps, _ = explain.gradcam(model, params, x)
  _, out = model.apply({"params": params}, x)
  a = np.asarray(out["encoded"]).reshape(3, 4, 6, 8)
  v = np.asarray(params["v"]["kernel"])[:, 0]
  want = np.maximum(a @ v, 0) / 24  # tokens go back on the 4 x 6 patch grid, row-major
  np.testing.assert_allclose(np.stack(maps), want, rtol=1e-5, atol=1e-7)
  assert (want > 0).any() and (want == 0).any()  # both ReLU branches are exercised


def test_gradcam_tokens_on_a_square_grid_drop_leading_tokens():
  """A class token before 4 x 4 patch tokens: the map covers the patches only, in order."""
  class WithClassToken(LinearTokens):
    @nn.compact
    def __call__(self, images, train=False):
      b = images.shape[0]
      patches = images.reshape(b, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, 16, 48)
      cls = jnp.ones((b, 1, 48), images.dtype)
      a = nn.Dense(8, name="proj")(jnp.concatenate([cls, patches], axis=1))
      feature = a.mean(axis=1)
      return nn.Dense(1, use_bias=False, name="v")(feature)[:, 0], {"encoded": a,
                                                                   "feature": feature}
  model = WithClassToken()
  x = jnp.asarray(np.random.RandomState(1).randn(2, 16, 16, 3), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  maps, out = explain.gradcam(model, params, x)
  v = np.asarray(params["v"]["kernel"])[:, 0]
  want = np.maximum(np.asarray(out["encoded"])[:, 1:] @ v, 0).reshape(2, 4, 4) / 17
  np.testing.assert_allclose(maps, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["siglip", "resnet", "siglip2_naflex"])
def test_gradcam_runs_on_every_family_on_its_own_grid(family, tmp_path):
  """The score's map on each family's grid: SigLIP's 4x4 patches (8 px on 32 px), ResNet's
  last stage (64 px / 32 = 2x2), and NaFlex's own rows x cols per packed image (4x5, 3x6)."""
  from iqa_jax.models.model import create_model
  c = tiny_demo_config(tmp_path)
  rs = np.random.RandomState(0)
  x = rs.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  grids = [(4, 4), (4, 4)]
  if family == "resnet":
    c.model.update(backbone="resnet", variant="18")
    c.model.arch = dict(embedding_size=8, hidden_sizes=(8, 16, 16, 16), depths=(1, 1, 1, 1))
    c.data.image_size = 64
    x, grids = rs.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32), [(2, 2), (2, 2)]
  elif family == "siglip2_naflex":
    c.model.update(backbone="siglip2_naflex", variant="b/16")
    c.model.arch = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, patch_size=4, num_patches=16)
    x, grids = np.zeros((2, 21, 48), np.float32), [(4, 5), (3, 6)]
    for i, (gh, gw) in enumerate(grids):
      x[i, 0, :2] = (gh, gw)
      x[i, 1:1 + gh * gw] = rs.randn(gh * gw, 48)
  model, params, _ = create_model(c)
  for target in (None, explain.band_target("top10")):
    maps, _ = explain.gradcam(model, params, jnp.asarray(x), target)
    assert [np.shape(m) for m in maps] == grids
    assert all(np.isfinite(m).all() and (m >= 0).all() and m.max() > 0 for m in maps)


def test_band_target_sums_magnitudes_in_the_band():
  f = np.random.RandomState(0).randn(2, 100).astype(np.float32)
  out = {"feature": jnp.asarray(f)}
  mag = np.abs(f)
  top = np.where(mag >= np.percentile(mag, 90, axis=-1, keepdims=True), mag, 0).sum(-1)
  np.testing.assert_allclose(explain.band_target("top10")(None, out), top, rtol=1e-6)
  lo, hi = np.percentile(mag, 70, axis=-1, keepdims=True), np.percentile(mag, 90, axis=-1,
                                                                        keepdims=True)
  band = np.where((mag >= lo) & (mag <= hi), mag, 0).sum(-1)
  np.testing.assert_allclose(explain.band_target("10-30")(None, out), band, rtol=1e-6)
  with pytest.raises(ValueError, match="--groups"):
    explain.band_target("30-10")


def _silhouette(points, labels):
  """Rousseeuw's silhouette written out: s = (b - a) / max(a, b) per point, a its mean distance
  to the rest of its cluster, b to the nearest other cluster; the mean over points."""
  points, labels = np.asarray(points, np.float64).reshape(len(labels), -1), np.asarray(labels)
  d = np.linalg.norm(points[:, None] - points[None], axis=-1)
  s = []
  for i, c in enumerate(labels):
    own = (labels == c) & (np.arange(len(labels)) != i)
    a = d[i, own].mean()
    b = min(d[i, labels == o].mean() for o in set(labels.tolist()) - {c})
    s.append((b - a) / max(a, b))
  return float(np.mean(s))


def test_tsne_silhouette_on_known_clusters_is_the_silhouette_of_its_embedding():
  # Worked by hand: 0, 1 | 4, 6 on a line -> s = 4/5, 3/4, 1.5/3.5, 3.5/5.5; mean 0.653734.
  assert _silhouette([0, 1, 4, 6], [0, 0, 1, 1]) == pytest.approx(0.653734, abs=1e-6)
  rs = np.random.RandomState(0)
  labels = np.repeat(np.arange(5), 40)
  centers = rs.randn(5, 20) * 10
  x = centers[labels] + rs.randn(200, 20)
  emb, sil = explain.tsne_panel(x, labels)
  assert emb.shape == (200, 2)
  # Measured 1.5e-8: scikit-learn takes distances of the float32 embedding in float32.
  assert sil == pytest.approx(_silhouette(emb, labels), abs=5e-8)
  assert sil > 0.8  # five far-apart blobs stay apart in 2-D
  _, mixed = explain.tsne_panel(x, rs.permutation(labels))
  assert abs(mixed) < 0.1  # labels unrelated to the clusters: no structure
  assert explain.quality_bucket([0, 0.19, 0.2, 0.5, 0.99, 1.0]).tolist() == [0, 0, 1, 2, 4, 4]


def test_epoch_checkpoints_hold_each_epochs_params(trained_run):
  """Epoch 2's params are ckpt/last's; epoch 1's give back the validation SRCC / PLCC the log
  recorded after epoch 1 (so they are the params of that moment, not a copy of the last)."""
  from iqa_jax import metrics
  from iqa_jax.data import datasets, pipeline
  from iqa_jax.inference.loaded import load_run
  from iqa_jax.models.model import make_eval_step
  from iqa_jax.runs import checkpoint
  from iqa_jax.training import loop as train
  config, workdir, _ = trained_run
  assert checkpoint.epoch_numbers(workdir) == [1, 2]
  last, _ = checkpoint.load_params(workdir, "last")
  second, meta = checkpoint.load_params(workdir, checkpoint.EPOCHS, 2)
  assert meta["epoch"] == 1 and sorted(second) == sorted(last)
  for k in last:
    np.testing.assert_array_equal(second[k], last[k])
  first, _ = checkpoint.load_params(workdir, checkpoint.EPOCHS, 1)
  assert any(not np.array_equal(first[k], last[k]) for k in last)
  loaded = load_run(str(workdir), "last")
  params = checkpoint.unflatten_into(loaded.params, first)
  val = datasets.load_splits(workdir)["val"]
  loader = pipeline.make_eval_loader(val, loaded.pp_str, config.eval_batch_size)
  scores = train.predict(jax.jit(make_eval_step(loaded.model)), params, loader)
  got = metrics.compute_metrics(scores, [r.mos for r in val])
  history = checkpoint.read_history(workdir)
  logged = history[0]["val"]
  # Training scored the 60 images in one batch with cpu_dots=auto's kernels; this is XLA's
  # default kernels in batches of eval_batch_size, another program: measured 1.2e-6 apart in
  # PLCC (oneDNN vs default kernels). The two epochs' PLCC are far further apart than the bound.
  assert got["srcc"] == pytest.approx(logged["srcc"], abs=1e-6)
  assert got["plcc"] == pytest.approx(logged["plcc"], abs=5e-6)
  assert abs(history[1]["val"]["plcc"] - logged["plcc"]) > 1e-3


def test_gradcam_over_training_cells_are_each_epochs_gradcam(trained_run, tmp_path):
  """Cell (epoch k, image i) = gradcam() of a freshly built model with epoch k's params on
  image i, and its title's score that model's score; the CSV holds the same scores."""
  import csv

  from iqa_jax.data import pp
  from iqa_jax.models.model import create_model
  from iqa_jax.runs import checkpoint
  config, workdir, _ = trained_run
  # One tile with white noise and JPEG at their strongest level.
  paths = [f"{config.data.dir}/images/I01_0{d}_05_c01.png" for d in (2, 3)]
  png, rows = explain.over_training_figure(str(workdir), paths, str(tmp_path), epochs=[2, 1])
  assert png.stat().st_size > 0 and [r["epoch"] for r in rows] == [1, 2]
  model, fresh, prep = create_model(config)
  load = pp.get_preprocess_fn(pp.run_pp(config.data, prep))
  for row in rows:
    params = checkpoint.unflatten_into(
        fresh, checkpoint.load_params(workdir, checkpoint.EPOCHS, row["epoch"])[0])
    for i, path in enumerate(paths):
      x = jnp.asarray(load({"path": path})["image"][None])
      want, out = explain.gradcam(model, params, x)
      np.testing.assert_allclose(row["maps"][i], want[0], rtol=1e-5, atol=1e-7)
      score, _ = model.apply({"params": params}, x)
      assert row["scores"][i] == pytest.approx(float(score[0]), abs=1e-6)
  assert not np.allclose(rows[0]["maps"][0], rows[1]["maps"][0])  # training moved the map
  with open(tmp_path / "gradcam_over_training.csv") as f:
    table = list(csv.DictReader(f))
  assert [(int(r["epoch"]), r["path"]) for r in table] == [(e, p) for e in (1, 2) for p in paths]
  np.testing.assert_allclose([float(r["score"]) for r in table],
                             [s for r in rows for s in r["scores"]], atol=1e-6)


def test_over_training_without_epoch_checkpoints_names_the_field(tiny_demo_dir, tmp_path,
                                                                 capsys):
  """Checked before anything loads: a folder without ckpt/epochs (here an empty one)."""
  image = str(sorted((tiny_demo_dir / "images").glob("*.png"))[0])
  assert explain_cli.main(["gradcam", "--workdir", str(tmp_path), "--out", str(tmp_path / "x"),
                       "--over-training", image]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "--config.keep_epoch_checkpoints=true" in err


def test_over_training_refuses_an_epoch_the_run_did_not_keep(trained_run, capsys):
  config, workdir, _ = trained_run
  image = f"{config.data.dir}/images/I01_01_05_c01.png"
  assert explain_cli.main(["gradcam", "--workdir", str(workdir), "--out", str(workdir / "x"),
                       "--over-training", "--epochs", "1,3", image]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "--epochs 3:" in err and "keeps epochs 1,2" in err


def test_gradcam_and_tsne_refuse_user_mistakes_in_one_line(trained_run, tmp_path, capsys):
  """Issue 23 items 9, 11: an export folder as --workdir and an --out that is a file were
  tracebacks; --per-split 0 failed inside scikit-learn."""
  from iqa_jax.inference import exported as export
  config, workdir, _ = trained_run
  image = f"{config.data.dir}/images/I01_01_05_c01.png"
  model = export.export_run(str(workdir), str(tmp_path / "model"))
  cases = [
      (["gradcam", "--workdir", str(model), "--out", str(tmp_path / "g"), image],
       "is an exported model, not a run folder"),
      (["gradcam", "--workdir", str(workdir), "--out", image, image], f"--out {image} is a file"),
      (["tsne", "--workdir", str(workdir), "--out", str(tmp_path / "t"), "--per-split", "0"],
       "--per-split 0: t-SNE and the silhouette score need at least 10")]
  for argv, message in cases:
    assert explain_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
  assert not (tmp_path / "g").exists() and not (tmp_path / "t").exists()
