"""Prediction of amplitudes, orientations and shifts of particles with trained networks."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, ParamSpec, TypeVar

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
)
from ._sharded import in_lanes, lane_batches, lane_count
from ._train import TrainedNetwork

if TYPE_CHECKING:
    import torch

    from ..alignment.ctf import CTFParams

__all__ = ["BATCH_SIZE", "NetworkLike", "fallback_threshold", "overlapped", "predict"]

#: A trained network: a `TrainedNetwork`, a training folder (its best.pt) or a .pt file.
NetworkLike = TrainedNetwork | str | os.PathLike[str]

#: `predict` reads, preprocesses and decodes in a background thread during the forward passes
#: (`overlapped`): True, False (the same steps one after another in the calling thread) or
#: None, on a GPU only. On the 2-core CPU it did not pay (idle, end to end against the bare
#: forward pass: 1 thread 89 % with it, 98 % without; 2 threads 64 % and 81 %): the forward
#: already fills the cores. On a GPU the host's work can run while the GPU computes.
OVERLAP: bool | None = None

#: On the CPU, `predict` runs this many lanes (`in_lanes`): threads that each take a whole
#: batch through reading, preprocessing, the forward pass, decoding and storing with one
#: intra-op thread. None: as many as torch's intra-op threads (``torch.get_num_threads()``,
#: OMP_NUM_THREADS), at most one per batch; 1: one batch at a time over every thread.
#: Measured with ResNet34 at 32 px, batch 128, on the idle 2-core machine: two 1-thread
#: forwards side by side ran 1,567-1,601 images/s, one 2-thread forward 1,060-1,125 (one
#: thread 786-839); and the serial steps of one lane (reading, decoding) run while the other
#: lane computes (`benchmarks/bench_network.py --throughput-only`).
LANES: int | None = None

#: `predict`'s default particles per batch (``batch_size`` None): "network" for the networks
#: alone, "hemnma" when modes bring HEMNMA in (its cost and refinement run per batch, with
#: memory that grows with it). A forward pass has a fixed cost (ResNet34 at 32 px, 1 thread:
#: 47 ms for 16 images, 103 for 64, 190 for 128); two bare 1-thread lanes ran 1,394-1,403
#: images/s in batches of 64, 1,519-1,585 of 128, 1,653-1,713 of 256 and 1,666-1,688 of 512
#: (idle 2-core machine, 2026-12-03).
BATCH_SIZE = {"network": 256, "hemnma": 64}

_B = TypeVar("_B")
_Y = TypeVar("_Y")
_D = TypeVar("_D")
_T = TypeVar("_T")
_P = ParamSpec("_P")


class _Batch(NamedTuple):
    """A batch ready for the networks: its positions in this rank's slice, its CTF, the input
    of each network (preprocessed with that network's settings) and HEMNMA's input (if any)."""

    local: np.ndarray
    ctf: CTFParams
    inputs: list[torch.Tensor]
    align_input: torch.Tensor | None


class _Inline(Executor):
    """Runs each task at once, in the calling thread (`overlapped` without the overlap); its
    error is raised by ``result()``, as from a thread (Ctrl-C at once)."""

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        done: Future[_T] = Future()
        try:
            done.set_result(fn(*args, **kwargs))
        except Exception as exc:  # re-raised by result()
            done.set_exception(exc)
        return done


def _background_thread(cuda_device: int | None) -> None:
    """Set-up of `overlapped`'s thread: no autograd, and the caller's GPU (both per thread)."""
    import torch

    torch.set_grad_enabled(False)
    if cuda_device is not None:
        torch.cuda.set_device(cuda_device)


def overlapped(
    prepare: Callable[[], _B | None],
    forward: Callable[[_B], _Y],
    decode: Callable[[_Y], _D],
    finish: Callable[[_B, _D], None],
    *,
    overlap: bool = True,
    device: torch.device | None = None,
) -> None:
    """Run ``finish(batch, decode(forward(batch)))`` for each ``batch = prepare()`` until it
    gives None, in order, with ``prepare`` and ``decode`` in one background thread (``overlap``):
    batch n+1 is prepared and batch n-1 decoded while batch n runs forward in the calling
    thread, which also runs ``finish`` (batch n-1's, after batch n's forward).

    The results are those of the steps run one after another (each step sees the same
    arguments); the background thread's tensors take no gradients. An exception in any step,
    or Ctrl-C, stops the loop: the background thread completes the step it is in, nothing
    more, and the exception propagates from the calling thread; the batches not finished by
    then (at most two) are left unfinished. Without ``overlap`` every step runs in the calling
    thread, in the same order.
    """
    if overlap:
        import torch

        cuda = torch.cuda.current_device() if device is not None and device.type == "cuda" else None
        pool: Executor = ThreadPoolExecutor(
            1, "deephemnma-predict", initializer=_background_thread, initargs=(cuda,)
        )
    else:
        pool = _Inline()
    try:
        ahead = pool.submit(prepare)
        pending: tuple[_B, Future[_D]] | None = None
        while (batch := ahead.result()) is not None:
            ahead = pool.submit(prepare)  # batch n+1, during batch n's forward
            decoding = pool.submit(decode, forward(batch))  # during batch n+1's forward
            if pending is not None:
                finish(pending[0], pending[1].result())
            pending = (batch, decoding)
        if pending is not None:
            finish(pending[0], pending[1].result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def fallback_threshold(
    fallback_cost: float | str | None,
    aligned: ParticleTable | None,
    *,
    has_modes: bool,
    hemnma_name: str = "--hemnma",
) -> float | None:
    """The ``--fallback-cost`` threshold: None, a number, or with ``auto`` the 99th
    percentile of the finite ``_dhnCost`` of ``aligned``, the ``--hemnma`` particles (align's
    output, None without --hemnma)."""
    if fallback_cost is None:
        return None
    if not has_modes:
        raise InputError("--fallback-cost needs --modes (HEMNMA's reference)")
    if str(fallback_cost).lower() != "auto":
        try:
            return float(fallback_cost)
        except ValueError:
            raise InputError(f"--fallback-cost {fallback_cost!r}: give a number or auto") from None
    if aligned is None:
        raise InputError("--fallback-cost auto needs --hemnma (the align output to compare with)")
    costs = np.asarray(aligned.extra.get("dhnCost", []), dtype=float)
    costs = costs[np.isfinite(costs)]
    if len(costs) < 10:
        raise InputError(
            f"--fallback-cost auto: {hemnma_name} has {len(costs)} finite _dhnCost values "
            "(need 10); give a number instead"
        )
    return float(np.percentile(costs, 99))


def predict(
    particles: ParticlesLike,
    networks: NetworkLike | Sequence[NetworkLike],
    *,
    out: str | os.PathLike[str],
    modes: ModesLike | None = None,
    refine_steps: int = 0,
    deformation: str = "auto",
    fallback_cost: float | str | None = None,
    top_k: int = 4,
    tta: int = 0,
    fallback_confidence: float | None = None,
    hemnma: ParticlesLike | None = None,
    batch_size: int | None = None,
    workers: int = -1,
    checkpoint_every: int = 2048,
    restart: bool = False,
    overwrite: bool = False,
    relion_version: str = "3.1",
    device: str = "auto",
    progress: bool | ProgressCallback = True,
    log: Log = print,
) -> ParticleTable:
    """Predict amplitudes, orientations and shifts of particles with trained networks.

    The command ``deephemnma predict`` calls this. Images are streamed (never the whole stack
    in memory); an unfinished run checkpoints into ``out.partial`` and a rerun resumes.

    Parameters
    ----------
    particles : ParticleTable or path
        The particles (one box size).
    networks : TrainedNetwork, path, or a sequence of them
        Trained networks (`train`, `TrainedNetwork.load`, a training folder or ``.pt``).
        Several combine separately trained parts; the last one giving a part wins.
    out : path
        Output folder: ``particles.star`` and ``particles.cs``.
    modes : NormalModes or path, optional
        The modes the network was trained with: adds ``dhnCost`` (and ``refine_steps``).
    refine_steps : int, default 0
        HEMNMA refinement from the prediction: N Adam steps at 7 Å, N/2 at 4 Å.
    deformation : {"auto", "linear", "nonlinear"}, default "auto"
        Deformation model of ``modes`` (auto: the one the network was trained on).
    fallback_cost : float or "auto", optional
        Re-align by HEMNMA (global search) the particles whose cost stays above this (auto:
        the 99th percentile of the ``hemnma`` particles' costs).
    top_k : int, default 4
        Grid head: refinement starts from this many orientations of each particle.
    tta : int, default 0
        Test-time augmentation: the amplitudes averaged over this many in-plane turns of each
        image, 360° / tta apart (an amplitude does not depend on the in-plane angle; the
        network's errors partly do), for ``tta`` times the forward passes; quarter-turns exact,
        other angles interpolated (`preprocess.inplane_views`); orientations, shifts and
        confidence from the image as it is. 0 or 1: off.
    fallback_confidence : float, optional
        Grid head: re-align the particles whose pose confidence is below this.
    hemnma : ParticleTable or path, optional
        `align`'s output, whose particles keep their HEMNMA values (``dhnSource`` hemnma).
    batch_size : int, optional
        Particles per batch; default `BATCH_SIZE`: 256 for the networks alone, 64 when
        ``modes`` brings HEMNMA in (its cost, refinement or fallback per batch).
    workers, checkpoint_every : int
        DataLoader workers (-1: auto), particles between checkpoints.
    restart : bool, default False
        Discard an unfinished earlier run instead of resuming it.
    overwrite : bool, default False
        Replace an existing ``out`` that this package did not write.
    relion_version : {"3.0", "3.1"}, default "3.1"
        STAR flavour written.
    device : str, default "auto"
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    progress : bool or callable, default True
        The package's progress bar, none, or a callback ``f(done, total)``.
    log : callable or None, default print
        Where the summary lines go; None for silence.

    Returns
    -------
    ParticleTable
        Every particle with poses, ``dhnAmplitude<mode>`` and ``dhnSource`` (and
        ``dhnCost``, ``dhnConfidence`` when known), as written to ``out/particles.star``.

    Examples
    --------
    A network trained (one epoch) on the simulator's truth, run on the same particles, with
    the cost of each prediction (``modes=``) and 4 HEMNMA steps from it (``refine_steps=``):

    >>> import tempfile
    >>> import numpy as np
    >>> from pathlib import Path
    >>> from deephemnma_bridge.api import predict, simulate, train
    >>> from deephemnma_bridge.conventions import euler_to_matrix
    >>> tmp = Path(tempfile.mkdtemp())
    >>> sim = simulate(out=tmp / "sim", n_particles=12, box_px=48, pixel_size_angstrom=3.0,
    ...                seed=1, device="cpu", progress=False, log=None)
    >>> truth = sim.particles.extra
    >>> angles = np.stack([truth[f"dhnTrueAngle{a}"] for a in ("Rot", "Tilt", "Psi")], 1)
    >>> labelled = sim.particles.with_poses(euler_to_matrix(angles), np.zeros((12, 2)))
    >>> labelled = labelled.with_extra(
    ...     **{f"dhnAmplitude{m}": truth[f"dhnTrueAmplitude{m}"] for m in (7, 8, 9)})
    >>> net = train(labelled, out=tmp / "net", preset="fast", epochs=1, size_px=32,
    ...             batch_size=4, workers=0, device="cpu", log=None)
    >>> predicted = predict(sim.particles, net, out=tmp / "pred", modes=sim.modes,
    ...                     refine_steps=4, workers=0, device="cpu", progress=False, log=None)
    >>> len(predicted), sorted(k for k in predicted.extra if k.startswith("dhnA"))
    (12, ['dhnAmplitude7', 'dhnAmplitude8', 'dhnAmplitude9'])
    >>> bool(np.isfinite(np.asarray(predicted.extra["dhnCost"], dtype=float)).all())
    True
    """
    import pandas as pd
    import torch

    from ..adapters import ParticleImages, write_particles
    from ..adapters.images import portable_image_paths
    from ..device import loader_workers, resolve_device
    from ..fileutils import atomic_dir, check_not_input, check_output_dir, file_sha256
    from ..preprocess import PreprocessConfig, inplane_views, preprocess_images
    from ..training.data import CTF_FIELDS, ParticleBatches, ctf_from_rows
    from ..training.targets import TargetSpec, decode
    from ..training.trainer import checkpoint_file
    from ._sharded import ShardedRun, check_images, input_identity

    out = Path(out)
    given = [networks] if isinstance(networks, TrainedNetwork | str | os.PathLike) else networks
    if not given:
        raise InputError("--checkpoint: give at least one trained network")
    checkpoints = [n.path if isinstance(n, TrainedNetwork) else Path(n) for n in given]
    check_not_input(out, *input_files(particles), *checkpoints)
    in_files = (*input_files(particles), *checkpoints, *input_files(modes, hemnma))
    check_output_dir(out, command="predict", inputs=in_files, overwrite=overwrite)
    choice("--deformation", deformation, ("auto", "linear", "nonlinear"))
    choice("--relion-version", relion_version, ("3.0", "3.1"))
    if refine_steps and modes is None:
        raise InputError("--refine needs --modes (the modes file the network was trained with)")
    table, particles_path = read_table(particles)
    name = label(particles_path)
    n = len(table)
    if n == 0:
        raise InputError(f"{name}: no particles")
    check_images(ParticleImages(table), table)  # missing stacks fail now, not after set-up
    dev = resolve_device(device)
    nets: list[tuple[Any, dict[str, Any], TargetSpec]] = []
    for item, path in zip(given, checkpoints, strict=True):
        network = item if isinstance(item, TrainedNetwork) else TrainedNetwork.load(path)
        model, meta = network.model, network.meta
        spec = TargetSpec.from_dict(meta["target"])
        box_a = meta["box_size_px"] * meta["pixel_size_angstrom"]
        ours = float(np.median(table.box_size_px * table.pixel_size_angstrom))
        if abs(box_a - ours) > 0.01 * box_a:
            raise InputError(
                f"{path} was trained on {box_a:.1f} Å boxes, these particles are {ours:.1f} Å; "
                "extract them with the training box and pixel size"
            )
        nets.append((model.to(dev), meta, spec))
        if spec.grid is not None:
            spec.grid.prepare_decode()  # the decoding's one-off set-up (`decode` runs on CPU)
    provides = {p: k for k, (_, _, spec) in enumerate(nets) for p in spec.parts}
    mode_numbers: list[int] = []
    if "amplitudes" in provides:
        mode_numbers = list(nets[provides["amplitudes"]][1]["mode_numbers"])
    if ("orientation" not in provides or "shifts" not in provides) and (
        table.rotation_matrices is None
    ):
        raise InputError(
            f"{name} has no poses and the networks do not predict "
            f"{', '.join(p for p in ('orientation', 'shifts') if p not in provides)}"
        )
    boxes = np.unique(table.box_size_px)
    if len(boxes) != 1:
        raise InputError(f"{name}: mixed box sizes {boxes.tolist()}")
    box, pixel = int(boxes[0]), float(np.median(table.pixel_size_angstrom))
    reference = final_reference = config = None
    if refine_steps < 0:
        raise InputError(f"--refine must be >= 0 iterations, got {refine_steps}")
    if top_k < 1:
        raise InputError(f"--top-k must be >= 1, got {top_k}")
    if batch_size is None:
        batch_size = BATCH_SIZE["hemnma" if modes is not None else "network"]
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    if tta < 0:
        raise InputError(f"--tta must be >= 0 views (0: off), got {tta}")
    grid_head = any(spec.grid is not None for _, _, spec in nets)
    if fallback_confidence is not None:
        if not grid_head:
            raise InputError(
                "--fallback-confidence needs a network with the grid orientation head "
                "(train --orientation-head grid)"
            )
        if modes is None:
            raise InputError("--fallback-confidence re-aligns by HEMNMA: give --modes")
        if not 0 <= fallback_confidence <= 1:
            raise InputError(
                f"--fallback-confidence is a probability (0-1), got {fallback_confidence}"
            )
    aligned = None  # --hemnma, read and checked once, before any prediction
    hemnma_path: Path | None = None
    if hemnma is not None:
        aligned, hemnma_path = read_table(hemnma)
        hemnma_name = label(hemnma_path, "the HEMNMA particles")
        if aligned.rotation_matrices is None:
            raise InputError(f"--hemnma {hemnma_name}: no poses")
        for m in mode_numbers:
            if f"dhnAmplitude{m}" not in aligned.extra:
                raise InputError(f"--hemnma {hemnma_name}: no dhnAmplitude{m} column")
    threshold = fallback_threshold(
        fallback_cost,
        aligned,
        has_modes=modes is not None,
        hemnma_name=label(hemnma_path, "the HEMNMA particles"),
    )
    working = min(box, 128)
    work_pixel = pixel * box / working  # HEMNMA's working pixel, as in `deephemnma align`
    model_of: str | None = None
    modes_path: Path | None = None
    if modes is not None:
        from ..alignment.hemnma import AlignmentConfig, SearchLibrary, align_batch
        from ..nma import check_modes_match
        from ._align import build_reference

        if not mode_numbers:
            raise InputError("--modes needs a network that predicts amplitudes")
        loaded_modes, modes_path = load_modes(modes)
        for path, (_, meta, _) in zip(checkpoints, nets, strict=True):
            if meta.get("modes_fingerprint"):
                check_modes_match(
                    loaded_modes,
                    meta["modes_fingerprint"],
                    label(modes_path, "the modes"),
                    f"{path} was trained on",
                )
        model_of = str(deformation)
        if model_of == "auto":
            recorded = {str(meta.get("deformation", "linear")) for _, meta, _ in nets}
            model_of = "nonlinear" if recorded == {"nonlinear"} else "linear"
        reference, _, final_reference = build_reference(
            loaded_modes,
            mode_numbers,
            deformation=model_of,
            box_angstrom=box * pixel,
            device=dev,
            log=log,
        )
        # from the prediction (one candidate, no search): N steps at 7 Å with residue blobs,
        # then N/2 at 4 Å with every atom, as the two bands of `deephemnma align`
        # one round per band: the start is the network's estimate, not a rigid search's, and
        # the extra rounds of `align` (for amplitudes travelling far) cost 1.6x here for
        # nothing (500 particles, top-4, 20 steps: 0.133 -> 0.082 CPU-s each, 0.94 -> 0.98°)
        config = AlignmentConfig(
            local_poses=True, iterations=(refine_steps, refine_steps // 2), max_rounds=1
        )
        search = AlignmentConfig()  # the fallback: `deephemnma align`'s defaults
    ctf = np.stack([np.asarray(getattr(table, f), dtype=float) for f in CTF_FIELDS], axis=1)
    fields = {
        "amplitudes": ((len(mode_numbers),), np.float64),
        "rotations": ((3, 3), np.float64),
        "shifts": ((2,), np.float64),
        "cost": ((), np.float64),
        "fallback": ((), np.bool_),
        "confidence": ((), np.float64),
    }
    settings = {
        "particles": input_identity(particles_path, table),
        "checkpoints": {str(c): file_sha256(checkpoint_file(c)) for c in checkpoints},
        "modes": str(modes_path) if modes is not None else "None",
        "modes_sha256": None
        if modes is None
        else file_sha256(modes_path)
        if modes_path is not None
        else loaded_modes.fingerprint(),
        "refine": refine_steps,
        "tta": tta,
        "deformation": model_of,
        "fallback_cost": threshold,
    }
    run = ShardedRun(out, n, fields, settings, dev, checkpoint_every, restart=restart)
    todo_local = run.todo  # positions in this rank's slice
    todo = run.mine[todo_local]
    data = ParticleBatches(ParticleImages(table), todo, ctf[todo])
    lanes = 1
    if dev.type == "cpu":
        lanes = lane_count(
            torch.get_num_threads() if LANES is None else LANES, len(todo), batch_size
        )
    batches = lane_batches(len(todo), batch_size, lanes)
    stream = torch.utils.data.DataLoader(
        data,
        batch_size=None,
        sampler=batches,
        num_workers=loader_workers(workers, dev),
        pin_memory=dev.type == "cuda",
    )
    bar = progress_bar(
        progress,
        len(run.mine),
        initial=len(run.mine) - len(todo),
        desc=f"predict[{run.rank}]" if run.world > 1 else "predict",
    )
    preps = [PreprocessConfig.from_dict(meta["preprocess"]) for _, meta, _ in nets]
    align_prep = PreprocessConfig(output_size_px=working, phase_flip=False, normalise="whole")
    library: Any = None  # HEMNMA's search library, built at the first fallback
    amp = dev.type == "cuda"

    reading, storing, building = threading.Lock(), threading.Lock(), threading.Lock()

    def prepare() -> _Batch | None:
        """The next batch read and preprocessed (once per distinct setting), None at the end."""
        with reading:
            got = next(loaded, None)
        if got is None:
            return None
        images, _, c, pos = got
        images = images.to(dev, non_blocking=True)
        params = ctf_from_rows(c, dev)
        inputs: dict[str, torch.Tensor] = {}
        for prep in preps:
            if repr(prep) not in inputs:
                inputs[repr(prep)] = preprocess_images(
                    images, pixel_size_angstrom=pixel, config=prep, ctf=params
                )
        xa = None
        if reference is not None:
            xa = preprocess_images(images, pixel_size_angstrom=pixel, config=align_prep)
        return _Batch(todo_local[pos.numpy()], params, [inputs[repr(p)] for p in preps], xa)

    def forward(batch: _Batch) -> list[torch.Tensor]:
        outputs = []
        for (model, _, spec), x in zip(nets, batch.inputs, strict=True):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                y = model(x[:, None]).float()
                amplitudes = spec.slices.get("amplitudes")
                if tta > 1 and amplitudes is not None:
                    turned = inplane_views(x, tta)[len(x) :]  # the first view is x itself
                    # a batch's worth of views a pass: the memory of a batch, whatever tta
                    more = torch.cat(
                        [model(v[:, None]).float()[:, amplitudes] for v in turned.split(len(x))]
                    )
                    y = y.clone()
                    extra = more.reshape(tta - 1, len(x), -1).sum(0)
                    y[:, amplitudes] = (y[:, amplitudes] + extra) / tta
            outputs.append(y)
        return outputs

    # the grid head's later candidates only serve as refinement starts (--refine, which needs
    # --modes); the first (pose, confidence) is the same whatever their number, and decoding
    # 4 costs 1.8x decoding 1
    candidates = top_k if refine_steps else 1

    def decoded(outputs: list[torch.Tensor]) -> dict[str, np.ndarray]:
        pred: dict[str, np.ndarray] = {}
        for (_, _, spec), y in zip(nets, outputs, strict=True):
            pred.update(decode(spec, y, top_k=candidates))
        return pred

    def finish(batch: _Batch, pred: dict[str, np.ndarray]) -> None:
        """HEMNMA's refinement and fallback (if asked for), then the batch's results stored."""
        nonlocal library
        local, params = batch.local, batch.ctf
        rows = run.mine[local]
        rot: Any = pred.get(
            "rotations",
            table.rotation_matrices[rows] if table.rotation_matrices is not None else None,
        )
        shifts = pred.get("shifts", table.shifts_angstrom[rows])
        amps = pred.get("amplitudes", np.zeros((len(rows), 0)))
        cost = np.full(len(rows), np.nan)
        fell = np.zeros(len(rows), dtype=bool)
        confidence = pred.get("confidence", np.full(len(rows), np.nan))
        starts: Any = rot
        if "candidates" in pred and refine_steps:
            starts = pred["candidates"]  # (B, k, 3, 3): the best of the k is kept
        xa = batch.align_input
        if reference is not None and config is not None and xa is not None:
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
            if fallback_confidence is not None:
                fell |= ~(confidence >= fallback_confidence)
            if fell.any():
                with building:
                    if library is None:
                        library = SearchLibrary.build(reference, search, working, work_pixel, dev)
                idx = np.flatnonzero(fell)
                with torch.enable_grad():
                    full = align_batch(
                        xa[torch.as_tensor(idx, device=dev)],
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
        with storing:
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

    t0 = time.perf_counter()
    with torch.no_grad(), run.guard():
        loaded = iter(stream)  # DataLoader workers, if any, start here
        if lanes > 1:
            in_lanes(prepare, forward, decoded, finish, lanes=lanes)
        else:
            overlap = dev.type == "cuda" if OVERLAP is None else OVERLAP
            overlapped(prepare, forward, decoded, finish, overlap=overlap, device=dev)
    bar.close()
    elapsed = time.perf_counter() - t0
    merged = run.merge()
    if merged is None:
        run.close(success=False)
        return table
    source = np.full(n, "network", dtype=object)
    if threshold is not None or fallback_confidence is not None:
        source[merged["fallback"]] = "hemnma"
        why = [f"a cost above {threshold:.4f}"] if threshold is not None else []
        if fallback_confidence is not None:
            why.append(f"a pose confidence below {fallback_confidence:g}")
        say(
            log,
            f"{int(merged['fallback'].sum())} particle(s) with {' or '.join(why)} "
            "re-aligned by HEMNMA (global search)",
        )
    amplitudes, rotations, shifts_all = merged["amplitudes"], merged["rotations"], merged["shifts"]
    cost_all = merged["cost"]
    if aligned is not None:
        assert aligned.rotation_matrices is not None  # checked on reading
        where = pd.Index(table.stack_keys).get_indexer(aligned.stack_keys)
        found = where >= 0
        for j, m in enumerate(mode_numbers):
            column = np.asarray(aligned.extra[f"dhnAmplitude{m}"], dtype=float)
            amplitudes[where[found], j] = column[found]
        rotations[where[found]] = aligned.rotation_matrices[found]
        shifts_all[where[found]] = aligned.shifts_angstrom[found]
        if "dhnCost" in aligned.extra:
            cost_all[where[found]] = np.asarray(aligned.extra["dhnCost"], dtype=float)[found]
        source[where[found]] = "hemnma"
        say(
            log,
            f"{int(found.sum())} particle(s) keep their HEMNMA values from "
            f"{label(hemnma_path, 'the HEMNMA particles')}",
        )
    columns: dict[str, Any] = {
        f"dhnAmplitude{m}": amplitudes[:, j] for j, m in enumerate(mode_numbers)
    }
    columns["dhnSource"] = source
    trained_on = {str(meta.get("modes_fingerprint")) for _, meta, _ in nets} - {"None"}
    if mode_numbers and len(trained_on) == 1:
        columns["dhnModes"] = np.full(n, trained_on.pop(), dtype=object)
    if modes is not None or aligned is not None:
        columns["dhnCost"] = cost_all
    if grid_head:  # the network's pose confidence (HEMNMA's particles: NaN, not judged)
        conf = np.asarray(merged["confidence"], dtype=float).copy()
        if aligned is not None:
            conf[where[found]] = np.nan
        columns["dhnConfidence"] = conf
    result = table.with_poses(rotations, shifts_all).with_extra(**columns)
    result = portable_image_paths(result)  # reachable from the output folder too
    with atomic_dir(out, command="predict", inputs=in_files, overwrite=overwrite) as tmp:
        write_particles(result, tmp / "particles.star", relion_version=relion_version)
        write_particles(result, tmp / "particles.cs")
    run.close(success=True)
    rate = len(run.mine) / max(elapsed, 1e-9)
    say(log, f"predicted {n} particles ({rate:.0f}/s on rank 0) -> {out}")
    return result
