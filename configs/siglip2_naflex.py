r"""SigLIP2-SO400M NaFlex + LoRA(q,k; r=4, alpha=8) + a head, scored at native aspect ratio.

python -m iqa_jax.train --config configs/siglip2_naflex.py:head=gated \
    --config.data.name=koniq10k --config.data.dir=/data/koniq
Args: head=baseline|sigmoid|gated (default gated), init=<hub id or folder>,
aspect=native|square (native: NaFlex resize within `patches` patches, no aspect distortion;
square: the paper's 512x512 resize), patches=1024 (the token budget of a 512^2 image at p=16).
"""
from iqa_jax.defaults import base_config, parse_arg
from iqa_jax.models import siglip2_naflex  # registers the naflex pp ops


def get_config(arg=None):
  args = parse_arg(arg, head="gated", init="google/siglip2-so400m-patch16-naflex",
                   aspect="native", patches=1024)
  c = base_config()
  c.model.backbone = "siglip2_naflex"
  c.model.init = args.init
  c.model.variant = "so400m/16"
  c.model.head = args.head
  aspect = args.aspect
  if aspect == "native":
    c.data.pp = siglip2_naflex.naflex_pp(16, args.patches)
  elif aspect != "square":
    raise ValueError(f"aspect must be native or square, got {aspect!r}")
  c.name = f"siglip2_naflex_{aspect}_{c.model.head}"
  return c
