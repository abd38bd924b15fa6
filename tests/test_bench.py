"""The --tiny benchmark runs on CPU and prints its figures; its FLOP count vs worked numbers."""
import json
from pathlib import Path

import pytest

from iqa_jax import bench
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


# Compiles and times the tiny train and eval steps (17 s on 2 busy cores); the --flops-only
# tests below trace the same steps of every family and read the same printed JSON.
@pytest.mark.slow
def test_tiny_bench_prints_its_figures(capsys, tmp_path):
  reference = tmp_path / "torch_reference.py"
  reference.write_text("raise SystemExit('must not run without CUDA')\n")
  assert bench.main(["--config", "configs/siglip2_gated.py", "--batch", "8", "--infer-batch", "8",
                     "--steps", "2", "--warmup", "1", "--tiny",
                     "--vs-torch", str(reference)]) == 0
  out = capsys.readouterr().out
  for label in ("train ", "inference ", "memory ", "compile ", "TFLOP/s ", "torch "):
    assert f"\n{label}" in "\n" + out, out
  r = json.loads(out.split("BENCH_JSON ", 1)[1])
  assert r["train_img_s"] > 0 and r["infer_img_s"] > 0
  assert r["train_compile_s"] > 0 and r["infer_compile_s"] > 0
  assert r["batch"] == 8 and r["image_size"] == 64 and r["finetune"] == "lora"
  assert r["train_tflops"] > 0 and r["forward_gflop_per_img"] == pytest.approx(0.00411648)
  # XLA's own count of the compiled eval step agrees with the analytic one.
  assert r["xla_infer_tflops"] / r["infer_tflops"] == pytest.approx(1.0, abs=0.3)
  assert r["train_peak_mib"] is not None or r["train_compiled_mib"] > 0
  assert "torch" not in r  # no CUDA here: the reference is skipped, not run


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
