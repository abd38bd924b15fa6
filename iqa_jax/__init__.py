"""iqa_jax: no-reference image quality assessment on vision-language foundations, in JAX/Flax."""
from iqa_jax import cli, huge_pages
from iqa_jax.version import __version__  # noqa: F401

huge_pages.reexec_if_wanted()  # `python -m iqa_jax.<command>` only, before anything heavy loads
cli.ignore_ctrl_c_in_workers()  # a command's data worker processes leave Ctrl-C to it


def __getattr__(name):
  # `from iqa_jax import Scorer` without importing jax for `import iqa_jax` alone.
  if name == "Scorer":
    from iqa_jax.inference.scorer import Scorer
    return Scorer
  raise AttributeError(f"module 'iqa_jax' has no attribute {name!r}")
