"""HEMNMA alignment: mode amplitudes, orientation and shifts of every particle image.

PARTICLES is a RELION STAR or cryoSPARC .cs file; the reference (network nodes, modes and the
atoms that move with them) comes from a modes file written by `deephemnma modes` or
`deephemnma simulate`. Writes DIR/particles.star and DIR/particles.cs with rlnAngleRot/Tilt/Psi,
rlnOriginXAngst/YAngst, _dhnAmplitude<mode> per mode and _dhnCost (1 - NCC; NaN with
_dhnConverged 0 for a particle that failed), every other column kept, and DIR/alignment.json.

--use-modes auto (the default) takes the --n-auto-modes lowest flexible modes whose
collectivity is at least --min-collectivity, skipping local modes (one loop moving); the table
of modes, chosen or not, is printed and kept in alignment.json. --symmetry Cn/Dn (RELION's
axes: n-fold along z, the Dn 2-fold along x; the model's own axes when it is symmetric about
others; a pseudo-symmetric complex, whose copies differ, is accepted) folds every pose onto the
representative nearest the identity among its equivalents A g; the amplitudes are not changed
(they refer to the copy the pose found). With --symmetry-search the search also tries the
equivalent poses of each particle's best candidate, each with the amplitudes mapped onto that
copy, and keeps the best fit: the motion breaks the symmetry, so only one copy's amplitudes are
right (7PBL, up to 8 Å RMS: r 0.942 / 0.971 / 0.894 -> 0.999 / 0.991 / 0.995, for 1.4x the
CPU).

Long runs checkpoint into DIR.partial/ every --checkpoint-every particles: rerun the same
command to resume. Shard across processes or machines with torchrun, e.g.
  torchrun --nproc_per_node 2 -m deephemnma_bridge.cli align particles.star --modes m.npz --out a
(each rank aligns a slice; rank 0 merges the results in input order).

Examples:
  deephemnma align sim/particles.star --modes sim/modes.npz --out aligned
  deephemnma align run_data.star --modes modes.npz --poses local --outliers 3.2 --out aligned
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..api._align import (
    MAX_FINAL_ATOMS,
    build_reference,
    choose_modes,
    cpu_threads,
    mode_table_lines,
    symmetry_group,
)
from ..errors import InputError
from ..nma.modes import parse_mode_numbers

__all__ = [
    "MAX_FINAL_ATOMS",
    "add_args",
    "build_reference",
    "choose_modes",
    "cpu_threads",
    "main",
    "symmetry_group",
]


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _use_modes(text: str) -> str | list[int]:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return parse_mode_numbers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _symmetry(text: str) -> str:
    from ..symmetry import parse_symmetry

    try:
        kind, n = parse_symmetry(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return f"{kind}{n}"


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``deephemnma align``."""
    p = parser.add_argument
    p("particles", type=Path, help="RELION .star or cryoSPARC .cs")
    p("--modes", type=Path, required=True, help="modes .npz (deephemnma modes / simulate)")
    p(
        "--use-modes",
        type=_use_modes,
        default="auto",
        help="mode numbers (e.g. 7,8,9 or 7-12), or auto (default): the --n-auto-modes lowest "
        "flexible modes with a collectivity >= --min-collectivity",
    )
    p(
        "--min-collectivity",
        type=float,
        default=None,
        help="collectivity threshold of auto; explicit modes below it are warned about "
        "(default 0.2)",
    )
    p("--n-auto-modes", type=int, default=None, help="modes auto takes (3)")
    p(
        "--symmetry",
        type=_symmetry,
        default="C1",
        help="point group Cn or Dn of a (pseudo-)symmetric reference: the poses written are "
        "folded onto one asymmetric unit (default C1: none)",
    )
    p(
        "--symmetry-search",
        action="store_true",
        help="with --symmetry: also try the equivalent poses of each particle's best candidate "
        "(each with its copy's amplitudes) and keep the best fit; for complexes whose motion "
        "breaks the symmetry (about 1.4x the CPU)",
    )
    p("--out", type=Path, required=True, help="output folder")
    p(
        "--overwrite",
        action="store_true",
        help="replace an existing --out folder that this command did not write",
    )
    p(
        "--template",
        choices=["residues", "nodes", "atoms"],
        default="residues",
        help="search and first-stage template: residue blobs (default), nodes or atoms",
    )
    p(
        "--final-template",
        choices=["atoms", "same"],
        default="atoms",
        help="last-stage template: every atom (default, when the modes file has them) or the same",
    )
    p(
        "--deformation",
        choices=["linear", "nonlinear"],
        default="linear",
        help="linear: node i moves by sum q u_i (default); nonlinear: each node follows the "
        "local rotation of its neighbourhood (large hinge motions; same amplitudes when small)",
    )
    p("--sigma", type=float, default=2.0, help="template Gaussian width, Å (default 2)")
    p("--working-size", type=int, default=128, help="images Fourier-cropped to this (128)")
    p(
        "--poses",
        choices=["search", "local", "fixed"],
        default="search",
        help="search: global search; local: refine from the file's poses; fixed: keep them",
    )
    p("--search-step", type=float, default=10.0, help="SO(3) grid step, degrees (10)")
    p("--search-resolution", type=float, default=10.0, help="global-search band, Å (10)")
    p("--max-shift", type=float, default=6.0, help="shift search range, working px (6)")
    p("--candidates", type=int, default=3, help="rigid-search orientations refined (3)")
    p(
        "--elastic-range",
        type=float,
        default=8.0,
        help="elastic search: deformed references up to this RMS displacement, Å (8; 0: off)",
    )
    p(
        "--elastic-spacing",
        type=float,
        default=4.0,
        help="elastic search grid spacing, Å RMS per mode (4; widened to keep <= 48 shapes)",
    )
    p(
        "--elastic-candidates",
        type=int,
        default=2,
        help="orientations of the deformed references kept for refinement (2)",
    )
    p(
        "--screen-steps",
        type=int,
        default=10,
        help="candidates screened by this many steps at the first band; only the best of each "
        "particle is refined in full (10; 0: every candidate gets the full band)",
    )
    p(
        "--screen-resolution",
        type=float,
        default=10.0,
        help="band of the screening steps, Å (10; the template merged into at most 1,500 "
        "blobs, as the rigid search's)",
    )
    p(
        "--population-search",
        type=int,
        default=0,
        metavar="K",
        help="second search of each batch with the reference deformed to K centres of the "
        "amplitudes its better-fitting half found; each particle keeps the better pass "
        "(large motions; about doubles the cost; 0: off, the default)",
    )
    p(
        "--amplitude-step",
        type=_floats,
        default=[0.25, 0.1],
        help="Adam step of the amplitudes per band, Å RMS displacement (0.25,0.1)",
    )
    p(
        "--max-rounds",
        type=int,
        default=5,
        help="rounds per band for particles still moving at the band's capacity (5)",
    )
    p("--refine-resolution", type=_floats, default=[7.0, 4.0], help="two bands, Å (7,4)")
    p("--iterations", type=_ints, default=[40, 25], help="Adam steps per band (40,25)")
    p(
        "--amplitude-starts",
        type=_floats,
        default=[0.0],
        help="starting amplitudes of the first mode, Å (default 0)",
    )
    p(
        "--ctf",
        choices=["full", "flip"],
        default="full",
        help="full: CTF in the template (default); flip: phase-flipped images (reference)",
    )
    p(
        "--outliers",
        type=float,
        default=None,
        metavar="T",
        help="flag particles whose amplitudes' Mahalanobis distance exceeds T (e.g. 3.2)",
    )
    p("--batch-size", type=int, default=64, help="particles aligned at once (64)")
    p("--checkpoint-every", type=int, default=512, help="particles between checkpoints")
    p(
        "--restart",
        action="store_true",
        help="discard an unfinished earlier run (OUT.partial) instead of resuming it",
    )
    p("--relion-version", choices=["3.0", "3.1"], default="3.1", help="STAR flavour")
    p("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    p(
        "--threads",
        type=int,
        default=0,
        help="CPU threads (0: torch's default, or 1 when the machine is already busy)",
    )


def _print_mode_table(table: list[dict[str, Any]], threshold: float) -> None:
    print("\n".join(mode_table_lines(table, threshold)))


def main(args: argparse.Namespace) -> int:
    """Align (`deephemnma_bridge.api.align`); return 0."""
    from ..api import align

    align(
        args.particles,
        args.modes,
        out=args.out,
        use_modes=args.use_modes,
        min_collectivity=args.min_collectivity,
        n_auto_modes=args.n_auto_modes,
        symmetry=args.symmetry,
        symmetry_search=args.symmetry_search,
        template=args.template,
        final_template=args.final_template,
        deformation=args.deformation,
        sigma_angstrom=args.sigma,
        working_size_px=args.working_size,
        poses=args.poses,
        search_step_degrees=args.search_step,
        search_resolution_angstrom=args.search_resolution,
        max_shift_px=args.max_shift,
        n_candidates=args.candidates,
        elastic_range_angstrom=args.elastic_range,
        elastic_spacing_angstrom=args.elastic_spacing,
        elastic_candidates=args.elastic_candidates,
        screen_steps=args.screen_steps,
        screen_resolution_angstrom=args.screen_resolution,
        population_search=args.population_search,
        amplitude_step_angstrom=args.amplitude_step,
        max_rounds=args.max_rounds,
        refine_resolution_angstrom=args.refine_resolution,
        iterations=args.iterations,
        amplitude_starts_angstrom=args.amplitude_starts,
        ctf=args.ctf,
        outliers=args.outliers,
        batch_size=args.batch_size,
        checkpoint_every=args.checkpoint_every,
        restart=args.restart,
        overwrite=args.overwrite,
        relion_version=args.relion_version,
        device=args.device,
        threads=args.threads,
    )
    return 0
