"""`ParticleTable`: the hub type that every stage reads and writes.

A table of n particles as aligned numpy arrays, in the internal convention of
`deephemnma_bridge.conventions` (RELION's), with units in the field names. Readers in
`deephemnma_bridge.adapters` build it from STAR / ``.cs`` files and keep the rows they read in
``source`` so that writers put back every column no stage changed. Stages add per-particle values
(amplitudes, costs, PC coordinates, groups) in ``extra`` under their label without the leading
underscore (``"dhnAmplitude7"``, ``"dhnCost"``).

Example
-------
>>> import numpy as np
>>> t = ParticleTable.empty_like_stack("stack.mrcs", n=3, pixel_size_angstrom=1.0, box_size_px=32)
>>> len(t), t.image_indices.tolist()
(3, [0, 1, 2])
>>> t.take([2, 0]).image_indices.tolist()
[2, 0]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

from .conventions import normalise_stack_name

__all__ = ["ParticleTable", "SourceRows"]

SourceFormat = Literal["relion30", "relion31", "cryosparc"]

# per-particle float fields of the table, in order
_FLOAT_FIELDS = (
    "defocus_u_angstrom",
    "defocus_v_angstrom",
    "defocus_angle_degrees",
    "voltage_kv",
    "spherical_aberration_mm",
    "amplitude_contrast",
    "phase_shift_degrees",
    "bfactor_angstrom2",
    "pixel_size_angstrom",
)


@dataclass(frozen=True, eq=False)
class SourceRows:
    """The rows a reader read, kept so that writers lose no column.

    Attributes
    ----------
    format : {"relion30", "relion31", "cryosparc"}
        Where the rows came from.
    rows : pandas.DataFrame or numpy structured array
        STAR: the particle block exactly as read (columns without the leading ``_``; optics
        *not* merged in). cryoSPARC: the structured array of all fields (main and passthrough
        merged by uid).
    optics : pandas.DataFrame or None
        STAR 3.1+ optics block as read.
    other_blocks : dict
        Other STAR blocks, in file order (e.g. RELION 5's ``general``), written back unchanged.
    path : str
        The file the rows came from.
    generated : frozenset of str
        STAR labels that our writer made up when it wrote the file (not in the data it
        converted, e.g. ``rlnMagnification`` in a 3.0 file written from a 3.1 file); a writer
        of another format leaves them out again.
    side_labels : tuple of str
        STAR labels read from the side file ``<stem>_dhn.csv`` (labels a RELION 3.0 file cannot
        hold), in the order of their source.
    cs_records : numpy structured array or None
        For rows read from a STAR file written from a ``.cs`` file: the ``.cs`` rows as read (all
        fields, uids), aligned with ``rows``, from the side file ``<stem>_dhn.cs``.
    """

    format: SourceFormat
    rows: Any
    optics: pd.DataFrame | None = None
    other_blocks: Mapping[str, Any] = field(default_factory=dict)
    path: str = ""
    generated: frozenset[str] = frozenset()
    side_labels: tuple[str, ...] = ()
    cs_records: Any = None

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices: NDArray[np.intp]) -> SourceRows:
        """Rows at ``indices`` (0-based positions), same optics and other blocks."""
        if isinstance(self.rows, pd.DataFrame):
            rows: Any = self.rows.iloc[indices].reset_index(drop=True)
        else:
            rows = self.rows[indices]
        records = None if self.cs_records is None else self.cs_records[indices]
        return dataclasses.replace(self, rows=rows, cs_records=records)


def _float_array(values: ArrayLike, n: int, name: str) -> NDArray[np.float64]:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 0:
        a = np.full(n, float(a))
    if a.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {a.shape}")
    return a


def _int_array(values: ArrayLike, n: int, name: str) -> NDArray[np.int64]:
    a = np.asarray(values)
    if a.ndim == 0:
        a = np.full(n, a)
    if a.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {a.shape}")
    return a.astype(np.int64)


@dataclass(frozen=True, eq=False)
class ParticleTable:
    """n particles: where their images are, their poses, CTF and optics, and our results.

    All arrays have length n along their first axis. The class validates shapes and converts
    dtypes on construction; it never reads files.

    Attributes
    ----------
    image_paths : array (n,) of str
        Stack path as written in the source (RELION ``rlnImageName`` path part, cryoSPARC
        ``blob/path`` without a leading ``>``).
    image_indices : array (n,) int64
        0-based image index in the stack.
    rotation_matrices : array (n, 3, 3) or None
        RELION ``A`` (rotates the model, ``r' = A r``); None when the file has no poses.
    shifts_angstrom : array (n, 2)
        RELION origin (x, y) in Å: the image is the projection translated by minus it.
    defocus_u_angstrom, defocus_v_angstrom : array (n,)
        Positive = underfocus.
    defocus_angle_degrees, voltage_kv, spherical_aberration_mm, amplitude_contrast,
    phase_shift_degrees, bfactor_angstrom2 : array (n,)
        CTF parameters in RELION's convention.
    pixel_size_angstrom : array (n,)
        Pixel size of the particle images.
    box_size_px : array (n,) int64
        Side of the (square) particle images.
    optics_group : array (n,) int64
        1-based optics group (RELION) / ``ctf/exp_group_id + 1`` (cryoSPARC).
    half_set : array (n,) int64 or None
        1 or 2 (RELION ``rlnRandomSubset``; cryoSPARC ``split + 1``), 0 when unassigned.
    class_number : array (n,) int64 or None
        1-based class.
    uids : array (n,) uint64 or None
        cryoSPARC uids when known.
    extra : dict of str to array (n,)
        Values added by this package, by label without ``_`` (``"dhnAmplitude7"``).
    source : SourceRows or None
        The rows read, for lossless writing.
    search_dirs : tuple of str
        Folders against which relative ``image_paths`` are resolved, most likely first.
    """

    image_paths: NDArray[Any]
    image_indices: NDArray[np.int64]
    rotation_matrices: NDArray[np.float64] | None
    shifts_angstrom: NDArray[np.float64]
    defocus_u_angstrom: NDArray[np.float64]
    defocus_v_angstrom: NDArray[np.float64]
    defocus_angle_degrees: NDArray[np.float64]
    voltage_kv: NDArray[np.float64]
    spherical_aberration_mm: NDArray[np.float64]
    amplitude_contrast: NDArray[np.float64]
    phase_shift_degrees: NDArray[np.float64]
    bfactor_angstrom2: NDArray[np.float64]
    pixel_size_angstrom: NDArray[np.float64]
    box_size_px: NDArray[np.int64]
    optics_group: NDArray[np.int64]
    half_set: NDArray[np.int64] | None = None
    class_number: NDArray[np.int64] | None = None
    uids: NDArray[np.uint64] | None = None
    extra: Mapping[str, NDArray[Any]] = field(default_factory=dict)
    source: SourceRows | None = None
    search_dirs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        paths = np.asarray(self.image_paths, dtype=object)
        if paths.ndim != 1:
            raise ValueError(f"image_paths must be 1-D, got shape {paths.shape}")
        n = paths.shape[0]
        set_ = object.__setattr__
        set_(self, "image_paths", paths)
        idx = _int_array(self.image_indices, n, "image_indices")
        if n and idx.min() < 0:
            raise ValueError("image_indices are 0-based and must be >= 0")
        set_(self, "image_indices", idx)
        if self.rotation_matrices is not None:
            rot = np.asarray(self.rotation_matrices, dtype=np.float64)
            if rot.shape != (n, 3, 3):
                raise ValueError(f"rotation_matrices must have shape ({n}, 3, 3), got {rot.shape}")
            set_(self, "rotation_matrices", rot)
        shifts = np.asarray(self.shifts_angstrom, dtype=np.float64)
        if shifts.shape != (n, 2):
            raise ValueError(f"shifts_angstrom must have shape ({n}, 2), got {shifts.shape}")
        set_(self, "shifts_angstrom", shifts)
        for name in _FLOAT_FIELDS:
            set_(self, name, _float_array(getattr(self, name), n, name))
        set_(self, "box_size_px", _int_array(self.box_size_px, n, "box_size_px"))
        set_(self, "optics_group", _int_array(self.optics_group, n, "optics_group"))
        for name in ("half_set", "class_number"):
            if getattr(self, name) is not None:
                set_(self, name, _int_array(getattr(self, name), n, name))
        if self.uids is not None:
            uids = np.asarray(self.uids, dtype=np.uint64)
            if uids.shape != (n,):
                raise ValueError(f"uids must have shape ({n},), got {uids.shape}")
            set_(self, "uids", uids)
        extra: dict[str, NDArray[Any]] = {}
        for key, values in self.extra.items():
            a = np.asarray(values)
            if a.shape[:1] != (n,):
                raise ValueError(f"extra column {key!r} must have length {n}, got {a.shape}")
            extra[key] = a
        set_(self, "extra", extra)
        if self.source is not None and len(self.source) != n:
            raise ValueError(f"source has {len(self.source)} rows, table has {n}")
        set_(self, "search_dirs", tuple(str(d) for d in self.search_dirs))

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.image_paths.shape[0])

    @property
    def n(self) -> int:
        """Number of particles."""
        return len(self)

    @property
    def has_poses(self) -> bool:
        """Whether rotation matrices are present."""
        return self.rotation_matrices is not None

    @cached_property
    def keys(self) -> NDArray[Any]:
        """Stable particle keys (n,): ``"uid:<uid>"`` when known, else ``"<stack>:<index0>"``.

        The stack part is `normalise_stack_name` of the path, so the same particle gets the same
        key in RELION and cryoSPARC files.
        """
        if self.uids is not None:
            return np.array([f"uid:{u}" for u in self.uids.tolist()], dtype=object)
        return np.asarray(self.stack_keys, dtype=object)

    @cached_property
    def stack_keys(self) -> NDArray[Any]:
        """``"<normalised stack>:<index0>"`` for every particle, whatever the uids."""
        norm = pd.Series(self.image_paths).map(normalise_stack_name)
        return (norm + ":" + pd.Series(self.image_indices).astype(str)).to_numpy(dtype=object)

    # ------------------------------------------------------------------ derived tables
    def take(self, indices: Sequence[int] | NDArray[np.integer[Any]]) -> ParticleTable:
        """A new table holding the particles at ``indices`` (0-based positions), in that order."""
        idx = np.asarray(indices, dtype=np.intp)
        if idx.ndim != 1:
            raise ValueError("indices must be 1-D")
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"indices out of range for a table of {len(self)} particles")
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                changes["extra"] = {k: v[idx] for k, v in value.items()}
            elif f.name == "source":
                changes["source"] = None if value is None else value.take(idx)
            elif f.name == "search_dirs":
                continue
            elif isinstance(value, np.ndarray):
                changes[f.name] = value[idx]
        return dataclasses.replace(self, **changes)

    def mask(self, selection: ArrayLike) -> ParticleTable:
        """A new table with the particles where the boolean ``selection`` (n,) is True."""
        sel = np.asarray(selection, dtype=bool)
        if sel.shape != (len(self),):
            raise ValueError(f"selection must have shape ({len(self)},), got {sel.shape}")
        return self.take(np.flatnonzero(sel))

    def with_poses(
        self, rotation_matrices: ArrayLike, shifts_angstrom: ArrayLike | None = None
    ) -> ParticleTable:
        """A copy with new rotations (n, 3, 3) and, if given, new origins (n, 2) in Å."""
        shifts = self.shifts_angstrom if shifts_angstrom is None else shifts_angstrom
        return dataclasses.replace(
            self,
            rotation_matrices=np.asarray(rotation_matrices, dtype=np.float64),
            shifts_angstrom=np.asarray(shifts, dtype=np.float64),
        )

    def with_extra(self, **columns: ArrayLike) -> ParticleTable:
        """A copy with extra per-particle columns added or replaced (labels without ``_``)."""
        extra = dict(self.extra)
        for key, values in columns.items():
            extra[key] = np.asarray(values)
        return dataclasses.replace(self, extra=extra)

    def replace(self, **changes: Any) -> ParticleTable:
        """A copy with the given fields replaced (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def empty_like_stack(
        cls,
        stack_path: str,
        *,
        n: int,
        pixel_size_angstrom: float,
        box_size_px: int,
        voltage_kv: float = 300.0,
        spherical_aberration_mm: float = 2.7,
        amplitude_contrast: float = 0.1,
    ) -> ParticleTable:
        """A table for the first ``n`` images of one stack, without poses and with zero defocus."""
        zeros = np.zeros(n)
        return cls(
            image_paths=np.full(n, stack_path, dtype=object),
            image_indices=np.arange(n),
            rotation_matrices=None,
            shifts_angstrom=np.zeros((n, 2)),
            defocus_u_angstrom=zeros,
            defocus_v_angstrom=zeros,
            defocus_angle_degrees=zeros,
            voltage_kv=np.full(n, voltage_kv),
            spherical_aberration_mm=np.full(n, spherical_aberration_mm),
            amplitude_contrast=np.full(n, amplitude_contrast),
            phase_shift_degrees=zeros,
            bfactor_angstrom2=zeros,
            pixel_size_angstrom=np.full(n, pixel_size_angstrom),
            box_size_px=np.full(n, box_size_px),
            optics_group=np.ones(n, dtype=np.int64),
        )
