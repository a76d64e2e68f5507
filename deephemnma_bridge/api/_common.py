"""What every stage of the API shares: particles and modes given as objects or paths, the log."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeAlias

from ..errors import InputError
from ..nma import NormalModes
from ..particles import ParticleTable

__all__ = [
    "Log",
    "ModesLike",
    "ParticlesLike",
    "ProgressCallback",
    "amplitude_columns",
    "choice",
    "load_modes",
    "progress_bar",
    "read_table",
    "say",
    "warn_line",
]

#: Where a stage writes its lines: ``print`` (the command line's choice), a logger's ``info``,
#: or None for silence.
Log: TypeAlias = Callable[[str], None] | None
#: Particles: a `ParticleTable` in memory, or a RELION ``.star`` / cryoSPARC ``.cs`` file.
ParticlesLike: TypeAlias = ParticleTable | str | os.PathLike[str]
#: Normal modes: a `NormalModes` object, or the ``.npz`` that `compute_modes` wrote.
ModesLike: TypeAlias = NormalModes | str | os.PathLike[str]


def say(log: Log, text: str) -> None:
    """Send one line to ``log`` (nothing when it is None)."""
    if log is not None:
        log(text)


def warn_line(log: Log, text: str) -> None:
    """A side note (threads, cost-saving choices): on stderr when the log is ``print``, else to
    the log."""
    if log is print:
        print(text, file=sys.stderr)
    else:
        say(log, text)


def read_table(particles: ParticlesLike) -> tuple[ParticleTable, Path | None]:
    """The table and the file it came from (None for a table given in memory)."""
    if isinstance(particles, ParticleTable):
        return particles, None
    from ..adapters import read_particles

    path = Path(particles)
    return read_particles(path), path


def load_modes(modes: ModesLike) -> tuple[NormalModes, Path | None]:
    """The modes and the file they came from (None for modes given in memory)."""
    if isinstance(modes, NormalModes):
        return modes, None
    path = Path(modes)
    return NormalModes.load(path), path


def label(path: Path | None, what: str = "the particles") -> str:
    """How a message names an input: its path, or ``what`` for an object in memory."""
    return str(path) if path is not None else what


def amplitude_columns(extra: Mapping[str, Any]) -> list[int]:
    """Mode numbers of the ``dhnAmplitude<mode>`` columns, ascending."""
    return sorted(int(m.group(1)) for k in extra if (m := re.fullmatch(r"dhnAmplitude(\d+)", k)))


def input_files(*items: object) -> tuple[Path, ...]:
    """The inputs that are files (objects in memory have no path to record)."""
    return tuple(Path(x) for x in items if isinstance(x, str | os.PathLike))


def need(condition: bool, message: str) -> None:
    """Raise `InputError` with ``message`` unless ``condition``."""
    if not condition:
        raise InputError(message)


#: A progress callback: called with (particles done, particles in all) as the work advances.
ProgressCallback: TypeAlias = Callable[[int, int], None]


class _CallbackBar:
    """The ``update`` / ``close`` of a bar, reported to a callback."""

    def __init__(self, callback: ProgressCallback, total: int, initial: int) -> None:
        self.callback, self.total, self.done = callback, total, initial

    def update(self, k: int = 1) -> None:
        self.done += k
        self.callback(self.done, self.total)

    def close(self) -> None:
        pass


class _NoBar:
    def update(self, k: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(
    progress: bool | ProgressCallback, total: int, *, desc: str, initial: int = 0
) -> Any:
    """A bar for ``progress``: True, the package's (tqdm on a terminal, a line every 30 s in a
    log); False, none; a callable, called with (done, total) after each batch."""
    if progress is True:
        from ..progress import progress as bar

        return bar(total, initial=initial, desc=desc)
    if progress is False or progress is None:
        return _NoBar()
    if not callable(progress):
        raise InputError(f"progress must be True, False or a callable, got {progress!r}")
    return _CallbackBar(progress, total, initial)


def choice(option: str, value: object, options: tuple[str, ...]) -> None:
    """`InputError` naming ``option`` unless ``value`` is one of ``options``."""
    if value not in options:
        raise InputError(f"{option} {value!r}: choose from {', '.join(options)}")
