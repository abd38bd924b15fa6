"""XLA's CPU buffers on transparent huge pages: glibc's `glibc.malloc.hugetlb=1` for our commands.

XLA's CPU client allocates the temporaries of each run of a compiled program in one block and
frees it after the run: 1.25 GB for a B/16 train step at 224 px and batch 8. glibc maps a block
that large fresh from the kernel each time, so every step faulted in and zeroed ~305,000 4 KiB
pages, 0.47 s of system time a step on this project's 2-core machine. With glibc's tunable
`glibc.malloc.hugetlb=1` (glibc 2.35 and later) malloc asks for transparent huge pages
(madvise) and the same block comes in ~600 2 MiB pieces: ~1,000 faults and 0.2 s of system time
a step, and the step 4-6% faster (docs/performance.md). Numbers do not change: only where the
memory comes from.

glibc reads its tunables when a process starts, so `python -m iqa_jax.<command>` re-executes
itself once with the tunable added (`reexec_if_wanted`, called from iqa_jax/__init__.py before
anything else is imported). That happens only where it helps: Linux with glibc >= 2.35 and the
kernel's transparent huge pages in `madvise` mode (with `always` they are on already, with
`never` they cannot be). A GLIBC_TUNABLES the user set is kept and the tunable appended;
IQA_JAX_HUGE_PAGES=0 turns this off. Python code that imports iqa_jax (a `Scorer` in a notebook)
keeps its process as it is: start it with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 for the same
effect. `python -m iqa_jax.bench` says whether its process has them.
"""
from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
ENV = "IQA_JAX_HUGE_PAGES"  # "0": never re-execute
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def thp_mode(path: str = THP_MODE) -> str | None:
  """The kernel's transparent huge page mode ('always', 'madvise', 'never'), None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, ...] | None:
  name, version = platform.libc_ver()
  if name != "glibc" or not version:
    return None
  try:
    return tuple(int(part) for part in version.split("."))
  except ValueError:
    return None


def wanted(environ, system: str, glibc: tuple[int, ...] | None, thp: str | None) -> bool:
  """Whether a command should re-execute itself with TUNABLE (the module docstring's rule)."""
  if environ.get(ENV, "1") == "0" or "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
    return False
  return system == "linux" and glibc is not None and glibc >= MIN_GLIBC and thp == "madvise"


def active() -> bool:
  """Whether this process was started with TUNABLE."""
  return TUNABLE in os.environ.get("GLIBC_TUNABLES", "")


def _runs_iqa_jax_module(argv: list[str]) -> bool:
  """Whether a Python command line runs a module of iqa_jax with -m."""
  for flag, value in zip(argv, argv[1:], strict=False):
    if flag == "-m":
      return value == "iqa_jax" or value.startswith("iqa_jax.")
  return False


def reexec_if_wanted() -> None:
  """Re-executes `python -m iqa_jax.<command> ...` with TUNABLE added, where `wanted`; returns
  (and the command runs as it is) for anything else: an import from Python code, a failed exec."""
  argv = getattr(sys, "orig_argv", None) or []
  if sys.argv[:1] != ["-m"] or not _runs_iqa_jax_module(argv):  # `python -m iqa_jax.<command>`
    return
  if not wanted(os.environ, sys.platform, glibc_version(), thp_mode()):
    return
  env = dict(os.environ)
  env["GLIBC_TUNABLES"] = ":".join(filter(None, (env.get("GLIBC_TUNABLES"), TUNABLE)))
  try:
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)
  except OSError:
    return

