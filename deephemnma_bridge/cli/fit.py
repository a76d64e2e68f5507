"""Deform an atomic model into a map along its normal modes (flexible fitting).

For populations far from the reference: HEMNMA's poses degrade when the particles are far from
what the reference's modes can reach (a hinge closing by tens of degrees). Reconstruct that
population (e.g. a group subset written by `analyze`, with `relion_reconstruct`), fit the
reference model into the map, and align the population again with the fitted model's modes:

  deephemnma fit 4ake.pdb group_01.mrc --chains A --out fitted.pdb
  deephemnma modes fitted.pdb --out fitted.npz
  deephemnma align group_01.star --modes fitted.npz --out aligned_fitted

The model's density (Gaussians of 0.225 x resolution) is compared with the map in Fourier
space up to --resolution; the model moves along its flexible modes (following local rotations
by default), rotates and shifts; the modes are recomputed on the deformed model after each
cycle. A last, local stage lets every residue move, held by springs to its neighbours
(--local-restraint; --no-local skips it). Repeating the round (a map of the new poses, fit,
modes, align) improves both again: see the README's "How far HEMNMA reaches". By default the
model's Cα centroid sits on the map's centre (voxel n // 2: how a map reconstructed from
particles aligned against this model is placed); --centre model for a model already placed in
the map. Writes the fitted model and <out stem>_fit.json (correlation per stage).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .simulate import mode_list

__all__ = ["add_args", "main"]


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``deephemnma fit``."""
    p = parser.add_argument
    p("model", type=Path, help="PDB/mmCIF model to deform (e.g. HEMNMA's reference)")
    p("map", type=Path, help="MRC map of the population to fit")
    p("--out", type=Path, required=True, help="fitted model (.pdb or .cif)")
    p("--overwrite", action="store_true", help="replace an existing --out")
    p("--chains", default=None, help="comma-separated chains of the model to keep (default all)")
    p("--resolution", type=float, default=8.0, help="fit band, Å (default 8; the map's or coarser)")
    p("--use-modes", type=mode_list, default=None, help="flexible modes (default 7 to --n-modes)")
    p("--n-modes", type=int, default=20, help="modes computed, incl. 6 rigid-body (default 20)")
    p("--cycles", type=int, default=3, help="fit, then new modes of the fitted model (default 3)")
    p("--iterations", type=int, default=40, help="L-BFGS iterations per stage (default 40)")
    p("--deformation", choices=["nonlinear", "linear"], default="nonlinear")
    p(
        "--centre",
        choices=["map", "model"],
        default="map",
        help="map: model centroid on the map's centre (default); model: placed as it is",
    )
    p("--stiffness", type=float, default=1e-4, help="elastic penalty per Å² RMS (default 1e-4)")
    p(
        "--local-restraint",
        type=float,
        default=0.03,
        help="after the cycles, every node moves freely, held by springs to its neighbours "
        "with this weight per Å² (default 0.03)",
    )
    p("--no-local", action="store_true", help="skip that local refinement (modes only)")
    p(
        "--keep-frame",
        action="store_true",
        help="superpose the fitted model on the starting one (all Cα): poses found with it stay "
        "in the starting model's frame",
    )
    p("--compare", type=Path, default=None, help="known target model: report the Cα RMSD to it")
    p("--compare-chains", default=None, help="chains of --compare")


def main(args: argparse.Namespace) -> int:
    """Fit (`deephemnma_bridge.api.fit_model`); return 0."""
    from ..api import fit_model

    fit_model(
        args.model,
        args.map,
        out=args.out,
        chains=args.chains,
        resolution_angstrom=args.resolution,
        use_modes=args.use_modes,
        n_modes=args.n_modes,
        cycles=args.cycles,
        iterations=args.iterations,
        deformation=args.deformation,
        centre=args.centre,
        stiffness=args.stiffness,
        local_restraint=None if args.no_local else args.local_restraint,
        keep_frame=args.keep_frame,
        compare=args.compare,
        compare_chains=args.compare_chains,
        overwrite=args.overwrite,
    )
    return 0
