"""CleanDIFT (SD 2.1) + DP-IQA feature adapter + LoRA(UNet q,k; r=4, alpha=8) + a head (App. A.1).

python -m iqa_jax.train --config configs/cleandift.py:head=gated \
  --config.data.name=koniq10k --config.data.dir=/data/koniq
Args: head=baseline|sigmoid|gated (default gated), init=<SD 2.1 hub id or folder>,
unet=<CleanDIFT UNet: folder, .safetensors file or hub_id:file; empty: init's own unet/>.
"""
import ml_collections

from iqa_jax.defaults import base_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, head="gated", init="stabilityai/stable-diffusion-2-1",
                   unet="CompVis/cleandift:cleandift_sd21_unet.safetensors")
  c = base_config()
  c.model.backbone = "cleandift"
  c.model.init = args.init  # vae/, text_encoder/, ...
  c.model.unet_init = args.unet
  c.model.variant = "sd2.1"
  c.model.prompt = ""  # CleanDIFT's empty prompt, encoded once at load
  c.model.timestep = 261.0  # CleanDIFT's clean-UNet timestep (t_init / val_t in its code)
  # DP-IQA's decoder up to its MLP: taps up_3, up_2, up_1, up_0 -> 64x64 -> 8 x 64 x 64 vector.
  c.model.adapter = ml_collections.ConfigDict(dict(
      blocks=(3, 2, 1, 0), width=512, grid=64, score_channels=(128, 32, 8), pool="flatten"))
  c.model.head = args.head
  c.name = f"cleandift_{c.model.head}"
  return c
