"""What the two refit benchmarks share: timing a command, and one round of the second-reference
chain (``bench_hemnma.py --cases refit`` on the simulator's particles,
``bench_relion_project.py --refit N`` on particles RELION made).

A round, as a user runs it (README, "A second reference"): RELION reconstructs the particles
with the last round's poses (``relion_reconstruct --ctf``), ``deephemnma fit`` deforms the open
model into that map (``--keep-frame``, compared with the closed model), ``deephemnma modes``
computes the fitted model's modes, and ``deephemnma align`` aligns the particles again with
them (modes 7-9, align's defaults). Scored against the particles' true poses
(``_dhnTrueAngle*``), as found and modulo the frame (`evaluation.frame_offset`).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from deephemnma_bridge.adapters import read_particles
from deephemnma_bridge.conventions import angle_between_rotations_degrees, euler_to_matrix
from deephemnma_bridge.evaluation import frame_offset
from deephemnma_bridge.particles import ParticleTable

CLI = [sys.executable, "-m", "deephemnma_bridge.cli"]
TRUE = ("dhnTrueAngleRot", "dhnTrueAngleTilt", "dhnTrueAnglePsi")


def timed(
    cmd: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> tuple[float, float, str]:
    """(wall s, CPU s of the process and its children, stdout) of one command, with ``env``
    added to this process's environment; exits with its output on failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(
        list(cmd), capture_output=True, text=True, check=False, env={**os.environ, **(env or {})},
        cwd=cwd,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(
            f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout[-2000:]}\n"
            f"{done.stderr[-3000:]}"
        )
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def true_rotations(table: ParticleTable) -> NDArray[np.float64]:
    """The particles' true poses (n, 3, 3), from the ``_dhnTrueAngle*`` columns."""
    return euler_to_matrix(np.stack([np.asarray(table.extra[k], float) for k in TRUE], 1))


@dataclass
class Round:
    """One refit round's output and figures (angles in degrees, CPU in seconds)."""

    number: int
    star: Path  # the aligned particles
    table: ParticleTable
    fit: dict[str, Any]  # `deephemnma fit`'s report (``*_fit.json``)
    angle: NDArray[np.float64]  # to the true pose, as found
    frame_degrees: float  # the rotation that best maps the true poses on the found ones
    modulo_frame: NDArray[np.float64]  # to the true pose once that rotation is taken out
    cpu_map: float
    cpu_fit: float
    cpu_modes: float
    cpu_align: float
    wall_align: float

    @property
    def cpu(self) -> float:
        return self.cpu_map + self.cpu_fit + self.cpu_modes + self.cpu_align

    def summary(self) -> dict[str, float]:
        """The figures as a JSON-ready dict (CPU per particle)."""
        n = len(self.table)
        return {
            "fit_rmsd_angstrom": self.fit["compare"]["rmsd_after"],
            "angle_median": float(np.median(self.angle)),
            "angle_p90": float(np.percentile(self.angle, 90)),
            "frame_degrees": self.frame_degrees,
            "modulo_frame_median": float(np.median(self.modulo_frame)),
            "modulo_frame_p90": float(np.percentile(self.modulo_frame, 90)),
            "cpu_s_per_particle_this_round": self.cpu / n,
        }


def refit_round(
    number: int,
    previous: Path,
    particles: Path,
    work: Path,
    *,
    pdb: Path,
    chains: str,
    compare: Path,
    compare_chains: str,
    fit_args: Sequence[str] = (),
    align_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Round:
    """Round ``number`` (2, 3, ...): ``previous`` (the last round's aligned STAR) reconstructed
    into work/round{number-1}.mrc, ``pdb`` fitted into it (work/fitted{number}.pdb, compared
    with ``compare``), its modes, and ``particles`` aligned with them into
    work/aligned_round{number}. Prints each command and the fit's figures."""
    density = work / f"round{number - 1}.mrc"
    # image paths in align's STAR are relative to the directory it ran in (this one)
    cmd = ["relion_reconstruct", "--i", str(previous), "--o", str(density), "--ctf"]
    _, cpu_map, _ = timed(cmd, env)
    print(f"  $ {' '.join(cmd)}  ({cpu_map:.1f} CPU-s)")
    fitted = work / f"fitted{number}.pdb"
    cmd = ["fit", str(pdb), str(density), "--chains", chains, "--keep-frame"]
    cmd += ["--out", str(fitted), "--compare", str(compare), "--compare-chains", compare_chains]
    cmd += ["--overwrite", *fit_args]
    _, cpu_fit, _ = timed([*CLI, *cmd], env)
    fit = json.loads((work / f"fitted{number}_fit.json").read_text())
    print(
        f"  $ deephemnma {' '.join(cmd)}\n  fit: correlation {fit['correlation_start']:.3f} -> "
        f"{fit['correlation']:.3f}, Cα RMSD to {compare.name} {fit['compare']['rmsd_before']:.2f}"
        f" -> {fit['compare']['rmsd_after']:.2f} Å, turned "
        f"{fit['keep_frame']['rotation_degrees']:.2f}° back to {pdb.name}'s frame "
        f"({cpu_fit:.1f} CPU-s)"
    )
    modes = work / f"fitted{number}.npz"
    _, cpu_modes, _ = timed([*CLI, "modes", str(fitted), "--out", str(modes), "--overwrite"], env)
    out = work / f"aligned_round{number}"
    cmd = ["align", str(particles), "--modes", str(modes), "--use-modes", "7,8,9"]
    cmd += ["--out", str(out), "--overwrite", *align_args]
    wall_align, cpu_align, _ = timed([*CLI, *cmd], env)
    print(f"  $ deephemnma {' '.join(cmd)}  ({cpu_align:.1f} CPU-s)")
    star = out / "particles.star"
    table = read_particles(star)
    assert table.rotation_matrices is not None
    truth = true_rotations(table)
    turn, left = frame_offset(table.rotation_matrices, truth)
    return Round(
        number,
        star,
        table,
        fit,
        angle_between_rotations_degrees(table.rotation_matrices, truth),
        turn,
        left,
        cpu_map,
        cpu_fit,
        cpu_modes,
        cpu_align,
        wall_align,
    )
