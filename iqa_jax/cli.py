"""How `python -m iqa_jax.<command>` ends: `run(main)` is each command's `sys.exit(main())`.

Ctrl-C (SIGINT) ends a command with one line on stderr, saying what it kept and how to go on,
and exit status 130 (the shell's code for SIGINT), instead of a traceback from wherever the
interrupt landed. By then every `with` and `finally` of the command has run (a score CSV's lock
is released; checkpoints and run files are written atomically, so a cut write leaves the last
complete one). A terminal sends Ctrl-C to every process of the command, and the data
pipeline's worker processes (grain's, started by multiprocessing) ignore it from their first
import of iqa_jax on (`ignore_ctrl_c_in_workers`, before their heavy imports); the main process
stops them by collecting the cut command's iterators, as a finished epoch does: no tracebacks
from them, no orphaned workers.
"""
from __future__ import annotations

import _thread
import gc
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

INTERRUPTED = 130  # 128 + SIGINT
WORKERS_ENV = "IQA_JAX_WORKERS_IGNORE_CTRL_C"  # set by `run` for the processes it starts
# multiprocessing's resource tracker (a process of its own, started with the command's
# environment) unlinks the shared memory grain's workers leave when they stop, and says so in
# two lines per run ("There appear to be 8 leaked shared_memory objects to clean up at
# shutdown"; grain issue 398). It does clean them up; the lines only alarm.
QUIET_TRACKER = "ignore:resource_tracker:UserWarning"


def ignore_ctrl_c_in_workers() -> None:
  """Called from iqa_jax/__init__.py: in a multiprocessing child of a command (a grain worker)
  Ctrl-C is ignored; the command's main process acts on it. Anything else keeps its handler."""
  spawned = any(arg.startswith("from multiprocessing.spawn import")  # parent_process() is
                for arg in getattr(sys, "orig_argv", ()))            # not set this early
  if os.environ.get(WORKERS_ENV) == "1" and spawned:
    try:
      signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: leave it
      pass


def _reraise_ctrl_c(unraisable) -> None:
  """sys.unraisablehook: a Ctrl-C that lands in a __del__ (the pipeline's shared-memory arrays
  have one) is printed and dropped there by Python; deliver it again to the main thread."""
  if isinstance(unraisable.exc_value, KeyboardInterrupt):
    # From another thread, a moment later: raised now, it would land in this hook and be
    # dropped too.
    timer = threading.Timer(0.01, _thread.interrupt_main)
    timer.daemon = True
    timer.start()
    return
  sys.__unraisablehook__(unraisable)


def run(main: Callable[[], int | None], kept: str = "") -> NoReturn:
  """sys.exit(main()); on Ctrl-C one line, `interrupted (Ctrl-C)[: kept]`, and exit 130."""
  sys.unraisablehook = _reraise_ctrl_c
  os.environ[WORKERS_ENV] = "1"
  warnings = os.environ.get("PYTHONWARNINGS", "")
  if QUIET_TRACKER not in warnings:
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (warnings, QUIET_TRACKER)))
  interrupted = False
  try:
    code = main()
  except KeyboardInterrupt:
    interrupted = True  # leave the except block first: its traceback holds the cut frames
  if interrupted:
    sys.stdout.flush()
    print(f"\ninterrupted (Ctrl-C){': ' + kept if kept else ''}", file=sys.stderr, flush=True)
    gc.collect()  # the cut frames' data iterators close, and their workers stop
    code = INTERRUPTED
  sys.exit(code)
