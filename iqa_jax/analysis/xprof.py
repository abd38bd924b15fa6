"""Where a compiled step spends its time on the host: `jax.profiler` trace -> top XLA ops.

On the CPU, XLA names each of its kernels (a fusion, a dot, a copy) with an event on the
thread-pool lines of the trace when the backend starts with `--xla_cpu_enable_xprof_traceme`
(`TRACEME_FLAG`; `bench --profile` sets it). `top_ops` adds up those events by op name, over
all threads, per traced step, and joins each name with the compiled HLO, so that a row says
what the op computes (`f32[3136,768]{1,0} fusion kCustom [dot]`) and which model path made it.
"""
from __future__ import annotations

import collections
import os
import re
from pathlib import Path

TRACEME_FLAG = "--xla_cpu_enable_xprof_traceme=true"
# Bookkeeping events of the CPU runtime, not kernels: waiting and dispatch.
_NOT_KERNELS = ("ThunkExecutor", "Await", "ThreadpoolListener", "TfrtCpu", "PjRt")


def enable_traceme() -> None:
  """Adds `TRACEME_FLAG` to the user's XLA_FLAGS (keeping theirs); before the backend starts."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_enable_xprof_traceme" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {TRACEME_FLAG}".strip()


def hlo_ops(hlo_text: str) -> dict[str, dict]:
  """Op name -> {"desc": result type, opcode, fusion kind and the opcodes it fuses;
  "source": the model path that made it, layer numbers as `*`}, from compiled HLO text."""
  fused, ops, computation = collections.defaultdict(set), {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"%?([\w.\-]+) .*\{$", line)
    if head and not line.startswith(" "):
      computation = head.group(1)
      continue
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*)", line)
    if not m:
      continue
    name, shape, opcode, rest = m.groups()
    if opcode not in ("parameter", "constant", "bitcast", "broadcast", "tuple",
                      "get-tuple-element"):
      fused[computation].add(opcode)
    kind = re.search(r"kind=(\w+)", rest)
    calls = re.search(r"calls=%([\w.\-]+)", rest)
    source = re.search(r'op_name="(?:jit\([^)]*\)/)?([^"]*)"', rest)
    ops.setdefault(name, {"shape": shape, "opcode": opcode, "kind": kind and kind.group(1),
                          "calls": calls and calls.group(1),
                          "source": short_source(source.group(1)) if source else ""})
  for op in ops.values():
    inner = "+".join(sorted(fused.get(op.pop("calls"), ())))
    op["desc"] = " ".join(filter(None, (op.pop("shape"), op.pop("opcode"), op.pop("kind"),
                                        inner and f"[{inner}]")))
  return ops


def short_source(op_name: str) -> str:
  """A model path with layer numbers as `*` and scan's loop plumbing left out."""
  op_name = op_name.split(";")[0]
  op_name = re.sub(r"while/body/(closed_call/)?|[\w.]+\.step/", "", op_name)
  return re.sub(r"_\d+(?=/|$)", "_*", op_name)


def trace(fn, steps: int, trace_dir: str | Path) -> Path:
  """Runs `fn()` (which must block on its result) `steps` times under `jax.profiler.trace`."""
  import jax

  trace_dir = Path(trace_dir)
  with jax.profiler.trace(str(trace_dir)):
    for _ in range(steps):
      fn()
  return max(trace_dir.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)


def kernel_times(xplane: str | Path) -> tuple[collections.Counter, collections.Counter]:
  """Op name -> kernel ns and -> calls, over all of XLA's threads in the trace."""
  from jax.profiler import ProfileData

  total_ns, calls = collections.Counter(), collections.Counter()
  for plane in ProfileData.from_file(str(xplane)).planes:
    for line in plane.lines:
      if "Eigen" not in line.name and "XLA" not in line.name:  # XLA's thread pools
        continue
      for event in line.events:
        if not any(s in event.name for s in _NOT_KERNELS):
          total_ns[event.name] += event.duration_ns
          calls[event.name] += 1
  return total_ns, calls


def _rank(times, ops: dict, steps: int, top: int, by: str) -> tuple[list[dict], float]:
  total_ns, calls = times
  all_ns = sum(total_ns.values()) or 1.0
  if by == "source":
    grouped_ns, grouped_calls = collections.Counter(), collections.Counter()
    for name, ns in total_ns.items():
      key = ops.get(name, {}).get("source") or name
      grouped_ns[key] += ns
      grouped_calls[key] += calls[name]
    total_ns, calls, ops = grouped_ns, grouped_calls, {}
  rows = [{"op": name, "ms": ns / 1e6 / steps, "share": ns / all_ns,
           "calls": calls[name] // steps, "hlo": ops.get(name, {}).get("desc", ""),
           "source": ops.get(name, {}).get("source", name if by == "source" else "")}
          for name, ns in total_ns.most_common(top)]
  return rows, sum(times[0].values()) / 1e6 / steps


def top_ops(xplane: str | Path, hlo_text: str, steps: int, top: int = 15,
            by: str = "op") -> tuple[list[dict], float]:
  """The `top` ops by time per step (name, ms, share of all kernel time, calls, HLO
  description, model source), and all kernel time per step in ms, summed over threads.
  `by="source"` adds ops up by their model path instead (every layer's `mlp/fc1` together)."""
  return _rank(kernel_times(xplane), hlo_ops(hlo_text), steps, top, by)


def summary(xplane: str | Path, hlo_text: str, steps: int, top: int = 15) -> dict:
  """bench --profile's record: kernel ms per step and the top ops by op and by source."""
  times, ops = kernel_times(xplane), hlo_ops(hlo_text)  # read and parsed once, ranked twice
  by_op, ms = _rank(times, ops, steps, top, "op")
  return {"kernel_ms": ms, "top": by_op, "by_source": _rank(times, ops, steps, top, "source")[0]}


def format_rows(rows: list[dict], width: int = 70) -> list[str]:
  return [f"{r['ms']:8.1f} ms {100 * r['share']:5.1f}%  x{r['calls']:<4d} "
          + (f"{r['hlo'][:width]:{width}s} {r['source']}" if r["hlo"] else r["source"])
          for r in rows]
