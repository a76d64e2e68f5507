"""One-shot GPU check: paper-scale training, HEMNMA and inference throughput, one table.

Meant for one GPU in under 8 minutes (``benchmarks/gpu_check.sh`` runs it with a timeout):

1. ``deephemnma simulate`` ``--n`` particles (14,055 by default, the paper's training-set size;
   the simulator's default set: all-atom 4AKE chain A, modes 7-9, SNR 0.1, 128 px at 0.65 Å).
2. HEMNMA (``deephemnma align``, defaults) on ``--n-hemnma`` of them: particles per second.
3. Training on the HEMNMA labels with the grid orientation head and fresh synthetic images
   (``--orientation-head grid --synthetic-epochs``), the fast preset at batch ``--batch``: one
   epoch is timed, then as many epochs as fit in ``--train-seconds`` (the command resumes), so
   the number of samples seen per second is the figure; then the network alone is scored on
   the simulated particles HEMNMA did not see (median angular error, top-4 within 15°).
4. ``deephemnma predict`` on every particle (end to end, stack -> STAR) and the bare forward
   pass at the same batch: particles per second and their ratio.

Every command runs as a separate process, as a user runs it; wall seconds are measured here.
``--quick`` shrinks everything to check the script itself on a CPU (figures meaningless).

    python benchmarks/gpu_check.py [--device cuda] [--work DIR] [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import starfile
import torch

CLI = [sys.executable, "-m", "deephemnma_bridge.cli"]
ROWS: list[tuple[str, str]] = []


def cli(args: list[str]) -> tuple[str, float]:
    t0 = time.perf_counter()
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{done.stderr[-3000:]}")
    print(f"  {args[0]}: {wall:.0f} s", flush=True)
    return done.stdout, wall


def row(what: str, value: str) -> None:
    ROWS.append((what, value))
    print(f"  {what}: {value}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=14_055, help="particles simulated")
    parser.add_argument("--n-hemnma", type=int, default=3000, help="particles HEMNMA labels")
    parser.add_argument("--batch", type=int, default=256, help="training batch")
    parser.add_argument("--infer-batch", type=int, default=512, help="inference batch")
    parser.add_argument("--train-seconds", type=float, default=180.0, help="training budget")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script")
    args = parser.parse_args()
    if args.quick:
        args.n, args.n_hemnma, args.batch, args.infer_batch = 96, 48, 16, 32
        args.train_seconds = min(args.train_seconds, 20.0)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    dev = ["--device", args.device]
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(f"work {work}; device {args.device} ({name}); torch {torch.__version__}", flush=True)
    t_all = time.perf_counter()

    sim = work / "sim"
    if not (sim / "particles.star").exists():
        _, wall = cli(["simulate", "--n", str(args.n), "--seed", "31", "--out", str(sim), *dev])
        row("simulate", f"{args.n} particles in {wall:.0f} s ({args.n / wall:.0f}/s)")
    blocks = starfile.read(sim / "particles.star", always_dict=True)
    parts = {"labelled": slice(0, args.n_hemnma), "rest": slice(args.n_hemnma, args.n)}
    for key, rows in parts.items():
        starfile.write(
            {"optics": blocks["optics"], "particles": blocks["particles"].iloc[rows]},
            sim / f"{key}.star",
            overwrite=True,
        )
    modes = str(sim / "modes.npz")

    hemnma = work / "hemnma"
    if not (hemnma / "particles.star").exists():
        argv = ["align", str(sim / "labelled.star"), "--modes", modes, "--out", str(hemnma)]
        _, wall = cli([*argv, *dev])
        row("HEMNMA align", f"{args.n_hemnma} particles in {wall:.0f} s "
            f"({args.n_hemnma / wall:.1f}/s, whole run)")  # fmt: skip

    net = work / "net"
    base = ["train", str(hemnma / "particles.star"), "--out", str(net), "--preset", "fast"]
    base += ["--orientation-head", "grid", "--modes", modes, "--batch-size", str(args.batch)]
    base += ["--lr", "1e-3", "--synthetic-batches", "50", *dev]
    _, first = cli([*base, "--epochs", "1", "--synthetic-epochs", "1"])
    per_epoch = max(first, 1e-3)
    epochs = max(2, int(args.train_seconds / per_epoch))
    _, rest = cli([*base, "--epochs", str(epochs), "--synthetic-epochs", str(epochs)])
    samples = epochs * 50 * args.batch
    row(
        "training (grid head, synthetic)",
        f"{epochs} epochs x 50 batches x {args.batch} = {samples} images in "
        f"{first + rest:.0f} s ({samples / (first + rest):.0f} images/s incl. start-up)",
    )

    pred = work / "pred"
    argv = ["predict", str(sim / "particles.star"), "--checkpoint", str(net), "--out", str(pred)]
    _out, wall = cli([*argv, "--batch-size", str(args.infer_batch), *dev])
    row("predict (end to end)", f"{args.n} particles in {wall:.0f} s ({args.n / wall:.0f}/s)")
    scored = _score(pred / "particles.star", args.n_hemnma)
    row("network alone on unseen particles", scored)
    row("bare forward pass", _bare_forward(net, args.infer_batch, args.device))
    row("total wall time", f"{time.perf_counter() - t_all:.0f} s")
    print("\n| step | figure |\n| --- | --- |")
    for what, value in ROWS:
        print(f"| {what} | {value} |")


def _score(star: Path, skip: int) -> str:
    from deephemnma_bridge.adapters import read_particles
    from deephemnma_bridge.evaluation import ground_truth_errors

    table = read_particles(star)
    unseen = table.take(np.arange(skip, len(table)))
    e = ground_truth_errors(unseen)["all"]
    r = " ".join(f"{e[k]:.3f}" for k in sorted(e) if k.startswith("r") and k[1:].isdigit())
    return (
        f"median {e['angle_median']:.2f}° (p90 {e['angle_p90']:.2f}°), shift "
        f"{e['shift_px']:.2f} px, amplitude r {r}"
    )


def _bare_forward(net: Path, batch: int, device: str, seconds: float = 5.0) -> str:
    from deephemnma_bridge.training.trainer import load_checkpoint

    model, meta = load_checkpoint(net)
    size = int(meta["preprocess"]["output_size_px"])
    dev = torch.device(device)
    model = model.to(dev).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 1, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    amp = dev.type == "cuda"
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        model(x)
        if amp:
            torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x)
            n += batch
        if amp:
            torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t0)
    return f"{rate:.0f} particles/s at batch {batch}, {size} px"


if __name__ == "__main__":
    main()
