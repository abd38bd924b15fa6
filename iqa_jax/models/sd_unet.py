"""Stable Diffusion's UNet (diffusers `UNet2DConditionModel`) in Flax, up to the last up block.

The feature path of CleanDIFT / DP-IQA stops at the up blocks, so `conv_norm_out` and `conv_out`
are not built. Module names follow the diffusers checkpoint with each `.N` folded into its
parent (`down_blocks.0.resnets.1.conv1` -> `down_blocks_0/resnets_1/conv1`), so loading is
`checkpoint_tree`. LoRA sits on `to_q` and `to_k` of every attention, self and cross (§3.1).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iqa_jax.models import hf_io, tower
from iqa_jax.models.attention import attention
from iqa_jax.models.lora import LoraDense


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The diffusers config fields the SD 1.x / 2.x UNets use; defaults are SD 2.1's."""
  in_channels: int = 4
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: Sequence[str] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  layers_per_block: int = 2
  # diffusers' historic naming: `attention_head_dim` holds the number of heads per block
  # (SD 2.1: 5, 10, 20, 20 heads of 64) unless `num_attention_heads` is set.
  attention_head_dim: int | Sequence[int] = (5, 10, 20, 20)
  num_attention_heads: int | Sequence[int] | None = None
  cross_attention_dim: int = 1024
  use_linear_projection: bool = True
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  # Attention scores and softmax in float32 under 16-bit compute (diffusers' default is false;
  # SD 2.1's unet/config.json sets it). Our attention always does this: see `Attention`.
  upcast_attention: bool = False

  # Config values the port does not implement; `from_hf` refuses checkpoints that set them.
  UNSUPPORTED = {
      "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None,
      "time_cond_proj_dim": None, "dual_cross_attention": False, "only_cross_attention": False,
      "resnet_time_scale_shift": "default", "transformer_layers_per_block": 1,
      "mid_block_type": "UNetMidBlock2DCrossAttn", "center_input_sample": False,
      "act_fn": "silu", "time_embedding_type": "positional", "attention_type": "default",
      "conv_in_kernel": 3, "num_class_embeds": None, "time_embedding_act_fn": None,
  }

  @classmethod
  def from_hf(cls, cfg: dict) -> UNetConfig:
    for key, ok in cls.UNSUPPORTED.items():
      if cfg.get(key, ok) != ok:
        raise ValueError(f"unet/config.json: {key}={cfg[key]!r} is not supported (only {ok!r})")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in names})

  def heads(self) -> tuple[int, ...]:
    heads = self.num_attention_heads or self.attention_head_dim
    n = len(self.block_out_channels)
    return tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * n


def conv(features: int, kernel: int, name: str, dtype, strides: int = 1, padding=None):
  """torch Conv2d with symmetric k//2 padding (or an explicit `padding`)."""
  pad = kernel // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), (strides, strides), padding=pad, dtype=dtype,
                 name=name)


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv twice, the time embedding added between; 1x1 shortcut on width change."""
  features: int
  groups: int
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    def norm(name):
      return nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name=name)
    h = conv(self.features, 3, "conv1", self.dtype)(jax.nn.silu(norm("norm1")(x)))
    if temb is not None:
      h = h + nn.Dense(self.features, dtype=self.dtype, name="time_emb_proj")(
          jax.nn.silu(temb))[:, None, None, :]
    h = conv(self.features, 3, "conv2", self.dtype)(jax.nn.silu(norm("norm2")(h)))
    if x.shape[-1] != self.features:
      x = conv(self.features, 1, "conv_shortcut", self.dtype)(x)
    return x + h


class Attention(nn.Module):
  """diffusers `Attention` on tokens: bias-free q/k/v (LoRA on q, k), biased `to_out_0`."""
  heads: int
  lora: tuple[int, float, float]
  attention_impl: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, deterministic: bool = True):
    d = x.shape[-1]
    context = x if context is None else context
    def dense(name):
      return LoraDense(d, *self.lora, use_bias=False, dtype=self.dtype, name=name)
    q = dense("to_q")(x, deterministic)
    k = dense("to_k")(context, deterministic)
    v = nn.Dense(d, use_bias=False, dtype=self.dtype, name="to_v")(context)
    # diffusers' `upcast_attention` (SD 2.1) needs no branch: for bf16 / fp16 inputs,
    # jax.nn.dot_product_attention's XLA path takes q.k with a float32 result, runs the softmax
    # in float32 and casts the probabilities back before they meet v, which is diffusers'
    # `get_attention_scores` with the flag on (tests/test_cleandift.py: bit-identical in bf16).
    # cuDNN's flash attention also accumulates the scores in float32 (not run here: no GPU).
    y = attention(q, k, v.astype(q.dtype), self.heads, self.attention_impl)
    return nn.Dense(d, dtype=self.dtype, name="to_out_0")(y)


class GEGLU(nn.Module):
  """diffusers FeedForward: proj to 2 x 4d, value * gelu(gate) (exact erf gelu), back to d."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    h, gate = jnp.split(nn.Dense(8 * d, dtype=self.dtype, name="proj")(x), 2, axis=-1)
    return h * jax.nn.gelu(gate, approximate=False)


class BasicTransformerBlock(nn.Module):
  """LN -> self-attention, LN -> cross-attention on the prompt, LN -> GEGLU MLP; all residual."""
  heads: int
  lora: tuple[int, float, float]
  attention_impl: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context, deterministic: bool = True):
    kw = dict(heads=self.heads, lora=self.lora, attention_impl=self.attention_impl,
              dtype=self.dtype)
    def ln(name):
      return nn.LayerNorm(1e-5, dtype=self.dtype, name=name)
    x = x + Attention(**kw, name="attn1")(ln("norm1")(x), None, deterministic)
    x = x + Attention(**kw, name="attn2")(ln("norm2")(x), context, deterministic)
    h = GEGLU(self.dtype, name="ff_net_0")(ln("norm3")(x))
    return x + nn.Dense(x.shape[-1], dtype=self.dtype, name="ff_net_2")(h)


class Transformer2D(nn.Module):
  """GroupNorm, proj_in (linear for SD 2.x, 1x1 conv for SD 1.x), one block, proj_out; residual."""
  heads: int
  groups: int
  linear_projection: bool
  lora: tuple[int, float, float]
  attention_impl: str
  remat: str = "none"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context, deterministic: bool = True):
    b, h, w, c = x.shape
    y = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    proj = ((lambda name: nn.Dense(c, dtype=self.dtype, name=name)) if self.linear_projection
            else (lambda name: conv(c, 1, name, self.dtype)))
    y = proj("proj_in")(y).reshape(b, h * w, c)
    block = BasicTransformerBlock
    if self.remat != "none":
      block = nn.remat(block, static_argnums=(3,), policy=tower.REMAT_POLICIES[self.remat])
    y = block(self.heads, self.lora, self.attention_impl, self.dtype,
              name="transformer_blocks_0")(y, context, deterministic)
    return x + proj("proj_out")(y.reshape(b, h, w, c))


def nearest_resize(x, size: tuple[int, int]):
  """torch F.interpolate(mode='nearest', size=size) on NHWC: source index floor(i * in / out)."""
  idx = [np.minimum(np.floor(np.arange(o, dtype=np.float32) * np.float32(i / o)).astype(int),
                    i - 1) for i, o in zip(x.shape[1:3], size, strict=False)]
  return x[:, idx[0]][:, :, idx[1]]


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool, shift: float):
  """diffusers `Timesteps`: sinusoidal features of (B,) timesteps, in float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - shift))
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], -1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], -1)
  return emb


class UNet(nn.Module):
  """(latents NHWC, timesteps (B,), prompt embedding (B, L, D)) -> {feature name: map}.

  Features: `down_i` and `up_i` (each block's output, after its resampler, the taps DP-IQA's
  UNet returns for the up blocks) and `mid`.
  """
  cfg: UNetConfig
  dtype: Any = jnp.float32
  lora_rank: int = 0
  lora_alpha: float = 8.0
  lora_dropout: float = 0.0
  remat: str = "none"  # none | nothing | dots | everything (per resnet and transformer block)
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, latents, timesteps, context, train: bool = False):
    cfg, det = self.cfg, not train
    chans, heads, n = cfg.block_out_channels, cfg.heads(), len(cfg.block_out_channels)
    lora = (self.lora_rank, self.lora_alpha, self.lora_dropout)
    resnet = ResnetBlock2D
    if self.remat != "none":
      resnet = nn.remat(resnet, policy=tower.REMAT_POLICIES[self.remat])

    def res(f, name):
      return resnet(f, cfg.norm_num_groups, cfg.norm_eps, self.dtype, name=name)

    def attn(hd, name):
      return Transformer2D(hd, cfg.norm_num_groups, cfg.use_linear_projection, lora,
                           self.attention_impl, self.remat, self.dtype, name=name)

    context = context.astype(self.dtype)

    temb = timestep_embedding(timesteps, chans[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    temb = nn.Dense(4 * chans[0], dtype=self.dtype, name="time_embedding_linear_1")(temb)
    temb = nn.Dense(4 * chans[0], dtype=self.dtype, name="time_embedding_linear_2")(
        jax.nn.silu(temb))

    x = conv(chans[0], 3, "conv_in", self.dtype)(latents.astype(self.dtype))
    skips, out = [x], {}
    for i, kind in enumerate(cfg.down_block_types):
      p = f"down_blocks_{i}_"
      for j in range(cfg.layers_per_block):
        x = res(chans[i], p + f"resnets_{j}")(x, temb)
        if kind.startswith("CrossAttn"):
          x = attn(heads[i], p + f"attentions_{j}")(x, context, det)
        skips.append(x)
      if i < n - 1:
        x = conv(chans[i], 3, p + "downsamplers_0_conv", self.dtype, strides=2)(x)
        skips.append(x)
      out[f"down_{i}"] = x

    x = res(chans[-1], "mid_block_resnets_0")(x, temb)
    x = attn(heads[-1], "mid_block_attentions_0")(x, context, det)
    x = res(chans[-1], "mid_block_resnets_1")(x, temb)
    out["mid"] = x

    for i, kind in enumerate(cfg.up_block_types):
      p, c = f"up_blocks_{i}_", chans[n - 1 - i]
      for j in range(cfg.layers_per_block + 1):
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = res(c, p + f"resnets_{j}")(x, temb)
        if kind.startswith("CrossAttn"):
          x = attn(heads[n - 1 - i], p + f"attentions_{j}")(x, context, det)
      if i < n - 1:
        # diffusers forwards the skip's size when the latent is not a multiple of 2^(n-1);
        # for multiples it is the same as its 2x nearest upsampling.
        x = nearest_resize(x, skips[-1].shape[1:3])
        x = conv(c, 3, p + "upsamplers_0_conv", self.dtype)(x)
      out[f"up_{i}"] = x
    return out


# Torch containers that are not Flax modules here: a name segment matching this joins the next
# one with "_" (`down_blocks.0.downsamplers.0.conv` -> `down_blocks_0_downsamplers_0_conv`).
UNET_JOIN = r"(down|up)_blocks_\d+|(down|up)samplers_\d+|mid_block|time_embedding|ff"


def checkpoint_tree(tensors: dict[str, np.ndarray], join: str, skip: tuple[str, ...] = (),
                    strip_prefixes: tuple[str, ...] = ()) -> dict:
  """diffusers / transformers tensor names -> nested Flax params. `.N` folds into its module
  (`resnets.1` -> `resnets_1`), segments matching `join` merge with the next, weights convert
  as `hf_io.convert_leaf` does, and embedding tables keep their (vocab, d) layout."""
  renamed = {}
  for name, value in tensors.items():
    for pre in strip_prefixes:
      if name.startswith(pre):
        name = name[len(pre):]
        break
    if any(re.match(rx, name) for rx in skip):
      continue
    module, leaf = name.rsplit(".", 1)
    parts = re.sub(r"\.(\d+)", r"_\1", module).split(".")
    path = [parts[0]]
    for prev, part in zip(parts, parts[1:], strict=False):
      if re.fullmatch(join, prev):
        path[-1] += "_" + part
      else:
        path.append(part)
    renamed["/".join(path) + "." + leaf] = value
  # Module paths are already Flax's: the table only picks how each leaf converts.
  table = [(r"(?P<m>[\w/]+_embedding)\.weight", "{m}/embedding", hf_io.as_is),
           (r"(?P<m>[\w/]+)", "{m}")]
  return hf_io.to_flax_tree(renamed, table)


def unet_params(tensors: dict[str, np.ndarray]) -> dict:
  """diffusers UNet2DConditionModel tensors -> params of `UNet` (the output convs are skipped)."""
  return checkpoint_tree(tensors, UNET_JOIN, skip=(r"conv_norm_out\.", r"conv_out\."))
