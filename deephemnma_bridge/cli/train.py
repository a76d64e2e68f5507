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
from pathlib import Path

from ..api._common import amplitude_columns
from ..api._train import deformation_of as _deformation_of
from ..api._train import parse_loss_weights

__all__ = ["_deformation_of", "add_args", "amplitude_columns", "main"]


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
    p(
        "--lr-schedule",
        choices=["step", "cosine"],
        default=None,
        help="step: lr / 10 every --lr-step epochs (default); cosine: lr down to lr / 100 over "
        "the epochs",
    )
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
        "--condition-on-orientation",
        action="store_true",
        default=None,
        help="grid head: read the amplitudes and shifts in the light of the top-scored rotation "
        "(its matrix scales and offsets the backbone's features; trained with the bin nearest "
        "the truth)",
    )
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


def main(args: argparse.Namespace) -> int:
    """Train (`deephemnma_bridge.api.train`); return 0."""
    from ..api import train

    train(
        args.aligned,
        out=args.out,
        target=args.target,
        preset=args.preset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        size_px=args.size,
        lowpass_angstrom=args.lowpass,
        dropout=args.dropout,
        lr_step_epochs=args.lr_step,
        lr_schedule=args.lr_schedule,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        early_stopping_epochs=args.early_stopping,
        loss_weights=parse_loss_weights(args.loss_weights),
        augment=args.augment,
        mask=args.mask,
        workers=args.workers,
        seed=args.seed,
        orientation_head=args.orientation_head,
        grid_step_degrees=args.grid_step,
        condition_on_orientation=args.condition_on_orientation,
        synthetic_epochs=args.synthetic_epochs,
        synthetic_batches=args.synthetic_batches,
        modes=args.modes,
        backbone=args.backbone,
        overwrite=args.overwrite,
        device=args.device,
    )
    return 0
