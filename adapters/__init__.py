"""Host formats: RELION STAR, cryoSPARC .cs, MRC stacks, RELION External jobs.

Installed as ``deephemnma_bridge.adapters`` (never as a top-level ``adapters``: that name
belongs to another PyPI distribution).

Example
-------
>>> from deephemnma_bridge.adapters import read_particles, write_particles  # doctest: +SKIP
>>> table = read_particles("Refine3D/job025/run_data.star")                # doctest: +SKIP
>>> write_particles(table, "particles.cs")                                  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deephemnma_bridge.errors import ParticleFileError
from deephemnma_bridge.particles import ParticleTable

from .images import ParticleImages, StackWriter, read_stack_header, resolve_stack
from .relion import read_relion_particles, write_relion_particles

if TYPE_CHECKING:
    from cryosparc.dataset import Dataset

__all__ = [
    "ParticleImages",
    "StackWriter",
    "dataset_from_particles",
    "particles_from_dataset",
    "read_cryosparc_particles",
    "read_particles",
    "read_relion_particles",
    "read_stack_header",
    "require_poses",
    "resolve_stack",
    "write_cryosparc_particles",
    "write_particles",
    "write_relion_particles",
]


def _kind(path: str | os.PathLike[str]) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in (".star", ".cs"):
        return suffix
    raise ParticleFileError(
        f"{path}: unknown particle file type {suffix or '(no extension)'!r}; "
        "use a RELION .star or a cryoSPARC .cs file"
    )


def read_cryosparc_particles(path: str | os.PathLike[str], **kwargs: Any) -> ParticleTable:
    """See `deephemnma_bridge.adapters.cryosparc.read_cryosparc_particles`."""
    from .cryosparc import read_cryosparc_particles as read

    return read(path, **kwargs)


def write_cryosparc_particles(table: ParticleTable, path: str | os.PathLike[str]) -> list[str]:
    """See `deephemnma_bridge.adapters.cryosparc.write_cryosparc_particles`."""
    from .cryosparc import write_cryosparc_particles as write

    return write(table, path)


def particles_from_dataset(
    dataset: Dataset,
    *,
    source_name: str = "<dataset>",
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
) -> ParticleTable:
    """See `deephemnma_bridge.adapters.cryosparc.particles_from_dataset`."""
    from .cryosparc import particles_from_dataset as convert

    return convert(dataset, source_name=source_name, search_dirs=search_dirs)


def dataset_from_particles(table: ParticleTable) -> Dataset:
    """See `deephemnma_bridge.adapters.cryosparc.dataset_from_particles`."""
    from .cryosparc import dataset_from_particles as convert

    return convert(table)


def read_particles(path: str | os.PathLike[str], **kwargs: Any) -> ParticleTable:
    """Read a RELION ``.star`` or cryoSPARC ``.cs`` particle file into a `ParticleTable`.

    Keyword arguments go to the format's reader (``pixel_size_angstrom=`` for STAR,
    ``passthrough=`` for ``.cs``).
    """
    if _kind(path) == ".star":
        return read_relion_particles(path, **kwargs)
    return read_cryosparc_particles(path, **kwargs)


def write_particles(
    table: ParticleTable, path: str | os.PathLike[str], *, relion_version: str = "3.1"
) -> list[str]:
    """Write ``table`` as ``.star`` (RELION ``relion_version``, default 3.1+) or ``.cs``.

    Returns notes on the values the target format cannot hold and where they went (side files
    ``<stem>_dhn.csv`` / ``<stem>_dhn.cs``, ``rln/<label>`` fields), for the user.
    """
    if _kind(path) == ".star":
        return write_relion_particles(table, path, relion_version=relion_version)
    return write_cryosparc_particles(table, path)


def require_poses(table: ParticleTable, path: str | os.PathLike[str]) -> None:
    """Raise `ParticleFileError` when ``table`` (read from ``path``) has no 3D poses."""
    if table.rotation_matrices is None:
        raise ParticleFileError(
            f"{path}: no 3D poses (rlnAngleRot/Tilt/Psi or alignments3D/pose) but this step needs "
            "them; give the output of a 3D refinement, or align first (deephemnma align)"
        )
