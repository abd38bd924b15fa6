"""How commands end on Ctrl-C (iqa_jax/cli.py): one line, exit status 130, nothing orphaned,
and the run folder resumable."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from iqa_jax import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _process_state(monkeypatch):
  """cli.run sets process-wide state for the command it ends (the unraisable hook, two
  environment variables); put it back for the tests that follow."""
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  for name in (cli.WORKERS_ENV, "PYTHONWARNINGS"):
    monkeypatch.setenv(name, os.environ.get(name, ""))


def test_ctrl_c_is_one_line_and_exit_130(capsys):
  def main():
    raise KeyboardInterrupt

  with pytest.raises(SystemExit) as e:
    cli.run(main, "kept this")
  assert e.value.code == 130
  assert capsys.readouterr().err == "\ninterrupted (Ctrl-C): kept this\n"


def test_ctrl_c_swallowed_by_a_destructor_is_delivered_again(capsys):
  """Python prints and drops an exception raised in __del__; a Ctrl-C landing there (the
  pipeline's shared-memory arrays have one) used to leave training running."""
  class Cut:
    def __del__(self):
      raise KeyboardInterrupt

  def main():
    Cut()  # dropped at once: its __del__ raises, and Python only reports it
    end = time.time() + 20  # the redelivered interrupt stops this loop at once
    while time.time() < end:
      time.sleep(0.001)
    return 0

  with pytest.raises(SystemExit) as e:
    cli.run(main)
  assert e.value.code == 130
  err = capsys.readouterr().err
  assert err == "\ninterrupted (Ctrl-C)\n", err


def _group_processes(pgid: int) -> list[str]:
  """The live processes of a group (a zombie has ended; whether init reaps it is the host's)."""
  out = subprocess.run(["ps", "-eo", "pgid=,stat=,pid=,args="], capture_output=True,
                       text=True).stdout
  return [line for line in out.splitlines()
          if line.split()[0] == str(pgid) and not line.split()[1].startswith("Z")]


def test_ctrl_c_stops_training_with_loader_workers_and_the_run_resumes(tiny_demo_dir, tmp_path):
  """Ctrl-C as a terminal sends it (to the whole process group) during `python -m iqa_jax.train`
  with two grain worker processes: one line, status 130, no traceback from the workers, no
  process left, and the same command then resumes from the last finished epoch."""
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "iqa_jax.train", "--config",
         f"configs/demo.py:dir={tiny_demo_dir},epochs=40,batch=8", "--config.data.image_size=32",
         "--config.data.workers=2", f"--workdir={workdir}"]
  p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       start_new_session=True)
  err = bytearray()  # stdout (the epoch lines) and stderr (progress bars, the last line)

  def read():
    for chunk in iter(lambda: p.stdout.read1(4096), b""):
      err.extend(chunk)

  reader = threading.Thread(target=read)
  reader.start()
  deadline = time.time() + 240
  while b"epoch   1/40" not in err and p.poll() is None and time.time() < deadline:
    time.sleep(0.1)
  assert b"epoch   1/40" in err, bytes(err[-2000:]).decode()
  time.sleep(1.0)  # into the second epoch, with the workers busy
  os.killpg(p.pid, signal.SIGINT)
  try:
    rc = p.wait(60)
  finally:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
  reader.join(10)
  text = bytes(err).decode()
  assert rc == 130, text[-3000:]
  assert "Traceback" not in text, text[-3000:]
  last = [line for line in text.replace("\r", "\n").splitlines() if line.strip()][-1]
  assert last == ("interrupted (Ctrl-C): the run folder keeps every finished epoch; the same "
                  "command resumes after the last one")
  time.sleep(1)
  assert _group_processes(p.pid) == []  # the workers stopped with it
  finished = [json.loads(line)["epoch"] for line in (workdir / "history.jsonl").open()]
  assert finished and finished == list(range(len(finished)))
  done = subprocess.run([*cmd, f"--config.optim.epochs={len(finished)}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)  # resumes, trains no more
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"resume: from epoch {len(finished) + 1}" in done.stdout
