"""Issue 5, item 7: the same config and seed on the same CPU give the same metrics to the last
digit, and the same per-image predictions and gate weights."""
import json

from conftest import tiny_demo_config

from iqa_jax.runs import checkpoint
from iqa_jax.training import loop as train

RUN_SPECIFIC = ("time_s", "train_img_per_s")  # wall-clock numbers


def test_same_config_and_seed_give_identical_results(trained_run, tiny_demo_dir, tmp_path,
                                                     fresh_compiles):
  """The second run compiles its programs again (no session cache): a rerun in a new process
  would too."""
  config, first_dir, first = trained_run
  # The shared run also keeps its per-epoch params; that changes what is saved, not computed.
  assert config.to_dict() == tiny_demo_config(tiny_demo_dir,
                                              keep_epoch_checkpoints=True).to_dict()
  again = train.train_and_evaluate(tiny_demo_config(tiny_demo_dir), str(tmp_path))
  assert json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True)  # every digit

  def strip(h):
    return {k: v for k, v in h.items() if k not in RUN_SPECIFIC}
  assert [strip(h) for h in checkpoint.read_history(tmp_path)] == \
      [strip(h) for h in checkpoint.read_history(first_dir)]  # losses, metrics, gate weights
  assert (tmp_path / "val_predictions.csv").read_bytes() == \
      (first_dir / "val_predictions.csv").read_bytes()
  assert (tmp_path / "splits.json").read_bytes() == (first_dir / "splits.json").read_bytes()
