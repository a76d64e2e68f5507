"""The conformational space of particles: PCA of amplitudes, groups, subsets, models, report.

PARTICLES carries _dhnAmplitude<mode> columns (from `deephemnma align` or `predict`; the
_dhnSource column tells HEMNMA and network particles apart, both are used). Writes into DIR:
  particles.star / .cs    every particle with _dhnPC1, _dhnPC2(, _dhnPC3) and _dhnGroup
  pca.npz                 the fitted space (--space projects new particles into it)
  groups/group_NN.star/.cs and group_NN_reconstruct.sh (the relion_reconstruct command);
                          with --subset-poses trusted (the default) only particles whose
                          poses are trusted (_dhnTrusted 1: HEMNMA's, and the network's that
                          pass --min-confidence / --max-cost); the others in untrusted.star
  selection.star/.cs      with --box / --polygon / --select
  models/                 with --modes: each group's centroid model (PDB + mmCIF), PC-axis
                          trajectories (multi-model PDB) and view.cxc for ChimeraX
  pc_space.png, amplitudes.png (, errors.png with ground truth), report.md

Groups: --groups bins (default: quasi-uniform bins along PC1 with at least --min-count
particles each, the paper's rule; the paper used 900), kmeans or gmm (--n-groups), or none.

Examples:
  deephemnma analyze predicted/particles.star --modes modes.npz --out space
  deephemnma analyze predicted/particles.star --groups kmeans --n-groups 5 --out space
  deephemnma analyze p.star --select "PC1 > 0 and A7 < 10" --out space
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``deephemnma analyze``."""
    p = parser.add_argument
    p("particles", type=Path, help="STAR or .cs with _dhnAmplitude<mode> columns")
    p("--out", type=Path, required=True, help="output folder")
    p(
        "--overwrite",
        action="store_true",
        help="replace an existing --out folder that this command did not write",
    )
    p("--modes", type=Path, default=None, help="modes .npz, for centroid models and trajectories")
    p("--components", type=int, choices=[2, 3], default=2)
    p("--space", type=Path, default=None, help="project into this saved pca.npz instead of fitting")
    p("--groups", choices=["bins", "kmeans", "gmm", "none"], default="bins")
    p(
        "--min-count",
        type=int,
        default=None,
        help="smallest group for bins (default: a fifth of the particles, at least 10)",
    )
    p("--n-groups", type=int, default=4, help="clusters for kmeans / gmm (4)")
    p("--exclude-tails", type=float, default=0.0, help="fraction left out at each PC1 end")
    p(
        "--subset-poses",
        choices=["trusted", "all"],
        default="trusted",
        help="group subsets and the selection hold only particles with trusted poses (default: "
        "HEMNMA's, and the network's that pass --min-confidence and --max-cost) or all",
    )
    p(
        "--min-confidence",
        type=float,
        default=0.5,
        help="network particles need this pose confidence (_dhnConfidence) to be trusted (0.5)",
    )
    p(
        "--max-cost",
        default="auto",
        help="network particles need a _dhnCost at most this to be trusted (a number, auto: "
        "the 99th percentile of the HEMNMA particles' costs, or none)",
    )
    p("--box", default=None, help="selection box, e.g. PC1:-1:1,PC2:0:5 (also A7:..)")
    p("--polygon", default=None, help="selection polygon in PC1-PC2: x1,y1;x2,y2;x3,y3")
    p("--select", default=None, help="selection expression, e.g. 'PC1 > 0 and A7 < 10'")
    p("--frames", type=int, default=10, help="frames of each PC-axis trajectory (10)")
    p("--training", type=Path, default=None, help="training folder: its curves go in the report")
    p("--relion-version", choices=["3.0", "3.1"], default="3.1")
    p("--seed", type=int, default=0)


def _box(text: str) -> dict[str, tuple[float, float]]:
    out = {}
    for part in text.split(","):
        bits = part.split(":")
        if len(bits) != 3:
            raise InputError(f"--box {text!r}: use AXIS:LOW:HIGH[,AXIS:LOW:HIGH]")
        try:
            out[bits[0]] = (float(bits[1]), float(bits[2]))
        except ValueError:
            raise InputError(f"--box {text!r}: LOW and HIGH must be numbers") from None
    return out


def _polygon(text: str) -> list[tuple[float, float]]:
    try:
        return [(float(a), float(b)) for a, b in (v.split(",") for v in text.split(";"))]
    except ValueError:
        raise InputError(f"--polygon {text!r}: use x1,y1;x2,y2;x3,y3") from None


def _atomic_model(modes: Any) -> Any:
    """The all-atom model that moves with the nodes, else a Cα/node trace."""
    from ..adapters.structure import read_structure
    from ..structure import AtomicModel

    path = modes.settings.get("model")
    if modes.atom_coordinates is not None and path and Path(path).is_file():
        chains = modes.settings.get("chains")
        try:
            model = read_structure(path, chains=chains.split(",") if chains else None)
        except InputError:
            model = None
        if model is not None:
            heavy = np.array([str(e).upper() not in ("H", "D") for e in model.elements])
            model = model.select(heavy)
            if len(model) == len(modes.atom_coordinates):
                return model.with_coordinates(np.asarray(modes.atom_coordinates)), modes.atom_node
    n = modes.n_nodes
    text = lambda v: np.full(n, v, dtype=object)  # noqa: E731
    trace = AtomicModel(
        coordinates_angstrom=np.asarray(modes.coordinates),
        elements=text("C"),
        atom_names=text("CA"),
        residue_names=text("ALA"),
        residue_numbers=np.arange(1, n + 1),
        insertion_codes=text(""),
        chain_ids=text("A"),
        residue_index=np.arange(n),
        b_factors=np.zeros(n),
        occupancies=np.ones(n),
        polymer_kind=text("amino"),
        name="nodes",
    )
    return trace, np.arange(n)


def trusted_poses(extra: Any, args: argparse.Namespace) -> tuple[np.ndarray, str]:
    """Which particles' poses are trusted, and how it was decided (one line).

    HEMNMA's particles (``_dhnSource`` hemnma, or no such column: an ``align`` output) are
    trusted when their cost is finite (they converged). A network particle (``_dhnSource``
    network) is trusted when it passes every test its columns allow: ``_dhnConfidence`` at
    least ``--min-confidence`` and ``_dhnCost`` at most ``--max-cost``; a network particle with
    neither column cannot be judged and is not trusted.
    """
    n = len(next(iter(extra.values()))) if extra else 0
    source = np.asarray(extra.get("dhnSource", np.full(n, "hemnma")), dtype=object).astype(str)
    cost = np.asarray(extra["dhnCost"], dtype=float) if "dhnCost" in extra else None
    hemnma = source != "network"
    trusted = hemnma & (np.isfinite(cost) if cost is not None else True)
    network = ~hemnma
    notes = []
    if network.any():
        judged = np.zeros(n, dtype=bool)
        ok = network.copy()
        if "dhnConfidence" in extra:
            if not 0 <= args.min_confidence <= 1:
                raise InputError(f"--min-confidence is a probability (0-1): {args.min_confidence}")
            conf = np.asarray(extra["dhnConfidence"], dtype=float)
            ok &= conf >= args.min_confidence
            judged |= network
            notes.append(f"confidence >= {args.min_confidence:g}")
        limit = str(args.max_cost).strip().lower()
        if cost is not None and limit != "none":
            if limit == "auto":
                ref = cost[hemnma & np.isfinite(cost)]
                threshold = float(np.percentile(ref, 99)) if len(ref) >= 20 else None
            else:
                try:
                    threshold = float(limit)
                except ValueError:
                    raise InputError(
                        f"--max-cost {args.max_cost!r}: a number, auto or none"
                    ) from None
            if threshold is not None:
                ok &= cost <= threshold
                judged |= network
                notes.append(f"cost <= {threshold:.4f}")
        trusted = trusted | (ok & judged)
        if not judged[network].any():
            notes.append("network poses without _dhnConfidence or _dhnCost are not trusted")
    rule = "HEMNMA's converged particles" + (
        "; network particles with " + " and ".join(notes) if notes else ""
    )
    return np.asarray(trusted, dtype=bool), rule


def _figures(
    out: Path, frame: pd.DataFrame, amps: np.ndarray, modes: list[int], table: Any, space: Any
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, ax = plt.subplots(figsize=(6, 5))
    if len(frame) >= 1000:  # density underneath; the groups on top
        ax.hist2d(frame["PC1"], frame["PC2"], bins=80, cmap="Greys")
    for g in sorted(set(frame["group"]) - {0}):
        sel = frame["group"] == g
        ax.scatter(frame.loc[sel, "PC1"], frame.loc[sel, "PC2"], s=3, alpha=0.5, label=f"{g}")
    ax.set_xlabel(f"PC1 ({100 * space.explained_variance_ratio[0]:.0f} %)")
    ax.set_ylabel(f"PC2 ({100 * space.explained_variance_ratio[1]:.0f} %)")
    if frame["group"].max() > 0:
        ax.legend(title="group", markerscale=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pc_space.png", dpi=110)
    plt.close(fig)
    made.append("pc_space.png")
    fig, axes = plt.subplots(1, len(modes), figsize=(3.2 * len(modes), 3), squeeze=False)
    for j, m in enumerate(modes):
        axes[0, j].hist(amps[:, j], bins=50, color="steelblue")
        axes[0, j].set_xlabel(f"amplitude, mode {m} (Å)")
    fig.tight_layout()
    fig.savefig(out / "amplitudes.png", dpi=110)
    plt.close(fig)
    made.append("amplitudes.png")
    truth = [f"dhnTrueAmplitude{m}" for m in modes]
    if all(t in table.extra for t in truth):
        fig, axes = plt.subplots(1, len(modes), figsize=(3.2 * len(modes), 3), squeeze=False)
        for j, m in enumerate(modes):
            true = np.asarray(table.extra[truth[j]], dtype=float)
            varies = np.ptp(true) > 0 and np.ptp(amps[:, j]) > 0
            title = f"r = {np.corrcoef(true, amps[:, j])[0, 1]:.3f}" if varies else "constant"
            axes[0, j].scatter(true, amps[:, j], s=2, alpha=0.5)
            axes[0, j].set_title(f"mode {m}: {title}", fontsize=9)
            axes[0, j].set_xlabel("true (Å)")
            axes[0, j].set_ylabel("estimated (Å)")
        fig.tight_layout()
        fig.savefig(out / "errors.png", dpi=110)
        plt.close(fig)
        made.append("errors.png")
    if "dhnSource" in table.extra or "dhnTrueAngleRot" in table.extra:
        made.append(_source_figure(out, frame, table, plt))
    return made


def _source_figure(out: Path, frame: pd.DataFrame, table: Any, plt: Any) -> str:
    """PC space coloured by where each pose came from (HEMNMA, network; untrusted hollow),
    and, with ground truth, each source's angular errors (one histogram per source: no
    pooled figure that matches neither)."""
    from ..conventions import angle_between_rotations_degrees, euler_to_matrix

    extra = table.extra
    n = len(frame)
    source = np.asarray(extra.get("dhnSource", np.full(n, "hemnma")), dtype=object).astype(str)
    trusted = np.asarray(extra.get("dhnTrusted", np.ones(n)), dtype=float) > 0
    truth = all(f"dhnTrueAngle{a}" in extra for a in ("Rot", "Tilt", "Psi"))
    has_poses = table.rotation_matrices is not None
    fig, axes = plt.subplots(1, 2 if truth and has_poses else 1, figsize=(11, 4.5), squeeze=False)
    ax = axes[0, 0]
    for k, name in enumerate(sorted(set(source))):
        colour = f"C{k}"
        for ok, face in ((True, colour), (False, "none")):
            sel = (source == name) & (trusted == ok)
            if sel.any():
                ax.scatter(
                    frame.loc[sel, "PC1"], frame.loc[sel, "PC2"], s=6, alpha=0.6,
                    facecolors=face, edgecolors=colour,
                    label=f"{name}{'' if ok else ' (untrusted)'} ({int(sel.sum())})",
                )  # fmt: skip
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.legend(fontsize=8, markerscale=2)
    ax.set_title("PC space by pose source", fontsize=10)
    if truth and has_poses:
        true = euler_to_matrix(
            np.stack(
                [np.asarray(extra[f"dhnTrueAngle{a}"], float) for a in ("Rot", "Tilt", "Psi")], 1
            )
        )
        err = angle_between_rotations_degrees(table.rotation_matrices, true)
        ax2 = axes[0, 1]
        bins = np.logspace(-1, np.log10(180), 40)
        for k, name in enumerate(sorted(set(source))):
            e = err[source == name]
            ax2.hist(
                e, bins=bins, histtype="step", color=f"C{k}",
                label=f"{name}: median {np.median(e):.2f}°, p90 {np.percentile(e, 90):.2f}°",
            )  # fmt: skip
        ax2.set_xscale("log")
        ax2.set_xlabel("angular error vs ground truth (°)")
        ax2.set_ylabel("particles")
        ax2.legend(fontsize=8)
        ax2.set_title("pose error by source", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "sources.png", dpi=110)
    plt.close(fig)
    return "sources.png"


def main(args: argparse.Namespace) -> int:
    """Analyse; return 0."""
    from ..adapters import read_particles, write_particles
    from ..adapters.images import portable_image_paths
    from ..adapters.structure import write_models
    from ..analysis import (
        ConformationalSpace,
        bins_along,
        clusters,
        select_box,
        select_expression,
        select_polygon,
    )
    from ..fileutils import atomic_dir, check_not_input, check_output_dir
    from .train import amplitude_columns

    check_not_input(args.out, args.particles)
    inputs = (args.particles,)
    check_output_dir(args.out, command="analyze", inputs=inputs, overwrite=args.overwrite)
    table = read_particles(args.particles)
    modes = amplitude_columns(table.extra)
    if not modes:
        raise InputError(
            f"{args.particles}: no _dhnAmplitude<mode> columns; analyse the output of "
            "`deephemnma align` or `deephemnma predict`"
        )
    amps = np.stack([np.asarray(table.extra[f"dhnAmplitude{m}"], dtype=float) for m in modes], 1)
    if args.modes is not None:  # checked now, not after the analysis
        from ..nma import NormalModes, check_modes_match

        loaded = NormalModes.load(args.modes)
        for recorded in sorted({str(v) for v in table.extra.get("dhnModes", [])}):
            check_modes_match(loaded, recorded, args.modes, f"{args.particles} was aligned with")
    if args.space is not None:
        space = ConformationalSpace.load(args.space)
        if list(space.mode_numbers) != modes:
            raise InputError(
                f"--space {args.space} was fitted on modes {space.mode_numbers}, "
                f"these particles have {modes}"
            )
    else:
        space = ConformationalSpace.fit(amps, modes, n_components=args.components)
    coords = space.transform(amps)
    frame = pd.DataFrame({f"PC{k + 1}": coords[:, k] for k in range(space.n_components)})
    for j, m in enumerate(modes):
        frame[f"A{m}"] = amps[:, j]
    n = len(table)
    if args.groups == "bins":
        min_count = args.min_count if args.min_count is not None else max(10, n // 5)
        groups = bins_along(coords[:, 0], min_count=min_count, exclude_tails=args.exclude_tails)
    elif args.groups in ("kmeans", "gmm"):
        groups = clusters(coords, method=args.groups, k=args.n_groups, seed=args.seed)
    else:
        groups = np.zeros(n, dtype=np.int64)
    frame["group"] = groups
    selection = None
    if args.box or args.polygon or args.select:
        selection = np.ones(n, dtype=bool)
        if args.box:
            selection &= select_box(frame, _box(args.box))
        if args.polygon:
            selection &= select_polygon(coords, _polygon(args.polygon))
        if args.select:
            selection &= select_expression(frame, args.select)
        if not selection.any():
            raise InputError("the selection (--box/--polygon/--select) holds no particle")
    trusted, trust_note = trusted_poses(table.extra, args)
    columns: dict[str, Any] = {f"dhnPC{k + 1}": coords[:, k] for k in range(space.n_components)}
    columns["dhnGroup"] = groups
    columns["dhnTrusted"] = trusted.astype(np.int64)
    in_subsets = trusted if args.subset_poses == "trusted" else np.ones(n, dtype=bool)
    result = portable_image_paths(table.with_extra(**columns))
    report: list[str] = [f"# Conformational space of {args.particles}", ""]
    variance = ", ".join(f"{100 * v:.1f} %" for v in space.explained_variance_ratio)
    report += [
        f"- {n} particles, modes {', '.join(map(str, modes))}",
        f"- PCA: explained variance {variance}",
    ]
    if "dhnSource" in table.extra:
        counts = pd.Series(np.asarray(table.extra["dhnSource"]).astype(str)).value_counts()
        report.append("- sources: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    report.append(f"- trusted poses: {int(trusted.sum())} of {n} ({trust_note})")
    if args.subset_poses == "trusted":
        report.append(
            "- group subsets and the selection hold the trusted particles only; the others are "
            "in untrusted.star (--subset-poses all keeps them)"
        )
    with atomic_dir(args.out, command="analyze", inputs=inputs, overwrite=args.overwrite) as tmp:
        write_particles(result, tmp / "particles.star", relion_version=args.relion_version)
        write_particles(result, tmp / "particles.cs")
        space.save(tmp / "pca.npz")
        (tmp / "groups").mkdir()
        group_ids = [int(g) for g in sorted(set(groups.tolist()) - {0})]
        report += [
            "",
            "## Groups",
            "",
            "| group | particles | in the subset | PC1 range | subset | reconstruct |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        if not in_subsets.all():
            write_particles(
                result.mask(~in_subsets), tmp / "untrusted.star", relion_version=args.relion_version
            )
        for g in group_ids:
            sel = groups == g
            if not (sel & in_subsets).any():
                lo, hi = coords[sel, 0].min(), coords[sel, 0].max()
                report.append(
                    f"| {g} | {int(sel.sum())} | 0 | {lo:.2f} to {hi:.2f} | none: no trusted "
                    "pose | |"
                )
                continue
            sub = result.mask(sel & in_subsets)
            name = f"group_{g:02d}"
            write_particles(
                sub, tmp / "groups" / f"{name}.star", relion_version=args.relion_version
            )
            write_particles(sub, tmp / "groups" / f"{name}.cs")
            star_rel = args.out / "groups" / f"{name}.star"
            command = (
                f"relion_reconstruct --i {star_rel} --o {args.out / 'groups' / name}.mrc --ctf\n"
            )
            (tmp / "groups" / f"{name}_reconstruct.sh").write_text("#!/bin/sh\n" + command)
            lo, hi = coords[sel, 0].min(), coords[sel, 0].max()
            report.append(
                f"| {g} | {int(sel.sum())} | {int((sel & in_subsets).sum())} | "
                f"{lo:.2f} to {hi:.2f} | groups/{name}.star | `{command.strip()}` |"
            )
        if selection is not None:
            chosen = result.mask(selection & in_subsets)
            write_particles(chosen, tmp / "selection.star", relion_version=args.relion_version)
            write_particles(chosen, tmp / "selection.cs")
            report += [
                "",
                f"Selection: {int(selection.sum())} particles, {len(chosen)} with trusted poses "
                "-> selection.star",
            ]
        if args.modes is not None:
            from ..nma import deform_atoms

            nm = loaded
            sel_modes = nm.select(modes)
            model, owner = _atomic_model(nm)
            (tmp / "models").mkdir()
            nodes = sel_modes.coordinates

            def frames_at(amplitude_rows: np.ndarray) -> list[np.ndarray]:
                return list(
                    deform_atoms(
                        model.coordinates_angstrom, owner, nodes, sel_modes.vectors, amplitude_rows
                    )
                )

            cxc = ["# open in ChimeraX: open view.cxc"]
            for g in group_ids:
                centre = amps[groups == g].mean(axis=0, keepdims=True)
                (xyz,) = frames_at(centre)
                for ext in ("pdb", "cif"):
                    write_models(tmp / "models" / f"group_{g:02d}_centroid.{ext}", model, [xyz])
                cxc.append(f"open group_{g:02d}_centroid.pdb")
            for k in range(space.n_components):
                t = np.linspace(-2, 2, max(2, args.frames)) * space.std[k]
                pcs = np.zeros((len(t), space.n_components))
                pcs[:, k] = t
                write_models(
                    tmp / "models" / f"PC{k + 1}_trajectory.pdb",
                    model,
                    frames_at(space.amplitudes_at(pcs)),
                )
                cxc.append(f"open PC{k + 1}_trajectory.pdb coordsets true")
            cxc.append("coordset slider #*")
            (tmp / "models" / "view.cxc").write_text("\n".join(cxc) + "\n")
            report += ["", "Models: models/ (centroids, PC-axis trajectories, view.cxc)"]
        figures = _figures(tmp, frame, amps, modes, result, space)
        if args.training is not None and (args.training / "training.png").is_file():
            shutil.copyfile(args.training / "training.png", tmp / "training.png")
            figures.append("training.png")
        report += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
        (tmp / "report.md").write_text("\n".join(report) + "\n")
    print(f"{n} particles in {len(set(groups.tolist()) - {0})} group(s) -> {args.out} (report.md)")
    return 0
