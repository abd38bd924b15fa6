r"""DINOv2-L/14 + LoRA(q,k; r=4, alpha=8) + a head (Tables 1-2); feature: mean of all last tokens.

python -m iqa_jax.train --config configs/dinov2.py:head=gated \
    --config.data.name=koniq10k --config.data.dir=/data/koniq
Args: head=baseline|sigmoid|gated (default gated), init=<hub id or folder>.
"""
from iqa_jax.defaults import base_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, head="gated", init="facebook/dinov2-large")
  c = base_config()
  c.model.backbone = "dinov2"
  c.model.init = args.init
  c.model.variant = "l/14"
  c.model.pool = "mean"  # App. A.1: mean of last_hidden_state (CLS + patches) | patch_mean | cls
  c.model.head = args.head
  c.name = f"dinov2_{c.model.head}"
  return c
