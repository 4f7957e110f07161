"""conftest.importorskip: a missing package skips locally and fails in CI."""

import pytest

from conftest import importorskip, in_ci

MISSING = "lctx_no_such_package"


@pytest.mark.parametrize("value", [None, "", "0", "false", "False", "no"])
def test_missing_package_skips_outside_ci(monkeypatch, value):
  if value is None:
    monkeypatch.delenv("CI", raising=False)
  else:
    monkeypatch.setenv("CI", value)
  assert not in_ci()
  with pytest.raises(pytest.skip.Exception):
    importorskip(MISSING)


@pytest.mark.parametrize("value", ["true", "1", "yes"])
def test_missing_package_fails_in_ci(monkeypatch, value):
  monkeypatch.setenv("CI", value)
  assert in_ci()
  with pytest.raises(pytest.fail.Exception, match=f"{MISSING}.*CI='{value}' requires it"):
    importorskip(MISSING)
  with pytest.raises(pytest.fail.Exception, match="requires it"):  # too old fails too
    importorskip("numpy", minversion="999")


def test_present_package_is_returned(monkeypatch):
  monkeypatch.setenv("CI", "true")
  import numpy
  assert importorskip("numpy") is numpy
