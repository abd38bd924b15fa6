"""The embedded demo: a KADID-style set from scikit-image photos, a tiny random SigLIP tower.

No pretrained weights can be reached offline, so the tower is small and randomly initialised;
everything else (LoRA on q/k, gated head, loss, Adam, checkpoints) is the paper's recipe.
python -m iqa_jax.demo   (or: python -m iqa_jax.train --config configs/demo.py)
"""
from iqa_jax.defaults import base_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg)
  c = base_config()
  c.name = "demo"
  c.seed = int(args.get("seed", 8))
  c.model.init = None
  c.model.arch = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, patch_size=16, image_size=128)
  c.model.head = args.get("head", "gated")
  c.model.finetune = args.get("finetune", "lora")
  c.model.dtype = "float32"
  c.model.remat = "none"
  c.data.name = "demo"
  c.data.dir = args.get("dir", "demo_data")
  c.data.split = "content"  # split by reference photo: no content in both train and val
  c.data.image_size = 128
  c.data.options.distortions = args.get("distortions", "")
  c.optim.epochs = int(args.get("epochs", 12))
  c.optim.batch_size = 12
  c.optim.grad_accum = 1
  c.optim.lr = float(args.get("lr", 1e-3))
  c.optim.schedule = "constant"
  c.eval_batch_size = 32
  return c
