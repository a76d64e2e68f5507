"""EM maps (MRC/CCP4) in and out, with mrcfile, honouring axis order, voxel size and origin.

`read_map` returns a `DensityMap` whose ``data`` is always indexed (z, y, x), whatever the
file's MAPC/MAPR/MAPS axis order, with anisotropic voxel sizes kept per axis and the origin of
voxel (0, 0, 0) in Å: the header ORIGIN when set (MRC2014), else NXSTART/NYSTART/NZSTART
times the voxel size (the CCP4 convention), as ChimeraX does.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mrcfile
import numpy as np

from deephemnma_bridge.errors import InputError
from deephemnma_bridge.fileutils import atomic_path
from deephemnma_bridge.structure import DensityMap

__all__ = ["read_map", "write_map"]


def read_map(path: str | os.PathLike[str]) -> DensityMap:
    """Read a 3D map; raise `InputError` naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such map file")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mrc = mrcfile.open(path, mode="r", permissive=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable MRC/CCP4 map ({exc})") from exc
    with mrc:
        if mrc.data is None:
            raise InputError(
                f"{path}: not an MRC/CCP4 map (no data; {caught[0].message})"
                if caught
                else f"{path}: no data in this MRC file"
            )
        if mrc.data.ndim != 3 or (mrc.is_image_stack() and not _unmarked_volume(path, mrc)):
            raise InputError(
                f"{path}: a 3D map is needed, this holds {mrc.data.shape[0]} images "
                f"of {mrc.data.shape[1:]} px (an image stack, space group 0)"
            )
        h = mrc.header
        order = (int(h.maps), int(h.mapr), int(h.mapc))  # axis label (1=x) of data axes 0, 1, 2
        if sorted(order) != [1, 2, 3]:
            order = (3, 2, 1)  # invalid header: assume the standard order
        perm = [order.index(3), order.index(2), order.index(1)]
        data = np.ascontiguousarray(np.transpose(np.asarray(mrc.data, dtype=np.float32), perm))
        voxel = np.array(
            [float(mrc.voxel_size.x), float(mrc.voxel_size.y), float(mrc.voxel_size.z)]
        )
        if np.any(voxel <= 0):
            raise InputError(f"{path}: the header gives no voxel size (cell dimensions are 0)")
        origin = np.array([float(h.origin.x), float(h.origin.y), float(h.origin.z)])
        if not np.any(origin):
            start_of_label = {
                int(h.mapc): int(h.nxstart),
                int(h.mapr): int(h.nystart),
                int(h.maps): int(h.nzstart),
            }
            start = np.array([start_of_label.get(a, 0) for a in (1, 2, 3)], dtype=np.float64)
            origin = start * voxel
    if not np.all(np.isfinite(data)):
        raise InputError(f"{path}: the map contains NaN or infinite values")
    return DensityMap(data=data, voxel_size_angstrom=voxel, origin_angstrom=origin, name=path.name)


def _unmarked_volume(path: Path, mrc: mrcfile.mrcfile.MrcFile) -> bool:
    """A cube with space group 0 in a file not named ``.mrcs``: a map whose writer left the
    space group unset. RELION 3.1's ``relion_reconstruct`` writes its maps so (ISPG 0, which
    MRC2014 reserves for image stacks); its particle stacks are ``.mrcs``."""
    shape = mrc.data.shape
    return path.suffix.lower() != ".mrcs" and shape[0] == shape[1] == shape[2]


def write_map(path: str | os.PathLike[str], density: DensityMap) -> None:
    """Write ``density`` as a standard-order MRC2014 file (atomically)."""
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(np.asarray(density.data, dtype=np.float32))
        mrc.voxel_size = tuple(float(v) for v in density.voxel_size_angstrom)
        mrc.header.origin = tuple(float(v) for v in density.origin_angstrom)
