"""HEMNMA alignment: mode amplitudes, orientation and shifts of every particle image."""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..particles import ParticleTable
from ._common import (
    Log,
    ModesLike,
    ParticlesLike,
    ProgressCallback,
    choice,
    input_files,
    label,
    load_modes,
    progress_bar,
    read_table,
    say,
    warn_line,
)

__all__ = [
    "MAX_FINAL_ATOMS",
    "align",
    "build_reference",
    "choose_modes",
    "cpu_threads",
    "mode_table_lines",
    "symmetry_group",
]


def cpu_threads(requested: int) -> tuple[int, str]:
    """Threads for the CPU work and why. Measured on 2 cores (bench_hemnma --cases threads):
    idle, 2 threads run 1.25x faster than 1 for 1.26x the CPU time; under a shared load torch's
    threads wait for each other (OpenMP spin) and the same run took 4x the wall time of one
    thread. So: torch's default on an idle machine, 1 thread when the load already fills the
    cores (or under torchrun, one process per core)."""
    import torch

    if requested < 0:
        raise InputError(f"--threads must be >= 0, got {requested}")
    if requested:
        return requested, "as asked"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return 1, "one per torchrun process"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores and load >= cores - 0.5:
        return 1, f"the machine is busy (load {load:.1f} on {cores} cores)"
    return torch.get_num_threads(), "torch's default"


#: a model is pseudo-symmetric under a group when its deviation (`symmetry_deviation`) is below
#: this fraction of the group turned by half its n-fold step (`half_step_deviation`); 7PBL C6:
#: 0.71, its subgroup C2 0.77; asymmetric adenylate kinase: 1.02-1.09 (C2, C3, C5)
PSEUDO_SYMMETRY_RATIO = 0.8

#: On the CPU, `align` runs its batches in this many lanes (`_sharded.in_lanes`: threads that
#: each take a whole batch through reading, the fit and storing, with one intra-op thread).
#: None: as many as the CPU threads it uses (`cpu_threads`), at most one per batch; 1: one
#: batch at a time over every thread. Each lane holds its own batch in memory. Measured on
#: the idle 2-core machine (256 particles of the default set): 2 lanes 0.069 s wall and 0.123
#: CPU-s per particle, 1 thread 0.116 / 0.115, 2 torchrun ranks 0.080 / 0.150.
LANES: int | None = None

#: above this many atoms the last band renders residue blobs (4YVS, 26k atoms: ~10x cheaper)
MAX_FINAL_ATOMS = 10_000


def build_reference(
    modes_in: ModesLike,
    use_modes: list[int],
    *,
    template: str = "residues",
    final_template: str = "atoms",
    deformation: str = "linear",
    box_angstrom: float,
    device: Any,
    log: Log = print,
) -> Any:
    """(reference, template used, final-stage reference or None) of modes (or a modes file),
    checked against the particles' box; shared by `align`, `predict` and `train`."""
    from ..alignment.hemnma import ReferenceModel

    modes, modes_path = load_modes(modes_in)
    selected = modes.select(use_modes)
    rigid = [m for m in use_modes if m <= 6]
    if rigid:
        raise InputError(f"--use-modes {rigid}: modes 1-6 are rigid-body motions; use 7 and up")
    if template != "nodes" and modes.atom_coordinates is None:
        template = "nodes"  # pseudoatoms of a map: the nodes are the density

    def build(kind: Any) -> Any:
        return ReferenceModel.from_modes(
            selected.coordinates,
            selected.vectors,
            use_modes,
            template=kind,
            deformation=deformation,  # type: ignore[arg-type]
            atom_coordinates=modes.atom_coordinates,
            atom_node=modes.atom_node,
            centre_angstrom=modes.rotation_centre,
            device=device,
        )

    reference = build(template)
    final = None
    atoms = modes.atom_coordinates
    if final_template == "atoms" and template != "atoms" and atoms is not None:
        if len(atoms) <= MAX_FINAL_ATOMS:
            final = build("atoms")
        else:  # the last band's cost is atoms x Fourier coefficients: residues for big models
            warn_line(
                log,
                f"{len(atoms)} atoms: the last band uses residue blobs, not every atom "
                f"(more than {MAX_FINAL_ATOMS}; --final-template same says so explicitly)",
            )
    map_box = modes.settings.get("map_box_angstrom")
    if map_box is not None and abs(float(map_box) - box_angstrom) > 0.02 * box_angstrom:
        raise InputError(
            f"the particles' box is {box_angstrom:.1f} Å but the reference map's is "
            f"{float(map_box):.1f} Å: use modes of a map with the particles' box and pixel size"
        )
    if reference.radius_angstrom > 0.5 * box_angstrom:
        raise InputError(
            f"the reference in {label(modes_path, 'the modes')} (radius "
            f"{reference.radius_angstrom:.1f} Å) does not "
            f"fit in the particles' {box_angstrom:.1f} Å box: is the modes file from another "
            "structure, or the pixel size wrong?"
        )
    return reference, template, final


def choose_modes(
    modes: Any,
    use_modes: str | list[int],
    *,
    min_collectivity: float | None = None,
    n_auto_modes: int | None = None,
) -> tuple[list[int], list[dict[str, Any]]]:
    """The mode numbers to align (``"auto"`` resolved by `select_collective_modes`) and the
    table of the flexible modes: ``{"mode", "eigenvalue", "collectivity", "chosen"}``.

    An explicit mode whose collectivity is below the threshold gets a warning naming it."""
    from ..nma.modes import (
        DEFAULT_MIN_COLLECTIVITY,
        DEFAULT_N_AUTO_MODES,
        select_collective_modes,
    )

    threshold = DEFAULT_MIN_COLLECTIVITY if min_collectivity is None else min_collectivity
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"--min-collectivity must be in [0, 1], got {threshold}")
    if use_modes == "auto":
        try:
            chosen = select_collective_modes(
                modes.mode_numbers,
                modes.collectivity,
                n_modes=DEFAULT_N_AUTO_MODES if n_auto_modes is None else n_auto_modes,
                min_collectivity=threshold,
            )
        except InputError as exc:
            raise InputError(f"--use-modes auto: {exc}") from None
    else:
        chosen = [int(m) for m in use_modes]
        if not chosen:
            raise InputError("--use-modes: no mode numbers given (e.g. 7,8,9 or auto)")
        if len(set(chosen)) != len(chosen):
            raise InputError(f"--use-modes {chosen}: a mode is given twice")
        if n_auto_modes is not None:
            raise InputError("--n-auto-modes applies to --use-modes auto only")
        coll = {int(m): float(c) for m, c in zip(modes.mode_numbers, modes.collectivity)}
        local = [m for m in chosen if m > 6 and m in coll and coll[m] < threshold]
        if local:
            named = ", ".join(f"{m} ({coll[m]:.3f})" for m in local)
            warnings.warn(
                f"--use-modes: mode(s) {named} have a collectivity below {threshold:g}: "
                "local motions (a loop, a terminus), whose amplitudes are poorly determined; "
                "--use-modes auto skips them",
                stacklevel=2,
            )
    table = [
        {
            "mode": int(m),
            "eigenvalue": float(ev),
            "collectivity": float(c),
            "chosen": int(m) in chosen,
        }
        for m, ev, c in zip(modes.mode_numbers, modes.eigenvalues, modes.collectivity)
        if m > 6
    ]
    return chosen, table


def mode_table_lines(table: list[dict[str, Any]], threshold: float) -> list[str]:
    """The table of `choose_modes` as text lines (the chosen modes marked ``*``)."""
    lines = [f"{'mode':>5} {'eigenvalue':>12} {'collectivity':>12}  chosen"]
    for row in table:
        low = f"  (local: collectivity < {threshold:g})" if row["collectivity"] < threshold else ""
        mark = "   *" if row["chosen"] else ""
        lines.append(
            f"{row['mode']:5d} {row['eigenvalue']:12.5g} {row['collectivity']:12.3f}{mark}{low}"
        )
    return lines


def symmetry_group(modes: Any, symbol: str) -> tuple[Any, dict[str, Any]]:
    """The group (|G|, 3, 3) of ``symbol`` about the reference's rotation centre, and what was
    found: RELION's axes when the model is symmetric about them, else the model's own axes
    (`find_symmetry_frame`). A model whose nodes are not invariant but clearly closer to it than
    to the group turned by half a step (`PSEUDO_SYMMETRY_RATIO`) is pseudo-symmetric
    (``info["pseudo"]``). Raises `InputError` when the model has no such symmetry."""
    from ..symmetry import (
        find_symmetry_frame,
        group_order,
        half_step_deviation,
        node_spacing,
        point_group,
        symmetry_deviation,
    )

    if symbol == "C1":
        return None, {"symbol": "C1"}
    xyz = np.asarray(modes.coordinates, dtype=np.float64) - modes.rotation_centre
    limit = 0.75 * node_spacing(xyz)  # a node moved by g lands within this of another one
    frame = np.eye(3)
    deviation = symmetry_deviation(xyz, point_group(symbol))
    if deviation > limit:
        frame, deviation = find_symmetry_frame(xyz, symbol)
    turned = None
    if deviation > limit:
        turned = half_step_deviation(xyz, symbol, frame)
        if deviation > PSEUDO_SYMMETRY_RATIO * turned:
            raise InputError(
                f"--symmetry {symbol}: the reference is not {symbol}-symmetric about its "
                f"rotation centre, neither about RELION's axes (z; x for the Dn 2-fold) nor "
                f"about its principal axes (nodes moved by the group land {deviation:.1f} Å RMS "
                f"from the nearest node, more than {limit:.1f} Å), nor pseudo-symmetric (the "
                f"group turned by half a step does as well: {turned:.1f} Å); check the symbol"
            )
    info = {
        "symbol": symbol,
        "order": group_order(symbol),
        "relion_axes": bool(np.allclose(frame, np.eye(3))),
        "n_fold_axis": frame[:, 2].round(6).tolist(),
        "two_fold_axis": frame[:, 0].round(6).tolist() if symbol.startswith("D") else None,
        "deviation_angstrom": round(deviation, 3),
        "pseudo": turned is not None,
        "half_step_deviation_angstrom": None if turned is None else round(turned, 3),
    }
    return point_group(symbol, frame), info


def align(
    particles: ParticlesLike,
    modes: ModesLike,
    *,
    out: str | os.PathLike[str],
    use_modes: str | Sequence[int] = "auto",
    min_collectivity: float | None = None,
    n_auto_modes: int | None = None,
    symmetry: str = "C1",
    symmetry_search: bool = False,
    template: str = "residues",
    final_template: str = "atoms",
    deformation: str = "linear",
    sigma_angstrom: float = 2.0,
    working_size_px: int = 128,
    poses: str = "search",
    search_step_degrees: float = 10.0,
    search_resolution_angstrom: float = 10.0,
    max_shift_px: float = 6.0,
    n_candidates: int = 3,
    elastic_range_angstrom: float = 8.0,
    elastic_spacing_angstrom: float = 4.0,
    elastic_candidates: int = 2,
    screen_steps: int = 10,
    screen_resolution_angstrom: float = 10.0,
    population_search: int = 0,
    amplitude_step_angstrom: Sequence[float] = (0.25, 0.1),
    max_rounds: int = 5,
    refine_resolution_angstrom: Sequence[float] = (7.0, 4.0),
    iterations: Sequence[int] = (40, 25),
    amplitude_starts_angstrom: Sequence[float] = (0.0,),
    ctf: str = "full",
    outliers: float | None = None,
    batch_size: int = 64,
    checkpoint_every: int = 512,
    restart: bool = False,
    overwrite: bool = False,
    relion_version: str = "3.1",
    device: str = "auto",
    threads: int = 0,
    progress: bool | ProgressCallback = True,
    log: Log = print,
) -> ParticleTable:
    """Align particle images by HEMNMA: mode amplitudes, orientation and shifts of each.

    The command ``deephemnma align`` calls this; its options are these keywords (``--x-y``
    is ``x_y``, with the unit added to the name: ``--search-step`` is
    ``search_step_degrees``), and its error messages name the options as the command does.

    Parameters
    ----------
    particles : ParticleTable or path
        The particles (RELION ``.star`` or cryoSPARC ``.cs``, or a table in memory). One box
        and pixel size.
    modes : NormalModes or path
        The reference: network nodes, modes and the atoms that move with them
        (`compute_modes`, `simulate`).
    out : path
        Output folder: ``particles.star``, ``particles.cs`` (and ``inliers``/``outliers``
        with ``outliers``), ``alignment.json``. Written atomically; an unfinished run
        checkpoints into ``out.partial`` and a rerun with the same settings resumes.
    use_modes : "auto" or sequence of int, default "auto"
        Mode numbers (7 and up), or the ``n_auto_modes`` lowest flexible modes whose
        collectivity is at least ``min_collectivity``.
    min_collectivity : float, optional
        Threshold of ``"auto"`` (0.2).
    n_auto_modes : int, optional
        Modes ``"auto"`` takes (3).
    symmetry : str, default "C1"
        Point group ``Cn`` or ``Dn`` of a (pseudo-)symmetric reference: the poses written are
        folded onto one asymmetric unit.
    symmetry_search : bool, default False
        With ``symmetry``: the search also tries the equivalent poses of each particle's best
        candidate and keeps the best fit (the motion breaks the symmetry: each copy has its
        own amplitudes); about 1.4x the CPU.
    template : {"residues", "nodes", "atoms"}, default "residues"
        Search and first-stage template.
    final_template : {"atoms", "same"}, default "atoms"
        Last-stage template.
    deformation : {"linear", "nonlinear"}, default "linear"
        Deformation model of the modes.
    sigma_angstrom : float, default 2.0
        Template Gaussian width.
    working_size_px : int, default 128
        Images are Fourier-cropped to this size.
    poses : {"search", "local", "fixed"}, default "search"
        Global search, refinement from the particles' poses, or the poses kept.
    search_step_degrees, search_resolution_angstrom, max_shift_px, n_candidates
        The rigid search: SO(3) grid step, resolution band, shift range (working pixels) and
        orientations refined.
    elastic_range_angstrom, elastic_spacing_angstrom, elastic_candidates
        The elastic search: deformed references up to this RMS displacement (0: off), their
        spacing, and orientations kept per deformed reference.
    screen_steps, screen_resolution_angstrom
        Candidates screened by this many steps at this band; the best refined in full.
    population_search, amplitude_step_angstrom, max_rounds
        Refinement controls (see ``deephemnma align --help``).
    refine_resolution_angstrom, iterations : pair
        The two refinement bands and Adam steps per band.
    amplitude_starts_angstrom : sequence of float, default (0.0,)
        Starting amplitudes of the first mode.
    ctf : {"full", "flip"}, default "full"
        CTF in the template, or phase-flipped images.
    outliers : float, optional
        Flag particles whose amplitudes' Mahalanobis distance exceeds this (e.g. 3.2).
    batch_size, checkpoint_every : int
        Particles aligned at once; particles between checkpoints.
    restart : bool, default False
        Discard an unfinished earlier run instead of resuming it.
    overwrite : bool, default False
        Replace an existing ``out`` that this package did not write.
    relion_version : {"3.0", "3.1"}, default "3.1"
        STAR flavour written.
    device : str, default "auto"
        ``"auto"`` (GPU when present), ``"cpu"`` or ``"cuda"``.
    threads : int, default 0
        CPU threads (0: torch's default, or 1 when the machine is busy).
    progress : bool or callable, default True
        The package's progress bar, none, or a callback ``f(done, total)``.
    log : callable or None, default print
        Where the lines (modes table, summary) go; None for silence.

    Returns
    -------
    ParticleTable
        Every particle with its poses and ``dhnAmplitude<mode>``, ``dhnCost``,
        ``dhnConverged`` ... columns (as written to ``out/particles.star``). Under torchrun,
        ranks other than 0 return the input table (rank 0 writes and returns the results).

    Raises
    ------
    InputError
        A bad option or input, named in the message.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from deephemnma_bridge.api import align, simulate
    >>> tmp = Path(tempfile.mkdtemp())
    >>> sim = simulate(out=tmp / "sim", n_particles=4, box_px=48, pixel_size_angstrom=3.0,
    ...                seed=1, device="cpu", progress=False, log=None)
    >>> aligned = align(sim.particles, sim.modes, out=tmp / "aligned", use_modes=[7, 8],
    ...                 working_size_px=32, search_step_degrees=30, n_candidates=1,
    ...                 elastic_range_angstrom=0, device="cpu", threads=1, progress=False,
    ...                 log=None)
    >>> len(aligned), sorted(k for k in aligned.extra if k.startswith("dhnAmplitude"))
    (4, ['dhnAmplitude7', 'dhnAmplitude8'])
    >>> (tmp / "aligned" / "particles.star").is_file()
    True
    """
    import torch

    from ..adapters import ParticleImages, write_particles
    from ..adapters.images import portable_image_paths
    from ..alignment.ctf import CTFParams
    from ..alignment.hemnma import (
        AlignmentConfig,
        SearchLibrary,
        SymmetryCopies,
        align_batch,
        mahalanobis_outliers,
    )
    from ..conventions import matrix_to_euler
    from ..device import resolve_device
    from ..fileutils import atomic_dir, check_not_input, check_output_dir, file_sha256
    from ..nma.modes import DEFAULT_MIN_COLLECTIVITY
    from ..preprocess import PreprocessConfig, preprocess_images
    from ..symmetry import parse_symmetry
    from ._sharded import ShardedRun, check_images, in_lanes, input_identity, lane_count

    out = Path(out)
    inputs = input_files(particles, modes)
    check_not_input(out, *inputs)
    check_output_dir(out, command="align", inputs=inputs, overwrite=overwrite)
    for option, value, options in (
        ("--template", template, ("residues", "nodes", "atoms")),
        ("--final-template", final_template, ("atoms", "same")),
        ("--deformation", deformation, ("linear", "nonlinear")),
        ("--poses", poses, ("search", "local", "fixed")),
        ("--ctf", ctf, ("full", "flip")),
        ("--relion-version", relion_version, ("3.0", "3.1")),
    ):
        choice(option, value, options)
    kind, order = parse_symmetry(symmetry)
    symmetry = f"{kind}{order}"
    if isinstance(use_modes, str):
        if use_modes.strip().lower() != "auto":
            raise InputError(f"--use-modes {use_modes!r}: give mode numbers or auto")
        use_modes = "auto"
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    table, particles_path = read_table(particles)
    name = label(particles_path)
    n = len(table)
    if n == 0:
        raise InputError(f"{name}: no particles")
    if poses != "search" and table.rotation_matrices is None:
        raise InputError(f"{name} has no poses; use --poses search")
    boxes = np.unique(table.box_size_px)
    pixels = np.unique(np.round(table.pixel_size_angstrom, 6))
    if len(boxes) != 1 or len(pixels) != 1:
        raise InputError(
            f"{name}: mixed box sizes {boxes.tolist()} or pixel sizes "
            f"{pixels.tolist()}; align each optics group separately (deephemnma subset)"
        )
    box, pixel = int(boxes[0]), float(pixels[0])
    working = min(box, working_size_px)
    work_pixel = pixel * box / working
    torch_device = resolve_device(device)
    lanes = 1
    if torch_device.type == "cpu":
        n_threads, why = cpu_threads(threads)
        torch.set_num_threads(n_threads)
        lanes = n_threads if LANES is None else LANES
        how = f" in {lanes} lanes of one thread" if lanes > 1 else ""
        warn_line(log, f"{n_threads} CPU thread(s){how}: {why} (--threads to choose)")
    if len(refine_resolution_angstrom) != 2 or len(iterations) != 2:
        raise InputError("--refine-resolution and --iterations take two values each, e.g. 7,4")
    config = AlignmentConfig(
        search_step_degrees=search_step_degrees,
        search_resolution_angstrom=search_resolution_angstrom,
        max_shift_px=max_shift_px,
        n_candidates=n_candidates,
        elastic_range_angstrom=elastic_range_angstrom,
        elastic_spacing_angstrom=elastic_spacing_angstrom,
        elastic_candidates=elastic_candidates,
        population_centres=population_search,
        screen_iterations=screen_steps,
        screen_resolution_angstrom=screen_resolution_angstrom,
        amplitude_lr_angstrom=(amplitude_step_angstrom[0], amplitude_step_angstrom[-1]),
        max_rounds=max_rounds,
        refine_resolution_angstrom=(refine_resolution_angstrom[0], refine_resolution_angstrom[1]),
        iterations=(iterations[0], iterations[1]),
        amplitude_starts=tuple(amplitude_starts_angstrom) or (0.0,),
        ctf=ctf,  # type: ignore[arg-type]
        sigma_angstrom=sigma_angstrom,
        fixed_poses=poses == "fixed",
        local_poses=poses == "local",
    )
    images = ParticleImages(table)
    check_images(images, table)  # missing stacks fail now, not after the set-up
    all_modes, modes_path = load_modes(modes)
    modes_id = all_modes.fingerprint()
    requested = use_modes if isinstance(use_modes, str) else [int(m) for m in use_modes]
    threshold = DEFAULT_MIN_COLLECTIVITY if min_collectivity is None else min_collectivity
    chosen, mode_table = choose_modes(
        all_modes,
        requested,
        min_collectivity=min_collectivity,
        n_auto_modes=n_auto_modes,
    )
    group, symmetry_info = symmetry_group(all_modes, symmetry)
    if symmetry_search and group is None:
        raise InputError(
            f"--symmetry-search tries the symmetry copies of each pose and needs a group, "
            f"but --symmetry is {symmetry}: add --symmetry Cn or Dn (or drop --symmetry-search)"
        )
    # the search tries the equivalent poses (a group, and poses that may move)
    search_copies = bool(symmetry_search and group is not None and poses != "fixed")
    if int(os.environ.get("RANK", "0")) == 0:
        for line in mode_table_lines(mode_table, threshold):
            say(log, line)
        if group is not None:
            axes = "RELION's axes" if symmetry_info["relion_axes"] else "the model's own axes"
            pseudo = (
                f", pseudo-symmetric: {symmetry_info['half_step_deviation_angstrom']:.2f} Å "
                "turned by half a step"
                if symmetry_info["pseudo"]
                else ""
            )
            search = "equivalent poses searched" if search_copies else "poses folded only"
            say(
                log,
                f"symmetry {symmetry} about {axes} (n-fold axis "
                f"{symmetry_info['n_fold_axis']}, deviation "
                f"{symmetry_info['deviation_angstrom']:.2f} Å{pseudo}): {search}",
            )
    reference, used_template, final_reference = build_reference(
        all_modes,
        chosen,
        template=template,
        final_template=final_template,
        deformation=deformation,
        box_angstrom=box * pixel,
        device=torch_device,
        log=log,
    )
    settings = {
        "particles": input_identity(particles_path, table),
        "modes": str(modes_path) if modes_path is not None else None,
        "modes_sha256": file_sha256(modes_path) if modes_path is not None else modes_id,
        "use_modes": chosen,
        "use_modes_requested": requested,
        "min_collectivity": threshold,
        "symmetry": symmetry,
        "symmetry_search": search_copies,
        "template": used_template,
        "final_template": "atoms" if final_reference is not None else used_template,
        "deformation": deformation,
        "working_size_px": working,
        "working_pixel_angstrom": work_pixel,
        "poses": poses,
        **config.to_dict(),
    }
    m = len(chosen)
    fields = {
        "amplitudes": ((m,), np.float64),
        "rotations": ((3, 3), np.float64),
        "shifts": ((2,), np.float64),
        "cost": ((), np.float64),
        "converged": ((), np.bool_),
        "at_limit": ((), np.bool_),
        "moved": ((), np.bool_),
    }
    run = ShardedRun(out, n, fields, settings, torch_device, checkpoint_every, restart=restart)
    mine, todo = run.mine, run.todo
    prep = PreprocessConfig(output_size_px=working, phase_flip=False, normalise="whole")
    bar = progress_bar(
        progress,
        len(mine),
        initial=len(mine) - len(todo),
        desc=f"align[{run.rank}]" if run.world > 1 else "align",
    )
    copies = None
    if search_copies:  # the equivalent poses, each with its copy's amplitudes
        copies = SymmetryCopies.build(reference, group)
    with run.guard():
        library = None
        if poses == "search" and len(todo):  # the reference's projections, once per run
            library = SearchLibrary.build(reference, config, working, work_pixel, torch_device)
        starts = iter(range(0, len(todo), batch_size))
        reading, storing = threading.Lock(), threading.Lock()

        def prepare() -> tuple[Any, ...] | None:
            """The next batch read (one lane at a time) and preprocessed; None at the end."""
            with reading:
                start = next(starts, None)
                if start is None:
                    return None
                local = todo[start : start + batch_size]
                rows = mine[local]
                raw = torch.as_tensor(images.read(rows), device=torch_device)
            ctf_raw = CTFParams.from_table(table, rows, device=torch_device)
            x = preprocess_images(raw, pixel_size_angstrom=pixel, config=prep)
            rot = shifts = None
            if table.rotation_matrices is not None and poses != "search":
                rot = torch.as_tensor(table.rotation_matrices[rows], device=torch_device)
                shifts = torch.as_tensor(table.shifts_angstrom[rows], device=torch_device)
            return local, x, ctf_raw, rot, shifts

        def fit(batch: tuple[Any, ...]) -> Any:
            _, x, ctf_raw, rot, shifts = batch
            with torch.enable_grad():  # lanes run without autograd
                return align_batch(
                    x,
                    ctf_raw,
                    reference,
                    config,
                    pixel_size_angstrom=work_pixel,
                    rotations=rot,
                    shifts_angstrom=shifts,
                    final_reference=final_reference,
                    library=library,
                    symmetry=copies,
                )

        def finish(batch: tuple[Any, ...], result: Any) -> None:
            local = batch[0]
            with storing:
                run.store(
                    local,
                    amplitudes=result.amplitudes,
                    rotations=result.rotations,
                    shifts=result.shifts_angstrom,
                    cost=result.cost,
                    converged=result.converged,
                    at_limit=result.extra["at_limit"],
                    moved=result.extra["symmetry_element"] > 0,
                )
                bar.update(len(local))

        t0 = time.perf_counter()
        lanes = lane_count(lanes, len(todo), batch_size)
        if lanes > 1:
            in_lanes(prepare, fit, lambda result: result, finish, lanes=lanes)
        else:
            while (batch := prepare()) is not None:
                finish(batch, fit(batch))
    bar.close()
    elapsed = time.perf_counter() - t0
    merged = run.merge()
    if merged is None:  # another rank than 0: rank 0 writes the outputs
        run.close(success=False)
        return table
    amplitudes, rotations, shifts_all = merged["amplitudes"], merged["rotations"], merged["shifts"]
    cost, converged = merged["cost"], merged["converged"]
    symmetry_element = None
    if group is not None:  # one representative of {A g}: the one nearest the identity
        from ..symmetry import fold_poses

        rotations, symmetry_element = fold_poses(rotations, group)
    columns: dict[str, Any] = {f"dhnAmplitude{k}": amplitudes[:, j] for j, k in enumerate(chosen)}
    columns["dhnCost"] = cost
    columns["dhnModes"] = np.full(n, modes_id, dtype=object)  # which modes: predict/analyze check
    columns["dhnConverged"] = converged.astype(np.int64)
    at_limit = merged["at_limit"]
    columns["dhnAtLimit"] = at_limit.astype(np.int64)
    # RMS displacement of the fitted deformation: |q| / sqrt(N) (unit-norm modes over 3N)
    columns["dhnRmsDisplacement"] = np.linalg.norm(amplitudes, axis=1) / np.sqrt(all_modes.n_nodes)
    if at_limit.any():
        warnings.warn(
            f"{int(at_limit.sum())} of {n} particles' amplitudes were still moving after "
            f"{config.max_rounds} rounds of each band (flagged _dhnAtLimit 1): their amplitudes "
            "may be short of the truth; raise --max-rounds or --amplitude-step",
            UserWarning,
            stacklevel=2,
        )
    if symmetry_element is not None:  # the g applied: the unfolded pose is A g^-1
        columns["dhnSymmetryElement"] = symmetry_element
    flagged_rows = None
    if outliers is not None:
        flagged_rows, distance = mahalanobis_outliers(amplitudes, outliers)
        columns["dhnMahalanobis"] = distance
        columns["dhnOutlier"] = flagged_rows.astype(np.int64)
    out_table = table.with_poses(rotations, shifts_all).with_extra(**columns)
    out_table = portable_image_paths(out_table)  # reachable from the output folder too
    with atomic_dir(out, command="align", inputs=inputs, overwrite=overwrite) as tmp:
        write_particles(out_table, tmp / "particles.star", relion_version=relion_version)
        write_particles(out_table, tmp / "particles.cs")
        if flagged_rows is not None:
            for part, sel in (("inliers", ~flagged_rows), ("outliers", flagged_rows)):
                write_particles(
                    out_table.mask(sel), tmp / f"{part}.star", relion_version=relion_version
                )
                write_particles(out_table.mask(sel), tmp / f"{part}.cs")
        eulers = matrix_to_euler(rotations)
        info = {
            "settings": settings,
            "n_particles": n,
            "n_failed": int((~converged).sum()),
            "n_outliers": None if flagged_rows is None else int(flagged_rows.sum()),
            "seconds_rank0": round(elapsed, 2),
            "world_size": run.world,
            "device": str(torch_device),
            "median_cost": float(np.nanmedian(cost)),
            "tilt_range_degrees": [float(eulers[:, 1].min()), float(eulers[:, 1].max())],
            "modes_table": mode_table,
            "symmetry": {
                **symmetry_info,
                "search": search_copies,
                "n_moved_by_search": int(merged["moved"].sum()),
                "poses": "unchanged"
                if group is None
                else "folded: A g nearest the identity (g in the group, _dhnSymmetryElement); "
                "amplitudes unchanged, they refer to the copy of the pose found",
                "group": None if group is None else np.asarray(group).round(9).tolist(),
            },
        }
        (tmp / "alignment.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    run.close(success=True)
    failed = f", {info['n_failed']} failed (NaN cost)" if info["n_failed"] else ""
    flagged = "" if flagged_rows is None else f", {int(flagged_rows.sum())} outliers flagged"
    if group is not None:
        if search_copies:
            flagged += (
                f", {int(merged['moved'].sum())} moved to an equivalent pose by the {symmetry} "
                "search"
            )
        flagged += f", poses folded by {symmetry} symmetry (amplitudes unchanged)"
    say(log, f"aligned {n} particles in {elapsed:.1f} s{failed}{flagged} -> {out}")
    return out_table
