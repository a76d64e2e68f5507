"""Training the DeepHEMNMA network (ResNet34 + MLP) on HEMNMA results."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
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

__all__ = ["TrainedNetwork", "deformation_of", "train"]


@dataclasses.dataclass(frozen=True)
class TrainedNetwork:
    """A trained network: the model, what it was trained on, and its checkpoint.

    Attributes
    ----------
    model : torch.nn.Module
        The network, in eval mode on the CPU.
    meta : dict
        What `predict` needs: targets, mode numbers, box and pixel size, preprocessing, the
        modes' fingerprint and deformation model.
    path : Path
        The checkpoint: a training folder (its ``best.pt``) or a ``.pt`` file.
    summary : dict or None
        `train`'s summary (epochs run, losses, splits); None for a loaded checkpoint.
    """

    model: Any
    meta: dict[str, Any]
    path: Path
    summary: dict[str, Any] | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrainedNetwork:
        """The network of a training folder (its ``best.pt``) or of a ``.pt`` file."""
        from ..training.trainer import load_checkpoint

        model, meta = load_checkpoint(Path(path))
        return cls(model=model, meta=meta, path=Path(path))

    @property
    def mode_numbers(self) -> list[int]:
        """The modes whose amplitudes it predicts (empty when it predicts none)."""
        return [int(m) for m in self.meta.get("mode_numbers", [])]

    @property
    def parts(self) -> tuple[str, ...]:
        """What it predicts: some of ``amplitudes``, ``orientation``, ``shifts``."""
        from ..training.targets import TargetSpec

        return tuple(TargetSpec.from_dict(self.meta["target"]).parts)


def deformation_of(aligned: str | os.PathLike[str] | None) -> str:
    """The deformation model (linear, nonlinear) of the alignment that wrote ``aligned``, from
    the alignment.json beside it (linear when there is none: the amplitudes' plain meaning)."""
    if aligned is None:
        return "linear"
    record = Path(aligned).parent / "alignment.json"
    try:
        settings = json.loads(record.read_text()).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return "linear"
    value = settings.get("deformation", "linear") if isinstance(settings, dict) else "linear"
    return value if value in ("linear", "nonlinear") else "linear"


def train(
    aligned: ParticlesLike,
    *,
    out: str | os.PathLike[str],
    target: str = "all",
    preset: str = "paper",
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    size_px: int | None = None,
    lowpass_angstrom: float | None = None,
    dropout: float | None = None,
    lr_step_epochs: int | None = None,
    lr_schedule: str | None = None,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    early_stopping_epochs: int | None = None,
    loss_weights: Mapping[str, float] | None = None,
    augment: bool = False,
    mask: bool | None = None,
    workers: int | None = None,
    seed: int | None = None,
    orientation_head: str | None = None,
    grid_step_degrees: float | None = None,
    condition_on_orientation: bool | None = None,
    synthetic_epochs: int | None = None,
    synthetic_batches: int | None = None,
    modes: ModesLike | None = None,
    deformation: str = "auto",
    backbone: str | None = None,
    overwrite: bool = False,
    device: str = "auto",
    log: Log = print,
) -> TrainedNetwork:
    """Train the network on HEMNMA results (`align`'s output).

    The command ``deephemnma train`` calls this; ``None`` options take the preset's value.
    Particles flagged ``dhnOutlier`` 1 or ``dhnConverged`` 0 are left out.

    Parameters
    ----------
    aligned : ParticleTable or path
        Particles with poses and ``dhnAmplitude<mode>`` columns.
    out : path
        Output folder: ``best.pt``, ``last.pt`` (a rerun resumes), ``training.csv`` and
        ``.png``, ``splits.npz``, ``train.json``.
    target : {"all", "amplitudes", "orientation", "shifts"}, default "all"
        What the network learns.
    preset : {"paper", "fast"}, default "paper"
        The paper's settings (400 epochs, batch 2, ...) or the fast ones.
    epochs, batch_size, lr, size_px, lowpass_angstrom, dropout, lr_step_epochs
        Override the preset.
    lr_schedule : {"step", "cosine"}, optional
        Learning-rate schedule: / 10 every ``lr_step_epochs`` (the paper's, default) or a cosine
        from ``lr`` to ``lr`` / 100 over the epochs.
    val_fraction, test_fraction : float, optional
        Validation and held-out test particles (0.1 each).
    early_stopping_epochs : int, optional
        Patience in epochs (0: off).
    loss_weights : mapping, optional
        Per-part loss weights, e.g. ``{"orientation": 2.0}``.
    augment : bool, default False
        Random in-plane rotations with exactly rotated labels.
    mask : bool, optional
        Soft circular mask (fast preset: on).
    workers, seed : int, optional
        DataLoader workers (-1: auto) and random seed.
    orientation_head : {"quaternion", "grid"}, optional
        The paper's quaternion regression, or scores over an SO(3) grid.
    grid_step_degrees : float, optional
        Grid step of the grid head (15).
    condition_on_orientation : bool, optional
        Grid head only: the amplitudes and shifts are read in the light of the top-scored
        rotation (default off).
    synthetic_epochs, synthetic_batches : int, optional
        First epochs on images rendered from ``modes``.
    modes : NormalModes or path, optional
        The alignment's modes (needed by synthetic epochs).
    deformation : {"auto", "linear", "nonlinear"}, default "auto"
        The alignment's deformation model, recorded for `predict`; auto reads it from the
        ``alignment.json`` beside ``aligned`` (linear for a table in memory).
    backbone : str, optional
        A timm model name (resnet34).
    overwrite : bool, default False
        Use an existing ``out`` that this package did not write.
    device : str, default "auto"
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    log : callable or None, default print
        Where the per-epoch lines and the summary go; None for silence.

    Returns
    -------
    TrainedNetwork
        The best model (lowest validation loss) with its checkpoint ``out/best.pt``.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from pathlib import Path
    >>> from deephemnma_bridge.api import simulate, train
    >>> tmp = Path(tempfile.mkdtemp())
    >>> sim = simulate(out=tmp / "sim", n_particles=12, box_px=48, pixel_size_angstrom=3.0,
    ...                seed=1, device="cpu", progress=False, log=None)
    >>> from deephemnma_bridge.conventions import euler_to_matrix
    >>> truth = sim.particles.extra  # pretend HEMNMA found the truth
    >>> angles = np.stack([truth[f"dhnTrueAngle{a}"] for a in ("Rot", "Tilt", "Psi")], 1)
    >>> aligned = sim.particles.with_poses(euler_to_matrix(angles), np.zeros((12, 2)))
    >>> aligned = aligned.with_extra(
    ...     **{f"dhnAmplitude{m}": truth[f"dhnTrueAmplitude{m}"] for m in (7, 8, 9)})
    >>> net = train(aligned, out=tmp / "net", preset="fast", epochs=1, size_px=32,
    ...             batch_size=4, workers=0, device="cpu", log=None)
    >>> net.mode_numbers, (tmp / "net" / "best.pt").is_file()
    ([7, 8, 9], True)
    """
    from ..adapters import ParticleImages
    from ..device import resolve_device
    from ..fileutils import (
        await_output_dir,
        check_not_input,
        check_output_dir,
        claim_output_dir,
    )
    from ..training.data import CTF_FIELDS
    from ..training.trainer import config_from_preset
    from ..training.trainer import train as fit

    out = Path(out)
    inputs = input_files(aligned, *([modes] if modes is not None else []))
    check_not_input(out, *input_files(aligned))
    check_output_dir(out, command="train", inputs=inputs, overwrite=overwrite)
    choice("--target", target, ("all", "amplitudes", "orientation", "shifts"))
    choice("--preset", preset, ("paper", "fast"))
    choice("--deformation", deformation, ("auto", "linear", "nonlinear"))
    weights: tuple[tuple[str, float], ...] | None = None
    if loss_weights:
        weights = tuple((str(k), float(v)) for k, v in loss_weights.items())
        unknown = [k for k, _ in weights if k not in ("amplitudes", "orientation", "shifts")]
        if unknown:
            raise InputError(f"--loss-weights: unknown part(s) {unknown}")
    table, aligned_path = read_table(aligned)
    name = label(aligned_path)
    config = config_from_preset(
        preset,
        target=target,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        size_px=size_px,
        lowpass_angstrom=lowpass_angstrom,
        dropout=dropout,
        lr_step_epochs=lr_step_epochs,
        lr_schedule=lr_schedule,
        soft_mask=mask,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        early_stopping=early_stopping_epochs,
        augment=augment or None,
        workers=workers,
        seed=seed,
        loss_weights=weights,
        orientation_head=orientation_head,
        grid_step_degrees=grid_step_degrees,
        condition_on_orientation=condition_on_orientation,
        synthetic_epochs=synthetic_epochs,
        synthetic_batches=synthetic_batches,
        backbone=backbone,
    )
    if config.synthetic_epochs and modes is None:
        raise InputError("--synthetic-epochs renders images from the modes: give --modes")
    if config.backbone != "resnet34":
        import timm

        if not timm.is_model(config.backbone):
            raise InputError(
                f"--backbone {config.backbone!r}: not a timm model (e.g. resnet34, resnet18, "
                "efficientnet_b0; python -c 'import timm; print(timm.list_models())')"
            )
    mode_numbers = amplitude_columns(table.extra)
    if config.target in ("all", "amplitudes") and not mode_numbers:
        raise InputError(
            f"{name}: no _dhnAmplitude<mode> columns; train on the output of "
            "`deephemnma align`, or use --target orientation/shifts"
        )
    if config.target in ("all", "orientation", "shifts") and table.rotation_matrices is None:
        raise InputError(f"{name}: no poses (rlnAngleRot/Tilt/Psi) to learn from")
    keep = np.ones(len(table), dtype=bool)
    if "dhnOutlier" in table.extra:
        keep &= np.asarray(table.extra["dhnOutlier"]).astype(float) == 0
    if "dhnConverged" in table.extra:
        keep &= np.asarray(table.extra["dhnConverged"]).astype(float) == 1
    if not keep.all():
        say(log, f"leaving out {int((~keep).sum())} outlier or failed particle(s)")
        table = table.mask(keep)
    boxes, pixels = np.unique(table.box_size_px), np.unique(table.pixel_size_angstrom)
    if len(boxes) != 1 or len(pixels) != 1:
        raise InputError(f"{name}: one box and pixel size are needed, found several")
    amplitudes = (
        np.stack(
            [np.asarray(table.extra[f"dhnAmplitude{m}"], dtype=float) for m in mode_numbers], 1
        )
        if mode_numbers
        else None
    )
    ctf = np.stack([np.asarray(getattr(table, f), dtype=float) for f in CTF_FIELDS], axis=1)
    ids = sorted({str(v) for v in table.extra.get("dhnModes", [])})
    if len(ids) > 1:
        raise InputError(
            f"{name}: particles aligned with different modes files ({', '.join(ids)}); "
            "train on particles aligned with one modes file"
        )
    modes_id = ids[0] if ids else None
    model_of = deformation_of(aligned_path) if deformation == "auto" else deformation
    reference = None
    if config.synthetic_epochs:
        from ..nma import check_modes_match
        from ._align import build_reference

        assert modes is not None  # checked above
        loaded, modes_path = load_modes(modes)
        if modes_id:
            check_modes_match(loaded, modes_id, label(modes_path, "the modes"), name)
        reference, _, _ = build_reference(
            loaded,
            mode_numbers,
            final_template="same",
            deformation=model_of,
            box_angstrom=float(boxes[0] * pixels[0]),
            device=resolve_device(device),
            log=log,
        )
    if int(os.environ.get("RANK", "0")) == 0:
        claim_output_dir(out, command="train", inputs=inputs, overwrite=overwrite)
    else:  # torchrun: rank 0 checks and claims the folder
        await_output_dir(out, command="train")
    summary = fit(
        ParticleImages(table),
        ctf,
        {
            "amplitudes": amplitudes,
            "rotations": table.rotation_matrices,
            "shifts": table.shifts_angstrom,
        },
        mode_numbers=mode_numbers,
        box_size_px=int(boxes[0]),
        pixel_size_angstrom=float(pixels[0]),
        config=config,
        out=out,
        device=resolve_device(device),
        reference=reference,
        extra_meta={
            "source": name,
            "modes_fingerprint": modes_id,
            "deformation": model_of,
        },
        log=log if log is not None else (lambda _line: None),
    )
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 writes train.json and reports
        return TrainedNetwork(model=None, meta={}, path=out, summary=summary)
    (out / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(
        log,
        f"trained {summary['epochs_run']} epoch(s) on {summary['splits']['train']} "
        f"particles in {summary['seconds']:.0f} s: best validation loss "
        f"{summary['best_val']:.4f} -> {out / 'best.pt'}",
    )
    network = TrainedNetwork.load(out)
    return dataclasses.replace(network, summary=summary)


def parse_loss_weights(text: str | None) -> dict[str, float] | None:
    """``"amplitudes=1,orientation=2"`` as a mapping (the ``--loss-weights`` syntax)."""
    if not text:
        return None
    try:
        pairs = [item.split("=") for item in text.split(",")]
        return {k.strip(): float(v) for k, v in pairs}
    except ValueError:
        raise InputError(f"--loss-weights {text!r}: use part=weight,...") from None
