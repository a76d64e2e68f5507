"""Write the rows of a full particle file whose particles appear in a selection file.

FULL and PART may each be RELION .star or cryoSPARC .cs, typically PART is a subset edited in
the other program. Particles are matched by cryoSPARC uid first (uids on both sides, a dhnCsUid
column counting as uid), then, when some uid is not found, by (stack name, image index) with
stack names normalised (basename, cryoSPARC's 21-digit import prefix and .mrc/.mrcs removed).
The rows written are FULL's rows, every column included, in FULL's order: a subset picked in
RELION goes back to cryoSPARC with its original uids and vice versa. It fails when some selected
particles are not in FULL.

Example:
  deephemnma subset --source J42/J42_particles.cs --select Select/job050/particles.star \\
      --out J42_selected.cs
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from ..errors import InputError
from ..fileutils import check_not_input, check_output_file
from ..particles import ParticleTable
from .convert import SIDE_FILES

__all__ = ["add_args", "main", "match_subset"]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="the full particle file (.star or .cs)")
    parser.add_argument("--select", required=True, help="the particles to keep (.star or .cs)")
    parser.add_argument("--out", required=True, help="output .star or .cs")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument(
        "--relion-version",
        default="3.1",
        choices=["3.0", "3.1", "4.0", "5.0"],
        help="STAR flavour for a .star output (default: %(default)s)",
    )


def _uids(table: ParticleTable) -> NDArray[np.uint64] | None:
    if table.uids is not None:
        return table.uids
    if "dhnCsUid" in table.extra:
        values = pd.to_numeric(pd.Series(table.extra["dhnCsUid"]), errors="coerce")
        if values.notna().all():
            return np.asarray(values, dtype=np.uint64)
    return None


def _match(keys_full: NDArray[Any], keys_part: NDArray[Any]) -> NDArray[np.bool_]:
    """Which of ``keys_part`` are in ``keys_full``."""
    return np.asarray(pd.Index(keys_full).isin(keys_part), dtype=bool)


def match_subset(full: ParticleTable, part: ParticleTable) -> tuple[NDArray[np.intp], str]:
    """Positions in ``full`` of the particles of ``part`` (in ``full``'s order) and the key used.

    uids are tried first (when both files have them, ``dhnCsUid`` counting as a uid); when some
    selected uid is not in ``full`` (e.g. uids made up for a STAR file on each side
    independently), (normalised stack name, 0-based index) is tried.

    Raises
    ------
    InputError
        When some particles of ``part`` are not in ``full`` (the message lists the first few)
        or ``full`` holds the same particle twice.
    """
    candidates: list[tuple[str, NDArray[Any], NDArray[Any]]] = []
    full_uids, part_uids = _uids(full), _uids(part)
    if full_uids is not None and part_uids is not None:
        candidates.append(("cryoSPARC uid", full_uids, part_uids))
    candidates.append(("stack name and image index", full.stack_keys, part.stack_keys))
    best: tuple[int, str, NDArray[Any]] | None = None
    for how, keys_full, keys_part in candidates:
        found = np.asarray(pd.Index(keys_part).isin(keys_full), dtype=bool)
        if found.all():
            if not pd.Index(keys_full).is_unique:
                raise InputError(
                    f"the source file holds some particle twice (same {how}); cannot match"
                )
            return np.flatnonzero(_match(keys_full, keys_part)), how
        missing = np.asarray(keys_part)[~found]
        if best is None or len(missing) < best[0]:
            best = (len(missing), how, missing)
    if best is None:
        raise ValueError("internal error: no key to match on")
    count, how, missing = best
    shown = ", ".join(str(k) for k in missing[:5])
    raise InputError(
        f"{count} of {len(part)} selected particles are not in the source (best match by "
        f"{how}; not found: {shown}{', ...' if count > 5 else ''}); is --source the file the "
        "selection was made from?"
    )


def main(args: argparse.Namespace) -> int:
    from ..adapters import read_particles, write_particles

    check_not_input(args.out, args.source)
    check_not_input(args.out, args.select)
    check_output_file(args.out, overwrite=args.overwrite, option="--out", side_suffixes=SIDE_FILES)
    full = read_particles(args.source)
    part = read_particles(args.select)
    keep, how = match_subset(full, part)
    write_particles(full.take(keep), args.out, relion_version=args.relion_version)
    print(
        f"matched {len(keep)} of {len(part)} selected particles by {how}; "
        f"wrote {len(keep)} of {len(full)} rows of {args.source} to {args.out}"
    )
    return 0
