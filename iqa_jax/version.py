"""The package version: written into what iqa_jax makes (TFDS build metadata)."""
__version__ = "0.1.0"
