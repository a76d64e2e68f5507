"""Normal modes: the Hessian, the solvers, RTB, the 4AKE -> 1AKE science check, deform, I/O."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEVICES, shared
from scipy.spatial.transform import Rotation

from deephemnma_bridge.adapters.structure import read_structure
from deephemnma_bridge.coarse_grain import coarse_grain
from deephemnma_bridge.errors import InputError
from deephemnma_bridge.nma import NormalModes, compute_normal_modes, deform
from deephemnma_bridge.nma.hessian import anm_hessian
from deephemnma_bridge.nma.modes import FloppyNetworkError, fix_signs, rtb_projection
from deephemnma_bridge.nma.network import connecting_cutoff, contact_pairs, relative_cutoff


def _ca(name: str, chains: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    cg = coarse_grain(read_structure(shared(f"structures/{name}")), chains=chains)
    return cg.coordinates_angstrom, cg.blocks(10)


def _overlaps(a: NormalModes, b: NormalModes, modes: slice) -> np.ndarray:
    """|u_a . u_b| per mode: independent of the sign of either."""
    return np.abs(np.einsum("mna,mna->m", a.vectors[modes], b.vectors[modes]))


def _reference_hessian(xyz: np.ndarray, cutoff: float) -> np.ndarray:
    """Tirion's Hessian written the textbook way (loops), for comparison."""
    n = len(xyz)
    h = np.zeros((3 * n, 3 * n))
    for i in range(n):
        for j in range(i + 1, n):
            d = xyz[j] - xyz[i]
            r2 = d @ d
            if r2 < cutoff**2:
                block = -np.outer(d, d) / r2
                h[3 * i : 3 * i + 3, 3 * j : 3 * j + 3] = block
                h[3 * j : 3 * j + 3, 3 * i : 3 * i + 3] = block
                h[3 * i : 3 * i + 3, 3 * i : 3 * i + 3] -= block
                h[3 * j : 3 * j + 3, 3 * j : 3 * j + 3] -= block
    return h


def test_sparse_hessian_equals_textbook_hessian() -> None:
    xyz = _ca("4ake.pdb", ["A"])[0][:60]
    sparse = anm_hessian(xyz, contact_pairs(xyz, 10.0)).toarray()
    np.testing.assert_allclose(sparse, _reference_hessian(xyz, 10.0), atol=1e-12)
    np.testing.assert_allclose(sparse, sparse.T)


@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_six_zero_modes_unit_vectors_numbering(method: str) -> None:
    xyz, _ = _ca("4ake.pdb", ["A"])
    modes = compute_normal_modes(xyz, cutoff_angstrom=15.0, method=method)  # type: ignore[arg-type]
    assert modes.mode_numbers.tolist() == list(range(1, 21))
    assert np.all(np.abs(modes.eigenvalues[:6]) < 1e-8 * modes.eigenvalues[6])
    assert np.all(np.diff(modes.eigenvalues[6:]) >= 0) and modes.eigenvalues[6] > 1e-3
    flat = modes.vectors.reshape(20, -1)
    np.testing.assert_allclose(flat @ flat.T, np.eye(20), atol=1e-8)
    assert np.all((modes.collectivity > 0) & (modes.collectivity <= 1))
    # eigen-equation H u = lambda u holds for the flexible modes
    h = anm_hessian(xyz, contact_pairs(xyz, 15.0))
    for k in (6, 10, 19):
        np.testing.assert_allclose(h @ flat[k], modes.eigenvalues[k] * flat[k], atol=1e-8)
    # the deterministic sign rule: the largest-magnitude component is positive
    big = flat[np.arange(20), np.argmax(np.abs(flat), axis=1)]
    assert np.all(big[6:] > 0)


def test_dense_and_sparse_agree_and_signs_are_deterministic() -> None:
    xyz, _ = _ca("4ake.pdb")  # both chains, 428 nodes
    dense = compute_normal_modes(xyz, cutoff_angstrom=15.0, method="dense")
    sparse = compute_normal_modes(xyz, cutoff_angstrom=15.0, method="sparse")
    np.testing.assert_allclose(sparse.eigenvalues[6:], dense.eigenvalues[6:], rtol=1e-7)
    assert np.all(_overlaps(dense, sparse, slice(6, 20)) > 0.999)
    # same sign rule whatever the solver: equal vectors, not only equal up to sign
    np.testing.assert_allclose(sparse.vectors[6:16], dense.vectors[6:16], atol=1e-5)
    flipped = fix_signs(-dense.vectors[6:])
    np.testing.assert_allclose(flipped, dense.vectors[6:])


def test_rtb_low_modes_overlap_full_anm() -> None:
    xyz, blocks = _ca("4ake.pdb", ["A"])
    full = compute_normal_modes(xyz, cutoff_angstrom=15.0)
    rtb = compute_normal_modes(xyz, cutoff_angstrom=15.0, method="rtb", blocks=blocks)
    assert np.all(np.abs(rtb.eigenvalues[:6]) < 1e-8 * rtb.eigenvalues[6])
    o = _overlaps(full, rtb, slice(6, 12))
    # measured (4AKE chain A, 10 residues per block): 0.994 0.990 0.985 0.978 0.955 0.903
    assert np.all(o > 0.85), o
    assert o[:3].min() > 0.97
    # RTB frequencies are upper bounds of the full ones (a restricted Rayleigh quotient)
    assert np.all(rtb.eigenvalues[6:12] >= full.eigenvalues[6:12] * (1 - 1e-9))
    p = rtb_projection(xyz, blocks)
    np.testing.assert_allclose((p.T @ p).toarray(), np.eye(p.shape[1]), atol=1e-10)
    assert p.shape == (3 * len(xyz), 6 * len(np.unique(blocks)))


def test_rtb_on_a_large_model_matches_full_anm() -> None:
    xyz, blocks = _ca("7pbl.pdb")  # 1,948 nodes
    full = compute_normal_modes(xyz, cutoff_angstrom=15.0, method="sparse", n_modes=12)
    rtb = compute_normal_modes(xyz, cutoff_angstrom=15.0, method="rtb", blocks=blocks, n_modes=20)
    # full mode 7 is one loose terminal node (collectivity 0.001): no rigid block can follow
    # it, and the reference disables modes of collectivity < 0.15 anyway
    assert full.collectivity[6] < 0.01
    collective = [k for k in range(6, 12) if full.collectivity[k] >= 0.15]
    assert len(collective) == 5
    o = full.vectors[collective].reshape(5, -1) @ rtb.vectors[6:].reshape(14, -1).T
    # each collective full mode lies in the span of RTB modes 7-20 (measured 0.985-0.998)
    assert np.sqrt(np.sum(o**2, axis=1)).min() > 0.95


def test_open_to_closed_adenylate_kinase_is_captured_by_modes_7_to_12() -> None:
    """4AKE (open) -> 1AKE (closed), chain A Cα, superposed: cumulative overlap of 7-12."""
    open_, _ = _ca("4ake.pdb", ["A"])
    closed, _ = _ca("1ake.pdb", ["A"])
    assert len(open_) == len(closed) == 214
    rot, _ = Rotation.align_vectors(open_ - open_.mean(0), closed - closed.mean(0))
    moved = rot.apply(closed - closed.mean(0)) + open_.mean(0)
    d = (moved - open_).ravel()
    assert np.sqrt(d @ d / 214) == pytest.approx(7.131, abs=1e-3)  # PROVENANCE.md
    modes = compute_normal_modes(open_, cutoff_angstrom=15.0)
    o = np.abs(modes.vectors[6:12].reshape(6, -1) @ d) / np.linalg.norm(d)
    cumulative = float(np.sqrt(np.sum(o**2)))
    # measured 0.941 (mode 7 alone 0.799); 8-15 Å cutoffs give 0.94-0.96
    assert cumulative > 0.90, cumulative
    assert o[0] > 0.75
    # rigid-body modes are orthogonal to a superposed displacement
    assert np.all(np.abs(modes.vectors[:6].reshape(6, -1) @ d) < 1e-6 * np.linalg.norm(d))


def test_relative_and_auto_cutoffs() -> None:
    xyz, _ = _ca("4upy.pdb")  # protein + RNA (P atoms): loose at 15 Å
    assert 3.5 < relative_cutoff(xyz) < 12.0  # measured 10.65 Å
    with pytest.raises(FloppyNetworkError, match="zero-energy modes.*larger --cutoff"):
        compute_normal_modes(xyz, cutoff_angstrom=15.0)
    modes = compute_normal_modes(xyz, cutoff_angstrom="auto", cutoff_floor_angstrom=15.0)
    assert modes.settings["cutoff_angstrom"] > 15.0
    assert np.all(np.abs(modes.eigenvalues[:6]) < 1e-8 * modes.eigenvalues[6])
    c = connecting_cutoff(xyz, 1.0)
    compute_normal_modes(xyz[:50], cutoff_angstrom=max(c, 20.0))  # connected: no error


def test_bad_networks_give_clear_errors() -> None:
    xyz, _ = _ca("4ake.pdb", ["A"])
    apart = np.concatenate([xyz, xyz + 500.0])
    with pytest.raises(InputError, match=r"disconnected at a cutoff of 15.00 Å.*larger --cutoff"):
        compute_normal_modes(apart, cutoff_angstrom=15.0)
    with pytest.raises(InputError, match="no two nodes"):
        compute_normal_modes(xyz, cutoff_angstrom=1.0)
    triangle = [[0.0, 0, 0], [4.0, 0, 0], [0.0, 4.0, 0]]
    with pytest.raises(InputError, match="10 modes asked but the network has only 9"):
        compute_normal_modes(triangle, n_modes=10, cutoff_angstrom=8.0)
    with pytest.raises(InputError, match="at least 3 nodes"):
        compute_normal_modes(xyz[:2])
    with pytest.raises(InputError, match="cutoff must be > 0"):
        compute_normal_modes(xyz, cutoff_angstrom=-1.0)
    with pytest.raises(InputError, match="needs a block id"):
        compute_normal_modes(xyz, method="rtb")
    with pytest.raises(InputError, match="1000 modes asked.*642"):
        compute_normal_modes(xyz, n_modes=1000, cutoff_angstrom=15.0)


def test_deform_numpy_and_torch_agree_and_rms_is_q_over_sqrt_n() -> None:
    xyz, _ = _ca("4ake.pdb", ["A"])
    modes = compute_normal_modes(xyz, cutoff_angstrom=15.0).select([7, 8, 9])
    q = np.array([[3.0, 0, 0], [0, -2.0, 1.0]])
    moved = deform(modes.coordinates, modes.vectors, q)
    assert moved.shape == (2, 214, 3)
    rms = np.sqrt(np.mean(np.sum((moved[0] - xyz) ** 2, axis=1)))
    assert rms == pytest.approx(3.0 / np.sqrt(214))
    batch = deform(modes.coordinates, modes.vectors, np.zeros((4, 5, 3)))
    assert batch.shape == (4, 5, 214, 3)
    for device in DEVICES:
        t = deform(
            torch.tensor(modes.coordinates, device=device),
            torch.tensor(modes.vectors, device=device),
            torch.tensor(q, device=device),
        )
        np.testing.assert_allclose(t.cpu().numpy(), moved, atol=1e-10)
    with pytest.raises(ValueError, match="amplitudes"):
        deform(modes.coordinates, modes.vectors, np.zeros((2, 4)))
    with pytest.raises(InputError, match=r"mode\(s\) \[30\] not available"):
        modes.select([30])


def test_save_load_round_trip_and_required_names(tmp_path: Path) -> None:
    xyz, _ = _ca("4ake.pdb", ["A"])
    modes = compute_normal_modes(xyz, cutoff_angstrom=15.0, settings={"model": "4ake.pdb"})
    modes.save(tmp_path / "m.npz")
    raw = np.load(tmp_path / "m.npz")
    for key, shape in (
        ("coordinates", (214, 3)),
        ("eigenvalues", (20,)),
        ("vectors", (20, 214, 3)),
        ("mode_numbers", (20,)),
        ("collectivity", (20,)),
    ):
        assert raw[key].shape == shape, key
    back = NormalModes.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(back.vectors, modes.vectors)
    assert back.settings["model"] == "4ake.pdb" and back.settings["cutoff_angstrom"] == 15.0
    np.savez(tmp_path / "bad.npz", coordinates=xyz)
    with pytest.raises(InputError, match="missing eigenvalues"):
        NormalModes.load(tmp_path / "bad.npz")
    with pytest.raises(InputError, match="no such modes file"):
        NormalModes.load(tmp_path / "none.npz")
    assert list(tmp_path.iterdir()) == [tmp_path / "bad.npz", tmp_path / "m.npz"] or sorted(
        p.name for p in tmp_path.iterdir()
    ) == ["bad.npz", "m.npz"]


def test_coarse_graining_bad_models(tmp_path: Path) -> None:
    model = read_structure(shared("structures/4ake.pdb"), chains=["A"])
    one = model.select(model.residue_index == model.residue_index[0])
    with pytest.raises(InputError, match="only 1 node"):
        coarse_grain(one)
    doubled = model.select(np.isin(model.residue_index, [0, 1, 2]))
    import dataclasses

    twice = dataclasses.replace(
        doubled,
        coordinates_angstrom=np.concatenate([doubled.coordinates_angstrom] * 2),
        **{
            f: np.concatenate([getattr(doubled, f)] * 2)
            for f in (
                "elements",
                "atom_names",
                "residue_names",
                "insertion_codes",
                "chain_ids",
                "b_factors",
                "occupancies",
                "polymer_kind",
            )
        },
        residue_numbers=np.concatenate([doubled.residue_numbers, doubled.residue_numbers + 10]),
        residue_index=np.concatenate([doubled.residue_index, doubled.residue_index + 3]),
    )
    with pytest.raises(InputError, match="overlap.*duplicate"):
        coarse_grain(twice)
    heavy = coarse_grain(model, nodes="heavy")
    assert len(heavy) == 1656
    ca = coarse_grain(model, mass_weighted=True)
    assert len(ca) == 214 and 50 < ca.masses.mean() < 150  # ~110 Da per residue, no H


def test_mass_weighted_modes() -> None:
    cg = coarse_grain(
        read_structure(shared("structures/4ake.pdb"), chains=["A"]), mass_weighted=True
    )
    plain = compute_normal_modes(cg.coordinates_angstrom, cutoff_angstrom=15.0)
    weighted = compute_normal_modes(cg.coordinates_angstrom, cutoff_angstrom=15.0, masses=cg.masses)
    assert weighted.settings["mass_weighted"]
    np.testing.assert_allclose(np.linalg.norm(weighted.vectors.reshape(20, -1), axis=1), 1.0)
    assert np.all(np.abs(weighted.eigenvalues[:6]) < 1e-8 * weighted.eigenvalues[6])
    # mass weighting changes the modes only a little for a protein (residue masses 57-186 Da)
    assert np.all(_overlaps(plain, weighted, slice(6, 9)) > 0.8)
    # with equal masses it is the same problem, scaled
    same = compute_normal_modes(
        cg.coordinates_angstrom, cutoff_angstrom=15.0, masses=np.full(214, 4.0)
    )
    np.testing.assert_allclose(same.eigenvalues[6:], plain.eigenvalues[6:] / 4.0, rtol=1e-8)
    assert np.all(_overlaps(plain, same, slice(6, 20)) > 0.9999)


def test_atoms_move_with_their_nodes() -> None:
    from deephemnma_bridge.nma import deform_atoms

    nodes = np.array([[0.0, 0, 0], [5.0, 0, 0]])
    modes = np.zeros((1, 2, 3))
    modes[0, 1, 1] = 1.0  # mode moves node 1 along y
    atoms = np.array([[0.5, 0, 0], [5.5, 0, 0], [9.0, 9, 9]])
    moved = deform_atoms(atoms, np.array([0, 1, -1]), nodes, modes, np.array([[2.0], [-1.0]]))
    assert moved.shape == (2, 3, 3)
    np.testing.assert_allclose(moved[0], [[0.5, 0, 0], [5.5, 2, 0], [9, 9, 9]])
    np.testing.assert_allclose(moved[1, 1], [5.5, -1, 0])
