"""CleanDIFT feature path against diffusers (AutoencoderKL, UNet2DConditionModel) and transformers
(CLIPTextModel, CLIPTokenizer); the DP-IQA adapter against a torch transcription of its decoder."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, require, tiny_csv_set, zeros_like_init

from iqa_jax.models import cleandift, hf_io, lora

torch = require("torch")
transformers = require("transformers")
diffusers = require("diffusers")

# SD 2.1's structural options, shrunk: linear projections, per-block head counts (diffusers'
# `attention_head_dim`), a cross-attention width of its own, three cross-attention blocks.
TINY_UNET = dict(block_out_channels=[8, 16, 16, 16], layers_per_block=2,
                 attention_head_dim=[1, 2, 2, 4], cross_attention_dim=12,
                 use_linear_projection=True, upcast_attention=True, norm_num_groups=4,
                 sample_size=8,
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


def _from_config(folder, images, **model):
  """configs/cleandift.py's backbone on the tiny SD folder (its LoRA B = 0), with `model` fields
  changed -> (module, params, pp, the forward's intermediates on `images`)."""
  config = load_config("cleandift")
  config.model.update(init=str(folder), unet_init="", dtype="float32", remat="nothing",
                      attention="xla", adapter=dict(width=16, grid=4), **model)
  module, params, pp = cleandift.build(config.model)
  params = hf_io.merge_loaded(zeros_like_init(module, images), params)
  _, out = jax.jit(module.apply)({"params": params}, jnp.asarray(images))
  return module, params, pp, out


def test_feature_path_matches_diffusers(tiny_sd):
  """Every map the adapter can take, at a non-square size whose latent (12x20) halves to odd
  sizes (6x10, 3x5, 2x3), so the up blocks resample to the skip's size as diffusers does. The
  backbone is built from configs/cleandift.py as training builds it (timestep 261, LoRA r4)."""
  folder, unet, vae, text = tiny_sd
  images = np.random.RandomState(0).uniform(-1, 1, (2, 24, 40, 3)).astype(np.float32)
  module, params, pp, out = _from_config(folder, images)
  assert (module.timestep, module.lora_rank) == (261.0, 4)
  ids, prompt, latents, taps = _reference_taps(unet, vae, text, folder, images, 261.0)
  assert ids == list(cleandift.prompt_token_ids(folder, "")[0])
  errors = {"prompt": np.abs(params["prompt_embedding"] - prompt).max(),
            "latents": np.abs(np.asarray(out["latents"]) - latents).max()}
  errors.update({k: np.abs(np.asarray(out[k]) - taps[k]).max() for k in TAPS})
  print("CleanDIFT max abs error vs diffusers / transformers:",
        {k: f"{v:.1e}" for k, v in errors.items()})
  # Measured 1.3e-5 (mid), 1.6e-5 on another host; Transformer2D's GroupNorm at epsilon 1e-5
  # instead of diffusers' 1e-6 gives 9.6e-5 (the low-variance test below sees it as 0.88).
  assert max(errors.values()) <= 5e-5
  assert out["up_3"].shape == (2, 12, 20, 8) and out["up_0"].shape == (2, 3, 5, 16)
  assert (pp["mean"], pp["std"]) == ((0.5,) * 3, (0.5,) * 3)  # SD's VAE reads [-1, 1]
  assert module.unet_cfg.upcast_attention  # read from unet/config.json, as SD 2.1 sets it


def test_config_timestep_reaches_the_unet(tiny_sd):
  """config.model.timestep=0 gives diffusers' maps at t=0, far from those at the default 261."""
  folder, unet, vae, text = tiny_sd
  images = np.random.RandomState(2).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  assert load_config("cleandift").model.timestep == 261.0
  _, _, _, out = _from_config(folder, images, timestep=0.0)
  at_0 = _reference_taps(unet, vae, text, folder, images, 0.0)[3]
  at_261 = _reference_taps(unet, vae, text, folder, images, 261.0)[3]
  for k in TAPS:  # measured: error 3.6e-6 to 1.3e-5, apart 0.58 to 1.9
    error = np.abs(np.asarray(out[k]) - at_0[k]).max()
    apart = np.abs(at_261[k] - at_0[k]).max()
    assert error <= 5e-5 and apart > 0.1, (k, error, apart)


def test_groupnorm_blocks_match_diffusers_at_a_low_variance_input(tiny_sd):
  """The mid block's Transformer2DModel (GroupNorm epsilon 1e-6) and ResnetBlock2D (the config's
  norm_eps, 1e-5) on an input of variance 1e-6, where each epsilon moves the normalised value
  by tens of percent: the wrong epsilon is an error of order 1, not of order 1e-5."""
  from iqa_jax.models import sd_unet
  folder, unet, _, _ = tiny_sd
  module, params, _ = cleandift.load_cleandift(str(folder))
  cfg, p = module.unet_cfg, params["unet"]
  rs = np.random.RandomState(1)
  x = (1e-3 * rs.randn(2, 3, 5, cfg.block_out_channels[-1])).astype(np.float32)
  context = rs.randn(2, 4, cfg.cross_attention_dim).astype(np.float32)
  temb = rs.randn(2, 4 * cfg.block_out_channels[0]).astype(np.float32)
  transformer = sd_unet.Transformer2D(cfg.heads()[-1], cfg.norm_num_groups,
                                      cfg.use_linear_projection, (0, 8.0, 0.0), "xla")
  resnet = sd_unet.ResnetBlock2D(cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.norm_eps)
  got = {"transformer": transformer.apply({"params": p["mid_block_attentions_0"]}, x, context),
         "resnet": resnet.apply({"params": p["mid_block_resnets_0"]}, x, temb)}
  nchw = torch.from_numpy(x.transpose(0, 3, 1, 2))
  with torch.no_grad():
    want = {"transformer": unet.mid_block.attentions[0](
                nchw, encoder_hidden_states=torch.from_numpy(context)).sample,
            "resnet": unet.mid_block.resnets[0](nchw, torch.from_numpy(temb))}
  errors = {k: float(np.abs(np.asarray(got[k]) - want[k].numpy().transpose(0, 2, 3, 1)).max())
            for k in got}
  print("low-variance GroupNorm blocks, max abs error vs diffusers:", errors)
  # Measured 4.2e-7 (transformer) and 6.0e-7 (resnet), outputs of order 1; Transformer2D's
  # epsilon at 1e-5 gives 0.88, the resnet's at 1e-6 gives 1.16.
  assert max(errors.values()) <= 2e-6


def test_bf16_attention_is_diffusers_upcast_attention():
  """diffusers' `get_attention_scores` with upcast_attention=True (SD 2.1) in bf16: q.k and the
  softmax in float32, probabilities cast back. The attention the UNet calls gives the same bits;
  without the upcast (bf16 scores and softmax) diffusers is ~8x further from the float64 result.
  Inputs are bf16 values, so only the attention's own rounding differs."""
  from diffusers.models.attention_processor import Attention

  from iqa_jax.models.attention import attention
  b, t, s, h, dh = 2, 64, 77, 2, 32
  rs = np.random.RandomState(0)
  q, k, v = (np.asarray(jnp.asarray(scale * rs.randn(b, n, h * dh), jnp.bfloat16), np.float32)
             for scale, n in ((3, t), (3, s), (1, s)))  # logits up to ~100: bf16 rounds them

  def by_head(a):
    return torch.from_numpy(a.reshape(b, -1, h, dh).transpose(0, 2, 1, 3).reshape(b * h, -1, dh))

  def reference(upcast, dtype):
    probs = Attention(h * dh, heads=h, dim_head=dh, upcast_attention=upcast).get_attention_scores(
        by_head(q).to(dtype), by_head(k).to(dtype))
    y = torch.bmm(probs, by_head(v).to(dtype)).double().numpy()
    return y.reshape(b, h, t, dh).transpose(0, 2, 1, 3).reshape(b, t, h * dh)

  with torch.no_grad():
    exact = reference(True, torch.float64)
    upcast, no_upcast = reference(True, torch.bfloat16), reference(False, torch.bfloat16)
  ours = np.asarray(attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), h, "xla"),
                    np.float64)
  ours32 = np.asarray(attention(*map(jnp.asarray, (q, k, v)), h, "xla"), np.float64)
  errors = {name: float(np.abs(y - exact).max()) for name, y in
            [("ours bf16", ours), ("diffusers bf16 upcast", upcast),
             ("diffusers bf16 no upcast", no_upcast), ("ours float32", ours32)]}
  print("attention max abs error vs float64:", {k: f"{e:.1e}" for k, e in errors.items()})
  # Measured: ours = diffusers upcast 1.1e-2 (equal element for element on this project's host),
  # no upcast 8.4e-2, float32 5.4e-6. Two stacks' exp and matmul kernels may round an element
  # across a bf16 step on another host: at most one bf16 step (2^-7 of the largest output) apart,
  # and in few elements.
  np.testing.assert_allclose(ours, upcast, rtol=0, atol=2.0 ** -7 * np.abs(upcast).max())
  assert np.mean(ours != upcast) < 0.01
  assert errors["ours bf16"] * 4 < errors["diffusers bf16 no upcast"]
  assert errors["ours float32"] <= 1e-5


def test_a_nonempty_prompt_matches_transformers(tiny_sd):
  folder, _, _, text = tiny_sd
  tok = transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
  ids = tok("ab a", padding="max_length", max_length=9, truncation=True).input_ids
  assert 5 in ids  # the merge was applied: the prompt really went through BPE
  with torch.no_grad():
    ref = text(torch.tensor([ids])).last_hidden_state.numpy()
  assert np.abs(cleandift.encode_prompt(folder, "ab a") - ref).max() <= 1e-5


def test_a_partial_sd_folder_names_what_is_missing(tiny_sd, tmp_path):
  """One line naming the folder and the missing piece; the hub's fp16 weight variants load."""
  import shutil
  folder = tmp_path / "sd"
  shutil.copytree(tiny_sd[0], folder)
  _, want = cleandift._read_component(folder, "unet")
  (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(
      folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
  _, got = cleandift._read_component(folder, "unet")
  assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
  # A CleanDIFT UNet file replaces unet/'s weights, so unet/ needs only its config.json.
  unet_file = tmp_path / "cleandift_sd21_unet.safetensors"
  (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").rename(unet_file)
  with pytest.raises(hf_io.CheckpointNotFoundError,
                     match=f"{folder} has no unet/diffusion_pytorch_model.safetensors: "):
    cleandift.load_cleandift(str(folder))
  _, params, _ = cleandift.load_cleandift(str(folder), unet=str(unet_file))
  jax.tree.map(np.testing.assert_array_equal, params["unet"], cleandift.unet_params(want))
  cases = [("tokenizer/tokenizer_config.json", "tokenizer/tokenizer_config.json"),
           ("text_encoder", "text_encoder/ folder"),
           ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"),
           ("unet/config.json", "unet/config.json")]
  for path, says in cases:  # the loader reads unet/, vae/, text_encoder/, tokenizer/ in turn
    target = folder / path
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(hf_io.CheckpointNotFoundError) as e:
      cleandift.load_cleandift(str(folder), unet=str(unet_file))
    message = str(e.value)
    assert f"{folder} has no {says}:" in message and "\n" not in message, message


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


# The training net: one UNet block without cross-attention, so that the mid block's transformer
# (self + cross attention, LoRA on q and k) is the only one; a one-block VAE without attention.
# Parity of every block type is the job of the tests above; this net keeps three compiles cheap.
TRAIN_ARCH = dict(prompt_length=5,
                  vae=dict(ARCH_VAE, block_out_channels=[8], mid_block_add_attention=False),
                  unet=dict(ARCH_UNET, block_out_channels=[8], layers_per_block=1,
                            attention_head_dim=[2], down_block_types=["DownBlock2D"],
                            up_block_types=["UpBlock2D"]))


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
  """configs/cleandift.py (LoRA, the adapter, random init) through the run matrix, the gated
  head (the others differ only in the head, which tests/test_head.py covers): 14 images (8
  train, 6 val), batch 4 = 2 micro-batches x 2, one epoch = two steps."""
  from iqa_jax import experiments
  root = tmp_path_factory.mktemp("cleandift_matrix")
  csv_dir = tiny_csv_set(root)
  base = load_config("cleandift")
  assert base.model.finetune == "lora"
  base.model.update(init=None, arch=TRAIN_ARCH, dtype="float32", remat="none",
                    adapter=dict(blocks=(0,), width=16, grid=4, score_channels=(4,)))
  base.data.update(name="csv", dir=str(csv_dir), image_size=16, val_fraction=6 / 14)
  base.optim.update(epochs=1, batch_size=4, grad_accum=2)
  base.update(eval_batch_size=4, progress=False)
  rows = experiments.run_matrix(base, ["csv"], [0], ["gated"], root / "m", plots=False)
  return root, csv_dir, rows


def _predictions(path, column):
  import csv
  with open(path) as f:
    return {r["path"]: float(r[column]) for r in csv.DictReader(f)}


@pytest.mark.slow  # the matrix fixture's random init and train step, then score/evaluate/features
def test_score_evaluate_and_features_give_the_runs_predictions(matrix, tmp_path):
  """Two train steps through the run matrix; the run's validation predictions, computed in
  memory by the training loop, come back from `score`, from `evaluate`, and from its trained
  head on the feature cache's rows. The
  matrix's XLA cache serves the programs the run already compiled (random init, eval step):
  measured CPU time of `score` 49 s without it, 4 s with it."""
  from iqa_jax import parallel
  root = matrix[0]
  with parallel.persistent_compile_cache(root / "m" / "jax_cache"):
    _score_evaluate_and_features(matrix, tmp_path)


def _score_evaluate_and_features(matrix, tmp_path):
  import ml_collections

  from iqa_jax.inference.evaluate import data_config_for, evaluate_run
  from iqa_jax.inference.score_csv import score_paths
  from iqa_jax.models.model import head_from_config
  from iqa_jax.runs import checkpoint
  from iqa_jax.training import features
  root, csv_dir, rows = matrix
  row = next(r for r in rows if r["kind"] == "run" and r["head"] == "gated")
  assert (row["status"], row["model"], row["finetune"]) == ("done", "CDIFT (random init)", "lora")
  workdir = root / "m" / row["workdir"]
  history = checkpoint.read_history(workdir)
  assert history[0]["step"] == 2 and np.isfinite(history[0]["train_loss"])
  in_memory = _predictions(workdir / "val_predictions.csv", "pred")
  paths = sorted(in_memory)
  assert len(paths) == 6

  def close(got):  # float32, the same program on the same images; both CSVs round to 6 decimals
    np.testing.assert_allclose([got[p] for p in paths], [in_memory[p] for p in paths], atol=2e-6)

  assert score_paths(str(workdir), paths, str(tmp_path / "scores.csv"), batch_size=4,
                     progress=False)["scored"] == 6
  close(_predictions(tmp_path / "scores.csv", "score"))

  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  with open(csv_dir / "labels.csv") as f:
    mos = dict(line.strip().split(",") for line in list(f)[1:])
  labels = tmp_path / "val.csv"
  labels.write_text("path,mos\n" + "".join(f"{p},{mos[p.rsplit('/', 1)[1]]}\n" for p in paths))
  result = evaluate_run(str(workdir), data_config_for(config, "csv", str(labels)),
                        out_dir=str(tmp_path / "eval"))
  assert result["srcc"] == pytest.approx(row["best"]["srcc"], abs=1e-6)
  close(_predictions(tmp_path / "eval" / "eval_csv.csv", "pred"))

  # The cache of the run's backbone (its LoRA factors and trained adapter): 8 x 4 x 4 per image.
  feats = features.extract_features(config, str(tmp_path / "feats"), workdir=str(workdir),
                                    batch_size=4, progress=False)
  index = json.loads((feats / "index.json").read_text())
  cached = np.load(feats / "features.npy")
  assert cached.shape == (14, 4 * 4 * 4)
  flat, _ = checkpoint.load_params(workdir, "best")
  head = head_from_config(config.model)
  head_params = checkpoint.unflatten_into(
      jax.eval_shape(head.init, jax.random.PRNGKey(0), cached[:1])["params"],
      {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("head.")})
  scores, _ = head.apply({"params": head_params}, cached[[index["paths"].index(p) for p in paths]])
  close(dict(zip(paths, np.asarray(scores).tolist(), strict=True)))

  # Heads trained on a cache would hold the adapter at its init: refused, the field named.
  config.data.features = str(feats)
  config.model.finetune = "frozen"
  with pytest.raises(ValueError, match="config.model.adapter trains with the head"):
    features.head_only(config)
