"""CLIP vision tower in Flax, loading HF `clip` weights (CLIPModel or CLIPVisionModelWithProjection).

The feature is `image_embeds` = visual_projection(post_layernorm(CLS)) (App. A.1). The paper runs
ViT-L/14 (224 px checkpoint) at 512 px, so the position table is resampled as HF's
`interpolate_pos_encoding=True` does (torch bicubic, align_corners=False).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iqa_jax.models import hf_io, tower
from iqa_jax.models.attention import attention
from iqa_jax.models.lora import LoraDense
from iqa_jax.models.posemb import resample_grid

ACT = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}



@dataclasses.dataclass(frozen=True)
class ClipConfig:
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  patch_size: int = 14
  image_size: int = 224
  projection_dim: int = 768  # 0: no visual_projection (a bare CLIPVisionModel checkpoint)
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"

  @classmethod
  def from_hf(cls, cfg: dict) -> ClipConfig:
    cfg = cfg.get("vision_config", cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in cfg.items() if k in names})


VARIANTS = {
    "l/14@224": ClipConfig(),  # openai/clip-vit-large-patch14
    "l/14@336": ClipConfig(image_size=336),
    "b/16@224": ClipConfig(768, 3072, 12, 12, 16, 224, 512),
    "b/32@224": ClipConfig(768, 3072, 12, 12, 32, 224, 512),
}


class MlpBlock(nn.Module):
  cfg: ClipConfig
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.cfg.intermediate_size, dtype=self.dtype, name="fc1")(x)
    x = ACT[self.cfg.hidden_act](x)
    return nn.Dense(self.cfg.hidden_size, dtype=self.dtype, name="fc2")(x)


class SelfAttention(nn.Module):
  cfg: ClipConfig
  dtype: Any
  lora: tuple[int, float, float]  # rank, alpha, dropout on q/k (§3.1)
  attention_impl: str

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    rank, alpha, dropout = self.lora
    d = self.cfg.hidden_size
    q = LoraDense(d, rank, alpha, dropout, dtype=self.dtype, name="q_proj")(x, deterministic)
    k = LoraDense(d, rank, alpha, dropout, dtype=self.dtype, name="k_proj")(x, deterministic)
    v = nn.Dense(d, dtype=self.dtype, name="v_proj")(x)
    y = attention(q, k, v, self.cfg.num_attention_heads, self.attention_impl)
    return nn.Dense(d, dtype=self.dtype, name="out_proj")(y)


class EncoderLayer(nn.Module):
  """Pre-LN block; returns (x, x) so nn.scan can stack per-layer outputs."""
  cfg: ClipConfig
  dtype: Any
  lora: tuple[int, float, float]
  attention_impl: str

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    eps = self.cfg.layer_norm_eps
    y = nn.LayerNorm(eps, dtype=self.dtype, name="layer_norm1")(x)
    x = x + SelfAttention(self.cfg, self.dtype, self.lora, self.attention_impl,
                          name="self_attn")(y, deterministic)
    y = nn.LayerNorm(eps, dtype=self.dtype, name="layer_norm2")(x)
    x = x + MlpBlock(self.cfg, self.dtype, name="mlp")(y)
    return x, x


class ClipVision(nn.Module):
  """(B, H, W, 3) normalised images -> (image_embeds, {named intermediates})."""
  cfg: ClipConfig
  dtype: Any = jnp.float32
  lora_rank: int = 0
  lora_alpha: float = 8.0
  lora_dropout: float = 0.0
  remat: str = "none"  # none | nothing | dots | everything
  scan: bool = True
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, images, train: bool = False):
    cfg, out = self.cfg, {}
    p, d = cfg.patch_size, cfg.hidden_size
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                name="embeddings_patch_embedding")(images.astype(self.dtype))
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh * gw, d)
    cls = self.param("embeddings_class_embedding", nn.initializers.normal(1.0), (d,), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), x], axis=1)
    native = cfg.image_size // p
    posemb = self.param("embeddings_position_embedding", nn.initializers.normal(0.02),
                        (native * native + 1, d), jnp.float32)
    posemb = jnp.concatenate([posemb[:1], resample_grid(posemb[1:], (native, native), (gh, gw))])
    x = x + posemb.astype(self.dtype)[None]
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)

    lora = (self.lora_rank, self.lora_alpha, self.lora_dropout)
    layer = EncoderLayer
    if self.remat != "none":
      layer = nn.remat(layer, prevent_cse=not self.scan, static_argnums=(2,),
                       policy=tower.REMAT_POLICIES[self.remat])
    deterministic = not train
    if self.scan:
      layers = nn.scan(layer, variable_axes={"params": 0},
                       split_rngs={"params": True, "dropout": True},
                       in_axes=nn.broadcast, length=cfg.num_hidden_layers)
      x, per_layer = layers(cfg, self.dtype, lora, self.attention_impl, name="encoder_layers")(
          x, deterministic)
      out["layers"] = per_layer  # (depth, B, T, D)
    else:
      for i in range(cfg.num_hidden_layers):
        x, y = layer(cfg, self.dtype, lora, self.attention_impl, name=f"encoder_layers_{i}")(
            x, deterministic)
        out[f"layer_{i}"] = y
    out["encoded"] = x  # HF last_hidden_state: post_layernorm touches only the pooled CLS
    pooled = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(x[:, 0])
    out["pooler_output"] = pooled
    if cfg.projection_dim:
      pooled = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype,
                        name="visual_projection")(pooled)
    out["pre_logits"] = pooled
    return pooled, out


# HF module -> Flax module. `{i}` layers are stacked for nn.scan.
RENAMES = [
    (r"embeddings\.patch_embedding", "embeddings_patch_embedding"),
    (r"pre_layrnorm", "pre_layrnorm"),
    (r"encoder\.layers\.{i}\.(?P<ln>layer_norm[12])", "encoder_layers/{ln}"),
    (r"encoder\.layers\.{i}\.self_attn\.(?P<proj>[qkv]_proj|out_proj)",
     "encoder_layers/self_attn/{proj}"),
    (r"encoder\.layers\.{i}\.mlp\.(?P<fc>fc[12])", "encoder_layers/mlp/{fc}"),
    (r"post_layernorm", "post_layernorm"),
    (r"visual_projection", "visual_projection"),
]


def _special(name: str, value: np.ndarray):
  if name == "embeddings.class_embedding":
    return [("embeddings_class_embedding", value)]
  if name == "embeddings.position_embedding.weight":
    return [("embeddings_position_embedding", value)]
  return None


def hf_params(tensors: dict[str, np.ndarray]) -> dict:
  """HF CLIPModel / CLIPVisionModel(WithProjection) tensors -> Flax params of `ClipVision`."""
  return hf_io.to_flax_tree(tensors, RENAMES, special=_special, strip_prefixes=("vision_model.",),
                            skip=(r"text_model\.", r"text_projection", r"logit_scale",
                                  r"embeddings\.position_ids"))


def load_hf_clip(path_or_id: str, **module_kwargs):
  """Local folder or cached hub id -> (ClipVision module, params, native preprocessing).

  >>> module, params, pp = load_hf_clip("openai/clip-vit-large-patch14", dtype=jnp.bfloat16)
  """
  folder = hf_io.resolve_checkpoint(path_or_id)
  tensors = hf_io.read_safetensors(folder)
  cfg = ClipConfig.from_hf(hf_io.read_json(folder, "config.json"))
  # The projection width is the tensor's, not the (sometimes stale) nested config field.
  proj = tensors.get("visual_projection.weight")
  cfg = dataclasses.replace(cfg, projection_dim=0 if proj is None else proj.shape[0])
  module = ClipVision(cfg, **module_kwargs)
  params = hf_params(tensors)
  if not module.scan:
    params = tower.unscan(params, cfg.num_hidden_layers, "encoder_layers")
  return module, params, hf_io.read_preprocessing(folder, cfg.image_size)


def build(model_config):
  """Registry entry: config.model -> Backbone. `init=None`: random tower of `variant` + `arch`."""
  from iqa_jax.models.model import Backbone
  kwargs = dict(
      **tower.tower_kwargs(model_config),
  )
  if model_config.get("init"):
    return Backbone(*load_hf_clip(model_config.init, **kwargs))
  cfg = tower.variant_config(model_config, VARIANTS, "l/14@224")
  # OpenAI CLIP's normalisation (preprocessor_config.json of openai/clip-vit-large-patch14).
  pp = {"size": cfg.image_size, "crop": cfg.image_size,
        "mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711),
        "resample": "bicubic"}
  return Backbone(ClipVision(cfg, **kwargs), None, pp)
