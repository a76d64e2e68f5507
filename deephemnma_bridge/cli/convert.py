"""Convert particle files between RELION STAR (3.0, 3.1+) and cryoSPARC .cs.

Every column is kept: STAR -> STAR keeps all columns, .cs -> .cs all fields; STAR -> .cs carries
STAR columns without a cryoSPARC field as rln/<label> fields (and gives each particle a uid, the
same one every time: a hash of stack name and index, or the dhnCsUid column when present).

.cs -> STAR writes the cryoSPARC uids in a dhnCsUid column and in a side file
<stem>_uid_map.csv (rlnImageName, cs_uid, cs_blob_path, cs_blob_idx), so a subset edited in
RELION can be matched back (deephemnma subset). RELION refuses N@stack.mrc, so every .mrc stack
is exposed as a .mrcs symbolic link under <output folder>/stacks/ (no data is copied). Image
names are written relative to the working directory when the stack lies under it, else as
absolute paths: run the command from the RELION project directory. Stacks that cannot be found
(run from the cryoSPARC project directory, or next to the .cs job folder) are written with their
cryoSPARC path and a warning.

Nothing is lost: what the target format cannot hold goes to a side file next to the output
(<stem>_dhn.cs for .cs fields without a STAR column, <stem>_dhn.csv for labels RELION 3.0 cannot
hold) or to rln/<label> fields of a .cs, and the reader takes it back; convert prints which fields
went where. Values that were not changed are written back as read.

Examples:
  deephemnma convert P1/J42/J42_particles.cs particles.star
  deephemnma convert Refine3D/job025/run_data.star particles.cs
  deephemnma convert run_data.star run_data_relion30.star --relion-version 3.0
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError, ParticleFileError
from ..fileutils import atomic_path, check_not_input, check_output_file
from ..particles import ParticleTable

__all__ = ["add_args", "expose_stacks", "main", "write_uid_map"]

#: files the writers may put beside a particle file (RELION 3.0 labels, .cs rows, uid map)
SIDE_FILES = ("_dhn.csv", "_dhn.cs", "_uid_map.csv")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="particles: RELION .star or cryoSPARC .cs")
    parser.add_argument("output", help="output .star or .cs (never the input)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument(
        "--relion-version",
        default="3.1",
        choices=["3.0", "3.1", "4.0", "5.0"],
        help="STAR flavour to write (3.1, 4.0 and 5.0 share one format; default: %(default)s)",
    )
    parser.add_argument(
        "--passthrough",
        nargs="+",
        default=None,
        help="cryoSPARC passthrough .cs file(s) to merge by uid (default: the sibling "
        "J<n>_passthrough_<output>.cs when present)",
    )
    parser.add_argument(
        "--pixel-size",
        type=float,
        default=None,
        help="pixel size (Å) for STAR 3.0 files that do not give one",
    )


def _link_name(stack: str) -> Path:
    """Where the ``.mrcs`` link of ``stack`` goes, relative to the output folder.

    Distinct stack names get distinct links: ``..`` becomes ``_up_`` and an absolute path starts
    with ``_abs_`` (``a/x.mrc`` and ``../../a/x.mrc`` are two stacks).
    """
    path = Path(stack)
    parts = ["_abs_"] if path.is_absolute() else []
    for part in path.parts:
        if part in ("/", ".") or part.endswith(":\\"):
            continue
        parts.append("_up_" if part == ".." else part)
    return Path("stacks", *parts).with_suffix(".mrcs")


def _verbatim_stacks(table: ParticleTable) -> set[str]:
    """Stacks whose every row keeps the image name a STAR file gave it (carried in a .cs)."""
    src = table.source
    if src is None or src.format != "cryosparc":
        return set()
    if "rln/rlnImageName" not in (src.rows.dtype.names or ()):
        return set()
    names = pd.Series(src.rows["rln/rlnImageName"])
    if len(names) and isinstance(names.iloc[0], bytes):
        names = names.str.decode("utf-8")
    parts = names.astype(str).str.split("@", n=1, expand=True)
    if parts.shape[1] < 2:
        return set()
    paths = pd.Series(table.image_paths, dtype=object).astype(str)
    index = pd.to_numeric(parts[0], errors="coerce") - 1
    same = (parts[1].str.strip() == paths) & (index == pd.Series(table.image_indices))
    by_stack = same.groupby(paths).all()
    return {str(k) for k, v in by_stack.items() if v}


def check_stacks(table: ParticleTable, source: str) -> None:
    """Every stack name that points at an existing file must point at an MRC stack.

    A name such as ``1@../../../../etc/passwd`` would otherwise be written through to the
    output; the error names the first row that uses it. Stacks not found are left to the
    writer (they may live in the RELION project the file is meant for).
    """
    from ..adapters.images import check_mrc_header, resolve_stack

    paths = pd.Series(table.image_paths, dtype=object).astype(str)
    codes, uniques = pd.factorize(paths)
    for k, stack in enumerate(uniques):
        try:
            target = resolve_stack(stack, table.search_dirs)
        except ParticleFileError:
            continue
        try:
            check_mrc_header(target)
        except ParticleFileError as err:
            row = int(np.flatnonzero(codes == k)[0])
            raise ParticleFileError(
                f"{source}: row {row + 1} names image {table.image_indices[row] + 1}@{stack}, "
                f"which is not an MRC image stack ({err}); fix the image name"
            ) from err


def expose_stacks(table: ParticleTable, out_dir: Path) -> tuple[ParticleTable, int, list[str]]:
    """Make every stack of ``table`` reachable by RELION from the working directory.

    ``.mrc`` stacks get a relative ``.mrcs`` symlink under ``out_dir/stacks/`` (RELION refuses
    ``N@stack.mrc``); other stacks keep their file. Paths are rewritten relative to the working
    directory (absolute when outside it).

    Returns
    -------
    table : ParticleTable
        The table with the new image paths.
    links : int
        Number of symlinks made.
    missing : list of str
        Stacks that could not be found (their path is kept).
    """
    from ..adapters.images import path_from_cwd, resolve_stack

    paths = pd.Series(table.image_paths, dtype=object).astype(str)
    codes, uniques = pd.factorize(paths)
    new_names = np.asarray(uniques, dtype=object).copy()
    links, missing = 0, []
    verbatim = _verbatim_stacks(table)
    targets: dict[Path, Path] = {}
    for k, stack in enumerate(uniques):
        if stack in verbatim and not stack.lower().endswith(".mrc"):
            continue  # the name RELION had for it: written back as it was
        try:
            target = resolve_stack(stack, table.search_dirs).resolve()
        except ParticleFileError:
            missing.append(stack)
            continue
        if target.suffix.lower() != ".mrc":
            new_names[k] = path_from_cwd(target)
            continue
        link = out_dir / _link_name(stack)
        if targets.get(link, target) != target:
            raise InputError(
                f"stacks {stack} and another one both map to the link {link}; rename one"
            )
        targets[link] = target
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            raise InputError(f"{link} exists and is not a link; remove it or choose another output")
        link.symlink_to(os.path.relpath(target, link.parent))
        new_names[k] = path_from_cwd(link)
        links += 1
    search = (str(Path.cwd()), str(out_dir.resolve()), *table.search_dirs)
    return table.replace(image_paths=new_names[codes], search_dirs=search), links, missing


def write_uid_map(path: Path, table: ParticleTable, original: ParticleTable) -> None:
    """``rlnImageName,cs_uid,cs_blob_path,cs_blob_idx`` for every particle (atomic write)."""
    if original.uids is None:
        raise ValueError("internal error: a uid map needs uids")
    src_paths = np.asarray(original.image_paths, dtype=object)
    if original.source is not None and original.source.format == "cryosparc":
        raw = pd.Series(original.source.rows["blob/path"])
        if len(raw) and isinstance(raw.iloc[0], bytes):
            raw = raw.str.decode("utf-8")
        src_paths = raw.astype(str).to_numpy(dtype=object)
    numbers = pd.Series(np.asarray(table.image_indices) + 1).map("{:06d}@".format)
    names = (numbers + pd.Series(table.image_paths, dtype=object).astype(str)).to_numpy()
    frame = pd.DataFrame(
        {
            "rlnImageName": names,
            "cs_uid": original.uids.astype(str),
            "cs_blob_path": src_paths,
            "cs_blob_idx": original.image_indices,
        }
    )
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")


def main(args: argparse.Namespace) -> int:
    from ..adapters import read_particles, write_particles

    out = Path(args.output)
    check_not_input(out, args.input, *(args.passthrough or ()))
    check_output_file(out, overwrite=args.overwrite, side_suffixes=SIDE_FILES)
    kwargs: dict[str, object] = {}
    is_cs = args.input.lower().endswith(".cs")
    if args.passthrough and not is_cs:
        raise InputError("--passthrough only applies to a cryoSPARC .cs input")
    if is_cs and args.passthrough:
        kwargs["passthrough"] = args.passthrough
    if not is_cs and args.pixel_size is not None:
        kwargs["pixel_size_angstrom"] = args.pixel_size
    table = read_particles(args.input, **kwargs)
    if out.suffix.lower() not in (".star", ".cs"):
        raise InputError(f"{out}: the output must end in .star or .cs")
    check_stacks(table, args.input)
    notes: list[str] = []
    uid_map = out.with_name(out.stem + "_uid_map.csv")
    if out.suffix.lower() == ".star" and table.uids is not None:
        check_not_input(uid_map, args.input)
        original = table
        out.parent.mkdir(parents=True, exist_ok=True)
        table, links, missing = expose_stacks(table, out.parent)
        if links:
            notes.append(f"{links} .mrc stack(s) linked as .mrcs under {out.parent / 'stacks'}")
        if missing:
            warnings.warn(
                f"{len(missing)} image stack(s) not found (e.g. {missing[0]}): the STAR file "
                "keeps the paths of the .cs, and RELION needs the stacks there (as .mrcs); "
                "rerun from the cryoSPARC project directory to have them found and linked",
                UserWarning,
                stacklevel=2,
            )
        notes += write_particles(table, out, relion_version=args.relion_version)
        try:
            write_uid_map(uid_map, table, original)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        notes.append(f"uid map {uid_map}")
    else:
        notes += write_particles(table, out, relion_version=args.relion_version)
    print(
        f"read {len(table)} particles from {args.input}; wrote {out}"
        + "".join(f"; {n}" for n in notes)
    )
    return 0
