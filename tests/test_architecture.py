"""The core never imports the host-format layer or its libraries (STYLE.md 10.1)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import deephemnma_bridge

PACKAGE = Path(deephemnma_bridge.__file__).parent
FORBIDDEN = ("starfile", "mrcfile", "gemmi", "cryosparc", "deephemnma_bridge.adapters", "adapters")


def _core_files() -> list[Path]:
    files = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        # api/ reads and writes host files for its callers, as cli/ does: both sit on top of
        # the adapters (a front end), so they are not part of the core checked here
        if rel.parts[0] in ("cli", "adapters", "api"):
            continue
        files.append(path)
    return files


def _imported_names(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative import inside deephemnma_bridge
                base = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
                parent = base.rsplit(".", node.level)[0]
                module = f"{parent}.{module}" if module else parent
                names.extend(f"{module}.{alias.name}" for alias in node.names)
            names.append(module)
    return names


def test_core_sources_do_not_import_host_formats() -> None:
    files = _core_files()
    assert len(files) >= 5
    offenders = []
    for path in files:
        for name in _imported_names(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
                offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_importing_the_core_loads_no_host_library() -> None:
    modules = []
    for path in _core_files():
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if rel.name == "__main__":
            continue
        modules.append(".".join(parts))
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN[:4]!r}"
        " or m.startswith('deephemnma_bridge.adapters')]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core import pulled in: {out.stdout.strip()}"
