"""Decode any image file the IQA datasets ship into uint8 (H, W, 3) RGB."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

# 16/32-bit modes; PIL's own convert("L") clips them at 255 instead of scaling.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageError(ValueError):
  """An image file that cannot be read: str() names the file and the fix in training; `reason`
  says only what is wrong with it (scoring says its own fix)."""

  def __init__(self, message: str, reason: str | None = None):
    super().__init__(message, reason or message)  # both in args: it pickles whole

  def __str__(self) -> str:
    return self.args[0]

  @property
  def reason(self) -> str:
    return self.args[1]


def _fail(path: str, why: str) -> ImageError:
  return ImageError(f"{path}: {why}. Fix or remove the file (or drop its annotation row), "
                    "or set data.on_error=skip to skip it and log it.", reason=f"{path}: {why}")


def _wide_to_uint8(img: Image.Image) -> np.ndarray:
  """16-bit grey to 8 bit by scaling 0..65535 onto 0..255 with rounding (65535 -> 255, 257 -> 1)."""
  x = np.asarray(img).astype(np.int64)
  x = np.clip(x, 0, 65535)  # mode "I" is int32; 16-bit PNG/TIFF values live in 0..65535
  return ((x * 255 + 32767) // 65535).astype(np.uint8)


def to_rgb(img: Image.Image) -> np.ndarray:
  """A loaded PIL image in any mode -> uint8 (H, W, 3) RGB."""
  if img.mode in _WIDE_MODES:
    return np.repeat(_wide_to_uint8(img)[..., None], 3, axis=-1)
  if img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    # Composite on white, as transformers' convert_to_rgb does, so features match the HF
    # preprocessors, and transparent areas (web images drawn on white pages) don't turn black.
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    img = Image.alpha_composite(background, rgba)
  if img.mode != "RGB":
    img = img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...
  return np.asarray(img, dtype=np.uint8)


def load_image(path: str, draft_size: int | None = None, data: bytes | None = None) -> np.ndarray:
  """Reads `path` (or its bytes `data`, e.g. from TFDS) as uint8 (H, W, 3) RGB, EXIF applied.

  draft_size: for JPEGs, let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) while both sides stay
  >= draft_size; much faster for large photos, slightly different pixels from a full decode.
  """
  try:
    with Image.open(path if data is None else io.BytesIO(data)) as img:
      if draft_size and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
      img.load()
      ImageOps.exif_transpose(img, in_place=True)  # in place: no copy when there is no rotation
      return to_rgb(img)
  except FileNotFoundError:
    raise _fail(path, "file not found") from None
  except Image.UnidentifiedImageError:
    raise _fail(path, "not a readable image (corrupt bytes or unknown format)") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise _fail(path, f"cannot decode image ({e})") from None
