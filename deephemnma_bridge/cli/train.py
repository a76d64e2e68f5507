"""Train the DeepHEMNMA network (ResNet34 + MLP) on HEMNMA results.

ALIGNED is a STAR or .cs file with poses and _dhnAmplitude<mode> columns (the output of
`deephemnma align`); particles flagged _dhnOutlier 1 are left out. Writes into DIR: best.pt
(for `deephemnma predict`), last.pt (to resume: rerun the same command), training.csv and
training.png (loss curves), splits.npz (the train/validation/test particles) and train.json.

Defaults are the paper's (400 epochs, batch 2, L1, Adam with weight decay 1e-5, learning rate
/10 every 80 epochs, dropout 0.5, 128 px input); --preset fast uses batches of 32, lr 3e-4
decayed every 30 epochs, no dropout, the input low-passed at 8 Å and sampled at 1/2.5 of
that, a soft circular mask, early stopping after 15 epochs without validation improvement
and bfloat16 on GPU. --augment adds random in-plane rotations with exactly rotated labels.
Multi-GPU / multi-node: torchrun --nproc_per_node N -m deephemnma_bridge.cli train ...

Examples:
  deephemnma train aligned/particles.star --out net --preset fast --augment
  deephemnma train aligned/particles.star --target orientation --epochs 200 --out net_rot
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``deephemnma train``."""
    p = parser.add_argument
    p("aligned", type=Path, help="STAR or .cs with poses and _dhnAmplitude<mode> columns")
    p("--out", type=Path, required=True, help="output folder (checkpoints, curves)")
    p(
        "--overwrite",
        action="store_true",
        help="replace an existing --out folder that this command did not write",
    )
    p("--target", choices=["all", "amplitudes", "orientation", "shifts"], default="all")
    p("--preset", choices=["paper", "fast"], default="paper")
    p("--epochs", type=int, default=None)
    p("--batch-size", type=int, default=None)
    p("--lr", type=float, default=None, help="learning rate (paper preset: 1e-4)")
    p(
        "--size",
        type=int,
        default=None,
        help="images Fourier-cropped to this size (paper: 128; fast: 0 = from --lowpass)",
    )
    p("--lowpass", type=float, default=None, help="input low-pass, Å (fast preset: 8)")
    p("--dropout", type=float, default=None, help="dropout in the MLP head (paper 0.5, fast 0)")
    p("--lr-step", type=int, default=None, help="divide the lr by 10 every N epochs (paper 80)")
    p("--val-fraction", type=float, default=None, help="validation particles (0.1)")
    p("--test-fraction", type=float, default=None, help="held-out test particles (0.1)")
    p("--early-stopping", type=int, default=None, help="patience in epochs (0: off)")
    p(
        "--loss-weights",
        default=None,
        help="per-part loss weights for --target all, e.g. amplitudes=1,orientation=2,shifts=1",
    )
    p(
        "--augment",
        action="store_true",
        help="random in-plane rotations (any angle) with the labels rotated exactly",
    )
    p("--mask", action="store_true", default=None, help="soft circular mask (fast preset: on)")
    p(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers (-1: auto, 0 on a CPU, up to 4 with a GPU)",
    )
    p("--seed", type=int, default=None)
    p("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    p(
        "--orientation-head",
        choices=["quaternion", "grid"],
        default=None,
        help="quaternion regression (the paper's, default) or scores over an SO(3) grid with "
        "the top-k orientations and a confidence",
    )
    p("--grid-step", type=float, default=None, help="SO(3) grid step of the grid head (15°)")
    p(
        "--synthetic-epochs",
        type=int,
        default=None,
        help="first N epochs on fresh images rendered from the reference and modes (needs "
        "--modes; noise matched to the particles), the rest on the labelled particles (0)",
    )
    p(
        "--synthetic-batches",
        type=int,
        default=None,
        help="batches per synthetic epoch (100)",
    )
    p("--modes", type=Path, default=None, help="modes .npz of the alignment (synthetic epochs)")
    p("--backbone", default=None, help="timm model name (resnet34, the paper's)")


def amplitude_columns(extra: Mapping[str, Any]) -> list[int]:
    """Mode numbers of the ``dhnAmplitude<mode>`` columns, ascending."""
    return sorted(int(m.group(1)) for k in extra if (m := re.fullmatch(r"dhnAmplitude(\d+)", k)))


def main(args: argparse.Namespace) -> int:
    """Train; return 0."""
    from ..adapters import ParticleImages, read_particles
    from ..device import resolve_device
    from ..fileutils import check_not_input, check_output_dir, claim_output_dir
    from ..training.data import CTF_FIELDS
    from ..training.trainer import config_from_preset, train

    check_not_input(args.out, args.aligned)
    inputs = (args.aligned,) + ((args.modes,) if args.modes else ())
    check_output_dir(args.out, command="train", inputs=inputs, overwrite=args.overwrite)
    weights: tuple[tuple[str, float], ...] | None = None
    if args.loss_weights:
        try:
            pairs = [item.split("=") for item in args.loss_weights.split(",")]
            weights = tuple((k.strip(), float(v)) for k, v in pairs)
        except ValueError:
            raise InputError(f"--loss-weights {args.loss_weights!r}: use part=weight,...") from None
        unknown = [k for k, _ in weights if k not in ("amplitudes", "orientation", "shifts")]
        if unknown:
            raise InputError(f"--loss-weights: unknown part(s) {unknown}")
    table = read_particles(args.aligned)
    config = config_from_preset(
        args.preset,
        target=args.target,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        size_px=args.size,
        lowpass_angstrom=args.lowpass,
        dropout=args.dropout,
        lr_step_epochs=args.lr_step,
        soft_mask=args.mask,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        early_stopping=args.early_stopping,
        augment=args.augment or None,
        workers=args.workers,
        seed=args.seed,
        loss_weights=weights,
        orientation_head=args.orientation_head,
        grid_step_degrees=args.grid_step,
        synthetic_epochs=args.synthetic_epochs,
        synthetic_batches=args.synthetic_batches,
        backbone=args.backbone,
    )
    if config.synthetic_epochs and args.modes is None:
        raise InputError("--synthetic-epochs renders images from the modes: give --modes")
    if config.backbone != "resnet34":
        import timm

        if not timm.is_model(config.backbone):
            raise InputError(
                f"--backbone {config.backbone!r}: not a timm model (e.g. resnet34, resnet18, "
                "efficientnet_b0; python -c 'import timm; print(timm.list_models())')"
            )
    modes = amplitude_columns(table.extra)
    if config.target in ("all", "amplitudes") and not modes:
        raise InputError(
            f"{args.aligned}: no _dhnAmplitude<mode> columns; train on the output of "
            "`deephemnma align`, or use --target orientation/shifts"
        )
    if config.target in ("all", "orientation", "shifts") and table.rotation_matrices is None:
        raise InputError(f"{args.aligned}: no poses (rlnAngleRot/Tilt/Psi) to learn from")
    keep = np.ones(len(table), dtype=bool)
    if "dhnOutlier" in table.extra:
        keep &= np.asarray(table.extra["dhnOutlier"]).astype(float) == 0
    if "dhnConverged" in table.extra:
        keep &= np.asarray(table.extra["dhnConverged"]).astype(float) == 1
    if not keep.all():
        print(f"leaving out {int((~keep).sum())} outlier or failed particle(s)")
        table = table.mask(keep)
    boxes, pixels = np.unique(table.box_size_px), np.unique(table.pixel_size_angstrom)
    if len(boxes) != 1 or len(pixels) != 1:
        raise InputError(f"{args.aligned}: one box and pixel size are needed, found several")
    amplitudes = (
        np.stack([np.asarray(table.extra[f"dhnAmplitude{m}"], dtype=float) for m in modes], 1)
        if modes
        else None
    )
    ctf = np.stack([np.asarray(getattr(table, f), dtype=float) for f in CTF_FIELDS], axis=1)
    ids = sorted({str(v) for v in table.extra.get("dhnModes", [])})
    if len(ids) > 1:
        raise InputError(
            f"{args.aligned}: particles aligned with different modes files ({', '.join(ids)}); "
            "train on particles aligned with one modes file"
        )
    modes_id = ids[0] if ids else None
    reference = None
    if config.synthetic_epochs:
        from ..nma import NormalModes, check_modes_match
        from .align import build_reference

        if modes_id:
            check_modes_match(NormalModes.load(args.modes), modes_id, args.modes, str(args.aligned))
        reference, _, _ = build_reference(
            args.modes,
            modes,
            final_template="same",
            deformation=_deformation_of(args.aligned),
            box_angstrom=float(boxes[0] * pixels[0]),
            device=resolve_device(args.device),
        )
    claim_output_dir(args.out, command="train", inputs=inputs, overwrite=args.overwrite)
    summary = train(
        ParticleImages(table),
        ctf,
        {
            "amplitudes": amplitudes,
            "rotations": table.rotation_matrices,
            "shifts": table.shifts_angstrom,
        },
        mode_numbers=modes,
        box_size_px=int(boxes[0]),
        pixel_size_angstrom=float(pixels[0]),
        config=config,
        out=args.out,
        device=resolve_device(args.device),
        reference=reference,
        extra_meta={
            "source": str(args.aligned),
            "modes_fingerprint": modes_id,
            "deformation": _deformation_of(args.aligned),
        },
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    (args.out / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"trained {summary['epochs_run']} epoch(s) on {summary['splits']['train']} particles "
        f"in {summary['seconds']:.0f} s: best validation loss {summary['best_val']:.4f} -> "
        f"{args.out / 'best.pt'}"
    )
    return 0


def _deformation_of(aligned: Path) -> str:
    """The deformation model (linear, nonlinear) of the alignment that wrote ``aligned``, from
    the alignment.json beside it (linear when there is none: the amplitudes' plain meaning)."""
    record = Path(aligned).parent / "alignment.json"
    try:
        settings = json.loads(record.read_text()).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return "linear"
    value = settings.get("deformation", "linear") if isinstance(settings, dict) else "linear"
    return value if value in ("linear", "nonlinear") else "linear"
