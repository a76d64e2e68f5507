"""The conformational space of particles: PCA of amplitudes, groups, subsets, models, report.

PARTICLES carries _dhnAmplitude<mode> columns (from `deephemnma align` or `predict`; the
_dhnSource column tells HEMNMA and network particles apart, both are used). Writes into DIR:
  particles.star / .cs    every particle with _dhnPC1, _dhnPC2(, _dhnPC3) and _dhnGroup
  pca.npz                 the fitted space (--space projects new particles into it)
  groups/group_NN.star/.cs and group_NN_reconstruct.sh (the relion_reconstruct command);
                          with --subset-poses trusted (the default) only particles whose
                          poses are trusted (_dhnTrusted 1: HEMNMA's, and the network's that
                          pass --min-confidence / --max-cost); the others in untrusted.star
  selection.star/.cs      with --box / --polygon / --select
  models/                 with --modes: each group's centroid model (PDB + mmCIF), PC-axis
                          trajectories (multi-model PDB) and view.cxc for ChimeraX
  pc_space.png, amplitudes.png (, errors.png with ground truth), report.md

Groups: --groups bins (default: quasi-uniform bins along PC1 with at least --min-count
particles each, the paper's rule; the paper used 900), kmeans or gmm (--n-groups), or none.

Examples:
  deephemnma analyze predicted/particles.star --modes modes.npz --out space
  deephemnma analyze predicted/particles.star --groups kmeans --n-groups 5 --out space
  deephemnma analyze p.star --select "PC1 > 0 and A7 < 10" --out space
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ..api import _analyze

__all__ = ["add_args", "main", "trusted_poses"]


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``deephemnma analyze``."""
    p = parser.add_argument
    p("particles", type=Path, help="STAR or .cs with _dhnAmplitude<mode> columns")
    p("--out", type=Path, required=True, help="output folder")
    p(
        "--overwrite",
        action="store_true",
        help="replace an existing --out folder that this command did not write",
    )
    p("--modes", type=Path, default=None, help="modes .npz, for centroid models and trajectories")
    p("--components", type=int, choices=[2, 3], default=2)
    p("--space", type=Path, default=None, help="project into this saved pca.npz instead of fitting")
    p("--groups", choices=["bins", "kmeans", "gmm", "none"], default="bins")
    p(
        "--min-count",
        type=int,
        default=None,
        help="smallest group for bins (default: a fifth of the particles, at least 10)",
    )
    p("--n-groups", type=int, default=4, help="clusters for kmeans / gmm (4)")
    p("--exclude-tails", type=float, default=0.0, help="fraction left out at each PC1 end")
    p(
        "--subset-poses",
        choices=["trusted", "all"],
        default="trusted",
        help="group subsets and the selection hold only particles with trusted poses (default: "
        "HEMNMA's, and the network's that pass --min-confidence and --max-cost) or all",
    )
    p(
        "--min-confidence",
        type=float,
        default=0.5,
        help="network particles need this pose confidence (_dhnConfidence) to be trusted (0.5)",
    )
    p(
        "--max-cost",
        default="auto",
        help="network particles need a _dhnCost at most this to be trusted (a number, auto: "
        "the 99th percentile of the HEMNMA particles' costs, or none)",
    )
    p("--box", default=None, help="selection box, e.g. PC1:-1:1,PC2:0:5 (also A7:..)")
    p("--polygon", default=None, help="selection polygon in PC1-PC2: x1,y1;x2,y2;x3,y3")
    p("--select", default=None, help="selection expression, e.g. 'PC1 > 0 and A7 < 10'")
    p("--frames", type=int, default=10, help="frames of each PC-axis trajectory (10)")
    p("--training", type=Path, default=None, help="training folder: its curves go in the report")
    p("--relion-version", choices=["3.0", "3.1"], default="3.1")
    p("--seed", type=int, default=0)


def trusted_poses(extra: Any, args: argparse.Namespace) -> tuple[np.ndarray, str]:
    """`deephemnma_bridge.api._analyze.trusted_poses` with ``--min-confidence`` and
    ``--max-cost`` from ``args``."""
    return _analyze.trusted_poses(extra, min_confidence=args.min_confidence, max_cost=args.max_cost)


def main(args: argparse.Namespace) -> int:
    """Analyse (`deephemnma_bridge.api.analyze`); return 0."""
    from ..api import analyze

    analyze(
        args.particles,
        out=args.out,
        modes=args.modes,
        n_components=args.components,
        space=args.space,
        groups=args.groups,
        min_count=args.min_count,
        n_groups=args.n_groups,
        exclude_tails=args.exclude_tails,
        subset_poses=args.subset_poses,
        min_confidence=args.min_confidence,
        max_cost=args.max_cost,
        box=args.box,
        polygon=args.polygon,
        select=args.select,
        frames=args.frames,
        training=args.training,
        relion_version=args.relion_version,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    return 0
