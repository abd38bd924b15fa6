"""iqa_jax: no-reference image quality assessment on vision-language foundations, in JAX/Flax."""
__version__ = "0.1.0"
