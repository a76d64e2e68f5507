"""Simulated particle images with ground truth (the DeepHEMNMA paper's synthetic benchmark)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..device import resolve_device
from ..errors import InputError
from ..fileutils import atomic_dir, check_output_dir
from ..nma import NormalModes
from ..particles import ParticleTable
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
from ._common import (
    Log,
    ModesLike,
    ProgressCallback,
    choice,
    input_files,
    load_modes,
    progress_bar,
    say,
)

__all__ = ["SimulationResult", "check_room_for_output", "simulate"]


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    """What `simulate` wrote.

    Attributes
    ----------
    particles : ParticleTable
        The particles (``out/particles.star``), with the ground truth in
        ``dhnTrueAmplitude<mode>``, ``dhnTrueAngleRot/Tilt/Psi`` and
        ``dhnTrueOriginXAngst/YAngst`` and no poses.
    modes : NormalModes
        The modes used, centred on the rotation centre (``out/modes.npz``): the reference
        for `align`.
    info : dict
        Settings and the measured SNR (``out/simulation.json``).
    out : Path
        The output folder.
    """

    particles: ParticleTable
    modes: NormalModes
    info: dict[str, Any]
    out: Path


def _load_modes(
    modes_in: ModesLike | None, model_in: str | os.PathLike[str] | None, use_modes: list[int]
) -> tuple[Any, NDArray[Any] | None, NDArray[Any] | None]:
    """NormalModes, heavy-atom coordinates and atom -> node map (None when not available)."""
    from ..nma import NormalModes, compute_normal_modes
    from ..nma.modes import DEFAULT_CUTOFF_ANGSTROM

    if modes_in is not None:
        if not isinstance(modes_in, NormalModes) and not Path(modes_in).exists():
            raise InputError(f"--modes {modes_in}: no such file")
        modes, _ = load_modes(modes_in)
        atoms = getattr(modes, "atom_coordinates", None)
        owner = getattr(modes, "atom_node", None)
        return modes, atoms, owner
    from ..adapters.structure import read_structure
    from ..coarse_grain import coarse_grain
    from ..data import default_model_path

    path = model_in if model_in is not None else default_model_path()
    if not Path(path).exists():
        raise InputError(f"--model {path}: no such file")
    model = read_structure(path)
    cg = coarse_grain(model)
    n_dof = 3 * len(cg.coordinates_angstrom)
    if max(use_modes) > n_dof:
        raise InputError(
            f"--use-modes {max(use_modes)}: the model's network has only "
            f"{n_dof} modes ({n_dof // 3} nodes)"
        )
    modes = compute_normal_modes(
        cg.coordinates_angstrom,
        n_modes=max(20, max(use_modes)),
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


def _load_conformation(
    conformation: str | os.PathLike[str],
    modes: Any,
    *,
    chains_text: str | None,
    render: str,
    frame: str,
) -> Conformation:
    """Read --conformation, match its nodes in order with the modes' nodes, place it."""
    from ..adapters.structure import read_structure
    from ..coarse_grain import coarse_grain

    path = Path(conformation)
    if not path.exists():
        raise InputError(f"--conformation {path}: no such file")
    chains = [c for c in (chains_text or "").split(",") if c] or None
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
    if render == "atoms":
        points, owner = np.asarray(other.coordinates_angstrom), np.asarray(cg.atom_node)
    else:
        points, owner = np.asarray(cg.coordinates_angstrom), np.arange(len(cg))
    conf = place_conformation(
        ref,
        cg.coordinates_angstrom,
        points,
        owner,
        superpose_nodes=frame == "superpose",
    )
    return conf


def _conformation_info(
    conformation: str | os.PathLike[str],
    chains_text: str | None,
    modes: Any,
    model: SimulationModel,
    conf: Conformation,
    log: Log,
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
        "path": str(conformation),
        "chains": chains_text,
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
    say(
        log,
        f"conformation {conformation}: {len(conf.node_coordinates)} nodes matched in order, "
        f"Cα/P RMSD {conf.rmsd_angstrom:.3f} Å "
        + ("after superposition" if conf.superposed else "as given")
        + f"; projection on modes {', '.join(f'{m}: {v:.2f}' for m, v in zip(numbers, q))} "
        f"carries {100 * carried:.1f} % of the squared displacement "
        f"({100 * np.sqrt(carried):.1f} % of its norm)",
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


def simulate(
    *,
    out: str | os.PathLike[str],
    model: str | os.PathLike[str] | None = None,
    modes: ModesLike | None = None,
    use_modes: Sequence[int] = (7, 8, 9),
    n_particles: int = 1000,
    box_px: int = 128,
    pixel_size_angstrom: float = 0.65,
    snr: float = 0.1,
    noise_before_ctf: float = 0.5,
    amplitudes: str = "helix",
    max_rms_angstrom: float | None = None,
    helix_turns: float = 2.0,
    n_clusters: int = 4,
    shift_range_px: float = 5.0,
    voltage_kv: float = 200.0,
    spherical_aberration_mm: float = 2.0,
    amplitude_contrast: float = 0.1,
    defocus_angstrom: float = 5000.0,
    defocus_spread_angstrom: float = 0.0,
    protocol: str = "direct",
    render: str = "atoms",
    sigma_angstrom: float | None = None,
    conformation: str | os.PathLike[str] | None = None,
    conformation_chains: str | None = None,
    conformation_frame: str = "superpose",
    seed: int = 0,
    chunk_size: int = 256,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool | ProgressCallback = True,
    log: Log = print,
) -> SimulationResult:
    """Simulate particle images with ground truth (the paper's synthetic benchmark).

    The command ``deephemnma simulate`` calls this; see its ``--help`` for the model
    (deformation along modes, random orientations and shifts, CTF, noise before and after the
    CTF at the requested SNR).

    Parameters
    ----------
    out : path
        Output folder (written atomically): ``particles.mrcs``, ``particles.star``,
        ``particles.cs``, ``modes.npz``, ``simulation.json``.
    model : path, optional
        PDB/mmCIF reference (default: the bundled adenylate kinase, 4AKE chain A).
    modes : NormalModes or path, optional
        Modes to deform along (default: computed from ``model``, ANM).
    use_modes : sequence of int, default (7, 8, 9)
        Mode numbers.
    n_particles, box_px, pixel_size_angstrom : int, int, float
        Number of particles, box and pixel size.
    snr : float, default 0.1
        Whole-box SNR at the output size.
    noise_before_ctf : float, default 0.5
        Fraction of the noise variance added before the CTF.
    amplitudes : {"helix", "uniform", "clusters"}, default "helix"
        Distribution of the amplitudes.
    max_rms_angstrom : float, optional
        Largest RMS node displacement (3; 0 with ``conformation``).
    helix_turns, n_clusters : float, int
        Shape of the helix / number of clusters.
    shift_range_px : float, default 5.0
        Shifts uniform in ± this.
    voltage_kv, spherical_aberration_mm, amplitude_contrast : float
        The microscope.
    defocus_angstrom, defocus_spread_angstrom : float
        Defocus (underfocus > 0) and its uniform spread.
    protocol : {"direct", "paper"}, default "direct"
        ``paper`` renders at twice the box, then phase-flips and crops.
    render : {"atoms", "nodes"}, default "atoms"
        Render every heavy atom, or the network nodes.
    sigma_angstrom : float, optional
        Gaussian width of each rendered point (1 for atoms, 2 for nodes).
    conformation : path, optional
        Another conformation to render in the modes' frame.
    conformation_chains : str, optional
        Comma-separated chains of ``conformation``.
    conformation_frame : {"superpose", "as-is"}, default "superpose"
        Superpose ``conformation`` on the modes' nodes, or use it as given.
    seed, chunk_size : int
        Random seed; particles rendered at once.
    device : str, default "auto"
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    overwrite : bool, default False
        Replace an existing ``out`` that this package did not write.
    progress : bool or callable, default True
        The package's progress bar, none, or a callback ``f(done, total)``.
    log : callable or None, default print
        Where the summary line goes; None for silence.

    Returns
    -------
    SimulationResult

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from deephemnma_bridge.api import simulate
    >>> sim = simulate(out=Path(tempfile.mkdtemp()) / "sim", n_particles=8, box_px=48,
    ...                pixel_size_angstrom=3.0, seed=1, device="cpu", progress=False, log=None)
    >>> len(sim.particles), int(sim.particles.box_size_px[0]), sim.modes.n_nodes
    (8, 48, 214)
    """
    import torch

    from ..adapters import write_particles
    from ..adapters.images import StackWriter

    choice("--amplitudes", amplitudes, ("helix", "uniform", "clusters"))
    choice("--protocol", protocol, ("direct", "paper"))
    choice("--render", render, ("atoms", "nodes"))
    choice("--conformation-frame", conformation_frame, ("superpose", "as-is"))
    sigma = sigma_angstrom if sigma_angstrom is not None else (1.0 if render == "atoms" else 2.0)
    max_rms = max_rms_angstrom
    if max_rms is None:
        max_rms = 0.0 if conformation is not None else 3.0
    config = SimulationConfig(
        n_particles=n_particles,
        box_size_px=box_px,
        pixel_size_angstrom=pixel_size_angstrom,
        snr=snr,
        noise_before_ctf_fraction=noise_before_ctf,
        amplitudes=amplitudes,  # type: ignore[arg-type]  # checked by choice()
        max_rms_displacement_angstrom=max_rms,
        helix_turns=helix_turns,
        n_clusters=n_clusters,
        shift_range_px=shift_range_px,
        voltage_kv=voltage_kv,
        spherical_aberration_mm=spherical_aberration_mm,
        amplitude_contrast=amplitude_contrast,
        defocus_angstrom=defocus_angstrom,
        defocus_spread_angstrom=defocus_spread_angstrom,
        protocol=protocol,  # type: ignore[arg-type]  # checked by choice()
        sigma_angstrom=sigma,
        seed=seed,
        chunk_size=max(1, chunk_size),
    )
    out = Path(out)
    use_list = [int(m) for m in use_modes]
    if not use_list or min(use_list) < 1 or len(set(use_list)) != len(use_list):
        raise InputError(f"--use-modes: mode numbers must be distinct and >= 1, got {use_list}")
    inputs = input_files(modes, model, conformation)
    check_output_dir(out, command="simulate", inputs=inputs, overwrite=overwrite)
    check_room_for_output(out, config)
    dev = resolve_device(device)
    loaded, atoms, owner = _load_modes(modes, model, use_list)
    if render == "atoms" and (atoms is None or owner is None):
        raise InputError(
            f"the modes file {modes} has no atom coordinates to render; use "
            "--render nodes, or omit --modes to compute modes from --model"
        )
    conf = (
        None
        if conformation is None
        else _load_conformation(
            conformation,
            loaded,
            chains_text=conformation_chains,
            render=render,
            frame=conformation_frame,
        )
    )
    if conf is None:
        sim_model = SimulationModel.from_arrays(
            np.asarray(loaded.coordinates),
            np.asarray(loaded.vectors),
            np.asarray(loaded.mode_numbers),
            use_list,
            atom_coordinates=atoms if render == "atoms" else None,
            atom_node=owner if render == "atoms" else None,
        )
    else:
        sim_model = SimulationModel.from_arrays(
            np.asarray(loaded.coordinates),
            np.asarray(loaded.vectors),
            np.asarray(loaded.mode_numbers),
            use_list,
            atom_coordinates=conf.render_coordinates,
            atom_node=conf.render_node,
            conformation_nodes=conf.node_coordinates,
        )
    conformation_info = None
    if conf is not None and conformation is not None:
        conformation_info = _conformation_info(
            conformation, conformation_chains, loaded, sim_model, conf, log
        )
    truth = draw_truth(config, sim_model)
    check_simulation(config, sim_model, truth)
    stats = SimulationStats()
    with (
        torch.no_grad(),
        atomic_dir(out, command="simulate", inputs=inputs, overwrite=overwrite) as tmp,
    ):
        with StackWriter(
            tmp / "particles.mrcs",
            box_size_px=config.box_size_px,
            pixel_size_angstrom=config.pixel_size_angstrom,
        ) as writer:
            bar = progress_bar(progress, config.n_particles, desc="simulate")
            for chunk in simulate_images(config, sim_model, truth, device=dev):
                writer.append(chunk.images)
                stats.add(chunk)
                bar.update(len(chunk.images))
            bar.close()
        table = simulation_table(config, sim_model, truth, "particles.mrcs")
        write_particles(table, tmp / "particles.star")
        write_particles(table, tmp / "particles.cs")
        _save_modes(loaded, tmp / "modes.npz", sim_model.centre_angstrom)
        measured = stats.summary()
        info = {
            "settings": dataclasses.asdict(config),
            "use_modes": list(use_list),
            "render": render,
            "amplitude_scale": truth.amplitude_scale,
            "rotation_centre_angstrom": sim_model.centre_angstrom.tolist(),
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
    say(
        log,
        f"wrote {config.n_particles} particles to {out}: measured SNR whole box "
        f"{measured['snr_whole']:.3g}{where}, below 10 Å {measured['snr_10A']:.3g}, "
        f"below 7 Å {measured['snr_7A']:.3g}",
    )
    from ..adapters import read_particles
    from ..nma import NormalModes

    return SimulationResult(
        particles=read_particles(out / "particles.star"),
        modes=NormalModes.load(out / "modes.npz"),
        info=info,
        out=out,
    )
