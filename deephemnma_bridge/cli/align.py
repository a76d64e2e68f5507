"""HEMNMA alignment: mode amplitudes, orientation and shifts of every particle image.

PARTICLES is a RELION STAR or cryoSPARC .cs file; the reference (network nodes, modes and the
atoms that move with them) comes from a modes file written by `deephemnma modes` or
`deephemnma simulate`. Writes DIR/particles.star and DIR/particles.cs with rlnAngleRot/Tilt/Psi,
rlnOriginXAngst/YAngst, _dhnAmplitude<mode> per mode and _dhnCost (1 - NCC; NaN with
_dhnConverged 0 for a particle that failed), every other column kept, and DIR/alignment.json.

--use-modes auto (the default) takes the --n-auto-modes lowest flexible modes whose
collectivity is at least --min-collectivity, skipping local modes (one loop moving); the table
of modes, chosen or not, is printed and kept in alignment.json. --symmetry Cn/Dn (RELION's
axes: n-fold along z, the Dn 2-fold along x; the model's own axes when it is symmetric about
others) folds every pose onto the representative nearest the identity among its equivalents
A g; the amplitudes are not changed (they refer to the copy the pose found).

Long runs checkpoint into DIR.partial/ every --checkpoint-every particles: rerun the same
command to resume. Shard across processes or machines with torchrun, e.g.
  torchrun --nproc_per_node 2 -m deephemnma_bridge.cli align particles.star --modes m.npz --out a
(each rank aligns a slice; rank 0 merges the results in input order).

Examples:
  deephemnma align sim/particles.star --modes sim/modes.npz --out aligned
  deephemnma align run_data.star --modes modes.npz --poses local --outliers 3.2 --out aligned
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _use_modes(text: str) -> str | list[int]:
    return "auto" if text.strip().lower() == "auto" else _ints(text)


def _symmetry(text: str) -> str:
    from ..symmetry import parse_symmetry

    try:
        kind, n = parse_symmetry(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return f"{kind}{n}"


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``deephemnma align``."""
    p = parser.add_argument
    p("particles", type=Path, help="RELION .star or cryoSPARC .cs")
    p("--modes", type=Path, required=True, help="modes .npz (deephemnma modes / simulate)")
    p(
        "--use-modes",
        type=_use_modes,
        default="auto",
        help="mode numbers (e.g. 7,8,9), or auto (default): the --n-auto-modes lowest flexible "
        "modes with a collectivity >= --min-collectivity",
    )
    p(
        "--min-collectivity",
        type=float,
        default=None,
        help="collectivity threshold of auto; explicit modes below it are warned about "
        "(default 0.2)",
    )
    p("--n-auto-modes", type=int, default=None, help="modes auto takes (3)")
    p(
        "--symmetry",
        type=_symmetry,
        default="C1",
        help="point group Cn or Dn of a (pseudo-)symmetric reference: poses are folded onto "
        "one asymmetric unit (default C1: none)",
    )
    p("--out", type=Path, required=True, help="output folder")
    p(
        "--overwrite",
        action="store_true",
        help="replace an existing --out folder that this command did not write",
    )
    p(
        "--template",
        choices=["residues", "nodes", "atoms"],
        default="residues",
        help="search and first-stage template: residue blobs (default), nodes or atoms",
    )
    p(
        "--final-template",
        choices=["atoms", "same"],
        default="atoms",
        help="last-stage template: every atom (default, when the modes file has them) or the same",
    )
    p(
        "--deformation",
        choices=["linear", "nonlinear"],
        default="linear",
        help="linear: node i moves by sum q u_i (default); nonlinear: each node follows the "
        "local rotation of its neighbourhood (large hinge motions; same amplitudes when small)",
    )
    p("--sigma", type=float, default=2.0, help="template Gaussian width, Å (default 2)")
    p("--working-size", type=int, default=128, help="images Fourier-cropped to this (128)")
    p(
        "--poses",
        choices=["search", "local", "fixed"],
        default="search",
        help="search: global search; local: refine from the file's poses; fixed: keep them",
    )
    p("--search-step", type=float, default=10.0, help="SO(3) grid step, degrees (10)")
    p("--search-resolution", type=float, default=10.0, help="global-search band, Å (10)")
    p("--max-shift", type=float, default=6.0, help="shift search range, working px (6)")
    p("--candidates", type=int, default=3, help="rigid-search orientations refined (3)")
    p(
        "--elastic-range",
        type=float,
        default=8.0,
        help="elastic search: deformed references up to this RMS displacement, Å (8; 0: off)",
    )
    p(
        "--elastic-spacing",
        type=float,
        default=4.0,
        help="elastic search grid spacing, Å RMS per mode (4; widened to keep <= 48 shapes)",
    )
    p(
        "--elastic-candidates",
        type=int,
        default=2,
        help="orientations of the deformed references kept for refinement (2)",
    )
    p(
        "--screen-steps",
        type=int,
        default=10,
        help="candidates screened by this many steps at the first band; only the best of each "
        "particle is refined in full (10; 0: every candidate gets the full band)",
    )
    p(
        "--population-search",
        type=int,
        default=0,
        metavar="K",
        help="second search of each batch with the reference deformed to K centres of the "
        "amplitudes its better-fitting half found; each particle keeps the better pass "
        "(large motions; about doubles the cost; 0: off, the default)",
    )
    p(
        "--amplitude-step",
        type=_floats,
        default=[0.25, 0.1],
        help="Adam step of the amplitudes per band, Å RMS displacement (0.25,0.1)",
    )
    p(
        "--max-rounds",
        type=int,
        default=5,
        help="rounds per band for particles still moving at the band's capacity (5)",
    )
    p("--refine-resolution", type=_floats, default=[7.0, 4.0], help="two bands, Å (7,4)")
    p("--iterations", type=_ints, default=[40, 25], help="Adam steps per band (40,25)")
    p(
        "--amplitude-starts",
        type=_floats,
        default=[0.0],
        help="starting amplitudes of the first mode, Å (default 0)",
    )
    p(
        "--ctf",
        choices=["full", "flip"],
        default="full",
        help="full: CTF in the template (default); flip: phase-flipped images (reference)",
    )
    p(
        "--outliers",
        type=float,
        default=None,
        metavar="T",
        help="flag particles whose amplitudes' Mahalanobis distance exceeds T (e.g. 3.2)",
    )
    p("--batch-size", type=int, default=64, help="particles aligned at once (64)")
    p("--checkpoint-every", type=int, default=512, help="particles between checkpoints")
    p(
        "--restart",
        action="store_true",
        help="discard an unfinished earlier run (OUT.partial) instead of resuming it",
    )
    p("--relion-version", choices=["3.0", "3.1"], default="3.1", help="STAR flavour")
    p("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    p(
        "--threads",
        type=int,
        default=0,
        help="CPU threads (0: torch's default, or 1 when the machine is already busy)",
    )


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


def _config(args: argparse.Namespace) -> Any:
    from ..alignment.hemnma import AlignmentConfig

    if len(args.refine_resolution) != 2 or len(args.iterations) != 2:
        raise InputError("--refine-resolution and --iterations take two values each, e.g. 7,4")
    return AlignmentConfig(
        search_step_degrees=args.search_step,
        search_resolution_angstrom=args.search_resolution,
        max_shift_px=args.max_shift,
        n_candidates=args.candidates,
        elastic_range_angstrom=args.elastic_range,
        elastic_spacing_angstrom=args.elastic_spacing,
        elastic_candidates=args.elastic_candidates,
        population_centres=args.population_search,
        screen_iterations=args.screen_steps,
        amplitude_lr_angstrom=(args.amplitude_step[0], args.amplitude_step[-1]),
        max_rounds=args.max_rounds,
        refine_resolution_angstrom=(args.refine_resolution[0], args.refine_resolution[1]),
        iterations=(args.iterations[0], args.iterations[1]),
        amplitude_starts=tuple(args.amplitude_starts) or (0.0,),
        ctf=args.ctf,
        sigma_angstrom=args.sigma,
        fixed_poses=args.poses == "fixed",
        local_poses=args.poses == "local",
    )


def _reference(args: argparse.Namespace, box_angstrom: float, device: Any) -> Any:
    return build_reference(
        args.modes,
        args.use_modes,
        template=args.template,
        final_template=args.final_template,
        deformation=args.deformation,
        box_angstrom=box_angstrom,
        device=device,
    )


#: above this many atoms the last band renders residue blobs (4YVS, 26k atoms: ~10x cheaper)
MAX_FINAL_ATOMS = 10_000


def build_reference(
    modes_path: Path,
    use_modes: list[int],
    *,
    template: str = "residues",
    final_template: str = "atoms",
    deformation: str = "linear",
    box_angstrom: float,
    device: Any,
) -> Any:
    """(reference, template used, final-stage reference or None) of a modes file, checked
    against the particles' box; shared by ``align`` and ``predict --refine``."""
    from ..alignment.hemnma import ReferenceModel
    from ..nma import NormalModes

    modes = NormalModes.load(modes_path)
    selected = modes.select(use_modes)
    rigid = [m for m in use_modes if m <= 6]
    if rigid:
        raise InputError(f"--use-modes {rigid}: modes 1-6 are rigid-body motions; use 7 and up")
    centre = modes.settings.get("map_centre_angstrom")
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
            centre_angstrom=None if centre is None else np.asarray(centre),
            device=device,
        )

    reference = build(template)
    final = None
    atoms = modes.atom_coordinates
    if final_template == "atoms" and template != "atoms" and atoms is not None:
        if len(atoms) <= MAX_FINAL_ATOMS:
            final = build("atoms")
        else:  # the last band's cost is atoms x Fourier coefficients: residues for big models
            print(
                f"{len(atoms)} atoms: the last band uses residue blobs, not every atom "
                f"(more than {MAX_FINAL_ATOMS}; --final-template same says so explicitly)",
                file=sys.stderr,
            )
    map_box = modes.settings.get("map_box_angstrom")
    if map_box is not None and abs(float(map_box) - box_angstrom) > 0.02 * box_angstrom:
        raise InputError(
            f"the particles' box is {box_angstrom:.1f} Å but the reference map's is "
            f"{float(map_box):.1f} Å: use modes of a map with the particles' box and pixel size"
        )
    if reference.radius_angstrom > 0.5 * box_angstrom:
        raise InputError(
            f"the reference in {modes_path} (radius {reference.radius_angstrom:.1f} Å) does not "
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
    import warnings

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


def _print_mode_table(table: list[dict[str, Any]], threshold: float) -> None:
    print(f"{'mode':>5} {'eigenvalue':>12} {'collectivity':>12}  chosen")
    for row in table:
        low = f"  (local: collectivity < {threshold:g})" if row["collectivity"] < threshold else ""
        mark = "   *" if row["chosen"] else ""
        print(f"{row['mode']:5d} {row['eigenvalue']:12.5g} {row['collectivity']:12.3f}{mark}{low}")


def symmetry_group(modes: Any, symbol: str) -> tuple[Any, dict[str, Any]]:
    """The group (|G|, 3, 3) of ``symbol`` about the reference's rotation centre, and what was
    found: RELION's axes when the model is symmetric about them, else the model's own axes
    (`find_symmetry_frame`). Raises `InputError` when the model has no such symmetry."""
    from ..symmetry import (
        find_symmetry_frame,
        group_order,
        node_spacing,
        point_group,
        symmetry_deviation,
    )

    if symbol == "C1":
        return None, {"symbol": "C1"}
    centre = modes.settings.get("map_centre_angstrom")
    xyz = np.asarray(modes.coordinates, dtype=np.float64)
    xyz = xyz - (xyz.mean(axis=0) if centre is None else np.asarray(centre, dtype=np.float64))
    limit = 0.75 * node_spacing(xyz)  # a node moved by g lands within this of another one
    frame = np.eye(3)
    deviation = symmetry_deviation(xyz, point_group(symbol))
    if deviation > limit:
        frame, deviation = find_symmetry_frame(xyz, symbol)
        if deviation > limit:
            raise InputError(
                f"--symmetry {symbol}: the reference is not {symbol}-symmetric about its "
                f"rotation centre, neither about RELION's axes (z; x for the Dn 2-fold) nor "
                f"about its principal axes (nodes moved by the group land {deviation:.1f} Å RMS "
                f"from the nearest node, more than {limit:.1f} Å); check the symbol"
            )
    info = {
        "symbol": symbol,
        "order": group_order(symbol),
        "relion_axes": bool(np.allclose(frame, np.eye(3))),
        "n_fold_axis": frame[:, 2].round(6).tolist(),
        "two_fold_axis": frame[:, 0].round(6).tolist() if symbol.startswith("D") else None,
        "deviation_angstrom": round(deviation, 3),
    }
    return point_group(symbol, frame), info


def main(args: argparse.Namespace) -> int:
    """Align; return 0."""
    import torch

    from ..adapters import ParticleImages, read_particles, write_particles
    from ..adapters.images import portable_image_paths
    from ..alignment.ctf import CTFParams
    from ..alignment.hemnma import SearchLibrary, align_batch, mahalanobis_outliers
    from ..conventions import matrix_to_euler
    from ..device import resolve_device
    from ..fileutils import atomic_dir, check_not_input, check_output_dir, file_sha256
    from ..nma import NormalModes
    from ..nma.modes import DEFAULT_MIN_COLLECTIVITY
    from ..preprocess import PreprocessConfig, preprocess_images
    from ..progress import progress
    from ._sharded import ShardedRun, check_images, input_identity

    check_not_input(args.out, args.particles, args.modes)
    inputs = (args.particles, args.modes)
    check_output_dir(args.out, command="align", inputs=inputs, overwrite=args.overwrite)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    table = read_particles(args.particles)
    n = len(table)
    if n == 0:
        raise InputError(f"{args.particles}: no particles")
    if args.poses != "search" and table.rotation_matrices is None:
        raise InputError(f"{args.particles} has no poses; use --poses search")
    boxes = np.unique(table.box_size_px)
    pixels = np.unique(np.round(table.pixel_size_angstrom, 6))
    if len(boxes) != 1 or len(pixels) != 1:
        raise InputError(
            f"{args.particles}: mixed box sizes {boxes.tolist()} or pixel sizes "
            f"{pixels.tolist()}; align each optics group separately (deephemnma subset)"
        )
    box, pixel = int(boxes[0]), float(pixels[0])
    working = min(box, args.working_size)
    work_pixel = pixel * box / working
    device = resolve_device(args.device)
    if device.type == "cpu":
        threads, why = cpu_threads(args.threads)
        torch.set_num_threads(threads)
        print(f"{threads} CPU thread(s): {why} (--threads to choose)", file=sys.stderr)
    config = _config(args)
    images = ParticleImages(table)
    check_images(images, table)  # missing stacks fail now, not after the set-up
    all_modes = NormalModes.load(args.modes)
    modes_id = all_modes.fingerprint()
    requested = args.use_modes
    threshold = DEFAULT_MIN_COLLECTIVITY if args.min_collectivity is None else args.min_collectivity
    args.use_modes, mode_table = choose_modes(
        all_modes,
        requested,
        min_collectivity=args.min_collectivity,
        n_auto_modes=args.n_auto_modes,
    )
    group, symmetry_info = symmetry_group(all_modes, args.symmetry)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_mode_table(mode_table, threshold)
        if group is not None:
            axes = "RELION's axes" if symmetry_info["relion_axes"] else "the model's own axes"
            print(
                f"symmetry {args.symmetry} about {axes} (n-fold axis "
                f"{symmetry_info['n_fold_axis']}, deviation "
                f"{symmetry_info['deviation_angstrom']:.2f} Å)"
            )
    reference, template, final_reference = _reference(args, box * pixel, device)
    settings = {
        "particles": input_identity(args.particles, table),
        "modes": str(args.modes),
        "modes_sha256": file_sha256(args.modes),
        "use_modes": args.use_modes,
        "use_modes_requested": requested,
        "min_collectivity": threshold,
        "symmetry": args.symmetry,
        "template": template,
        "final_template": "atoms" if final_reference is not None else template,
        "deformation": args.deformation,
        "working_size_px": working,
        "working_pixel_angstrom": work_pixel,
        "poses": args.poses,
        **config.to_dict(),
    }
    m = len(args.use_modes)
    fields = {
        "amplitudes": ((m,), np.float64),
        "rotations": ((3, 3), np.float64),
        "shifts": ((2,), np.float64),
        "cost": ((), np.float64),
        "converged": ((), np.bool_),
        "at_limit": ((), np.bool_),
    }
    run = ShardedRun(
        args.out, n, fields, settings, device, args.checkpoint_every, restart=args.restart
    )
    mine, todo = run.mine, run.todo
    prep = PreprocessConfig(output_size_px=working, phase_flip=False, normalise="whole")
    bar = progress(
        len(mine),
        initial=len(mine) - len(todo),
        desc=f"align[{run.rank}]" if run.world > 1 else "align",
    )
    with run.guard():
        library = None
        if args.poses == "search" and len(todo):  # the reference's projections, once per run
            library = SearchLibrary.build(reference, config, working, work_pixel, device)
        t0 = time.perf_counter()
        for start in range(0, len(todo), args.batch_size):
            local = todo[start : start + args.batch_size]
            rows = mine[local]
            raw = torch.as_tensor(images.read(rows), device=device)
            ctf_raw = CTFParams.from_table(table, rows, device=device)
            x = preprocess_images(raw, pixel_size_angstrom=pixel, config=prep)
            rot = shifts = None
            if table.rotation_matrices is not None and args.poses != "search":
                rot = torch.as_tensor(table.rotation_matrices[rows], device=device)
                shifts = torch.as_tensor(table.shifts_angstrom[rows], device=device)
            result = align_batch(
                x,
                ctf_raw,
                reference,
                config,
                pixel_size_angstrom=work_pixel,
                rotations=rot,
                shifts_angstrom=shifts,
                final_reference=final_reference,
                library=library,
            )
            run.store(
                local,
                amplitudes=result.amplitudes,
                rotations=result.rotations,
                shifts=result.shifts_angstrom,
                cost=result.cost,
                converged=result.converged,
                at_limit=result.extra["at_limit"],
            )
            bar.update(len(rows))
    bar.close()
    elapsed = time.perf_counter() - t0
    merged = run.merge()
    if merged is None:  # another rank than 0: rank 0 writes the outputs
        run.close(success=False)
        return 0
    amplitudes, rotations, shifts_all = merged["amplitudes"], merged["rotations"], merged["shifts"]
    cost, converged = merged["cost"], merged["converged"]
    symmetry_element = None
    if group is not None:  # one representative of {A g}: the one nearest the identity
        from ..symmetry import fold_poses

        rotations, symmetry_element = fold_poses(rotations, group)
    columns: dict[str, Any] = {
        f"dhnAmplitude{k}": amplitudes[:, j] for j, k in enumerate(args.use_modes)
    }
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
    outliers = None
    if args.outliers is not None:
        outliers, distance = mahalanobis_outliers(amplitudes, args.outliers)
        columns["dhnMahalanobis"] = distance
        columns["dhnOutlier"] = outliers.astype(np.int64)
    out_table = table.with_poses(rotations, shifts_all).with_extra(**columns)
    out_table = portable_image_paths(out_table)  # reachable from the output folder too
    with atomic_dir(args.out, command="align", inputs=inputs, overwrite=args.overwrite) as tmp:
        write_particles(out_table, tmp / "particles.star", relion_version=args.relion_version)
        write_particles(out_table, tmp / "particles.cs")
        if outliers is not None:
            for name, sel in (("inliers", ~outliers), ("outliers", outliers)):
                write_particles(
                    out_table.mask(sel), tmp / f"{name}.star", relion_version=args.relion_version
                )
                write_particles(out_table.mask(sel), tmp / f"{name}.cs")
        eulers = matrix_to_euler(rotations)
        info = {
            "settings": settings,
            "n_particles": n,
            "n_failed": int((~converged).sum()),
            "n_outliers": None if outliers is None else int(outliers.sum()),
            "seconds_rank0": round(elapsed, 2),
            "world_size": run.world,
            "device": str(device),
            "median_cost": float(np.nanmedian(cost)),
            "tilt_range_degrees": [float(eulers[:, 1].min()), float(eulers[:, 1].max())],
            "modes_table": mode_table,
            "symmetry": {
                **symmetry_info,
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
    flagged = "" if outliers is None else f", {int(outliers.sum())} outliers flagged"
    if group is not None:
        flagged += f", poses folded by {args.symmetry} symmetry (amplitudes unchanged)"
    print(f"aligned {n} particles in {elapsed:.1f} s{failed}{flagged} -> {args.out}")
    return 0
