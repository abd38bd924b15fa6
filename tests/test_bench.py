"""The --tiny benchmark runs on CPU and prints its figures; its FLOP count vs worked numbers."""
import json
import os
from pathlib import Path

import pytest

from iqa_jax import bench, huge_pages
from iqa_jax.defaults import load_config_file
from iqa_jax.models.siglip import VARIANTS, SiglipConfig


def test_forward_flops_match_the_anchor_and_a_hand_count():
  # anchors/README.md: SigLIP2-SO400M@512 forward is about 0.97 TFLOP per image.
  assert bench.siglip_forward_flops(VARIANTS["so400m/16@512"], 512) / 1e12 == pytest.approx(
      0.97, abs=0.015)
  # Tiny tower by hand: 16 tokens; patch 2*16*768*64, per layer 2*16*(4*64^2 + 2*64*128)
  # + 4*16^2*64, MAP head 2*(2*16*64^2 + 2*64^2 + 2*64*128) + 4*16*64.
  tiny = SiglipConfig(**bench.TINY_ARCH)
  assert bench.siglip_forward_flops(tiny, 64) == 1_572_864 + 2 * 1_114_112 + 315_392


FAKE_CPU_REFERENCE = """import json, sys
# --width: a stand-in for torch_cpu_reference.py that records the shape it is asked for
open(sys.argv[0] + ".args", "w").write(json.dumps(sys.argv[1:]))
print(json.dumps({"stack": "fake", "threads": 2, "train_img_s": 2.0, "infer_img_s": 4.0}))
"""


# Compiles and times the tiny train and eval steps, then the real CPU anchor (about 40 s on 2
# busy cores); the --flops-only tests below trace the same steps of every family.
@pytest.mark.slow
def test_tiny_bench_prints_its_figures_and_the_cpu_ratio(capsys, tmp_path):
  reference = tmp_path / "torch_cpu_reference.py"
  reference.write_text(FAKE_CPU_REFERENCE)
  assert bench.main(["--config", "configs/siglip2_gated.py", "--batch", "8", "--infer-batch", "8",
                     "--steps", "2", "--warmup", "1", "--tiny", "--profile",
                     str(tmp_path / "profile"), "--vs-torch", str(reference)]) == 0
  out = capsys.readouterr().out
  for label in ("train ", "inference ", "memory ", "compile ", "TFLOP/s ", "torch ", "ratio ",
                "profile    train step", "profile    inference step"):
    assert f"\n{label}" in "\n" + out, out
  r = json.loads(out.split("BENCH_JSON ", 1)[1])
  assert r["train_img_s"] > 0 and r["infer_img_s"] > 0
  assert r["train_compile_s"] > 0 and r["infer_compile_s"] > 0
  assert r["batch"] == 8 and r["image_size"] == 64 and r["finetune"] == "lora"
  assert r["huge_pages"] is huge_pages.active()  # pytest's own process: as it was started
  assert r["train_tflops"] > 0 and r["forward_gflop_per_img"] == pytest.approx(0.00411648)
  # XLA's own count of the compiled eval step agrees with the analytic one.
  assert r["xla_infer_tflops"] / r["infer_tflops"] == pytest.approx(1.0, abs=0.3)
  assert r["train_peak_mib"] is not None or r["train_compiled_mib"] > 0
  # --profile: kernel time per step, its ops named by the model source that made them.
  for step in ("train", "inference"):
    p = r["profile"][step]
    assert p["kernel_ms"] > 0 and 0 < sum(row["share"] for row in p["top"]) <= 1 + 1e-9
    assert any("encoder_layers" in row["source"] for row in p["by_source"]), p["by_source"]
  # The CPU anchor ran after the JAX side at the tower, batches and steps that were timed.
  asked = json.loads((tmp_path / "torch_cpu_reference.py.args").read_text())
  t = bench.TINY_ARCH
  assert asked == [str(v) for v in (
      "--width", t["hidden_size"], "--layers", t["num_hidden_layers"], "--heads",
      t["num_attention_heads"], "--mlp", t["intermediate_size"], "--patch", t["patch_size"],
      "--size", 64, "--batch", 8, "--infer-batch", 8, "--steps", 2, "--warmup", 1)]
  assert r["torch"]["train_img_s"] == 2.0
  ratio = f"ratio      train {r['train_img_s'] / 2.0:.2f}x, inference {r['infer_img_s'] / 4.0:.2f}x"
  assert ratio in out, out
  # The real anchor takes those flags and times the same tower (torch is a test dependency).
  anchor = Path(__file__).resolve().parents[2] / "shared" / "anchors" / "torch_cpu_reference.py"
  if not anchor.is_file() and not os.environ.get("CI"):
    pytest.skip(f"{anchor} is not here")
  real = bench.torch_reference(str(anchor), 8, 8, 1, True,
                               cpu_args=bench.cpu_reference_args(r, 0))
  assert real["train_img_s"] > 0 and real["infer_img_s"] > 0


def test_gpu_reference_without_cuda_is_skipped(tmp_path, capsys):
  gpu_reference = tmp_path / "torch_reference.py"
  gpu_reference.write_text("raise SystemExit('must not run without CUDA')\n")
  assert not bench.is_cpu_reference(str(gpu_reference))
  if bench.torch_has_cuda():
    pytest.skip("torch sees a GPU here")
  assert bench.torch_reference(str(gpu_reference), 8, 8, 2, True) is None


def _one_config_per_family() -> dict[str, str]:
  """configs/*.py, one per backbone family (the siglip2_* heads share one tower)."""
  root = Path(__file__).resolve().parent.parent / "configs"
  found: dict[str, str] = {}
  for path in sorted(root.glob("*.py")):
    found.setdefault(load_config_file(str(path)).model.backbone, str(path))
  return found


FAMILIES = _one_config_per_family()


def test_every_backbone_family_has_a_tiny_tower():
  assert set(FAMILIES) == set(bench.TINY_MODEL)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_bench_traces_every_family(family, capsys):
  """--tiny --flops-only traces the real train and eval steps of each config (no compile):
  the train step is forward + remat recompute + activation backward, 2-3.5 forwards' worth."""
  assert bench.main(["--config", FAMILIES[family], "--batch", "4", "--infer-batch", "4",
                     "--tiny", "--flops-only"]) == 0
  out = capsys.readouterr().out
  assert "\nGFLOP/img " in out
  r = json.loads(out.split("BENCH_JSON ", 1)[1])
  assert r["backbone"] == family and r["image_size"] == bench.TINY_SIZE
  ratio = r["xla_train_gflop_per_img"] / r["xla_infer_gflop_per_img"]
  assert 2.0 < ratio < 3.5, ratio  # measured 2.19 (resnet) to 2.54 (dinov3)
  if r["forward_gflop_per_img"] is not None:  # SigLIP towers: the hand count + the head's
    head = 2 * (64 * 512 + 512 * 512 + 512) / 1e9  # d->512->512->1; XLA adds LN/GELU/softmax
    assert r["xla_infer_gflop_per_img"] == pytest.approx(r["forward_gflop_per_img"] + head,
                                                         rel=0.08)  # measured 5.8%
