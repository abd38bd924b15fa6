"""`python -m iqa_jax.plots`: PNGs of a run or of a run matrix.

A thin entry point: the flags and the work are in iqa_jax.analysis.plots."""
import sys

from iqa_jax.analysis.plots import main

if __name__ == "__main__":
  sys.exit(main())
