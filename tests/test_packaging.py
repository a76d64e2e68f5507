"""An installed copy ships the adapters as ``deephemnma_bridge.adapters``, not as ``adapters``."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_adapters_under_the_package(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "deephemnma_bridge/adapters/__init__.py" in names
    assert "deephemnma_bridge/adapters/relion.py" in names
    assert not [n for n in names if n.startswith("adapters/")]
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    # -I: isolated mode, so neither the editable install's finder nor the cwd is on the path;
    # the venv's site-packages provides the dependencies only
    import site

    deps = ":".join(site.getsitepackages())
    code = (
        "import sys; sys.path[:0] = [sys.argv[1]] + sys.argv[2].split(':');"
        "import deephemnma_bridge, deephemnma_bridge.adapters as a;"
        "print(deephemnma_bridge.__file__); print(a.read_particles.__module__)"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code, str(target), deps],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout.split()
    assert out[0].startswith(str(target))
    assert out[1] == "deephemnma_bridge.adapters"
    # nothing of ours answers to the top-level name `adapters`
    spec_check = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            "import sys; sys.path[:0]=[sys.argv[1]]; import importlib.util as u;"
            "print(u.find_spec('adapters'))",
            str(target),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout.strip()
    assert spec_check == "None"
