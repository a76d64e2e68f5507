"""Flexible fitting of an atomic model into a map along its normal modes (`fitting`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import numpy as np

from ..fileutils import atomic_path, check_not_input, check_output_file
from ..fitting import MapFit, fit_to_map
from ..simulate import superpose
from ._common import InputError, Log, choice, say

__all__ = ["fit_model"]


def fit_model(
    model: str | os.PathLike[str],
    density: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str],
    chains: str | None = None,
    resolution_angstrom: float = 8.0,
    use_modes: list[int] | None = None,
    n_modes: int = 20,
    cycles: int = 3,
    iterations: int = 40,
    deformation: Literal["linear", "nonlinear"] = "nonlinear",
    centre: Literal["map", "model"] = "map",
    stiffness: float = 1e-4,
    local_restraint: float | None = 0.03,
    keep_frame: bool = False,
    compare: str | os.PathLike[str] | None = None,
    compare_chains: str | None = None,
    overwrite: bool = False,
    log: Log = print,
) -> MapFit:
    """Deform an atomic model into a map along its normal modes, recomputed after each cycle.

    The command ``deephemnma fit`` calls this. Typical use: a group of particles far from the
    reference (``analyze``'s subset), reconstructed by the host, is fitted with the reference
    model; the fitted model's modes (``deephemnma modes fitted.pdb``) then align that
    population better than the reference's could.

    Parameters
    ----------
    model : path
        PDB/mmCIF model (every atom moves with its residue's node, Cα / P).
    density : path
        MRC map of the population (e.g. ``relion_reconstruct`` of a group subset).
    out : path
        The fitted model (``.pdb`` or ``.cif``), with ``<out stem>_fit.json`` beside it (the
        correlation per stage, settings).
    chains : str, optional
        Comma-separated chains of ``model`` to keep.
    resolution_angstrom : float, default 8
        The fit's band (the map's resolution or coarser); the first cycle starts at twice it.
    use_modes : list of int, optional
        Flexible modes to move along (default: 7 to ``n_modes``).
    n_modes : int, default 20
        Modes computed, the 6 rigid-body ones included.
    cycles, iterations : int, default 3, 40
        Fit-then-recompute-the-modes cycles, L-BFGS iterations per stage.
    deformation : {"nonlinear", "linear"}, default "nonlinear"
        Nodes follow their neighbourhood's local rotations (hinges close on their arc), or the
        linear model.
    centre : {"map", "model"}, default "map"
        ``map``: the model's node centroid sits on the map's centre (voxel n // 2), as for a
        map reconstructed from particles aligned against this model; ``model``: the model is
        already placed in the map (its coordinates and the map's origin are used as they are).
    stiffness : float, default 1e-4
        Elastic penalty per Å² of RMS displacement along the softest mode.
    local_restraint : float or None, default 0.03
        After the cycles, every node (with its atoms) moves freely, held by springs to its
        neighbours' distances with this weight per Å² (`fitting.fit_to_map`); None skips it.
    keep_frame : bool, default False
        Superpose the fitted model on the starting one (all nodes, Kabsch) before writing it:
        poses found with it then stay in the starting model's frame, comparable with the first
        round's (a map reconstructed from poses found with another model is itself turned by
        their systematic error: 3.4° for closed adenylate kinase aligned with the open form).
        The model then sits in the map up to that rigid motion (logged and reported).
    compare : path, optional
        A model of the same residues (e.g. the known target) to report the Cα RMSD to, before
        and after (superposed), in the log and the JSON.
    compare_chains : str, optional
        Chains of ``compare``.
    overwrite : bool, default False
        Replace an existing ``out``.
    log : callable or None, default print

    Returns
    -------
    MapFit
        Fitted atom and node coordinates (before ``keep_frame``'s superposition), the
        correlation at ``resolution_angstrom`` before and after, every stage.

    Examples
    --------
    The bundled adenylate kinase fitted into a map of itself moved along modes 7 and 8:

    >>> import tempfile
    >>> import numpy as np
    >>> from pathlib import Path
    >>> from deephemnma_bridge.adapters.maps import write_map
    >>> from deephemnma_bridge.api import compute_modes, fit_model
    >>> from deephemnma_bridge.data import default_model_path
    >>> from deephemnma_bridge.fitting import render_map
    >>> tmp = Path(tempfile.mkdtemp())
    >>> modes = compute_modes(n_modes=8, log=None)
    >>> moved = modes.coordinates + 30 * modes.select([7]).vectors[0]  # 2 Å RMS
    >>> write_map(tmp / "moved.mrc", render_map(moved, shape=(40, 40, 40),
    ...           voxel_size_angstrom=2.0, resolution_angstrom=8.0))
    >>> fit = fit_model(default_model_path(), tmp / "moved.mrc", out=tmp / "fitted.pdb",
    ...                 cycles=1, iterations=10, log=None)
    >>> bool(fit.correlation > fit.correlation_start), (tmp / "fitted_fit.json").is_file()
    (True, True)
    """
    from ..adapters.maps import read_map
    from ..adapters.structure import read_structure, write_models
    from ..coarse_grain import coarse_grain
    from ..nma import compute_normal_modes

    out = Path(out)
    model_path, map_path = Path(model), Path(density)
    if out.suffix.lower() not in (".pdb", ".cif", ".mmcif", ".ent"):
        raise InputError(f"--out {out}: write the fitted model as .pdb or .cif")
    check_not_input(out, model_path, map_path)
    check_output_file(out, overwrite=overwrite, option="--out", side_suffixes=("_fit.json",))
    choice("--deformation", deformation, ("linear", "nonlinear"))
    choice("--centre", centre, ("map", "model"))
    wanted_chains = [c for c in chains.split(",") if c] if chains else None
    structure = read_structure(model_path, chains=wanted_chains)
    target = read_map(map_path)
    cg = coarse_grain(structure)
    modes = compute_normal_modes(
        cg.coordinates_angstrom,
        n_modes=n_modes,
        cutoff_angstrom="auto",
        cutoff_floor_angstrom=15.0,
        settings={"model": str(model_path), "nodes": "ca", "chains": chains},
    )
    picked = use_modes or [int(m) for m in modes.mode_numbers if m > 6]
    say(
        log,
        f"fitting {model_path.name} ({len(structure)} atoms, {len(cg)} nodes) into "
        f"{map_path.name} ({'x'.join(map(str, target.data.shape[::-1]))} voxels of "
        f"{float(target.voxel_size_angstrom[0]):.3f} Å) at {resolution_angstrom:g} Å along "
        f"modes {picked[0]}-{picked[-1]} ({deformation}), {cycles} cycles",
    )
    fit = fit_to_map(
        target,
        modes,
        atom_coordinates=structure.coordinates_angstrom,
        atom_node=np.asarray(cg.atom_node),
        mode_numbers=picked,
        resolution_angstrom=resolution_angstrom,
        cycles=cycles,
        iterations=iterations,
        deformation=deformation,
        centre=centre,
        stiffness=stiffness,
        local_restraint=local_restraint,
        log=None if log is None else lambda line: say(log, line),
    )
    report: dict[str, object] = {
        "model": str(model_path),
        "map": str(map_path),
        "resolution_angstrom": resolution_angstrom,
        "modes": picked,
        "deformation": deformation,
        "centre": centre,
        "stiffness": stiffness,
        "local_restraint": local_restraint,
        "cycles": cycles,
        "correlation_start": fit.correlation_start,
        "correlation": fit.correlation,
        "node_rmsd_from_start_angstrom": fit.rmsd_from_start_angstrom,
        "stages": [vars(s) for s in fit.stages],
    }
    say(
        log,
        f"correlation at {resolution_angstrom:g} Å: {fit.correlation_start:.4f} -> "
        f"{fit.correlation:.4f}; the nodes moved {fit.rmsd_from_start_angstrom:.2f} Å RMS",
    )
    if compare is not None:
        other = read_structure(
            compare, chains=[c for c in (compare_chains or "").split(",") if c] or None
        )
        theirs = coarse_grain(other).coordinates_angstrom
        if len(theirs) != len(cg):
            raise InputError(
                f"--compare {compare}: {len(theirs)} nodes, the model has {len(cg)}; select the "
                "same chains (--compare-chains) and residues"
            )
        before, after = _rmsd(cg.coordinates_angstrom, theirs), _rmsd(fit.node_coordinates, theirs)
        report["compare"] = {"model": str(compare), "rmsd_before": before, "rmsd_after": after}
        say(log, f"Cα RMSD to {Path(compare).name} (superposed): {before:.2f} -> {after:.2f} Å")
    atoms = fit.atom_coordinates
    if keep_frame:
        rot, shift = superpose(fit.node_coordinates, cg.coordinates_angstrom)
        atoms = atoms @ rot.T + shift
        turn = float(np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1.0, 1.0))))
        moved = float(np.linalg.norm(fit.node_coordinates.mean(0) @ rot.T + shift
                                     - fit.node_coordinates.mean(0)))  # fmt: skip
        report["keep_frame"] = {"rotation_degrees": turn, "centroid_shift_angstrom": moved}
        say(
            log,
            f"superposed on the starting model (--keep-frame): turned by {turn:.2f}°, centroid "
            f"moved by {moved:.2f} Å",
        )
    side = out.with_name(out.stem + "_fit.json")
    write_models(out, structure.with_coordinates(atoms))
    with atomic_path(side) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    say(log, f"fitted model written to {out} (report {side.name})")
    return fit


def _rmsd(a: np.ndarray, b: np.ndarray) -> float:
    """RMSD after the optimal superposition (Kabsch)."""
    rot, shift = superpose(a, b)
    return float(np.sqrt((((a @ rot.T + shift) - b) ** 2).sum(1).mean()))
