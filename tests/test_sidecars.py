"""Score CSVs as contracts (issue 23): score writes only a new path or a CSV it wrote, every CSV
has a sidecar saying what made it, and --resume / merge refuse a mismatch, naming the field."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_score import _main, _rows, _score  # the score CSV helpers, one copy

from iqa_jax.inference import exported as export
from iqa_jax.inference import score_csv as score
from iqa_jax.inference.scorer import load_model, model_fingerprint


def _one_line(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  return err


@pytest.fixture(scope="module")
def models(trained_run, tmp_path_factory):
  """The tiny demo run's export and a second model: the same export with a head bias moved."""
  _, workdir, _ = trained_run
  root = tmp_path_factory.mktemp("models")
  a = export.export_run(str(workdir), str(root / "a"))
  b = root / "b"
  shutil.copytree(a, b)
  tensors = load_file(b / "model.safetensors")
  tensors["head.fc3.bias"] = tensors["head.fc3.bias"] + np.float32(0.1)
  save_file(tensors, b / "model.safetensors")
  return a, b


@pytest.fixture(scope="module")
def val_paths(trained_run):
  _, workdir, _ = trained_run
  return [r["path"] for r in _rows(workdir / "val_predictions.csv")][:7]


def test_sidecar_records_what_made_the_csv(models, val_paths, tmp_path):
  a, b = models
  out = tmp_path / "s.csv"
  assert _score(a, out, *val_paths) == 0
  meta = json.loads((tmp_path / "s.csv.meta.json").read_text())
  assert meta == {"written_by": "iqa_jax.score", "model": model_fingerprint(load_model(a)),
                  "model_source": str(a), "view": "crops", "crops": 3, "inputs": 7,
                  "inputs_sha256": score._inputs_digest(val_paths), "shard": 0, "of": 1,
                  "about": meta["about"]}
  # `about`, the model in words (the gallery shows it): an export of the shared demo run.
  assert meta["about"] == {"path": str(Path(a).resolve()), "kind": "exported",
                           "checkpoint": "best", "run": meta["about"]["run"], "dataset": "demo",
                           "backbone": "siglip", "head": "gated", "finetune": "full"}, meta["about"]
  assert model_fingerprint(load_model(b)) != meta["model"]  # one bias moved by 0.1


@pytest.mark.parametrize("what", ["image", "keep.txt", "dmos.csv", "header_only", "resume_dmos",
                                  "empty"])
def test_out_that_score_did_not_write_is_refused(what, models, val_paths, tmp_path, capsys):
  a, _ = models
  photos = tmp_path / "photos"
  photos.mkdir()
  shutil.copy(val_paths[0], photos / "a.png")
  target = {"image": photos / "a.png", "keep.txt": tmp_path / "keep.txt"}.get(
      what, tmp_path / "dmos.csv")
  if what == "keep.txt":
    target.write_text("a.png\n")
  elif what in ("dmos.csv", "resume_dmos"):
    target.write_text("image,dmos\nI01.png,0.5\n")
  elif what == "header_only":  # our header, but no sidecar: not provably ours
    target.write_text("path,score,mos,error\nx.png,0.5,3.0,\n")
  elif what == "empty":
    target.write_text("")
  before = target.read_bytes()
  extra = ("--resume",) if what == "resume_dmos" else ()
  assert _score(a, target, photos, *extra) == 2
  err = _one_line(capsys)
  assert str(target) in err and "pass another --out" in err, err
  assert "drop --resume" not in err
  assert target.read_bytes() == before
  assert not (tmp_path / (target.name + ".meta.json")).exists()
  assert sorted(p.name for p in photos.iterdir()) == ["a.png"]


def test_an_earlier_score_csv_is_replaced(models, val_paths, tmp_path):
  a, b = models
  out = tmp_path / "s.csv"
  assert _score(a, out, *val_paths[:3]) == 0
  assert _score(b, out, *val_paths[3:5]) == 0  # ours, without --resume: replaced
  assert [r["path"] for r in _rows(out)] == val_paths[3:5]
  assert json.loads((tmp_path / "s.csv.meta.json").read_text())["model"] == model_fingerprint(
      load_model(b))


@pytest.mark.parametrize("flags, field", [
    (("--model-b",), "model"),
    (("--view", "resize"), "view"),
    (("--crops", 5), "crops"),
    (("--shard", "1/3"), "shard"),
    (("--shard", "0/2"), "of"),
    (("--shard", "0/3", "--fewer-inputs"), "inputs"),
])
def test_resume_refuses_another_command_naming_the_field(flags, field, models, val_paths,
                                                         tmp_path, capsys):
  a, b = models
  out = tmp_path / "s.csv"
  args = ("--shard", "0/3") if "--shard" in flags else ()
  assert _score(a, out, *args, *val_paths) == 0
  before = out.read_bytes(), (tmp_path / "s.csv.meta.json").read_bytes()
  capsys.readouterr()
  model = b if "--model-b" in flags else a
  inputs = val_paths[:-1] if "--fewer-inputs" in flags else val_paths
  flags = [f for f in flags if f not in ("--model-b", "--fewer-inputs")]
  assert _score(model, out, "--resume", *flags, *inputs) == 2
  err = _one_line(capsys)
  assert f"field '{field}'" in err and "s.csv.meta.json" in err, err
  assert (out.read_bytes(), (tmp_path / "s.csv.meta.json").read_bytes()) == before


def test_merge_refuses_parts_of_two_models_or_into_a_part(models, val_paths, tmp_path, capsys):
  a, b = models
  parts = [tmp_path / f"part{k}.csv" for k in range(2)]
  assert _score(a, parts[0], "--shard", "0/2", *val_paths) == 0
  assert _score(b, parts[1], "--shard", "1/2", *val_paths) == 0
  capsys.readouterr()
  assert _main("merge", tmp_path / "all.csv", *parts) == 2
  err = _one_line(capsys)
  assert "field 'model'" in err and "part1.csv.meta.json" in err, err
  assert not (tmp_path / "all.csv").exists()
  assert _score(a, parts[1], "--shard", "1/2", *val_paths) == 0
  before = parts[0].read_bytes()
  capsys.readouterr()
  assert _main("merge", parts[0], *parts) == 2  # into one of its own parts
  err = _one_line(capsys)
  assert "is one of the parts" in err and str(parts[0]) in err, err
  assert parts[0].read_bytes() == before
  keep = tmp_path / "keep.txt"
  keep.write_text("a.png\n")
  assert _main("merge", keep, *parts) == 2 and keep.read_text() == "a.png\n"
  assert str(keep) in _one_line(capsys)
  assert _main("merge", tmp_path / "all.csv", *parts) == 0
  meta = json.loads((tmp_path / "all.csv.meta.json").read_text())
  assert (meta["shard"], meta["of"], meta["inputs"]) == (0, 1, 7)
  assert meta["model"] == model_fingerprint(load_model(a))


def test_older_shard_sidecars_are_read_and_damaged_ones_refused(models, val_paths, tmp_path,
                                                                capsys):
  a, _ = models
  parts = [tmp_path / f"part{k}.csv" for k in range(2)]
  for k, part in enumerate(parts):
    assert _score(a, part, "--shard", f"{k}/2", *val_paths) == 0
    meta = json.loads((tmp_path / f"part{k}.csv.meta.json").read_text())
    (tmp_path / f"part{k}.csv.meta.json").unlink()  # as a shard written before this change
    (tmp_path / f"part{k}.csv.shard.json").write_text(json.dumps(
        {key: meta[key] for key in ("shard", "of", "inputs", "inputs_sha256")}))
  assert _main("merge", tmp_path / "all.csv", *parts) == 0
  assert [r["path"] for r in _rows(tmp_path / "all.csv")] == val_paths
  capsys.readouterr()
  # An older shard records no model: --resume cannot prove it continues the same one.
  assert _score(a, parts[0], "--shard", "0/2", "--resume", *val_paths) == 2
  assert "field 'model' is '(not recorded)'" in _one_line(capsys)
  side = tmp_path / "part1.csv.shard.json"
  meta = json.loads(side.read_text())
  del meta["inputs"]
  side.write_text(json.dumps(meta))
  assert _main("merge", tmp_path / "m.csv", *parts) == 2
  err = _one_line(capsys)
  assert str(side) in err and "no 'inputs' field" in err, err
  side.write_text("[1, 2]")
  assert _main("merge", tmp_path / "m.csv", *parts) == 2
  assert "holds a JSON list" in _one_line(capsys)
  # A part scored anew (its older sidecar goes) beside an older part: 'model' differs.
  side.write_text(json.dumps({**meta, "inputs": 7}))
  assert _score(a, parts[1], "--shard", "1/2", *val_paths) == 0
  assert not side.exists() and (tmp_path / "part1.csv.meta.json").exists()
  capsys.readouterr()
  assert _main("merge", tmp_path / "m.csv", *parts) == 2
  err = _one_line(capsys)
  assert "part1.csv.meta.json: field 'model'" in err and "is '(not recorded)'" in err, err


def test_empty_shard_and_which_for_an_export_are_refused(models, val_paths, tmp_path, capsys):
  a, _ = models
  out = tmp_path / "s.csv"
  assert _score(a, out, "--shard=", *val_paths) == 2
  assert "--shard ''" in _one_line(capsys) and not out.exists()
  assert _score(a, out, "--which", "last", *val_paths) == 2
  err = _one_line(capsys)
  assert "--which last" in err and "exported model" in err and not out.exists()


def test_nan_scores_and_unreadable_images_are_error_rows(models, val_paths, tmp_path, capsys):
  a, _ = models
  broken = tmp_path / "nan_model"
  shutil.copytree(a, broken)
  tensors = load_file(broken / "model.safetensors")
  tensors["head.fc3.bias"] = np.full_like(tensors["head.fc3.bias"], np.nan)
  save_file(tensors, broken / "model.safetensors")
  out = tmp_path / "s.csv"
  assert _score(broken, out, *val_paths[:2]) == 1
  rows = _rows(out)
  assert [r["score"] for r in rows] == ["", ""]
  assert all("non-finite score (nan)" in r["error"] for r in rows)
  assert "scored 0, failed 2" in capsys.readouterr().out
  corrupt = tmp_path / "corrupt.jpg"
  corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  assert _score(a, out, corrupt) == 1
  (row,) = _rows(out)
  assert str(corrupt) in row["error"] and "on_error" not in row["error"], row
