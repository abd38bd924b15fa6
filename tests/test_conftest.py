"""The shared test helpers: a missing reference package skips locally and fails under CI."""
import sys

import pytest
from conftest import require


@pytest.mark.parametrize("module", ["tensorflow_datasets", "timm", "diffusers"])
def test_a_missing_reference_fails_under_ci_and_skips_otherwise(module, monkeypatch):
  monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
  monkeypatch.setenv("CI", "1")
  with pytest.raises(pytest.fail.Exception, match=f"{module} is not installed.*CI is set"):
    require(module)
  monkeypatch.delenv("CI")
  with pytest.raises(pytest.skip.Exception, match=f"{module} is not installed"):
    require(module)
