"""The layout's contract: imports run one way (pyproject.toml [tool.importlinter], README "Layout").

grimp (import-linter's graph) reads every import statement, those inside functions included, so a
cycle cannot hide in a function-level import.
"""
import copy
import os
import subprocess
import sys
from pathlib import Path

import grimp
from importlinter import configuration
from importlinter.application import use_cases
from importlinter.contracts.independence import IndependenceContract
from importlinter.contracts.layers import LayersContract

ROOT = Path(__file__).resolve().parent.parent
configuration.configure()  # import-linter's readers (lint-imports does this on start)


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
  """One chain per import m -> d where d also reaches m: [m, d, ..., m]."""
  found = []
  for m in sorted(graph.modules):
    for d in sorted(graph.find_modules_directly_imported_by(m)):
      back = graph.find_shortest_chain(importer=d, imported=m)
      if back:
        found.append([m, *back])
  return found


def test_no_module_imports_one_that_imports_it_back():
  graph = grimp.build_graph("iqa_jax", cache_dir=None)
  found = cycles(graph)
  assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path, monkeypatch):
  # The checker on a package with the shape of the old train <-> features loop.
  pkg = tmp_path / "loopy"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "train.py").write_text("from loopy import features\n")
  (pkg / "features.py").write_text("def extract():\n  from loopy.train import progress\n")
  (pkg / "steps.py").write_text("from loopy import features\n")  # reaches the loop, not in it
  monkeypatch.syspath_prepend(str(tmp_path))
  found = cycles(grimp.build_graph("loopy", cache_dir=None))
  assert found == [["loopy.features", "loopy.train", "loopy.features"],
                   ["loopy.train", "loopy.features", "loopy.train"]]


def test_a_reintroduced_cycle_in_iqa_jax_is_found():
  # The old export -> score -> scorer -> export loop, put back into the real graph.
  graph = grimp.build_graph("iqa_jax", cache_dir=None)
  graph.add_import(importer="iqa_jax.inference.loaded", imported="iqa_jax.inference.scorer")
  assert ["iqa_jax.inference.scorer", "iqa_jax.inference.loaded",
          "iqa_jax.inference.scorer"] in cycles(graph)


def _contracts():
  """Our pyproject's contracts, as import-linter builds them."""
  options = use_cases.read_user_options(str(ROOT / "pyproject.toml"))
  return [LayersContract if c["type"] == "layers" else IndependenceContract
          for c in options.contracts_options], options


def _check(graph: grimp.ImportGraph) -> dict[str, bool]:
  kinds, options = _contracts()
  # check() may change the graph it is given (import-linter hands each contract a copy).
  return {c["name"]: kind(c["name"], options.session_options, c).check(
      copy.deepcopy(graph), False).kept
      for kind, c in zip(kinds, options.contracts_options, strict=True)}


def test_lint_imports_keeps_both_contracts():
  # What CI and the README's test command run, on the package as it is.
  lint = Path(sys.executable).with_name("lint-imports")
  out = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert out.returncode == 0 and "Contracts: 2 kept, 0 broken." in out.stdout, out.stdout


def test_contracts_refuse_an_upward_import_and_training_reaching_inference():
  graph = grimp.build_graph("iqa_jax", cache_dir=None)
  layers, independence = (c["name"] for c in _contracts()[1].contracts_options)
  assert _check(graph) == {layers: True, independence: True}
  upward = copy.deepcopy(graph)  # the old compute -> bench reach-up
  upward.add_import(importer="iqa_jax.analysis.compute", imported="iqa_jax.bench")
  assert _check(upward) == {layers: False, independence: True}
  across = copy.deepcopy(graph)  # the old scorer -> steps.make_eval_step
  across.add_import(importer="iqa_jax.inference.scorer", imported="iqa_jax.training.steps")
  assert _check(across) == {layers: False, independence: False}
