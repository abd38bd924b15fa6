"""`python -m iqa_jax.data.tfds_build`: build a benchmark as a TFDS ArrayRecord dataset.

A thin entry point: the flags and the work are in iqa_jax.data.tfds.build."""
import sys

from iqa_jax.data.tfds.build import main

if __name__ == "__main__":
  sys.exit(main())
