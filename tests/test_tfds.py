"""TFDS builds of the seven official-layout fixtures: records, splits and batches equal to the file
source; a two-step training run that reads them where `import tensorflow` fails; refusals."""
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from conftest import missing, require

require("tensorflow_datasets", "pip install -e '.[tfds]'")
if importlib.util.find_spec("tensorflow") is None:  # building needs it (the `tfds` extra)
  missing("TensorFlow is not installed: pip install -e '.[tfds]'")

from test_datasets import (  # noqa: E402  (the official-layout fixture builders, one copy)
  make_agiqa1k,
  make_agiqa3k,
  make_clive,
  make_flive,
  make_kadid,
  make_koniq,
  make_spaq,
)

from iqa_jax.data import datasets, pipeline  # noqa: E402
from iqa_jax.data.tfds import build as tfds_build  # noqa: E402
from iqa_jax.data.tfds import source as tfds_source  # noqa: E402
from iqa_jax.runs import checkpoint  # noqa: E402

FIXTURES = {"clive": make_clive, "koniq10k": make_koniq, "kadid10k": make_kadid,
            "flive": make_flive, "spaq": make_spaq, "agiqa3k": make_agiqa3k,
            "agiqa1k": make_agiqa1k}
PP = "decode|resize(4)"


def _data_config(name, tfds_dir="", source="tfds", data_dir="", cache="", **options):
  from iqa_jax.defaults import base_config
  d = base_config().data
  d.update(name=name, source=source, tfds_dir=str(tfds_dir), dir=str(data_dir), cache=cache)
  d.options.update(options)
  return d


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """{name: release folder}, each built once into the module's TFDS data dir."""
  root = tmp_path_factory.mktemp("tfds")
  releases = {}
  for name, make in FIXTURES.items():
    releases[name] = root / "releases" / name
    releases[name].mkdir(parents=True)
    make(releases[name])
    tfds_build.build(name, str(releases[name]), str(root / "data"))
  return root / "data", releases


@pytest.mark.parametrize("name", list(FIXTURES))
def test_records_splits_and_batches_equal_the_files(built, name):
  tfds_dir, releases = built
  from_files = datasets.load_records(_data_config(name, source="files", data_dir=releases[name]))
  from_tfds = pipeline.load_records(_data_config(name, tfds_dir))
  folder = tfds_source.build_dir(_data_config(name, tfds_dir))
  assert Path(folder) == tfds_dir / name / (tfds_build.find_config(name, {}).name
                                            if tfds_build.BUILDERS[name].BUILDER_CONFIGS
                                            else "") / "1.0.0"
  # Same order, exactly the same MOS (float64, no float32 rounding) and metadata.
  assert len(from_tfds) == len(from_files) > 0
  assert [r.path for r in from_tfds] == [os.path.relpath(r.path, releases[name])
                                         for r in from_files]
  assert [(r.mos, r.raw_mos, r.extras) for r in from_tfds] == \
      [(r.mos, r.raw_mos, r.extras) for r in from_files]
  kept, skipped = pipeline.check_records(from_tfds, tfds=folder)
  assert kept == from_tfds and not skipped
  for split in ("random", "content") if "ref_img" in from_files[0].extras or \
      "prompt" in from_files[0].extras else ("random",):
    s_files = datasets.make_splits(from_files, 19, split=split, val_fraction=0.4)
    s_tfds = datasets.make_splits(from_tfds, 19, split=split, val_fraction=0.4)
    assert {k: [r.mos for r in v] for k, v in s_tfds.items()} == \
        {k: [r.mos for r in v] for k, v in s_files.items()}
    assert [r.path for r in s_tfds["val"]] == [os.path.relpath(r.path, releases[name])
                                               for r in s_files["val"]]
  # Batches array for array: the file bytes decode to the same pixels as the file itself; also
  # one process's shard of two.
  for kw in (dict(seed=8, epoch=1, drop_remainder=False), dict(seed=25, epoch=0, shard_index=1,
                                                                 shard_count=2)):
    for a, b in zip(pipeline.make_train_loader(from_files, PP, 1, **kw),
                    pipeline.make_train_loader(from_tfds, PP, 1, tfds=folder, **kw), strict=True):
      assert a.keys() == b.keys()
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
  a, = pipeline.make_eval_loader(from_files, PP, 16)
  b, = pipeline.make_eval_loader(from_tfds, PP, 16, tfds=folder)
  assert all(np.array_equal(a[k], b[k]) for k in a) and a["image"][0].any()
  # Worker processes get the source pickled: it reopens the build there and reads the same.
  source = tfds_source.TfdsSource(from_tfds, folder)
  assert source[0]["encoded"] == pickle.loads(pickle.dumps(source))[0]["encoded"] == \
      Path(from_files[0].path).read_bytes()


def test_build_metadata_and_rebuild_reuses(built, tmp_path, capsys):
  tfds_dir, releases = built
  folder = tfds_dir / "koniq10k" / "1024x768" / "1.0.0"
  info = json.loads((folder / "dataset_info.json").read_text())
  assert info["fileFormat"] == "array_record" and info["disableShuffling"] is True
  meta = json.loads((folder / "metadata.json").read_text())
  assert meta["options"] == {"resolution": "1024x768"} and meta["skipped"] == []
  assert list(meta["release_files"]) == ["koniq10k_scores_and_distributions.csv"]
  assert tfds_build.main(["--dataset", "koniq10k", "--manual_dir", str(releases["koniq10k"]),
                          "--data_dir", str(tfds_dir)]) == 0
  assert "koniq10k: 3 images (0 skipped)" in capsys.readouterr().out
  # Still the one version folder: the existing build was checked and reused, not rewritten.
  assert [p.name for p in folder.parent.iterdir()] == ["1.0.0"]
  other = tmp_path / "koniq_other"
  shutil.copytree(releases["koniq10k"], other)
  table = other / "koniq10k_scores_and_distributions.csv"
  table.write_text(table.read_text().replace("3.479167", "3.5"))
  assert tfds_build.main(["--dataset", "koniq10k", "--manual_dir", str(other),
                          "--data_dir", str(tfds_dir)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "was made from a release whose koniq10k_scores_and_distributions.csv" \
      in err[0] and f"Delete {folder}" in err[0]


def test_build_names_bad_rows_or_skips_them(tmp_path, capsys):
  rows = [["1.jpg", 0, 0, 0, 0, 0, 0, 3.0, 0.5, 0], ["2.jpg", 0, 0, 0, 0, 0, 0, 4.0, 0.5, 0],
          ["3.jpg", 0, 0, 0, 0, 0, 0, 2.0, 0.5, 0]]
  make_koniq(tmp_path / "rel", rows)
  (tmp_path / "rel/1024x768/2.jpg").write_bytes(b"\xff\xd8\xff\xe0 corrupt")
  argv = ["--dataset", "koniq10k", "--manual_dir", str(tmp_path / "rel"), "--data_dir",
          str(tmp_path / "data")]
  assert tfds_build.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "2.jpg (koniq10k_scores_and_distributions.csv:3): cannot decode" \
      in err[0]
  assert not (tmp_path / "data/koniq10k/1024x768/1.0.0").exists()
  assert tfds_build.main(argv + ["--on_error", "skip"]) == 0
  assert "koniq10k: 2 images (1 skipped)" in capsys.readouterr().out
  recs = tfds_source.load_records(_data_config("koniq10k", tmp_path / "data"))
  assert [r.path for r in recs] == ["1024x768/1.jpg", "1024x768/3.jpg"]
  meta = json.loads((tmp_path / "data/koniq10k/1024x768/1.0.0/metadata.json").read_text())
  assert meta["skipped"][0][0] == "1024x768/2.jpg"
  assert tfds_build.main(["--dataset", "koniq10k", "--manual_dir", str(tmp_path / "nope")]) == 2
  assert "--manual_dir" in capsys.readouterr().err


def test_refuses_other_version_variant_release_or_dataset(built, tmp_path):
  tfds_dir, releases = built
  with pytest.raises(ValueError, match=r"built for resolution=1024x768, but the config asks for "
                     r"resolution=512x384.*--option resolution=512x384"):
    tfds_source.build_dir(_data_config("koniq10k", tfds_dir, resolution="512x384"))
  old = tmp_path / "data/kadid10k/0.9.0"
  shutil.copytree(tfds_dir / "kadid10k/1.0.0", old)
  with pytest.raises(ValueError, match=r"holds version 0.9.0 but this iqa_jax reads version "
                     r"1.0.0.*Rebuild: python -m iqa_jax.data.tfds_build --dataset kadid10k"):
    tfds_source.build_dir(_data_config("kadid10k", tmp_path / "data"))
  with pytest.raises(ValueError, match="no TFDS build in .*flive/1.0.0"):
    tfds_source.build_dir(_data_config("flive", tmp_path / "data"))
  # data.dir next to a build: the build must come from that release.
  release = tmp_path / "koniq_v2"
  shutil.copytree(releases["koniq10k"], release)
  table = release / "koniq10k_scores_and_distributions.csv"
  assert tfds_source.load_records(_data_config("koniq10k", tfds_dir, data_dir=release))
  table.write_text(table.read_text().replace("3.828571", "3.9"))
  with pytest.raises(ValueError, match=r"made from a release whose koniq10k_scores_and_"
                     r"distributions.csv has sha256 \w{12}, but .*koniq_v2.* has sha256 \w{12}"):
    tfds_source.load_records(_data_config("koniq10k", tfds_dir, data_dir=release))
  with pytest.raises(ValueError, match="No TFDS builder for dataset 'csv'"):
    tfds_source.build_dir(_data_config("csv", tfds_dir))
  with pytest.raises(ValueError, match=r"data.source must be one of \('files', 'tfds'\)"):
    tfds_source.build_dir(_data_config("clive", tfds_dir, source="tfrecord"))
  with pytest.raises(ValueError, match="data.cache and --config.data.source=tfds do not combine"):
    tfds_source.build_dir(_data_config("clive", tfds_dir, cache="/c"))
  with pytest.raises(ValueError, match="agiqa3k: no TFDS variant for target=aesthetics"):
    tfds_build.find_config("agiqa3k", {"target": "aesthetics"})


# Run in a fresh interpreter where tensorflow cannot be found (as if not installed): train two
# steps on KADID from the files, then from the TFDS build through the run matrix (experiments),
# with a cross evaluation on KonIQ's build (evaluate); print the results.
_NO_TF_RUN = r"""
import importlib.util, json, sys
from importlib.machinery import PathFinder
class HideTensorflow:
  def find_spec(self, name, path=None, target=None):
    return None if name.partition(".")[0] == "tensorflow" else PathFinder.find_spec(name, path,
                                                                                     target)
sys.meta_path = [HideTensorflow() if f is PathFinder else f for f in sys.meta_path]
assert importlib.util.find_spec("tensorflow") is None
try:
  import tensorflow
  raise SystemExit("tensorflow imported")
except ModuleNotFoundError:
  pass
from conftest import tiny_demo_config
from iqa_jax import experiments
from iqa_jax.training import loop as train
release, tfds_dir, out = sys.argv[1:]
def config(source):
  c = tiny_demo_config(release, **{"optim.epochs": 1, "optim.batch_size": 4,
                                   "data.val_fraction": 1 / 3, "eval_batch_size": 4})
  c.data.update(name="kadid10k", source=source, tfds_dir=tfds_dir)
  c.compilation_cache = f"{out}/jax_cache"  # the second run loads the first one's programs
  return c
runs = {"files": train.train_and_evaluate(config("files"), f"{out}/files")}
tfds = config("tfds")
tfds.data.dir = ""  # the release folder is not needed to train from the build
runs["matrix"] = experiments.run_matrix(tfds, ["kadid10k"], [8], ["gated"], f"{out}/matrix",
                                        cross=["kadid10k:koniq10k"], plots=False,
                                        compile_cache=None)
runs["tensorflow_loaded"] = sorted(m for m in sys.modules if m.partition(".")[0] == "tensorflow")
print("RESULT" + json.dumps(runs))
"""


def test_training_from_tfds_without_tensorflow(built, tmp_path):
  tfds_dir, releases = built
  tests = Path(__file__).resolve().parent
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.run([sys.executable, "-c", _NO_TF_RUN, str(releases["kadid10k"]),
                         str(tfds_dir), str(tmp_path)], env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  runs = json.loads(proc.stdout.split("RESULT", 1)[1])
  assert runs["tensorflow_loaded"] == []
  run, cross = runs["matrix"]
  run_dir = tmp_path / "matrix" / run["workdir"]
  files_history = checkpoint.read_history(tmp_path / "files")
  tfds_history = checkpoint.read_history(run_dir)
  assert run["status"] == "done" and run["n_train"] == 8 and run["n_val"] == 4
  assert tfds_history[0]["step"] == 2
  # The same batches in the same order: the two runs agree to the last bit.
  assert tfds_history[0]["train_loss"] == files_history[0]["train_loss"]
  # Both as written to disk (NaN metrics are stored as null).
  files_results = json.loads((tmp_path / "files" / "results.json").read_text())
  assert run["best"] == files_results["best"]
  splits = json.loads((run_dir / "splits.json").read_text())
  assert splits["val"][0]["path"].startswith("images/I0")
  assert [r["extras"]["ref_img"] for r in splits["val"]] == \
      [r["extras"]["ref_img"] for r in json.loads((tmp_path / "files/splits.json").read_text())
       ["val"]]
  # Cross evaluation (iqa_jax.evaluate) read KonIQ's build: all its records, in order.
  koniq = datasets.load_records(_data_config("koniq10k", source="files",
                                             data_dir=releases["koniq10k"]))
  assert cross["kind"] == "cross" and cross["test"] == "koniq10k" and cross["n"] == len(koniq)
  with open(run_dir / "cross/koniq10k/eval_koniq10k.csv") as f:
    assert [row.split(",")[0] for row in f.read().splitlines()[1:]] == \
        [os.path.relpath(r.path, releases["koniq10k"]) for r in koniq]


def test_evaluate_reads_the_run_source(built, tmp_path):
  """evaluate's data config follows the run (trained from TFDS -> evaluates from TFDS)."""
  from iqa_jax.inference.evaluate import data_config_for
  tfds_dir, releases = built
  run = ml_collections.ConfigDict({"data": {"image_size": 32, "source": "tfds",
                                            "tfds_dir": str(tfds_dir)}})
  d = data_config_for(run, "agiqa1k", "")
  assert (d.source, d.tfds_dir) == ("tfds", str(tfds_dir))
  files = datasets.load_records(_data_config("agiqa1k", source="files",
                                             data_dir=releases["agiqa1k"]))
  assert [r.mos for r in pipeline.load_records(d)] == [r.mos for r in files]
  assert data_config_for(run, "clive", "/x", source="files").source == "files"


def test_koniq_official_mos_divisor_applies_to_a_build(built):
  """A build stores App. B's MOS / 5; data.options.koniq_mos_divisor=100 (the official code)
  rescales its raw MOS as the file source does, instead of silently keeping / 5."""
  tfds_dir, releases = built
  from_files = datasets.load_records(_data_config("koniq10k", source="files",
                                                  data_dir=releases["koniq10k"],
                                                  koniq_mos_divisor=100.0))
  from_tfds = pipeline.load_records(_data_config("koniq10k", tfds_dir, koniq_mos_divisor=100.0))
  assert [r.mos for r in from_tfds] == [r.mos for r in from_files]
  assert from_tfds[0].mos == pytest.approx(3.828571 / 100)
