"""`python -m iqa_jax.data.tfds_build`: build a benchmark as a TFDS ArrayRecord dataset.

A thin entry point: the flags and the work are in iqa_jax.data.tfds.build."""

from iqa_jax import cli
from iqa_jax.data.tfds.build import main

if __name__ == "__main__":
  cli.run(main)
