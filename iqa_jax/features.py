"""`python -m iqa_jax.features`: build a feature cache of a backbone.

A thin entry point: the flags and the work are in iqa_jax.training.features."""
import sys

from iqa_jax.training.features import main

if __name__ == "__main__":
  sys.exit(main())
