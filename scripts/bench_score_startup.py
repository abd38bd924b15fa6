"""Start-up of `python -m iqa_jax.score` on a handful of images (issue 24): the wall time from
the command to its first scored batch (the progress bar's first count) and to its end, run after
run, without the persistent XLA compilation cache, then with it (first the run that fills it,
then runs that read it: `--compilation-cache DIR`), beside the time `import iqa_jax.score`
alone takes.

python scripts/bench_score_startup.py --model checkpoints/demo/model --images 8 [--repeat 2]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FIRST_COUNT = re.compile(r"\|\s*([1-9]\d*)/\d+")  # tqdm's "| 8/8" once a batch is scored


def timed_run(cmd: list[str], env: dict) -> dict:
  """-> {first, end} seconds from the start of `cmd`; first is None if no count was printed."""
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True, bufsize=1)
  first = []
  err = []

  def read():
    buf = ""
    while chunk := proc.stderr.read(1):
      buf += chunk
      if not first and FIRST_COUNT.search(buf[-80:]):
        first.append(time.perf_counter() - t0)
      err.append(chunk)

  reader = threading.Thread(target=read)
  reader.start()
  rc = proc.wait()
  reader.join()
  end = time.perf_counter() - t0
  if rc != 0:
    raise SystemExit(f"error: {' '.join(cmd)} exited {rc}: {''.join(err)[-400:]}")
  return {"first": first[0] if first else None, "end": end}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", required=True, help="model folder made by iqa_jax.export")
  ap.add_argument("--images", type=int, default=8, help="how many demo images to score")
  ap.add_argument("--image-dir", default="demo_data", help="where the images are (recursive)")
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--repeat", type=int, default=2, help="runs of each kind")
  a = ap.parse_args(argv)
  files = sorted(p for p in Path(a.image_dir).rglob("*") if p.suffix.lower() in
                 (".png", ".jpg", ".jpeg", ".bmp"))[:a.images]
  if len(files) < a.images:
    raise SystemExit(f"error: {a.image_dir} holds {len(files)} images, not {a.images}")
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "iqa_jax.score", *map(str, files), "--model", a.model,
           "--batch-size", str(a.batch_size)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    cache = ["--compilation-cache", str(Path(tmp) / "xla")]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import iqa_jax.score"], env=env, check=True)
    print(f"import iqa_jax.score: {time.perf_counter() - t0:.1f} s")
    runs = [("no cache", [])] * a.repeat + [("cache, filling", cache)]
    runs += [("cache, warm", cache)] * a.repeat
    for i, (kind, flags) in enumerate(runs):
      r = timed_run(cmd + flags + ["--out", str(Path(tmp) / f"s{i}.csv")], env)
      first = "n/a" if r["first"] is None else f"{r['first']:.1f} s"
      print(f"{kind:15s} {len(files)} images, batch {a.batch_size}: first batch {first}, "
            f"end {r['end']:.1f} s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
