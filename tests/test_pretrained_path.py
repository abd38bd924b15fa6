"""The users' path (issue 9, A1): configs/siglip2_gated.py with a Hugging Face checkpoint folder
as model.init, LoRA on q/k, bf16 compute, through the real train_and_evaluate; then the run
folder, a resume after a kill, and scoring/evaluating that run."""
import csv

import jax
import ml_collections
import numpy as np
import pytest
from conftest import TINY_SIGLIP, load_config, tiny_csv_set

from iqa_jax.data import pipeline
from iqa_jax.runs import checkpoint
from iqa_jax.training import loop as train


def pretrained_config(init, data_dir):
  """The unchanged paper config, pointed at a tiny checkpoint and 14 images: 8 train / 6 val,
  batch 4 = 2 micro-batches x 2, two epochs (two optimizer steps each)."""
  config = load_config("siglip2_gated")
  assert (config.model.finetune, config.model.dtype) == ("lora", "bfloat16")
  config.model.init = str(init)
  config.data.update(name="csv", dir=str(data_dir), image_size=32, val_fraction=6 / 14)
  config.optim.update(epochs=2, batch_size=4, grad_accum=2, schedule="constant")
  config.update(eval_batch_size=4, progress=False)
  return config


@pytest.fixture(scope="module")
def csv_dir(tmp_path_factory):
  return tiny_csv_set(tmp_path_factory.mktemp("csv14"))


@pytest.fixture(scope="module")
def pretrained_run(tiny_siglip_dir, csv_dir, tmp_path_factory):
  """(config, workdir, results) of one uninterrupted run from the checkpoint folder."""
  workdir = tmp_path_factory.mktemp("pretrained_run")
  config = pretrained_config(tiny_siglip_dir, csv_dir)
  return config, workdir, train.train_and_evaluate(config, str(workdir))


def read_predictions(path, column="pred"):
  with open(path) as f:
    return {r["path"]: float(r[column]) for r in csv.DictReader(f)}


def test_run_folder_holds_only_the_trainable_leaves(pretrained_run):
  from iqa_jax.models.model import create_model
  config, workdir, _ = pretrained_run
  random_init = ml_collections.ConfigDict(config.to_dict())
  random_init.model.init = None  # same tree as the checkpoint's: shapes without compiling init
  random_init.model.arch = {k: v for k, v in TINY_SIGLIP.items() if k != "layer_norm_eps"}
  every = checkpoint.flatten(jax.eval_shape(lambda r: create_model(random_init, r)[1],
                                            jax.random.PRNGKey(0)))
  trainable = {k for k in every if k.startswith("head.") or ".lora_" in k}
  assert trainable and any(k.startswith("backbone.") for k in trainable)  # LoRA on q and k
  for which in ("last", "best"):
    saved, meta = checkpoint.load_params(workdir, which)  # the orbax item as stored
    assert set(saved) == trainable, sorted(set(saved) ^ trainable)
  # The frozen tower (every q/k/v/out/mlp kernel, embeddings, MAP head) is nowhere in the run.
  assert {k.split(".")[-2] for k in every if k not in trainable} >= {
      "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


@pytest.mark.slow  # three compiles of the bf16 LoRA step: ~40 s on an idle 2-core machine
def test_resume_after_kill_rereads_the_frozen_weights_and_matches(pretrained_run, tiny_siglip_dir,
                                                                  csv_dir, tmp_path, monkeypatch):
  _, _, uninterrupted = pretrained_run
  workdir = tmp_path / "killed"
  real = pipeline.make_train_loader

  def dying(*a, epoch, **kw):
    loader = real(*a, epoch=epoch, **kw)
    if epoch == 0:
      return loader

    def batches():  # the process dies inside epoch 2, after its first step
      yield next(iter(loader))
      raise KeyboardInterrupt("simulated kill")
    return type("Dying", (), {"__len__": lambda self: len(loader),
                              "__iter__": lambda self: batches()})()

  monkeypatch.setattr(pipeline, "make_train_loader", dying)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(pretrained_config(tiny_siglip_dir, csv_dir), str(workdir))
  assert [h["epoch"] for h in checkpoint.read_history(workdir)] == [0]
  monkeypatch.setattr(pipeline, "make_train_loader", real)
  resumed = train.train_and_evaluate(pretrained_config(tiny_siglip_dir, csv_dir), str(workdir))
  assert resumed["best"] == uninterrupted["best"]
  assert resumed["final"] == uninterrupted["final"]

  # What scoring rebuilds from the run: frozen leaves are the checkpoint folder's tensors
  # (read again from model.init), the trainable ones the run's.
  from iqa_jax.inference.loaded import load_run
  from iqa_jax.models.siglip import load_hf_siglip
  params = load_run(str(workdir), "last").params
  run_flat = checkpoint.flatten(jax.device_get(params))
  _, hf, _ = load_hf_siglip(str(tiny_siglip_dir))
  hf_flat = {f"backbone.{k}": v for k, v in checkpoint.flatten(hf).items()}
  assert hf_flat and set(hf_flat) < set(run_flat)
  for key, value in hf_flat.items():
    np.testing.assert_array_equal(run_flat[key], value, err_msg=key)
  saved, _ = checkpoint.load_params(workdir, "last")
  for key, value in saved.items():
    np.testing.assert_array_equal(run_flat[key], value, err_msg=key)


def test_score_and_evaluate_give_the_in_memory_predictions(pretrained_run, csv_dir, tmp_path):
  """val_predictions.csv holds the scores the training loop computed in memory (best epoch)."""
  from iqa_jax.inference.evaluate import data_config_for, evaluate_run
  from iqa_jax.inference.score_csv import score_paths
  config, workdir, results = pretrained_run
  in_memory = read_predictions(workdir / "val_predictions.csv")
  assert len(in_memory) == results["n_val"] == 6
  paths = sorted(in_memory)
  summary = score_paths(str(workdir), paths, str(tmp_path / "scores.csv"), batch_size=4,
                        progress=False)
  assert summary == {"scored": 6, "failed": 0, "kept": 0, "rescored": 0, "inputs": 6,
                     "cpu_dots": "eigen"}  # a tiny tower: Eigen's dots (xla_cpu)
  scored = read_predictions(tmp_path / "scores.csv", "score")
  # Both round to 6 decimals; the bf16 forward is the same program on the same batches.
  np.testing.assert_allclose([scored[p] for p in paths], [in_memory[p] for p in paths],
                             atol=1.5e-6)

  labels = tmp_path / "val" / "labels.csv"
  labels.parent.mkdir()
  with open(csv_dir / "labels.csv") as f:
    mos = {str(csv_dir / r["path"]): r["mos"] for r in csv.DictReader(f)}
  labels.write_text("path,mos\n" + "".join(f"{p},{mos[p]}\n" for p in paths))
  result = evaluate_run(str(workdir), data_config_for(config, "csv", str(labels)),
                        out_dir=str(tmp_path / "eval"))
  assert result["n"] == 6
  assert result["srcc"] == pytest.approx(results["best"]["srcc"], abs=1e-6)
  evaluated = read_predictions(tmp_path / "eval" / "eval_csv.csv")
  np.testing.assert_allclose([evaluated[p] for p in paths], [in_memory[p] for p in paths],
                             atol=1.5e-6)
