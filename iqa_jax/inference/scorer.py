"""Score images from Python: `Scorer.from_pretrained(MODEL_DIR or RUN)(images)`.

A Scorer holds a loaded model (an exported folder, see export.py, or a training run folder) and
the way it looks at an image at test time, which is part of the model:
  resize: the whole image resized to the input size (the paper's recipe, §3.1);
  crops:  N crops of the input size at native resolution, mean score (the demo: it trains on
          native-resolution tiles, and resizing a large photo erases the artifacts it learned).
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from iqa_jax import parallel, xla_cpu
from iqa_jax.data import images as image_io
from iqa_jax.data import pp
from iqa_jax.inference.exported import load_exported
from iqa_jax.inference.loaded import VIEWS, LoadedModel, load_run
from iqa_jax.models.model import make_eval_step

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]  # noqa: UP007 - runtime alias


def check_view(view: str, crops: int) -> None:
  if view not in VIEWS:
    raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
  if int(crops) < 1:
    raise ValueError(f"crops must be >= 1, got {crops}")


def crop_corners(h: int, w: int, size: int, n: int) -> list[tuple[int, int]]:
  """(top, left) of n size x size windows evenly spaced on the diagonal, top-left to
  bottom-right; n=1 is the centre. Deterministic: the same image always gives the same crops."""
  if n == 1:
    return [((h - size) // 2, (w - size) // 2)]
  return [(round(i * (h - size) / (n - 1)), round(i * (w - size) / (n - 1))) for i in range(n)]


def native_crops(image: np.ndarray, size: int, n: int, resample: str = "bilinear") -> np.ndarray:
  """uint8 (H, W, 3) -> (n, size, size, 3) crops at native resolution. An image smaller than
  `size` on a side is seen as enlarged (aspect kept) until both sides reach `size`; each crop
  is resampled from its own source box, so a 1 x 60000 strip never becomes 64 x 3.84M pixels."""
  h, w = image.shape[:2]
  if min(h, w) >= size:
    return np.stack([image[t:t + size, x:x + size] for t, x in crop_corners(h, w, size, n)])
  s = size / min(h, w)
  big_h, big_w = max(size, round(h * s)), max(size, round(w * s))
  sy, sx = h / big_h, w / big_w  # enlarged pixel -> source pixel
  src = Image.fromarray(image)
  method = Image.Resampling[resample.upper()]
  return np.stack([np.asarray(src.resize((size, size), method,
                                         box=(x * sx, t * sy, (x + size) * sx, (t + size) * sy)))
                   for t, x in crop_corners(big_h, big_w, size, n)])


def to_rgb_array(item: ImageInput) -> np.ndarray:
  """Any accepted input -> uint8 (H, W, 3) RGB, EXIF orientation applied (as files are)."""
  if isinstance(item, (str, os.PathLike)):
    return image_io.load_image(os.fspath(item))
  if isinstance(item, (bytes, bytearray)):
    try:
      with Image.open(io.BytesIO(item)) as img:
        img.load()
        return image_io.to_rgb(ImageOps.exif_transpose(img))
    except (OSError, SyntaxError, ValueError) as e:
      raise image_io.ImageError(f"<{len(item)} bytes>: not a readable image ({e})") from None
  if isinstance(item, Image.Image):
    return image_io.to_rgb(ImageOps.exif_transpose(item))
  if isinstance(item, np.ndarray):
    if item.dtype != np.uint8 or item.ndim not in (2, 3) or (
        item.ndim == 3 and item.shape[-1] not in (1, 3, 4)):
      raise ValueError(f"numpy images must be uint8 (H, W), (H, W, 3) or (H, W, 4); got "
                       f"{item.dtype} {item.shape}")
    if 0 in item.shape[:2]:
      raise ValueError(f"cannot score an empty image: a numpy array of shape {item.shape}")
    if item.ndim == 2 or item.shape[-1] == 1:
      return np.repeat(item.reshape(item.shape[:2])[..., None], 3, axis=-1)
    if item.shape[-1] == 4:
      return image_io.to_rgb(Image.fromarray(item, "RGBA"))
    return np.ascontiguousarray(item)
  raise TypeError(f"cannot score {_given(item)}: pass paths, bytes, PIL images or uint8 numpy "
                  f"arrays, one or a list")


def _given(item) -> str:
  return "None" if item is None else f"a {type(item).__name__} ({item!r:.40})"


def input_error(e: Exception) -> str:
  """One line for an input that could not be scored; what to do is the caller's to say (an
  ImageError's `reason`, without training's advice of data.on_error=skip)."""
  msg = e.reason if isinstance(e, image_io.ImageError) else str(e)
  return f"{type(e).__name__}: {msg}".replace("\n", " ")


def describe(item: ImageInput) -> str:
  if isinstance(item, (str, os.PathLike)):
    return os.fspath(item)
  if isinstance(item, np.ndarray):
    return f"array {item.shape}"
  return type(item).__name__


class Scorer:
  """images -> quality scores (the head's raw output) and MOS on the training set's scale.

  >>> scorer = Scorer.from_pretrained("checkpoints/demo/model")
  >>> scorer(["a.jpg", "b.png"])   # array of scores; scorer.mos(...) on the MOS scale
  """

  def __init__(self, loaded: LoadedModel, *, batch_size: int = 32, view: str | None = None,
               crops: int | None = None, devices=None):
    import jax

    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.loaded = loaded
    self.view = view or loaded.view
    self.crops = int(crops or loaded.crops)
    check_view(self.view, self.crops)
    self.batch_size = batch_size
    self.views_per_image = self.crops if self.view == "crops" else 1
    mesh = parallel.make_mesh(jax.local_devices() if devices is None else devices)
    # The CPU's dot kernels for this model (xla_cpu.choose); None on other devices.
    self.cpu_dots = xla_cpu.choose(mesh.devices.flat, "auto", loaded.params)
    self._score_fn = parallel.jit_eval_step(make_eval_step(loaded.model), mesh, self.cpu_dots)
    self._params = parallel.put_replicated(loaded.params, mesh)
    self._preprocess = pp.get_preprocess_fn(loaded.pp_str)
    # Per crop only the value ops of the pp string apply: the crop already has the input size.
    value_ops = [op for op in loaded.pp_str.split("|")
                 if op.strip().startswith(("normalize", "value_range"))]
    self._crop_pp = pp.get_preprocess_fn("|".join(value_ops))
    self._resample = _resample_of(loaded.pp_str)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, *, which: str | None = None,
                      **kwargs) -> Scorer:
    """An exported model folder (model.safetensors + config.json) or a training run folder
    (`which`: its best or last checkpoint, default best)."""
    return cls(load_model(path, which), **kwargs)

  @property
  def mos_scale(self) -> tuple[float, float]:
    return self.loaded.mos_scale

  def views(self, item: ImageInput) -> np.ndarray:
    """One input -> (views_per_image, size, size, 3) model inputs, as the view says."""
    if self.view == "resize":
      if isinstance(item, (str, os.PathLike)):
        example = {"path": os.fspath(item)}  # the run's own pipeline, decode included
      else:
        example = {"path": describe(item), "image": to_rgb_array(item)}
      return self._preprocess(example)["image"][None]
    crops = native_crops(to_rgb_array(item), self.loaded.input_size, self.crops, self._resample)
    return np.stack([self._crop_pp({"image": c})["image"] for c in crops])

  def score_stream(self, items: Sequence[ImageInput], *, workers: int = 4,
                   on_batch: Callable[[int], None] | None = None
                   ) -> Iterator[tuple[int, float | None, str]]:
    """Yields (index, score or None, error) for every input in order; a bad input gets its
    error message instead of a score and never stops the others."""
    from concurrent.futures import ThreadPoolExecutor

    def prepare(item):
      try:
        return self.views(item), ""
      except Exception as e:  # noqa: BLE001 - the caller records any failure per input
        return None, input_error(e)

    k, b = self.views_per_image, self.batch_size
    with ThreadPoolExecutor(max(1, workers)) as pool:
      def submit(start):  # decode + preprocess one batch of inputs in the pool
        return [pool.submit(prepare, item) for item in items[start:start + b]]

      pending = submit(0)
      for start in range(0, len(items), b):
        loaded = [f.result() for f in pending]
        pending = submit(start + b)  # the next batch decodes while this one runs
        ok = [i for i, (v, _) in enumerate(loaded) if v is not None]
        scores = {}
        if ok:
          batch = np.concatenate([loaded[i][0] for i in ok])
          pad = b * k - len(batch)  # one batch shape: compiled once
          if pad:
            batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
          pred = np.asarray(self._score_fn(self._params, batch), np.float64)[:len(ok) * k]
          scores = dict(zip(ok, pred.reshape(len(ok), k).mean(axis=1).tolist(), strict=True))
        for i in range(len(loaded)):
          s, err = scores.get(i), loaded[i][1]
          if s is not None and not math.isfinite(s):  # damaged weights, not a bad image
            s, err = None, (f"non-finite score ({s}): the model's weights or the image's "
                            f"pixels give no number; check the model with another image")
          yield start + i, s, err
        if on_batch:
          on_batch(len(loaded))

  def __call__(self, images: ImageInput | Iterable[ImageInput], *, workers: int = 4,
               progress: bool = False, desc: str = "score"):
    """Scores one input (-> float) or many (-> float64 array); a bad input raises, naming it."""
    from tqdm.auto import tqdm
    single = _is_single(images)
    if not single and not isinstance(images, Iterable):
      raise TypeError(f"cannot score {_given(images)}: pass paths, bytes, PIL images or uint8 "
                      f"numpy arrays, one or a list")
    # A Sequence is read as the scorer goes (a dataset's images need not all be in memory).
    items = [images] if single else images if isinstance(images, Sequence) else list(images)
    out = np.empty(len(items))
    bar = tqdm(total=len(items), unit="img", desc=desc, disable=not progress, file=sys.stderr,
               dynamic_ncols=True, leave=False)
    for i, s, err in self.score_stream(items, workers=workers, on_batch=bar.update):
      if s is None:
        raise ValueError(f"cannot score input {i} ({describe(items[i])}): {err}; fix or leave "
                         f"out that input")
      out[i] = s
    bar.close()
    return float(out[0]) if single else out

  def mos(self, images: ImageInput | Iterable[ImageInput], **kwargs):
    """Like calling the scorer, on the training set's MOS scale."""
    return self.to_mos(self(images, **kwargs))

  def to_mos(self, scores):
    scale, offset = self.mos_scale
    return scores * scale + offset


def _is_single(images) -> bool:
  return isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray))


def _resample_of(pp_str: str) -> str:
  for name in ("bicubic", "lanczos", "nearest"):
    if f"'{name}'" in pp_str:
      return name
  return "bilinear"


def is_exported_folder(folder: str | os.PathLike) -> bool:
  """An exported folder (model.safetensors, or config.json with format_version), not a run."""
  folder = Path(folder)
  if (folder / "ckpt").is_dir():
    return False
  return (folder / "model.safetensors").exists() or '"format_version"' in _head(
      folder / "config.json")


def load_model(path: str | os.PathLike, which: str | None = None) -> LoadedModel:
  """An exported folder (config.json with format_version) or a training run folder; `which`
  (best | last, default best) picks a run's checkpoint and is refused for an exported folder."""
  folder = Path(path)
  cfg = folder / "config.json"
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder} is not a folder: pass an exported model folder "
                            f"(python -m iqa_jax.export) or a training run folder")
  if is_exported_folder(folder):
    if which is not None:
      raise ValueError(f"--which {which}: {folder} is an exported model, which holds one "
                       f"checkpoint; drop --which, or export that checkpoint with `python -m "
                       f"iqa_jax.export --which {which}`")
    return load_exported(folder)
  if (folder / "ckpt").is_dir() or cfg.exists():
    return load_run(str(folder), which or "best")  # a run without checkpoints: it says so
  raise FileNotFoundError(f"{cfg} not found: an exported model folder holds config.json and "
                          f"model.safetensors; a run folder holds config.json and ckpt/")


def _head(path: Path) -> str:
  try:
    with open(path) as f:
      return f.read(4096)
  except OSError:
    return ""


def model_fingerprint(loaded: LoadedModel) -> str:
  """What makes the scores: the head's weights (trained in every run), every tensor's name,
  shape and dtype, the pp string, input size and MOS scale. Cheap: the head of a 1152-d tower
  is 3.4 MB, hashed in milliseconds."""
  import jax
  h = hashlib.sha256()
  h.update(repr((loaded.pp_str, loaded.input_size, tuple(loaded.mos_scale))).encode())
  leaves = jax.tree_util.tree_flatten_with_path(loaded.params)[0]
  for path, leaf in sorted(((jax.tree_util.keystr(p), x) for p, x in leaves), key=lambda t: t[0]):
    h.update(f"{path}{tuple(leaf.shape)}{leaf.dtype}".encode())  # no copy of the backbone
    if path.startswith("['head']"):
      h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()[:16]
