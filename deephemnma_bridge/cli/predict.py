"""Predict amplitudes, orientations and shifts of particles with trained networks.

Streams the images (DataLoader workers, never the whole stack in memory), uses the GPU when
present, checkpoints into OUT.partial/ (rerun to resume) and shards across ranks under
torchrun. Writes OUT/particles.star and OUT/particles.cs with rlnAngleRot/Tilt/Psi,
rlnOriginXAngst/YAngst, _dhnAmplitude<mode> and _dhnSource (network, or hemnma for the
particles taken from --hemnma), every other column kept.

Several --checkpoint folders combine separately trained parts (as in the paper: amplitudes,
orientation, shifts); the last one giving a part wins. With --modes, every particle also gets
_dhnCost (1 - NCC, HEMNMA's similarity) at the prediction, and --refine N first refines the
prediction locally as HEMNMA does (N Adam steps at 7 Å, then N/2 at 4 Å with every atom).
--fallback-cost re-aligns by HEMNMA (global search) the particles whose cost stays above a
threshold (auto: the 99th percentile of the --hemnma particles' costs); they get
_dhnSource hemnma.

Examples:
  deephemnma predict all_particles.star --checkpoint net --out predicted
  deephemnma predict all.star --checkpoint net --modes modes.npz --refine 30 --out refined
  deephemnma predict all.star --checkpoint net --modes modes.npz --refine 80 \
      --hemnma aligned/particles.star --fallback-cost auto --out checked
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``deephemnma predict``."""
    p = parser.add_argument
    p("particles", type=Path, help="RELION .star or cryoSPARC .cs")
    p("--checkpoint", type=Path, nargs="+", required=True, help="folder(s) or .pt file(s)")
    p("--out", type=Path, required=True, help="output folder")
    p(
        "--overwrite",
        action="store_true",
        help="replace an existing --out folder that this command did not write",
    )
    p("--modes", type=Path, default=None, help="modes .npz: adds _dhnCost (and --refine)")
    p(
        "--refine",
        type=int,
        default=0,
        help="HEMNMA refinement from the prediction: N steps at 7 Å, N/2 at 4 Å (needs --modes)",
    )
    p(
        "--deformation",
        choices=["auto", "linear", "nonlinear"],
        default="auto",
        help="deformation model of --modes for the cost and --refine (auto: the one of the "
        "alignment the network was trained on, recorded in its checkpoint)",
    )
    p(
        "--fallback-cost",
        default=None,
        help="re-align by HEMNMA (global search) the particles whose cost stays above this "
        "(a number, or auto: the 99th percentile of the --hemnma particles' _dhnCost)",
    )
    p(
        "--top-k",
        type=int,
        default=4,
        help="grid head: --refine starts from this many orientations of each particle (4)",
    )
    p(
        "--fallback-confidence",
        type=float,
        default=None,
        help="grid head: re-align by HEMNMA (global search) the particles whose pose "
        "confidence (_dhnConfidence, the probability mass around the best orientation) is "
        "below this (needs --modes)",
    )
    p(
        "--hemnma",
        type=Path,
        default=None,
        help="align output whose particles keep their HEMNMA values (_dhnSource hemnma)",
    )
    p("--batch-size", type=int, default=64)
    p(
        "--workers",
        type=int,
        default=-1,
        help="DataLoader workers (-1: auto, 0 on a CPU, up to 4 with a GPU)",
    )
    p("--checkpoint-every", type=int, default=2048, help="particles between checkpoints")
    p(
        "--restart",
        action="store_true",
        help="discard an unfinished earlier run (OUT.partial) instead of resuming it",
    )
    p("--relion-version", choices=["3.0", "3.1"], default="3.1")
    p("--device", default="auto", help="auto (GPU when present), cpu or cuda")


def fallback_threshold(args: argparse.Namespace, aligned: Any) -> float | None:
    """The ``--fallback-cost`` threshold: None, a number, or with ``auto`` the 99th
    percentile of the finite ``_dhnCost`` of ``aligned``, the ``--hemnma`` particles (align's
    output, None without --hemnma)."""
    if args.fallback_cost is None:
        return None
    if args.modes is None:
        raise InputError("--fallback-cost needs --modes (HEMNMA's reference)")
    if str(args.fallback_cost).lower() != "auto":
        try:
            return float(args.fallback_cost)
        except ValueError:
            raise InputError(
                f"--fallback-cost {args.fallback_cost!r}: give a number or auto"
            ) from None
    if aligned is None:
        raise InputError("--fallback-cost auto needs --hemnma (the align output to compare with)")
    costs = np.asarray(aligned.extra.get("dhnCost", []), dtype=float)
    costs = costs[np.isfinite(costs)]
    if len(costs) < 10:
        raise InputError(
            f"--fallback-cost auto: {args.hemnma} has {len(costs)} finite _dhnCost values "
            "(need 10); give a number instead"
        )
    return float(np.percentile(costs, 99))


def main(args: argparse.Namespace) -> int:
    """Predict; return 0."""
    import pandas as pd
    import torch

    from ..adapters import ParticleImages, read_particles, write_particles
    from ..adapters.images import portable_image_paths
    from ..device import loader_workers, resolve_device
    from ..fileutils import atomic_dir, check_not_input, check_output_dir, file_sha256
    from ..preprocess import PreprocessConfig, preprocess_images
    from ..progress import progress
    from ..training.data import CTF_FIELDS, ParticleBatches, ctf_from_rows
    from ..training.targets import TargetSpec, decode
    from ..training.trainer import checkpoint_file, load_checkpoint
    from ._sharded import ShardedRun, check_images, input_identity

    check_not_input(args.out, args.particles, *args.checkpoint)
    in_files = (args.particles, *args.checkpoint)
    in_files += tuple(f for f in (args.modes, args.hemnma) if f is not None)
    check_output_dir(args.out, command="predict", inputs=in_files, overwrite=args.overwrite)
    if args.refine and args.modes is None:
        raise InputError("--refine needs --modes (the modes file the network was trained with)")
    table = read_particles(args.particles)
    n = len(table)
    if n == 0:
        raise InputError(f"{args.particles}: no particles")
    check_images(ParticleImages(table), table)  # missing stacks fail now, not after set-up
    device = resolve_device(args.device)
    nets: list[tuple[Any, dict[str, Any], TargetSpec]] = []
    for path in args.checkpoint:
        model, meta = load_checkpoint(path)
        spec = TargetSpec.from_dict(meta["target"])
        box_a = meta["box_size_px"] * meta["pixel_size_angstrom"]
        ours = float(np.median(table.box_size_px * table.pixel_size_angstrom))
        if abs(box_a - ours) > 0.01 * box_a:
            raise InputError(
                f"{path} was trained on {box_a:.1f} Å boxes, these particles are {ours:.1f} Å; "
                "extract them with the training box and pixel size"
            )
        nets.append((model.to(device), meta, spec))
    provides = {p: k for k, (_, _, spec) in enumerate(nets) for p in spec.parts}
    modes: list[int] = []
    if "amplitudes" in provides:
        modes = list(nets[provides["amplitudes"]][1]["mode_numbers"])
    if ("orientation" not in provides or "shifts" not in provides) and (
        table.rotation_matrices is None
    ):
        raise InputError(
            f"{args.particles} has no poses and the networks do not predict "
            f"{', '.join(p for p in ('orientation', 'shifts') if p not in provides)}"
        )
    boxes = np.unique(table.box_size_px)
    if len(boxes) != 1:
        raise InputError(f"{args.particles}: mixed box sizes {boxes.tolist()}")
    box, pixel = int(boxes[0]), float(np.median(table.pixel_size_angstrom))
    reference = final_reference = config = None
    if args.refine < 0:
        raise InputError(f"--refine must be >= 0 iterations, got {args.refine}")
    if args.top_k < 1:
        raise InputError(f"--top-k must be >= 1, got {args.top_k}")
    grid_head = any(spec.grid is not None for _, _, spec in nets)
    if args.fallback_confidence is not None:
        if not grid_head:
            raise InputError(
                "--fallback-confidence needs a network with the grid orientation head "
                "(train --orientation-head grid)"
            )
        if args.modes is None:
            raise InputError("--fallback-confidence re-aligns by HEMNMA: give --modes")
        if not 0 <= args.fallback_confidence <= 1:
            raise InputError(
                f"--fallback-confidence is a probability (0-1), got {args.fallback_confidence}"
            )
    aligned = None  # --hemnma, read and checked once, before any prediction
    if args.hemnma is not None:
        aligned = read_particles(args.hemnma)
        if aligned.rotation_matrices is None:
            raise InputError(f"--hemnma {args.hemnma}: no poses")
        for m in modes:
            if f"dhnAmplitude{m}" not in aligned.extra:
                raise InputError(f"--hemnma {args.hemnma}: no dhnAmplitude{m} column")
    threshold = fallback_threshold(args, aligned)
    working = min(box, 128)
    work_pixel = pixel * box / working  # HEMNMA's working pixel, as in `deephemnma align`
    deformation = None
    if args.modes is not None:
        from ..alignment.hemnma import AlignmentConfig, SearchLibrary, align_batch
        from .align import build_reference

        if not modes:
            raise InputError("--modes needs a network that predicts amplitudes")
        from ..nma import NormalModes, check_modes_match

        loaded_modes = NormalModes.load(args.modes)
        for path, (_, meta, _) in zip(args.checkpoint, nets, strict=True):
            if meta.get("modes_fingerprint"):
                check_modes_match(
                    loaded_modes, meta["modes_fingerprint"], args.modes, f"{path} was trained on"
                )
        deformation = str(args.deformation)
        if deformation == "auto":
            recorded = {str(meta.get("deformation", "linear")) for _, meta, _ in nets}
            deformation = "nonlinear" if recorded == {"nonlinear"} else "linear"
        reference, _, final_reference = build_reference(
            args.modes, modes, deformation=deformation, box_angstrom=box * pixel, device=device
        )
        # from the prediction (one candidate, no search): N steps at 7 Å with residue blobs,
        # then N/2 at 4 Å with every atom, as the two bands of `deephemnma align`
        config = AlignmentConfig(local_poses=True, iterations=(args.refine, args.refine // 2))
        search = AlignmentConfig()  # the fallback: `deephemnma align`'s defaults
    ctf = np.stack([np.asarray(getattr(table, f), dtype=float) for f in CTF_FIELDS], axis=1)
    fields = {
        "amplitudes": ((len(modes),), np.float64),
        "rotations": ((3, 3), np.float64),
        "shifts": ((2,), np.float64),
        "cost": ((), np.float64),
        "fallback": ((), np.bool_),
        "confidence": ((), np.float64),
    }
    settings = {
        "particles": input_identity(args.particles, table),
        "checkpoints": {str(c): file_sha256(checkpoint_file(c)) for c in args.checkpoint},
        "modes": str(args.modes),
        "modes_sha256": None if args.modes is None else file_sha256(args.modes),
        "refine": args.refine,
        "deformation": deformation,
        "fallback_cost": threshold,
    }
    run = ShardedRun(
        args.out, n, fields, settings, device, args.checkpoint_every, restart=args.restart
    )
    todo_local = run.todo  # positions in this rank's slice
    todo = run.mine[todo_local]
    data = ParticleBatches(ParticleImages(table), todo, ctf[todo])
    batches = torch.utils.data.BatchSampler(
        torch.utils.data.SequentialSampler(data), args.batch_size, drop_last=False
    )
    stream = torch.utils.data.DataLoader(
        data,
        batch_size=None,
        sampler=batches,
        num_workers=loader_workers(args.workers, device),
        pin_memory=device.type == "cuda",
    )
    bar = progress(
        len(run.mine),
        initial=len(run.mine) - len(todo),
        desc=f"predict[{run.rank}]" if run.world > 1 else "predict",
    )
    preps = [PreprocessConfig.from_dict(meta["preprocess"]) for _, meta, _ in nets]
    align_prep = PreprocessConfig(output_size_px=working, phase_flip=False, normalise="whole")
    library: Any = None  # HEMNMA's search library, built at the first fallback
    t0 = time.perf_counter()
    amp = device.type == "cuda"
    with torch.no_grad(), run.guard():
        for images, _, c, pos in stream:
            local = todo_local[pos.numpy()]
            rows = run.mine[local]
            images = images.to(device, non_blocking=True)
            params = ctf_from_rows(c, device)
            out: dict[str, np.ndarray] = {}
            inputs: dict[str, torch.Tensor] = {}  # one preprocessing per distinct setting
            for (model, _, spec), prep in zip(nets, preps, strict=True):
                key = repr(prep)
                if key not in inputs:
                    inputs[key] = preprocess_images(
                        images, pixel_size_angstrom=pixel, config=prep, ctf=params
                    )
                x = inputs[key]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    y = model(x[:, None]).float()
                out.update(decode(spec, y, top_k=args.top_k))
            rot: Any = out.get(
                "rotations",
                table.rotation_matrices[rows] if table.rotation_matrices is not None else None,
            )
            shifts = out.get("shifts", table.shifts_angstrom[rows])
            amps = out.get("amplitudes", np.zeros((len(rows), 0)))
            cost = np.full(len(rows), np.nan)
            fell = np.zeros(len(rows), dtype=bool)
            confidence = out.get("confidence", np.full(len(rows), np.nan))
            starts: Any = rot
            if "candidates" in out and args.refine:
                starts = out["candidates"]  # (B, k, 3, 3): the best of the k is kept
            if reference is not None and config is not None:
                xa = preprocess_images(images, pixel_size_angstrom=pixel, config=align_prep)
                with torch.enable_grad():
                    res = align_batch(
                        xa,
                        params,
                        reference,
                        config,
                        pixel_size_angstrom=work_pixel,
                        rotations=torch.as_tensor(starts),
                        shifts_angstrom=torch.as_tensor(shifts),
                        amplitudes=torch.as_tensor(amps, dtype=torch.float32),
                        # the cost of `align`'s last stage (every atom, 4 Å): comparable
                        final_reference=final_reference,
                    )
                amps, rot, shifts, cost = (
                    res.amplitudes,
                    res.rotations,
                    res.shifts_angstrom,
                    res.cost,
                )
                if threshold is not None:
                    fell = ~(cost <= threshold)  # NaN (failed) too
                if args.fallback_confidence is not None:
                    fell |= ~(confidence >= args.fallback_confidence)
                if fell.any():
                    if library is None:
                        library = SearchLibrary.build(
                            reference, search, working, work_pixel, device
                        )
                    idx = np.flatnonzero(fell)
                    with torch.enable_grad():
                        full = align_batch(
                            xa[torch.as_tensor(idx, device=device)],
                            params.take(idx),
                            reference,
                            search,
                            pixel_size_angstrom=work_pixel,
                            final_reference=final_reference,
                            library=library,
                        )
                    amps[idx], rot[idx], shifts[idx] = (
                        full.amplitudes,
                        full.rotations,
                        full.shifts_angstrom,
                    )
                    cost[idx] = full.cost
            run.store(
                local,
                amplitudes=amps,
                rotations=rot,
                shifts=shifts,
                cost=cost,
                fallback=fell,
                confidence=confidence,
            )
            bar.update(len(rows))
    bar.close()
    elapsed = time.perf_counter() - t0
    merged = run.merge()
    if merged is None:
        run.close(success=False)
        return 0
    source = np.full(n, "network", dtype=object)
    if threshold is not None or args.fallback_confidence is not None:
        source[merged["fallback"]] = "hemnma"
        why = [f"a cost above {threshold:.4f}"] if threshold is not None else []
        if args.fallback_confidence is not None:
            why.append(f"a pose confidence below {args.fallback_confidence:g}")
        print(
            f"{int(merged['fallback'].sum())} particle(s) with {' or '.join(why)} "
            "re-aligned by HEMNMA (global search)"
        )
    amplitudes, rotations, shifts_all = merged["amplitudes"], merged["rotations"], merged["shifts"]
    cost_all = merged["cost"]
    if aligned is not None:
        assert aligned.rotation_matrices is not None  # checked on reading
        where = pd.Index(table.stack_keys).get_indexer(aligned.stack_keys)
        found = where >= 0
        for j, m in enumerate(modes):
            column = np.asarray(aligned.extra[f"dhnAmplitude{m}"], dtype=float)
            amplitudes[where[found], j] = column[found]
        rotations[where[found]] = aligned.rotation_matrices[found]
        shifts_all[where[found]] = aligned.shifts_angstrom[found]
        if "dhnCost" in aligned.extra:
            cost_all[where[found]] = np.asarray(aligned.extra["dhnCost"], dtype=float)[found]
        source[where[found]] = "hemnma"
        print(f"{int(found.sum())} particle(s) keep their HEMNMA values from {args.hemnma}")
    columns: dict[str, Any] = {f"dhnAmplitude{m}": amplitudes[:, j] for j, m in enumerate(modes)}
    columns["dhnSource"] = source
    trained_on = {str(meta.get("modes_fingerprint")) for _, meta, _ in nets} - {"None"}
    if modes and len(trained_on) == 1:
        columns["dhnModes"] = np.full(n, trained_on.pop(), dtype=object)
    if args.modes is not None or aligned is not None:
        columns["dhnCost"] = cost_all
    if grid_head:  # the network's pose confidence (HEMNMA's particles: NaN, not judged)
        conf = np.asarray(merged["confidence"], dtype=float).copy()
        if aligned is not None:
            conf[where[found]] = np.nan
        columns["dhnConfidence"] = conf
    result = table.with_poses(rotations, shifts_all).with_extra(**columns)
    result = portable_image_paths(result)  # reachable from the output folder too
    with atomic_dir(args.out, command="predict", inputs=in_files, overwrite=args.overwrite) as tmp:
        write_particles(result, tmp / "particles.star", relion_version=args.relion_version)
        write_particles(result, tmp / "particles.cs")
    run.close(success=True)
    rate = len(run.mine) / max(elapsed, 1e-9)
    print(f"predicted {n} particles ({rate:.0f}/s on rank 0) -> {args.out}")
    return 0
