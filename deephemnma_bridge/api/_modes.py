"""Normal modes of an atomic model or an EM map (elastic network, ANM or RTB)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import InputError
from ..fileutils import check_output_file
from ..nma import NormalModes
from ..structure import AtomicModel
from ._common import Log, choice, say, warn_line

__all__ = ["MAP_SUFFIXES", "compute_modes"]

MAP_SUFFIXES = (".mrc", ".map", ".ccp4", ".rec")


def _model_from_map(
    path: Path,
    *,
    out: Path | None,
    threshold: float | None,
    mask: str | os.PathLike[str] | None,
    target_error: float,
    sigma_voxels: float,
    pseudoatoms_out: str | os.PathLike[str] | None,
    overwrite: bool,
    log: Log,
) -> tuple[Any, dict[str, Any]]:
    from ..adapters.maps import read_map
    from ..adapters.structure import write_models
    from ..pseudoatoms import pseudoatoms

    density = read_map(path)
    inside = None
    if mask is not None:
        mask_map = read_map(mask)
        if mask_map.data.shape != density.data.shape:
            raise InputError(
                f"--mask {mask}: shape {mask_map.data.shape} differs from the map's "
                f"{density.data.shape}"
            )
        inside = mask_map.data > 0.5
    written: Path | None = None
    if pseudoatoms_out is not None:
        written = Path(pseudoatoms_out)
    elif out is not None:
        written = out.with_name(out.stem + "_pseudoatoms.cif")
    if written is not None:
        check_output_file(written, overwrite=overwrite, option="--pseudoatoms-out")
    atoms = pseudoatoms(
        density,
        threshold=threshold,
        mask=inside,
        target_error=target_error,
        sigma_voxels=sigma_voxels,
        progress=lambda n, e: warn_line(log, f"  pseudoatoms: {n:7d} atoms, error {e:.4f}"),
    )
    model = atoms.as_model(name=path.stem)
    if written is not None:
        write_models(written, model)
    # RELION's rotation centre of a map is voxel N//2 of each axis; particles extracted with
    # this map as reference share its box
    nz, ny, nx = density.data.shape
    centre = density.origin_angstrom + np.array([nx // 2, ny // 2, nz // 2]) * np.asarray(
        density.voxel_size_angstrom
    )
    geometry = {
        "map_centre_angstrom": centre.tolist(),
        "map_box_angstrom": float(nx * density.voxel_size_angstrom[0]),
    }
    say(
        log,
        f"{len(atoms)} pseudoatoms (sigma {atoms.sigma_angstrom:.2f} Å, threshold "
        f"{atoms.threshold:.4g}, error {atoms.error:.3f})"
        + (f" written to {written}" if written is not None else ""),
    )
    return model, geometry


def compute_modes(
    model: AtomicModel | str | os.PathLike[str] | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    n_modes: int = 20,
    nodes: Literal["ca", "heavy"] = "ca",
    chains: str | None = None,
    cutoff_angstrom: float | str | None = None,
    cutoff_percentile: float | None = None,
    rtb_block: int | None = None,
    method: Literal["auto", "dense", "sparse"] = "auto",
    mass_weighted: bool = False,
    animate: str | os.PathLike[str] | None = None,
    frames: int = 10,
    animation_rms_angstrom: float = 3.0,
    threshold: float | None = None,
    mask: str | os.PathLike[str] | None = None,
    target_error: float = 0.05,
    sigma_voxels: float = 1.0,
    pseudoatoms_out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    log: Log = print,
) -> NormalModes:
    """Normal modes of an atomic model or an EM map (elastic network model).

    The command ``deephemnma modes`` calls this.

    Parameters
    ----------
    model : AtomicModel or path, optional
        A PDB/mmCIF file (one node per residue by default: Cα / P), an MRC map (first
        approximated by Gaussian pseudoatoms), or a model in memory. Default: the bundled
        adenylate kinase (4AKE chain A).
    out : path, optional
        Where to save the modes (a ``.npz``); not saved when None.
    n_modes : int, default 20
        Modes, the 6 rigid-body ones included.
    nodes : {"ca", "heavy"}, default "ca"
        Cα/P per residue, or every heavy atom.
    chains : str, optional
        Comma-separated chains to keep.
    cutoff_angstrom : float or "auto", optional
        Spring cutoff (default: 15 Å for ca, 8 Å for heavy, raised where needed to connect
        and rigidify the network; auto for maps).
    cutoff_percentile : float, optional
        A relative cutoff: this percentile of the distances to the 3 nearest neighbours.
    rtb_block : int, optional
        RTB with this many residues per block (0: full ANM; default: full ANM up to 20,000
        nodes).
    method : {"auto", "dense", "sparse"}, default "auto"
        Full-ANM solver.
    mass_weighted : bool, default False
        Mass-weighted Hessian.
    animate : path, optional
        Folder for one multi-model file per flexible mode (ChimeraX trajectories).
    frames : int, default 10
        Frames per animation.
    animation_rms_angstrom : float, default 3.0
        Animation amplitude as an RMS displacement.
    threshold, mask, target_error, sigma_voxels, pseudoatoms_out
        Maps only: the map level (default: Otsu), an MRC mask, the pseudoatom fit's target
        error and Gaussian width (voxels), and where the pseudoatoms are written (default:
        beside ``out``).
    overwrite : bool, default False
        Replace an existing ``out`` / ``animate``.
    log : callable or None, default print
        Where the table of modes goes; None for silence.

    Returns
    -------
    NormalModes
        Coordinates, eigenvalues, vectors, mode numbers, collectivity and settings, with the
        heavy atoms that move with each node.

    Examples
    --------
    >>> from deephemnma_bridge.api import compute_modes
    >>> modes = compute_modes(n_modes=12, log=None)  # the bundled adenylate kinase
    >>> modes.n_nodes, [int(m) for m in modes.mode_numbers[6:9]]
    (214, [7, 8, 9])
    """
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
    from ..structure import AtomicModel

    out = None if out is None else Path(out)
    animate = None if animate is None else Path(animate)
    given = model
    path = Path(given if isinstance(given, str | os.PathLike) else default_model_path())
    source = given.name if isinstance(given, AtomicModel) else str(path)
    if out is not None:
        check_not_input(out, path)
        check_output_file(out, overwrite=overwrite, option="--out")
    if animate is not None:
        check_output_dir(animate, command="modes", inputs=[path], overwrite=overwrite)
    if out is not None and out.suffix != ".npz":
        raise InputError(f"--out {out}: the modes file must end in .npz")
    if frames < 2:
        raise InputError(f"--frames must be at least 2, got {frames}")
    choice("--nodes", nodes, ("ca", "heavy"))
    choice("--method", method, ("auto", "dense", "sparse"))
    geometry: dict[str, Any] = {}
    if isinstance(given, AtomicModel):
        structure = given
    elif path.suffix.lower() in MAP_SUFFIXES:
        structure, geometry = _model_from_map(
            path,
            out=out,
            threshold=threshold,
            mask=mask,
            target_error=target_error,
            sigma_voxels=sigma_voxels,
            pseudoatoms_out=pseudoatoms_out,
            overwrite=overwrite,
            log=log,
        )
    else:
        wanted = [c for c in chains.split(",") if c] if chains else None
        structure = read_structure(path, chains=wanted)
    cg = coarse_grain(structure, nodes=nodes, mass_weighted=mass_weighted)
    pseudo = bool(np.all(structure.polymer_kind == "pseudo"))
    cutoff: float | str | None = cutoff_angstrom
    floor = 0.0
    if cutoff is None and cutoff_percentile is None:
        # auto: 15 Å (Cα/P) or 8 Å (heavy atoms), raised only where the network needs it
        cutoff, floor = "auto", 0.0 if pseudo else DEFAULT_CUTOFF_ANGSTROM[nodes]
    rtb = rtb_block if rtb_block is not None else (10 if len(cg) > 20_000 else 0)
    if rtb < 0:
        raise InputError(f"--rtb-block must be >= 0, got {rtb}")
    modes = compute_normal_modes(
        cg.coordinates_angstrom,
        n_modes=n_modes,
        cutoff_angstrom=cutoff,  # type: ignore[arg-type]
        cutoff_percentile=cutoff_percentile or 95.0,
        cutoff_floor_angstrom=floor,
        method="rtb" if rtb else method,
        blocks=cg.blocks(rtb) if rtb else None,
        masses=cg.masses if mass_weighted else None,
        settings={
            "model": source,
            "nodes": "pseudoatoms" if pseudo else nodes,
            "chains": chains,
            "rtb_residues_per_block": rtb or None,
            **geometry,
        },
    )
    heavy = np.asarray([str(e).upper() not in ("H", "D") for e in structure.elements])
    owner = np.asarray(cg.atom_node)
    if not pseudo:
        import dataclasses

        modes = dataclasses.replace(
            modes,
            atom_coordinates=np.asarray(structure.coordinates_angstrom)[heavy],
            atom_node=owner[heavy],
            atom_elements=np.asarray(structure.elements, dtype=str)[heavy],
        )
    if out is not None:
        modes.save(out)
    s = modes.settings
    if floor and s["cutoff_angstrom"] > floor * 1.0001:
        say(
            log,
            f"note: the cutoff was raised from {floor:g} Å to {s['cutoff_angstrom']:.2f} Å: "
            "below that the network has loose parts (set --cutoff to override)",
        )
    say(
        log,
        f"{len(cg)} nodes, cutoff {s['cutoff_angstrom']:.2f} Å, {s['n_springs']} springs, "
        f"solver {s['method']}, {s['seconds']:.2f} s" + (f" -> {out}" if out is not None else ""),
    )
    try:  # what `align --use-modes auto` (the default) takes with its default settings
        auto = select_collective_modes(modes.mode_numbers, modes.collectivity)
    except InputError:
        auto = []
    say(log, f"{'mode':>5} {'eigenvalue':>12} {'collectivity':>12}")
    for m, ev, c in zip(modes.mode_numbers, modes.eigenvalues, modes.collectivity):
        low = f"  (local: collectivity < {DEFAULT_MIN_COLLECTIVITY:g})"
        tag = (
            "  rigid body"
            if m <= 6
            else ("  auto" if m in auto else low if c < DEFAULT_MIN_COLLECTIVITY else "")
        )
        say(log, f"{m:5d} {ev:12.5g} {c:12.3f}{tag}")
    if auto:
        say(log, f"align --use-modes auto (the default) takes modes {','.join(map(str, auto))}")
    else:
        say(
            log,
            f"fewer than {DEFAULT_N_AUTO_MODES} flexible modes have a collectivity >= "
            f"{DEFAULT_MIN_COLLECTIVITY:g}: give align --use-modes or compute more --n-modes",
        )
    if animate is not None:
        from ..fileutils import claim_output_dir

        claim_output_dir(animate, command="modes", inputs=[path], overwrite=overwrite)
        suffix = ".cif" if len(structure) > 99_999 else ".pdb"
        q = animation_rms_angstrom * np.sqrt(len(cg))  # RMS displacement |q| / sqrt(N)
        steps = np.linspace(-q, q, frames)
        for k, m in enumerate(modes.mode_numbers):
            if m <= 6:
                continue
            trajectory = deform_atoms(
                structure.coordinates_angstrom,
                owner,
                cg.coordinates_angstrom,
                modes.vectors[k : k + 1],
                steps[:, None],
            )
            write_models(animate / f"mode_{m:03d}{suffix}", structure, list(trajectory))
        say(log, f"animations of modes 7-{modes.mode_numbers[-1]} written to {animate}")
    return modes
