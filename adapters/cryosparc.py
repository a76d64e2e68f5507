"""cryoSPARC particle ``.cs`` files <-> `ParticleTable`, lossless, through cryosparc-tools.

Reading (``../shared/docs/INTEROP.md`` section 3): ``Dataset.load`` reads numpy and CSDAT
files. ``alignments3D/pose`` (axis-angle, radians) gives ``A = R_cs.T``; ``alignments3D/shift``
(pixels of ``alignments3D/psize_A``, falling back to ``blob/psize_A``) times that pixel size is
RELION's origin in Å (same sign). A file with only ``alignments2D`` has no 3D poses. CTF fields
map one to one (angles in radians become degrees). ``blob/path`` loses a leading ``>``;
``blob/idx`` is 0-based; ``ctf/exp_group_id + 1`` is the optics group; ``alignments3D/split + 1``
the half set; ``alignments3D/class + 1`` the class.

Passthrough: cryoSPARC splits a job output into ``J<n>_<output>.cs`` (or
``cryosparc_P<p>_J<n>_<ver>_<output>.cs``) and ``J<n>_passthrough_<output>.cs``. Files given with
``passthrough=`` (by default, that sibling when it exists: `find_passthrough`) are merged by uid:
the main file's order and fields are kept, the passthrough adds only the fields the main file
lacks, and a uid absent from a passthrough is an error. Relative ``blob/path`` values are
resolved against the ``.cs`` folder, its parent and grandparent (the cryoSPARC project folder for
``P1/J5/J5_particles.cs``) and the working directory (``ParticleTable.search_dirs``).

Writing keeps every field of the rows read (uids included) and replaces only
``alignments3D/pose``, ``shift`` and ``psize_A``; our per-particle values are ``dhn/<label>``
fields. A table read from a STAR file is written from its fields, with uids from its
``dhnCsUid`` column when present, else derived from a hash of (stack name, index) so that the same
particle always gets the same uid; every STAR column without a cryoSPARC field is carried as a
``rln/<label>`` field, which the STAR writer turns back into the column.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from cryosparc.dataset import Dataset
from numpy.typing import NDArray

from deephemnma_bridge.conventions import matrix_to_rotvec, rotvec_to_matrix
from deephemnma_bridge.errors import ParticleFileError
from deephemnma_bridge.fileutils import atomic_path, check_not_input
from deephemnma_bridge.particles import ParticleTable, SourceRows

__all__ = [
    "find_passthrough",
    "read_cryosparc_particles",
    "stable_uids",
    "write_cryosparc_particles",
]

# STAR columns that the fields of a .cs already carry (not copied into rln/ fields)
STAR_MAPPED = frozenset(
    {
        "rlnImageName",
        "rlnAngleRot",
        "rlnAngleTilt",
        "rlnAnglePsi",
        "rlnOriginXAngst",
        "rlnOriginYAngst",
        "rlnOriginX",
        "rlnOriginY",
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnDefocusAngle",
        "rlnPhaseShift",
        "rlnCtfBfactor",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
        "rlnImagePixelSize",
        "rlnImageSize",
        "rlnOpticsGroup",
        "rlnRandomSubset",
        "rlnClassNumber",
        "rlnMagnification",
        "rlnDetectorPixelSize",
        "dhnCsUid",
    }
)


def _text(values: NDArray[Any]) -> NDArray[Any]:
    """Decode byte strings (numpy .cs) to str; strip a leading '>'."""
    series = pd.Series(values)
    if len(series) and isinstance(series.iloc[0], bytes):
        series = series.str.decode("utf-8")
    return series.astype(str).str.lstrip(">").to_numpy(dtype=object)


_MAIN_NAME = re.compile(r"(?:^|_)(J\d+)_(?:\d+_)?(.+)$")


def find_passthrough(path: Path) -> list[Path]:
    """The passthrough file of a job output ``.cs``, when it lies next to it.

    cryoSPARC names a job's output ``J<n>_<output>.cs`` or ``cryosparc_P<p>_J<n>_<ver>_<output>.cs``
    and its passthrough ``J<n>_passthrough_<output>.cs`` in the same folder; the latter is
    returned (as a one-element list) when it exists, else an empty list.
    """
    match = _MAIN_NAME.search(path.stem)
    if match is None or "passthrough" in path.stem:
        return []
    job, output = match.groups()
    candidate = path.with_name(f"{job}_passthrough_{output}{path.suffix}")
    return [candidate] if candidate.is_file() else []


def _load(path: Path) -> NDArray[Any]:
    if not path.is_file():
        raise ParticleFileError(f"{path}: no such file")
    try:
        ds = Dataset.load(path)
    except Exception as err:
        raise ParticleFileError(
            f"{path}: not a readable cryoSPARC .cs file ({type(err).__name__}: {err})"
        ) from err
    return np.asarray(ds.to_records(fixed=True))


def _merge(main: NDArray[Any], extra: NDArray[Any], main_path: Path, pt_path: Path) -> NDArray[Any]:
    new = [f for f in (extra.dtype.names or ()) if f not in (main.dtype.names or ())]
    if not new:
        return main
    order = np.argsort(extra["uid"])
    pos = np.searchsorted(extra["uid"], main["uid"], sorter=order)
    pos = np.clip(pos, 0, len(order) - 1)
    found = extra["uid"][order[pos]] == main["uid"]
    if not found.all():
        row = int(np.flatnonzero(~found)[0])
        raise ParticleFileError(
            f"{pt_path}: no row for uid {main['uid'][row]} (row {row + 1} of {main_path}); "
            "is it the passthrough of another job?"
        )
    take = order[pos]
    descr = [d for d in main.dtype.descr if d[0]]
    descr += [d for d in extra.dtype.descr if d[0] in new]
    out = np.empty(len(main), dtype=np.dtype(descr))
    for f in main.dtype.names or ():
        out[f] = main[f]
    for f in new:
        out[f] = extra[f][take]
    return out


def _field(records: NDArray[Any], name: str) -> NDArray[Any] | None:
    return records[name] if name in (records.dtype.names or ()) else None


# the float fields the table is built from (others, e.g. alignments2D/*, are carried unread)
READ_FIELDS = (
    "blob/psize_A",
    "ctf/df1_A",
    "ctf/df2_A",
    "ctf/df_angle_rad",
    "ctf/accel_kv",
    "ctf/cs_mm",
    "ctf/amp_contrast",
    "ctf/phase_shift_rad",
    "ctf/bfactor",
    "alignments3D/pose",
    "alignments3D/shift",
    "alignments3D/psize_A",
)


def _check_finite(path: Path, records: NDArray[Any]) -> None:
    names = records.dtype.names or ()
    for name in READ_FIELDS:
        if name not in names:
            continue
        col = records[name]
        if col.dtype.kind == "f":
            bad = ~np.isfinite(col.reshape(len(col), -1)).all(axis=1)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise ParticleFileError(
                    f"{path}: field {name} of row {row + 1} (uid {records['uid'][row]}) is not "
                    "finite; remove that particle"
                )


def read_cryosparc_particles(
    path: str | os.PathLike[str],
    *,
    passthrough: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
) -> ParticleTable:
    """Read a cryoSPARC particle ``.cs`` file (plus its passthrough) into a `ParticleTable`.

    Raises
    ------
    ParticleFileError
        Missing or unreadable file, no particles, no ``blob/path``/``blob/idx``, a passthrough
        that lacks some uid, non-finite values.
    """
    p = Path(path)
    records = _load(p)
    if passthrough is None:
        extras = find_passthrough(p)
    elif isinstance(passthrough, (str, os.PathLike)):
        extras = [Path(passthrough)]
    else:
        extras = [Path(x) for x in passthrough]
    for pt in extras:
        records = _merge(records, _load(pt), p, pt)
    n = len(records)
    if n == 0:
        raise ParticleFileError(f"{p}: the file holds no particles (0 rows)")
    for required in ("uid", "blob/path", "blob/idx"):
        if _field(records, required) is None:
            raise ParticleFileError(
                f"{p}: field {required} is missing; export the particles with their blob slot "
                "(or pass the passthrough file that has it)"
            )
    _check_finite(p, records)

    def f(name: str, default: float) -> NDArray[np.float64]:
        col = _field(records, name)
        return np.full(n, default) if col is None else np.asarray(col, dtype=np.float64)

    blob_psize = f("blob/psize_A", np.nan)
    if np.isnan(blob_psize).any():
        raise ParticleFileError(f"{p}: blob/psize_A is missing; cannot know the pixel size")
    rotations = None
    shifts = np.zeros((n, 2))
    pose = _field(records, "alignments3D/pose")
    if pose is not None:
        rotations = rotvec_to_matrix(np.asarray(pose, dtype=np.float64))
        align_psize = f("alignments3D/psize_A", 0.0)
        align_psize = np.where(align_psize > 0, align_psize, blob_psize)
        if not np.allclose(align_psize, blob_psize, rtol=1e-4):
            warnings.warn(
                f"{p}: alignments3D/psize_A ({align_psize[0]:.4f} Å) differs from blob/psize_A "
                f"({blob_psize[0]:.4f} Å); shifts are converted with alignments3D/psize_A",
                UserWarning,
                stacklevel=2,
            )
        shift = _field(records, "alignments3D/shift")
        if shift is not None:
            shifts = np.asarray(shift, dtype=np.float64) * align_psize[:, None]
    shape = _field(records, "blob/shape")
    box = np.zeros(n, dtype=np.int64) if shape is None else np.asarray(shape)[:, -1]
    split = _field(records, "alignments3D/split")
    cls = _field(records, "alignments3D/class")
    extra = {
        name.split("/", 1)[1]: np.asarray(records[name])
        for name in records.dtype.names or ()
        if name.startswith("dhn/")
    }
    for key, values in extra.items():
        if values.dtype.kind == "S":
            extra[key] = _text(values)
    here = p.resolve().parent
    return ParticleTable(
        image_paths=_text(records["blob/path"]),
        image_indices=np.asarray(records["blob/idx"], dtype=np.int64),
        rotation_matrices=rotations,
        shifts_angstrom=shifts,
        defocus_u_angstrom=f("ctf/df1_A", 0.0),
        defocus_v_angstrom=f("ctf/df2_A", 0.0),
        defocus_angle_degrees=np.rad2deg(f("ctf/df_angle_rad", 0.0)),
        voltage_kv=f("ctf/accel_kv", 300.0),
        spherical_aberration_mm=f("ctf/cs_mm", 0.0),
        amplitude_contrast=f("ctf/amp_contrast", 0.0),
        phase_shift_degrees=np.rad2deg(f("ctf/phase_shift_rad", 0.0)),
        bfactor_angstrom2=f("ctf/bfactor", 0.0),
        pixel_size_angstrom=blob_psize,
        box_size_px=box,
        optics_group=f("ctf/exp_group_id", 0.0).astype(np.int64) + 1,
        half_set=None if split is None else np.asarray(split, dtype=np.int64) + 1,
        class_number=None if cls is None else np.asarray(cls, dtype=np.int64) + 1,
        uids=np.asarray(records["uid"], dtype=np.uint64),
        extra=extra,
        source=SourceRows(format="cryosparc", rows=records, path=str(p)),
        search_dirs=(str(here), str(here.parent), str(here.parent.parent), str(Path.cwd())),
    )


def stable_uids(table: ParticleTable) -> NDArray[np.uint64]:
    """uids for particles that have none: a hash of (normalised stack name, index), reproducible."""
    keys = table.stack_keys
    out = np.empty(len(keys), dtype=np.uint64)
    for i, key in enumerate(keys.tolist()):
        out[i] = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return out


def _records_from_fields(table: ParticleTable) -> Dataset:
    n = len(table)
    uids = table.uids
    if uids is None and "dhnCsUid" in table.extra:
        uids = np.asarray(pd.to_numeric(pd.Series(table.extra["dhnCsUid"])), dtype=np.uint64)
    if uids is None:
        uids = stable_uids(table)
    ds = Dataset({"uid": uids})
    ds.add_fields(
        [
            ("blob/path", "O"),
            ("blob/idx", "<u4"),
            ("blob/shape", "<u4", (2,)),
            ("blob/psize_A", "<f4"),
            ("blob/sign", "<f4"),
            ("ctf/type", "O"),
            ("ctf/exp_group_id", "<u4"),
            ("ctf/accel_kv", "<f4"),
            ("ctf/cs_mm", "<f4"),
            ("ctf/amp_contrast", "<f4"),
            ("ctf/df1_A", "<f4"),
            ("ctf/df2_A", "<f4"),
            ("ctf/df_angle_rad", "<f4"),
            ("ctf/phase_shift_rad", "<f4"),
            ("ctf/bfactor", "<f4"),
        ]
    )
    ds["blob/path"] = np.asarray(table.image_paths, dtype=object)
    ds["blob/idx"] = table.image_indices
    ds["blob/shape"] = np.stack([table.box_size_px, table.box_size_px], axis=1)
    ds["blob/psize_A"] = table.pixel_size_angstrom
    ds["blob/sign"] = np.full(n, -1.0)
    ds["ctf/type"] = np.full(n, "imported", dtype=object)
    ds["ctf/exp_group_id"] = table.optics_group - 1
    ds["ctf/accel_kv"] = table.voltage_kv
    ds["ctf/cs_mm"] = table.spherical_aberration_mm
    ds["ctf/amp_contrast"] = table.amplitude_contrast
    ds["ctf/df1_A"] = table.defocus_u_angstrom
    ds["ctf/df2_A"] = table.defocus_v_angstrom
    ds["ctf/df_angle_rad"] = np.deg2rad(table.defocus_angle_degrees)
    ds["ctf/phase_shift_rad"] = np.deg2rad(table.phase_shift_degrees)
    ds["ctf/bfactor"] = table.bfactor_angstrom2
    src = table.source
    if src is not None and src.format in ("relion30", "relion31"):
        _carry_star_columns(ds, src)
    return ds


def _carry_star_columns(ds: Dataset, src: SourceRows) -> None:
    """Every STAR column with no cryoSPARC field becomes a ``rln/<label>`` field."""
    rows: pd.DataFrame = src.rows
    columns = {c: rows[c] for c in rows.columns if c not in STAR_MAPPED}
    if src.optics is not None and "rlnOpticsGroup" in rows.columns:
        by_group = src.optics.set_index("rlnOpticsGroup")
        for c in by_group.columns:
            if c not in STAR_MAPPED and c not in columns:
                columns[c] = by_group[c].reindex(rows["rlnOpticsGroup"].to_numpy())
    for label, series in columns.items():
        if label.startswith("dhn"):
            continue
        values = series.to_numpy()
        if values.dtype.kind in "iuf":
            ds.add_fields([(f"rln/{label}", values.dtype.str)])
            ds[f"rln/{label}"] = values
        else:
            ds.add_fields([(f"rln/{label}", "O")])
            ds[f"rln/{label}"] = np.asarray([str(v) for v in values], dtype=object)


def _set(
    ds: Dataset, name: str, dtype: str, values: NDArray[Any], shape: tuple[int, ...] = ()
) -> None:
    if name not in ds.fields():
        ds.add_fields([(name, dtype, shape)] if shape else [(name, dtype)])
    ds[name] = values


def write_cryosparc_particles(table: ParticleTable, path: str | os.PathLike[str]) -> None:
    """Write ``table`` as a cryoSPARC ``.cs`` (numpy format), keeping every field it did not change.

    Poses go to ``alignments3D/pose`` / ``shift`` (pixels of ``blob/psize_A``) / ``psize_A``;
    ``table.extra`` values to ``dhn/<label>`` fields. Written atomically, never over the input.
    """
    out = Path(path)
    src = table.source
    if src is not None and src.path:
        check_not_input(out, src.path)
    if src is not None and src.format == "cryosparc":
        ds = Dataset(src.rows)
    else:
        ds = _records_from_fields(table)
    n = len(table)
    if table.rotation_matrices is not None:
        psize = table.pixel_size_angstrom
        _set(ds, "alignments3D/pose", "<f4", matrix_to_rotvec(table.rotation_matrices), (3,))
        _set(ds, "alignments3D/shift", "<f4", table.shifts_angstrom / psize[:, None], (2,))
        _set(ds, "alignments3D/psize_A", "<f4", psize)
        if src is None or src.format != "cryosparc":
            if table.half_set is not None:
                _set(ds, "alignments3D/split", "<u4", np.clip(table.half_set - 1, 0, None))
            if table.class_number is not None:
                _set(ds, "alignments3D/class", "<u4", np.clip(table.class_number - 1, 0, None))
    for key, values in table.extra.items():
        if key == "dhnCsUid":
            continue
        arr = np.asarray(values)
        if arr.dtype.kind in "iub":
            _set(ds, f"dhn/{key}", "<i8", arr.astype(np.int64))
        elif arr.dtype.kind == "f":
            _set(ds, f"dhn/{key}", "<f8", arr)
        else:
            _set(ds, f"dhn/{key}", "O", np.asarray([str(v) for v in arr], dtype=object))
    if len(ds) != n:
        raise ValueError(f"internal error: {len(ds)} rows for {n} particles")
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        ds.save(fh)
