"""CPU with 8 fake devices, set before jax is imported anywhere; and
`importorskip`, which fails rather than skips in CI."""

import os

import pytest

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()


def in_ci() -> bool:
  """True when the environment variable CI is set to anything but '', '0', 'false', 'no'
  (CI services set CI=true; .ci/run exports it)."""
  return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def importorskip(modname: str, minversion: str | None = None):
  """pytest.importorskip, except in CI, where a missing (or too old) package fails
  instead of skipping silently: CI installs the test extras, so the tests that
  need them must run there. Test modules use `from conftest import importorskip`."""
  try:
    return pytest.importorskip(modname, minversion=minversion)
  except pytest.skip.Exception as skip:
    if not in_ci():
      raise
    reason = skip.msg
  pytest.fail(f"{reason}; CI={os.environ['CI']!r} requires it (install the test extras: "
              f"pip install -e '.[test]')", pytrace=False)
