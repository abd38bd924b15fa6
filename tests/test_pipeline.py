"""The grain loaders: order per (seed, epoch), shards, eval padding, bad inputs, pixel formats."""
import math

import numpy as np
import pytest
from PIL import Image

from iqa_jax.data import images, pipeline, pp
from iqa_jax.data.records import Record

PP = "decode|resize(8)|value_range(0, 1)"


def _jpeg(path, seed, size=(24, 16)):
  x = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(x).save(path, quality=95)
  return str(path)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  folder = tmp_path_factory.mktemp("imgs")
  return [Record(_jpeg(folder / f"{i:02d}.jpg", i), mos=i / 20, raw_mos=i * 5.0)
          for i in range(12)]


def _indices(loader):
  return [b["index"].tolist() for b in loader]


def test_train_batches_and_determinism(records):
  loader = pipeline.make_train_loader(records, PP, 4, seed=8, epoch=0)
  assert len(loader) == 3
  batches = list(loader)
  b = batches[0]
  assert set(b) == {"image", "mos", "index"}
  assert b["image"].shape == (4, 8, 8, 3) and b["image"].dtype == np.float32
  assert b["mos"].dtype == np.float32 and b["index"].dtype == np.int32
  np.testing.assert_allclose(b["mos"], [records[i].mos for i in b["index"]])
  want = pp.get_preprocess_fn(PP)({"path": records[b["index"][0]].path})["image"]
  np.testing.assert_array_equal(b["image"][0], want)
  order = sum(_indices(loader), [])
  assert sorted(order) == list(range(12))
  assert _indices(loader) == _indices(pipeline.make_train_loader(records, PP, 4, seed=8, epoch=0))
  assert _indices(pipeline.make_train_loader(records, PP, 4, seed=8, epoch=1)) != _indices(loader)
  assert _indices(pipeline.make_train_loader(records, PP, 4, seed=19, epoch=0)) != _indices(loader)
  # Pinned: numpy's SeedSequence and grain's index shuffle are the same on every machine.
  assert pipeline.epoch_seed(8, 0) == 765685289
  assert order == [7, 2, 0, 11, 10, 9, 5, 6, 4, 3, 1, 8]


def test_drop_remainder(records):
  assert len(pipeline.make_train_loader(records, PP, 5, seed=0, epoch=0)) == 2
  loader = pipeline.make_train_loader(records, PP, 5, seed=0, epoch=0, drop_remainder=False)
  assert len(loader) == 3 and [len(i) for i in _indices(loader)] == [5, 5, 2]


def test_shards_are_disjoint_and_cover(records):
  shards = [sum(_indices(pipeline.make_train_loader(
      records, PP, 2, seed=25, epoch=3, shard_index=k, shard_count=3)), []) for k in range(3)]
  assert all(len(s) == 4 for s in shards)
  assert sorted(sum(shards, [])) == list(range(12))
  uneven = [len(pipeline.make_train_loader(records[:11], PP, 1, seed=0, epoch=0, shard_index=k,
                                           shard_count=3)) for k in range(3)]
  assert uneven == [3, 3, 3]  # equal step counts on every process


def test_epoch_order_is_grains_shuffle_and_the_loaders_order(records):
  import grain
  for seed, epoch, k, n in [(8, 0, 0, 1), (25, 3, 1, 3), (0, 7, 2, 5)]:
    order = pipeline.epoch_order(len(records), seed, epoch, k, n)
    # The loader's order before epoch_order existed: grain's shuffle of the whole set, sliced.
    grain_ds = grain.MapDataset.source(pipeline.RecordSource(records)).shuffle(
        seed=pipeline.epoch_seed(seed, epoch))[k:len(records) // n * n:n]
    assert order.tolist() == [grain_ds[i]["index"] for i in range(len(grain_ds))]
    loader = pipeline.make_train_loader(records, PP, 1, seed=seed, epoch=epoch, shard_index=k,
                                        shard_count=n)
    assert sum(_indices(loader), []) == order.tolist()


def test_workers_give_the_same_batches(records):
  want = _indices(pipeline.make_train_loader(records, PP, 4, seed=8, epoch=2))
  assert _indices(pipeline.make_train_loader(records, PP, 4, seed=8, epoch=2, workers=1)) == want


def test_eval_loader_pads_last_batch(records):
  loader = pipeline.make_eval_loader(records[:10], PP, 4)
  assert len(loader) == 3
  batches = list(loader)
  assert [b["index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1]]
  last = batches[-1]
  assert last["valid"].tolist() == [True, True, False, False]
  assert last["image"].shape == (4, 8, 8, 3) and not last["image"][2:].any()
  np.testing.assert_allclose(last["mos"][:2], [records[8].mos, records[9].mos])


def test_check_records_bad_inputs(tmp_path, records):
  missing = Record(str(tmp_path / "missing.jpg"), 0.5, 2.5)
  corrupt_path = tmp_path / "corrupt.jpg"
  corrupt_path.write_bytes(b"\xff\xd8 definitely not a jpeg")
  data = open(records[0].path, "rb").read()
  truncated_path = tmp_path / "truncated.jpg"
  truncated_path.write_bytes(data[: len(data) * 2 // 3])
  nan = Record(records[1].path.replace("01", "02"), math.nan, math.nan)
  out_of_range = Record(records[3].path, 1.2, 6.0)
  bad = [missing, Record(str(corrupt_path), 0.1, 1.0), Record(str(truncated_path), 0.1, 1.0),
         nan, out_of_range, Record(records[4].path, 0.2, 1.0), Record(records[4].path, 0.2, 1.0)]
  cases = [(images.ImageError, "missing.jpg.*file not found"),
           (images.ImageError, "corrupt.jpg.*cannot decode"),
           (images.ImageError, "truncated.jpg.*cannot decode"),
           (ValueError, "02.jpg.*not a number"), (ValueError, "03.jpg.*outside"),
           (ValueError, "04.jpg \\(record 1\\): duplicate path \\(also at record 0\\)")]
  for (error, pattern), rec in zip(cases, bad[:5] + [None], strict=True):
    rows = [records[5], rec] if rec else [records[4], records[4]]
    with pytest.raises(error, match=pattern):
      pipeline.check_records(rows)
  kept, skipped = pipeline.check_records(records[5:] + bad, on_error="skip")
  assert kept == list(records[5:]) + [bad[5]]
  assert [p for p, _ in skipped] == [r.path for r in bad[:5]] + [bad[6].path]
  assert "file not found" in skipped[0][1] and "duplicate" in skipped[-1][1]


def test_decode_failure_inside_loader_names_the_file(tmp_path, records):
  gone = Record(str(tmp_path / "deleted_after_check.jpg"), 0.5, 2.5)
  for workers in (0, 1):  # the error crosses from a worker process unchanged
    with pytest.raises(images.ImageError, match="deleted_after_check.jpg"):
      list(pipeline.make_eval_loader([records[0], gone], PP, 2, workers=workers))


def test_odd_formats_in_one_batch(tmp_path):
  exif = Image.Exif()
  exif[0x0112] = 8  # "rotate 90 counter-clockwise to display"
  tall = np.zeros((8, 4, 3), np.uint8)
  tall[:4] = 255  # top half white; displayed rotated CCW it becomes the left half
  files = {
      "grey.png": (Image.new("L", (4, 4), 77), {}),
      "cmyk.tiff": (Image.new("CMYK", (4, 4), (255, 0, 0, 0)), {}),
      "sixteen.png": (Image.frombytes("I;16", (4, 4), np.full(16, 32896, "<u2").tobytes()), {}),
      "alpha.png": (Image.new("RGBA", (4, 4), (0, 0, 0, 0)), {}),
      "exif.png": (Image.fromarray(tall), {"exif": exif.tobytes()}),
  }
  recs = []
  for name, (img, kw) in files.items():
    img.save(tmp_path / name, **kw)
    recs.append(Record(str(tmp_path / name), 0.5, 0.5))
  [batch] = list(pipeline.make_eval_loader(recs, "decode|resize((4, 8), 'nearest')", 5))
  x = batch["image"]
  assert x.dtype == np.uint8 and x.shape == (5, 4, 8, 3)
  assert np.all(x[0] == 77) and np.all(x[1] == [0, 255, 255]) and np.all(x[2] == 128)
  assert np.all(x[3] == 255)
  assert np.all(x[4][:, :4] == 255) and not x[4][:, 4:].any()
