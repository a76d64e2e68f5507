"""EM maps: reading (axis order, voxel size, origin) and Gaussian pseudoatoms."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
from conftest import shared
from scipy.ndimage import gaussian_filter

from deephemnma_bridge.adapters.maps import read_map, write_map
from deephemnma_bridge.adapters.structure import read_structure, write_models
from deephemnma_bridge.coarse_grain import coarse_grain
from deephemnma_bridge.errors import InputError
from deephemnma_bridge.pseudoatoms import otsu_threshold, pseudoatoms
from deephemnma_bridge.structure import DensityMap


def _blob_map() -> DensityMap:
    """Two smooth blobs joined by a bar, on an anisotropic 24 x 20 x 16 grid."""
    data = np.zeros((16, 20, 24))
    data[6:10, 5:15, 4:20] = 1.0
    data[4:12, 8:12, 4:8] = 1.0
    return DensityMap(
        gaussian_filter(data, 1.2).astype(np.float32),
        np.array([1.5, 1.4, 1.6]),
        np.array([10.0, -5.0, 3.0]),
        name="blobs",
    )


def test_permuted_axis_order_origin_and_voxel_size(tmp_path: Path) -> None:
    zyx = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # (z, y, x)
    path = tmp_path / "perm.mrc"
    with mrcfile.new(path) as mrc:
        # store with columns = z, rows = x, sections = y (MAPC=3, MAPR=1, MAPS=2)
        mrc.set_data(np.ascontiguousarray(np.transpose(zyx, (1, 2, 0))))  # (y, x, z)
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = 3, 1, 2
        mrc.header.nxstart, mrc.header.nystart, mrc.header.nzstart = 7, -2, 3  # cols, rows, secs
        mrc.header.mx, mrc.header.my, mrc.header.mz = 6, 5, 4
        mrc.header.cella = (6 * 2.0, 5 * 3.0, 4 * 4.0)
    density = read_map(path)
    np.testing.assert_array_equal(density.data, zyx)
    np.testing.assert_allclose(density.voxel_size_angstrom, [2.0, 3.0, 4.0])
    # x starts at NYSTART (rows are x), y at NZSTART (sections are y), z at NXSTART
    np.testing.assert_allclose(density.origin_angstrom, [-2 * 2.0, 3 * 3.0, 7 * 4.0])
    write_map(tmp_path / "std.mrc", density)
    again = read_map(tmp_path / "std.mrc")
    np.testing.assert_array_equal(again.data, zyx)
    np.testing.assert_allclose(again.origin_angstrom, density.origin_angstrom)


def test_real_maps_read() -> None:
    emd3001 = read_map(shared("maps/EMD-3001.map"))  # MAPC/MAPR/MAPS = 3, 1, 2
    assert emd3001.data.shape == (73, 25, 43)  # (z, y, x)
    np.testing.assert_allclose(emd3001.voxel_size_angstrom, [0.44825, 0.3925, 0.45875], rtol=1e-5)
    np.testing.assert_allclose(emd3001.origin_angstrom, [-21 * 0.44825, -12 * 0.3925, 0.0], 1e-5)
    prody = read_map(shared("maps/1ake_prody.mrc"))
    np.testing.assert_allclose(prody.origin_angstrom, [-64.0, -64.0, -64.0])
    assert read_map(shared("maps/EMD-3197.map")).data.shape == (20, 20, 20)


def test_pseudoatoms_reach_the_target_and_sit_on_the_molecule(tmp_path: Path) -> None:
    density = _blob_map()
    atoms = pseudoatoms(density, threshold=0.05, target_error=0.05)
    assert atoms.error <= 0.05 and len(atoms) > 50
    assert atoms.sigma_angstrom == pytest.approx(1.5)
    # every atom lies inside the (dilated) molecule, in Å with the origin honoured
    idx = np.rint((atoms.coordinates_angstrom - density.origin_angstrom) / [1.5, 1.4, 1.6])
    zyx = idx[:, ::-1].astype(int)
    assert np.all(zyx >= 0) and np.all(zyx < density.data.shape)
    assert np.all(density.data[tuple(zyx.T)] > 0.01)
    # written as a model that gemmi reads back, atom for atom
    write_models(tmp_path / "ps.cif", atoms.as_model())
    back = coarse_grain(read_structure(tmp_path / "ps.cif"))
    np.testing.assert_allclose(back.coordinates_angstrom, atoms.coordinates_angstrom, atol=1e-3)
    tighter = pseudoatoms(density, threshold=0.05, target_error=0.02)
    assert tighter.error <= 0.02 and len(tighter) >= len(atoms)


def test_pseudoatoms_of_real_maps() -> None:
    atoms = pseudoatoms(read_map(shared("maps/EMD-3197.map")))
    assert atoms.error <= 0.05  # measured 0.049 with 1,022 atoms
    assert 500 < len(atoms) < 3000
    with pytest.warns(UserWarning, match="smaller --sigma"):
        sharp = pseudoatoms(read_map(shared("maps/EMD-3001.map")), max_atoms=3000)
    assert sharp.error < 0.2


def test_maps_with_space_group_0_and_image_stacks(tmp_path: Path) -> None:
    """A cube with space group 0 (as RELION 3.1's relion_reconstruct writes its maps) is a map;
    the same in a .mrcs file, or a non-cubic block, is an image stack and refused by name."""
    data = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    for name in ("relion31.mrc", "stack.mrcs", "block.mrc"):
        with mrcfile.new(tmp_path / name) as mrc:
            mrc.set_data(data if name != "block.mrc" else data[:5])
            mrc.header.ispg = 0
            mrc.voxel_size = 1.5
    np.testing.assert_array_equal(read_map(tmp_path / "relion31.mrc").data, data)
    with pytest.raises(InputError, match=r"stack.mrcs: a 3D map is needed, this holds 8 images"):
        read_map(tmp_path / "stack.mrcs")
    with pytest.raises(InputError, match="block.mrc: a 3D map is needed, this holds 5 images"):
        read_map(tmp_path / "block.mrc")


def test_map_errors() -> None:
    density = _blob_map()
    with pytest.raises(InputError, match="no voxel above the threshold 5"):
        pseudoatoms(density, threshold=5.0)
    with pytest.raises(InputError, match="target error"):
        pseudoatoms(density, target_error=0.0)
    with pytest.raises(InputError, match="mask has shape"):
        pseudoatoms(density, mask=np.ones((2, 2, 2), dtype=bool))
    with pytest.raises(InputError, match="no such map"):
        read_map("/nonexistent/x.mrc")
    values = np.r_[np.zeros(900), np.ones(100)]
    assert 0 < otsu_threshold(values) < 1
