"""`python -m iqa_jax.score`: score images into a CSV.

A thin entry point: the flags and the work are in iqa_jax.inference.score_csv."""
import sys

from iqa_jax.inference.score_csv import main

if __name__ == "__main__":
  sys.exit(main())
