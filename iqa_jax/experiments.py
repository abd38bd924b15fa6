r"""The run matrix: datasets x heads x seeds (App. B: seeds 8, 19, 25), plus cross-dataset pairs.

python -m iqa_jax.experiments --config configs/siglip2_gated.py --datasets clive,koniq10k \
    --seeds 8,19,25 --heads baseline,sigmoid,gated --cross clive:koniq10k --data_root /data \
    --out DIR

A dataset is NAME or NAME:OPTION (`demo:gaussian_blur+pixelate` keeps two distortion families,
`koniq10k:512x384` picks a resolution); a head is a named head or an activation pair
(`sigmoid+gelu`, Table 6). A cross pair is TRAIN:TEST, split after a --datasets label
(`demo:gaussian_blur+pixelate:demo:white_noise+jpeg` works). Each run trains in
DIR/runs/<dataset>/<head>/seed<N>; finished runs are skipped and killed ones resume. Every run
and cross evaluation is one row of DIR/results.jsonl; the tables (iqa_jax.report) and plots
(iqa_jax.plots) are written at the end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from iqa_jax import cli, parallel
from iqa_jax.data import datasets
from iqa_jax.defaults import parse_absl_flags
from iqa_jax.models.head import resolve_head
from iqa_jax.runs import folder as run_folder
from iqa_jax.training import features
from iqa_jax.training import loop as train

# The option a bare NAME:VALUE sets, per adapter.
MAIN_OPTION = {"demo": "distortions", "koniq10k": "resolution", "agiqa3k": "target"}
BACKBONE_NAMES = {"siglip": "SigLIP2", "siglip2_naflex": "SigLIP2-NaFlex", "clip": "CLIP",
                  "dinov2": "DINO2", "dinov3": "DINO3", "pe": "Percept", "resnet": "ResNet152",
                  "cleandift": "CDIFT"}
RESULTS = "results.jsonl"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  label: str  # as written on the command line, e.g. 'demo:gaussian_blur+pixelate'
  name: str  # the registry name, e.g. 'demo'
  options: tuple[tuple[str, Any], ...] = ()  # typed like the config field each one sets

  @property
  def slug(self) -> str:
    return re.sub(r"[^A-Za-z0-9_.+=-]", "-", self.label)


def parse_dataset(spec: str) -> DatasetSpec:
  """'demo:gaussian_blur+pixelate' -> demo with options.distortions='gaussian_blur,pixelate'.

  Values are typed like the config field they set: 'clive:drop_practice=false' -> False.
  """
  name, _, option = spec.strip().partition(":")
  if name not in datasets.REGISTRY:
    raise ValueError(f"Unknown dataset {name!r} in {spec!r}; known: {sorted(datasets.REGISTRY)}.")
  if not option:
    return DatasetSpec(spec.strip(), name)
  key, _, value = option.partition("=") if "=" in option else (MAIN_OPTION.get(name), "", option)
  if key is None:
    raise ValueError(f"{spec!r}: {name} has no main option; write {name}:KEY=VALUE.")
  value = value.replace("+", ",")
  if name == "demo":
    from iqa_jax.data.demo import DISTORTIONS  # pylint: disable=g-import-not-at-top
    known = {n for n, _ in DISTORTIONS.values()}
    unknown = set(value.split(",")) - known
    if unknown:
      raise ValueError(f"{spec!r}: unknown demo distortion(s) {sorted(unknown)}; "
                       f"known: {sorted(known)}.")
  return DatasetSpec(spec.strip(), name, ((key, datasets.typed_option(key, value, repr(spec))),))


def parse_cross(pair: str, trained: Sequence[DatasetSpec]) -> tuple[DatasetSpec, DatasetSpec]:
  """'clive:koniq10k' -> (train, test); the ':' that splits is the one after a trained label."""
  splits = [(pair[:i], pair[i + 1:]) for i, ch in enumerate(pair) if ch == ":"]
  labels = {d.label: d for d in trained}
  found = [(labels[a], parse_dataset(b)) for a, b in splits if a in labels and b]
  if len(found) != 1:
    raise ValueError(f"--cross {pair!r} must be TRAIN:TEST with TRAIN one of --datasets "
                     f"{sorted(labels)}.")
  return found[0]


def parse_head(head: str) -> str:
  """'gated' -> 'gated'; 'sigmoid+gelu' -> 'sigmoid,gelu' (config.model.head's spelling)."""
  head = head.strip().replace("+", ",")
  resolve_head(head)  # raises on a typo before anything trains
  return head


def run_dir(out: str | Path, dataset: DatasetSpec, head: str, seed: int) -> Path:
  return Path(out) / "runs" / dataset.slug / head.replace(",", "+") / f"seed{seed}"


def model_label(config: ml_collections.ConfigDict) -> str:
  """'SigLIP2' as the paper's tables name it; '(FT)', '(Frozen)', '(random init)' when so."""
  name = BACKBONE_NAMES.get(config.model.backbone, config.model.backbone)
  notes = {"full": ["FT"], "frozen": ["Frozen"]}.get(config.model.finetune, [])
  if not config.model.init:
    notes.append("random init")
  return name + (f" ({', '.join(notes)})" if notes else "")


def data_dir_for(dataset: DatasetSpec, config, data_dirs: dict[str, str], data_root: str) -> str:
  """--data_dir NAME=PATH, else --data_root/NAME, else the config's data.dir."""
  if dataset.name in data_dirs:
    return data_dirs[dataset.name]
  if data_root:
    return str(Path(data_root) / dataset.name)
  return config.data.dir


def run_config(base: ml_collections.ConfigDict, dataset: DatasetSpec, head: str, seed: int,
               data_dir: str) -> ml_collections.ConfigDict:
  """The base config with this run's dataset, head and seed."""
  c = ml_collections.ConfigDict(base.to_dict())
  c.seed = seed
  c.model.head = head
  c.data.name = dataset.name
  c.data.dir = data_dir
  for key, value in dataset.options:
    if key not in c.data.options:
      raise ValueError(f"{dataset.label}: no adapter option {key!r}; known: "
                       f"{sorted(c.data.options)} (docs/datasets.md).")
    c.data.options[key] = value
  c.name = f"{dataset.slug}/{head.replace(',', '+')}/seed{seed}"
  return c


def _read_json(path: Path) -> dict | None:
  return run_folder.read_json(path) if path.exists() else None


def _log(msg: str) -> None:
  print(msg, flush=True)


def train_one(config, workdir: Path, labels: dict, retry_failed: bool = False) -> dict:
  """Trains (or resumes, or skips) one run; a NaN loss is recorded as a failed run, not raised."""
  previous = _read_json(workdir / "results.json")
  if previous and (workdir / run_folder.CONFIG).exists():
    run_folder.check_config(workdir, config)  # a finished run is skipped only for its own config
  extend = previous and config.optim.epochs > previous.get("epochs", config.optim.epochs)
  if previous and not extend and (previous["status"] == "done" or
                                  (previous["status"] == "failed" and not retry_failed)):
    _log(f"skip {workdir} ({previous['status']})")
    return previous
  workdir.mkdir(parents=True, exist_ok=True)
  run_folder.write_json(workdir / "run.json", labels)
  _log(f"run {workdir}")
  t0 = time.time()
  try:
    results = train.train_and_evaluate(config, str(workdir))
  except train.NonFiniteLossError as e:
    _log(f"failed {workdir}: {e}")
    results = {"name": config.name, "dataset": config.data.name, "head": config.model.head,
               "seed": config.seed, "status": "failed", "error": str(e)}
    run_folder.write_json(workdir / "results.json", results)
    return results
  results["wall_s"] = round(time.time() - t0, 1)
  run_folder.write_json(workdir / "results.json", results)
  if results["status"] != "done":
    _log(f"failed {workdir}: {results.get('error', results['status'])}")
  return results


def evaluate_cross(workdir: Path, test: DatasetSpec, test_dir: str, labels: dict) -> dict | None:
  """Best checkpoint of a finished run scored on the whole test dataset (Table 3); cached."""
  from iqa_jax.inference.evaluate import data_config_for, evaluate_run  # pylint: disable=g-import-not-at-top
  out = workdir / "cross" / test.slug
  row = _read_json(out / "result.json")
  if row is not None:
    return row
  results = _read_json(workdir / "results.json")
  if not results or results["status"] != "done":
    _log(f"cross {workdir} -> {test.label}: skipped, the run is "
         f"{results['status'] if results else 'not finished'}")
    return None
  config = run_folder.read_config(workdir)
  data_config = data_config_for(config, test.name, test_dir, dict(test.options),
                                on_error=config.data.on_error)
  _log(f"cross {workdir} -> {test.label}")
  m = evaluate_run(str(workdir), data_config, "best", out_dir=str(out))
  row = {**labels, "kind": "cross", "test": test.label, "checkpoint": "best", "n": m["n"],
         "n_skipped": m["n_skipped"],
         "metrics": {k: m[k] for k in m if k not in ("train_dataset", "test_dataset", "n",
                                                       "n_skipped", "checkpoint")}}
  out.mkdir(parents=True, exist_ok=True)
  run_folder.write_json(out / "result.json", row)
  return row


def collect_results(out: str | Path) -> list[dict]:
  """Every run and cross evaluation under out/runs, as results.jsonl rows."""
  out = Path(out)
  rows = []
  def order(path: Path):  # dataset, head, then seeds in numeric order
    return path.parts[-4], path.parts[-3], int(path.parts[-2][len("seed"):])
  for labels_file in sorted(out.glob("runs/*/*/seed*/run.json"), key=order):
    workdir = labels_file.parent
    labels = run_folder.read_json(labels_file)
    results = _read_json(workdir / "results.json") or {"status": "running"}
    row = {**labels, "kind": "run", "workdir": str(workdir.relative_to(out)),
           "status": results["status"]}
    for key in ("error", "best", "final", "test", "n_train", "n_val", "n_skipped", "epochs",
                "wall_s"):
      if key in results:
        row[key] = results[key]
    if (workdir / run_folder.CONFIG).exists():  # the ablation tables read a run's settings here
      row["config"] = run_folder.read_json(workdir / run_folder.CONFIG)
    rows.append(row)
    for cross_file in sorted(workdir.glob("cross/*/result.json")):
      rows.append({**run_folder.read_json(cross_file), "workdir": row["workdir"]})
  return rows


def write_results(out: str | Path) -> Path:
  """Rewrites out/results.jsonl from the run folders (so a rerun never duplicates a row)."""
  path = Path(out) / RESULTS
  run_folder.write_text(path, "".join(json.dumps(r) + "\n" for r in collect_results(out)))
  return path


def run_matrix(base: ml_collections.ConfigDict, dataset_specs: Sequence[str], seeds: Sequence[int],
               heads: Sequence[str], out: str | Path, cross: Sequence[str] = (),
               data_dirs: dict[str, str] | None = None, data_root: str = "",
               plots: bool = True, retry_failed: bool = False,
               compile_cache: str | None = "") -> list[dict]:
  """Trains every (dataset, head, seed), evaluates the cross pairs; returns results.jsonl rows.

  compile_cache: folder of the persistent XLA cache ('' -> out/jax_cache, None -> off).
  """
  specs = [parse_dataset(d) for d in dataset_specs]
  heads = [parse_head(h) for h in heads]
  pairs = [parse_cross(p, specs) for p in cross]
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  cache = None if compile_cache is None else (compile_cache or out / "jax_cache")
  # None keeps the process's own settings (no cache of the matrix's).
  with contextlib.nullcontext() if cache is None else parallel.persistent_compile_cache(cache):
    for dataset in specs:
      for head in heads:
        for seed in seeds:
          _run_one(base, dataset, head, seed, out, pairs, data_dirs or {}, data_root, plots,
                   retry_failed)
  rows = collect_results(out)
  from iqa_jax.analysis import report  # pylint: disable=g-import-not-at-top
  for table in report.write_tables(rows, out / "tables"):
    _log(f"table: {table}")
  if plots:
    from iqa_jax.analysis import plots as plots_lib  # pylint: disable=g-import-not-at-top
    for path in plots_lib.plot_matrix(rows, out):
      _log(f"plot: {path}")
  return rows


def _run_one(base, dataset: DatasetSpec, head: str, seed: int, out: Path, pairs, data_dirs: dict,
             data_root: str, plots: bool, retry_failed: bool) -> None:
  """One cell of the matrix: train (or skip), its cross pairs, its plots, the results store."""
  config = run_config(base, dataset, head, seed,
                      data_dir_for(dataset, base, data_dirs, data_root))
  config = features.cache_for_frozen_run(config, out / "features")  # frozen: heads on a cache
  workdir = run_dir(out, dataset, head, seed)
  labels = {"dataset": dataset.label, "data_name": dataset.name, "head": head, "seed": seed,
            "model": model_label(base), "backbone": base.model.backbone,
            "finetune": base.model.finetune}
  results = train_one(config, workdir, labels, retry_failed)
  for train_spec, test_spec in pairs:
    if train_spec == dataset:
      evaluate_cross(workdir, test_spec, data_dir_for(test_spec, base, data_dirs, data_root),
                     {**labels, "train": dataset.label})
  if results["status"] == "done" and plots and _plots_stale(workdir):
    from iqa_jax.analysis import plots as plots_lib  # pylint: disable=g-import-not-at-top
    plots_lib.plot_run(workdir)
  write_results(out)


def _plots_stale(workdir: Path) -> bool:
  """True when a result is newer than the run's plots (so a rerun redraws only what changed)."""
  curves = workdir / "curves.png"
  if not curves.exists():
    return True
  results = [workdir / "results.json", *workdir.glob("cross/*/result.json")]
  return max(p.stat().st_mtime for p in results if p.exists()) > curves.stat().st_mtime


def main(argv: Sequence[str] | None = None) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv if argv is None else argv)
  fv = flags.FlagValues()  # private flags: main() can run twice in one process (tests)
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py:epochs=3; "
                                  "--config.FIELD=VALUE overrides a field.", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_list("datasets", None, "NAME or NAME:OPTION, e.g. clive,koniq10k or "
                    "demo:gaussian_blur+pixelate,demo:white_noise+jpeg", flag_values=fv)
  flags.DEFINE_list("seeds", ["8", "19", "25"], "App. B: 8,19,25", flag_values=fv)
  flags.DEFINE_list("heads", None, "baseline,sigmoid,gated or activation pairs act1+act2 "
                    "(default: the config's head)", flag_values=fv)
  flags.DEFINE_list("cross", [], "TRAIN:TEST pairs, e.g. clive:koniq10k", flag_values=fv)
  flags.DEFINE_string("out", None, "Matrix folder (runs/, results.jsonl, tables/, plots)",
                      flag_values=fv)
  flags.DEFINE_string("data_root", "", "Datasets in DATA_ROOT/NAME", flag_values=fv)
  flags.DEFINE_multi_string("data_dir", [], "NAME=PATH (repeatable); beats --data_root",
                            flag_values=fv)
  flags.DEFINE_bool("plots", True, "Write the PNGs (--noplots: tables only)", flag_values=fv)
  flags.DEFINE_bool("retry_failed", False, "Rerun runs that stopped on a NaN loss",
                    flag_values=fv)
  flags.DEFINE_string("compile_cache", "", "XLA cache folder (default OUT/jax_cache; 'none': off)",
                      flag_values=fv)
  for old, alias in (("data_root", "data-root"), ("data_dir", "data-dir"),
                     ("retry_failed", "retry-failed"), ("compile_cache", "compile-cache")):
    flags.DEFINE_alias(alias, old, flag_values=fv)
  code = parse_absl_flags(fv, argv, __doc__)
  if code is not None:
    return code
  try:
    if fv.config is None or not fv.out:
      raise ValueError("pass --config configs/<file>.py and --out DIR")
    config = fv.config
    rows = run_matrix(
        config, fv.datasets or [config.data.name], [int(s) for s in fv.seeds],
        fv.heads or [config.model.head], fv.out, cross=fv.cross,
        data_dirs=dict(kv.split("=", 1) for kv in fv.data_dir), data_root=fv.data_root,
        plots=fv.plots, retry_failed=fv.retry_failed,
        compile_cache=None if fv.compile_cache == "none" else fv.compile_cache)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  runs = [r for r in rows if r["kind"] == "run"]
  failed = [r["workdir"] for r in runs if r["status"] != "done"]
  _log(f"{len(runs) - len(failed)}/{len(runs)} runs done, "
       f"{sum(r['kind'] == 'cross' for r in rows)} cross evaluations -> {Path(fv.out) / RESULTS}")
  for w in failed:
    _log(f"not done: {w}")
  return 1 if failed else 0


if __name__ == "__main__":
  cli.run(main, "finished runs are kept; the same command skips them and resumes the cut "
               "one")
