r"""SigLIP2-SO400M@512 + LoRA(q,k; r=4, alpha=8) + the baseline head (Tables 1-2).

python -m iqa_jax.train --config configs/siglip2_baseline.py \
    --config.data.name=koniq10k --config.data.dir=/data/koniq
Args: head=baseline|sigmoid|gated (default baseline; the file names the paper's variant),
init=<hub id or folder>.
"""
from iqa_jax.defaults import base_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, head="baseline", init="google/siglip2-so400m-patch16-512")
  c = base_config()
  c.model.backbone = "siglip"
  c.model.init = args.init
  c.model.head = args.head
  c.name = f"siglip2_{c.model.head}"
  return c
