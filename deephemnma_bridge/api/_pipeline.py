"""The whole DeepHEMNMA pipeline, stage by stage, resumable."""

from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..nma import NormalModes
from ..particles import ParticleTable
from ._common import Log, ModesLike, ParticlesLike, say
from ._train import TrainedNetwork

__all__ = ["PipelineResult", "run_pipeline", "run_stage"]


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    """Where `run_pipeline` put each stage's output.

    Attributes
    ----------
    out : Path
        The pipeline's folder.
    modes : Path
        The modes file used.
    hemnma, network, predicted, analysis : Path
        The stages' folders: `align` on the training subset, `train`, `predict` on every
        particle, `analyze`.
    """

    out: Path
    modes: Path
    hemnma: Path
    network: Path
    predicted: Path
    analysis: Path

    @property
    def particles(self) -> ParticleTable:
        """Every particle with poses, amplitudes, PCs and groups (``analysis/particles.star``)."""
        from ..adapters import read_particles

        return read_particles(self.analysis / "particles.star")

    @property
    def groups(self) -> dict[str, Path]:
        """The groups' subsets (``analysis/groups/group_NN.cs``) by name."""
        return {p.stem: p for p in sorted((self.analysis / "groups").glob("group_*.cs"))}

    def trained_network(self) -> TrainedNetwork:
        """The trained network (``network/best.pt``)."""
        return TrainedNetwork.load(self.network)


def run_stage(
    out: Path,
    name: str,
    settings: dict[str, Any],
    call: Callable[[bool], object],
    log: Log,
    done: Path,
    inputs: Sequence[Path],
) -> None:
    """Run ``call(restart)`` into the folder of ``done`` unless it already finished with the
    same ``settings`` and unchanged ``inputs`` (their modification times are recorded in
    ``out/stages/<name>.json``).

    A stage whose settings or inputs changed starts afresh: a finished one's folder is removed,
    an interrupted one is restarted (``restart`` True: the partial results of align/predict
    would otherwise land on the wrong particles). An interrupted stage with the same settings
    and inputs resumes (``restart`` False).
    """
    record = out / "stages" / f"{name}.json"
    state = {
        "settings": settings,
        "inputs": {str(p): p.stat().st_mtime_ns for p in inputs if p.exists()},
    }
    try:
        old = json.loads(record.read_text()) if record.is_file() else None
    except ValueError:
        old = None
    if not isinstance(old, dict) or "settings" not in old:  # absent, unreadable or older
        old = None if old is None else {"settings": None, "inputs": None, "finished": False}
    same = old is not None and old["settings"] == settings and old["inputs"] == state["inputs"]
    if same and old is not None and old.get("finished") and done.exists():
        say(log, f"[{name}] up to date, skipped")
        return
    restart = False
    if old is not None and not same:
        if done.parent.is_dir() and done.parent != out:
            shutil.rmtree(done.parent)  # this run's own stage folder, with outdated results
        restart = True
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({**state, "finished": False}))
    shown = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "function")
    say(log, f"[{name}] {settings.get('function', name)}({shown})")
    call(restart)
    record.write_text(json.dumps({**state, "finished": True}))


def _input_file(particles: ParticlesLike, out: Path) -> Path:
    """The particle file the stages read: the given one, or a table in memory written to
    ``out/input/`` (rewritten only when its content changed, so finished stages stay valid)."""
    if not isinstance(particles, ParticleTable):
        return Path(particles)
    from ..adapters import write_particles
    from ..adapters.images import portable_image_paths

    name = "particles.cs" if particles.uids is not None else "particles.star"
    final, fresh = out / "input", out / "input.new"
    if fresh.exists():
        shutil.rmtree(fresh)
    fresh.mkdir(parents=True)
    write_particles(portable_image_paths(particles), fresh / name)
    same = final.is_dir() and sorted(os.listdir(final)) == sorted(os.listdir(fresh))
    same = same and all(filecmp.cmp(final / f, fresh / f, shallow=False) for f in os.listdir(fresh))
    if same:
        shutil.rmtree(fresh)
    else:
        if final.exists():
            shutil.rmtree(final)
        fresh.rename(final)
    return final / name


def _modes_file(modes: ModesLike, out: Path) -> Path:
    """The modes file the stages read: the given one, or modes in memory saved to
    ``out/modes/given.npz`` (rewritten only when they changed)."""
    if not isinstance(modes, NormalModes):
        return Path(modes)
    path = out / "modes" / "given.npz"
    if path.is_file():
        try:
            if NormalModes.load(path).fingerprint() == modes.fingerprint():
                return path
        except InputError:
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    modes.save(path)
    return path


def run_pipeline(
    particles: ParticlesLike,
    *,
    out: str | os.PathLike[str],
    model: str | os.PathLike[str] | None = None,
    modes: ModesLike | None = None,
    use_modes: str | Sequence[int] = "auto",
    n_modes: int = 20,
    n_train: int | None = None,
    seed: int = 0,
    outliers: float | None = 3.2,
    align_working_size_px: int = 128,
    align_iterations: Sequence[int] = (40, 25),
    search_step_degrees: float = 10.0,
    deformation: str = "linear",
    population_search: int = 0,
    preset: str = "fast",
    epochs: int | None = None,
    size_px: int | None = None,
    augment: bool = False,
    batch_size: int | None = None,
    groups: str = "bins",
    min_count: int | None = None,
    n_groups: int = 4,
    refine_steps: int = 20,
    orientation_head: str = "grid",
    synthetic_batches: int = 100,
    device: str = "auto",
    workers: int = -1,
    relion_version: str = "3.1",
    overwrite: bool = False,
    claim: bool = True,
    log: Log = print,
) -> PipelineResult:
    """The whole pipeline: modes, HEMNMA on a training subset, outliers, training, prediction
    on every particle, conformational space.

    The command ``deephemnma run`` calls this. Each stage writes into its own subfolder of
    ``out`` (``modes/``, ``subset/``, ``hemnma/``, ``network/``, ``predicted/``,
    ``analysis/``), is skipped when it already finished with the same settings and unchanged
    inputs (a record in ``out/stages/``), and resumes after an interruption (call again).

    Parameters
    ----------
    particles : ParticleTable or path
        Every particle (RELION ``.star``, cryoSPARC ``.cs``, or a table in memory, written
        to ``out/input/``).
    out : path
        The pipeline's folder.
    model : path, optional
        PDB/mmCIF model or MRC map: the modes are computed from it (``n_modes``).
    modes : NormalModes or path, optional
        Modes instead of ``model``.
    use_modes : "auto" or sequence of int, default "auto"
        Modes aligned (see `align`).
    n_modes : int, default 20
        Modes computed from ``model``.
    n_train : int, optional
        Particles aligned by HEMNMA to train the network (a third, 200..20000).
    seed : int, default 0
        Training-subset and split seed.
    outliers : float or None, default 3.2
        Mahalanobis threshold of the training set (None or 0: off).
    align_working_size_px, align_iterations, search_step_degrees, deformation,
    population_search
        HEMNMA settings (see `align`).
    preset, epochs, size_px, augment, batch_size
        Training settings (see `train`).
    groups, min_count, n_groups
        Analysis settings (see `analyze`).
    orientation_head : {"grid", "quaternion"}, default "grid"
        ``grid``: the network learns from fresh images rendered from the reference and modes
        (every epoch synthetic, ``synthetic_batches`` batches each; 30 epochs unless
        ``epochs``, batches of 64, lr 1e-3 then 1e-4 after epoch 20) with the SO(3) grid head
        and the amplitudes read in the light of its orientation (``train``'s
        ``condition_on_orientation``), and ``predict`` refines its top 4 orientations;
        ``quaternion``: the paper's network,
        trained on the HEMNMA labels only (at equal cost it did not learn orientations:
        93° against the grid head's 11°, README).
    synthetic_batches : int, default 100
    refine_steps : int, default 20
        HEMNMA refinement after prediction (see `predict`; 0: the network's values as they
        are).
    device : str, default "auto"
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    workers : int, default -1
        DataLoader workers (-1: auto).
    relion_version : {"3.0", "3.1"}, default "3.1"
        STAR flavour written.
    overwrite : bool, default False
        Use an existing ``out`` that this package did not write.
    claim : bool, default True
        Check ``out`` and mark it as this pipeline's folder (False: the caller owns it, e.g.
        a RELION job directory).
    log : callable or None, default print
        Where the stages' lines go; None for silence.

    Returns
    -------
    PipelineResult

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from deephemnma_bridge.api import run_pipeline, simulate
    >>> tmp = Path(tempfile.mkdtemp())
    >>> sim = simulate(out=tmp / "sim", n_particles=24, box_px=48, pixel_size_angstrom=3.0,
    ...                seed=1, device="cpu", progress=False, log=None)
    >>> result = run_pipeline(sim.particles, modes=sim.modes, out=tmp / "dhn", n_train=12,
    ...                       epochs=1, synthetic_batches=2, size_px=32, align_working_size_px=32,
    ...                       align_iterations=(2, 2), search_step_degrees=40, min_count=6,
    ...                       workers=0, device="cpu", log=None)
    >>> len(result.particles), result.trained_network().mode_numbers
    (24, [7, 8, 9])
    """
    from ..adapters import read_particles, write_particles
    from ..adapters.images import portable_image_paths
    from ..fileutils import claim_output_dir
    from ._align import align
    from ._analyze import analyze
    from ._modes import compute_modes
    from ._predict import predict
    from ._train import train

    out = Path(out)
    if particles is None or (isinstance(particles, str) and not particles):
        raise InputError("no particles: give --particles (a RELION .star or cryoSPARC .cs)")
    if model is None and modes is None:
        raise InputError("no reference: give --model (PDB/mmCIF/map) or --modes (a .npz)")
    if claim:
        given = [x for x in (particles, model, modes) if isinstance(x, str | os.PathLike)]
        claim_output_dir(out, command="run", inputs=given, overwrite=overwrite)
    source = _input_file(particles, out)
    table = read_particles(source)
    n = len(table)
    out.mkdir(parents=True, exist_ok=True)
    chosen = use_modes if isinstance(use_modes, str) else [int(m) for m in use_modes]
    # 1. modes
    if modes is not None:
        modes_path = _modes_file(modes, out)
    else:
        assert model is not None
        modes_path = out / "modes" / "modes.npz"
        run_stage(
            out,
            "modes",
            {"function": "compute_modes", "model": str(model), "n_modes": n_modes},
            lambda restart: compute_modes(model, out=modes_path, n_modes=n_modes, log=log),
            log,
            modes_path,
            [Path(model)],
        )
    # 2. training subset
    n_train = n_train or int(np.clip(n // 3, min(200, n), 20_000))
    if n_train < 10 or n_train > n:
        raise InputError(f"--n-train must be between 10 and the {n} particles, got {n_train}")
    subset = out / "subset" / ("train.cs" if source.suffix.lower() == ".cs" else "train.star")
    rng = np.random.default_rng(int(seed))
    picked = np.sort(rng.choice(n, size=n_train, replace=False))
    subset_record = out / "stages" / "subset.json"
    subset_key = {"particles": str(source), "n_train": n_train, "seed": int(seed)}
    if not (
        subset.exists()
        and subset_record.is_file()
        and json.loads(subset_record.read_text()) == subset_key
    ):
        subset.parent.mkdir(parents=True, exist_ok=True)
        write_particles(portable_image_paths(table.take(picked)), subset)
        subset_record.parent.mkdir(parents=True, exist_ok=True)
        subset_record.write_text(json.dumps(subset_key))
    # 3. HEMNMA on it, with outliers flagged
    hemnma = out / "hemnma"
    align_settings: dict[str, Any] = {
        "use_modes": chosen,
        "working_size_px": align_working_size_px,
        "iterations": [int(v) for v in align_iterations],
        "search_step_degrees": float(search_step_degrees),
        "deformation": deformation,
        "population_search": population_search,
        "outliers": outliers or None,
        "device": device,
    }
    run_stage(
        out,
        "hemnma",
        {"function": "align", "particles": str(subset), "modes": str(modes_path), **align_settings},
        lambda restart: align(
            subset, modes_path, out=hemnma, restart=restart, log=log, **align_settings
        ),
        log,
        hemnma / "particles.star",
        [subset, modes_path],
    )
    training_set = hemnma / ("inliers.star" if outliers else "particles.star")
    # 4. the network
    network = out / "network"
    train_settings: dict[str, Any] = {
        "preset": preset,
        "seed": seed,
        "workers": workers,
        "device": device,
        "size_px": size_px or None,
        "augment": bool(augment),
        "epochs": epochs or None,
        "batch_size": batch_size or None,
    }
    if orientation_head == "grid":  # measured: 4.4° alone, 0.95° refined (README)
        n_epochs = epochs or 30
        train_settings.update(
            orientation_head="grid",
            # amplitudes read in the light of the orientation: r 0.82 / 0.82 / 0.76 alone
            # against 0.81 / 0.68 / 0.63 (README)
            condition_on_orientation=True,
            epochs=n_epochs,
            synthetic_epochs=n_epochs,
            synthetic_batches=synthetic_batches,
            batch_size=batch_size or 64,
            lr=1e-3,
            lr_step_epochs=max(1, (2 * n_epochs) // 3),
            modes=str(modes_path),
        )
    elif orientation_head != "quaternion":
        raise InputError(f"--orientation-head must be grid or quaternion, got {orientation_head!r}")
    run_stage(
        out,
        "network",
        {"function": "train", "aligned": str(training_set), **train_settings},
        lambda restart: train(training_set, out=network, log=log, **train_settings),
        log,
        network / "best.pt",
        [training_set],
    )
    # 5. prediction on every particle (HEMNMA values kept for the training subset)
    predicted = out / "predicted"
    predict_settings: dict[str, Any] = {
        "hemnma": str(training_set),
        "modes": str(modes_path),
        "refine_steps": refine_steps,
        "workers": workers,
        "relion_version": relion_version,
        "device": device,
    }
    run_stage(
        out,
        "predicted",
        {"function": "predict", "particles": str(source), "networks": str(network)}
        | predict_settings,
        lambda restart: predict(
            source, network, out=predicted, restart=restart, log=log, **predict_settings
        ),
        log,
        predicted / "particles.star",
        [source, network / "best.pt", training_set, modes_path],
    )
    # 6. the conformational space
    analysis = out / "analysis"
    analyze_settings: dict[str, Any] = {
        "modes": str(modes_path),
        "groups": groups,
        "n_groups": n_groups,
        "training": str(network),
        "relion_version": relion_version,
        "min_count": min_count or None,
    }
    run_stage(
        out,
        "analysis",
        {"function": "analyze", "particles": str(predicted / "particles.star")} | analyze_settings,
        lambda restart: analyze(
            predicted / "particles.star", out=analysis, log=log, **analyze_settings
        ),
        log,
        analysis / "particles.star",
        [predicted / "particles.star", modes_path],
    )
    return PipelineResult(
        out=out,
        modes=modes_path,
        hemnma=hemnma,
        network=network,
        predicted=predicted,
        analysis=analysis,
    )
