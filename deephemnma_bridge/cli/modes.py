"""Compute the normal modes of an atomic model or an EM map (elastic network, ANM or RTB).

MODEL is a PDB/mmCIF file (one node per residue by default: Cα / P) or an MRC map, which is
first approximated by Gaussian pseudoatoms (written next to the modes, readable by gemmi).
Without MODEL, the bundled adenylate kinase (4AKE chain A) is used.

Writes one .npz (coordinates, eigenvalues, vectors, mode_numbers, collectivity, settings) and
prints a table of the modes. --animate DIR writes one multi-model file per flexible mode
(the model moved from -A to +A, --frames frames), which ChimeraX plays as a trajectory:
  open mode_007.pdb coordsets true

Examples:
  deephemnma modes 4ake.pdb --chains A --out modes.npz --animate anim
  deephemnma modes big.cif --rtb-block 10 --out modes.npz
  deephemnma modes emd_1234.map --threshold 0.02 --out modes.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..api._modes import MAP_SUFFIXES

__all__ = ["MAP_SUFFIXES", "add_args", "main"]


def _cutoff(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Å or 'auto', got {text!r}") from None


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``deephemnma modes``."""
    p = parser.add_argument
    p("model", nargs="?", type=Path, help="PDB/mmCIF model or MRC map (default: bundled 4AKE A)")
    p("--out", type=Path, required=True, help="output .npz")
    p("--overwrite", action="store_true", help="replace an existing --out file / --animate folder")
    p("--nodes", choices=["ca", "heavy"], default="ca", help="Cα/P per residue, or heavy atoms")
    p("--chains", default=None, help="comma-separated chains to keep (default all)")
    p(
        "--cutoff",
        type=_cutoff,
        default=None,
        help="spring cutoff, Å, or 'auto' (default: 15 Å for --nodes ca, 8 Å for heavy, "
        "raised where needed to connect and rigidify the network; auto for maps)",
    )
    p(
        "--cutoff-percentile",
        type=float,
        default=None,
        help="relative cutoff: this percentile of the distances to the 3 nearest neighbours",
    )
    p("--n-modes", type=int, default=20, help="modes incl. the 6 rigid-body ones (default 20)")
    p(
        "--rtb-block",
        type=int,
        default=None,
        help="RTB with this many residues per block (0: full ANM; default: full ANM up to "
        "20,000 nodes, RTB with 10 above)",
    )
    p("--method", choices=["auto", "dense", "sparse"], default="auto", help="full-ANM solver")
    p("--mass-weighted", action="store_true", help="mass-weighted Hessian")
    p("--animate", type=Path, default=None, help="folder for one animation per flexible mode")
    p("--frames", type=int, default=10, help="frames per animation (default 10)")
    p(
        "--amplitude",
        type=float,
        default=3.0,
        help="animation amplitude as RMS displacement, Å (default 3)",
    )
    g = parser.add_argument_group("maps (pseudoatoms)")
    g.add_argument("--threshold", type=float, default=None, help="map level (default: Otsu)")
    g.add_argument("--mask", type=Path, default=None, help="MRC mask (> 0.5 inside)")
    g.add_argument("--target-error", type=float, default=0.05, help="default 0.05")
    g.add_argument("--sigma", type=float, default=1.0, help="Gaussian width, voxels (1)")
    g.add_argument(
        "--pseudoatoms-out", type=Path, default=None, help="default: <out>_pseudoatoms.cif"
    )


def main(args: argparse.Namespace) -> int:
    """Compute, save and print the modes (`deephemnma_bridge.api.compute_modes`); return 0."""
    from ..api import compute_modes

    compute_modes(
        args.model,
        out=args.out,
        n_modes=args.n_modes,
        nodes=args.nodes,
        chains=args.chains,
        cutoff_angstrom=args.cutoff,
        cutoff_percentile=args.cutoff_percentile,
        rtb_block=args.rtb_block,
        method=args.method,
        mass_weighted=args.mass_weighted,
        animate=args.animate,
        frames=args.frames,
        animation_rms_angstrom=args.amplitude,
        threshold=args.threshold,
        mask=args.mask,
        target_error=args.target_error,
        sigma_voxels=args.sigma,
        pseudoatoms_out=args.pseudoatoms_out,
        overwrite=args.overwrite,
    )
    return 0
