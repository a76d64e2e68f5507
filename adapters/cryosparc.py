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

In memory (cryosparc-tools scripts, no file): `particles_from_dataset` builds the table from a
``Dataset`` (e.g. ``job.load_output("particles")``) through the same code as the file reader;
`dataset_from_particles` gives the ``Dataset`` that the file writer saves.
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
from numpy.lib.recfunctions import repack_fields
from numpy.typing import NDArray

from deephemnma_bridge.conventions import matrix_to_rotvec, rotvec_to_matrix
from deephemnma_bridge.errors import ParticleFileError
from deephemnma_bridge.fileutils import atomic_path, check_not_input
from deephemnma_bridge.particles import ParticleTable, SourceRows

__all__ = [
    "dataset_from_particles",
    "find_passthrough",
    "load_records",
    "particles_from_dataset",
    "read_cryosparc_particles",
    "save_records",
    "stable_uids",
    "star_unmapped_fields",
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


# .cs fields the STAR writer turns into STAR columns (the others travel in <stem>_dhn.cs)
STAR_FIELDS = frozenset(
    {
        "uid",
        "blob/path",
        "blob/idx",
        "blob/shape",
        "blob/psize_A",
        "ctf/exp_group_id",
        "ctf/accel_kv",
        "ctf/cs_mm",
        "ctf/amp_contrast",
        "ctf/df1_A",
        "ctf/df2_A",
        "ctf/df_angle_rad",
        "ctf/phase_shift_rad",
        "ctf/bfactor",
        "alignments3D/pose",
        "alignments3D/shift",
        "alignments3D/psize_A",
        "alignments3D/split",
        "alignments3D/class",
        "location/micrograph_path",
    }
)
# field of a <stem>_dhn.cs side file: the rlnImageName the STAR file got, to see what changed
STAR_NAME_FIELD = "star/rlnImageName"


def star_unmapped_fields(records: NDArray[Any]) -> list[str]:
    """Fields of ``records`` that no STAR column holds (kept in a side file by the STAR writer)."""
    return [
        f
        for f in records.dtype.names or ()
        if f not in STAR_FIELDS and not f.startswith(("dhn/", "rln/", "rlnoptics/", "star/"))
    ]


def load_records(path: str | os.PathLike[str]) -> NDArray[Any]:
    """All rows of a ``.cs`` file (numpy or CSDAT format) as a structured array."""
    return _load(Path(path))


def save_records(
    records: NDArray[Any], path: str | os.PathLike[str], *, star_names: NDArray[Any]
) -> None:
    """Write ``records`` plus the STAR image names they got (``star/rlnImageName``), atomically."""
    ds = Dataset(records)
    _set(ds, STAR_NAME_FIELD, "O", np.asarray([str(v) for v in star_names], dtype=object))
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        ds.save(fh)


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


def _check_finite(source: str, records: NDArray[Any]) -> None:
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
                    f"{source}: field {name} of row {row + 1} (uid {records['uid'][row]}) is not "
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
    here = p.resolve().parent
    return _table_from_records(
        records,
        source=str(p),
        what="file",
        path=str(p),
        search_dirs=(str(here), str(here.parent), str(here.parent.parent), str(Path.cwd())),
    )


def particles_from_dataset(
    dataset: Dataset,
    *,
    source_name: str = "<dataset>",
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
) -> ParticleTable:
    """A `ParticleTable` from a cryosparc-tools ``Dataset`` in memory, without any file.

    The same table as `read_cryosparc_particles` gives for a ``.cs`` file holding the same
    rows (every field kept in ``table.source.rows`` for a lossless `dataset_from_particles`),
    except that ``table.source.path`` is empty and relative ``blob/path`` values are resolved
    against ``search_dirs``.

    Parameters
    ----------
    dataset : cryosparc.dataset.Dataset
        Particle rows, e.g. ``job.load_output("particles")`` (which already merges the
        passthrough fields) or ``Dataset.load(...)``. Not modified; the table keeps a copy.
    source_name : str
        What the rows are, for error messages (e.g. ``"P3 J42 particles"``).
    search_dirs : sequence of path-like, optional
        Folders to resolve relative ``blob/path`` values against, most likely first; for a
        job's output, the project directory (``project.dir``). Default: the working directory.

    Returns
    -------
    ParticleTable

    Raises
    ------
    ParticleFileError
        No rows, no ``uid`` / ``blob/path`` / ``blob/idx`` / ``blob/psize_A`` field, a bad
        image number, non-finite values; the message starts with ``source_name`` and names
        the field.

    Example
    -------
    In a cryosparc-tools script::

        project = cs.find_project("P3")
        particles = project.find_job("J42").load_output("particles")
        table = particles_from_dataset(
            particles, source_name="P3 J42 particles", search_dirs=[str(project.dir)]
        )
        print(len(table), table.rotation_matrices is not None)
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"{source_name}: expected a cryosparc.dataset.Dataset, got {type(dataset).__name__}"
        )
    records = np.asarray(dataset.to_records(fixed=True))
    dirs = (Path.cwd(),) if search_dirs is None else tuple(search_dirs)
    return _table_from_records(
        records,
        source=source_name,
        what="dataset",
        path="",
        search_dirs=tuple(str(d) for d in dirs),
    )


def _table_from_records(
    records: NDArray[Any],
    *,
    source: str,
    what: str,
    path: str,
    search_dirs: tuple[str, ...],
) -> ParticleTable:
    """The table of .cs rows ``records`` (all fields, passthrough merged); errors name ``source``.

    The one code path of `read_cryosparc_particles` and `particles_from_dataset`.
    """
    n = len(records)
    if n == 0:
        raise ParticleFileError(f"{source}: the {what} holds no particles (0 rows)")
    for required in ("uid", "blob/path", "blob/idx"):
        if _field(records, required) is None:
            raise ParticleFileError(
                f"{source}: field {required} is missing; export the particles with their blob "
                "slot (or pass the passthrough file that has it)"
            )
    _check_finite(source, records)
    maker = "file that wrote it" if what == "file" else "code that made the dataset"
    idx = np.asarray(records["blob/idx"])
    if idx.dtype.kind not in "iu":
        bad = ~np.isfinite(idx.astype(np.float64)) | (idx != np.round(idx)) | (idx < 0)
        if idx.dtype.kind not in "f" or bad.any():
            row = int(np.flatnonzero(bad)[0]) if idx.dtype.kind == "f" else 0
            raise ParticleFileError(
                f"{source}: field blob/idx of row {row + 1} (uid {records['uid'][row]}) is "
                f"{idx[row]!r}, not an image number (0, 1, 2, ...); fix the {maker}"
            )
    elif idx.dtype.kind == "i" and (idx < 0).any():
        row = int(np.flatnonzero(idx < 0)[0])
        raise ParticleFileError(
            f"{source}: field blob/idx of row {row + 1} (uid {records['uid'][row]}) is "
            f"{idx[row]}, negative; fix the {maker}"
        )

    def f(name: str, default: float) -> NDArray[np.float64]:
        col = _field(records, name)
        return np.full(n, default) if col is None else np.asarray(col, dtype=np.float64)

    blob_psize = f("blob/psize_A", np.nan)
    if np.isnan(blob_psize).any():
        raise ParticleFileError(f"{source}: blob/psize_A is missing; cannot know the pixel size")
    rotations = None
    shifts = np.zeros((n, 2))
    pose = _field(records, "alignments3D/pose")
    if pose is not None:
        rotations = rotvec_to_matrix(np.asarray(pose, dtype=np.float64))
        align_psize = f("alignments3D/psize_A", 0.0)
        align_psize = np.where(align_psize > 0, align_psize, blob_psize)
        if not np.allclose(align_psize, blob_psize, rtol=1e-4):
            warnings.warn(
                f"{source}: alignments3D/psize_A ({align_psize[0]:.4f} Å) differs from "
                f"blob/psize_A ({blob_psize[0]:.4f} Å); shifts are converted with "
                "alignments3D/psize_A",
                UserWarning,
                stacklevel=3,
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
        source=SourceRows(format="cryosparc", rows=records, path=path),
        search_dirs=search_dirs,
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
    return ds


# STAR columns the STAR writer makes from .cs fields: not carried again when the .cs rows are
# known (side file <stem>_dhn.cs), since those rows give them back exactly
FROM_CS = STAR_MAPPED | {
    "rlnMicrographName",
    "rlnCoordinateX",
    "rlnCoordinateY",
    "rlnOpticsGroupName",
    "rlnImageDimensionality",
}


def _carry_star_columns(ds: Dataset, src: SourceRows) -> list[str]:
    """Every STAR column becomes a ``rln/<label>`` field, every optics column ``rlnoptics/<label>``.

    The mapped ones too (``rln/rlnAngleRot``...): the STAR writer puts back the value as read
    where the .cs field still agrees with it (same Euler triplet, same digits). With the .cs
    rows of a side file, only columns that did not come from the .cs are carried. Returns the
    labels carried that no .cs field holds.
    """
    rows: pd.DataFrame = src.rows
    skip = FROM_CS if src.cs_records is not None else frozenset()
    columns = {f"rln/{c}": rows[c] for c in rows.columns if not c.startswith("dhn")}
    if src.optics is not None and "rlnOpticsGroup" in rows.columns:
        by_group = src.optics.set_index("rlnOpticsGroup")
        groups = rows["rlnOpticsGroup"].to_numpy()
        columns["rlnoptics/rlnOpticsGroup"] = rows["rlnOpticsGroup"]
        for c in by_group.columns:
            columns[f"rlnoptics/{c}"] = by_group[c].reindex(groups)
    existing = set(ds.fields())
    unmapped: list[str] = []
    for name, series in columns.items():
        label = name.split("/", 1)[1]
        if label in skip or name in existing:
            continue
        if label not in STAR_MAPPED and label not in unmapped:
            unmapped.append(label)
        values = series.to_numpy()
        if values.dtype.kind in "iuf":
            ds.add_fields([(name, values.dtype.str)])
            ds[name] = values
        else:
            ds.add_fields([(name, "O")])
            ds[name] = np.asarray([str(v) for v in values], dtype=object)
    return unmapped


def _changed_rows(a: NDArray[Any], b: NDArray[Any], tol: Any) -> NDArray[np.bool_]:
    diff = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return np.asarray(diff.reshape(len(diff), -1).max(axis=1) > tol, dtype=bool)


def _put(ds: Dataset, name: str, dtype: str, values: NDArray[Any], changed: NDArray[Any]) -> None:
    """Set field ``name`` to ``values`` on the ``changed`` rows only (all when it is new)."""
    values = np.asarray(values)
    if name not in ds.fields():
        _set(ds, name, dtype, values, tuple(values.shape[1:]))
    elif changed.any():
        column = np.array(ds[name], copy=True)
        column[changed] = values[changed].astype(column.dtype)
        ds[name] = column


def _from_records(table: ParticleTable, records: NDArray[Any]) -> Dataset:
    """The .cs rows ``records`` with the values of ``table`` that differ from them."""
    names = records.dtype.names or ()
    keep = [f for f in names if not f.startswith("star/")]
    ds = Dataset(repack_fields(records[keep]) if len(keep) < len(names) else records)
    src = table.source
    if src is not None and STAR_NAME_FIELD in names and "rlnImageName" in src.rows.columns:
        written = _text(np.asarray(records[STAR_NAME_FIELD]))
        moved = src.rows["rlnImageName"].astype(str).to_numpy() != written
    else:
        moved = np.ones(len(table), dtype=bool)
    if moved.any():
        _put(ds, "blob/path", "O", np.asarray(table.image_paths, dtype=object), moved)
        _put(ds, "blob/idx", "<u4", table.image_indices, moved)
    before = _table_values(records)
    n = len(table)
    for field, dtype, value in (
        ("ctf/df1_A", "<f4", table.defocus_u_angstrom),
        ("ctf/df2_A", "<f4", table.defocus_v_angstrom),
        ("ctf/df_angle_rad", "<f4", np.deg2rad(table.defocus_angle_degrees)),
        ("ctf/phase_shift_rad", "<f4", np.deg2rad(table.phase_shift_degrees)),
        ("ctf/bfactor", "<f4", table.bfactor_angstrom2),
    ):
        old = before.get(field)
        changed = (
            np.ones(n, dtype=bool)
            if old is None
            else _changed_rows(old, value, 1e-6 * (1 + np.abs(value)))
        )
        if old is not None or np.any(value != 0):
            _put(ds, field, dtype, value, changed)
    return ds


def _table_values(records: NDArray[Any]) -> dict[str, NDArray[np.float64]]:
    """Float fields of ``records`` as the reader converts them (for change detection)."""
    names = records.dtype.names or ()
    return {
        f: np.asarray(records[f], dtype=np.float64)
        for f in names
        if f.startswith("ctf/") and records.dtype[f].kind == "f"
    }


def _write_poses(ds: Dataset, table: ParticleTable, records: NDArray[Any] | None) -> None:
    """3D poses where they changed (all when the rows had none), as cryoSPARC stores them."""
    if table.rotation_matrices is None:
        return
    n = len(table)
    psize = table.pixel_size_angstrom
    changed = np.ones(n, dtype=bool)
    names = () if records is None else records.dtype.names or ()
    if "alignments3D/pose" in names and records is not None:
        old = rotvec_to_matrix(np.asarray(records["alignments3D/pose"], dtype=np.float64))
        changed = _changed_rows(old, table.rotation_matrices, 1e-5)
        if "alignments3D/shift" in names:
            align = (
                np.asarray(records["alignments3D/psize_A"], dtype=np.float64)
                if ("alignments3D/psize_A" in names)
                else psize
            )
            align = np.where(align > 0, align, psize)
            shift = np.asarray(records["alignments3D/shift"], dtype=np.float64) * align[:, None]
            changed |= _changed_rows(shift, table.shifts_angstrom, 1e-4)
        else:
            changed[:] = True
    _put(ds, "alignments3D/pose", "<f4", matrix_to_rotvec(table.rotation_matrices), changed)
    _put(ds, "alignments3D/shift", "<f4", table.shifts_angstrom / psize[:, None], changed)
    _put(ds, "alignments3D/psize_A", "<f4", psize, changed)


def _set(
    ds: Dataset, name: str, dtype: str, values: NDArray[Any], shape: tuple[int, ...] = ()
) -> None:
    if name not in ds.fields():
        ds.add_fields([(name, dtype, shape)] if shape else [(name, dtype)])
    ds[name] = values


def dataset_from_particles(table: ParticleTable) -> Dataset:
    """The cryosparc-tools ``Dataset`` of ``table``, in memory, without any file.

    The rows `write_cryosparc_particles` saves: every field of the rows read (uids included)
    with only the values the table changed replaced; 3D poses as cryoSPARC stores them
    (``alignments3D/pose`` axis-angle of ``A.T``, ``shift`` in pixels of ``psize_A``);
    ``table.extra`` values as ``dhn/<label>`` fields; a table read from a STAR file gets
    stable uids and its STAR columns as ``rln/<label>`` fields. `particles_from_dataset` of
    the result gives the table back.

    Parameters
    ----------
    table : ParticleTable
        Particles from any reader (``.cs``, STAR, `particles_from_dataset`) or stage.

    Returns
    -------
    cryosparc.dataset.Dataset
        A new dataset (``table`` is not modified and shares no memory with it).

    Example
    -------
    Results back to cryoSPARC from a cryosparc-tools script (``job`` an External job with a
    ``particles`` output whose slots include ``alignments3D``)::

        results = dataset_from_particles(table)
        out = job.alloc_output("particles", results["uid"])
        for field in ("alignments3D/pose", "alignments3D/shift", "alignments3D/psize_A"):
            out[field] = results[field]
        job.save_output("particles", out)
    """
    return _dataset(table, "the dataset")[0]


def _dataset(table: ParticleTable, where: str) -> tuple[Dataset, list[str]]:
    """`dataset_from_particles` plus notes on what had no .cs field of its own (``where`` it
    went, for the notes)."""
    src = table.source
    notes: list[str] = []
    records: NDArray[Any] | None = None
    if src is not None and src.format == "cryosparc":
        records = src.rows
        ds = Dataset(records)
    elif src is not None and src.cs_records is not None:
        records = src.cs_records
        ds = _from_records(table, src.cs_records)
    else:
        ds = _records_from_fields(table)
    if src is not None and src.format in ("relion30", "relion31"):
        unmapped = _carry_star_columns(ds, src)
        if unmapped:
            shown = ", ".join(unmapped)
            notes.append(
                f"{len(unmapped)} STAR column(s) without a .cs field ({shown}) kept as "
                f"rln/<label> fields in {where}"
            )
    n = len(table)
    _write_poses(ds, table, records)
    if table.rotation_matrices is not None and records is None:
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
    return ds, notes


def write_cryosparc_particles(table: ParticleTable, path: str | os.PathLike[str]) -> list[str]:
    """Write ``table`` as a cryoSPARC ``.cs`` (numpy format), keeping every field it did not change.

    Poses go to ``alignments3D/pose`` / ``shift`` (pixels of ``blob/psize_A``) / ``psize_A`` on
    the rows whose pose changed (an unchanged pose keeps its exact vector); ``table.extra``
    values to ``dhn/<label>`` fields. Written atomically, never over the input. Returns notes on
    what could not get a .cs field of its own and where it went. The rows saved are
    `dataset_from_particles` of ``table``.
    """
    out = Path(path)
    src = table.source
    if src is not None and src.path:
        check_not_input(out, src.path)
    ds, notes = _dataset(table, str(out))
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        ds.save(fh)
    return notes
