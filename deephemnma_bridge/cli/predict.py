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
from pathlib import Path

__all__ = ["add_args", "main"]


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
        "--tta",
        type=int,
        default=0,
        metavar="N",
        help="amplitudes averaged over N in-plane turns of each image, 360/N° apart (N times the "
        "forward passes; 12 measured best for the network alone; default 0: off)",
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
    p(
        "--batch-size",
        type=int,
        default=None,
        help="particles per batch (default 256 for the network alone, 64 with --modes)",
    )
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


def main(args: argparse.Namespace) -> int:
    """Predict (`deephemnma_bridge.api.predict`); return 0."""
    from ..api import predict

    predict(
        args.particles,
        args.checkpoint,
        out=args.out,
        modes=args.modes,
        refine_steps=args.refine,
        deformation=args.deformation,
        fallback_cost=args.fallback_cost,
        top_k=args.top_k,
        tta=args.tta,
        fallback_confidence=args.fallback_confidence,
        hemnma=args.hemnma,
        batch_size=args.batch_size,
        workers=args.workers,
        checkpoint_every=args.checkpoint_every,
        restart=args.restart,
        overwrite=args.overwrite,
        relion_version=args.relion_version,
        device=args.device,
    )
    return 0
