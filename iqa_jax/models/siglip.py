"""SigLIP / SigLIP2 (fixed resolution) vision tower in Flax, loading HF `siglip` weights.

Module names follow the HF checkpoint so loading is a short weight table. The image feature is
the MAP-pooled output (App. A.1: image_embeds of SigLIP is the pooler output). The blocks here
are the HF ViT blocks that CLIP and SigLIP2 NaFlex import: an optional key `mask` (NaFlex
padding) is their only difference.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from iqa_jax.models import hf_io, tower
from iqa_jax.models.attention import attention
from iqa_jax.models.lora import LoraDense
from iqa_jax.models.posemb import resample_grid


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_hidden_layers: int = 27
  num_attention_heads: int = 16
  patch_size: int = 16
  image_size: int = 512
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"
  vision_use_head: bool = True

  @classmethod
  def from_hf(cls, cfg: dict) -> SiglipConfig:
    return cls(**tower.fields_from(cls, cfg.get("vision_config", cfg)))


# Variants are data (big_vision style): name -> config of the released checkpoints.
VARIANTS = {
    "so400m/16@512": SiglipConfig(),
    "so400m/14@384": SiglipConfig(patch_size=14, image_size=384),
    "b/16@224": SiglipConfig(768, 3072, 12, 12, 16, 224),
    "l/16@256": SiglipConfig(1024, 4096, 24, 16, 16, 256),
}


class SelfAttention(nn.Module):
  """q, k (with LoRA), v, out_proj; `mask` (B, 1, 1, T) hides keys (NaFlex padding)."""
  cfg: Any  # hidden_size, num_attention_heads: SiglipConfig, ClipConfig or NaflexConfig
  dtype: Any
  lora: tuple[int, float, float]  # rank, alpha, dropout on q/k (§3.1)
  attention_impl: str

  @nn.compact
  def __call__(self, x, mask=None, *, deterministic: bool = True):
    rank, alpha, dropout = self.lora
    d = self.cfg.hidden_size
    q = LoraDense(d, rank, alpha, dropout, dtype=self.dtype, name="q_proj")(x, deterministic)
    k = LoraDense(d, rank, alpha, dropout, dtype=self.dtype, name="k_proj")(x, deterministic)
    v = nn.Dense(d, dtype=self.dtype, name="v_proj")(x)
    y = attention(q, k, v, self.cfg.num_attention_heads, self.attention_impl, mask=mask)
    return nn.Dense(d, dtype=self.dtype, name="out_proj")(y)


class EncoderLayer(nn.Module):
  """Pre-LN transformer block: x + attn(layer_norm1 x); x + mlp(layer_norm2 x)."""
  cfg: Any  # SiglipConfig, ClipConfig or NaflexConfig
  dtype: Any
  lora: tuple[int, float, float]
  attention_impl: str

  @nn.compact
  def __call__(self, x, mask=None, *, deterministic: bool = True):
    cfg = self.cfg
    y = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="layer_norm1")(x)
    x = x + SelfAttention(cfg, self.dtype, self.lora, self.attention_impl, name="self_attn")(
        y, mask, deterministic=deterministic)
    y = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="layer_norm2")(x)
    return x + tower.MlpBlock(cfg.intermediate_size, cfg.hidden_act, self.dtype, name="mlp")(y)


class MAPHead(nn.Module):
  """Multihead attention pooling with a learned probe (torch.nn.MultiheadAttention layout)."""
  cfg: Any  # SiglipConfig or NaflexConfig
  dtype: Any

  @nn.compact
  def __call__(self, x, mask=None):
    cfg, d = self.cfg, self.cfg.hidden_size
    probe = self.param("probe", nn.initializers.normal(1.0), (1, 1, d), jnp.float32)
    probe = jnp.broadcast_to(probe, (x.shape[0], 1, d)).astype(self.dtype)
    q = nn.Dense(d, dtype=self.dtype, name="q")(probe)
    k = nn.Dense(d, dtype=self.dtype, name="k")(x)
    v = nn.Dense(d, dtype=self.dtype, name="v")(x)
    # One query: cuDNN flash attention does not take it (anchors README), so XLA here.
    y = attention(q, k, v, cfg.num_attention_heads, "xla", mask=mask)
    y = nn.Dense(d, dtype=self.dtype, name="out_proj")(y)
    z = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="layernorm")(y)
    y = y + tower.MlpBlock(cfg.intermediate_size, cfg.hidden_act, self.dtype, name="mlp")(z)
    return y[:, 0]


class SiglipVision(tower.TransformerTower):
  """(B, H, W, 3) normalised images -> (pooled feature, {named intermediates})."""
  cfg: SiglipConfig

  @nn.compact
  def __call__(self, images, train: bool = False):
    cfg = self.cfg
    x, (gh, gw) = tower.embed_patches(images, cfg.hidden_size, cfg.patch_size, self.dtype,
                                      "embeddings_patch_embedding")
    native = cfg.image_size // cfg.patch_size
    posemb = self.param("embeddings_position_embedding", nn.initializers.normal(0.02),
                        (native * native, cfg.hidden_size), jnp.float32)
    x = x + resample_grid(posemb, (native, native), (gh, gw)).astype(self.dtype)[None]

    layer = functools.partial(EncoderLayer, cfg, self.dtype, self.lora, self.attention_impl)
    x, out = self.encoder(layer, cfg.num_hidden_layers, "encoder_layers")(
        x, deterministic=not train)
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(x)
    out["encoded"] = x
    if cfg.vision_use_head:
      pooled = MAPHead(cfg, self.dtype, name="head")(x)
    else:
      pooled = x.mean(axis=1)
    out["pre_logits"] = pooled
    return pooled, out


# The weight table's `EncoderLayer` rows (hf_io.to_flax_tree), which CLIP's table takes too.
ENCODER_WEIGHTS = [
    (r"encoder\.layers\.{i}\.(?P<m>layer_norm[12])", "encoder_layers/{m}"),
    (r"encoder\.layers\.{i}\.self_attn\.(?P<m>[qkv]_proj|out_proj)",
     "encoder_layers/self_attn/{m}"),
    (r"encoder\.layers\.{i}\.mlp\.(?P<m>fc[12])", "encoder_layers/mlp/{m}"),
]

# SigLIP2 NaFlex loads with the same table.
WEIGHTS = [
    (r"embeddings\.patch_embedding", "embeddings_patch_embedding"),
    (r"embeddings\.position_embedding\.weight", "embeddings_position_embedding", hf_io.as_is),
    *ENCODER_WEIGHTS,
    (r"post_layernorm", "post_layernorm"),
    (r"head\.probe", "head/probe", hf_io.as_is),
    (r"head\.attention\.in_proj_(?P<leaf>weight|bias)", "head", hf_io.split("q", "k", "v")),
    (r"head\.attention\.out_proj", "head/out_proj"),
    (r"head\.layernorm", "head/layernorm"),
    (r"head\.mlp\.(?P<m>fc[12])", "head/mlp/{m}"),
    (r"text_model\..*|logit_scale|logit_bias", None),  # a full SiglipModel's text side
]


def hf_params(tensors: dict[str, np.ndarray]) -> dict:
  """HF SiglipVisionModel / SiglipModel tensors -> Flax params of `SiglipVision` (scan layout)."""
  return hf_io.to_flax_tree(tensors, WEIGHTS, strip_prefixes=("vision_model.",))


def load_hf_siglip(path_or_id: str, **module_kwargs) -> tower.Backbone:
  """Local folder or cached hub id -> (SiglipVision module, params, native preprocessing).

  >>> module, params, pp = load_hf_siglip("google/siglip2-so400m-patch16-512", dtype=jnp.bfloat16)
  """
  folder, config, tensors = hf_io.read_checkpoint(path_or_id)
  cfg = SiglipConfig.from_hf(config)
  module = SiglipVision(cfg, **module_kwargs)
  params = tower.in_layout(hf_params(tensors), module.scan, "encoder_layers")
  return tower.Backbone(module, params, hf_io.read_preprocessing(folder, cfg.image_size))


def random_preprocessing(cfg: SiglipConfig) -> dict:
  """The released checkpoints' recipe (preprocessor_config.json), for a random tower."""
  return {"size": cfg.image_size, "crop": None, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
          "resample": "bilinear"}


def build(model_config) -> tower.Backbone:
  """Registry entry (tower.build): `config.model.init`, or a random `variant` + `arch`."""
  return tower.build(model_config, load_hf_siglip, SiglipVision, VARIANTS, "so400m/16@512",
                     random_preprocessing)
