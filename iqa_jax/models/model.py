"""Backbone registry and the full IQA model: backbone feature -> quality head -> score."""
from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from iqa_jax import xla_cpu
from iqa_jax.models import (
    cleandift,
    clip,
    dinov2,
    dinov3,
    hf_io,
    pe,
    resnet,
    siglip,
    siglip2_naflex,
)
from iqa_jax.models.head import QualityHead, resolve_head
from iqa_jax.models.tower import (  # noqa: F401 - DTYPES, Backbone: the names callers know
    DTYPES,
    Backbone,
    model_field,
)

# family -> build(config.model) -> Backbone. Each family file owns its checkpoint quirks
# (STYLE.md); the families import `tower`, never this file, so the imports run one way.
BACKBONES: dict[str, Callable[[ml_collections.ConfigDict], Backbone]] = {
    "siglip": siglip.build,
    "clip": clip.build,
    "dinov2": dinov2.build,
    "resnet": resnet.build,
    "dinov3": dinov3.build,
    "siglip2_naflex": siglip2_naflex.build,
    "pe": pe.build,
    "cleandift": cleandift.build,
}


def register_backbone(family: str, build: Callable[[ml_collections.ConfigDict], Backbone]) -> None:
  BACKBONES[family] = build


def build_backbone(model_config: ml_collections.ConfigDict) -> Backbone:
  family = model_config.backbone
  if family not in BACKBONES:
    raise ValueError(f"config.model.backbone={family!r} is unknown; "
                     f"choose one of {sorted(BACKBONES)}")
  return BACKBONES[family](model_config)


def normalize_on_device(images, mean, std):
  """uint8 -> (x / 255 - mean) / std in float32, as pp's `normalize` op does on the host."""
  std64 = np.asarray(std, np.float64)
  scale = jnp.asarray(1.0 / (255.0 * std64), jnp.float32)
  offset = jnp.asarray(-np.asarray(mean, np.float64) / std64, jnp.float32)
  return images.astype(jnp.float32) * scale + offset


class IQAModel(nn.Module):
  """images -> (score (B,), out) where out holds the backbone's intermediates and 'feature'.

  uint8 images (a pp string that stops before `normalize`) are normalised here, on the device,
  with the checkpoint's mean and std: 4x fewer bytes to the device and no host float pass.
  """
  backbone: nn.Module
  head: QualityHead
  mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  std: tuple[float, ...] = (0.5, 0.5, 0.5)

  def __call__(self, images, train: bool = False):
    if images.dtype == jnp.uint8:
      images = normalize_on_device(images, self.mean, self.std)
    feature, out = self.backbone(images, train=train)
    out = dict(out)
    out["feature"] = feature
    score, head_out = self.head(feature, train=train)
    out.update(head_out)
    return score, out


# The config.model fields that make the head (a head trained on another run's features is
# scored on that run's backbone with these fields of its own).
HEAD_FIELDS = ("head", "head_hidden", "feature_keep_percentile", "input_dropout", "head_dropout")


def head_from_config(model_config: ml_collections.ConfigDict) -> QualityHead:
  """config.model -> the quality head, with the Table 4 / S3 ablation fields when set."""
  def get(key):
    return model_field(model_config, key)
  return QualityHead(acts=resolve_head(model_config.head),
                     hidden=get("head_hidden"),
                     keep_percentile=float(get("feature_keep_percentile")),
                     input_dropout=float(get("input_dropout")),
                     head_dropout=float(get("head_dropout")))


def init_params(model: nn.Module, dummy: jax.Array, rng: jax.Array) -> dict:
  """`model`'s random params for inputs shaped like `dummy`, compiled the same way in every
  process: the CPU's threefry lowering (xla_cpu.unrolled_threefry) is set before the first draw,
  not by whichever train step a process happened to build first."""
  xla_cpu.unrolled_threefry()
  params = jax.jit(lambda r: model.init({"params": r, "dropout": r}, dummy)["params"])(rng)
  return jax.tree.map(lambda x: x, dict(params))


def create_model(config: ml_collections.ConfigDict, rng=None):
  """config -> (IQAModel, params {'backbone','head'}, preprocessing); pretrained weights in."""
  bb = build_backbone(config.model)
  model = IQAModel(backbone=bb.module,
                   head=head_from_config(config.model),
                   mean=tuple(bb.preprocessing["mean"]), std=tuple(bb.preprocessing["std"]))
  size = bb.preprocessing["crop"] or bb.preprocessing["size"]
  size = config.data.get("image_size") or size
  rng = jax.random.PRNGKey(config.seed) if rng is None else rng
  params = init_params(model, jnp.zeros((1, size, size, 3), jnp.float32), rng)
  if bb.params is not None:
    where = f"config.model.init={config.model.init!r}"
    params["backbone"] = hf_io.merge_loaded(jax.device_get(params["backbone"]), bb.params, where)
  return model, params, bb.preprocessing


def make_eval_step(model) -> Callable:
  """(params, images) -> float32 scores: the test-time forward of training, scoring and bench."""
  def eval_step(params, images):
    pred, _ = model.apply({"params": params}, images, train=False)
    return pred.astype(jnp.float32)
  return eval_step
