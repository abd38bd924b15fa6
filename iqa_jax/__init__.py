"""iqa_jax: no-reference image quality assessment on vision-language foundations, in JAX/Flax."""
__version__ = "0.1.0"


def __getattr__(name):
  # `from iqa_jax import Scorer` without importing jax for `import iqa_jax` alone.
  if name == "Scorer":
    from iqa_jax.scorer import Scorer
    return Scorer
  raise AttributeError(f"module 'iqa_jax' has no attribute {name!r}")
