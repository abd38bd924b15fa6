"""Exported models: LoRA merged as peft merges it, scores equal to the run's (merged, unmerged,
bf16), loading without the base checkpoint or torch, and the refusals of a damaged folder."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import load_config
from PIL import Image

from iqa_jax import export as export_cli  # the command
from iqa_jax import score as score_cli  # the command
from iqa_jax.inference import exported as export
from iqa_jax.inference.scorer import Scorer

# bf16 backbone weights (float32 compute): |score error| <= 0.2% of the largest |score|
# (measured 7.3e-4 on the tiny tower).
BF16_REL = 2e-3


def _lora_config(init, **data):
  config = load_config("siglip2_gated", "head=gated")
  config.model.update(init=str(init), dtype="float32", remat="nothing", scan=True)
  config.data.update(image_size=32, **data)
  return config


def _randomise_lora(params, seed=0):
  """LoRA B starts at zero; give every factor values so the merge has something to fold."""
  rng = np.random.default_rng(seed)
  def f(path, x):
    names = [getattr(k, "key", "") for k in path]
    return rng.normal(0, 0.2, x.shape).astype(np.float32) if "lora_b" in names else x
  return jax.tree_util.tree_map_with_path(f, jax.device_get(params))


def test_lora_merge_equals_peft_merge_and_the_unmerged_model(tiny_siglip_dir):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  from iqa_jax.models.model import create_model
  config = _lora_config(tiny_siglip_dir)
  model, params, _ = create_model(config)
  params = _randomise_lora(params)
  merged = export.merge_lora(params, alpha=8.0, rank=4)

  # peft's W + (alpha/r) B A on the same HF model, with our factors (A = a^T, B = b^T).
  hf = transformers.SiglipVisionModel.from_pretrained(tiny_siglip_dir)
  lora = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj"]))
  attn = params["backbone"]["encoder_layers"]["self_attn"]
  modules = dict(lora.named_modules())
  with torch.no_grad():
    for key, m in modules.items():  # ...encoder.layers.{i}.self_attn.{q,k}_proj
      if key.endswith(("self_attn.q_proj", "self_attn.k_proj")):
        i, name = int(key.split(".")[-3]), key.split(".")[-1]
        m.lora_A["default"].weight.copy_(torch.from_numpy(attn[name]["lora_a"][i].T.copy()))
        m.lora_B["default"].weight.copy_(torch.from_numpy(attn[name]["lora_b"][i].T.copy()))
  unloaded = lora.merge_and_unload().state_dict()
  ref = {k.removeprefix("vision_model."): v for k, v in unloaded.items()}
  got = merged["backbone"]["encoder_layers"]["self_attn"]
  for i in range(2):
    for name in ("q_proj", "k_proj"):
      want = ref[f"encoder.layers.{i}.self_attn.{name}.weight"].numpy().T
      assert "lora_a" not in got[name]
      np.testing.assert_allclose(got[name]["kernel"][i], want, atol=2e-7)
      assert np.abs(want - attn[name]["kernel"][i]).max() > 1e-2  # the update is not negligible

  # The merged weights in a LoRA-free module score as the unmerged LoRA model does.
  plain_config = _lora_config(tiny_siglip_dir)
  plain_config.model.finetune = "frozen"
  plain, _, _ = create_model(plain_config)
  x = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), np.uint8)
  a = model.apply({"params": params}, x)[0]
  b = plain.apply({"params": merged}, x)[0]
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_siglip_dir):
  """A LoRA run folder on a copy of the tiny HF checkpoint (random LoRA factors saved as
  train.py saves them), exported three ways; then the copy is deleted.
  -> (folder, {variant: export dir}, images, the run's own scores)."""
  import jax.numpy as jnp

  from iqa_jax.models.model import create_model
  from iqa_jax.runs import checkpoint
  from iqa_jax.training.optim import make_optimizer
  from iqa_jax.training.steps import TrainState
  root = tmp_path_factory.mktemp("lora_run")
  base = root / "base"
  shutil.copytree(tiny_siglip_dir, base)
  config = _lora_config(base, name="csv")
  config.optim.schedule = "constant"
  _, params, _ = create_model(config)
  params = _randomise_lora(params)
  tx, labels = make_optimizer(config, params, steps_per_epoch=1)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(1))
  run = root / "run"
  run.mkdir()
  (run / "config.json").write_text(config.to_json_best_effort())
  (run / "results.json").write_text(json.dumps({"best": {"epoch": 0, "srcc": 0.5, "plcc": 0.6}}))
  ckpt = checkpoint.RunCheckpoints(run, save_frozen=False)  # frozen weights stay in `base`
  ckpt.save(state, labels, "best", {"epoch": 0, "best": {}})
  ckpt.close()
  rng = np.random.default_rng(3)
  images = []
  for i, hw in enumerate(((40, 52), (33, 33), (64, 48), (31, 70))):
    images.append(str(root / f"im{i}.png"))
    Image.fromarray(rng.integers(0, 256, hw + (3,), np.uint8)).save(images[-1])
  run_scores = Scorer.from_pretrained(run, batch_size=3)(images)
  dirs = {}
  for name, merge, dtype in (("merged", True, "float32"), ("unmerged", False, "float32"),
                             ("bf16", True, "bfloat16")):
    dirs[name] = export.export_run(str(run), str(root / name), merge=merge, dtype=dtype)
  shutil.rmtree(base)  # the base checkpoint is gone from here on
  return root, dirs, images, run_scores


def test_export_scores_equal_the_run_without_base_checkpoint_or_torch(exported):
  root, dirs, images, run_scores = exported
  cfg = {k: json.loads((d / "config.json").read_text()) for k, d in dirs.items()}
  assert cfg["merged"]["lora"]["merged"] and not cfg["unmerged"]["lora"]["merged"]
  assert cfg["merged"]["source"]["base_checkpoint"].endswith("base")
  card = (dirs["merged"] / "README.md").read_text()
  assert "| dataset | csv" in card and "| seed | 8 |" in card and "val SRCC" in card
  # A fresh interpreter in which torch cannot be imported, with the base checkpoint deleted.
  code = ("import sys, json; sys.modules['torch'] = None\n"
          "from iqa_jax import Scorer\n"
          f"out = {{k: Scorer.from_pretrained(v)({images!r}).tolist() for k, v in "
          f"{ {k: str(v) for k, v in dirs.items()} !r}.items()}}\n"
          "out['torch'] = any(m.split('.')[0] == 'torch' and sys.modules[m] is not None "
          "for m in sys.modules)\n"
          "print(json.dumps(out))")
  env = dict(os.environ, PYTHONPATH=os.getcwd(), HF_HUB_OFFLINE="1")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert got["torch"] is False
  np.testing.assert_allclose(got["merged"], run_scores, atol=1e-5)
  np.testing.assert_allclose(got["unmerged"], run_scores, atol=1e-5)
  bf16_err = np.abs(np.array(got["bf16"]) - run_scores).max() / np.abs(run_scores).max()
  print(f"bf16 export: max |score error| / max |score| = {bf16_err:.2e}")
  assert bf16_err < BF16_REL
  # LoRA changed the scores: a merge that dropped the update would fail the checks above.
  plain = export.load_exported(dirs["unmerged"])
  no_lora = jax.tree_util.tree_map_with_path(
      lambda p, x: np.zeros_like(x) if "lora_b" in str(p) else x, plain.params)
  plain.params = no_lora
  assert np.abs(Scorer(plain)(images) - run_scores).max() > 1e-3


def _damaged(exported_dir, tmp_path):
  d = tmp_path / "model"
  shutil.copytree(exported_dir, d)
  return d


def _refused(folder, capsys) -> str:
  with pytest.raises(export.ExportError) as e:
    export.load_exported(folder)
  rc = score_cli.main(["--model", str(folder), "--out", str(folder.parent / "s.csv"),
                   "--no-progress", str(folder / "README.md")])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1 and str(e.value) in err
  assert not (folder.parent / "s.csv").exists()
  return str(e.value)


def test_refuses_a_newer_format_version(exported, tmp_path, capsys):
  d = _damaged(exported[1]["merged"], tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  cfg["format_version"] = export.FORMAT_VERSION + 1
  (d / "config.json").write_text(json.dumps(cfg))
  msg = _refused(d, capsys)
  assert str(d / "config.json") in msg and "format_version 2 is newer" in msg


def test_refuses_a_missing_or_misshaped_tensor(exported, tmp_path, capsys):
  from safetensors.numpy import load_file, save_file
  d = _damaged(exported[1]["merged"], tmp_path)
  tensors = load_file(d / "model.safetensors")
  key = "head.fc2.kernel"
  save_file({k: v for k, v in tensors.items() if k != key}, d / "model.safetensors")
  msg = _refused(d, capsys)
  assert str(d / "model.safetensors") in msg and f"'{key}' is missing" in msg
  save_file({**tensors, key: tensors[key][:, :7]}, d / "model.safetensors")
  msg = _refused(d, capsys)
  assert f"'{key}' has shape (512, 7)" in msg and "needs (512, 512)" in msg


def test_refuses_a_truncated_file(exported, tmp_path, capsys):
  d = _damaged(exported[1]["merged"], tmp_path)
  f = d / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[:len(data) // 2])
  msg = _refused(d, capsys)
  assert str(f) in msg and "truncated: tensor '" in msg
  f.write_bytes(data[:5])
  assert "is truncated" in _refused(d, capsys)
  (d / "config.json").write_text('{"format_version": 1, "mod')
  assert "config.json is not valid JSON" in _refused(d, capsys)


# --- What export replaces, and what loading checks (issue 23) ---

def _tree(folder):
  return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", ["the_run", "another_run", "hf_checkpoint", "user_file",
                                    "a_file"])
def test_export_refuses_an_out_it_did_not_write(target, exported, tiny_siglip_dir, tmp_path,
                                                capsys):
  root, dirs, _, _ = exported
  run = root / "run"
  if target == "the_run":
    out = run
  elif target == "another_run":
    out = tmp_path / "other_run"
    shutil.copytree(run, out)
  elif target == "hf_checkpoint":  # config.json and model.safetensors, but not ours
    out = tmp_path / "hf"
    shutil.copytree(tiny_siglip_dir, out)
  elif target == "user_file":  # an earlier export with the user's notes in it
    out = tmp_path / "model"
    shutil.copytree(dirs["merged"], out)
    (out / "notes.txt").write_text("mine")
  else:
    out = tmp_path / "scores.csv"
    out.write_text("path,score\n")
  before = _tree(out) if out.is_dir() else out.read_bytes()
  rc = export_cli.main(["--workdir", str(run), "--out", str(out)])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1 and f"--out {out}" in err, err
  assert "pass a new --out" in err
  assert (_tree(out) if out.is_dir() else out.read_bytes()) == before
  if target == "user_file":
    assert "notes.txt" in err
  assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob("*.old*"))


def test_export_replaces_its_own_and_older_exports_and_writes_0644(exported, trained_run,
                                                                   tmp_path):
  _, dirs, _, _ = exported
  _, run, _ = trained_run  # the tiny demo run (its base checkpoint is still there)
  out = tmp_path / "model"
  shutil.copytree(dirs["merged"], out)  # an earlier export of another run
  old = os.umask(0o022)
  try:
    export.export_run(str(run), str(out))  # ours (written_by): replaced
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["written_by"] == "iqa_jax.export" and cfg["source"]["run"] == str(run.resolve())
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        "model.safetensors": 0o644, "config.json": 0o644, "README.md": 0o644}
    del cfg["written_by"]  # as an export written before the marker: the exact old schema
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "README.md").write_text("older card")
    export.export_run(str(run), str(out))
    assert (out / "README.md").read_text() != "older card"
    cfg = json.loads((out / "config.json").read_text())
    del cfg["written_by"]
    cfg["note"] = "edited by hand"  # neither marked nor the old schema: not provably ours
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="holds a config.json that export did not write"):
      export.export_run(str(run), str(out))
  finally:
    os.umask(old)


def _edit_config(d, edit):
  cfg = json.loads((d / "config.json").read_text())
  cfg = edit(cfg)
  (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, says", [
    (lambda c: {**c, "input_size": c["input_size"] + 8},
     "field 'input_size' is 40, but the pp string"),
    (lambda c: {k: v for k, v in c.items() if k != "pp"}, "field 'pp' is missing"),
    (lambda c: {**c, "pp": c["pp"].split("|")}, "field 'pp' is a list, not a str"),
    (lambda c: {**c, "pp": "decode|no_such_op(3)"}, "field 'pp' is not a pp string"),
    (lambda c: {**c, "view": {"kind": "tiles", "crops": 3}}, "field 'view' is"),
    (lambda c: {**c, "mos_scale": [5.0]}, "field 'mos_scale' is [5.0]"),
    (lambda c: [c], "holds a JSON list"),
    (lambda c: {**c, "format_version": "1"}, "format_version is '1' (str), not the integer"),
])
def test_refuses_config_fields_that_do_not_fit(edit, says, exported, tmp_path, capsys):
  d = _damaged(exported[1]["merged"], tmp_path)
  _edit_config(d, edit)
  msg = _refused(d, capsys)
  assert str(d / "config.json") in msg and says in msg, msg


def test_refuses_a_tensor_of_another_dtype(exported, tmp_path, capsys):
  from safetensors.numpy import load_file, save_file
  d = _damaged(exported[1]["merged"], tmp_path)
  tensors = load_file(d / "model.safetensors")
  key = "head.fc2.kernel"
  save_file({**tensors, key: (tensors[key] * 100).astype(np.int32)}, d / "model.safetensors")
  msg = _refused(d, capsys)
  assert str(d / "model.safetensors") in msg and f"tensor '{key}' is int32" in msg, msg
  # A bf16 export's backbone is bfloat16, its head float32: both load.
  bf16 = load_file(exported[1]["bf16"] / "model.safetensors")
  assert str(bf16["backbone.embeddings_patch_embedding.kernel"].dtype) == "bfloat16"
  assert str(bf16["head.fc2.kernel"].dtype) == "float32"
  export.load_exported(exported[1]["bf16"])


def test_card_of_a_killed_run_reads_its_history(trained_run, tmp_path):
  """Issue 23 item 8: a run killed before results.json gets a card that says so, with the best
  epoch that training's rule picks from history.jsonl, not "best (epoch 0), n/a"."""
  from iqa_jax.runs import checkpoint
  _, run, results = trained_run
  killed = tmp_path / "run"
  shutil.copytree(run, killed)
  (killed / "results.json").unlink()
  card = (Path(export.export_run(str(killed), str(tmp_path / "model"))) / "README.md").read_text()
  best = results["best"]
  assert "**unfinished**: 2 of 2 epochs trained" in card
  assert f"best epoch {best['epoch'] + 1}: val SRCC {best['srcc']:.4f}" in card
  assert f"| checkpoint | best (epoch {best['epoch'] + 1}) |" in card
  assert f"{best['srcc']:.4f} / {best['plcc']:.4f}" in card
  assert len(checkpoint.read_history(killed)) == 2
