"""The conformational space of particles: PCA of amplitudes, groups, subsets, models, report."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..analysis import ConformationalSpace
from ..errors import InputError
from ..particles import ParticleTable
from ._common import (
    Log,
    ModesLike,
    ParticlesLike,
    amplitude_columns,
    choice,
    input_files,
    label,
    load_modes,
    read_table,
    say,
)
from ._train import TrainedNetwork

__all__ = ["AnalysisResult", "analyze", "trusted_poses"]


@dataclasses.dataclass(frozen=True)
class AnalysisResult:
    """What `analyze` found and wrote.

    Attributes
    ----------
    particles : ParticleTable
        Every particle with ``dhnPC1``, ``dhnPC2`` (, ``dhnPC3``), ``dhnGroup`` and
        ``dhnTrusted`` (as in ``out/particles.star``).
    space : ConformationalSpace
        The PCA of the amplitudes (``out/pca.npz``); project new particles with
        ``space.transform``.
    groups : ndarray of int
        Each particle's group (1, 2, ...; 0: in none).
    trusted : ndarray of bool
        Particles whose poses are trusted (they go in the subsets).
    selection : ndarray of bool or None
        The particles selected by ``box`` / ``polygon`` / ``select``.
    subsets : dict of int to ParticleTable
        Each group's particles with trusted poses (``out/groups/group_NN.star``).
    out : Path
        The output folder.
    report : Path
        ``out/report.md``.
    """

    particles: ParticleTable
    space: ConformationalSpace
    groups: np.ndarray
    trusted: np.ndarray
    selection: np.ndarray | None
    subsets: dict[int, ParticleTable]
    out: Path
    report: Path


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


def trusted_poses(
    extra: Any, *, min_confidence: float = 0.5, max_cost: float | str | None = "auto"
) -> tuple[np.ndarray, str]:
    """Which particles' poses are trusted, and how it was decided (one line).

    HEMNMA's particles (``_dhnSource`` hemnma, or no such column: an ``align`` output) are
    trusted when their cost is finite (they converged). A network particle (``_dhnSource``
    network) with a ``_dhnCost`` (``predict --modes``, refined or not) is trusted when the cost
    is at most ``--max-cost``: the fit of its final pose is what counts (measured on the demo,
    refined particles: cost above the threshold, 48 % beyond 5°; confidence below 0.5, 3 %,
    as many as above it). Without a usable cost, ``_dhnConfidence`` at least
    ``--min-confidence`` decides; a network particle with neither cannot be judged and is not
    trusted.
    """
    n = len(next(iter(extra.values()))) if extra else 0
    source = np.asarray(extra.get("dhnSource", np.full(n, "hemnma")), dtype=object).astype(str)
    cost = np.asarray(extra["dhnCost"], dtype=float) if "dhnCost" in extra else None
    hemnma = source != "network"
    trusted = hemnma & (np.isfinite(cost) if cost is not None else True)
    network = ~hemnma
    notes = []
    if not 0 <= min_confidence <= 1:
        raise InputError(f"--min-confidence is a probability (0-1): {min_confidence}")
    if network.any():
        judged = np.zeros(n, dtype=bool)
        ok = network.copy()
        limit = str(max_cost).strip().lower()
        if cost is not None and limit != "none":
            if limit == "auto":
                ref = cost[hemnma & np.isfinite(cost)]
                threshold = float(np.percentile(ref, 99)) if len(ref) >= 20 else None
            else:
                try:
                    threshold = float(limit)
                except ValueError:
                    raise InputError(f"--max-cost {max_cost!r}: a number, auto or none") from None
            if threshold is not None:
                ok &= cost <= threshold
                judged |= network
                notes.append(f"cost <= {threshold:.4f}")
        if "dhnConfidence" in extra and not judged.any():
            conf = np.asarray(extra["dhnConfidence"], dtype=float)
            ok &= conf >= min_confidence
            judged |= network
            notes.append(f"confidence >= {min_confidence:g} (no cost to judge by)")
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


def analyze(
    particles: ParticlesLike,
    *,
    out: str | os.PathLike[str],
    modes: ModesLike | None = None,
    n_components: int = 2,
    space: ConformationalSpace | str | os.PathLike[str] | None = None,
    groups: str = "bins",
    min_count: int | None = None,
    n_groups: int = 4,
    exclude_tails: float = 0.0,
    subset_poses: str = "trusted",
    min_confidence: float = 0.5,
    max_cost: float | str | None = "auto",
    box: str | Mapping[str, tuple[float, float]] | None = None,
    polygon: str | Sequence[tuple[float, float]] | None = None,
    select: str | None = None,
    frames: int = 10,
    training: TrainedNetwork | str | os.PathLike[str] | None = None,
    relion_version: str = "3.1",
    seed: int = 0,
    overwrite: bool = False,
    log: Log = print,
) -> AnalysisResult:
    """The conformational space: PCA of the amplitudes, groups, subsets, models and a report.

    The command ``deephemnma analyze`` calls this.

    Parameters
    ----------
    particles : ParticleTable or path
        Particles with ``dhnAmplitude<mode>`` columns (`align` or `predict` output).
    out : path
        Output folder: ``particles.star``/``.cs``, ``pca.npz``, ``groups/``, ``models/``
        (with ``modes``), figures and ``report.md``.
    modes : NormalModes or path, optional
        The modes: each group's centroid model and PC-axis trajectories.
    n_components : {2, 3}, default 2
        Principal components kept.
    space : ConformationalSpace or path, optional
        Project into this fitted space instead of fitting one.
    groups : {"bins", "kmeans", "gmm", "none"}, default "bins"
        Quasi-uniform bins along PC1 with at least ``min_count`` particles (the paper's
        rule), clusters (``n_groups``), or none.
    min_count : int, optional
        Smallest bin (a fifth of the particles, at least 10).
    n_groups : int, default 4
        Clusters of kmeans / gmm.
    exclude_tails : float, default 0.0
        Fraction of particles left out at each end of PC1 (bins).
    subset_poses : {"trusted", "all"}, default "trusted"
        Whether subsets hold only particles with trusted poses.
    min_confidence : float, default 0.5
        A network particle's pose confidence needed to be trusted.
    max_cost : float, "auto" or None, default "auto"
        A network particle's cost needed to be trusted (auto: the 99th percentile of the
        HEMNMA particles' costs; None: no cost test).
    box, polygon, select : optional
        A selection: ``{"PC1": (low, high)}`` (or ``"PC1:-1:1,PC2:0:5"``), PC1-PC2 polygon
        vertices (or ``"x1,y1;x2,y2;x3,y3"``), an expression (``"PC1 > 0 and A7 < 10"``).
    frames : int, default 10
        Frames of each PC-axis trajectory.
    training : TrainedNetwork or path, optional
        The training folder: its loss curves go in the report.
    relion_version : {"3.0", "3.1"}, default "3.1"
        STAR flavour written.
    seed : int, default 0
        Seed of kmeans / gmm.
    overwrite : bool, default False
        Replace an existing ``out`` that this package did not write.
    log : callable or None, default print
        Where the summary line goes; None for silence.

    Returns
    -------
    AnalysisResult

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from pathlib import Path
    >>> from deephemnma_bridge.api import analyze, simulate
    >>> tmp = Path(tempfile.mkdtemp())
    >>> sim = simulate(out=tmp / "sim", n_particles=30, box_px=48, pixel_size_angstrom=3.0,
    ...                seed=1, device="cpu", progress=False, log=None)
    >>> truth = sim.particles.extra  # as if aligned exactly
    >>> found = sim.particles.with_extra(
    ...     **{f"dhnAmplitude{m}": truth[f"dhnTrueAmplitude{m}"] for m in (7, 8, 9)})
    >>> result = analyze(found, out=tmp / "space", min_count=10, log=None)
    >>> sorted(result.subsets), result.space.n_components, result.report.is_file()
    ([1, 2], 2, True)
    """
    from ..adapters import write_particles
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

    out = Path(out)
    training_dir = training.path if isinstance(training, TrainedNetwork) else training
    if training_dir is not None and Path(training_dir).is_file():
        training_dir = Path(training_dir).parent  # a checkpoint file: its training folder
    training_dir = None if training_dir is None else Path(training_dir)
    inputs = input_files(particles)
    check_not_input(out, *inputs)
    check_output_dir(out, command="analyze", inputs=inputs, overwrite=overwrite)
    choice("--groups", groups, ("bins", "kmeans", "gmm", "none"))
    choice("--subset-poses", subset_poses, ("trusted", "all"))
    choice("--relion-version", relion_version, ("3.0", "3.1"))
    if n_components not in (2, 3):
        raise InputError(f"--components must be 2 or 3, got {n_components}")
    table, particles_path = read_table(particles)
    name = label(particles_path)
    mode_numbers = amplitude_columns(table.extra)
    if not mode_numbers:
        raise InputError(
            f"{name}: no _dhnAmplitude<mode> columns; analyse the output of "
            "`deephemnma align` or `deephemnma predict`"
        )
    amps = np.stack(
        [np.asarray(table.extra[f"dhnAmplitude{m}"], dtype=float) for m in mode_numbers], 1
    )
    if modes is not None:  # checked now, not after the analysis
        from ..nma import check_modes_match

        loaded, modes_path = load_modes(modes)
        for recorded in sorted({str(v) for v in table.extra.get("dhnModes", [])}):
            check_modes_match(
                loaded, recorded, label(modes_path, "the modes"), f"{name} was aligned with"
            )
    if space is None:
        pca = ConformationalSpace.fit(amps, mode_numbers, n_components=n_components)
    else:
        where = str(space)
        if isinstance(space, ConformationalSpace):
            pca, where = space, "the given space"
        else:
            pca = ConformationalSpace.load(Path(space))
        if list(pca.mode_numbers) != mode_numbers:
            raise InputError(
                f"--space {where} was fitted on modes {pca.mode_numbers}, "
                f"these particles have {mode_numbers}"
            )
    coords = pca.transform(amps)
    frame = pd.DataFrame({f"PC{k + 1}": coords[:, k] for k in range(pca.n_components)})
    for j, m in enumerate(mode_numbers):
        frame[f"A{m}"] = amps[:, j]
    n = len(table)
    if groups == "bins":
        min_count = min_count if min_count is not None else max(10, n // 5)
        labels = bins_along(coords[:, 0], min_count=min_count, exclude_tails=exclude_tails)
    elif groups in ("kmeans", "gmm"):
        labels = clusters(coords, method=groups, k=n_groups, seed=seed)
    else:
        labels = np.zeros(n, dtype=np.int64)
    frame["group"] = labels
    selection = None
    if box or polygon or select:
        selection = np.ones(n, dtype=bool)
        if box:
            selection &= select_box(frame, _box(box) if isinstance(box, str) else dict(box))
        if polygon:
            vertices = _polygon(polygon) if isinstance(polygon, str) else list(polygon)
            selection &= select_polygon(coords, vertices)
        if select:
            selection &= select_expression(frame, select)
        if not selection.any():
            raise InputError("the selection (--box/--polygon/--select) holds no particle")
    trusted, trust_note = trusted_poses(
        table.extra, min_confidence=min_confidence, max_cost=max_cost
    )
    columns: dict[str, Any] = {f"dhnPC{k + 1}": coords[:, k] for k in range(pca.n_components)}
    columns["dhnGroup"] = labels
    columns["dhnTrusted"] = trusted.astype(np.int64)
    in_subsets = trusted if subset_poses == "trusted" else np.ones(n, dtype=bool)
    result = portable_image_paths(table.with_extra(**columns))
    report: list[str] = [f"# Conformational pca of {name}", ""]
    variance = ", ".join(f"{100 * v:.1f} %" for v in pca.explained_variance_ratio)
    report += [
        f"- {n} particles, modes {', '.join(map(str, mode_numbers))}",
        f"- PCA: explained variance {variance}",
    ]
    if "dhnSource" in table.extra:
        counts = pd.Series(np.asarray(table.extra["dhnSource"]).astype(str)).value_counts()
        report.append("- sources: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    report.append(f"- trusted poses: {int(trusted.sum())} of {n} ({trust_note})")
    if subset_poses == "trusted":
        report.append(
            "- group subsets and the selection hold the trusted particles only; the others are "
            "in untrusted.star (--subset-poses all keeps them)"
        )
    with atomic_dir(out, command="analyze", inputs=inputs, overwrite=overwrite) as tmp:
        write_particles(result, tmp / "particles.star", relion_version=relion_version)
        write_particles(result, tmp / "particles.cs")
        pca.save(tmp / "pca.npz")
        (tmp / "groups").mkdir()
        group_ids = [int(g) for g in sorted(set(labels.tolist()) - {0})]
        report += [
            "",
            "## Groups",
            "",
            "| group | particles | in the subset | PC1 range | subset | reconstruct |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        if not in_subsets.all():
            write_particles(
                result.mask(~in_subsets), tmp / "untrusted.star", relion_version=relion_version
            )
        for g in group_ids:
            sel = labels == g
            if not (sel & in_subsets).any():
                lo, hi = coords[sel, 0].min(), coords[sel, 0].max()
                report.append(
                    f"| {g} | {int(sel.sum())} | 0 | {lo:.2f} to {hi:.2f} | none: no trusted "
                    "pose | |"
                )
                continue
            sub = result.mask(sel & in_subsets)
            name = f"group_{g:02d}"
            write_particles(sub, tmp / "groups" / f"{name}.star", relion_version=relion_version)
            write_particles(sub, tmp / "groups" / f"{name}.cs")
            star_rel = out / "groups" / f"{name}.star"
            command = f"relion_reconstruct --i {star_rel} --o {out / 'groups' / name}.mrc --ctf\n"
            (tmp / "groups" / f"{name}_reconstruct.sh").write_text("#!/bin/sh\n" + command)
            lo, hi = coords[sel, 0].min(), coords[sel, 0].max()
            report.append(
                f"| {g} | {int(sel.sum())} | {int((sel & in_subsets).sum())} | "
                f"{lo:.2f} to {hi:.2f} | groups/{name}.star | `{command.strip()}` |"
            )
        if selection is not None:
            chosen = result.mask(selection & in_subsets)
            write_particles(chosen, tmp / "selection.star", relion_version=relion_version)
            write_particles(chosen, tmp / "selection.cs")
            report += [
                "",
                f"Selection: {int(selection.sum())} particles, {len(chosen)} with trusted poses "
                "-> selection.star",
            ]
        if modes is not None:
            from ..nma import deform_atoms

            nm = loaded
            sel_modes = nm.select(mode_numbers)
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
                centre = amps[labels == g].mean(axis=0, keepdims=True)
                (xyz,) = frames_at(centre)
                for ext in ("pdb", "cif"):
                    write_models(tmp / "models" / f"group_{g:02d}_centroid.{ext}", model, [xyz])
                cxc.append(f"open group_{g:02d}_centroid.pdb")
            for k in range(pca.n_components):
                t = np.linspace(-2, 2, max(2, frames)) * pca.std[k]
                pcs = np.zeros((len(t), pca.n_components))
                pcs[:, k] = t
                write_models(
                    tmp / "models" / f"PC{k + 1}_trajectory.pdb",
                    model,
                    frames_at(pca.amplitudes_at(pcs)),
                )
                cxc.append(f"open PC{k + 1}_trajectory.pdb coordsets true")
            cxc.append("coordset slider #*")
            (tmp / "models" / "view.cxc").write_text("\n".join(cxc) + "\n")
            report += ["", "Models: models/ (centroids, PC-axis trajectories, view.cxc)"]
            report += _second_reference_note(nm, out, group_ids)
        figures = _figures(tmp, frame, amps, mode_numbers, result, pca)
        if training_dir is not None and (training_dir / "training.png").is_file():
            shutil.copyfile(training_dir / "training.png", tmp / "training.png")
            figures.append("training.png")
        report += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
        (tmp / "report.md").write_text("\n".join(report) + "\n")
    say(log, f"{n} particles in {len(set(labels.tolist()) - {0})} group(s) -> {out} (report.md)")
    subsets = {
        int(g): result.mask((labels == g) & in_subsets)
        for g in group_ids
        if ((labels == g) & in_subsets).any()
    }
    return AnalysisResult(
        particles=result,
        space=pca,
        groups=np.asarray(labels),
        trusted=np.asarray(trusted, dtype=bool),
        selection=selection,
        subsets=subsets,
        out=out,
        report=out / "report.md",
    )


def _second_reference_note(modes: Any, out: Path, group_ids: list[int]) -> list[str]:
    """Report lines: how to give a group far from the reference a reference of its own (its
    map, the reference model fitted into it, its modes, HEMNMA again; README, "A second
    reference")."""
    if not group_ids:
        return []
    model = modes.settings.get("model")
    chains = modes.settings.get("chains")
    if not model or str(modes.settings.get("nodes")) == "pseudoatoms":
        return []
    g = f"group_{group_ids[0]:02d}"
    pick = f" --chains {chains}" if chains else ""
    return [
        "",
        "## A group far from the reference",
        "",
        "HEMNMA's poses degrade for particles far from the reference (a hinge closing by tens of "
        "degrees). Such a group gets a reference of its own: its map, the reference model fitted "
        f"into it along its normal modes, and HEMNMA again with the fitted model's modes ({g} "
        "as the example):",
        "",
        "```",
        f"relion_reconstruct --i {out / 'groups' / g}.star --o {out / 'groups' / g}.mrc --ctf",
        f"deephemnma fit {model} {out / 'groups' / g}.mrc{pick} --keep-frame "
        f"--out {out / 'groups' / g}_fitted.pdb",
        f"deephemnma modes {out / 'groups' / g}_fitted.pdb --out {out / 'groups' / g}_fitted.npz",
        f"deephemnma align {out / 'groups' / g}.star --modes {out / 'groups' / g}_fitted.npz "
        f"--out {out / g}_round2",
        "```",
        "",
        f"The same four commands again from round 2's poses ({out / g}_round2/particles.star: "
        'a sharper map, a closer model) improve the poses once more (README, "How far HEMNMA '
        'reaches").',
    ]
