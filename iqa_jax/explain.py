"""`python -m iqa_jax.explain`: Grad-CAM and t-SNE of runs.

A thin entry point: the flags and the work are in iqa_jax.analysis.explain."""
import sys

from iqa_jax.analysis.explain import main

if __name__ == "__main__":
  sys.exit(main())
