"""Score images into a CSV:

python -m iqa_jax.score (--workdir RUN | --model DIR) --out scores.csv IMAGES...

IMAGES are files, folders (searched recursively, symlinked folders followed), globs, or
@list.txt (one path per line). Rows stream to disk as they are scored (path, score = the head's
raw output, mos = score on the training set's scale, error); an unreadable input gets its error
in its row and the exit status is 1. One process writes a CSV at a time (a lock, OUT.lock).
Beside every CSV, OUT.meta.json records what made it (model fingerprint, view, crops, the input
list's digest, shard K/N); --resume and merge refuse a mismatch, and --out must be a new path or
a CSV score wrote. --shard K/N scores every N-th input from the K-th (K = 0..N-1), for job
arrays; then  python -m iqa_jax.score merge OUT.csv PART0.csv PART1.csv ...  joins the parts.
"""
from __future__ import annotations

import collections
import contextlib
import csv
import glob
import hashlib
import io
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from iqa_jax.inference.scorer import VIEWS, Scorer, model_fingerprint

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".jfif"}
COLUMNS = ("path", "score", "mos", "error")
HEADER = ",".join(COLUMNS) + "\n"
SIDECAR = ".meta.json"          # OUT.csv.meta.json, beside every CSV score writes
LEGACY_SIDECAR = ".shard.json"  # what shards had before: read, never written
WRITTEN_BY = "iqa_jax.score"
SIDECAR_KEYS = ("written_by", "model", "model_source", "view", "crops", "inputs",
                "inputs_sha256", "shard", "of")
LEGACY_KEYS = ("shard", "of", "inputs", "inputs_sha256")


class UsageError(ValueError):
  """A user mistake (flag, file, CSV): one line naming it and the fix, exit status 2."""


def _warn(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _folder_images(folder: str) -> list[str]:
  """Image files under `folder`, symlinked sub-folders followed; a folder reached twice (a
  symlink loop, or a second link to it) is read once, with a note. Hidden files and folders
  (names starting with '.', e.g. macOS's `._IMG_1.jpg`) and files without an image extension
  are left out, and one note counts them by kind."""
  found, seen, skipped = [], {}, collections.Counter()
  for root, dirs, files in os.walk(folder, followlinks=True):
    st = os.stat(root)
    key = (st.st_dev, st.st_ino)
    if key in seen:
      _warn(f"note: {root} is {seen[key]} again (a symlink loop or a second link); read once")
      dirs[:] = []
      continue
    seen[key] = root
    skipped["hidden folder"] += sum(d.startswith(".") for d in dirs)
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for f in sorted(files):
      ext = os.path.splitext(f)[1].lower()
      if f.startswith("."):
        skipped["hidden file"] += 1
      elif ext in IMAGE_EXTS:
        found.append(os.path.join(root, f))
      else:
        skipped[f"{ext} file" if ext else "file without extension"] += 1
  kinds = ", ".join(f"{n} {kind}{'s' * (n > 1)}" for kind, n in skipped.most_common() if n)
  if kinds:
    _warn(f"note: {folder}: not scored: {kinds} (image extensions: "
          f"{' '.join(sorted(IMAGE_EXTS))})")
  if not found:
    _warn(f"note: {folder} holds no image file")
  return found


def expand_inputs(inputs: Iterable[str]) -> list[str]:
  """Files, folders, globs and @file-lists -> an ordered list of paths (missing ones kept, each
  path once). What a folder or glob leaves out is noted on stderr, never dropped silently."""
  paths: list[str] = []
  for item in inputs:
    if item.startswith("@"):
      try:
        with open(item[1:]) as f:
          paths.extend(line.strip() for line in f if line.strip() and not line.startswith("#"))
      except OSError as e:
        raise UsageError(f"cannot read the input list {item[1:]} ({e.strerror}); pass an "
                         f"existing file after '@'") from None
    elif os.path.isdir(item):
      paths.extend(_folder_images(item))
    elif any(ch in item for ch in "*?[") and not os.path.exists(item):
      matched = sorted(glob.glob(item, recursive=True))
      if not matched:
        _warn(f"note: {item} matched no file")
      for path in matched:  # as if the shell had expanded it
        paths.extend(_folder_images(path) if os.path.isdir(path) else [path])
    else:
      paths.append(item)  # a missing file is reported in its row, never dropped
  unique = list(dict.fromkeys(paths))
  if len(unique) < len(paths):
    _warn(f"note: {len(paths) - len(unique)} input(s) were listed more than once; scored once")
  return unique


def parse_shard(text: str) -> tuple[int, int]:
  """'K/N' -> (K, N) with 0 <= K < N."""
  try:
    k, n = (int(x) for x in text.split("/"))
  except ValueError:
    raise UsageError(f"--shard {text!r}: expected K/N, e.g. --shard 0/4 (K = 0..N-1)") from None
  if n < 1 or not 0 <= k < n:
    raise UsageError(f"--shard {text!r}: K must be in 0..N-1 and N >= 1")
  return k, n


def read_sidecar(csv_path: str) -> tuple[str, dict] | None:
  """-> (its path, its fields) for CSV_PATH.meta.json, else an older shard's CSV_PATH.shard.json;
  None when there is neither. A sidecar that is not ours or lacks a field is refused."""
  for suffix, keys in ((SIDECAR, SIDECAR_KEYS), (LEGACY_SIDECAR, LEGACY_KEYS)):
    path = csv_path + suffix
    if not os.path.exists(path):
      continue
    try:
      meta = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
      raise UsageError(f"{path} is not valid JSON; score {csv_path} again into a new "
                       f"--out") from None
    if not isinstance(meta, dict):
      raise UsageError(f"{path} holds a JSON {type(meta).__name__}, not a score sidecar; score "
                       f"{csv_path} again into a new --out")
    missing = [k for k in keys if k not in meta]
    if missing:
      raise UsageError(f"{path} has no {missing[0]!r} field ({len(missing)} missing); score "
                       f"{csv_path} again into a new --out")
    if suffix == SIDECAR and meta["written_by"] != WRITTEN_BY:
      raise UsageError(f"{path}: written_by {meta['written_by']!r}, not {WRITTEN_BY!r}; pass "
                       f"another --out")
    return path, meta
  return None


def _first_line(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read(len(HEADER))


def check_out(out: str, inputs: Sequence[str] = (), what: str = "--out",
              role: str = "inputs") -> None:
  """A CSV is written only to a new path or over a CSV score wrote (our exact header and our
  sidecar): an image, a keep.txt or a dataset's dmos.csv is refused before anything is read."""
  real = os.path.realpath(out)
  name = os.path.basename(real)  # realpath only where it can match: inputs may be 100k paths
  clash = next((p for p in inputs if (os.path.basename(p) == name or os.path.islink(p))
                and os.path.realpath(p) == real), None)
  if clash is not None:
    raise UsageError(f"{what} {out} is one of the {role} ({clash}); pass another {what}")
  if not os.path.lexists(out):
    return
  if not os.path.isfile(out):
    raise UsageError(f"{what} {out} is not a regular file; pass another {what}")
  first = _first_line(out)
  if first != HEADER.encode():
    shown = first.split(b"\n")[0].decode(errors="replace")[:40]
    raise UsageError(f"{what} {out} is not a score CSV (first line {shown!r}, expected "
                     f"{HEADER.strip()}); score writes only a new file or a CSV it wrote: pass "
                     f"another {what}")
  if read_sidecar(out) is None:
    raise UsageError(f"{what} {out} has no sidecar {out + SIDECAR}, so score did not write it "
                     f"(or wrote it before sidecars); pass another {what}, or delete it yourself")


def check_sidecar_matches(side: str, old: dict, new: dict, fields: Sequence[str], fix: str,
                          new_name: str = "this command's") -> None:
  """Names the first field in which `old` (read from `side`) differs from `new`."""
  missing = "(not recorded)"
  for field in fields:
    if old.get(field, missing) != new.get(field, missing):
      raise UsageError(f"{side}: field {field!r} is {old.get(field, missing)!r}, {new_name} is "
                       f"{new.get(field, missing)!r}; {fix}")


@contextlib.contextmanager
def csv_lock(out: str):
  """Holds OUT.lock (flock) while `out` is written: a second writer is refused, and a killed
  writer's lock is released by the kernel."""
  import fcntl
  path = out + ".lock"
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
      os.close(fd)
      raise UsageError(f"{out} is being written by another score process (pid {holder}, lock "
                       f"{path}); wait for it to finish or pass another --out") from None
    # The holder before us may have unlinked the file we opened: lock the one on disk.
    if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
      break
    os.close(fd)
  os.ftruncate(fd, 0)
  os.write(fd, str(os.getpid()).encode())
  try:
    yield
  finally:
    os.unlink(path)
    os.close(fd)


def read_score_csv(out: str) -> tuple[list[list[str]], bool]:
  """-> (complete rows, whether the last line was cut). Refuses a file that is not a score CSV."""
  with open(out, newline="") as f:
    text = f.read()
  if not text:
    return [], False
  cut = not text.endswith("\n")  # rows end with a newline: a crash mid-row leaves none
  rows = list(csv.reader(io.StringIO(text)))
  if cut:
    rows = rows[:-1]
  if not rows or tuple(rows[0]) != COLUMNS:
    raise UsageError(f"{out} is not a score CSV (first line {','.join(rows[0]) if rows else ''!r},"
                     f" expected {','.join(COLUMNS)}); pass another --out")
  for n, row in enumerate(rows[1:], start=2):
    if len(row) != len(COLUMNS):
      raise UsageError(f"{out} line {n}: {len(row)} fields, expected {len(COLUMNS)}; fix or "
                       f"delete that row, or pass another --out")
  return rows[1:], cut


def _is_scored(row: Sequence[str]) -> bool:
  try:
    return row[3] == "" and math.isfinite(float(row[1]))
  except ValueError:
    return False


def _write_rows(out: str, rows: Iterable[Sequence[str]]) -> None:
  """The whole CSV, atomically (temp file + os.replace)."""
  tmp = f"{out}.tmp{os.getpid()}"
  with open(tmp, "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows(rows)
  os.replace(tmp, out)


def check_arguments(out: str, batch_size: int, workers: int, crops: int | None,
                    view: str | None) -> None:
  """Every argument checked before --out (or anything beside it) is touched."""
  if batch_size < 1:
    raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
  if workers < 1:
    raise UsageError(f"--workers must be >= 1, got {workers}")
  if crops is not None and crops < 1:
    raise UsageError(f"--crops must be >= 1, got {crops}")
  if view is not None and view not in VIEWS:
    raise UsageError(f"--view must be one of {VIEWS}, got {view!r}")
  if os.path.isdir(out):
    raise UsageError(f"--out {out} is a folder; pass a CSV file path, e.g. {out}/scores.csv")
  parent = os.path.dirname(os.path.abspath(out))
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise UsageError(f"--out {out}: {parent} is a file, not a folder")


def _inputs_digest(paths: Sequence[str]) -> str:
  return hashlib.sha256("\n".join(paths).encode()).hexdigest()


def score_paths(model: str, paths: Sequence[str], out: str, *, batch_size: int = 32,
                which: str | None = None, resume: bool = False, workers: int = 4,
                progress: bool = True, view: str | None = None, crops: int | None = None,
                shard: tuple[int, int] | None = None) -> dict:
  """Scores `paths` with `model` (a run folder or an exported folder) into the CSV `out`.

  -> {'scored', 'failed', 'kept', 'rescored', 'inputs', 'cpu_dots'}: new rows, rows with an
  error, rows kept from an earlier --resume'd CSV, earlier cut or error rows scored again, and
  the CPU dot kernels the forward ran with (Scorer.cpu_dots).
  """
  check_arguments(out, batch_size, workers, crops, view)
  paths = list(dict.fromkeys(paths))
  check_out(out, paths)
  digest, n_all = _inputs_digest(paths), len(paths)
  k, n = shard or (0, 1)
  paths = paths[k::n]
  Path(out).parent.mkdir(parents=True, exist_ok=True)
  with csv_lock(out):
    old = read_sidecar(out) if resume and os.path.exists(out) else None
    old_rows, cut = read_score_csv(out) if old else ([], False)
    scorer = Scorer.from_pretrained(model, which=which, batch_size=batch_size, view=view,
                                    crops=crops)
    meta = {"written_by": WRITTEN_BY, "model": model_fingerprint(scorer.loaded),
            "model_source": str(model), "view": scorer.view,
            "crops": scorer.crops if scorer.view == "crops" else None,
            "inputs": n_all, "inputs_sha256": digest, "shard": k, "of": n,
            "about": describe_model(model, which, scorer)}
    if old:  # an unsharded CSV may grow its input list; a shard is a slice of one list
      check_sidecar_matches(
          old[0], old[1], meta, ("model", "view", "crops", "shard", "of")
          + (("inputs", "inputs_sha256") if n > 1 else ()),
          "--resume continues the command that wrote it: pass that command's flags, or another "
          "--out")
    wanted = set(paths)
    redo = {r[0] for r in old_rows if not _is_scored(r) and r[0] in wanted}
    if cut:
      redo.add(_cut_path(out))
    kept = [r for r in old_rows if r[0] not in redo]
    done = {r[0] for r in kept}
    todo = [p for p in paths if p not in done]
    _write_rows(out, kept)  # resume: the cut line and the rows to retry go; the rest stays
    _write_sidecar(out, meta)
    summary = _stream_rows(scorer, todo, out, workers, progress)
    summary.update(kept=len(kept), rescored=len(redo & set(todo)), inputs=len(paths),
                   cpu_dots=scorer.cpu_dots)
    if resume and redo:  # retried rows were appended: put the CSV back in input order
      rows, _ = read_score_csv(out)
      order = {p: i for i, p in enumerate(paths)}
      rows.sort(key=lambda r: order.get(r[0], len(order)))
      _write_rows(out, rows)
  return summary


def describe_model(model: str, which: str | None, scorer: Scorer) -> dict:
  """The sidecar's `about`: the model that made a CSV in words (the gallery page shows it)."""
  info = scorer.loaded.info
  exported = info.get("exported")
  config = exported or info.get("config") or {}
  m = config.get("model", {})
  source = (exported.get("source") or {}) if exported else {}
  return {"path": str(Path(model).resolve()), "kind": "exported" if exported else "run",
          "checkpoint": source.get("checkpoint") if exported else (which or "best"),
          "run": source.get("run") if exported else str(Path(model).resolve()),
          "dataset": info.get("dataset"), "backbone": m.get("backbone"), "head": m.get("head"),
          "finetune": m.get("finetune")}


def _cut_path(out: str) -> str:
  """The path field of a cut last line (what the rescored row replaces)."""
  with open(out, newline="") as f:
    last = f.read().rsplit("\n", 1)[-1]
  return next(csv.reader([last]), [""])[0]


def _write_json(path: str, obj: dict) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  Path(tmp).write_text(json.dumps(obj, indent=2))
  os.replace(tmp, path)


def _write_sidecar(out: str, meta: dict) -> None:
  """OUT.meta.json, atomically; an older shard's OUT.shard.json beside it goes."""
  _write_json(out + SIDECAR, meta)
  with contextlib.suppress(FileNotFoundError):
    os.unlink(out + LEGACY_SIDECAR)


def _stream_rows(scorer: Scorer, todo: Sequence[str], out: str, workers: int,
                 progress: bool) -> dict:
  """Appends one row per path as batches finish; flushed, so a crash loses nothing written."""
  from tqdm.auto import tqdm
  scale, offset = scorer.mos_scale
  bar = tqdm(total=len(todo), unit="img", desc="score", disable=not progress, file=sys.stderr,
             dynamic_ncols=True)
  scored = failed = 0
  with open(out, "a", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    def flush(n):
      f.flush()
      bar.update(n)
    for i, s, err in scorer.score_stream(todo, workers=workers, on_batch=flush):
      if s is None:
        writer.writerow((todo[i], "", "", err))
        failed += 1
      else:
        writer.writerow((todo[i], f"{s:.6f}", f"{s * scale + offset:.6f}", ""))
        scored += 1
  bar.close()
  return {"scored": scored, "failed": failed}


def merge_parts(out: str, parts: Sequence[str]) -> int:
  """Joins the CSVs of `--shard K/N` runs into `out` in input order, checking that the parts
  are the N shards of one input list and that every input appears exactly once. -> rows."""
  check_arguments(out, 1, 1, None, None)
  check_out(out, parts, what="merge OUT", role="parts")
  metas = []
  for part in parts:
    if not os.path.exists(part):
      raise UsageError(f"{part} not found")
    found = read_sidecar(part)
    if found is None:
      raise UsageError(f"{part + SIDECAR} not found: {part} was not written by `score --shard "
                       f"K/N`")
    metas.append(found[1])
  n = metas[0]["of"]
  fields = [f for f in ("model", "view", "crops", "of", "inputs", "inputs_sha256")
            if any(f in m for m in metas)]  # an older part records fewer: compare what any has
  for part, m in zip(parts[1:], metas[1:], strict=True):
    check_sidecar_matches(read_sidecar(part)[0], m, metas[0], fields,
                          "merge parts of one `score --shard` job only", f"{parts[0]}'s")
  got = sorted(m["shard"] for m in metas)
  if got != list(range(n)):
    missing = sorted(set(range(n)) - set(got))
    twice = sorted({k for k in got if got.count(k) > 1})
    raise UsageError(f"the parts are not the {n} shards once each (missing {missing}, repeated "
                     f"{twice}); pass every PART.csv of the job exactly once")
  total = metas[0]["inputs"]
  by_shard, seen = {}, {}
  for part, m in zip(parts, metas, strict=True):
    rows, cut = read_score_csv(part)
    expected = len(range(m["shard"], total, n))
    if cut or len(rows) != expected:
      raise UsageError(f"{part} has {len(rows)} complete rows, shard {m['shard']}/{n} has "
                       f"{expected} inputs; finish it with `score ... --shard {m['shard']}/{n} "
                       f"--resume`")
    for r in rows:
      if r[0] in seen:
        raise UsageError(f"{r[0]} appears in {seen[r[0]]} and {part}; merge parts of one job")
      seen[r[0]] = part
    by_shard[m["shard"]] = rows
  merged = [by_shard[i % n][i // n] for i in range(total)]
  meta = {k: metas[0].get(k) for k in SIDECAR_KEYS + ("about",)}
  meta.update(written_by=WRITTEN_BY, shard=0, of=1)
  Path(out).parent.mkdir(parents=True, exist_ok=True)
  with csv_lock(out):
    _write_rows(out, merged)
    _write_sidecar(out, meta)
  return len(merged)


