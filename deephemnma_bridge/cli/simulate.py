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
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..device import resolve_device
from ..errors import InputError
from ..fileutils import atomic_dir, check_output_dir
from ..progress import progress
from ..simulate import (
    Conformation,
    SimulationConfig,
    SimulationModel,
    SimulationStats,
    check_simulation,
    draw_truth,
    place_conformation,
    project_displacement,
    simulate_images,
    simulation_table,
)

__all__ = ["add_args", "main"]


def _mode_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected mode numbers like 7,8,9, got {text!r}"
        ) from None
    if not values or min(values) < 1 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"mode numbers must be distinct and >= 1, got {text!r}")
    return values


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
    p("--use-modes", type=_mode_list, default=[7, 8, 9], help="mode numbers (default 7,8,9)")
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


def _load_modes(args: argparse.Namespace) -> tuple[Any, NDArray[Any] | None, NDArray[Any] | None]:
    """NormalModes, heavy-atom coordinates and atom -> node map (None when not available)."""
    from ..nma import NormalModes, compute_normal_modes
    from ..nma.modes import DEFAULT_CUTOFF_ANGSTROM

    if args.modes is not None:
        if not args.modes.exists():
            raise InputError(f"--modes {args.modes}: no such file")
        modes = NormalModes.load(args.modes)
        atoms = getattr(modes, "atom_coordinates", None)
        owner = getattr(modes, "atom_node", None)
        return modes, atoms, owner
    from ..adapters.structure import read_structure
    from ..coarse_grain import coarse_grain
    from ..data import default_model_path

    path = args.model if args.model is not None else default_model_path()
    if not Path(path).exists():
        raise InputError(f"--model {path}: no such file")
    model = read_structure(path)
    cg = coarse_grain(model)
    n_dof = 3 * len(cg.coordinates_angstrom)
    if max(args.use_modes) > n_dof:
        raise InputError(
            f"--use-modes {max(args.use_modes)}: the model's network has only "
            f"{n_dof} modes ({n_dof // 3} nodes)"
        )
    modes = compute_normal_modes(
        cg.coordinates_angstrom,
        n_modes=max(20, max(args.use_modes)),
        cutoff_angstrom=DEFAULT_CUTOFF_ANGSTROM["ca"],
        settings={"model": str(path), "nodes": "ca"},
    )
    heavy = np.array([str(e).upper() not in ("H", "D") for e in model.elements])
    atoms = np.asarray(model.coordinates_angstrom)[heavy]
    owner = np.asarray(cg.atom_node)[heavy]
    fields = {f.name for f in dataclasses.fields(modes)}
    extra = {
        k: v
        for k, v in (
            ("atom_coordinates", atoms),
            ("atom_node", owner),
            ("atom_elements", np.asarray(model.elements)[heavy]),
        )
        if k in fields
    }
    return dataclasses.replace(modes, **extra), atoms, owner


def _load_conformation(args: argparse.Namespace, modes: Any) -> Conformation:
    """Read --conformation, match its nodes in order with the modes' nodes, place it."""
    from ..adapters.structure import read_structure
    from ..coarse_grain import coarse_grain

    path = Path(args.conformation)
    if not path.exists():
        raise InputError(f"--conformation {path}: no such file")
    chains = [c for c in (args.conformation_chains or "").split(",") if c] or None
    other = read_structure(path, chains=chains)
    nodes = modes.settings.get("nodes", "ca")
    cg = coarse_grain(other, nodes=nodes if nodes in ("ca", "heavy") else "ca")
    ref = np.asarray(modes.coordinates, dtype=np.float64)
    if len(cg) != len(ref):
        raise InputError(
            f"--conformation {path}: {len(cg)} network nodes, the modes' network has {len(ref)}; "
            "they are matched in order, so select the same chains (--conformation-chains) and "
            "residues"
        )
    if args.render == "atoms":
        points, owner = np.asarray(other.coordinates_angstrom), np.asarray(cg.atom_node)
    else:
        points, owner = np.asarray(cg.coordinates_angstrom), np.arange(len(cg))
    conf = place_conformation(
        ref,
        cg.coordinates_angstrom,
        points,
        owner,
        superpose_nodes=args.conformation_frame == "superpose",
    )
    return conf


def _conformation_info(
    args: argparse.Namespace, modes: Any, model: SimulationModel, conf: Conformation
) -> dict[str, Any]:
    """What simulation.json records about --conformation; printed in short.

    ``fraction_carried`` is ``|U q|^2 / |d|^2`` (squared displacement), ``fraction_of_norm_carried``
    its square root (``|U q| / |d|``)."""
    displacement = conf.node_coordinates - np.asarray(modes.coordinates, dtype=np.float64)
    q, per_mode, carried = project_displacement(model.modes, displacement)
    flexible = np.asarray(modes.vectors)[np.asarray(modes.mode_numbers) > 6]
    everything = project_displacement(flexible, displacement)[2] if len(flexible) else 0.0
    numbers = [int(m) for m in model.mode_numbers]
    info = {
        "path": str(args.conformation),
        "chains": args.conformation_chains,
        "frame": "superposed on the modes' nodes (Kabsch)" if conf.superposed else "as given",
        "matching": "nodes in order",
        "n_nodes": len(conf.node_coordinates),
        "n_rendered_points": len(conf.render_coordinates),
        "node_rmsd_as_given_angstrom": conf.rmsd_as_given,
        "node_rmsd_angstrom": conf.rmsd_angstrom,
        "superposition_rotation": conf.rotation.tolist(),
        "superposition_translation_angstrom": conf.translation.tolist(),
        "displacement": "other - reference nodes, Å, in the modes' frame",
        "amplitude_unit": "q displaces node i by q u_i Å (u unit-norm over 3N)",
        "projection": {str(m): float(v) for m, v in zip(numbers, q)},
        "fraction_per_mode": {str(m): float(v) for m, v in zip(numbers, per_mode)},
        "fraction_carried": carried,
        "fraction_of_norm_carried": float(np.sqrt(carried)),
        "fraction_carried_by_all_flexible_modes_in_file": everything,
        "rms_displacement_carried_angstrom": float(model.rms_displacement(q)),
    }
    print(
        f"conformation {args.conformation}: {len(conf.node_coordinates)} nodes matched in order, "
        f"Cα/P RMSD {conf.rmsd_angstrom:.3f} Å "
        + ("after superposition" if conf.superposed else "as given")
        + f"; projection on modes {', '.join(f'{m}: {v:.2f}' for m, v in zip(numbers, q))} "
        f"carries {100 * carried:.1f} % of the squared displacement "
        f"({100 * np.sqrt(carried):.1f} % of its norm)"
    )
    return info


def _save_modes(modes: Any, path: Path, centre: NDArray[np.float64]) -> None:
    """Save the modes with coordinates (and atom coordinates) centred on the rotation centre."""
    changes: dict[str, Any] = {"coordinates": np.asarray(modes.coordinates) - centre}
    atoms = getattr(modes, "atom_coordinates", None)
    if atoms is not None:
        changes["atom_coordinates"] = np.asarray(atoms) - centre
    dataclasses.replace(modes, **changes).save(path)


def check_room_for_output(out: Path, config: SimulationConfig) -> None:
    """Refuse before any work when the stack cannot fit on the disk or the ground truth in memory.

    Disk: the float32 stack plus ~1 kB of STAR/.cs per particle. Memory: the drawn truth
    (rotation, shifts, amplitudes, CTF: ~0.5 kB per particle, generously) must fit in half of
    the memory available now.
    """
    from ..errors import InputError

    n = config.n_particles
    disk = n * (4 * config.box_size_px**2 + 1024) + 1024
    memory = n * 512
    folder = out.absolute().parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if disk > free:
        raise InputError(
            f"--n {n}: the stack and tables need about {disk / 1e9:.1f} GB but {folder} has "
            f"{free / 1e9:.1f} GB free; simulate fewer particles or write elsewhere"
        )
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this platform
        return
    if memory > available // 2:
        raise InputError(
            f"--n {n}: the ground truth alone needs about {memory / 1e9:.1f} GB of memory and "
            f"{available / 1e9:.1f} GB is available; simulate fewer particles per run"
        )


def main(args: argparse.Namespace) -> int:
    """Run the simulation; return 0."""
    import torch

    from ..adapters import write_particles
    from ..adapters.images import StackWriter

    sigma = args.sigma if args.sigma is not None else (1.0 if args.render == "atoms" else 2.0)
    max_rms = args.max_rms
    if max_rms is None:
        max_rms = 0.0 if args.conformation is not None else 3.0
    config = SimulationConfig(
        n_particles=args.n,
        box_size_px=args.box,
        pixel_size_angstrom=args.pixel_size,
        snr=args.snr,
        noise_before_ctf_fraction=args.noise_before_ctf,
        amplitudes=args.amplitudes,
        max_rms_displacement_angstrom=max_rms,
        helix_turns=args.helix_turns,
        n_clusters=args.clusters,
        shift_range_px=args.shift_range,
        voltage_kv=args.voltage,
        spherical_aberration_mm=args.cs,
        amplitude_contrast=args.amplitude_contrast,
        defocus_angstrom=args.defocus,
        defocus_spread_angstrom=args.defocus_spread,
        protocol=args.protocol,
        sigma_angstrom=sigma,
        seed=args.seed,
        chunk_size=max(1, args.chunk_size),
    )
    inputs = tuple(x for x in (args.modes, args.model, args.conformation) if x is not None)
    check_output_dir(args.out, command="simulate", inputs=inputs, overwrite=args.overwrite)
    check_room_for_output(args.out, config)
    device = resolve_device(args.device)
    modes, atoms, owner = _load_modes(args)
    if args.render == "atoms" and (atoms is None or owner is None):
        raise InputError(
            f"the modes file {args.modes} has no atom coordinates to render; use "
            "--render nodes, or omit --modes to compute modes from --model"
        )
    conf = _load_conformation(args, modes) if args.conformation is not None else None
    if conf is None:
        model = SimulationModel.from_arrays(
            np.asarray(modes.coordinates),
            np.asarray(modes.vectors),
            np.asarray(modes.mode_numbers),
            args.use_modes,
            atom_coordinates=atoms if args.render == "atoms" else None,
            atom_node=owner if args.render == "atoms" else None,
        )
    else:
        model = SimulationModel.from_arrays(
            np.asarray(modes.coordinates),
            np.asarray(modes.vectors),
            np.asarray(modes.mode_numbers),
            args.use_modes,
            atom_coordinates=conf.render_coordinates,
            atom_node=conf.render_node,
            conformation_nodes=conf.node_coordinates,
        )
    conformation_info = None if conf is None else _conformation_info(args, modes, model, conf)
    truth = draw_truth(config, model)
    check_simulation(config, model, truth)
    stats = SimulationStats()
    with (
        torch.no_grad(),
        atomic_dir(args.out, command="simulate", inputs=inputs, overwrite=args.overwrite) as tmp,
    ):
        with StackWriter(
            tmp / "particles.mrcs",
            box_size_px=config.box_size_px,
            pixel_size_angstrom=config.pixel_size_angstrom,
        ) as writer:
            bar = progress(config.n_particles, desc="simulate")
            for chunk in simulate_images(config, model, truth, device=device):
                writer.append(chunk.images)
                stats.add(chunk)
                bar.update(len(chunk.images))
            bar.close()
        table = simulation_table(config, model, truth, "particles.mrcs")
        write_particles(table, tmp / "particles.star")
        write_particles(table, tmp / "particles.cs")
        _save_modes(modes, tmp / "modes.npz", model.centre_angstrom)
        measured = stats.summary()
        info = {
            "settings": dataclasses.asdict(config),
            "use_modes": list(args.use_modes),
            "render": args.render,
            "amplitude_scale": truth.amplitude_scale,
            "rotation_centre_angstrom": model.centre_angstrom.tolist(),
            "images_phase_flipped": config.protocol == "paper",
            "measured": measured,
        }
        if conformation_info is not None:
            info["conformation"] = conformation_info
        (tmp / "simulation.json").write_text(json.dumps(info, indent=2) + "\n")
    where = (
        f" (requested {config.snr:g} at {config.render_box_px} px before cropping)"
        if config.protocol == "paper"
        else ""
    )
    print(
        f"wrote {config.n_particles} particles to {args.out}: measured SNR whole box "
        f"{measured['snr_whole']:.3g}{where}, below 10 Å {measured['snr_10A']:.3g}, "
        f"below 7 Å {measured['snr_7A']:.3g}"
    )
    return 0
