"""Where a score comes from (Grad-CAM) and how the heads arrange images (t-SNE).

  python -m iqa_jax.explain gradcam --workdir RUN --out DIR IMAGES... [--groups top10,top50]
  python -m iqa_jax.explain gradcam --workdir RUN --out DIR --over-training [--epochs 1,4] IMAGES...
  python -m iqa_jax.explain tsne --workdir RUN[,RUN...] --out DIR [--per-split 400]

Grad-CAM (Figures 1, 5, S8-S11) is taken on the tokens the backbone reports as `encoded` (the
last encoder block after its final norm; a ResNet's last stage; NaFlex tokens on the image's own
patch grid): channel weights are the token-averaged gradients of the target, the map is
ReLU(sum_c weight_c * A_c). The target is the quality score, or with --groups the summed
magnitude of one band of backbone features ranked by |f| (top10: |f| at or above the 90th
percentile of that image's |f|; 10-30: between the 70th and 90th). --over-training (Figure S6)
draws the score's map with the params of every epoch a run kept (config.keep_epoch_checkpoints):
one row per epoch, one column per image.
t-SNE (Figures 4, S1, S2, scikit-learn) embeds the backbone feature and each head's hidden
layers for the train and held-out splits, coloured by quality bucket, with the silhouette score
of each panel's embedding by bucket, so "tighter clusters" is a number.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

BUCKETS = 5  # quality buckets of MOS in [0, 1]: [0, .2), [.2, .4), ... (Fig. 4 colours)


# ---------------------------------------------------------------------------------- Grad-CAM

def _encoded_module(model, params, images) -> tuple[str, ...]:
  """The path of the module whose output is out['encoded'] (found by value, so no family needs
  to name it): the last norm of a transformer, the last residual block of a ResNet."""
  (_, out), state = model.apply({"params": params}, images, capture_intermediates=True,
                                mutable=["intermediates"])
  encoded = np.asarray(out["encoded"])
  found = []
  flat = jax.tree_util.tree_flatten_with_path(
      state["intermediates"], is_leaf=lambda x: isinstance(x, tuple))[0]
  for path, value in flat:
    names = tuple(getattr(k, "key", str(k)) for k in path)
    if names[-1] != "__call__" or not isinstance(value, tuple):
      continue
    y = value[0]
    if isinstance(y, jax.Array) and y.shape == encoded.shape and np.array_equal(y, encoded):
      found.append(names[:-1])
  if not found:
    raise ValueError("no module returns the backbone's out['encoded'] tokens; Grad-CAM needs one")
  return max(found, key=len)  # the innermost module that makes it


def token_grid(tokens: int, height: int, width: int) -> tuple[int, int]:
  """The patch grid (rows, cols) of `tokens` tokens on an image, allowing up to 8 leading
  class / register tokens: the patch size p divides both sides and rows * cols + extra = T."""
  for extra in range(9):
    for p in range(1, min(height, width) + 1):
      if height % p == 0 and width % p == 0 and (height // p) * (width // p) == tokens - extra:
        return height // p, width // p
  raise ValueError(f"{tokens} tokens fit no patch grid of a {height}x{width} image")


def gradcam(model, params, images, target: Callable | None = None) -> tuple[np.ndarray, dict]:
  """-> (maps (B, gh, gw) >= 0, unnormalised; out, with the model's 'score'). target(score, out)
  -> (B,) defaults to the score. Tokens (B, T, D) lose leading class/register tokens to fit the
  patch grid."""
  target = target or (lambda score, out: score)
  module_path = _encoded_module(model, params, images[:1])
  encoded_shape = jax.eval_shape(lambda: model.apply({"params": params}, images)[1]["encoded"])

  def objective(delta):
    acts = {}

    def add_delta(next_fun, args, kwargs, context):
      y = next_fun(*args, **kwargs)
      scope = context.module.scope
      if context.method_name == "__call__" and scope is not None and \
          tuple(scope.path) == module_path:
        y = y + delta.astype(y.dtype)
        acts["a"] = y
      return y

    with nn.intercept_methods(add_delta):
      score, out = model.apply({"params": params}, images)
    return target(score, out).sum(), (acts["a"], {**out, "score": score})

  delta = jnp.zeros(encoded_shape.shape, jnp.float32)
  grads, (acts, out) = jax.grad(objective, has_aux=True)(delta)
  acts, grads = np.asarray(acts, np.float32), np.asarray(grads, np.float32)
  if acts.ndim == 4:  # (B, H, W, C) feature map
    weights = grads.mean(axis=(1, 2))
    maps = np.maximum(np.einsum("bhwc,bc->bhw", acts, weights), 0)
    return maps, out
  grids = np.asarray(out["spatial_shapes"]) if "spatial_shapes" in out else None
  maps = []
  for i in range(acts.shape[0]):
    if grids is not None:  # NaFlex: the first rows*cols tokens are this image's patches
      gh, gw = (int(v) for v in grids[i])
      a, g = acts[i, :gh * gw], grads[i, :gh * gw]
    else:
      gh, gw = token_grid(acts.shape[1], images.shape[1], images.shape[2])
      a, g = acts[i, -gh * gw:], grads[i, -gh * gw:]  # class / register tokens come first
    cam = np.maximum(a @ g.mean(axis=0), 0)
    maps.append(cam.reshape(gh, gw))
  return (np.stack(maps) if grids is None else maps), out


def band_target(band: str) -> Callable:
  """'top10' -> sum of |f| over features at or above the 90th percentile of the image's |f|;
  'A-B' (percent from the top) -> those between the (100-B)th and (100-A)th percentiles."""
  if band.startswith("top"):
    lo, hi = 0.0, float(band[3:])
  else:
    lo, hi = (float(v) for v in band.split("-"))
  if not 0 <= lo < hi <= 100:
    raise ValueError(f"--groups {band}: use topN or A-B with 0 <= A < B <= 100 (percent)")

  def target(score, out):
    f = out["feature"].astype(jnp.float32)
    mag = jax.lax.stop_gradient(jnp.abs(f))
    upper = jnp.percentile(mag, 100 - lo, axis=-1, keepdims=True)
    lower = jnp.percentile(mag, 100 - hi, axis=-1, keepdims=True)
    inside = (mag >= lower) & ((mag <= upper) if lo > 0 else True)
    return jnp.where(inside, jnp.abs(f), 0.0).sum(-1)
  return target


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """uint8 (H, W, 3) image with the map (normalised to its max) resized over it in 'jet'."""
  from matplotlib import colormaps
  from PIL import Image
  h, w = image.shape[:2]
  cam = cam / cam.max() if cam.max() > 0 else cam
  big = np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize((w, h),
                                                                            Image.BILINEAR))
  heat = colormaps["jet"](np.clip(big, 0, 1))[..., :3] * 255
  return (alpha * heat + (1 - alpha) * image).astype(np.uint8)


def _model_inputs(loaded, paths: Sequence[str]) -> list[tuple[jax.Array, np.ndarray]]:
  """[(the model's input (1, ...) by the run's pp, the image as shown (H, W, 3) uint8)]."""
  from iqa_jax.data import pp
  config, prep = loaded.info["config"], loaded.info["preprocessing"]
  load = pp.get_preprocess_fn(loaded.pp_str)
  show = pp.get_preprocess_fn(f"decode|resize({config['data']['image_size'] or prep['size']})")
  return [(jnp.asarray(load({"path": p})["image"][None]), show({"path": p})["image"])
          for p in paths]


def gradcam_images(workdir: str, paths: Sequence[str], out_dir: str,
                   groups: Sequence[str] = (), which: str = "best") -> list[Path]:
  """Overlay PNGs for each image: one panel for the score, one per feature band."""
  from iqa_jax.inference.loaded import load_run

  loaded = load_run(workdir, which)
  model, params = loaded.model, loaded.params
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  targets = [("score", None)] + [(g, band_target(g)) for g in groups]
  written = []
  for path, (x, image) in zip(paths, _model_inputs(loaded, paths), strict=True):
    panels = []
    for name, target in targets:
      maps, out = gradcam(model, params, x, target)
      panels.append((name, overlay(image, np.asarray(maps[0])), float(out["feature"].shape[-1])))
    fig = Figure(figsize=(2.2 * (len(panels) + 1), 2.4), layout="constrained")
    axes = fig.subplots(1, len(panels) + 1)
    axes[0].imshow(image)
    axes[0].set_title(Path(path).name, fontsize=7)
    for ax, (name, img, _) in zip(axes[1:], panels, strict=True):
      ax.imshow(img)
      ax.set_title(name if name == "score" else f"features {name}", fontsize=8)
    for ax in axes:
      ax.axis("off")
    dest = out_dir / f"gradcam_{Path(path).stem}.png"
    fig.savefig(dest, dpi=80)
    written.append(dest)
  return written


def score_overlays(workdir: str, paths: Sequence[str], which: str = "best") -> list[np.ndarray]:
  """The score's Grad-CAM over each image as shown, uint8 (H, W, 3) (the gallery's overlays)."""
  from iqa_jax.inference.loaded import load_run
  loaded = load_run(workdir, which)
  inputs = _model_inputs(loaded, paths)
  if len({x.shape for x, _ in inputs}) == 1:  # one batch: the module is found and traced once
    maps = gradcam(loaded.model, loaded.params, jnp.concatenate([x for x, _ in inputs]))[0]
  else:
    maps = [gradcam(loaded.model, loaded.params, x)[0][0] for x, _ in inputs]
  return [overlay(image, np.asarray(m)) for m, (_, image) in zip(maps, inputs, strict=True)]


def over_training(workdir: str, paths: Sequence[str], epochs: Sequence[int] = ()
                  ) -> tuple[list[dict], list[np.ndarray]]:
  """Grad-CAM of the score with the params kept after each epoch (Figure S6), or after the
  given 1-based `epochs` -> ([{'epoch': n, 'maps': [(gh, gw) per image], 'scores': [per
  image]}], the images as shown)."""
  from iqa_jax.inference.loaded import load_run
  from iqa_jax.runs import checkpoint
  kept = checkpoint.epoch_numbers(workdir)
  folder = Path(workdir) / "ckpt" / checkpoint.EPOCHS
  if not kept:
    raise ValueError(f"{folder} holds no per-epoch checkpoints: --over-training needs a run "
                     "trained with --config.keep_epoch_checkpoints=true")
  missing = sorted(set(epochs) - set(kept))
  if missing:
    raise ValueError(f"--epochs {','.join(map(str, missing))}: {folder} keeps epochs "
                     f"{','.join(map(str, kept))}")
  epochs = sorted(set(epochs)) or kept
  loaded = load_run(workdir, "last")
  inputs = _model_inputs(loaded, paths)
  rows = []
  for n in epochs:
    params = checkpoint.unflatten_into(loaded.params,
                                       checkpoint.load_params(workdir, checkpoint.EPOCHS, n)[0])
    cams = [gradcam(loaded.model, params, x) for x, _ in inputs]
    rows.append({"epoch": n, "maps": [np.asarray(m[0]) for m, _ in cams],
                 "scores": [float(out["score"][0]) for _, out in cams]})
  return rows, [image for _, image in inputs]


def over_training_figure(workdir: str, paths: Sequence[str], out_dir: str,
                         epochs: Sequence[int] = ()) -> tuple[Path, list]:
  """One row per kept epoch (or per one of `epochs`), one column per image; each cell titled
  with the epoch and the predicted score. Also writes the scores as gradcam_over_training.csv."""
  from iqa_jax.runs import folder as run_folder
  rows, images = over_training(workdir, paths, epochs)
  fig = Figure(figsize=(1.6 * len(paths), 1.75 * len(rows)), layout="constrained")
  axes = fig.subplots(len(rows), len(paths), squeeze=False)
  table = []
  for r, row in enumerate(rows):
    for c, (path, image) in enumerate(zip(paths, images, strict=True)):
      axes[r, c].imshow(overlay(image, row["maps"][c]))
      axes[r, c].set_title(f"epoch {row['epoch']} · {row['scores'][c]:.3f}", fontsize=7)
      axes[r, c].axis("off")
      table.append([row["epoch"], path, f"{row['scores'][c]:.6f}"])
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  fig.savefig(out / "gradcam_over_training.png", dpi=80)
  run_folder.write_csv(out / "gradcam_over_training.csv", ("epoch", "path", "score"), table)
  return out / "gradcam_over_training.png", rows


# ---------------------------------------------------------------------------------- t-SNE

def quality_bucket(mos) -> np.ndarray:
  return np.minimum((np.asarray(mos) * BUCKETS).astype(int), BUCKETS - 1)


def tsne_panel(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float]:
  """-> (2-D t-SNE embedding (scikit-learn, PCA init), silhouette score of it by label)."""
  from sklearn.manifold import TSNE
  from sklearn.metrics import silhouette_score
  from threadpoolctl import threadpool_limits
  features = np.asarray(features, np.float64)
  perplexity = min(30.0, (len(features) - 1) / 3)
  # One OpenMP thread: a few hundred points need no more, and spinning threads on a busy
  # machine made a 2 s embedding take minutes.
  with threadpool_limits(1):
    emb = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
  score = silhouette_score(emb, labels) if len(set(labels.tolist())) > 1 else math.nan
  return emb, float(score)


# Fewer points than this leave t-SNE's perplexity or the silhouette (2 .. n-1 labels) undefined.
MIN_PER_SPLIT = 10
STAGES = (("feature", "encoder"), ("hidden1", "head layer 1"), ("hidden2", "head layer 2"))


def run_embeddings(workdir: str, per_split: int = 400, seed: int = 0) -> dict:
  """{split: {stage: features (n, d)}, split + '_mos': mos} for a run's held-out and train sets."""
  import ml_collections

  from iqa_jax.data import datasets, pipeline, pp
  from iqa_jax.models.model import create_model
  from iqa_jax.runs import checkpoint
  from iqa_jax.training import features
  cfg_file = Path(workdir) / "config.json"
  if not cfg_file.is_file():
    raise FileNotFoundError(f"{cfg_file} not found: --workdir must be a run folder made by "
                            "python -m iqa_jax.train")
  config = ml_collections.ConfigDict(json.loads(cfg_file.read_text()))
  if config.data.get("features"):  # a head trained on a feature cache: read its features there
    model, params, pp_str = features.head_only(config)
    cache = config.data.features
  else:
    model, params, prep = create_model(config)
    pp_str, cache = pp.run_pp(config.data, prep), config.data.get("cache") or None
  params = checkpoint.unflatten_into(params, checkpoint.load_params(workdir, "best")[0])
  splits = datasets.load_splits(workdir)
  held = "test" if splits.get("test") else "val"
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[1])
  result = {}
  rng = np.random.RandomState(seed)
  for split in (held, "train"):
    recs = splits[split]
    if len(recs) > per_split:
      recs = [recs[i] for i in sorted(rng.choice(len(recs), per_split, replace=False))]
    stages = {s: [] for s, _ in STAGES}
    for batch in pipeline.make_eval_loader(recs, pp_str, config.eval_batch_size, cache=cache):
      out = forward(params, batch["image"])
      valid = np.asarray(batch["valid"])
      for s, _ in STAGES:
        stages[s].append(np.asarray(out[s], np.float32)[valid])
    result[split] = {s: np.concatenate(v) for s, v in stages.items()}
    result[split + "_mos"] = np.array([r.mos for r in recs])
  result["held"] = held
  result["label"] = f"{config.data.name} {config.model.head} ({config.model.finetune})"
  return result


def tsne_figure(workdirs: Sequence[str], out_dir: str, per_split: int = 400,
                seed: int = 0) -> tuple[Path, list[dict]]:
  """One row per (run, split), one column per stage; returns the PNG and silhouette rows."""
  runs = [(w, run_embeddings(w, per_split, seed)) for w in workdirs]
  fig = Figure(figsize=(3.2 * len(STAGES), 3.0 * 2 * len(runs)), layout="constrained")
  axes = fig.subplots(2 * len(runs), len(STAGES), squeeze=False)
  rows = []
  for r, (workdir, emb) in enumerate(runs):
    for s, split in enumerate((emb["held"], "train")):
      labels = quality_bucket(emb[split + "_mos"])
      for c, (stage, title) in enumerate(STAGES):
        xy, sil = tsne_panel(emb[split][stage], labels, seed)
        ax = axes[2 * r + s, c]
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="viridis", s=5, vmin=0,
                        vmax=BUCKETS - 1)
        ax.set_title(f"{title}, {split}\nsilhouette {sil:.3f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if c == 0:
          ax.set_ylabel(emb["label"], fontsize=7)
        rows.append({"run": workdir, "split": split, "stage": stage, "n": len(labels),
                     "silhouette": round(sil, 4)})
  fig.colorbar(sc, ax=axes, label="quality bucket (MOS x 5)", shrink=0.6)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  fig.savefig(out / "tsne.png", dpi=80)
  with open(out / "tsne_silhouette.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  return out / "tsne.png", rows
