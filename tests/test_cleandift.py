"""CleanDIFT feature path against diffusers (AutoencoderKL, UNet2DConditionModel) and transformers
(CLIPTextModel, CLIPTokenizer); the DP-IQA adapter against a torch transcription of its decoder."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import train_two_steps, zeros_like_init

from iqa_jax.models import cleandift, hf_io, lora

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

# SD 2.1's structural options, shrunk: linear projections, per-block head counts (diffusers'
# `attention_head_dim`), a cross-attention width of its own, three cross-attention blocks.
TINY_UNET = dict(block_out_channels=[8, 16, 16, 16], layers_per_block=2,
                 attention_head_dim=[1, 2, 2, 4], cross_attention_dim=12,
                 use_linear_projection=True, norm_num_groups=4, sample_size=8,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
TINY_VAE = dict(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, latent_channels=4,
                norm_num_groups=4, sample_size=32)
TINY_TEXT = dict(vocab_size=10, hidden_size=12, intermediate_size=24, num_hidden_layers=2,
                 num_attention_heads=3, max_position_embeddings=9, hidden_act="gelu")
TAPS = ("mid", "up_0", "up_1", "up_2", "up_3")
# The same nets as `config.model.arch` (our config fields only).
ARCH_UNET = {k: v for k, v in TINY_UNET.items() if k != "sample_size"}
ARCH_VAE = {k: v for k, v in TINY_VAE.items() if k in ("block_out_channels", "layers_per_block",
                                                        "latent_channels", "norm_num_groups")}


def _perturb(model):
  with torch.no_grad():  # random init leaves norms at 1 and biases at 0; move every tensor
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
  """A diffusers-layout SD folder (unet/, vae/, text_encoder/, tokenizer/) of tiny random models;
  the tokenizer in the hub's layout (vocab.json, merges.txt, special_tokens_map.json), pad '!'."""
  torch.manual_seed(0)
  folder = tmp_path_factory.mktemp("tiny_sd")
  unet = _perturb(diffusers.UNet2DConditionModel(**TINY_UNET))
  vae = _perturb(diffusers.AutoencoderKL(**TINY_VAE))
  text = _perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT)))
  unet.save_pretrained(folder / "unet")
  vae.save_pretrained(folder / "vae")
  text.save_pretrained(folder / "text_encoder")
  tok = folder / "tokenizer"
  tok.mkdir()
  vocab = {"!": 0, "a": 1, "b": 2, "a</w>": 3, "b</w>": 4, "ab</w>": 5,
           "<|startoftext|>": 8, "<|endoftext|>": 9}
  (tok / "vocab.json").write_text(json.dumps(vocab))
  (tok / "merges.txt").write_text("#version: 0.2\na b</w>\n")
  (tok / "special_tokens_map.json").write_text(json.dumps(
      {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
       "unk_token": "<|endoftext|>"}))
  (tok / "tokenizer_config.json").write_text(json.dumps(
      {"model_max_length": 9, "tokenizer_class": "CLIPTokenizer"}))
  return folder, unet, vae, text


def _reference_taps(unet, vae, text, folder, images, timestep):
  """The feature path in diffusers: VAE mean x scaling, empty-prompt embedding, UNet block taps."""
  taps = {}
  for i, block in enumerate(unet.up_blocks):
    block.register_forward_hook(lambda m, a, o, i=i: taps.__setitem__(f"up_{i}", o))
  unet.mid_block.register_forward_hook(lambda m, a, o: taps.__setitem__("mid", o))
  tok = transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
  ids = tok("", padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
  with torch.no_grad():
    prompt = text(torch.tensor([ids])).last_hidden_state
    latents = vae.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist.mean
    latents = latents * vae.config.scaling_factor
    unet(latents, torch.tensor(timestep), prompt.expand(len(images), -1, -1))
  def nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)
  return ids, prompt.numpy(), nhwc(latents), {k: nhwc(v) for k, v in taps.items()}


def test_feature_path_matches_diffusers(tiny_sd):
  """Every map the adapter can take, at a non-square size whose latent (12x20) halves to odd
  sizes (6x10, 3x5, 2x3), so the up blocks resample to the skip's size as diffusers does."""
  folder, unet, vae, text = tiny_sd
  module, params, pp = cleandift.load_cleandift(str(folder), timestep=261.0, lora_rank=4,
                                                remat="nothing", attention_impl="xla",
                                                adapter=dict(width=16, grid=4))
  images = np.random.RandomState(0).uniform(-1, 1, (2, 24, 40, 3)).astype(np.float32)
  params = hf_io.merge_loaded(zeros_like_init(module, images), params)  # LoRA B = 0
  _, out = jax.jit(module.apply)({"params": params}, jnp.asarray(images))
  ids, prompt, latents, taps = _reference_taps(unet, vae, text, folder, images, 261.0)
  assert ids == list(cleandift.prompt_token_ids(folder, "")[0])
  errors = {"prompt": np.abs(params["prompt_embedding"] - prompt).max(),
            "latents": np.abs(np.asarray(out["latents"]) - latents).max()}
  errors.update({k: np.abs(np.asarray(out[k]) - taps[k]).max() for k in TAPS})
  print("CleanDIFT max abs error vs diffusers / transformers:",
        {k: f"{v:.1e}" for k, v in errors.items()})
  assert max(errors.values()) <= 1e-4
  assert out["up_3"].shape == (2, 12, 20, 8) and out["up_0"].shape == (2, 3, 5, 16)
  assert (pp["mean"], pp["std"]) == ((0.5,) * 3, (0.5,) * 3)  # SD's VAE reads [-1, 1]


def test_a_nonempty_prompt_matches_transformers(tiny_sd):
  folder, _, _, text = tiny_sd
  tok = transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
  ids = tok("ab a", padding="max_length", max_length=9, truncation=True).input_ids
  assert 5 in ids  # the merge was applied: the prompt really went through BPE
  with torch.no_grad():
    ref = text(torch.tensor([ids])).last_hidden_state.numpy()
  assert np.abs(cleandift.encode_prompt(folder, "ab a") - ref).max() <= 1e-5


class _DPIQADecoderFront(torch.nn.Module):
  """DP-IQA's QualityFeatureDecoder (iqa_models/dpiqa.py) up to its fc layers, small widths."""

  def __init__(self, in_channels, width, grid, score):
    super().__init__()
    nn = torch.nn
    self.grid = grid
    self.convs = nn.ModuleList(nn.Conv2d(c, width, 3, padding=1) for c in in_channels)

    def se(c):
      return nn.Sequential(nn.Linear(c, c // 16, bias=False), nn.ReLU(),
                           nn.Linear(c // 16, c, bias=False), nn.Sigmoid())

    self.ses = nn.ModuleList(se(width) for _ in in_channels)
    self.fuse_conv = nn.Conv2d(width * len(in_channels), width, 3, padding=1)
    self.se_fuse = se(width)
    chans = (width, *score)
    self.score = nn.ModuleList(nn.Conv2d(a, b, 1) for a, b in zip(chans, chans[1:], strict=False))

  def forward(self, taps):
    def gate(se, x):
      return x * se(x.mean((2, 3)))[:, :, None, None]

    x = torch.cat([
        gate(se, conv(torch.nn.functional.interpolate(
            t, size=(self.grid, self.grid), mode="bicubic", align_corners=False)))
        for t, conv, se in zip(taps, self.convs, self.ses, strict=True)], 1)
    x = gate(self.se_fuse, self.fuse_conv(x))
    for conv in self.score:
      x = torch.relu(conv(x))
    return x.flatten(1)


def test_adapter_matches_dpiqa_decoder():
  """Taps smaller and larger than the grid (bicubic up and down), SE reduction 16 at width 32."""
  torch.manual_seed(3)
  shapes = [(12, 20, 8), (6, 10, 16), (3, 5, 16)]
  ref = _DPIQADecoderFront([s[-1] for s in shapes], 32, 8, (8, 4)).eval()
  rs = np.random.RandomState(4)
  taps = [rs.randn(2, *s).astype(np.float32) for s in shapes]
  with torch.no_grad():
    want = ref([torch.from_numpy(t.transpose(0, 3, 1, 2)) for t in taps]).numpy()

  def conv(m):
    return {"kernel": m.weight.detach().numpy().transpose(2, 3, 1, 0),
            "bias": m.bias.detach().numpy()}

  def se(s):
    return {"fc_0": {"kernel": s[0].weight.detach().numpy().T},
            "fc_2": {"kernel": s[2].weight.detach().numpy().T}}

  params = {"fuse_conv": conv(ref.fuse_conv), "se_fuse": se(ref.se_fuse)}
  for i in range(len(shapes)):
    params.update({f"conv_{i}": conv(ref.convs[i]), f"se_{i}": se(ref.ses[i])})
  params.update({f"score_{j}": conv(c) for j, c in enumerate(ref.score)})
  adapter = cleandift.FeatureAdapter(width=32, grid=8, score_channels=(8, 4))
  got = adapter.apply({"params": params}, [jnp.asarray(t) for t in taps])
  assert got.shape == (2, 4 * 8 * 8)
  assert np.abs(np.asarray(got) - want).max() <= 1e-5


def test_lora_on_unet_qk_and_what_trains(tiny_sd):
  """LoRA factors on to_q/to_k of every UNet attention (self and cross), none in the VAE; the
  adapter trains with the head in every mode; VAE and prompt embedding get no gradient."""
  folder = tiny_sd[0]
  module, loaded, _ = cleandift.load_cleandift(str(folder), lora_rank=4, attention_impl="xla",
                                               adapter=dict(width=16, grid=4))
  x = np.random.RandomState(5).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
  params = hf_io.merge_loaded(zeros_like_init(module, x), loaded)
  paths = ["/".join(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  lora_paths = [p for p in paths if "lora_" in p]
  # 3 down x 2 + mid 1 + 3 up x 3 = 16 transformer blocks, each attn1 + attn2, q and k, A and B.
  assert len(lora_paths) == 16 * 2 * 2 * 2
  assert all(p.startswith("unet/") and ("/to_q/" in p or "/to_k/" in p) for p in lora_paths)
  for mode in ("frozen", "lora", "full"):
    labels = lora.param_labels({"backbone": params, "head": {}}, mode)["backbone"]
    assert set(jax.tree.leaves(labels["adapter"])) == {"head"}
    assert set(jax.tree.leaves(labels["vae"])) == {"backbone" if mode == "full" else "frozen"}
  # The first down block already reads the latents and the prompt; the rest compiles away.
  loss = lambda p: module.apply({"params": p}, x)[1]["down_0"].sum()  # noqa: E731
  grads = jax.jit(jax.grad(loss))(params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["vae"]))
  assert float(jnp.abs(grads["prompt_embedding"]).max()) == 0.0
  assert float(jnp.abs(grads["unet"]["conv_in"]["kernel"]).max()) > 0.0


@pytest.mark.parametrize("head", ["gated", pytest.param("baseline", marks=pytest.mark.slow),
                                  pytest.param("sigmoid", marks=pytest.mark.slow)])
def test_two_train_steps_through_the_train_loop(tmp_path, head):
  """configs/cleandift.py with a one-block UNet and VAE (cross-attention kept): 8 train images
  (6 val), batch 4 = 2 x 2. The two other heads differ only in the head (tests/test_head.py)."""
  arch = dict(prompt_length=5, vae=dict(ARCH_VAE, block_out_channels=[8]),
              unet=dict(ARCH_UNET, block_out_channels=[8], layers_per_block=1,
                        attention_head_dim=[2], down_block_types=["CrossAttnDownBlock2D"],
                        up_block_types=["CrossAttnUpBlock2D"]))
  results, history = train_two_steps(
      tmp_path, "cleandift", arch, head=head,
      adapter=dict(blocks=(0,), width=16, grid=4, score_channels=(4,), pool="flatten"))
  assert results["status"] == "done" and history[0]["step"] == 2
  assert np.isfinite(history[0]["train_loss"])
