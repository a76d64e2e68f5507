"""Flexible fitting into a map (`fitting.fit_to_map`, ``deephemnma fit``)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deephemnma_bridge.api import compute_modes
from deephemnma_bridge.errors import InputError
from deephemnma_bridge.fitting import MapBand, fit_to_map, render_map

BOX, VOXEL = 40, 2.0  # 80 Å: adenylate kinase with room


@pytest.fixture(scope="module")
def ak_modes():  # type: ignore[no-untyped-def]
    return compute_modes(n_modes=12, log=None)


def _target(modes, rms: float = 2.5):  # type: ignore[no-untyped-def]
    """Nodes deformed along modes 7-9 by about ``rms`` Å RMS."""
    sel = modes.select([7, 8, 9])
    q = np.array([1.0, -0.7, 0.5]) * rms / np.sqrt(1 + 0.49 + 0.25) * np.sqrt(len(sel.coordinates))
    return modes.coordinates + (q @ sel.vectors.reshape(3, -1)).reshape(-1, 3)


def _rmsd(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).sum(1).mean()))


def test_fit_recovers_a_deformation(ak_modes) -> None:  # type: ignore[no-untyped-def]
    nodes = ak_modes.coordinates
    target = _target(ak_modes)
    # the reference's node centroid on the map's centre (voxel n // 2), as `centre="map"` puts it
    placed = target - nodes.mean(0) + BOX // 2 * VOXEL
    density = render_map(
        placed, shape=(BOX,) * 3, voxel_size_angstrom=VOXEL, resolution_angstrom=8.0,
        centre="model",
    )  # fmt: skip
    start = _rmsd(nodes, target)
    fit = fit_to_map(
        density, ak_modes, atom_coordinates=nodes, atom_node=np.arange(len(nodes)),
        mode_numbers=list(range(7, 13)), deformation="linear", cycles=2, iterations=30,
        stiffness=1e-4,
    )  # fmt: skip
    assert start > 2.0
    assert _rmsd(fit.node_coordinates, target) < 0.35 * start
    assert fit.correlation > fit.correlation_start + 0.02
    assert fit.atom_coordinates.shape == nodes.shape
    # coarse to fine, then new modes, then the local refinement
    assert [s.cycle for s in fit.stages] == [1, 1, 1, 2, 2]
    assert [s.moves for s in fit.stages] == ["modes"] * 4 + ["local"]
    assert [round(s.resolution_angstrom, 1) for s in fit.stages] == [16.0, 11.3, 8.0, 8.0, 8.0]


def test_local_refinement_reaches_what_the_modes_leave_out(ak_modes) -> None:  # type: ignore[no-untyped-def]
    """A domain moved on its own (residues 30-59, adenylate kinase's NMP domain, shifted by
    2.5 Å) on top of a mode deformation: the modes alone leave most of that shift, the local
    stage takes it, and the rest of the chain keeps its shape (the springs)."""
    nodes = ak_modes.coordinates
    target = _target(ak_modes, rms=2.0)
    domain = np.zeros(len(nodes), dtype=bool)
    domain[29:59] = True
    target[domain] += np.array([1.5, -1.5, 1.4])
    placed = target - nodes.mean(0) + BOX // 2 * VOXEL
    density = render_map(
        placed, shape=(BOX,) * 3, voxel_size_angstrom=VOXEL, resolution_angstrom=8.0,
        centre="model",
    )  # fmt: skip
    kw = {
        "mode_numbers": list(range(7, 13)),
        "deformation": "linear",
        "cycles": 1,
        "atom_coordinates": nodes,
        "atom_node": np.arange(len(nodes)),
    }  # as the map: nodes
    modes_only = fit_to_map(density, ak_modes, local_restraint=None, **kw)  # type: ignore[arg-type]
    local = fit_to_map(density, ak_modes, **kw)  # type: ignore[arg-type]
    assert [s.moves for s in modes_only.stages] == ["modes"] * 3
    assert local.stages[-1].moves == "local"
    assert local.correlation > modes_only.correlation
    err_modes = _rmsd(modes_only.node_coordinates[domain], target[domain])
    err_local = _rmsd(local.node_coordinates[domain], target[domain])
    assert err_local < 0.85 * err_modes  # measured 0.99 vs 1.25 Å
    assert _rmsd(local.node_coordinates, target) < _rmsd(modes_only.node_coordinates, target)
    # consecutive Cα keep their starting distance (bonds), even across the domain's ends, which
    # the target itself stretched
    bonds = np.linalg.norm(np.diff(local.node_coordinates, axis=0), axis=1)
    start = np.linalg.norm(np.diff(nodes, axis=0), axis=1)
    assert np.abs(bonds - start).max() < 0.2  # measured 0.05 Å
    with pytest.raises(InputError, match="local-restraint"):
        fit_to_map(density, ak_modes, local_restraint=0.0, **kw)  # type: ignore[arg-type]


def test_model_frame_uses_the_map_origin(ak_modes) -> None:  # type: ignore[no-untyped-def]
    """``centre="model"``: the model's coordinates and the map's origin as they are, wherever
    the density sits in the box; ``centre="map"`` would put the model on the box centre."""
    nodes = ak_modes.coordinates
    target = _target(ak_modes)
    origin = np.array([-31.0, 12.0, 5.0])
    off_centre = np.array([7.0, -5.0, 4.0])
    placed = target - nodes.mean(0) + BOX // 2 * VOXEL + off_centre
    density = render_map(
        placed, shape=(BOX,) * 3, voxel_size_angstrom=VOXEL, resolution_angstrom=8.0,
        centre="model",
    )  # fmt: skip
    moved = dataclasses.replace(density, origin_angstrom=origin)
    # in the moved map the density sits at `placed + origin`: the model placed there
    offset = origin + BOX // 2 * VOXEL + off_centre - nodes.mean(0)
    shifted = dataclasses.replace(
        ak_modes, coordinates=nodes + offset, atom_coordinates=None, atom_node=None
    )
    kw = {"mode_numbers": [7, 8, 9], "deformation": "linear", "cycles": 1, "iterations": 30}
    as_placed = fit_to_map(moved, shifted, centre="model", **kw)  # type: ignore[arg-type]
    assert _rmsd(as_placed.node_coordinates - offset, target) < 0.5 * _rmsd(nodes, target)
    assert as_placed.correlation > 0.98
    # the map frame puts the model 9.6 Å away from the density
    wrong = fit_to_map(moved, shifted, centre="map", **kw)  # type: ignore[arg-type]
    assert wrong.correlation_start < as_placed.correlation_start - 0.3


def test_errors_name_the_problem(ak_modes) -> None:  # type: ignore[no-untyped-def]
    density = render_map(
        ak_modes.coordinates, shape=(BOX,) * 3, voxel_size_angstrom=VOXEL, resolution_angstrom=8,
    )  # fmt: skip
    with pytest.raises(InputError, match="Nyquist"):
        MapBand.create(density, 3.0, np.zeros(3))
    with pytest.raises(InputError, match="flexible modes"):
        fit_to_map(density, ak_modes, mode_numbers=[3, 7])
    with pytest.raises(InputError, match="not available"):
        fit_to_map(density, ak_modes, mode_numbers=[7, 40])
    empty = dataclasses.replace(density, data=np.zeros_like(density.data))
    with pytest.raises(InputError, match="no density"):
        fit_to_map(empty, ak_modes)


def test_cli_fit_writes_model_and_report(tmp_path: Path, ak_modes) -> None:  # type: ignore[no-untyped-def]
    from deephemnma_bridge.adapters.maps import write_map
    from deephemnma_bridge.adapters.structure import read_structure, write_models
    from deephemnma_bridge.data import default_model_path
    from deephemnma_bridge.nma import deform_atoms

    sel = ak_modes.select([7, 8])
    q = np.array([[2.0, -1.5]]) * np.sqrt(len(ak_modes.coordinates))
    structure = read_structure(default_model_path())
    from deephemnma_bridge.coarse_grain import coarse_grain

    cg = coarse_grain(structure)
    atoms = deform_atoms(
        structure.coordinates_angstrom, cg.atom_node, cg.coordinates_angstrom, sel.vectors, q
    )[0]
    target_pdb = tmp_path / "target.pdb"
    write_models(target_pdb, structure.with_coordinates(atoms))
    placed = atoms - cg.coordinates_angstrom.mean(0) + BOX // 2 * VOXEL
    map_path = tmp_path / "target.mrc"
    write_map(
        map_path,
        render_map(placed, shape=(BOX,) * 3, voxel_size_angstrom=VOXEL, resolution_angstrom=8,
                   centre="model"),
    )  # fmt: skip
    before = map_path.read_bytes()
    out = tmp_path / "fitted.pdb"
    argv = [sys.executable, "-m", "deephemnma_bridge.cli", "fit", str(default_model_path()),
            str(map_path), "--out", str(out), "--use-modes", "7-10", "--cycles", "1",
            "--iterations", "25", "--compare", str(target_pdb), "--keep-frame"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "fitted_fit.json").read_text())
    assert report["compare"]["rmsd_after"] < 0.5 * report["compare"]["rmsd_before"]
    assert report["correlation"] > report["correlation_start"]
    assert "Cα RMSD to target.pdb" in done.stdout
    fitted = read_structure(out)
    assert len(fitted) == len(structure)
    # --keep-frame: superposed on the starting model (same Cα centroid), and it says by how much
    assert "keep_frame" in report and "superposed on the starting model" in done.stdout
    fitted_ca = coarse_grain(fitted).coordinates_angstrom
    # (the nodes and the atoms are deformed apart, each superposed back: 0.01 Å apart)
    assert np.allclose(fitted_ca.mean(0), cg.coordinates_angstrom.mean(0), atol=0.05)
    assert map_path.read_bytes() == before  # the input is untouched
    again = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert again.returncode != 0 and "already exists" in again.stderr
    assert not list(tmp_path.glob("*.tmp*"))
