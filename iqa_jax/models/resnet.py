"""ResNet (HF `resnet`, microsoft/resnet-152) in Flax, with LoRA on the residual-block convolutions.

The feature is `pooler_output`, the global average of the last stage (App. A.1). LoRA (App. A.1):
every convolution inside a residual block gets a low-rank update, peft's Conv2d LoRA: a conv with
the base kernel's size and stride down to `rank` channels, then a 1x1 conv up. BatchNorm always
runs in inference mode: running statistics are loaded and never trained.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iqa_jax.models import hf_io, tower
from iqa_jax.models.lora import LORA_NAMES


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  embedding_size: int = 64
  hidden_sizes: Sequence[int] = (256, 512, 1024, 2048)
  depths: Sequence[int] = (3, 8, 36, 3)
  layer_type: str = "bottleneck"  # bottleneck | basic
  downsample_in_first_stage: bool = False
  downsample_in_bottleneck: bool = False

  @classmethod
  def from_hf(cls, cfg: dict) -> ResNetConfig:
    if cfg.get("hidden_act", "relu") != "relu":
      raise ValueError(f"resnet: hidden_act={cfg['hidden_act']!r} is not supported (relu only)")
    return cls(**tower.fields_from(cls, cfg))


VARIANTS = {
    "152": ResNetConfig(),  # microsoft/resnet-152
    "101": ResNetConfig(depths=(3, 4, 23, 3)),
    "50": ResNetConfig(depths=(3, 4, 6, 3)),
    "18": ResNetConfig(hidden_sizes=(64, 128, 256, 512), depths=(2, 2, 2, 2), layer_type="basic"),
}


def _peft_conv_a_init(key, shape, dtype=jnp.float32):
  """peft's lora_A init, kaiming_uniform_(a=sqrt(5)) on a conv: U(+-1/sqrt(kh * kw * in))."""
  bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoraConv(nn.Module):
  """Bias-free conv with torch's symmetric k//2 padding and an optional rank-`rank` update.

  y = conv(x, W) + (alpha / r) * conv1x1(conv(dropout(x), A), B): A (kh, kw, in, r) shares the
  base conv's size and stride, B (r, out) starts at zero so training starts at the pretrained net.
  """
  features: int
  kernel_size: int
  strides: int = 1
  rank: int = 0
  alpha: float = 8.0
  dropout: float = 0.0
  dtype: Any = jnp.float32

  def _conv(self, x, kernel):
    p = self.kernel_size // 2
    return jax.lax.conv_general_dilated(
        x, kernel, (self.strides, self.strides), [(p, p), (p, p)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    k, cin = self.kernel_size, x.shape[-1]
    kernel = self.param("kernel", nn.initializers.he_normal(), (k, k, cin, self.features),
                        jnp.float32)
    y = self._conv(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.rank > 0:
      a = self.param(LORA_NAMES[0], _peft_conv_a_init, (k, k, cin, self.rank), jnp.float32)
      b = self.param(LORA_NAMES[1], nn.initializers.zeros, (self.rank, self.features), jnp.float32)
      h = nn.Dropout(self.dropout)(x.astype(jnp.float32), deterministic=deterministic)
      delta = self._conv(h, a) @ b * (self.alpha / self.rank)
      y = (y.astype(jnp.float32) + delta).astype(self.dtype)
    return y


class FrozenBatchNorm(nn.Module):
  """torch BatchNorm2d in eval mode. Running stats are params (they load with the weights) under
  stop_gradient, so no finetune mode moves them; the affine scale and bias train under 'full'."""
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    mean = self.param("running_mean", nn.initializers.zeros, (c,), jnp.float32)
    var = self.param("running_var", nn.initializers.ones, (c,), jnp.float32)
    mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
    mul = scale * jax.lax.rsqrt(var + self.eps)
    return (x * mul.astype(self.dtype) + (bias - mean * mul).astype(self.dtype)).astype(self.dtype)


class ConvLayer(nn.Module):
  """HF ResNetConvLayer / ResNetShortCut: conv -> BN (-> relu)."""
  features: int
  kernel_size: int = 3
  strides: int = 1
  relu: bool = True
  lora: tuple[int, float, float] = (0, 8.0, 0.0)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    x = LoraConv(self.features, self.kernel_size, self.strides, *self.lora, dtype=self.dtype,
                 name="convolution")(x, deterministic)
    x = FrozenBatchNorm(dtype=self.dtype, name="normalization")(x)
    return nn.relu(x) if self.relu else x


class ResidualLayer(nn.Module):
  """Bottleneck (1x1, 3x3, 1x1) or basic (3x3, 3x3) block; LoRA on its convs, not the shortcut."""
  features: int
  strides: int
  bottleneck: bool
  downsample_in_bottleneck: bool
  lora: tuple[int, float, float]
  dtype: Any

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    kw = dict(lora=self.lora, dtype=self.dtype)
    residual = x
    if x.shape[-1] != self.features or self.strides != 1:
      residual = ConvLayer(self.features, 1, self.strides, relu=False, dtype=self.dtype,
                           name="shortcut")(x)
    if self.bottleneck:
      mid, s_first = self.features // 4, self.downsample_in_bottleneck
      x = ConvLayer(mid, 1, self.strides if s_first else 1, name="layer_0", **kw)(x, deterministic)
      x = ConvLayer(mid, 3, 1 if s_first else self.strides, name="layer_1", **kw)(x, deterministic)
      x = ConvLayer(self.features, 1, relu=False, name="layer_2", **kw)(x, deterministic)
    else:
      x = ConvLayer(self.features, 3, self.strides, name="layer_0", **kw)(x, deterministic)
      x = ConvLayer(self.features, 3, relu=False, name="layer_1", **kw)(x, deterministic)
    return nn.relu(x + residual)


class ResNet(tower.Tower):
  """(B, H, W, 3) normalised images -> (pooler_output (B, C), {named intermediates})."""
  cfg: ResNetConfig

  @nn.compact
  def __call__(self, images, train: bool = False):
    cfg, out = self.cfg, {}
    x = ConvLayer(cfg.embedding_size, 7, 2, dtype=self.dtype, name="embedder")(
        images.astype(self.dtype))
    # torch MaxPool2d(3, 2, padding=1) pads with -inf.
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    out["stem"] = x

    def run(block, x):  # `train` is closed over: remat sees a Python constant
      return block(x, deterministic=not train)

    if self.remat != "none":
      run = nn.remat(run, policy=tower.REMAT_POLICIES[self.remat])
    for s, (features, depth) in enumerate(zip(cfg.hidden_sizes, cfg.depths, strict=True)):
      stride = 2 if s > 0 or cfg.downsample_in_first_stage else 1
      for j in range(depth):
        x = run(ResidualLayer(features, stride if j == 0 else 1, cfg.layer_type == "bottleneck",
                              cfg.downsample_in_bottleneck, self.lora, self.dtype,
                              name=f"encoder_stages_{s}_layers_{j}"), x)
      out[f"stage_{s}"] = x
    out["encoded"] = x  # HF last_hidden_state (NHWC here)
    pooled = x.astype(jnp.float32).mean(axis=(1, 2)).astype(self.dtype)
    out["pre_logits"] = pooled
    return pooled, out


# Checkpoint module -> Flax module (hf_io.to_flax_tree). BatchNorm leaves keep their names but
# weight -> scale: bias, running_mean, running_var.
_BLOCK = r"encoder\.stages\.(?P<s>\d+)\.layers\.(?P<j>\d+)"
WEIGHTS = [
    (r".*num_batches_tracked|classifier\..*", None),  # first: the BatchNorm rows would take it
    (r"embedder\.embedder\.(?P<m>convolution|normalization)", "embedder/{m}"),
    (_BLOCK + r"\.shortcut\.(?P<m>convolution|normalization)",
     "encoder_stages_{s}_layers_{j}/shortcut/{m}"),
    (_BLOCK + r"\.layer\.(?P<k>\d)\.(?P<m>convolution|normalization)",
     "encoder_stages_{s}_layers_{j}/layer_{k}/{m}"),
]


def load_hf_resnet(path_or_id: str, **module_kwargs) -> tower.Backbone:
  """Local folder or cached hub id -> (ResNet module, params, native preprocessing).

  >>> module, params, pp = load_hf_resnet("microsoft/resnet-152", dtype=jnp.bfloat16)
  """
  folder, config, tensors = hf_io.read_checkpoint(path_or_id)
  pp = hf_io.read_preprocessing(folder, 224)
  # ConvNextImageProcessor below 384 px: resize the short side to size / crop_pct, crop size.
  pp_cfg = folder / "preprocessor_config.json"
  crop_pct = hf_io.read_json(folder, pp_cfg.name).get("crop_pct") if pp_cfg.exists() else None
  if crop_pct and pp["size"] < 384 and not pp["crop"]:
    pp = {**pp, "size": int(pp["size"] / crop_pct), "crop": pp["size"]}
  # ResNetForImageClassification nests the backbone under `resnet.`.
  params = hf_io.to_flax_tree(tensors, WEIGHTS, strip_prefixes=("resnet.",))
  return tower.Backbone(ResNet(ResNetConfig.from_hf(config), **module_kwargs), params, pp)


def random_preprocessing(cfg: ResNetConfig) -> dict:
  """microsoft/resnet-152's preprocessor_config.json: ImageNet stats, bicubic, 256 -> crop 224."""
  return {"size": 256, "crop": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
          "resample": "bicubic"}


def build(model_config) -> tower.Backbone:
  """Registry entry (tower.build): `config.model.init`, or a random `variant` + `arch`."""
  return tower.build(model_config, load_hf_resnet, ResNet, VARIANTS, "152", random_preprocessing)
