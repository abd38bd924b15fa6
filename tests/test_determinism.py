"""Issue 5, item 7: the same config and seed on the same CPU give the same metrics to the last
digit, and the same per-image predictions and gate weights, in a fresh process."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import tiny_demo_config

from iqa_jax.runs import checkpoint

RUN_SPECIFIC = ("time_s", "train_img_per_s")  # wall-clock numbers
TESTS = Path(__file__).resolve().parent


def test_same_config_and_seed_give_identical_results_in_a_fresh_process(trained_run,
                                                                       tiny_demo_dir, tmp_path):
  """The session's run against the same config trained in a new Python process: its own jax
  start-up, its own compiles (no compilation cache) and its own random hash seed."""
  config, first_dir, first = trained_run
  # The shared run also keeps its per-epoch params; that changes what is saved, not computed.
  assert config.to_dict() == tiny_demo_config(tiny_demo_dir,
                                              keep_epoch_checkpoints=True).to_dict()
  script = ("import sys; from conftest import tiny_demo_config; "
            "from iqa_jax.training import loop as train; "
            "train.train_and_evaluate(tiny_demo_config(sys.argv[1]), sys.argv[2])")
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(PYTHONHASHSEED="random",
             PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]))
  done = subprocess.run([sys.executable, "-c", script, str(tiny_demo_dir), str(tmp_path)],
                        env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  again = json.loads((tmp_path / "results.json").read_text())
  assert json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True)  # every digit

  def strip(h):
    return {k: v for k, v in h.items() if k not in RUN_SPECIFIC}
  assert [strip(h) for h in checkpoint.read_history(tmp_path)] == \
      [strip(h) for h in checkpoint.read_history(first_dir)]  # losses, metrics, gate weights
  assert (tmp_path / "val_predictions.csv").read_bytes() == \
      (first_dir / "val_predictions.csv").read_bytes()
  assert (tmp_path / "splits.json").read_bytes() == (first_dir / "splits.json").read_bytes()
