"""Atomic output: write to a temporary name next to the target, rename on success.

A failed or interrupted write leaves neither a partial file nor a stray temporary file, and an
existing file at the target is only replaced once the new one is complete.

Example
-------
>>> import pathlib, tempfile
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> with atomic_path(d / "out.txt") as tmp:
...     _ = tmp.write_text("hello")
>>> (d / "out.txt").read_text()
'hello'
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "OUTPUT_MARKER",
    "atomic_dir",
    "atomic_path",
    "await_output_dir",
    "check_not_input",
    "check_output_dir",
    "check_output_file",
    "claim_output_dir",
    "file_sha256",
    "output_owner",
]


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success.

    The temporary name keeps the target's suffix, so libraries that dispatch on the extension
    (``np.save`` adds ``.npy`` otherwise) write the right format.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    _give_user_mode(tmp, directory=False)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


#: Marker file in every output folder a command writes: which command wrote it, when, from what.
OUTPUT_MARKER = ".deephemnma-output.json"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _give_user_mode(path: Path, *, directory: bool) -> None:
    """``mkstemp``/``mkdtemp`` create 0600/0700: give the mode a plain ``open``/``mkdir`` gives."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def output_owner(folder: str | os.PathLike[str]) -> str | None:
    """The command that wrote ``folder`` (from its marker file), or None."""
    marker = Path(folder) / OUTPUT_MARKER
    try:
        return str(json.loads(marker.read_text())["command"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_output_dir(
    out: str | os.PathLike[str],
    *,
    command: str,
    inputs: Sequence[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> None:
    """Raise `InputError` unless ``out`` may be (re)written as the output folder of ``command``.

    A new path or an empty folder is fine, and so is a folder this command wrote before (it has
    our marker file). Any other existing folder needs ``overwrite``. Never allowed, even with
    ``overwrite``: a file; the working directory or a folder above it; a folder that holds an
    input (or is one); a RELION project (``default_pipeline.star``); the home or root folder.
    """
    from .errors import InputError

    path = Path(out)
    if str(out).strip() == "":
        raise InputError(f"--out {str(out)!r}: give a new folder name for the output")
    if path.is_file() or (path.exists() and not path.is_dir()):
        raise InputError(
            f"--out {out} is an existing file; give a folder name (the output is a folder)"
        )
    if not path.exists():
        return
    where = path.resolve()
    cwd = Path.cwd().resolve()
    if _is_within(cwd, where):
        raise InputError(
            f"--out {out} is the working directory or a folder above it; it is never replaced: "
            "give a new folder name"
        )
    if where == Path.home().resolve() or where == Path(where.anchor):
        raise InputError(f"--out {out} is a home or root folder; give a new folder name")
    for inp in inputs:
        for candidate in {Path(inp).absolute(), Path(inp).resolve()}:
            if _is_within(candidate, where) or _is_within(where, candidate):
                raise InputError(
                    f"--out {out} holds the input {inp}; it is never replaced: give a new "
                    "folder name"
                )
    if (where / "default_pipeline.star").exists():
        raise InputError(
            f"--out {out} is a RELION project (it has default_pipeline.star); it is never "
            f"replaced: give a new folder name, e.g. {path / 'DeepHEMNMA'}"
        )
    owner = output_owner(where)
    if owner == command or not any(where.iterdir()) or overwrite:
        return
    what = f"the output of deephemnma {owner}" if owner else "files this command did not write"
    raise InputError(
        f"--out {out} already exists and holds {what}; choose a new folder, or add "
        "--overwrite to replace it"
    )


def check_output_file(
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    option: str = "output",
    side_suffixes: Sequence[str] = (),
) -> None:
    """Raise `InputError` when the output file ``out`` exists (a folder, or a file and not
    ``overwrite``): a file the command did not just write is never replaced silently. The same
    for the side files the output may get beside it (``<stem><suffix>``)."""
    from .errors import InputError

    path = Path(out)
    if path.is_dir():
        raise InputError(f"{option} {out} is a folder; give a file name")
    for target in (path, *(path.with_name(path.stem + s) for s in side_suffixes)):
        if target.exists() and not overwrite:
            what = "" if target == path else f" (a side file of {path.name})"
            raise InputError(
                f"{option}: {target}{what} already exists; choose a new name, or add "
                "--overwrite to replace it"
            )


def _marker_text(command: str, inputs: Sequence[str | os.PathLike[str]]) -> str:
    marker = {
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": [str(p) for p in inputs],
    }
    return json.dumps(marker, indent=2) + "\n"


def claim_output_dir(
    out: str | os.PathLike[str],
    *,
    command: str,
    inputs: Sequence[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
    """Check ``out`` (`check_output_dir`), create it and mark it as ``command``'s output.

    For commands that write into their folder as they go (``train``, ``run``): nothing in the
    folder is deleted; a rerun of the same command finds its own marker and resumes.
    """
    path = Path(out)
    check_output_dir(path, command=command, inputs=inputs, overwrite=overwrite)
    path.mkdir(parents=True, exist_ok=True)
    if output_owner(path) != command:
        with atomic_path(path / OUTPUT_MARKER) as tmp:
            tmp.write_text(_marker_text(command, inputs))
    return path


def await_output_dir(
    out: str | os.PathLike[str], *, command: str, timeout_seconds: float = 300.0
) -> Path:
    """Wait until ``out`` carries ``command``'s marker (`claim_output_dir`) and return it.

    For the other ranks of a ``torchrun`` job: rank 0 alone checks and claims the folder. Had
    every rank checked, one could see the folder rank 0 had just created, before its marker
    was written, and refuse it as someone else's."""
    import time

    from .errors import InputError

    path = Path(out)
    deadline = time.monotonic() + timeout_seconds
    while output_owner(path) != command:
        if time.monotonic() > deadline:
            raise InputError(
                f"--out {out}: rank 0 did not claim it for deephemnma {command} within "
                f"{timeout_seconds:.0f} s (see rank 0's error)"
            )
        time.sleep(0.2)
    return path


@contextlib.contextmanager
def atomic_dir(
    target: str | os.PathLike[str],
    *,
    command: str,
    inputs: Sequence[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; move it onto ``target`` on success.

    The folder gets our marker file (`OUTPUT_MARKER`, naming ``command``) and the user's umask.
    ``target`` is checked with `check_output_dir` before and after the work: an existing folder
    is replaced only when it may be, and only after the new one is complete.
    """
    target = Path(target)
    check_output_dir(target, command=command, inputs=inputs, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    _give_user_mode(tmp, directory=True)
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(_marker_text(command, inputs))
        check_output_dir(target, command=command, inputs=inputs, overwrite=overwrite)
        if target.exists():
            old = Path(
                tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent)
            )
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_not_input(output: str | os.PathLike[str], *inputs: str | os.PathLike[str]) -> None:
    """Raise `InputError` when ``output`` is one of ``inputs`` (we never overwrite an input)."""
    from .errors import InputError

    out = Path(output).resolve()
    for inp in inputs:
        if Path(inp).resolve() == out:
            raise InputError(
                f"output {output} is the same file as the input {inp}; "
                "choose another output name (inputs are never modified)"
            )
