"""HEMNMA accuracy and cost on the simulator's ground truth (prints figures, no thresholds).

Simulates the synthetic adenylate kinase set with the simulator's realistic defaults (all-atom
density of 4AKE chain A, ANM modes 7-9, helical amplitudes up to 3 Å RMS, SNR 0.1 over the
whole box, CTF 200 kV / Cs 2 mm / 5,000 Å, 128 px at 0.65 Å, shifts ±5 px), runs
``deephemnma align`` as a user would (a separate process each time) and reports against the
ground truth: angular error (angle between rotations: median, 90th percentile), shift error
(px, median), amplitude error per mode (mean absolute error / simulated range, Pearson r),
and CPU seconds per particle (user + system time of the align process / particles) for a
whole 32-particle run (start-up, library, everything) and for a 1,000-particle run (steady
state: the fixed costs are spread). Variants (``--variants``): 64 px (1.3 Å), SNR 0.03 and
0.01, and the phase-flip-only mode of the reference implementation.

    python benchmarks/bench_hemnma.py [--n 1000] [--variants] [--variant-n 200] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deephemnma_bridge.adapters import read_particles
from deephemnma_bridge.evaluation import ground_truth_errors

CLI = [sys.executable, "-m", "deephemnma_bridge.cli"]


def run(args: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one CLI call in its own process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def scores(aligned: Path) -> dict[str, float]:
    return ground_truth_errors(read_particles(aligned))["all"]


def case(
    work: Path,
    name: str,
    n: int,
    sim_args: list[str],
    align_args: list[str],
    pixel: float,
    device: str,
) -> None:
    slug = name.replace(" ", "_").replace("(", "").replace(")", "")
    sim = work / f"sim_{slug}"
    if not sim.exists():
        run(
            [
                "simulate",
                "--n",
                str(n),
                "--seed",
                "11",
                *sim_args,
                "--out",
                str(sim),
                "--device",
                device,
            ]
        )
    out = work / f"align_{slug}"
    wall, cpu = run(
        [
            "align",
            str(sim / "particles.star"),
            "--modes",
            str(sim / "modes.npz"),
            *align_args,
            "--out",
            str(out),
            "--device",
            device,
        ]
    )
    s = scores(out / "particles.star")
    print(
        f"{name:>22} {n:5d}  {s['angle_median']:6.2f}° {s['angle_p90']:6.2f}°  "
        f"{s['shift_px']:5.2f} px  r {s['r7']:.3f} {s['r8']:.3f} {s['r9']:.3f}  "
        f"mae/range {s['mae7']:.3f} {s['mae8']:.3f} {s['mae9']:.3f}  "
        f"{cpu / n:6.3f} CPU-s/p  {wall / n:6.3f} wall-s/p  ({wall:.0f} s)",
        flush=True,
    )
    (work / f"{slug}.json").write_text(json.dumps({**s, "cpu_s": cpu, "wall_s": wall, "n": n}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000, help="steady-state particles (1000)")
    parser.add_argument("--variants", action="store_true", help="also 64 px, SNR, flip")
    parser.add_argument("--variant-n", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=None, help="keep files here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_hemnma_"))
    work.mkdir(parents=True, exist_ok=True)
    threads = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))
    print(f"work dir {work}; device {args.device}; {threads} threads; defaults unless stated")
    header = f"{'case':>22} {'n':>5}  {'angle median/p90':>16}  {'shift':>8}"
    print(f"{header}  {'amplitude r (7 8 9)':>19}")
    case(work, "128px SNR0.1 (32)", 32, [], [], 0.65, args.device)
    case(work, "128px SNR0.1", args.n, [], [], 0.65, args.device)
    if args.variants:
        v = args.variant_n
        case(
            work,
            "64px 1.3A SNR0.1",
            v,
            ["--box", "64", "--pixel-size", "1.3"],
            ["--working-size", "64"],
            1.3,
            args.device,
        )
        case(work, "128px SNR0.03", v, ["--snr", "0.03"], [], 0.65, args.device)
        case(work, "128px SNR0.01", v, ["--snr", "0.01"], [], 0.65, args.device)
        case(work, "128px SNR0.1 flip", v, [], ["--ctf", "flip"], 0.65, args.device)


if __name__ == "__main__":
    main()
