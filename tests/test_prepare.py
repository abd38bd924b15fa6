"""The prepare cache: same pixels as decoding the files, and the loaders read it transparently."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iqa_jax.data import pipeline, pp, prepare
from iqa_jax.data.records import Record

PP = "decode|resize(16)|normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))"


@pytest.fixture(scope="module")
def kadid(tmp_path_factory):
  """A KADID-layout folder with 8 JPEGs of different sizes, and its cache built by the CLI."""
  root = tmp_path_factory.mktemp("kadid")
  (root / "images").mkdir()
  rows = []
  for i in range(8):
    name = f"I{i // 2 + 1:02d}_01_{i % 2 + 1:02d}.jpg"
    x = np.random.default_rng(i).integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
    Image.fromarray(x).save(root / "images" / name)
    rows.append(f"{name},I{i // 2 + 1:02d}.png,{1 + i / 2},0.1")
  (root / "dmos.csv").write_text("dist_img,ref_img,dmos,var\n" + "\n".join(rows) + "\n")
  prepare.main(["--dataset", "kadid10k", "--data_dir", str(root), "--out", str(root / "cache"),
                "--size", "16", "--threads", "2"])
  from iqa_jax.data import kadid10k
  return kadid10k.load(str(root)), str(root / "cache")


def test_cache_holds_the_decoded_resized_pixels(kadid):
  records, cache = kadid
  index = json.loads(open(f"{cache}/index.json").read())
  assert index["size"] == 16 and index["paths"] == [r.path for r in records]
  array = np.load(f"{cache}/images.npy")
  assert array.shape == (8, 16, 16, 3) and array.dtype == np.uint8
  decode = pp.get_preprocess_fn("decode|resize(16)")
  for r, row in zip(records, array, strict=True):
    np.testing.assert_array_equal(row, decode({"path": r.path})["image"])


def test_loaders_from_cache_equal_loaders_from_files(kadid):
  records, cache = kadid
  kw = dict(seed=8, epoch=1)
  for files, cached in [
      (pipeline.make_train_loader(records, PP, 3, **kw),
       pipeline.make_train_loader(records, PP, 3, cache=cache, **kw)),
      (pipeline.make_eval_loader(records, PP, 3), pipeline.make_eval_loader(records, PP, 3,
                                                                            cache=cache))]:
    for a, b in zip(files, cached, strict=True):
      assert a.keys() == b.keys()
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_cache_with_worker_processes_and_subsets(kadid):
  records, cache = kadid
  subset = records[5:] + records[:2]  # a split: any subset, any order
  want = list(pipeline.make_eval_loader(subset, PP, 4))
  got = list(pipeline.make_eval_loader(subset, PP, 4, cache=cache, workers=1))
  for a, b in zip(want, got, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_check_records_against_cache(kadid, tmp_path):
  records, cache = kadid
  stranger = Record(str(tmp_path / "other.jpg"), 0.5, 2.5)
  kept, skipped = pipeline.check_records(records + [stranger], on_error="skip", cache=cache)
  assert kept == records and skipped == [(stranger.path, f"not in the cache {cache}")]
  with pytest.raises(ValueError, match="not in the cache"):
    pipeline.make_train_loader(records + [stranger], PP, 2, seed=0, epoch=0, cache=cache)
  with pytest.raises(ValueError, match="not a prepare cache"):
    pipeline.make_eval_loader(records, PP, 2, cache=str(tmp_path))


# ---- Issue 10 item 8: the cache records its recipe and refuses another -----------------------

def test_cache_refuses_a_pp_string_it_was_not_built_with(kadid):
  records, cache = kadid
  assert json.loads(open(f"{cache}/index.json").read())["pp"] == "decode|resize(16, 'bilinear')"
  for other in ("decode|resize(24)|value_range()", "decode|resize(16, 'bicubic')",
                "decode(draft=16)|resize(16)", "decode|resize_small(16)|central_crop(16)"):
    with pytest.raises(ValueError, match=r"holds images made by \"decode\|resize\(16, "
                                         r"'bilinear'\)\", but the run's pp string"):
      pipeline.make_eval_loader(records, other, 2, cache=cache)
    with pytest.raises(ValueError, match="holds images made by"):
      pipeline.make_train_loader(records, other, 2, seed=0, epoch=0, cache=cache)
  # Other spellings of the recipe, and ops after it, are the same pixels.
  same = "decode(key='image')|resize((16, 16), 'bilinear')|value_range(0, 1)"
  want = list(pipeline.make_eval_loader(records, same, 4))
  for a, b in zip(want, pipeline.make_eval_loader(records, same, 4, cache=cache), strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_rebuild_into_a_cache_folder(kadid, capsys):
  records, cache = kadid
  root = str(Path(cache).parent)
  before = {p.name: p.stat().st_mtime_ns for p in Path(cache).iterdir()}
  args = ["--dataset", "kadid10k", "--data_dir", root, "--out", cache, "--threads", "2",
          "--no-progress"]
  assert prepare.main(args + ["--size", "24"]) == 2
  assert ("already holds a cache made by \"decode|resize(16, 'bilinear')\" for 8 images; this "
          "build is \"decode|resize(24, 'bilinear')\". Pick another") in capsys.readouterr().err
  with pytest.raises(ValueError, match=r"for 8 images; this build is .* for 7 images"):
    prepare.build_cache(records[1:], cache, 16, progress=False)
  assert prepare.main(args[:-4] + [str(Path(cache) / "index.json"), "--no-progress"]) == 2
  assert "index.json is a file; name a folder" in capsys.readouterr().err
  assert prepare.main(args + ["--size", "16"]) == 0  # the same recipe: nothing to redo
  assert "already holds these 8 images at 16 (bilinear); nothing to do" in capsys.readouterr().out
  assert {p.name: p.stat().st_mtime_ns for p in Path(cache).iterdir()} == before
  with prepare._single_writer(Path(cache)):  # noqa: SLF001 - another build in progress
    with pytest.raises(ValueError, match="Another prepare is writing"):
      prepare.build_cache(records, cache, 16, progress=False)


def test_cache_from_before_the_pp_string_was_stored(kadid, tmp_path):
  records, cache = kadid
  old = tmp_path / "old"
  shutil.copytree(cache, old)
  index = json.loads((old / "index.json").read_text())
  del index["pp"]
  (old / "index.json").write_text(json.dumps(index))
  assert prepare.check_cache(str(old), PP)["pp"] == "decode|resize(16, 'bilinear')"
  with pytest.raises(ValueError, match="holds images made by"):
    prepare.check_cache(str(old), "decode|resize(32)")
  (old / "index.json").write_text('{"size": 16, "pa')
  with pytest.raises(ValueError, match=r"old/index.json is unreadable \(JSONDecodeError"):
    prepare.check_cache(str(old), PP)


def test_prepare_options_are_typed(tmp_path, capsys):
  from test_datasets import make_clive
  make_clive(tmp_path / "clive")
  args = ["--dataset", "clive", "--data_dir", str(tmp_path / "clive"), "--size", "8",
          "--threads", "1", "--no-progress"]
  assert prepare.main(args + ["--out", str(tmp_path / "all"), "--option",
                              "drop_practice=false"]) == 0
  paths = json.loads((tmp_path / "all/index.json").read_text())["paths"]
  assert [Path(p).name for p in paths[:2]] == ["t1.bmp", "t2.bmp"] and len(paths) == 10
  assert prepare.main(args + ["--out", str(tmp_path / "x"), "--option", "drop_practise=0"]) == 2
  assert "--option 'drop_practise=0': expected KEY=VALUE with KEY one of" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()


def test_a_cut_build_goes_on_after_the_rows_it_recorded(kadid, tmp_path, monkeypatch, capsys):
  """Ctrl-C in the 6th image: the second run decodes only what was not recorded as written,
  and the cache equals the one built in one go."""
  records, whole = kadid
  out, real, decoded = tmp_path / "cut", pp.get_preprocess_fn, []

  def counting(pp_str):
    fn = real(pp_str)

    def decode(example):
      if len(decoded) == 5 and cut:
        raise KeyboardInterrupt
      decoded.append(example["path"])
      return fn(example)
    return decode

  monkeypatch.setattr(prepare.pp, "get_preprocess_fn", counting)
  monkeypatch.setattr(prepare, "RECORD_EVERY_S", 0.0)  # record after every row
  cut = True
  with pytest.raises(KeyboardInterrupt):
    prepare.build_cache(records, str(out), 16, threads=1, progress=False)
  assert not (out / "index.json").exists() and not (out / "images.npy").exists()
  recorded = json.loads((out / "images.npy.partial.json").read_text())["done"]
  assert 1 <= recorded <= 5
  cut, decoded[:] = False, []
  prepare.build_cache(records, str(out), 16, threads=2, progress=False)
  assert decoded == [r.path for r in records[recorded:]]
  assert f"going on with a cut build of {out}: {recorded} of 8 images" in capsys.readouterr().err
  assert (out / "images.npy").read_bytes() == (Path(whole) / "images.npy").read_bytes()
  assert json.loads((out / "index.json").read_text()) == json.loads(
      (Path(whole) / "index.json").read_text())
  assert sorted(p.name for p in out.iterdir()) == [".prepare.lock", "images.npy", "index.json"]
  # A cut build of other images starts over.
  cut, decoded[:] = True, []
  with pytest.raises(KeyboardInterrupt):
    prepare.build_cache(records, str(tmp_path / "other"), 16, threads=1, progress=False)
  cut, decoded[:] = False, []
  prepare.build_cache(records[:7], str(tmp_path / "other"), 16, threads=1, progress=False)
  assert decoded == [r.path for r in records[:7]]


def test_a_record_without_its_rows_is_not_trusted(kadid, tmp_path, monkeypatch):
  """A build that starts over drops an earlier record first: cut before it records anything,
  the rerun must not skip rows that were never written."""
  records, whole = kadid
  out = tmp_path / "stale"
  out.mkdir()
  paths = [r.path for r in records]
  (out / "images.npy.partial.json").write_text(json.dumps(
      {"pp": prepare.recipe(16, "bilinear"), "paths_sha256": prepare._digest(paths),
       "shape": [8, 16, 16, 3], "done": 5}))  # its images.npy.partial is gone
  real, calls = pp.get_preprocess_fn, []

  def cut_at_first(pp_str):
    def decode(example):
      calls.append(example["path"])
      if len(calls) == 1:
        raise KeyboardInterrupt
      return real(pp_str)(example)
    return decode

  monkeypatch.setattr(prepare.pp, "get_preprocess_fn", cut_at_first)
  with pytest.raises(KeyboardInterrupt):
    prepare.build_cache(records, str(out), 16, threads=1, progress=False)
  calls.append("rerun")
  prepare.build_cache(records, str(out), 16, threads=1, progress=False)
  assert calls[2:] == paths  # every image decoded again
  assert (out / "images.npy").read_bytes() == (Path(whole) / "images.npy").read_bytes()
