"""`export --dtype bfloat16` on the tests' demo model: what the README states about it."""
import numpy as np

from iqa_jax.inference import exported as export
from iqa_jax.inference.scorer import Scorer


def test_bf16_export_scores_of_the_tiny_demo_model(trained_run, tiny_demo_dir, tmp_path):
  """Backbone weights rounded to bf16 (compute stays float32; head and gates float32), scored
  against the float32 export on 84 of the demo set's 252 tiles. bf16 keeps 8 significant bits, so
  each weight moves by up to 2^-9 = 0.2% and the score error depends on the model: the README
  gives this one's, measured, not a bound for others."""
  _, workdir, _ = trained_run
  f32 = export.export_run(str(workdir), str(tmp_path / "f32"))
  bf16 = export.export_run(str(workdir), str(tmp_path / "bf16"), dtype="bfloat16")
  images = sorted(str(p) for p in (tiny_demo_dir / "images").glob("*.png"))[::3]
  assert len(images) == 84
  ref = Scorer.from_pretrained(f32, batch_size=40)(images)
  got = Scorer.from_pretrained(bf16, batch_size=40)(images)
  error = np.abs(got - ref).max() / np.abs(ref).max()
  print(f"bf16 export: max |score error| / max |score| = {error:.2e}")
  assert error > 1e-5  # the backbone really was rounded
  # Measured 1.23e-2 (1.2%) on this 1-layer width-32 tower; keeping its biases, norms,
  # embeddings and MAP head in float32 would give 4.9e-3, so the rounding is spread over all.
  assert error <= 4e-2
