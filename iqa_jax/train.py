"""`python -m iqa_jax.train`: train a quality model into a run folder.

A thin entry point: the flags and the work are in iqa_jax.training.loop."""
import sys

from iqa_jax.training.loop import main

if __name__ == "__main__":
  sys.exit(main())
