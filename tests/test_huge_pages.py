"""`python -m iqa_jax.<command>` re-executes itself with glibc.malloc.hugetlb=1 where that helps."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iqa_jax import huge_pages

ROOT = Path(__file__).resolve().parent.parent
# Started in every Python process of the command (the first and the re-executed one); its atexit
# hook runs in the process that finishes, so it reports the environment the command ran with.
SITECUSTOMIZE = """
import atexit, os, sys
atexit.register(lambda: sys.stderr.write(
    "TUNABLES=" + repr(os.environ.get("GLIBC_TUNABLES")) + "\\n"))
"""


@pytest.mark.parametrize("environ, system, glibc, thp, want", [
    ({}, "linux", (2, 36), "madvise", True),
    ({}, "linux", (2, 35), "madvise", True),
    ({}, "linux", (2, 34), "madvise", False),  # no such tunable before 2.35
    ({}, "linux", None, "madvise", False),  # musl
    ({}, "linux", (2, 36), "always", False),  # huge pages already
    ({}, "linux", (2, 36), "never", False),
    ({}, "linux", (2, 36), None, False),
    ({}, "darwin", None, None, False),
    ({"IQA_JAX_HUGE_PAGES": "0"}, "linux", (2, 36), "madvise", False),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "linux", (2, 36), "madvise", False),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, "linux", (2, 36), "madvise", True),
])
def test_wanted_only_where_it_helps_and_never_over_the_users_choice(environ, system, glibc, thp,
                                                                    want):
  assert huge_pages.wanted(environ, system, glibc, thp) is want


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert huge_pages.thp_mode(str(f)) == "madvise"
  assert huge_pages.thp_mode(str(tmp_path / "missing")) is None


def run(site: Path, args, **env):
  """Runs `python *args` with only `env` of ours set; -> GLIBC_TUNABLES as the command ended."""
  environ = {k: v for k, v in os.environ.items()
             if k not in ("GLIBC_TUNABLES", huge_pages.ENV)} | env
  environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(site), environ.get("PYTHONPATH"))))
  p = subprocess.run([sys.executable, *args], cwd=ROOT, env=environ, capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  return p.stderr.rsplit("TUNABLES=", 1)[1].strip()


@pytest.fixture
def site(tmp_path) -> Path:
  (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
  return tmp_path


def test_a_command_runs_with_the_tunable_where_wanted(site):
  here = huge_pages.wanted({}, sys.platform, huge_pages.glibc_version(), huge_pages.thp_mode())
  got = run(site, ["-m", "iqa_jax.score", "--help"])
  assert got == (repr(huge_pages.TUNABLE) if here else "None")
  # The user's tunables are kept; IQA_JAX_HUGE_PAGES=0 leaves the process alone.
  got = run(site, ["-m", "iqa_jax.score", "--help"], GLIBC_TUNABLES="glibc.malloc.trim_threshold=1")
  assert got == repr("glibc.malloc.trim_threshold=1" + (":" + huge_pages.TUNABLE if here else ""))
  assert run(site, ["-m", "iqa_jax.score", "--help"], IQA_JAX_HUGE_PAGES="0") == "None"


def test_importing_iqa_jax_leaves_the_process_alone(site):
  assert run(site, ["-c", "import iqa_jax.score"]) == "None"
  assert not huge_pages._runs_iqa_jax_module(["python", "-m", "pytest", "-m", "iqa_jax.x"])
  assert huge_pages._runs_iqa_jax_module(["python", "-X", "importtime", "-m", "iqa_jax.train"])
