"""CLIP vision tower in Flax, loading HF `clip` weights (CLIPModel, CLIPVisionModelWithProjection).

The feature is `image_embeds` = visual_projection(post_layernorm(CLS)) (App. A.1). The paper runs
ViT-L/14 (224 px checkpoint) at 512 px, so the position table is resampled as HF's
`interpolate_pos_encoding=True` does (torch bicubic, align_corners=False).
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax.numpy as jnp

from iqa_jax.models import hf_io, siglip, tower
from iqa_jax.models.posemb import resample_grid


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
    return cls(**tower.fields_from(cls, cfg.get("vision_config", cfg)))


VARIANTS = {
    "l/14@224": ClipConfig(),  # openai/clip-vit-large-patch14
    "l/14@336": ClipConfig(image_size=336),
    "b/16@224": ClipConfig(768, 3072, 12, 12, 16, 224, 512),
    "b/32@224": ClipConfig(768, 3072, 12, 12, 32, 224, 512),
}


class ClipVision(tower.TransformerTower):
  """(B, H, W, 3) normalised images -> (image_embeds, {named intermediates}).

  The blocks are SigLIP's (`siglip.EncoderLayer`: the HF names are the same); CLIP adds a CLS
  token, a LayerNorm before the blocks and a projection after them.
  """
  cfg: ClipConfig

  @nn.compact
  def __call__(self, images, train: bool = False):
    cfg = self.cfg
    p, d = cfg.patch_size, cfg.hidden_size
    x, (gh, gw) = tower.embed_patches(images, d, p, self.dtype, "embeddings_patch_embedding",
                                      use_bias=False)
    cls = self.param("embeddings_class_embedding", nn.initializers.normal(1.0), (d,), jnp.float32)
    x = tower.prepend(x, cls)
    native = cfg.image_size // p
    posemb = self.param("embeddings_position_embedding", nn.initializers.normal(0.02),
                        (native * native + 1, d), jnp.float32)
    posemb = jnp.concatenate([posemb[:1], resample_grid(posemb[1:], (native, native), (gh, gw))])
    x = x + posemb.astype(self.dtype)[None]
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)

    layer = functools.partial(siglip.EncoderLayer, cfg, self.dtype, self.lora,
                              self.attention_impl)
    x, out = self.encoder(layer, cfg.num_hidden_layers, "encoder_layers")(
        x, deterministic=not train)
    out["encoded"] = x  # HF last_hidden_state: post_layernorm touches only the pooled CLS
    pooled = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(x[:, 0])
    out["pooler_output"] = pooled
    if cfg.projection_dim:
      pooled = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype,
                        name="visual_projection")(pooled)
    out["pre_logits"] = pooled
    return pooled, out


# The weight table (hf_io.to_flax_tree); the blocks are SigLIP's.
WEIGHTS = [
    (r"embeddings\.patch_embedding", "embeddings_patch_embedding"),
    (r"embeddings\.class_embedding", "embeddings_class_embedding", hf_io.as_is),
    (r"embeddings\.position_embedding\.weight", "embeddings_position_embedding", hf_io.as_is),
    (r"pre_layrnorm", "pre_layrnorm"),
    *siglip.ENCODER_WEIGHTS,
    (r"post_layernorm", "post_layernorm"),
    (r"visual_projection", "visual_projection"),
    (r"text_model\..*|text_projection\..*|logit_scale|embeddings\.position_ids", None),
]


def load_hf_clip(path_or_id: str, **module_kwargs) -> tower.Backbone:
  """Local folder or cached hub id -> (ClipVision module, params, native preprocessing).

  >>> module, params, pp = load_hf_clip("openai/clip-vit-large-patch14", dtype=jnp.bfloat16)
  """
  folder, config, tensors = hf_io.read_checkpoint(path_or_id)
  # The projection width is the tensor's, not the (sometimes stale) nested config field.
  proj = tensors.get("visual_projection.weight")
  cfg = dataclasses.replace(ClipConfig.from_hf(config),
                            projection_dim=0 if proj is None else proj.shape[0])
  module = ClipVision(cfg, **module_kwargs)
  # CLIPModel nests the tower under vision_model; CLIPVisionModel(WithProjection) does not.
  params = hf_io.to_flax_tree(tensors, WEIGHTS, strip_prefixes=("vision_model.",))
  params = tower.in_layout(params, module.scan, "encoder_layers")
  return tower.Backbone(module, params, hf_io.read_preprocessing(folder, cfg.image_size))


def random_preprocessing(cfg: ClipConfig) -> dict:
  """OpenAI CLIP's recipe (preprocessor_config.json of openai/clip-vit-large-patch14)."""
  return {"size": cfg.image_size, "crop": cfg.image_size,
          "mean": (0.48145466, 0.4578275, 0.40821073),
          "std": (0.26862954, 0.26130258, 0.27577711), "resample": "bicubic"}


def build(model_config) -> tower.Backbone:
  """Registry entry (tower.build): `config.model.init`, or a random `variant` + `arch`."""
  return tower.build(model_config, load_hf_clip, ClipVision, VARIANTS, "l/14@224",
                     random_preprocessing)
