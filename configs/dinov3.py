r"""DINOv3 ViT-H+/16 + LoRA(q,k; r=4, alpha=8) + a head (Tables 1-2); feature: mean of last tokens.

python -m iqa_jax.train --config configs/dinov3.py:head=gated \
    --config.data.name=koniq10k --config.data.dir=/data/koniq
Args: head=baseline|sigmoid|gated (default gated), init=<hub id or folder>.
"""
from iqa_jax.defaults import base_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, head="gated", init="facebook/dinov3-vith16plus-pretrain-lvd1689m")
  c = base_config()
  c.model.backbone = "dinov3"
  c.model.init = args.init
  c.model.variant = "h+/16"
  c.model.pool = "mean"  # App. A.1: mean of last_hidden_state (CLS, registers, patches)
  c.model.rope_augment = True  # HF train mode: random RoPE rescale (config pos_embed_rescale)
  c.model.head = args.head
  c.name = f"dinov3_{c.model.head}"
  return c
