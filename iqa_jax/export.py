"""`python -m iqa_jax.export`: export a run as one self-contained folder.

A thin entry point: the flags and the work are in iqa_jax.inference.exported."""
import sys

from iqa_jax.inference.exported import main

if __name__ == "__main__":
  sys.exit(main())
