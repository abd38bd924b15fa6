r"""CLIP ViT-L/14 (224 px checkpoint, run at 512 px) + LoRA(q,k; r=4, alpha=8) + a head
(Tables 1-2).

python -m iqa_jax.train --config configs/clip.py:head=gated \
    --config.data.name=koniq10k --config.data.dir=/data/koniq
Args: head=baseline|sigmoid|gated (default gated), init=<hub id or folder>.
"""
from iqa_jax.defaults import base_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, head="gated", init="openai/clip-vit-large-patch14")
  c = base_config()
  c.model.backbone = "clip"
  c.model.init = args.init
  c.model.variant = "l/14@224"
  c.model.head = args.head
  c.name = f"clip_{c.model.head}"
  return c
