"""CleanDIFT (Stable Diffusion 2.1) with the DP-IQA feature adapter: image -> one vector (App. A.1).

The feature path, and where each choice comes from:
- VAE encoder: image in [-1, 1] -> latent posterior mean x 0.18215 (`sd_vae.py`). Frozen in
  every fine-tuning mode, as DP-IQA freezes its VAE (`vae.requires_grad_(False)`).
- UNet on the clean latent (`sd_unet.py`), no noise added: CleanDIFT's point is that its
  fine-tuned UNet reads clean latents. Timestep `timestep` (default 261): CleanDIFT's training
  code conditions its clean UNet on one timestep parameter initialised at `t_init=261` (also its
  `val_t`); DP-IQA passes t=1. Prompt: the empty prompt, encoded once by the checkpoint's CLIP
  text encoder at load time (CleanDIFT's `_empty_prompt_embeds` when `use_text_condition` is
  off) and kept as a frozen parameter `prompt_embedding`; the text tower is not part of the model.
- Taps: the outputs of the UNet's up blocks (after their upsamplers), the four maps DP-IQA's UNet
  returns; `blocks` picks which, in DP-IQA's decoder order (3, 2, 1, 0) by default.
- Adapter (`FeatureAdapter`): DP-IQA's QualityFeatureDecoder up to its MLP. Each tap is resized
  to `grid` x `grid` (bicubic, 64 in DP-IQA), mapped by a 3x3 conv to `width` channels (512) with
  squeeze-excitation (reduction 16), concatenated, fused by a 3x3 conv + SE, reduced by 1x1 convs
  512 -> 128 -> 32 -> 8 with ReLU, and flattened (8 x 64 x 64). DP-IQA's fc 32768 -> 512 -> 512
  -> 1 is the paper's d -> 512 -> 512 -> 1 head, so the head follows the flattened map.
  `pool='mean'` takes the global mean of the fused map instead (a `width`-d vector).
The adapter is new: its parameters train with the head in every fine-tuning mode.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iqa_jax.models import hf_io, tower
from iqa_jax.models.attention import attention
from iqa_jax.models.posemb import torch_bicubic_matrix
from iqa_jax.models.sd_unet import UNet, UNetConfig, checkpoint_tree, unet_params
from iqa_jax.models.sd_vae import VAEConfig, VAEEncoder, vae_params


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """transformers CLIPTextConfig fields; defaults are SD 2.1's `text_encoder/` (OpenCLIP ViT-H
  with its last layer dropped: 23 layers)."""
  vocab_size: int = 49408
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 23
  num_attention_heads: int = 16
  max_position_embeddings: int = 77
  layer_norm_eps: float = 1e-5
  hidden_act: str = "gelu"

  @classmethod
  def from_hf(cls, cfg: dict) -> TextConfig:
    cfg = cfg.get("text_config", cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in cfg.items() if k in names})


class ClipTextLayer(nn.Module):
  """Pre-LN causal self-attention + MLP (transformers CLIPEncoderLayer)."""
  cfg: TextConfig

  @nn.compact
  def __call__(self, x):
    cfg, d = self.cfg, self.cfg.hidden_size
    y = nn.LayerNorm(cfg.layer_norm_eps, name="layer_norm1")(x)
    q, k, v = (nn.Dense(d, name=f"self_attn_{n}_proj")(y) for n in "qkv")
    causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))[None, None]
    y = attention(q, k, v, cfg.num_attention_heads, "xla", mask=causal)
    x = x + nn.Dense(d, name="self_attn_out_proj")(y)
    y = nn.LayerNorm(cfg.layer_norm_eps, name="layer_norm2")(x)
    y = nn.Dense(cfg.intermediate_size, name="mlp_fc1")(y)
    return x + nn.Dense(d, name="mlp_fc2")(tower.ACTIVATIONS[cfg.hidden_act](y))


class ClipTextEncoder(nn.Module):
  """Token ids (B, L) -> last_hidden_state (B, L, d), final layer norm applied: SD's prompt
  embedding (`encode_prompt` without clip_skip and without an attention mask)."""
  cfg: TextConfig

  @nn.compact
  def __call__(self, ids):
    cfg = self.cfg
    x = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="embeddings_token_embedding")(ids)
    pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                   name="embeddings_position_embedding")(jnp.arange(ids.shape[1]))
    x = x + pos[None]
    for i in range(cfg.num_hidden_layers):
      x = ClipTextLayer(cfg, name=f"encoder_layers_{i}")(x)
    return nn.LayerNorm(cfg.layer_norm_eps, name="final_layer_norm")(x)


# transformers names: `text_model.encoder.layers.0.self_attn.q_proj` ->
# encoder_layers_0/self_attn_q_proj.
TEXT_JOIN = r"embeddings|encoder|self_attn|mlp"


def text_params(tensors: dict[str, np.ndarray]) -> dict:
  """transformers CLIPTextModel tensors -> params of `ClipTextEncoder`."""
  return checkpoint_tree(tensors, TEXT_JOIN, strip_prefixes=("text_model.",),
                         skip=(r".*position_ids$", r"text_projection\."))


def prompt_token_ids(folder, prompt: str) -> np.ndarray:
  """SD's `encode_prompt` tokenisation: padded to the tokenizer's max length, truncated.

  The empty prompt needs only the special tokens, read from `tokenizer/` (hub layout: vocab.json
  and special_tokens_map.json; transformers 5 layout: tokenizer.json); other prompts go through
  transformers' CLIPTokenizer.
  """
  tok = folder / "tokenizer"
  if not (tok / "tokenizer_config.json").is_file():
    raise _missing(folder, "tokenizer/tokenizer_config.json")
  cfg = hf_io.read_json(tok, "tokenizer_config.json")
  max_len = int(cfg.get("model_max_length", 77))
  if prompt:
    from transformers import CLIPTokenizer
    ids = CLIPTokenizer.from_pretrained(str(tok))(
        prompt, padding="max_length", max_length=max_len, truncation=True).input_ids
    return np.asarray([ids], np.int32)
  if (tok / "special_tokens_map.json").exists():
    cfg = {**cfg, **hf_io.read_json(tok, "special_tokens_map.json")}
  vocab = (hf_io.read_json(tok, "vocab.json") if (tok / "vocab.json").exists()
           else hf_io.read_json(tok, "tokenizer.json")["model"]["vocab"])
  def token(key):
    return vocab[cfg[key]["content"] if isinstance(cfg[key], dict) else cfg[key]]
  ids = [token("bos_token"), token("eos_token")]
  ids += [token("pad_token")] * (max_len - len(ids))
  return np.asarray([ids], np.int32)


class SqueezeExcite(nn.Module):
  """DP-IQA's SELayer: channel gates from the global mean, c -> c/16 -> c, no biases."""
  reduction: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    s = x.astype(jnp.float32).mean(axis=(1, 2)).astype(self.dtype)
    s = nn.relu(nn.Dense(c // self.reduction, use_bias=False, dtype=self.dtype, name="fc_0")(s))
    s = jax.nn.sigmoid(nn.Dense(c, use_bias=False, dtype=self.dtype, name="fc_2")(s))
    return x * s[:, None, None, :]


def bicubic_resize(x, size: tuple[int, int]):
  """torch F.interpolate(mode='bicubic', align_corners=False) on NHWC, as DP-IQA resizes taps."""
  mh = jnp.asarray(torch_bicubic_matrix(x.shape[1], size[0]), jnp.float32)
  mw = jnp.asarray(torch_bicubic_matrix(x.shape[2], size[1]), jnp.float32)
  y = jnp.einsum("oh,bhwc,pw->bopc", mh, x.astype(jnp.float32), mw)
  return y.astype(x.dtype)


class FeatureAdapter(nn.Module):
  """Multi-scale UNet maps -> one fixed-length vector (DP-IQA's decoder up to its MLP)."""
  width: int = 512
  grid: int = 64
  score_channels: tuple[int, ...] = (128, 32, 8)
  pool: str = "flatten"  # flatten (DP-IQA: 8 x grid^2) | mean (global mean of the fused map)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, taps):
    def conv(c, k, name):
      return nn.Conv(c, (k, k), padding=k // 2, dtype=self.dtype, name=name)
    maps = []
    for i, x in enumerate(taps):
      x = conv(self.width, 3, f"conv_{i}")(bicubic_resize(x, (self.grid, self.grid)))
      maps.append(SqueezeExcite(dtype=self.dtype, name=f"se_{i}")(x))
    x = conv(self.width, 3, "fuse_conv")(jnp.concatenate(maps, axis=-1))
    x = SqueezeExcite(dtype=self.dtype, name="se_fuse")(x)
    if self.pool == "mean":
      return x.astype(jnp.float32).mean(axis=(1, 2))
    if self.pool != "flatten":
      raise ValueError(f"config.model.adapter.pool must be flatten|mean, got {self.pool!r}")
    for j, c in enumerate(self.score_channels):
      x = nn.relu(conv(c, 1, f"score_{j}")(x))
    # DP-IQA flattens NCHW; the same order keeps its fc1 loadable into our head.
    return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1).astype(jnp.float32)


class CleanDIFT(nn.Module):
  """(B, H, W, 3) images in [-1, 1] -> (adapter vector, {latents, UNet block maps})."""
  unet_cfg: UNetConfig
  vae_cfg: VAEConfig
  prompt_shape: tuple[int, int] = (77, 1024)
  timestep: float = 261.0
  blocks: tuple[int, ...] = (3, 2, 1, 0)
  adapter: dict = dataclasses.field(default_factory=dict)  # FeatureAdapter fields
  dtype: Any = jnp.float32
  lora_rank: int = 0
  lora_alpha: float = 8.0
  lora_dropout: float = 0.0
  remat: str = "none"
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, images, train: bool = False):
    latents = VAEEncoder(self.vae_cfg, self.dtype, name="vae")(images)
    latents = jax.lax.stop_gradient(latents)  # DP-IQA: the VAE stays frozen
    prompt = self.param("prompt_embedding", nn.initializers.normal(1.0),
                        (1, *self.prompt_shape), jnp.float32)
    prompt = jax.lax.stop_gradient(prompt)  # a constant of the checkpoint, never trained
    b = images.shape[0]
    out = UNet(self.unet_cfg, self.dtype, self.lora_rank, self.lora_alpha, self.lora_dropout,
               self.remat, self.attention_impl, name="unet")(
        latents, jnp.full((b,), self.timestep, jnp.float32),
        jnp.broadcast_to(prompt, (b, *self.prompt_shape)), train)
    feature = FeatureAdapter(**dict(self.adapter), dtype=self.dtype, name="adapter")(
        [out[f"up_{i}"] for i in self.blocks])
    out = {"latents": latents, **out, "pre_logits": feature}
    return feature, out


@dataclasses.dataclass(frozen=True)
class Variant:
  unet: UNetConfig
  vae: VAEConfig
  text: TextConfig


VARIANTS = {
    # stabilityai/stable-diffusion-2-1
    "sd2.1": Variant(UNetConfig(upcast_attention=True), VAEConfig(), TextConfig()),
    "sd1.5": Variant(UNetConfig(attention_head_dim=8, cross_attention_dim=768,
                                use_linear_projection=False), VAEConfig(),
                     TextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, hidden_act="quick_gelu")),
}


# The weights file of each component in a diffusers repo; the hub repos also hold `*.fp16.*`
# variants of the same tensors (read only when the full-precision file is absent).
WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
           "text_encoder": "model"}
LAYOUT = "unet/, vae/, text_encoder/ (config.json + *.safetensors each) and tokenizer/"


def _missing(folder, what: str) -> hf_io.CheckpointNotFoundError:
  return hf_io.CheckpointNotFoundError(
      f"{folder} has no {what}: config.model.init must be a diffusers Stable Diffusion folder "
      f"with {LAYOUT}, e.g. `huggingface-cli download stabilityai/stable-diffusion-2-1` "
      f"(docs/backbones.md, CleanDIFT)")


def _read_weights(sub, stem: str = "diffusion_pytorch_model") -> dict[str, np.ndarray] | None:
  """The component's tensors: `stem`.safetensors, else its fp16 variant, else the shards its
  index names; None when there are none."""
  for file in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
    if (sub / file).is_file():
      return hf_io.read_safetensors(sub, [file])
  index = sub / f"{stem}.safetensors.index.json"
  if index.is_file():
    return hf_io.read_safetensors(sub, sorted(set(json.loads(index.read_text())["weight_map"]
                                                  .values())))
  return None


def _read_component(folder, name: str, weights: bool = True
                    ) -> tuple[dict, dict[str, np.ndarray] | None]:
  """`folder/name`'s config.json and (with `weights`) tensors; one line naming what is missing."""
  sub = folder / name
  if not (sub / "config.json").is_file():
    raise _missing(folder, f"{name}/config.json" if sub.is_dir() else f"{name}/ folder")
  if not weights:
    return hf_io.read_json(sub, "config.json"), None
  tensors = _read_weights(sub, WEIGHTS[name])
  if tensors is None:
    raise _missing(folder, f"{name}/{WEIGHTS[name]}.safetensors")
  return hf_io.read_json(sub, "config.json"), tensors


def encode_prompt(folder, prompt: str = "") -> np.ndarray:
  """The checkpoint's CLIP text encoder on `prompt` -> (1, 77, d) prompt embedding, on the host."""
  cfg, tensors = _read_component(folder, "text_encoder")
  text_cfg = TextConfig.from_hf(cfg)
  ids = prompt_token_ids(folder, prompt)
  params = text_params(tensors)
  return np.asarray(jax.jit(ClipTextEncoder(text_cfg).apply)({"params": params}, ids))


def read_unet_override(unet: str) -> dict[str, np.ndarray]:
  """A CleanDIFT UNet: a diffusers UNet folder, a .safetensors file, or `hub_id:file` from the
  local cache (CompVis/cleandift ships `cleandift_sd21_unet.safetensors`, a diffusers state
  dict)."""
  from pathlib import Path
  path = Path(unet).expanduser()
  if path.is_file():
    return hf_io.read_safetensors(path.parent, [path.name])
  if ":" in unet and not path.exists():
    repo, file = unet.split(":", 1)
    try:
      from huggingface_hub import hf_hub_download
      path = Path(hf_hub_download(repo, file, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any hub failure means "not in the cache"
      raise hf_io.CheckpointNotFoundError(
          f"config.model.unet_init={unet!r} is not in the Hugging Face cache "
          f"({type(e).__name__}); run `huggingface-cli download {repo} {file}` on a connected "
          f"machine, or pass the .safetensors path") from e
    return hf_io.read_safetensors(path.parent, [path.name])
  folder = hf_io.resolve_checkpoint(unet)
  tensors = _read_weights(folder)
  if tensors is None:
    raise hf_io.CheckpointNotFoundError(
        f"config.model.unet_init={unet!r}: {folder} has no diffusion_pytorch_model.safetensors; "
        f"pass a diffusers UNet folder, a .safetensors file or hub_id:file")
  return tensors


def load_cleandift(path_or_id: str, unet: str | None = None, prompt: str = "", **module_kwargs):
  """SD folder or cached hub id (unet/, vae/, text_encoder/, tokenizer/) -> (module, params, pp).

  `unet` replaces the weights of `unet/` (same architecture): see `read_unet_override`.
  >>> module, params, pp = load_cleandift("stabilityai/stable-diffusion-2-1",
  ...     unet="CompVis/cleandift:cleandift_sd21_unet.safetensors")
  """
  folder = hf_io.resolve_checkpoint(path_or_id)
  # With a CleanDIFT UNet, unet/ needs only its config.json (its 3.5 GB of weights are replaced).
  unet_cfg, unet_tensors = _read_component(folder, "unet", weights=not unet)
  if unet:
    unet_tensors = read_unet_override(unet)
  vae_cfg, vae_tensors = _read_component(folder, "vae")
  prompt_embedding = encode_prompt(folder, prompt)
  module = CleanDIFT(UNetConfig.from_hf(unet_cfg), VAEConfig.from_hf(vae_cfg),
                     prompt_shape=tuple(prompt_embedding.shape[1:]), **module_kwargs)
  params = {"vae": vae_params(vae_tensors), "unet": unet_params(unet_tensors),
            "prompt_embedding": prompt_embedding}
  return module, params, PREPROCESSING


# SD's VAE reads images in [-1, 1]: (x - 0.5) / 0.5. 512 px as §3.1 resizes every image.
PREPROCESSING = {"size": 512, "crop": None, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                 "resample": "bicubic"}


def _module_kwargs(model_config) -> dict:
  adapter = dict(model_config.get("adapter", {}))
  blocks = tuple(adapter.pop("blocks", (3, 2, 1, 0)))
  if "score_channels" in adapter:
    adapter["score_channels"] = tuple(adapter["score_channels"])
  return dict(timestep=float(model_config.get("timestep", 261.0)), blocks=blocks,
              adapter=adapter, attention_impl=model_config.get("attention", "auto"),
              **tower.tower_kwargs(model_config, transformer=False))


def build(model_config):
  """Registry entry: config.model -> Backbone. `init=None`: random net of `variant` + `arch`
  (`arch.unet`, `arch.vae`: config fields; `arch.prompt_length`)."""
  kwargs = _module_kwargs(model_config)
  if model_config.get("init"):
    return tower.Backbone(*load_cleandift(model_config.init, model_config.get("unet_init") or None,
                                    model_config.get("prompt", ""), **kwargs))
  variant = model_config.get("variant", "sd2.1")
  if variant not in VARIANTS:
    raise ValueError(f"config.model.variant={variant!r}; known: {sorted(VARIANTS)}")
  arch = dict(model_config.get("arch", {}))
  if set(arch) - {"unet", "vae", "prompt_length"}:
    raise ValueError(f"config.model.arch: {sorted(set(arch) - {'unet', 'vae', 'prompt_length'})} "
                     f"unknown; cleandift takes arch.unet, arch.vae (config fields) and "
                     f"arch.prompt_length")
  def tup(d):
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(d).items()}
  unet_cfg = dataclasses.replace(VARIANTS[variant].unet, **tup(arch.get("unet", {})))
  vae_cfg = dataclasses.replace(VARIANTS[variant].vae, **tup(arch.get("vae", {})))
  prompt_shape = (int(arch.get("prompt_length", 77)), unet_cfg.cross_attention_dim)
  return tower.Backbone(CleanDIFT(unet_cfg, vae_cfg, prompt_shape, **kwargs), None, PREPROCESSING)
