"""The prepare cache: same pixels as decoding the files, and the loaders read it transparently."""
import json

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
  for r, row in zip(records, array):
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
