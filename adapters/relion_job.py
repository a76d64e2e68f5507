"""RELION External-job protocol: output-node files, exit markers, abort, version detection.

Follows ``../shared/docs/INTEROP.md`` section 5 (read from RELION 3.1, 4.0 and 5.0 sources):

* ``RELION_OUTPUT_NODES.star`` (table ``output_nodes``) is written **before** the exit marker.
  RELION 3.1 reads integer node types (``_rlnPipeLineNodeType``); 4.0 and 5.0 read only the
  string labels (``_rlnPipeLineNodeTypeLabel``), and the label strings changed between 4.0 and
  5.0. For 4.0/5.0 both columns are written (harmless), for 3.1 the integers only.
* Exactly one empty marker ends a job: ``RELION_JOB_EXIT_SUCCESS``, ``..._FAILURE`` or
  ``..._ABORTED``; the GUI asks for an abort by creating ``RELION_JOB_ABORT_NOW``.
* Which RELION is calling is read from ``default_pipeline.star`` in the project directory.

Example
-------
>>> import pathlib, tempfile
>>> job = pathlib.Path(tempfile.mkdtemp())
>>> write_output_nodes(job, [("External/job001/particles.star", "particles")],
...                    relion_version="5.0")
>>> "ParticleGroupMetadata.star.relion" in (job / OUTPUT_NODES).read_text()
True
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from deephemnma_bridge.errors import InputError
from deephemnma_bridge.fileutils import atomic_path

__all__ = [
    "ABORT_NOW",
    "EXIT_MARKERS",
    "NODE_TYPES",
    "OUTPUT_NODES",
    "JobAborted",
    "RelionVersion",
    "abort_requested",
    "acknowledge_abort",
    "clear_exit_markers",
    "detect_relion_version",
    "write_exit_marker",
    "write_output_nodes",
]

RelionVersion = Literal["3.1", "4.0", "5.0"]
Outcome = Literal["SUCCESS", "FAILURE", "ABORTED"]

OUTPUT_NODES = "RELION_OUTPUT_NODES.star"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
EXIT_MARKERS: dict[Outcome, str] = {
    "SUCCESS": "RELION_JOB_EXIT_SUCCESS",
    "FAILURE": "RELION_JOB_EXIT_FAILURE",
    "ABORTED": "RELION_JOB_EXIT_ABORTED",
}

# node kind -> (3.1 integer, 4.0 label, 5.0 label)   (INTEROP.md 5.4)
NODE_TYPES: dict[str, tuple[int, str, str]] = {
    "particles": (3, "ParticlesData.star.relion", "ParticleGroupMetadata.star.relion"),
    "map": (6, "DensityMap.mrc", "DensityMap.mrc"),
    "halfmap": (10, "DensityMap.mrc.halfmap", "DensityMap.mrc.halfmap"),
    "mask": (7, "Mask3D.mrc", "Mask3D.mrc"),
    "logfile": (13, "LogFile.pdf.relion", "LogFile.pdf.relion"),
}


class JobAborted(Exception):
    """Raised by long-running steps when RELION asked the job to abort."""


def detect_relion_version(project_dir: str | os.PathLike[str] = ".") -> RelionVersion:
    """Tell which RELION runs the project from its ``default_pipeline.star``.

    ``# version 50001`` means 5.x; node or process *type labels* mean 4.0; integer types only
    mean 3.1 (INTEROP.md 5.5). Without a pipeline file, 5.0 is assumed with a warning.
    """
    pipeline = Path(project_dir) / "default_pipeline.star"
    if not pipeline.is_file():
        warnings.warn(
            f"{pipeline} not found: assuming RELION 5.0 node labels "
            "(pass --relion_version to choose)",
            UserWarning,
            stacklevel=2,
        )
        return "5.0"
    text = pipeline.read_text(errors="replace")
    if "# version 50001" in text:
        return "5.0"
    if "_rlnPipeLineNodeTypeLabel" in text or "_rlnPipeLineProcessTypeLabel" in text:
        return "4.0"
    return "3.1"


def write_output_nodes(
    job_dir: str | os.PathLike[str],
    nodes: Sequence[tuple[str, str]],
    *,
    relion_version: RelionVersion,
) -> Path:
    """Write ``RELION_OUTPUT_NODES.star`` listing ``nodes`` = [(project-relative path, kind)].

    ``kind`` is a key of `NODE_TYPES` (``"particles"``, ``"map"``, ...). Returns the file path.
    """
    if relion_version not in ("3.1", "4.0", "5.0"):
        raise InputError(f"relion_version must be 3.1, 4.0 or 5.0, got {relion_version!r}")
    lines = ["", "# version 30001", "", "data_output_nodes", "", "loop_"]
    lines.append("_rlnPipeLineNodeName #1")
    lines.append("_rlnPipeLineNodeType #2")
    with_labels = relion_version != "3.1"
    if with_labels:
        lines.append("_rlnPipeLineNodeTypeLabel #3")
    for path, kind in nodes:
        if kind not in NODE_TYPES:
            raise InputError(f"unknown RELION node kind {kind!r}; choose from {list(NODE_TYPES)}")
        if any(c.isspace() for c in path):
            raise InputError(f"RELION cannot read node paths with spaces: {path!r}")
        number, label40, label50 = NODE_TYPES[kind]
        row = f"{path} {number}"
        if with_labels:
            row += f" {label50 if relion_version == '5.0' else label40}"
        lines.append(row)
    lines.append("")
    target = Path(job_dir) / OUTPUT_NODES
    with atomic_path(target) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return target


def clear_exit_markers(job_dir: str | os.PathLike[str]) -> None:
    """Remove stale exit markers (RELION does the same before each run)."""
    for name in EXIT_MARKERS.values():
        with contextlib.suppress(FileNotFoundError):
            (Path(job_dir) / name).unlink()


def write_exit_marker(job_dir: str | os.PathLike[str], outcome: Outcome) -> Path:
    """Leave exactly one exit marker for ``outcome`` in ``job_dir``."""
    clear_exit_markers(job_dir)
    marker = Path(job_dir) / EXIT_MARKERS[outcome]
    marker.touch()
    return marker


def abort_requested(job_dir: str | os.PathLike[str]) -> bool:
    """Whether the GUI created ``RELION_JOB_ABORT_NOW`` in ``job_dir``."""
    return (Path(job_dir) / ABORT_NOW).exists()


def acknowledge_abort(job_dir: str | os.PathLike[str]) -> None:
    """Remove ``RELION_JOB_ABORT_NOW`` and write ``RELION_JOB_EXIT_ABORTED``."""
    with contextlib.suppress(FileNotFoundError):
        (Path(job_dir) / ABORT_NOW).unlink()
    write_exit_marker(job_dir, "ABORTED")
