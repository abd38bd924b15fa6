"""load_image on every pixel format the datasets contain, with exact expected pixel values."""
import numpy as np
import pytest
from PIL import Image

from iqa_jax.data import images


def _save(tmp_path, img, name, **kw):
  path = str(tmp_path / name)
  img.save(path, **kw)
  return path


def test_rgb_png_roundtrip(tmp_path):
  x = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  out = images.load_image(_save(tmp_path, Image.fromarray(x), "a.png"))
  assert out.dtype == np.uint8 and np.array_equal(out, x)


def test_grayscale_and_one_bit(tmp_path):
  g = np.array([[0, 100, 255]], np.uint8)
  out = images.load_image(_save(tmp_path, Image.fromarray(g), "g.png"))
  assert np.array_equal(out, np.repeat(g[..., None], 3, -1))
  bits = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
  out = images.load_image(_save(tmp_path, bits, "b.png"))
  assert np.array_equal(out[0, :, 0], [0, 255]) and out.shape == (1, 2, 3)


@pytest.mark.parametrize("mode,ext", [("I;16", "png"), ("I;16B", "tiff"), ("I", "tiff")])
def test_sixteen_bit_is_scaled_not_clipped(tmp_path, mode, ext):
  values = np.array([[0, 257, 32896, 65535]])
  dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
  img = Image.frombytes(mode, (4, 1), values.astype(dtype).tobytes())
  out = images.load_image(_save(tmp_path, img, f"x.{ext}"))
  assert np.array_equal(out[0, :, 0], [0, 1, 128, 255])
  assert np.array_equal(out[..., 0], out[..., 2])


def test_alpha_is_composited_on_white(tmp_path):
  rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], np.uint8)
  out = images.load_image(_save(tmp_path, Image.fromarray(rgba, "RGBA"), "a.png"))
  assert np.array_equal(out[0, 0], [10, 20, 30])
  assert np.array_equal(out[0, 1], [255, 255, 255])
  assert np.all(np.abs(out[0, 2].astype(int) - 127) <= 1)  # half black over white
  la = Image.fromarray(np.array([[[50, 255], [50, 0]]], np.uint8), "LA")
  out = images.load_image(_save(tmp_path, la, "la.png"))
  assert np.array_equal(out[0], [[50, 50, 50], [255, 255, 255]])


def test_palette_with_transparency(tmp_path):
  p = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
  p.putpalette([200, 0, 0, 0, 0, 200] + [0] * 762)
  out = images.load_image(_save(tmp_path, p, "p.png", transparency=0))
  assert np.array_equal(out[0], [[255, 255, 255], [0, 0, 200]])
  out = images.load_image(_save(tmp_path, p, "p2.png"))  # no transparency: plain palette
  assert np.array_equal(out[0], [[200, 0, 0], [0, 0, 200]])


def test_cmyk(tmp_path):
  cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8)
  out = images.load_image(_save(tmp_path, Image.fromarray(cmyk, "CMYK"), "c.tiff"))
  assert np.array_equal(out[0], [[255, 255, 255], [0, 255, 255], [0, 0, 0]])
  blocks = np.repeat(np.repeat(cmyk, 16, axis=0), 16, axis=1)  # CMYK JPEG: Adobe-inverted on disk
  out = images.load_image(_save(tmp_path, Image.fromarray(blocks, "CMYK"), "c.jpg", quality=100))
  centres = out[8, [8, 24, 40]].astype(int)
  assert np.abs(centres - [[255, 255, 255], [0, 255, 255], [0, 0, 0]]).max() <= 8


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_exif_orientation(tmp_path, ext):
  x = np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8)
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 clockwise to display"
  path = _save(tmp_path, Image.fromarray(x), f"r.{ext}", exif=exif.tobytes())
  stored = np.asarray(Image.open(path).convert("RGB"))  # raw pixels, orientation ignored
  out = images.load_image(path)
  assert out.shape == (24, 16, 3)
  assert np.array_equal(out, np.rot90(stored, k=-1))
  if ext == "png":
    assert np.array_equal(out, np.rot90(x, k=-1))


def test_tiny_image(tmp_path):
  out = images.load_image(_save(tmp_path, Image.new("RGB", (1, 1), (1, 2, 3)), "t.png"))
  assert out.shape == (1, 1, 3) and out.tolist() == [[[1, 2, 3]]]


def test_draft_decodes_jpeg_at_reduced_scale(tmp_path):
  path = _save(tmp_path, Image.new("RGB", (1024, 768), (90, 120, 150)), "big.jpg")
  assert images.load_image(path).shape == (768, 1024, 3)
  assert images.load_image(path, draft_size=256).shape == (384, 512, 3)  # 1/2: both sides >= 256
  assert images.load_image(path, draft_size=512).shape == (768, 1024, 3)  # 1/2 would give 384 < 512


def test_bad_files_name_the_path(tmp_path):
  missing = str(tmp_path / "nope.jpg")
  with pytest.raises(images.ImageError, match="nope.jpg.*not found"):
    images.load_image(missing)
  corrupt = tmp_path / "corrupt.jpg"
  corrupt.write_bytes(b"this is not an image")
  with pytest.raises(images.ImageError, match="corrupt.jpg"):
    images.load_image(str(corrupt))
  x = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  good = _save(tmp_path, Image.fromarray(x), "good.jpg")
  data = open(good, "rb").read()
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(data[: len(data) // 2])
  with pytest.raises(images.ImageError, match="truncated.jpg.*on_error=skip"):
    images.load_image(str(truncated))
