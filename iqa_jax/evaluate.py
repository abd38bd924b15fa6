"""`python -m iqa_jax.evaluate`: evaluate a run on a whole other dataset.

A thin entry point: the flags and the work are in iqa_jax.inference.evaluate."""
import sys

from iqa_jax.inference.evaluate import main

if __name__ == "__main__":
  sys.exit(main())
