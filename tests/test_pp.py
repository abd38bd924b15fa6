"""pp ops alone with known numbers, and the composed string against HF's SiglipImageProcessor."""
import numpy as np
import pytest
from conftest import require
from PIL import Image

from iqa_jax.data import pp

RAMP = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)


def _run(pp_str, image):
  return pp.get_preprocess_fn(pp_str)({"image": image})["image"]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
  """A real photograph (skimage's chelsea, 300x451) saved as PNG."""
  data = require("skimage.data")
  path = tmp_path_factory.mktemp("pp") / "chelsea.png"
  Image.fromarray(data.chelsea()).save(path)
  return str(path)


@pytest.mark.parametrize("size,resample", [(224, "bilinear"), (64, "bilinear"), (64, "bicubic")])
def test_matches_hf_siglip_processor(photo, size, resample):
  transformers = require("transformers")
  codes = {"bilinear": 2, "bicubic": 3}  # SigLIP(2) checkpoints ship resample=2
  proc = transformers.SiglipImageProcessor(size={"height": size, "width": size},
                                           resample=codes[resample])
  want = proc(images=Image.open(photo), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  pre = {"size": size, "crop": None, "mean": proc.image_mean, "std": proc.image_std,
         "resample": resample}
  got = pp.get_preprocess_fn(pp.native_pp(pre))({"path": photo})["image"]
  assert got.dtype == np.float32 and got.shape == (size, size, 3)
  np.testing.assert_allclose(got, want[0], atol=1e-5)


def test_matches_hf_clip_processor_with_crop(photo):
  transformers = require("transformers")
  proc = transformers.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size=48)
  want = proc(images=Image.open(photo), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  pre = {"size": 64, "crop": 48, "mean": proc.image_mean, "std": proc.image_std,
         "resample": "bicubic"}
  got = pp.get_preprocess_fn(pp.native_pp(pre))({"path": photo})["image"]
  np.testing.assert_allclose(got, want[0], atol=1e-5)


def test_native_pp_strings():
  pre = {"size": 384, "crop": None, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
         "resample": "bilinear"}
  assert pp.native_pp(pre) == ("decode|resize(384, 'bilinear')|"
                               "normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))")
  assert pp.native_pp(pre, size=512).startswith("decode|resize(512, 'bilinear')|")
  assert "resize_small(256, 'bicubic')|central_crop(224)" in pp.native_pp(
      {**pre, "size": 256, "crop": 224, "resample": "bicubic"})


def test_decode(tmp_path):
  path = str(tmp_path / "a.png")
  Image.fromarray(RAMP).save(path)
  out = pp.get_preprocess_fn("decode")({"path": path})
  assert np.array_equal(out["image"], RAMP)
  cached = np.zeros((2, 2, 3), np.uint8)
  assert pp.get_preprocess_fn("decode")({"path": "unused", "image": cached})["image"] is cached


def test_resize():
  x = np.full((4, 6, 3), 7, np.uint8)
  assert _run("resize(3)", x).shape == (3, 3, 3)
  assert _run("resize((2, 5))", x).shape == (2, 5, 3)
  assert np.all(_run("resize(3)", x) == 7)
  # Nearest 2x upsampling repeats each pixel; bilinear on a constant stays constant.
  up = _run("resize((8, 12), resample='nearest')", RAMP)
  assert np.array_equal(up, RAMP.repeat(2, 0).repeat(2, 1))
  f = _run("resize((8, 12), 'nearest')", RAMP.astype(np.float32) / 2)
  assert f.dtype == np.float32 and np.array_equal(f, up.astype(np.float32) / 2)


def test_resize_small_and_central_crop():
  x = np.zeros((300, 451, 3), np.uint8)
  assert _run("resize_small(64)", x).shape == (64, 96, 3)  # 451 * 64 / 300 = 96.2, floored
  assert _run("resize_small(64)", x.transpose(1, 0, 2)).shape == (96, 64, 3)
  crop = _run("central_crop(2)", RAMP)
  assert np.array_equal(crop, RAMP[1:3, 2:4])
  assert np.array_equal(_run("central_crop((4, 2))", RAMP), RAMP[:, 2:4])
  padded = _run("central_crop(6)", RAMP)  # smaller image: zero-padded around it
  assert padded.shape == (6, 6, 3) and np.array_equal(padded[1:5], RAMP) and not padded[0].any()


def test_normalize_and_value_range():
  x = np.array([[[0, 51, 255]]], np.uint8)
  out = _run("normalize((0.5, 0.5, 0.5), (0.5, 0.25, 0.5))", x)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0], [-1.0, (0.2 - 0.5) / 0.25, 1.0], rtol=1e-6)
  np.testing.assert_allclose(_run("value_range(-1, 1)", x)[0, 0], [-1, -0.6, 1], rtol=1e-6)
  np.testing.assert_allclose(_run("value_range(0, 1)", x)[0, 0], [0, 0.2, 1], rtol=1e-6)


def test_keep():
  out = pp.get_preprocess_fn("keep('image', 'mos')")({"image": 1, "mos": 2, "path": 3})
  assert out == {"image": 1, "mos": 2}


def test_bad_strings():
  with pytest.raises(ValueError, match="Unknown preprocessing op 'resise'.*known ops:.*resize"):
    pp.get_preprocess_fn("decode|resise(512)")
  with pytest.raises(ValueError, match="literals"):
    pp.get_preprocess_fn("resize(size)")
  with pytest.raises(ValueError, match="parse"):
    pp.get_preprocess_fn("resize(512")
