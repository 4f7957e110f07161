"""Import rules of the package, checked on the source with `ast` (nothing is imported).

  lctx/config.py  imports nothing from lctx;
  lctx/cache/     never imports lctx.model;
  lctx/           never imports absl.flags nor reads FLAGS (only experiments/ may).
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "lctx"


def module_name(path: Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> set[str]:
  """Every module an import statement names (anywhere, lazy imports included),
  relative imports resolved; `from a import b` yields both a and a.b."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = module.split(".")
        anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
        base = ".".join(anchor + ([base] if base else []))
      found.add(base)
      found.update(f"{base}.{alias.name}" for alias in node.names)
  return found


def reads_flags(tree: ast.AST) -> bool:
  return any((isinstance(n, ast.Name) and n.id == "FLAGS") or
             (isinstance(n, ast.Attribute) and n.attr == "FLAGS") for n in ast.walk(tree))


def violations(path: Path, source: str | None = None) -> list[str]:
  module = module_name(path)
  tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
  imports = imported_modules(tree, module, path.name == "__init__.py")
  under = lambda name, prefix: name == prefix or name.startswith(prefix + ".")
  problems = []
  if module == "lctx.config":
    problems += [f"{module} imports {m}" for m in sorted(imports) if under(m, "lctx")]
  if under(module, "lctx.cache"):
    problems += [f"{module} imports {m}" for m in sorted(imports) if under(m, "lctx.model")]
  if under(module, "lctx"):
    problems += [f"{module} imports {m}" for m in sorted(imports) if under(m, "absl.flags")]
    if reads_flags(tree):
      problems.append(f"{module} reads FLAGS")
  return problems


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_sources_found():
  names = {module_name(p) for p in SOURCES}
  assert {"lctx", "lctx.config", "lctx.cache", "lctx.cache.dense"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_import_rules(path):
  assert violations(path) == []


@pytest.mark.parametrize("path, source, problem", [
    ("lctx/config.py", "from lctx.model import params", "lctx.config imports lctx.model"),
    ("lctx/config.py", "def f():\n  from . import engine", "lctx.config imports lctx.engine"),
    ("lctx/cache/dense.py", "from ..model.params import Params",
     "lctx.cache.dense imports lctx.model.params"),
    ("lctx/cache/__init__.py", "from lctx import model", "lctx.cache imports lctx.model"),
    ("lctx/engine.py", "from absl import flags", "lctx.engine imports absl.flags"),
    ("lctx/engine.py", "import absl.flags as f", "lctx.engine imports absl.flags"),
    ("lctx/engine.py", "from absl import app\nx = app.FLAGS.seed", "lctx.engine reads FLAGS"),
])
def test_rules_catch_violations(path, source, problem):
  assert problem in violations(REPO / path, source)


def test_allowed_imports_pass():
  assert violations(REPO / "lctx/cache/dense.py", "from lctx.config import ModelConfig") == []
  assert violations(REPO / "lctx/engine.py", "from lctx.model import transformer") == []
  assert violations(REPO / "experiments/generate.py", "from absl import flags\nflags.FLAGS") == []
