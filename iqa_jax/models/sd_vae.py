"""Stable Diffusion's VAE encoder (diffusers `AutoencoderKL.encode`) in Flax: image -> latent.

The latent is the posterior mean times `scaling_factor` (0.18215 for SD 1.x / 2.x), as SD scales
latents before its UNet. DP-IQA draws `latent_dist.sample()` instead; the SD VAE's posterior std
is tiny, and the mean keeps scoring deterministic. The decoder is not built.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iqa_jax.models.attention import attention
from iqa_jax.models.sd_unet import ResnetBlock2D, checkpoint_tree, conv


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The diffusers AutoencoderKL fields the encoder uses; defaults are SD 2.1's `vae/`."""
  in_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  use_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @classmethod
  def from_hf(cls, cfg: dict) -> VAEConfig:
    if cfg.get("shift_factor") not in (None, 0, 0.0):
      raise ValueError(f"vae/config.json: shift_factor={cfg['shift_factor']} is not supported")
    if any(t != "DownEncoderBlock2D" for t in cfg.get("down_block_types", ())):
      raise ValueError(f"vae/config.json: down_block_types={cfg['down_block_types']} "
                       f"(only DownEncoderBlock2D)")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in names})


class SpatialSelfAttention(nn.Module):
  """The VAE mid-block attention: GroupNorm, one head over all positions, biased q/k/v; residual."""
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="group_norm")(x)
    y = y.reshape(b, h * w, c)
    q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(y) for n in ("to_q", "to_k", "to_v"))
    y = nn.Dense(c, dtype=self.dtype, name="to_out_0")(attention(q, k, v, 1, "xla"))
    return x + y.reshape(b, h, w, c)


class Encoder(nn.Module):
  """diffusers `Encoder` with `double_z`: (B, H, W, 3) in [-1, 1] -> (B, h, w, 2 * latent)."""
  cfg: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg, chans = self.cfg, self.cfg.block_out_channels
    def res(f, name):
      return ResnetBlock2D(f, cfg.norm_num_groups, 1e-6, self.dtype, name=name)
    x = conv(chans[0], 3, "conv_in", self.dtype)(x.astype(self.dtype))
    for i, c in enumerate(chans):
      for j in range(cfg.layers_per_block):
        x = res(c, f"down_blocks_{i}_resnets_{j}")(x)
      if i < len(chans) - 1:
        # diffusers pads right and bottom by one, then a stride-2 valid conv.
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        x = conv(c, 3, f"down_blocks_{i}_downsamplers_0_conv", self.dtype, 2, "VALID")(x)
    x = res(chans[-1], "mid_block_resnets_0")(x)
    if cfg.mid_block_add_attention:
      x = SpatialSelfAttention(cfg.norm_num_groups, self.dtype, name="mid_block_attentions_0")(x)
    x = res(chans[-1], "mid_block_resnets_1")(x)
    x = nn.GroupNorm(cfg.norm_num_groups, epsilon=1e-6, dtype=self.dtype, name="conv_norm_out")(x)
    return conv(2 * cfg.latent_channels, 3, "conv_out", self.dtype)(jax.nn.silu(x))


class VAEEncoder(nn.Module):
  """(B, H, W, 3) images in [-1, 1] -> scaled latent posterior mean (B, H/f, W/f, latent)."""
  cfg: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    moments = Encoder(self.cfg, self.dtype, name="encoder")(images)
    if self.cfg.use_quant_conv:
      moments = conv(moments.shape[-1], 1, "quant_conv", self.dtype)(moments)
    mean = moments[..., :self.cfg.latent_channels]
    return mean * jnp.asarray(self.cfg.scaling_factor, mean.dtype)


# Pre-0.14 diffusers checkpoints (the SD 2.1 `vae/` among them) name the attention projections
# query/key/value/proj_attn; diffusers renames them at load, so do we.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
VAE_JOIN = r"down_blocks_\d+|downsamplers_\d+|mid_block"


def vae_params(tensors: dict[str, np.ndarray]) -> dict:
  """diffusers AutoencoderKL tensors -> params of `VAEEncoder` (decoder tensors are skipped)."""
  renamed = {}
  for name, value in tensors.items():
    module, leaf = name.rsplit(".", 1)
    head, _, last = module.rpartition(".")
    if last in _OLD_ATTENTION_NAMES and ".attentions." in module:
      module = f"{head}.{_OLD_ATTENTION_NAMES[last]}"
      if value.ndim == 4:  # old 1x1-conv projections
        value = value[:, :, 0, 0]
    renamed[f"{module}.{leaf}"] = value
  return checkpoint_tree(renamed, VAE_JOIN, skip=(r"decoder\.", r"post_quant_conv\."))
