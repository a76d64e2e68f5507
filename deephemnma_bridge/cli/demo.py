"""The demo on the embedded default: synthetic adenylate kinase particles through the whole
pipeline, with the accuracy against the ground truth.

Simulates --n particles from the bundled 4AKE chain A (all-atom density, modes 7-9 along a
helix, SNR 0.1, CTF, 128 px at 0.65 Å), then runs `deephemnma run` on them: HEMNMA on a
training subset, the network (SO(3) grid head) trained on fresh images simulated from the
reference with the noise, CTFs and amplitudes of that subset, run on every particle and refined
from its top 4 orientations by --refine HEMNMA steps, the conformational space with groups
(subsets of trusted poses). Prints the errors of HEMNMA and of the network against the
simulated truth and where the outputs are. Sized for about 5 minutes on a 2-core CPU (the
network is the slow part; a GPU is used when present). Rerunning resumes / skips finished
stages.

Example:
  deephemnma demo --out demo_out
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``deephemnma demo``."""
    p = parser.add_argument
    p("--out", type=Path, default=Path("demo_out"), help="output folder (demo_out)")
    p(
        "--overwrite",
        action="store_true",
        help="use an existing --out folder that this command did not write",
    )
    p("--n", type=int, default=1500, help="particles simulated (1500)")
    p("--n-train", type=int, default=600, help="of which aligned by HEMNMA for training (600)")
    p("--epochs", type=int, default=8, help="network epochs on simulated images (8)")
    p("--synthetic-batches", type=int, default=50, help="batches of 64 per epoch (50)")
    p("--refine", type=int, default=20, help="HEMNMA steps from the network's top 4 (20)")
    p(
        "--size",
        type=int,
        default=None,
        help="network input size, px (the fast preset's: 32 px for the 8 Å low-pass)",
    )
    p("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    p("--seed", type=int, default=1)


def main(args: argparse.Namespace) -> int:
    """Simulate, run the pipeline, report; return 0."""
    import warnings

    from ..api import simulate
    from ..fileutils import claim_output_dir
    from .run import DEFAULTS, pipeline_from_options

    out: Path = claim_output_dir(args.out, command="demo", overwrite=args.overwrite)
    sim = out / "simulated"
    if not (sim / "particles.star").exists():
        print(f"[simulate] {args.n} particles -> {sim}", flush=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="parts of the molecule")  # known, mild
            simulate(n_particles=args.n, seed=args.seed, out=sim, device=args.device)
    opts = dict(DEFAULTS)
    opts.update(
        particles=str(sim / "particles.star"),
        modes=str(sim / "modes.npz"),
        n_train=args.n_train,
        epochs=args.epochs,
        synthetic_batches=args.synthetic_batches,
        orientation_head="grid",
        refine=args.refine,
        size=args.size,
        device=args.device,
        seed=args.seed,
        min_count=max(50, args.n // 6),
    )
    outputs = pipeline_from_options(opts, out / "pipeline", log=lambda s: print(s, flush=True))
    from ..adapters import read_particles
    from ..evaluation import ground_truth_errors

    predicted = read_particles(outputs.predicted / "particles.star")
    scores = ground_truth_errors(predicted, by_source=True)
    (out / "accuracy.json").write_text(json.dumps(scores, indent=2) + "\n")
    print(
        "\naccuracy against the simulated ground truth (median angular error, p90, "
        "median shift error, amplitude correlation per mode):"
    )
    for name, row in scores.items():
        rs = " ".join(f"{row[k]:.3f}" for k in row if k.startswith("r"))
        print(
            f"  {name:>8} ({int(row['n'])} particles): {row['angle_median']:.2f}° "
            f"(p90 {row['angle_p90']:.2f}°), {row['shift_px']:.2f} px, r {rs}"
        )
    analysis = outputs.analysis
    print(
        f"\noutputs: {analysis / 'particles.star'} (every particle: poses, amplitudes, PCs, "
        f"groups), {analysis / 'groups'} (subsets for relion_reconstruct / cryoSPARC), "
        f"{analysis / 'models' / 'view.cxc'} (ChimeraX), report {analysis / 'report.md'}"
    )
    return 0
