"""RELION particle STAR files (3.0, 3.1, 4.0, 5.0) <-> `ParticleTable`, lossless.

Reading (``../shared/docs/INTEROP.md`` 1.3-1.7): a file with an ``optics`` block is 3.1+
(particles in block ``particles``, else the largest other loop; optics joined through
``rlnOpticsGroup``; origins in Å); otherwise it is 3.0 (one loop; optics values per particle;
pixel size ``1e4 * rlnDetectorPixelSize / rlnMagnification`` with RELION 3.0's default
magnification of 10,000 when only the detector pixel size is given, or a stray
``rlnImagePixelSize``; origins in pixels). 3.0 particles are grouped into optics groups by
identical optics values, as RELION 3.1 does when it upgrades a 3.0 file.
``rlnImageName`` is ``N@stack`` with any zero padding (a name without ``@`` is a single-image
file, index 0). CTF values missing everywhere take RELION's defaults. Our ``dhn*`` columns go to
``table.extra``; a RELION 3.0 file's ``<stem>_dhn.csv`` side file is read back too.

Writing starts from the rows that were read (every column kept, in order; optics and other blocks
verbatim) and replaces only the poses (``rlnAngleRot/Tilt/Psi``), the origins and our ``dhn*``
columns. A table that did not come from a STAR file is written from its fields. 3.1+ output
(readable by RELION 3.1, 4.0 and 5.0) has ``# version 30001`` tags and origins in Å; 3.0 output
has one loop with 3.0 labels only, origins in pixels, optics values per particle, and our values
plus any label RELION 3.0 does not know in the side file ``<stem>_dhn.csv`` (read back with the
file). Values nobody changed keep their value as read (Euler triplets, pixel origins, image
names); labels our writer had to make up are listed in a ``# deephemnma generated:`` comment and
left out again on the way back. A STAR written from a ``.cs`` keeps the ``.cs`` rows in
``<stem>_dhn.cs``; a ``.cs`` written from a STAR carries every STAR column (``rln/``,
``rlnoptics/`` fields), so either round trip gives back the original exactly. A table without
``data_optics`` but with 3.1 labels (``rlnOriginXAngst``, ``rlnOpticsGroup``) is read as 3.1.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from deephemnma_bridge.conventions import euler_to_matrix, matrix_to_euler
from deephemnma_bridge.errors import InputError, ParticleFileError
from deephemnma_bridge.fileutils import atomic_path, check_not_input
from deephemnma_bridge.particles import ParticleTable, SourceRows

from .images import read_stack_header, resolve_stack
from .star import GENERATED_TAG, read_generated_labels, read_star_blocks, write_star_blocks

__all__ = ["read_relion_particles", "write_relion_particles"]

RelionOutput = Literal["3.0", "3.1"]

ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGINS_A = ("rlnOriginXAngst", "rlnOriginYAngst")
ORIGINS_PX = ("rlnOriginX", "rlnOriginY")
# RELION 3.0 optics values that 3.1 moves to the optics table (star_converter.cpp)
OPTICS_30 = (
    "rlnAmplitudeContrast",
    "rlnBeamTiltX",
    "rlnBeamTiltY",
    "rlnSphericalAberration",
    "rlnVoltage",
    "rlnDetectorPixelSize",
    "rlnMagnification",
)
# labels introduced in RELION 3.1 (not in ver3.0 metadata_label.h): never written to 3.0 files
LABELS_NEW_IN_31 = frozenset(
    {
        "rlnOpticsGroup",
        "rlnOpticsGroupName",
        "rlnImagePixelSize",
        "rlnMicrographPixelSize",
        "rlnMicrographOriginalPixelSize",
        "rlnOriginXAngst",
        "rlnOriginYAngst",
        "rlnOriginZAngst",
        "rlnOriginXPriorAngst",
        "rlnOriginYPriorAngst",
        "rlnOriginZPriorAngst",
        "rlnOddZernike",
        "rlnEvenZernike",
        "rlnMagMat00",
        "rlnMagMat01",
        "rlnMagMat10",
        "rlnMagMat11",
        "rlnMtfFileName",
    }
)
# RELION's CTF defaults when a value is absent everywhere (ctf.cpp readByGroup / readValue)
CTF_DEFAULTS = {
    "rlnVoltage": 200.0,
    "rlnDefocusU": 0.0,
    "rlnDefocusAngle": 0.0,
    "rlnSphericalAberration": 0.0,
    "rlnCtfBfactor": 0.0,
    "rlnAmplitudeContrast": 0.0,
    "rlnPhaseShift": 0.0,
}
SIDE_SUFFIX = "_dhn.csv"
CS_SIDE_SUFFIX = "_dhn.cs"
# labels that belong in data_optics (used when a .cs carries STAR columns as rln/ fields)
OPTICS_LABELS = frozenset(
    {
        "rlnOpticsGroupName",
        "rlnMtfFileName",
        "rlnBeamTiltX",
        "rlnBeamTiltY",
        "rlnOddZernike",
        "rlnEvenZernike",
        "rlnMagMat00",
        "rlnMagMat01",
        "rlnMagMat10",
        "rlnMagMat11",
        "rlnMicrographOriginalPixelSize",
        "rlnImageDimensionality",
        "rlnCtfDataAreCtfPremultiplied",
        "rlnCtfDataArePhaseFlipped",
    }
)


# labels that hold numbers: a value that is not one is an error naming the row and column
NUMERIC_LABELS = frozenset(
    {
        *ANGLES,
        *ORIGINS_A,
        *ORIGINS_PX,
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnDefocusAngle",
        "rlnPhaseShift",
        "rlnCtfBfactor",
        "rlnCtfScalefactor",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
        "rlnImagePixelSize",
        "rlnImageSize",
        "rlnImageDimensionality",
        "rlnOpticsGroup",
        "rlnRandomSubset",
        "rlnClassNumber",
        "rlnMagnification",
        "rlnDetectorPixelSize",
        "rlnCoordinateX",
        "rlnCoordinateY",
        "rlnCoordinateZ",
        "rlnBeamTiltX",
        "rlnBeamTiltY",
        "rlnMicrographOriginalPixelSize",
        "rlnGroupNumber",
    }
)
# labels that go to data_optics when a 3.0 table (optics values per particle) becomes 3.1
OPTICS_MOVE = (
    (frozenset(OPTICS_30) - {"rlnMagnification", "rlnDetectorPixelSize"})
    | OPTICS_LABELS
    | {"rlnImagePixelSize", "rlnImageSize", "rlnMicrographPixelSize"}
)
# labels that say a table without data_optics is RELION 3.1+ (INTEROP 1.4)
LABELS_31_PARTICLES = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOpticsGroup")


def _side_file(path: Path) -> Path:
    return path.with_name(path.stem + SIDE_SUFFIX)


def _pick_particle_block(path: Path, blocks: dict[str, Any]) -> tuple[str, pd.DataFrame]:
    loops = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame) and k != "optics"}
    if "particles" in loops:
        return "particles", loops["particles"]
    with_images = {k: v for k, v in loops.items() if "rlnImageName" in v.columns}
    candidates = with_images or loops
    if not candidates:
        raise ParticleFileError(f"{path}: no particle table (a loop with rlnImageName) found")
    name = max(candidates, key=lambda k: len(candidates[k]))
    return name, candidates[name]


def _ours(columns: pd.Index) -> NDArray[np.bool_]:
    """Which columns are ours (``dhn`` labels): they may hold NaN (`_check_values`)."""
    return np.array([str(c).startswith("dhn") for c in columns], dtype=bool)


def _check_values(path: Path, df: pd.DataFrame, table: str) -> None:
    """NaN (also from truncated rows), inf or text in a number column -> error naming row/column.

    Our own ``dhn`` columns may hold ``nan`` where a value does not exist for a particle (the
    cost of one that failed, the network confidence of a HEMNMA particle); a truncated row is
    still caught, by its token count (`star.check_star_text`)."""
    for col in df.columns:
        if col in NUMERIC_LABELS and not pd.api.types.is_numeric_dtype(df[col]):
            values = df[col].astype(str)
            bad = pd.to_numeric(values, errors="coerce").isna() & ~values.str.lower().eq("nan")
            if bool(bad.any()):
                row = int(np.flatnonzero(bad.to_numpy())[0])
                raise ParticleFileError(
                    f"{path}: table {table!r} row {row + 1} column {col} is {values.iloc[row]!r}, "
                    "not a number; fix or remove that row"
                )
            df[col] = pd.to_numeric(values)
    missing = df.isna().to_numpy() & ~_ours(df.columns)[None, :]
    if missing.any():
        row, col = np.argwhere(missing)[0]
        raise ParticleFileError(
            f"{path}: table {table!r} row {row + 1} has no value for column "
            f"{df.columns[col]} (truncated row or 'nan'); fix or remove that row"
        )
    numeric = df.select_dtypes(include="number")
    if numeric.shape[1]:
        numbers = numeric.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(numbers) & ~(np.isnan(numbers) & _ours(numeric.columns)[None, :])
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise ParticleFileError(
                f"{path}: table {table!r} row {row + 1} column {numeric.columns[col]} is "
                f"{numeric.iat[row, col]!r}; every value must be finite"
            )


def _split_image_names(path: Path, names: pd.Series) -> tuple[NDArray[Any], NDArray[np.int64]]:
    text = names.astype(str)
    has_at = text.str.contains("@", regex=False)
    parts = text.str.split("@", n=1, expand=True)
    if parts.shape[1] == 1:  # no row has '@': single-image files
        return text.to_numpy(dtype=object), np.zeros(len(text), dtype=np.int64)
    number = pd.to_numeric(parts[0].where(has_at), errors="coerce")
    bad = has_at & (number.isna() | (number < 1))
    if bool(bad.any()):
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ParticleFileError(
            f"{path}: row {row + 1} rlnImageName {text.iloc[row]!r} is not of the form N@stack "
            "with N >= 1"
        )
    stacks = parts[1].where(has_at, text).str.strip()
    index0: NDArray[np.int64] = np.asarray(number.fillna(1), dtype=np.int64) - 1
    return stacks.to_numpy(dtype=object), index0


class _Columns:
    """Value lookup: particle column, else optics column mapped by group, else default."""

    def __init__(
        self, particles: pd.DataFrame, optics: pd.DataFrame | None, groups: NDArray[np.int64]
    ) -> None:
        self.particles = particles
        self.optics = optics
        self.groups = groups

    def has(self, label: str) -> bool:
        return label in self.particles.columns or (
            self.optics is not None and label in self.optics.columns
        )

    def get(self, label: str, default: float = 0.0) -> NDArray[np.float64]:
        if label in self.particles.columns:
            return self.particles[label].to_numpy(dtype=np.float64)
        if self.optics is not None and label in self.optics.columns:
            by_group = self.optics.set_index("rlnOpticsGroup")[label]
            return by_group.reindex(self.groups).to_numpy(dtype=np.float64)
        return np.full(len(self.particles), float(default))


def _optics_groups_30(particles: pd.DataFrame) -> NDArray[np.int64]:
    cols = [c for c in OPTICS_30 if c in particles.columns]
    if not cols:
        return np.ones(len(particles), dtype=np.int64)
    codes = particles.groupby(cols, sort=False).ngroup().to_numpy()
    return (codes + 1).astype(np.int64)


def read_relion_particles(
    path: str | os.PathLike[str], *, pixel_size_angstrom: float | None = None
) -> ParticleTable:
    """Read a RELION particle STAR file (3.0 to 5.0).

    Parameters
    ----------
    path : path-like
        The STAR file.
    pixel_size_angstrom : float, optional
        Pixel size to use when the file does not give one (RELION 3.0 files without
        ``rlnDetectorPixelSize``); overrides the file's value when given.

    Raises
    ------
    ParticleFileError
        Missing/unreadable file, no particle table, missing ``rlnImageName``, undefined optics
        group, non-finite values, mixed box sizes, no pixel size.
    """
    p = Path(path)
    blocks = read_star_blocks(p)
    name, particles = _pick_particle_block(p, blocks)
    optics = blocks.get("optics")
    if not isinstance(optics, pd.DataFrame):
        optics = None
    # 3.1+ by its optics table, or by its labels when the optics table is missing (origins in Å)
    labels_31 = [c for c in LABELS_31_PARTICLES if c in particles.columns]
    fmt: Literal["relion30", "relion31"] = (
        "relion31" if optics is not None or labels_31 else "relion30"
    )
    if "rlnImageName" not in particles.columns:
        raise ParticleFileError(
            f"{p}: table {name!r} has no rlnImageName column; a particle file names each "
            "particle's image as N@stack"
        )
    if len(particles) == 0:
        raise ParticleFileError(f"{p}: table {name!r} has no particles")
    particles = particles.copy()
    _check_values(p, particles, name)
    side_labels: tuple[str, ...] = ()
    side_extra: dict[str, NDArray[Any]] = {}
    side = _side_file(p)
    if fmt == "relion30" and side.is_file():
        values = _read_side_file(side, particles["rlnImageName"])
        side_labels = tuple(c for c in values.columns if c not in particles.columns)
        for c in values.columns:
            if c.startswith("dhn"):
                side_extra[c] = values[c].to_numpy()
            elif c in side_labels:
                particles[c] = values[c].to_numpy()
        side_labels = tuple(c for c in side_labels if not c.startswith("dhn"))
        _check_values(side, particles, name)
    if optics is not None:
        _check_values(p, optics, "optics")
        if "rlnOpticsGroup" not in particles.columns or "rlnOpticsGroup" not in optics.columns:
            raise ParticleFileError(f"{p}: rlnOpticsGroup is missing from particles or optics")
        groups = particles["rlnOpticsGroup"].to_numpy(dtype=np.int64)
        unknown = ~np.isin(groups, optics["rlnOpticsGroup"].to_numpy(dtype=np.int64))
        if unknown.any():
            row = int(np.flatnonzero(unknown)[0])
            raise ParticleFileError(
                f"{p}: row {row + 1} uses optics group {groups[row]}, which the optics table "
                "does not define; add it to data_optics or fix rlnOpticsGroup"
            )
    elif "rlnOpticsGroup" in particles.columns:  # 3.1 without data_optics, or 3.0 + side file
        groups = particles["rlnOpticsGroup"].to_numpy(dtype=np.int64)
    else:
        groups = _optics_groups_30(particles)
    cols = _Columns(particles, optics, groups)
    n = len(particles)

    # pixel size
    if pixel_size_angstrom is not None:
        if pixel_size_angstrom <= 0:
            raise InputError(f"pixel_size_angstrom must be > 0, got {pixel_size_angstrom}")
        psize = np.full(n, float(pixel_size_angstrom))
    elif cols.has("rlnImagePixelSize"):
        psize = cols.get("rlnImagePixelSize")
    elif fmt == "relion30" and cols.has("rlnDetectorPixelSize"):
        mag = cols.get("rlnMagnification", 10000.0)  # RELION 3.0's default magnification
        psize = 1e4 * cols.get("rlnDetectorPixelSize") / mag
    elif fmt == "relion31" and optics is None:
        raise ParticleFileError(
            f"{p}: a RELION 3.1+ table (it has {', '.join(labels_31)}) without its data_optics "
            "block, so no pixel size; add the optics block or give the pixel size with "
            "pixel_size_angstrom= / --pixel-size"
        )
    else:
        raise ParticleFileError(
            f"{p}: no pixel size (rlnImagePixelSize in data_optics, or rlnDetectorPixelSize and "
            "rlnMagnification for RELION 3.0); give it with pixel_size_angstrom= / --pixel-size"
        )
    if np.any(psize <= 0):
        raise ParticleFileError(f"{p}: pixel size must be > 0, found {psize.min()}")

    paths, index0 = _split_image_names(p, particles["rlnImageName"])

    # poses and origins
    rotations = None
    if all(a in particles.columns for a in ANGLES):
        angles = particles[list(ANGLES)].to_numpy(dtype=np.float64)
        rotations = euler_to_matrix(angles)
    if fmt == "relion31":
        shifts = np.stack([cols.get(a, 0.0) for a in ORIGINS_A], axis=1)
    else:
        shifts = np.stack([cols.get(a, 0.0) for a in ORIGINS_PX], axis=1) * psize[:, None]
        if all(a in particles.columns for a in ORIGINS_A):  # Å from the side file, if still valid
            angst = np.stack([cols.get(a) for a in ORIGINS_A], axis=1)
            # (RELION writes both rounded to 6 decimals: they agree to ~1e-6 px)
            same = (np.abs(angst - shifts) <= 1e-5 * psize[:, None] + 1e-9).all(axis=1)
            shifts = np.where(same[:, None], angst, shifts)

    # box size: rlnImageSize, else 0 (unknown until the stack is opened)
    box = np.asarray(cols.get("rlnImageSize", 0.0))
    star_dir = p.resolve().parent
    search = [star_dir, *list(star_dir.parents)[:3], Path.cwd()]
    if not box.any():
        box = np.full(n, _box_from_stack(str(paths[0]), [str(d) for d in search]), dtype=np.int64)
    if len(np.unique(box)) > 1:
        sizes = ", ".join(str(int(b)) for b in np.unique(box)[:5])
        raise ParticleFileError(
            f"{p}: particles of different box sizes ({sizes} px) in one file; split the file "
            "by optics group (relion_star_handler --split_by_optics) and process each"
        )

    defocus_u = cols.get("rlnDefocusU", CTF_DEFAULTS["rlnDefocusU"])
    defocus_v = cols.get("rlnDefocusV") if cols.has("rlnDefocusV") else defocus_u
    extra: dict[str, NDArray[Any]] = {}
    for col in particles.columns:
        if col.startswith("dhn"):
            extra[col] = particles[col].to_numpy()
    extra.update(side_extra)
    cs_records = None
    if "dhnCsUid" in extra:
        cs_records = _read_cs_side_file(p, pd.Series(extra["dhnCsUid"]))
    other = {k: v for k, v in blocks.items() if k not in (name, "optics")}
    return ParticleTable(
        image_paths=paths,
        image_indices=index0,
        rotation_matrices=rotations,
        shifts_angstrom=shifts,
        defocus_u_angstrom=defocus_u,
        defocus_v_angstrom=defocus_v,
        defocus_angle_degrees=cols.get("rlnDefocusAngle", 0.0),
        voltage_kv=cols.get("rlnVoltage", CTF_DEFAULTS["rlnVoltage"]),
        spherical_aberration_mm=cols.get("rlnSphericalAberration", 0.0),
        amplitude_contrast=cols.get("rlnAmplitudeContrast", 0.0),
        phase_shift_degrees=cols.get("rlnPhaseShift", 0.0),
        bfactor_angstrom2=cols.get("rlnCtfBfactor", 0.0),
        pixel_size_angstrom=psize,
        box_size_px=box.astype(np.int64),
        optics_group=groups,
        half_set=particles["rlnRandomSubset"].to_numpy()
        if "rlnRandomSubset" in particles
        else None,
        class_number=(
            particles["rlnClassNumber"].to_numpy() if "rlnClassNumber" in particles else None
        ),
        extra=extra,
        source=SourceRows(
            format=fmt,
            rows=particles.reset_index(drop=True),
            optics=optics,
            other_blocks=other,
            path=str(p),
            generated=read_generated_labels(p),
            side_labels=side_labels,
            cs_records=cs_records,
        ),
        search_dirs=tuple(str(d) for d in search),
    )


def _box_from_stack(stack: str, search_dirs: list[str]) -> int:
    """Box size from the first stack's header (as RELION 3.1 does for 3.0 files); 0 if absent."""
    try:
        n_img, ny, nx, _ = read_stack_header(resolve_stack(stack, search_dirs))
    except (ParticleFileError, OSError, ValueError):
        return 0
    return nx if n_img and ny == nx else 0


def _row_keys(names: pd.Series) -> pd.Series:
    """``name#k`` (k-th row with that image name): unique even for symmetry-expanded files."""
    names = pd.Series(names.astype(str).to_numpy())
    return names + "#" + names.groupby(names).cumcount().astype(str)


def _read_side_file(side: Path, image_names: pd.Series) -> pd.DataFrame:
    """The side file's columns (all of them), aligned with ``image_names``."""
    try:
        values = pd.read_csv(side, keep_default_na=False)
    except (ValueError, OSError) as err:
        raise ParticleFileError(f"{side}: unreadable side file ({err})") from err
    if "rlnImageName" not in values.columns:
        raise ParticleFileError(f"{side}: side file without an rlnImageName column")
    values.index = pd.Index(_row_keys(values["rlnImageName"]))
    keys = _row_keys(image_names)
    missing = ~keys.isin(values.index)
    if bool(missing.any()):
        row = int(np.flatnonzero(missing.to_numpy())[0])
        raise ParticleFileError(
            f"{side}: no row for particle {image_names.iloc[row]} (row {row + 1}); delete the "
            "stale side file"
        )
    aligned = values.reindex(keys.to_numpy()).reset_index(drop=True)
    return aligned.drop(columns=["rlnImageName"])


def _read_cs_side_file(path: Path, uid_column: pd.Series) -> Any:
    """The ``.cs`` rows saved next to a STAR written from a ``.cs`` (``<stem>_dhn.cs``), aligned."""
    side = path.with_name(path.stem + CS_SIDE_SUFFIX)
    if not side.is_file():
        return None
    from .cryosparc import load_records

    records = load_records(side)
    uids = pd.to_numeric(uid_column.astype(str), errors="coerce")
    if bool(uids.isna().any()):
        row = int(np.flatnonzero(uids.isna().to_numpy())[0])
        raise ParticleFileError(f"{path}: row {row + 1} dhnCsUid is not a cryoSPARC uid")
    wanted = np.asarray(uids.to_numpy(), dtype=np.uint64)
    order = np.argsort(records["uid"])
    pos = np.clip(np.searchsorted(records["uid"], wanted, sorter=order), 0, max(len(order) - 1, 0))
    found = len(order) > 0 and records["uid"][order[pos]] == wanted
    if not np.all(found):
        row = int(np.flatnonzero(~np.asarray(found, dtype=bool))[0]) if len(order) else 0
        raise ParticleFileError(
            f"{side}: no row for uid {wanted[row]} (row {row + 1} of {path}); delete the stale "
            "side file"
        )
    return records[order[pos]]


# ---------------------------------------------------------------------------------- writing
def _image_names(table: ParticleTable) -> NDArray[Any]:
    if len(table) == 0:
        return np.zeros(0, dtype=object)
    numbers = pd.Series(table.image_indices + 1).map("{:06d}".format)
    return (numbers + "@" + pd.Series(table.image_paths, dtype=object).astype(str)).to_numpy()


def _optics_from_fields(table: ParticleTable) -> pd.DataFrame:
    first = pd.Series(np.arange(len(table))).groupby(table.optics_group).first()
    idx = first.to_numpy()
    groups = first.index.to_numpy(dtype=np.int64)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": groups,
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in groups],
            "rlnAmplitudeContrast": table.amplitude_contrast[idx],
            "rlnSphericalAberration": table.spherical_aberration_mm[idx],
            "rlnVoltage": table.voltage_kv[idx],
            "rlnImagePixelSize": table.pixel_size_angstrom[idx],
            "rlnImageSize": table.box_size_px[idx],
            "rlnImageDimensionality": np.full(len(groups), 2, dtype=np.int64),
        }
    )
    for label, values in _carried_star_columns(table).items():
        if label in OPTICS_LABELS:
            optics[label] = values[idx]
    return optics


def _carried_star_columns(table: ParticleTable) -> dict[str, NDArray[Any]]:
    """STAR columns a .cs carries as ``rln/<label>`` fields (our .cs writer before all were)."""
    src = table.source
    if src is None or src.format != "cryosparc":
        return {}
    out: dict[str, NDArray[Any]] = {}
    for name in src.rows.dtype.names or ():
        if name.startswith("rln/"):
            values = np.asarray(src.rows[name])
            if values.dtype.kind == "S":
                values = pd.Series(values).str.decode("utf-8").to_numpy(dtype=object)
            out[name[4:]] = values
    return out


def _particles_from_fields(table: ParticleTable) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "rlnImageName": _image_names(table),
            "rlnDefocusU": table.defocus_u_angstrom,
            "rlnDefocusV": table.defocus_v_angstrom,
            "rlnDefocusAngle": table.defocus_angle_degrees,
            "rlnPhaseShift": table.phase_shift_degrees,
            "rlnCtfBfactor": table.bfactor_angstrom2,
            "rlnOpticsGroup": table.optics_group,
        }
    )
    if table.half_set is not None:
        df["rlnRandomSubset"] = table.half_set
    if table.class_number is not None:
        df["rlnClassNumber"] = table.class_number
    if table.uids is not None:
        df["dhnCsUid"] = pd.Series(table.uids.astype(str), dtype=object)
    if table.source is not None and table.source.format == "cryosparc":
        _add_cryosparc_context(df, table.source.rows)
        for label, values in _carried_star_columns(table).items():
            if label not in OPTICS_LABELS and label not in df.columns:
                df[label] = values
    return df


def _add_cryosparc_context(df: pd.DataFrame, records: Any) -> None:
    """Micrograph name and coordinates from cryoSPARC ``location/`` fields (pyem's mapping)."""
    names = records.dtype.names or ()
    if "location/micrograph_path" in names:
        mic = pd.Series(records["location/micrograph_path"]).map(
            lambda b: (b.decode() if isinstance(b, bytes) else str(b)).lstrip(">")
        )
        df.insert(1, "rlnMicrographName", mic.to_numpy(dtype=object))
    if {"location/center_x_frac", "location/micrograph_shape"} <= set(names):
        shape = np.asarray(records["location/micrograph_shape"], dtype=np.float64)
        df["rlnCoordinateX"] = records["location/center_x_frac"] * shape[:, 1]
        df["rlnCoordinateY"] = (1.0 - records["location/center_y_frac"]) * shape[:, 0]


def _set_column(df: pd.DataFrame, label: str, values: NDArray[Any]) -> None:
    if label in df.columns:
        df[label] = values
    else:
        df.insert(len(df.columns), label, values)


def _update_column(df: pd.DataFrame, label: str, values: NDArray[Any], keep: NDArray[Any]) -> None:
    """Set ``label`` to ``values`` except where ``keep``: unchanged rows keep their text."""
    if keep.all():
        return
    if label in df.columns and keep.any():
        column = df[label].astype(object).to_numpy(copy=True)
        column[~keep] = values[~keep]
        df[label] = column
    else:
        _set_column(df, label, values)


def _decoded(values: NDArray[Any]) -> NDArray[Any]:
    if values.dtype.kind == "S":
        return pd.Series(values).str.decode("utf-8").to_numpy(dtype=object)
    return values


def _carried_star(table: ParticleTable) -> SourceRows | None:
    """The STAR rows a ``.cs`` written from a STAR file carries (``rln/``, ``rlnoptics/``)."""
    src = table.source
    if src is None or src.format != "cryosparc":
        return None
    names = src.rows.dtype.names or ()
    if "rln/rlnImageName" not in names:
        return None
    rows = pd.DataFrame(
        {n[4:]: _decoded(np.asarray(src.rows[n])) for n in names if n[:4] == "rln/"}
    )
    optics = None
    carried = {n[10:]: _decoded(np.asarray(src.rows[n])) for n in names if n[:10] == "rlnoptics/"}
    if "rlnOpticsGroup" in carried:
        per_particle = pd.DataFrame(carried)
        optics = (
            per_particle.drop_duplicates("rlnOpticsGroup")
            .sort_values("rlnOpticsGroup", kind="stable")
            .reset_index(drop=True)
        )
    return SourceRows(
        format="relion31" if optics is not None else "relion30",
        rows=rows,
        optics=optics,
        path=src.path,
    )


def _exact_angst(px: NDArray[np.float64], psize: NDArray[np.float64]) -> NDArray[np.float64]:
    """``px * psize``, moved by an ulp where needed so that dividing by ``psize`` gives ``px``."""
    angst = px * psize
    for _ in range(3):
        bad = angst / psize != px
        if not bad.any():
            break
        up, down = np.nextafter(angst, np.inf), np.nextafter(angst, -np.inf)
        angst = np.where(bad & (up / psize == px), up, angst)
        angst = np.where(bad & (down / psize == px), down, angst)
    return angst


def _px_from_angst(angst: NDArray[np.float64], psize: NDArray[np.float64]) -> NDArray[np.float64]:
    """Pixel origins for Å ones: the shortest decimal that `_exact_angst` maps back to ``angst``.

    Undoes a 3.0 -> 3.1 conversion exactly (``-2.672172`` px comes back as ``-2.672172``, not
    ``-2.6721720000000007``); for other values it is ``angst / psize`` to the last digit.
    """
    px = angst / psize
    done = np.zeros(len(px), dtype=bool)
    for digits in range(1, 18):
        if done.all():
            break
        todo = np.flatnonzero(~done)
        quotient = (angst[todo] / psize[todo]).tolist()
        candidate = np.array([float(f"{v:.{digits}f}") for v in quotient], dtype=np.float64)
        ok = _exact_angst(candidate, psize[todo]) == angst[todo]
        px[todo[ok]] = candidate[ok]
        done[todo[ok]] = True
    return px


def _floats(df: pd.DataFrame, label: str) -> NDArray[np.float64]:
    return np.asarray(pd.to_numeric(df[label], errors="coerce"), dtype=np.float64)


def _update_values(df: pd.DataFrame, table: ParticleTable, f4: bool) -> set[str]:
    """Write the table's poses, origins, CTF and classes where they differ from the rows.

    A value that did not change (same within float64, or float32 for rows carried through a
    ``.cs``) keeps the text it was read with. Returns the labels added with made-up values.
    """
    n = len(table)
    tol = 1e-6 if f4 else 1e-9
    added: set[str] = set()
    psize = table.pixel_size_angstrom
    if table.rotation_matrices is not None:
        euler = matrix_to_euler(table.rotation_matrices)
        keep = np.zeros(n, dtype=bool)
        if all(a in df.columns for a in ANGLES):  # rows whose pose did not change stay verbatim
            before = euler_to_matrix(np.stack([_floats(df, a) for a in ANGLES], axis=1))
            diff = np.abs(before - table.rotation_matrices).max(axis=(1, 2)) if n else before
            keep = np.asarray(diff < (1e-5 if f4 else 1e-9), dtype=bool)
        for i, label in enumerate(ANGLES):
            _update_column(df, label, euler[:, i], keep)
    shifts = table.shifts_angstrom
    has_a = any(c in df.columns for c in ORIGINS_A)
    has_px = any(c in df.columns for c in ORIGINS_PX)
    # rows whose Å origin did not change keep their pixel origin as read (RELION writes both
    # rounded to 6 decimals, so they agree only to ~1e-6)
    a_same: NDArray[np.bool_] = np.zeros(n, dtype=bool)
    if all(c in df.columns for c in ORIGINS_A):
        a_same = np.asarray(
            np.isclose(
                np.stack([_floats(df, c) for c in ORIGINS_A], axis=1), shifts, rtol=tol, atol=tol
            ).all(axis=1),
            dtype=bool,
        )
    if has_a or (not has_px and (table.rotation_matrices is not None or np.any(shifts != 0))):
        if not has_a and not np.any(shifts != 0):
            added.update(ORIGINS_A)
        for i, label in enumerate(ORIGINS_A):
            keep = np.zeros(n, dtype=bool)
            if label in df.columns:
                keep = np.isclose(_floats(df, label), shifts[:, i], rtol=tol, atol=tol)
            _update_column(df, label, shifts[:, i], keep)
    for i, label in enumerate(ORIGINS_PX):
        if label in df.columns:
            keep = np.isclose(_floats(df, label) * psize, shifts[:, i], rtol=tol, atol=tol)
            _update_column(df, label, shifts[:, i] / psize, keep | a_same)
    angle_tol = 1e-5 if f4 else 1e-9
    for label, values, atol in (
        ("rlnDefocusU", table.defocus_u_angstrom, tol),
        ("rlnDefocusV", table.defocus_v_angstrom, tol),
        ("rlnDefocusAngle", table.defocus_angle_degrees, angle_tol),
        ("rlnPhaseShift", table.phase_shift_degrees, angle_tol),
        ("rlnCtfBfactor", table.bfactor_angstrom2, tol),
    ):
        if label in df.columns:
            keep = np.isclose(_floats(df, label), values, rtol=tol, atol=atol)
            _update_column(df, label, values, keep)
    for label, ints in (
        ("rlnClassNumber", table.class_number),
        ("rlnRandomSubset", table.half_set),
    ):
        if ints is not None and label in df.columns:
            _update_column(df, label, ints, _floats(df, label) == ints)
    return added


def _upgrade(
    df: pd.DataFrame, table: ParticleTable, generated: frozenset[str]
) -> tuple[pd.DataFrame, pd.DataFrame, set[str]]:
    """RELION 3.0 rows -> 3.1 particles + optics (as ``relion_convert_star``), losing nothing.

    Optics values move to data_optics by group (identical values form a group); pixel origins
    become Å ones (exactly invertible) unless the rows already have both; labels our 3.0 writer
    made up are dropped; ``rlnMagnification``/``rlnDetectorPixelSize`` stay per particle.
    """
    df = df.drop(columns=[c for c in df.columns if c in generated])
    added: set[str] = set()
    n = len(table)
    first = pd.Series(np.arange(n)).groupby(table.optics_group).first()
    idx = first.to_numpy()
    optics = pd.DataFrame({"rlnOpticsGroup": first.index.to_numpy(dtype=np.int64)})
    move = [c for c in df.columns if c in OPTICS_MOVE]
    for col in move:
        optics[col] = df[col].to_numpy()[idx]
    base = _optics_from_fields(table)
    for label in base.columns:
        if label not in optics.columns:
            optics[label] = base[label].to_numpy()
            added.add(str(label))
    df = df.drop(columns=move)
    if "rlnOpticsGroup" not in df.columns:
        added.add("rlnOpticsGroup")
    _set_column(df, "rlnOpticsGroup", table.optics_group)
    px = [c for c in ORIGINS_PX if c in df.columns]
    if px and not any(c in df.columns for c in ORIGINS_A):
        for a_label, px_label in zip(ORIGINS_A, ORIGINS_PX):
            if px_label in df.columns:
                angst = _exact_angst(_floats(df, px_label), table.pixel_size_angstrom)
                _set_column(df, a_label, angst)
                added.add(a_label)
        df = df.drop(columns=px)
    return df, optics, added


def _to_30(
    df: pd.DataFrame, table: ParticleTable, generated: frozenset[str]
) -> tuple[pd.DataFrame, pd.DataFrame, set[str]]:
    """3.0 rows: optics per particle, origins in px; labels 3.0 cannot hold -> the side frame.

    Returns (rows, side frame, labels added with made-up values). Labels that our writer made
    up before (``generated``) are dropped rather than carried.
    """
    out = df.copy()
    added: set[str] = set()
    for label, values in (
        ("rlnVoltage", table.voltage_kv),
        ("rlnSphericalAberration", table.spherical_aberration_mm),
        ("rlnAmplitudeContrast", table.amplitude_contrast),
    ):
        if label not in out.columns and label not in generated:
            _set_column(out, label, values)
            added.add(label)
    if "rlnImageSize" not in out.columns and table.box_size_px.all() and len(out):
        if "rlnImageSize" not in generated:
            _set_column(out, "rlnImageSize", table.box_size_px)
            added.add("rlnImageSize")
    psize = table.pixel_size_angstrom
    if "rlnDetectorPixelSize" in out.columns:
        mag = _floats(out, "rlnMagnification") if "rlnMagnification" in out.columns else 1e4
        ok = np.isclose(1e4 * _floats(out, "rlnDetectorPixelSize") / mag, psize, rtol=1e-6)
        if not ok.all():
            if "rlnMagnification" not in out.columns:
                added.add("rlnMagnification")
            _update_column(out, "rlnMagnification", np.full(len(out), 10000.0), ok)
            _update_column(out, "rlnDetectorPixelSize", psize, ok)
    else:
        added.update(("rlnMagnification", "rlnDetectorPixelSize"))
        _set_column(out, "rlnMagnification", np.full(len(out), 10000.0))
        _set_column(out, "rlnDetectorPixelSize", psize)
    moved = [c for c in out.columns if c in LABELS_NEW_IN_31 or not c.startswith("rln")]
    side_cols = [c for c in moved if c not in generated]
    side = out[side_cols].copy()
    side.insert(0, "rlnImageName", out["rlnImageName"].to_numpy())
    return out.drop(columns=moved), side, added


def _generated_comment(labels: set[str], *tables: pd.DataFrame) -> str | None:
    present = {str(c) for t in tables for c in t.columns}
    made_up = sorted(labels & present)
    return f"{GENERATED_TAG[2:]} {' '.join(made_up)}" if made_up else None


def _write_cs_side(table: ParticleTable, out_path: Path, names: NDArray[Any]) -> list[str]:
    """Keep a ``.cs`` source's rows next to a STAR output (``<stem>_dhn.cs``) for the way back."""
    from .cryosparc import save_records, star_unmapped_fields

    src = table.source
    assert src is not None
    side = out_path.with_name(out_path.stem + CS_SIDE_SUFFIX)
    check_not_input(side, src.path)
    save_records(src.rows, side, star_names=names)
    lost = star_unmapped_fields(src.rows)
    if not lost:
        return [f"cryoSPARC rows kept in {side}"]
    shown = ", ".join(lost)
    return [f"{len(lost)} .cs field(s) without a STAR column ({shown}) kept in {side}"]


def write_relion_particles(
    table: ParticleTable,
    path: str | os.PathLike[str],
    *,
    relion_version: RelionOutput | str = "3.1",
) -> list[str]:
    """Write ``table`` as a RELION particle STAR file, keeping every column it did not change.

    Parameters
    ----------
    table : ParticleTable
    path : path-like
        Output ``.star``; written atomically, never over the file the table was read from.
    relion_version : {"3.1", "3.0"}
        ``"3.1"`` (also "4.0"/"5.0": the same format) writes optics + particles; ``"3.0"``
        writes one table of 3.0 labels and puts the rest in ``<stem>_dhn.csv``.

    Returns
    -------
    list of str
        What could not go into the STAR file itself and where it went (side files).
    """
    version = "3.0" if str(relion_version) == "3.0" else "3.1"
    if str(relion_version) not in ("3.0", "3.1", "4.0", "5.0"):
        raise InputError(f"relion_version must be 3.0, 3.1, 4.0 or 5.0, got {relion_version!r}")
    out_path = Path(path)
    if table.source is not None and table.source.path:
        check_not_input(out_path, table.source.path)
    n = len(table)
    src = table.source
    notes: list[str] = []
    other: dict[str, Any] = {}
    star_src: SourceRows | None = None
    f4 = False
    if src is not None and src.format in ("relion30", "relion31"):
        star_src = src
    else:
        star_src = _carried_star(table)
        f4 = star_src is not None
    generated: frozenset[str] = frozenset()
    if star_src is not None:
        df = star_src.rows.copy()
        other = dict(star_src.other_blocks)
        optics = star_src.optics.copy() if star_src.optics is not None else None
        generated = star_src.generated
        source_format = star_src.format
        # image names: verbatim where the particle's stack and index are unchanged
        if len(df) == 0:
            old_paths, old_index = np.zeros(0, dtype=object), np.zeros(0, dtype=np.int64)
        else:
            old_paths, old_index = _split_image_names(
                Path(star_src.path), df["rlnImageName"].astype(str)
            )
        same = (old_index == table.image_indices) & (
            pd.Series(old_paths, dtype=object).astype(str).to_numpy()
            == pd.Series(table.image_paths, dtype=object).astype(str).to_numpy()
        )
        _update_column(df, "rlnImageName", _image_names(table), same)
    else:
        df = _particles_from_fields(table)
        optics = _optics_from_fields(table)
        source_format = "relion31"
    made_up = _update_values(df, table, f4)
    for key, values in table.extra.items():
        _set_column(df, key, np.asarray(values))
    if len(df) != n:
        raise ValueError(f"internal error: {len(df)} rows for {n} particles")
    if src is not None and src.format == "cryosparc" and star_src is None:
        notes += _write_cs_side(table, out_path, df["rlnImageName"].to_numpy())

    side_path = out_path.with_name(out_path.stem + SIDE_SUFFIX)
    if version == "3.0":
        if optics is not None and source_format == "relion31":
            by_group = optics.set_index("rlnOpticsGroup")
            for col in optics.columns:
                if col not in df.columns and col not in generated and col != "rlnOpticsGroup":
                    _set_column(df, col, by_group[col].reindex(table.optics_group).to_numpy())
        if any(c in df.columns for c in ORIGINS_A) and not any(c in df.columns for c in ORIGINS_PX):
            for i, (a_label, px_label) in enumerate(zip(ORIGINS_A, ORIGINS_PX)):
                if a_label in df.columns:
                    shift = _px_from_angst(table.shifts_angstrom[:, i], table.pixel_size_angstrom)
                    _set_column(df, px_label, shift)
                    if a_label not in generated:
                        made_up.add(px_label)
        rows30, side, added = _to_30(df, table, generated)
        made_up |= added
        write_star_blocks(
            out_path,
            {"": rows30},
            version_tag=False,
            comment=_generated_comment(made_up | (set(generated) & set(rows30.columns)), rows30),
        )
        if side.shape[1] > 1:
            with atomic_path(side_path) as tmp:
                side.to_csv(tmp, index=False, lineterminator="\n")
            labels = [str(c) for c in side.columns[1:]]
            shown = ", ".join(labels)
            notes.append(
                f"{len(labels)} label(s) RELION 3.0 cannot hold ({shown}) kept in {side_path}"
            )
        else:
            side_path.unlink(missing_ok=True)  # a stale side file would be read back
        return notes
    if optics is None or source_format == "relion30":
        df, optics, added = _upgrade(df, table, generated)
        made_up |= added
    elif n:
        used = np.unique(table.optics_group)
        optics = optics[optics["rlnOpticsGroup"].isin(used)].reset_index(drop=True)
    blocks: dict[str, Any] = {"optics": optics, "particles": df}
    blocks.update(other)
    comment = _generated_comment(made_up | set(generated), df, optics)
    write_star_blocks(out_path, blocks, version_tag=True, comment=comment)
    return notes
