r"""Perception Encoder PE-Core-L/14-336, block 20 tapped (App. B), + LoRA(q,k; r=4, alpha=8)
+ a head.

python -m iqa_jax.train --config configs/pe.py:head=gated \
    --config.data.name=koniq10k --config.data.dir=/data/koniq
Args: head=baseline|sigmoid|gated (default gated), init=<hub id or folder of a timm checkpoint>,
layer=20 (0-based block whose tokens are pooled and projected; -1: the last block).
"""
from iqa_jax.defaults import base_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, head="gated", init="timm/vit_pe_core_large_patch14_336.fb", layer=20)
  c = base_config()
  c.model.backbone = "pe"
  c.model.init = args.init
  c.model.variant = "vit_pe_core_large_patch14_336"
  c.model.tap_layer = args.layer  # App. B, Fig. S5: layer 20 is best for IQA
  c.model.head = args.head
  c.name = f"pe_l{c.model.tap_layer}_{c.model.head}"
  return c
