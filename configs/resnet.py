r"""ResNet-152 + LoRA on the residual-block convolutions (r=4, alpha=8) + a head (Tables 1-2).

python -m iqa_jax.train --config configs/resnet.py:head=gated \
    --config.data.name=koniq10k --config.data.dir=/data/koniq
Args: head=baseline|sigmoid|gated (default gated), init=<hub id or folder>.
"""
from iqa_jax.defaults import base_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, head="gated", init="microsoft/resnet-152")
  c = base_config()
  c.model.backbone = "resnet"
  c.model.init = args.init
  c.model.variant = "152"
  c.model.head = args.head
  c.name = f"resnet_{c.model.head}"
  return c
