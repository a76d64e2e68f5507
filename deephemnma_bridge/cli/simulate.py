"""Simulate particle images with ground truth (the DeepHEMNMA paper's synthetic benchmark).

Renders the reference (default: the bundled adenylate kinase 4AKE chain A) deformed along
normal modes (default 7,8,9, helical trajectory, largest RMS node displacement 3 Å), in
uniformly random orientations (SO(3)), shifted by up to ±5 px, CTF-modulated (200 kV, Cs 2 mm,
Q0 0.1, defocus 5,000 Å), with noise before and after the CTF at the requested SNR (variance of
the noiseless CTF-modulated image over the whole output box / variance of the added noise).
All heavy atoms are rendered, each moving with its residue's node (``--render nodes`` renders
the network nodes instead: the "matched" case).

Writes into DIR (atomically, the whole folder at once): particles.mrcs (streamed in chunks),
particles.star (RELION 3.1, CTF, ground truth in _dhnTrueAmplitude<mode>, _dhnTrueAngleRot/
Tilt/Psi, _dhnTrueOriginXAngst/YAngst; no _rlnAngle*/_rlnOrigin* columns), particles.cs (same),
modes.npz (the modes used, coordinates centred on the rotation centre) and simulation.json
(settings and the measured SNR, also in the bands below 10 Å and 7 Å).

``--conformation OTHER.pdb`` renders another conformation of the molecule (e.g. closed 1AKE)
in the frame of the modes (e.g. open 4AKE's): its Cα/P nodes are matched in order with the
modes' nodes (same count needed: --conformation-chains selects chains), it is superposed on
them (Kabsch; --conformation-frame as-is keeps its coordinates when already superposed on the
modes' model), its atoms move with the matched nodes and it is rotated about the same centre
(the modes' node centroid, written as rotation_centre_angstrom), so `deephemnma align --modes
DIR/modes.npz` sees consistent poses. Amplitudes drawn on top default to none (--max-rms 0).
The Cα RMSD and the projection of its node displacement (other - reference) on each chosen mode
(amplitude q displaces node i by q u_i Å, u unit-norm over 3N) are printed and recorded in
simulation.json ("conformation"); _dhnTrueAmplitude<mode> = projection + drawn amplitude.

``--protocol paper`` renders at twice the box and half the pixel size (256 px, 0.325 Å by
default), defines the SNR there, then phase-flips and Fourier-crops: the images written are then
already phase-flipped.

Example:
  deephemnma simulate --n 2000 --snr 0.1 --seed 1 --out sim1
  deephemnma simulate --modes modes.npz --use-modes 7,8 --render nodes --n 500 --out sim2
  deephemnma modes 4ake.pdb --chains A --out open.npz
  deephemnma simulate --modes open.npz --use-modes 7,8,9,10,11,12 --conformation 1ake.pdb \
      --conformation-chains A --n 500 --out closed_in_open
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..api._simulate import check_room_for_output
from ..nma.modes import parse_mode_numbers

__all__ = ["add_args", "check_room_for_output", "main", "mode_list"]


def mode_list(text: str) -> list[int]:
    """argparse type of a mode list (``7,8,9``, ``7-12``)."""
    try:
        return parse_mode_numbers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``deephemnma simulate``."""
    p = parser.add_argument
    p("--out", required=True, type=Path, metavar="DIR", help="output folder (written atomically)")
    p(
        "--overwrite",
        action="store_true",
        help="replace an existing --out folder that this command did not write",
    )
    p("--model", type=Path, help="PDB/mmCIF reference (default: bundled 4AKE chain A)")
    p("--modes", type=Path, help="modes .npz from `deephemnma modes` (default: computed, ANM)")
    p("--use-modes", type=mode_list, default=[7, 8, 9], help="e.g. 7,8,9 or 7-12 (default 7,8,9)")
    p("--n", type=int, default=1000, help="number of particles (default 1000)")
    p("--box", type=int, default=128, help="box size, px (default 128)")
    p("--pixel-size", type=float, default=0.65, help="pixel size, Å (default 0.65)")
    p("--snr", type=float, default=0.1, help="whole-box SNR at the output size (default 0.1)")
    p(
        "--noise-before-ctf",
        type=float,
        default=0.5,
        help="fraction of the noise variance added before the CTF (default 0.5)",
    )
    p("--amplitudes", choices=["helix", "uniform", "clusters"], default="helix")
    p(
        "--max-rms",
        type=float,
        default=None,
        help="largest RMS node displacement of the amplitude distribution, Å (default 3; 0 "
        "with --conformation)",
    )
    p("--helix-turns", type=float, default=2.0)
    p("--clusters", type=int, default=4, help="number of clusters for --amplitudes clusters")
    p("--shift-range", type=float, default=5.0, help="shifts uniform in ±this, px (default 5)")
    p("--voltage", type=float, default=200.0, help="kV (default 200)")
    p("--cs", type=float, default=2.0, help="spherical aberration, mm (default 2)")
    p("--amplitude-contrast", type=float, default=0.1)
    p("--defocus", type=float, default=5000.0, help="defocus, Å, underfocus > 0 (default 5000)")
    p("--defocus-spread", type=float, default=0.0, help="defocus uniform in ±this, Å")
    p("--protocol", choices=["direct", "paper"], default="direct")
    p("--render", choices=["atoms", "nodes"], default="atoms")
    p(
        "--sigma",
        type=float,
        default=None,
        help="Gaussian sigma of each rendered point, Å (default 1.0 atoms, 2.0 nodes)",
    )
    p(
        "--conformation",
        "--render-model",
        dest="conformation",
        type=Path,
        default=None,
        metavar="FILE",
        help="PDB/mmCIF of another conformation to render in the modes' frame",
    )
    p(
        "--conformation-chains",
        default=None,
        help="comma-separated chains of --conformation to keep (default all)",
    )
    p(
        "--conformation-frame",
        choices=["superpose", "as-is"],
        default="superpose",
        help="superpose --conformation on the modes' nodes (default), or use it as given",
    )
    p("--seed", type=int, default=0)
    p("--chunk-size", type=int, default=256, help="particles rendered at once (default 256)")
    p("--device", default="auto", help="auto (GPU when present), cpu or cuda")


def main(args: argparse.Namespace) -> int:
    """Run the simulation (`deephemnma_bridge.api.simulate`); return 0."""
    from ..api import simulate

    simulate(
        out=args.out,
        model=args.model,
        modes=args.modes,
        use_modes=args.use_modes,
        n_particles=args.n,
        box_px=args.box,
        pixel_size_angstrom=args.pixel_size,
        snr=args.snr,
        noise_before_ctf=args.noise_before_ctf,
        amplitudes=args.amplitudes,
        max_rms_angstrom=args.max_rms,
        helix_turns=args.helix_turns,
        n_clusters=args.clusters,
        shift_range_px=args.shift_range,
        voltage_kv=args.voltage,
        spherical_aberration_mm=args.cs,
        amplitude_contrast=args.amplitude_contrast,
        defocus_angstrom=args.defocus,
        defocus_spread_angstrom=args.defocus_spread,
        protocol=args.protocol,
        render=args.render,
        sigma_angstrom=args.sigma,
        conformation=args.conformation,
        conformation_chains=args.conformation_chains,
        conformation_frame=args.conformation_frame,
        seed=args.seed,
        chunk_size=args.chunk_size,
        device=args.device,
        overwrite=args.overwrite,
    )
    return 0
