"""Shared test fixtures: where the project's real data files are, and the devices to test on."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deephemnma_bridge.device import available_devices

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEVICES = available_devices()

# every real RELION particle file in ../shared/data
RELION_FILES = [
    "relion/simplecryoem/relion_proj_batch.star",
    "relion/simplecryoem/pyem.star",
    "relion/cryojax/test_starfile.star",
    "relion/isecc/test.star",
    "relion/roodmus/Extract/job007/particles.star",
    "relion/roodmus/Extract/job013/particles.star",
    "relion/roodmus/Select/job009/particles.star",
    "relion/tomodrgn/10076_classD_32_sim.star",
    "relion/cryocat/relion_3.0.star",
    "relion/starfile/one_loop.star",
]
CRYOSPARC_FILES = ["cryosparc/cryosparc_J2_particles_exported.cs"]


@pytest.fixture(scope="module", autouse=True)
def _module_folders_removed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Remove the folders that this module's fixtures made (``tmp_path_factory.mktemp``) once
    the module is done, unless one of its tests failed. Fixtures that train a network write
    about 0.4 GB of checkpoints each; with pyproject's ``tmp_path_retention_policy = "failed"``
    (a passing test's own folder is removed at once) the suite never holds more than about
    1 GB, where it used to leave 5.7 GB (CI machines can have little disk)."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed != failed:
        return
    for path in set(base.iterdir()) - before:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def shared(relative: str) -> Path:
    """Path of a file under ../shared/data; skips the test when the folder is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data file {path} not available")
    return path


def torchrun(argv: list[str], tmp_path: Path, nproc: int = 2) -> None:
    """Run ``deephemnma ARGV`` in ``nproc`` CPU processes with torchrun (gloo); assert success."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(port),
        "-m",
        "deephemnma_bridge.cli",
        *argv,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def modes_of_nodes(xyz: Any) -> Any:
    """A `NormalModes` of these nodes with one dummy mode (for what looks at the nodes only,
    e.g. `symmetry_group`)."""
    import numpy as np

    from deephemnma_bridge.nma.modes import NormalModes

    n = len(xyz)
    return NormalModes(
        coordinates=np.asarray(xyz, dtype=np.float64),
        eigenvalues=np.zeros(1),
        vectors=np.full((1, n, 3), 1.0 / np.sqrt(3 * n)),
        mode_numbers=np.ones(1, dtype=np.int64),
        collectivity=np.ones(1),
    )
