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
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..fileutils import check_output_file

MAP_SUFFIXES = (".mrc", ".map", ".ccp4", ".rec")


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


def _model_from_map(args: argparse.Namespace) -> Any:
    from ..adapters.maps import read_map
    from ..adapters.structure import write_models
    from ..pseudoatoms import pseudoatoms

    density = read_map(args.model)
    mask = None
    if args.mask is not None:
        mask_map = read_map(args.mask)
        if mask_map.data.shape != density.data.shape:
            raise InputError(
                f"--mask {args.mask}: shape {mask_map.data.shape} differs from the map's "
                f"{density.data.shape}"
            )
        mask = mask_map.data > 0.5
    out = args.pseudoatoms_out or args.out.with_name(args.out.stem + "_pseudoatoms.cif")
    check_output_file(out, overwrite=args.overwrite, option="--pseudoatoms-out")
    atoms = pseudoatoms(
        density,
        threshold=args.threshold,
        mask=mask,
        target_error=args.target_error,
        sigma_voxels=args.sigma,
        progress=lambda n, e: print(f"  pseudoatoms: {n:7d} atoms, error {e:.4f}", file=sys.stderr),
    )
    model = atoms.as_model(name=args.model.stem)
    write_models(out, model)
    # RELION's rotation centre of a map is voxel N//2 of each axis; particles extracted with
    # this map as reference share its box
    nz, ny, nx = density.data.shape
    centre = density.origin_angstrom + np.array([nx // 2, ny // 2, nz // 2]) * np.asarray(
        density.voxel_size_angstrom
    )
    args.map_geometry = {
        "map_centre_angstrom": centre.tolist(),
        "map_box_angstrom": float(nx * density.voxel_size_angstrom[0]),
    }
    print(
        f"{len(atoms)} pseudoatoms (sigma {atoms.sigma_angstrom:.2f} Å, threshold "
        f"{atoms.threshold:.4g}, error {atoms.error:.3f}) written to {out}"
    )
    return model


def main(args: argparse.Namespace) -> int:
    """Compute, save and print the modes; return 0."""
    from ..adapters.structure import read_structure, write_models
    from ..coarse_grain import coarse_grain
    from ..data import default_model_path
    from ..fileutils import check_not_input, check_output_dir
    from ..nma import compute_normal_modes, deform_atoms
    from ..nma.modes import (
        DEFAULT_CUTOFF_ANGSTROM,
        DEFAULT_MIN_COLLECTIVITY,
        DEFAULT_N_AUTO_MODES,
        select_collective_modes,
    )

    path = args.model if args.model is not None else default_model_path()
    args.model = Path(path)
    check_not_input(args.out, args.model)
    check_output_file(args.out, overwrite=args.overwrite, option="--out")
    if args.animate is not None:
        check_output_dir(
            args.animate, command="modes", inputs=[args.model], overwrite=args.overwrite
        )
    if args.out.suffix != ".npz":
        raise InputError(f"--out {args.out}: the modes file must end in .npz")
    if args.frames < 2:
        raise InputError(f"--frames must be at least 2, got {args.frames}")
    is_map = args.model.suffix.lower() in MAP_SUFFIXES
    if is_map:
        model = _model_from_map(args)
    else:
        chains = [c for c in args.chains.split(",") if c] if args.chains else None
        model = read_structure(args.model, chains=chains)
    cg = coarse_grain(model, nodes=args.nodes, mass_weighted=args.mass_weighted)
    pseudo = bool(np.all(model.polymer_kind == "pseudo"))
    cutoff: float | str | None = args.cutoff
    floor = 0.0
    if cutoff is None and args.cutoff_percentile is None:
        # auto: 15 Å (Cα/P) or 8 Å (heavy atoms), raised only where the network needs it
        cutoff, floor = "auto", 0.0 if pseudo else DEFAULT_CUTOFF_ANGSTROM[args.nodes]
    rtb = args.rtb_block if args.rtb_block is not None else (10 if len(cg) > 20_000 else 0)
    if rtb < 0:
        raise InputError(f"--rtb-block must be >= 0, got {rtb}")
    modes = compute_normal_modes(
        cg.coordinates_angstrom,
        n_modes=args.n_modes,
        cutoff_angstrom=cutoff,  # type: ignore[arg-type]
        cutoff_percentile=args.cutoff_percentile or 95.0,
        cutoff_floor_angstrom=floor,
        method="rtb" if rtb else args.method,
        blocks=cg.blocks(rtb) if rtb else None,
        masses=cg.masses if args.mass_weighted else None,
        settings={
            "model": str(args.model),
            "nodes": "pseudoatoms" if pseudo else args.nodes,
            "chains": args.chains,
            "rtb_residues_per_block": rtb or None,
            **getattr(args, "map_geometry", {}),
        },
    )
    heavy = np.asarray([str(e).upper() not in ("H", "D") for e in model.elements])
    owner = np.asarray(cg.atom_node)
    if not pseudo:
        import dataclasses

        modes = dataclasses.replace(
            modes,
            atom_coordinates=np.asarray(model.coordinates_angstrom)[heavy],
            atom_node=owner[heavy],
            atom_elements=np.asarray(model.elements, dtype=str)[heavy],
        )
    modes.save(args.out)
    s = modes.settings
    if floor and s["cutoff_angstrom"] > floor * 1.0001:
        print(
            f"note: the cutoff was raised from {floor:g} Å to {s['cutoff_angstrom']:.2f} Å: "
            "below that the network has loose parts (set --cutoff to override)"
        )
    print(
        f"{len(cg)} nodes, cutoff {s['cutoff_angstrom']:.2f} Å, {s['n_springs']} springs, "
        f"solver {s['method']}, {s['seconds']:.2f} s -> {args.out}"
    )
    try:  # what `align --use-modes auto` (the default) takes with its default settings
        auto = select_collective_modes(modes.mode_numbers, modes.collectivity)
    except InputError:
        auto = []
    print(f"{'mode':>5} {'eigenvalue':>12} {'collectivity':>12}")
    for m, ev, c in zip(modes.mode_numbers, modes.eigenvalues, modes.collectivity):
        low = f"  (local: collectivity < {DEFAULT_MIN_COLLECTIVITY:g})"
        tag = (
            "  rigid body"
            if m <= 6
            else ("  auto" if m in auto else low if c < DEFAULT_MIN_COLLECTIVITY else "")
        )
        print(f"{m:5d} {ev:12.5g} {c:12.3f}{tag}")
    if auto:
        print(f"align --use-modes auto (the default) takes modes {','.join(map(str, auto))}")
    else:
        print(
            f"fewer than {DEFAULT_N_AUTO_MODES} flexible modes have a collectivity >= "
            f"{DEFAULT_MIN_COLLECTIVITY:g}: give align --use-modes or compute more --n-modes"
        )
    if args.animate is not None:
        from ..fileutils import claim_output_dir

        claim_output_dir(
            args.animate, command="modes", inputs=[args.model], overwrite=args.overwrite
        )
        suffix = ".cif" if len(model) > 99_999 else ".pdb"
        q = args.amplitude * np.sqrt(len(cg))  # RMS displacement |q| / sqrt(N)
        steps = np.linspace(-q, q, args.frames)
        for k, m in enumerate(modes.mode_numbers):
            if m <= 6:
                continue
            frames = deform_atoms(
                model.coordinates_angstrom,
                owner,
                cg.coordinates_angstrom,
                modes.vectors[k : k + 1],
                steps[:, None],
            )
            write_models(args.animate / f"mode_{m:03d}{suffix}", model, list(frames))
        print(f"animations of modes 7-{modes.mode_numbers[-1]} written to {args.animate}")
    return 0
