"""The embedded demo: a KADID-style set from scikit-image photos, a tiny random SigLIP tower.

No pretrained weights can be reached offline, so the tower is small, randomly initialised and
trained whole; the head (gated), loss (Eq. 1-2), Adam, step decay and checkpoints are the
paper's recipe. Variants: `configs/demo.py:head=sigmoid,epochs=6,distortions=jpeg`;
`backbone=pe,layer=2` swaps in a tiny random Perception Encoder (4 blocks) tapped at 0-based
block `layer` (the Figure S5 sweep on the demo).
python -m iqa_jax.demo   (or: python -m iqa_jax.train --config configs/demo.py)
"""
from iqa_jax.defaults import base_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, seed=8, patch=8, head="gated", finetune="full", dir="demo_data",
                   distortions="", view="crops", epochs=10, batch=12, lr=1e-3,
                   backbone_lr=1e-3, backbone="siglip", layer=3)
  c = base_config()
  c.name = "demo"
  c.seed = args.seed
  c.model.init = None
  c.model.arch = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, patch_size=args.patch, image_size=64)
  if args.backbone == "pe":  # the same width on PE's blocks (2-D RoPE, CLS token, attention pool)
    c.model.backbone = "pe"
    c.model.variant = "vit_pe_core_tiny_patch16_384"
    c.model.arch = dict(embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, patch_size=args.patch,
                        img_size=64, num_classes=0, ref_feat_shape=(64 // args.patch,) * 2,
                        attn_pool_num_heads=4)
    c.model.tap_layer = args.layer
  elif args.backbone != "siglip":
    raise ValueError(f"configs/demo.py:backbone={args.backbone!r}: use siglip or pe")
  c.model.head = args.head
  # A random tower has no pretrained features for LoRA to adapt, so the demo trains it whole
  # (full fine-tuning, App. A.1) with one learning rate; LoRA is exercised by the tests.
  c.model.finetune = args.finetune
  c.model.dtype = "float32"
  c.model.remat = "none"
  c.data.name = "demo"
  c.data.dir = args.dir
  c.data.split = "content"  # split by reference photo: no content in both train and val
  c.data.image_size = 64
  c.data.options.distortions = args.distortions
  # It learns on native-resolution 64 px tiles: score a photo of any size by 3 such crops.
  c.data.test_view = args.view
  c.optim.epochs = args.epochs
  c.optim.batch_size = args.batch
  c.optim.grad_accum = 1
  c.optim.lr = args.lr
  c.optim.backbone_lr = args.backbone_lr
  # Step decay (x0.2 at 60% and 80% of the epochs), as the paper does on its large sets.
  c.optim.schedule = "multistep"
  c.optim.milestones = (round(0.6 * c.optim.epochs), round(0.8 * c.optim.epochs))
  c.eval_batch_size = 32
  return c
