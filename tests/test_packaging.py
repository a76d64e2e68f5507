"""The built wheel ships `adapters/` as ``deephemnma_bridge.adapters``, never as top-level."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIP = (sys.executable, "-m", "pip")
SKIP = (".venv", ".git", "*.egg-info", "build", "dist", "__pycache__", ".*_cache", "tests")

PROBE = """
import importlib.util, json, sys
import deephemnma_bridge, deephemnma_bridge.adapters
from deephemnma_bridge.adapters import read_particles, write_particles
import deephemnma_bridge.api, deephemnma_bridge.cli, deephemnma_bridge.cli.relion_external
spec = importlib.util.find_spec("adapters")
print(json.dumps({
    "package": deephemnma_bridge.__file__,
    "adapters": deephemnma_bridge.adapters.__file__,
    "top_level_adapters": None if spec is None else str(spec.origin),
}))
"""


def test_wheel_ships_adapters_under_the_package(tmp_path: Path) -> None:
    # build from a copy so that the working tree gets no build/ or egg-info debris
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(*SKIP))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("deephemnma_bridge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "deephemnma_bridge/adapters/__init__.py" in names
    assert "deephemnma_bridge/adapters/cryosparc.py" in names
    assert not [n for n in names if n.startswith("adapters/")]
    # every package of the source tree is in the wheel (a list in pyproject.toml can miss one)
    source = {
        p.parent.relative_to(REPO).as_posix()
        for p in (REPO / "deephemnma_bridge").rglob("__init__.py")
        if "adapters" not in p.parts
    }
    shipped = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    assert source <= shipped, f"packages missing from the wheel: {sorted(source - shipped)}"
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["deephemnma_bridge"]

    target = tmp_path / "site"
    subprocess.run(
        [*PIP, "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    # -S: no site module, so the editable install's .pth finder is not loaded; the venv's
    # site-packages is on the path only for numpy, pandas, cryosparc-tools, ...
    env = {"PYTHONPATH": f"{target}:{sysconfig.get_paths()['purelib']}", "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-S", "-c", PROBE],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(target)
    assert Path(found["adapters"]) == target / "deephemnma_bridge" / "adapters" / "__init__.py"
    other = found["top_level_adapters"]
    assert other is None or not (
        Path(other).is_relative_to(target) or Path(other).is_relative_to(REPO)
    )
