"""DeepHEMNMA network accuracy and inference throughput on the synthetic set (prints figures).

1. Simulates ``--n-train + --n-test`` particles with the simulator's defaults (all-atom 4AKE
   chain A, modes 7-9, SNR 0.1, CTF, 128 px at 0.65 Å).
2. HEMNMA (``deephemnma align``) on the training particles and, for comparison, on the
   held-out ones.
3. Trains the network on the training particles' HEMNMA results (``--preset``, ``--size``,
   ``--epochs``, ``--lr-step``, ``--augment``), predicts the held-out particles, and reports
   errors against the ground truth for the network and for HEMNMA on the same particles
   (angular error median / p90, shift, amplitude r and MAE/range), and their ratio (with
   ``--tta N`` also for the network alone with ``predict --tta N``); with
   ``--refine N`` also for the network's predictions refined by N HEMNMA iterations
   (``predict --refine``), and with ``--fallback`` for those whose cost then stays above the
   99th percentile of the training particles' HEMNMA costs re-aligned by HEMNMA
   (``predict --fallback-cost auto``).
   ``--train-args`` adds ``deephemnma train`` options (``MODES`` stands for the simulation's
   modes file), e.g. the simulation-trained grid head:
   ``--train-args "--orientation-head grid --modes MODES --synthetic-epochs 30"``; the
   training's CPU time (user + system of the process) is printed. With the grid head the
   network alone is also scored on its top-k (``--top-k``, 4): the share of held-out particles
   whose true orientation is within 15° of one of the k, and the median confidence of the
   particles it got right (< 15°) and wrong.
4. Inference throughput on every simulated particle: end to end (``deephemnma predict``:
   stack -> STAR, the loop's rate as the command prints it) and the bare forward pass of the
   same network (the checkpoint's architecture and weights, eval, no grad) on a random tensor
   of the same size and batch (``--infer-batch``: predict's default, 256), with glibc's
   heap held steady (`steady_heap`), over every thread and, with more than one, as one
   1-thread forward per thread side by side (how ``predict`` runs on the CPU),
   alternated ``--runs`` (2) times in the same run; medians, the ratio to the faster bare
   pass and the load averages. ``--throughput-only`` runs just this step
   with an existing ``--work``/``--net`` on ``--particles`` (default ``--work``/sim).

    python benchmarks/bench_network.py [--n-train 2000] [--n-test 500] [--epochs 15]
        [--augment] [--refine 40] [--work DIR]   (a DIR of an earlier run reuses its
        simulation and HEMNMA results)
    # the README's figures (grid head, synthetic training; about 40 CPU-minutes):
    python benchmarks/bench_network.py --n-train 1000 --n-test 500 --epochs 30 \
        --batch-size 64 --refine 20 --net net_direct --train-args "--orientation-head grid \
        --modes MODES --synthetic-epochs 30 --synthetic-batches 100 --lr 1e-3 --lr-step 20"
    # the network alone within 60 CPU-minutes (README, 2026-12-03; about 51 CPU-minutes):
    python benchmarks/bench_network.py --n-train 1000 --n-test 500 --epochs 50 \
        --batch-size 64 --refine 20 --tta 12 --net net_cos --train-args "--orientation-head \
        grid --modes MODES --synthetic-epochs 48 --synthetic-batches 100 --lr 1e-3 \
        --lr-schedule cosine --condition-on-orientation --loss-weights amplitudes=4"
    # step 4 alone, on an earlier run's network and particles:
    python benchmarks/bench_network.py --work DIR --net net_direct --throughput-only \
        --runs 3 --repeat 4   (the README's: the 1,500 particles listed 4 times)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import starfile
import torch

from deephemnma_bridge.adapters import read_particles, write_particles
from deephemnma_bridge.adapters.images import portable_image_paths
from deephemnma_bridge.api._predict import BATCH_SIZE
from deephemnma_bridge.evaluation import ground_truth_errors
from deephemnma_bridge.training.trainer import load_checkpoint

CLI = [sys.executable, "-m", "deephemnma_bridge.cli"]


CPU: dict[str, float] = {}  # CPU-s (user + system) of the last run of each command name


def cli(args: list[str], name: str | None = None) -> str:
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{done.stderr[-3000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    CPU[name or args[0]] = cpu
    print(f"  {args[0]}: {time.perf_counter() - t0:.0f} s, {cpu:.0f} CPU-s", flush=True)
    return done.stdout


def fresh(folder: Path) -> None:
    """Remove an output folder of an earlier run (commands refuse to overwrite)."""
    if folder.exists():
        shutil.rmtree(folder)


def errors(path: Path) -> dict[str, float]:
    return ground_truth_errors(read_particles(path))["all"]


def show(name: str, e: dict[str, float]) -> None:
    print(
        f"{name:>10}: angle {e['angle_median']:.2f}° (p90 {e['angle_p90']:.2f}°), shift "
        f"{e['shift_px']:.2f} px, r {e['r7']:.3f} {e['r8']:.3f} {e['r9']:.3f}, mae/range "
        f"{e['mae7']:.3f} {e['mae8']:.3f} {e['mae9']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--size", type=int, default=None, help="network input px (preset's)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch")
    parser.add_argument(
        "--infer-batch",
        type=int,
        default=BATCH_SIZE["network"],
        help="inference batch (predict's default for the network alone)",
    )
    parser.add_argument("--lr-step", type=int, default=None, help="lr / 10 every N epochs")
    parser.add_argument("--augment", action="store_true", help="in-plane rotation augmentation")
    parser.add_argument("--refine", type=int, default=0, help="also predict + N HEMNMA steps")
    parser.add_argument(
        "--fallback", action="store_true", help="with --refine: also --fallback-cost auto"
    )
    parser.add_argument("--retrain", action="store_true", help="train afresh in an old --work")
    parser.add_argument("--train-args", default="", help="more train options (MODES: modes)")
    parser.add_argument(
        "--tta", type=int, default=0, help="also the network alone with predict --tta N"
    )
    parser.add_argument("--top-k", type=int, default=4, help="grid head: candidates scored")
    parser.add_argument("--net", default="net", help="network folder name under --work")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument(
        "--throughput-only",
        action="store_true",
        help="only step 4, with the network --work/--net (trained already) on --particles",
    )
    parser.add_argument(
        "--particles", type=Path, default=None, help="--throughput-only: (--work/sim/particles)"
    )
    parser.add_argument("--runs", type=int, default=2, help="throughput: alternations")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="throughput: list the particles this many times (a longer run: the first batch of "
        "each lane, which warms up, weighs less)",
    )
    args = parser.parse_args()
    steady_heap()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_network_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.throughput_only:
        net, particles = work / args.net, args.particles or work / "sim" / "particles.star"
        for need in (net, particles):
            if not need.exists():
                raise SystemExit(f"--throughput-only: {need} does not exist (--work, --net)")
        throughput(net, particles, work / "throughput", args.infer_batch, args.runs, args.repeat)
        return
    n = args.n_train + args.n_test
    print(f"work dir {work}; {torch.get_num_threads()} threads; {n} particles", flush=True)
    sim = work / "sim"
    if not sim.exists():
        cli(["simulate", "--n", str(n), "--seed", "21", "--out", str(sim)])
    blocks = starfile.read(sim / "particles.star", always_dict=True)
    for name, rows in (("train", slice(0, args.n_train)), ("test", slice(args.n_train, n))):
        starfile.write(
            {"optics": blocks["optics"], "particles": blocks["particles"].iloc[rows]},
            sim / f"{name}.star",
        )
    modes = str(sim / "modes.npz")
    for name in ("train", "test"):
        if not (work / f"hemnma_{name}").exists():
            cli(
                [
                    "align",
                    str(sim / f"{name}.star"),
                    "--modes",
                    modes,
                    "--out",
                    str(work / f"hemnma_{name}"),
                ]
            )
    net = work / args.net
    if args.retrain:
        fresh(net)
    train = ["train", str(work / "hemnma_train" / "particles.star"), "--out", str(net)]
    train += ["--preset", args.preset, "--epochs", str(args.epochs)]
    train += ["--batch-size", str(args.batch_size), "--test-fraction", "0"]
    train += ["--size", str(args.size)] if args.size else []
    train += ["--lr-step", str(args.lr_step)] if args.lr_step else []
    train += ["--augment"] if args.augment else []
    train += [a.replace("MODES", modes) for a in args.train_args.split()]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cli(train)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    train_cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    print(f"  train: {train_cpu / 60:.1f} CPU-minutes ({' '.join(train[4:])})", flush=True)
    pred = work / "predicted"
    fresh(pred)
    cli(
        [
            "predict",
            str(sim / "test.star"),
            "--checkpoint",
            str(net),
            "--out",
            str(pred),
            "--batch-size",
            str(args.infer_batch),
            "--device",
            "cpu",
        ]
    )
    results = {"network": errors(pred / "particles.star")}
    if args.tta > 1:  # the network alone, amplitudes averaged over --tta in-plane turns
        pred_tta = work / "predicted_tta"
        fresh(pred_tta)
        argv = ["predict", str(sim / "test.star"), "--checkpoint", str(net), "--tta", str(args.tta)]
        argv += ["--out", str(pred_tta), "--batch-size", str(args.infer_batch), "--device", "cpu"]
        cli(argv, "tta")
        results[f"network+tta{args.tta}"] = errors(pred_tta / "particles.star")
    topk_report(net, sim / "test.star", args.top_k)
    if args.refine:
        runs = {f"+refine{args.refine}": []}
        if args.fallback:
            hemnma_train = str(work / "hemnma_train" / "particles.star")
            runs[f"+refine{args.refine}+fallback"] = ["--hemnma", hemnma_train]
            runs[f"+refine{args.refine}+fallback"] += ["--fallback-cost", "auto"]
        for name, extra in runs.items():
            folder = work / name.lstrip("+").replace("+", "_")
            fresh(folder)
            argv = ["predict", str(sim / "test.star"), "--checkpoint", str(net)]
            argv += ["--modes", modes, "--refine", str(args.refine), "--out", str(folder)]
            printed = cli([*argv, *extra], name)
            if extra:
                print("  " + printed.strip().splitlines()[0])  # how many fell back
            results[name] = errors(folder / "particles.star")
    # HEMNMA on the held-out particles again, now, beside the predictions: CPU side by side
    side = work / "hemnma_test_side_by_side"
    fresh(side)
    cli(["align", str(sim / "test.star"), "--modes", modes, "--out", str(side)], "hemnma")
    hem = errors(work / "hemnma_test" / "particles.star")
    meta = json.loads((net / "train.json").read_text())
    print(
        f"held-out {args.n_test} particles, network trained on {args.n_train} HEMNMA results "
        f"({args.preset} preset, {args.epochs} epochs at most, {meta['epochs_run']} run, "
        f"{meta['seconds']:.0f} s):"
    )
    show("HEMNMA", hem)
    for name, e in results.items():
        show(name, e)
        print(
            f"  ratio {name} / HEMNMA: angle {e['angle_median'] / hem['angle_median']:.2f}x, "
            f"shift {e['shift_px'] / hem['shift_px']:.2f}x, amplitude MAE "
            f"{np.mean([e[f'mae{m}'] / hem[f'mae{m}'] for m in (7, 8, 9)]):.2f}x "
            "(target <= 1.25x)"
        )
        if name in CPU:
            print(
                f"  CPU-s per particle {name} {CPU[name] / args.n_test:.3f}, HEMNMA "
                f"{CPU['hemnma'] / args.n_test:.3f} (run just before): "
                f"{CPU[name] / CPU['hemnma']:.2f}x (target <= 0.5x)"
            )
    throughput(
        net, sim / "particles.star", work / "throughput", args.infer_batch, args.runs, args.repeat
    )


def topk_report(net: Path, particles: Path, k: int) -> None:
    """Grid head only: true orientation within 15° of one of the top k; confidence split."""
    from deephemnma_bridge.adapters import ParticleImages
    from deephemnma_bridge.conventions import angle_between_rotations_degrees, euler_to_matrix
    from deephemnma_bridge.preprocess import PreprocessConfig, preprocess_images
    from deephemnma_bridge.training.data import CTF_FIELDS, ctf_from_rows
    from deephemnma_bridge.training.targets import TargetSpec, decode

    model, meta = load_checkpoint(net)
    spec = TargetSpec.from_dict(meta["target"])
    if spec.grid is None:
        return
    table = read_particles(particles)
    prep = PreprocessConfig.from_dict(meta["preprocess"])
    ctf = np.stack([np.asarray(getattr(table, f), dtype=float) for f in CTF_FIELDS], axis=1)
    source = ParticleImages(table)
    cands, conf = [], []
    with torch.no_grad():
        for start in range(0, len(table), 128):
            rows = np.arange(start, min(start + 128, len(table)))
            x = preprocess_images(
                torch.as_tensor(source.read(rows)),
                pixel_size_angstrom=float(table.pixel_size_angstrom[0]),
                config=prep,
                ctf=ctf_from_rows(ctf[rows], torch.device("cpu")),
            )
            out = decode(spec, model(x[:, None]), top_k=k)
            cands.append(out["candidates"])
            conf.append(out["confidence"])
    c, p = np.concatenate(cands), np.concatenate(conf)
    e = table.extra
    true = euler_to_matrix(np.stack([e[f"dhnTrueAngle{a}"] for a in ("Rot", "Tilt", "Psi")], 1))
    err = np.stack([angle_between_rotations_degrees(c[:, j], true) for j in range(k)], 1)
    good = err[:, 0] < 15
    right = float(np.median(p[good])) if good.any() else float("nan")
    wrong = float(np.median(p[~good])) if (~good).any() else float("nan")
    print(
        f"  network top-1 median {np.median(err[:, 0]):.2f}° (p90 "
        f"{np.percentile(err[:, 0], 90):.2f}°); true within 15° of one of the top {k}: "
        f"{100 * np.mean(err.min(1) < 15):.1f} % (target >= 98 %), of the top 1: "
        f"{100 * np.mean(good):.1f} %; median confidence right {right:.3f}, wrong {wrong:.3f}",
        flush=True,
    )


def steady_heap() -> None:
    """Serve this process's blocks below 32 MiB from glibc's heap and keep up to 64 MiB freed
    there, so that the bare forward pass (`bare_forward`) is not slowed by glibc's default.

    By default glibc maps blocks above a threshold that moves with what was freed last: in
    this process, after the loading and the first passes, two bare 1-thread lanes (ResNet34,
    32 px, batches of 128) often kept mapping fresh pages for their activations, 52-56 page
    faults per image at 1,514-1,557 images/s, and sometimes not (7 faults, 1,678/s); with these
    settings 7 faults and 1,633-1,687/s in every run (2026-12-03). `deephemnma predict` does
    not fall into that state (12,000 particles: 1,677-1,747 particles/s and 208,000-282,000
    page faults, most at start-up, with these settings or without), so it runs without them;
    the bare pass with them is the steadier, faster reference. Either setting alone is worse
    (glibc then stops moving the other threshold). No effect outside glibc, or when the
    environment sets malloc."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc's own symbol)
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    made = libc.mallopt(m_mmap_threshold, 32 << 20) + libc.mallopt(m_trim_threshold, 64 << 20)
    print(f"glibc heap held steady for the bare pass: {made == 2}", flush=True)


def bare_forward(net: Path, batch: int, seconds: float = 5.0, lanes: int = 1) -> float:
    """Images/s of the checkpoint's own network (its architecture and weights: grid or
    quaternion head, backbone) in eval mode without gradients, on one reused random batch at
    its input size: no reading, preprocessing, decoding or writing. ``lanes`` > 1: that many
    threads side by side, each running its own batch with one intra-op thread (the images/s
    of all of them), as `predict` runs on the CPU (`api._sharded.in_lanes`)."""
    model, meta = load_checkpoint(net)
    size = int(meta["preprocess"]["output_size_px"] or meta["box_size_px"])
    rates = [0.0] * lanes

    def run(lane: int) -> None:
        if lanes > 1:
            torch.set_num_threads(1)
        x = torch.randn(batch, 1, size, size)
        with torch.no_grad():
            model(x)
            t0 = time.perf_counter()
            reps = 0
            while time.perf_counter() - t0 < seconds:
                model(x)
                reps += 1
        rates[lane] = reps * batch / (time.perf_counter() - t0)

    if lanes == 1:
        run(0)
    else:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(lanes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return sum(rates)


def repeated(particles: Path, times: int, folder: Path) -> Path:
    """``particles`` listed ``times`` times over (the same images), written into ``folder``."""
    if times <= 1:
        return particles
    table = read_particles(particles)
    tiled = table.take(np.tile(np.arange(len(table)), times))
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{particles.stem}_x{times}.star"
    write_particles(portable_image_paths(tiled), out)
    return out


def throughput(
    net: Path, particles: Path, out: Path, batch: int, runs: int = 2, repeat: int = 1
) -> None:
    """End to end (``predict`` on every particle: stack -> STAR, the loop's rate as the
    command prints it) against the bare forward pass of the same network (`bare_forward`),
    alternated ``runs`` times, medians; the load averages before and after. With more than
    one thread the bare pass is measured both ways, one forward over every thread and one
    1-thread forward per thread side by side (`predict`'s lanes on the CPU), and the end to
    end rate is compared with the faster."""
    _, ckpt = load_checkpoint(net)
    size = int(ckpt["preprocess"]["output_size_px"] or ckpt["box_size_px"])
    particles = repeated(particles, repeat, out.with_name(out.name + "_input"))
    n = len(read_particles(particles))
    threads = torch.get_num_threads()
    ends, bares, lanes = [], [], []
    load = os.getloadavg()
    for _ in range(runs):
        bares.append(bare_forward(net, batch))
        if threads > 1:
            lanes.append(bare_forward(net, batch, lanes=threads))
        fresh(out)
        argv = ["predict", str(particles), "--checkpoint", str(net), "--out", str(out)]
        printed = cli([*argv, "--batch-size", str(batch), "--device", "cpu"])
        rate = re.search(r"\(([\d.]+)/s", printed)
        assert rate is not None, printed
        ends.append(float(rate.group(1)))
    end, bare = float(np.median(ends)), float(np.median(bares))
    peers = [bares] if not lanes else [bares, lanes]
    best = [max(b) for b in zip(*peers, strict=True)]  # each run's faster bare pass
    peer = float(np.median(best))
    paired = float(np.median([e / b for e, b in zip(ends, best, strict=True)]))
    after = os.getloadavg()

    def listed(values: list[float]) -> str:
        return ", ".join(f"{v:.0f}" for v in values)

    print(
        f"inference of {n} particles at {size} px, batch {batch}, {threads} thread(s): end "
        f"to end {end:.0f} "
        f"particles/s (stack -> STAR, predict loop; runs {listed(ends)}); bare forward "
        f"{bare:.0f} images/s over {threads} thread(s) (runs {listed(bares)})"
        + (
            f", {float(np.median(lanes)):.0f} as {threads} 1-thread lanes side by side "
            f"(runs {listed(lanes)})"
            if lanes
            else ""
        )
        + f"; end to end / the faster bare pass {100 * end / peer:.0f} % (target >= 90 %; "
        f"median of each run's ratio to the bare passes just before it {100 * paired:.0f} %); "
        f"load average (1 min) {load[0]:.2f} before, {after[0]:.2f} after on "
        f"{os.cpu_count()} CPUs"
    )
    if load[0] > (os.cpu_count() or 1):  # before: "after" counts this benchmark's own load
        # measured (2 cores, load 6): the bare pass 80 images/s with libgomp's default
        # spin-waiting, 300 with OMP_WAIT_POLICY=PASSIVE; predict was hit far less (its
        # background thread's OpenMP team: more threads than cores, so libgomp spins less)
        print(
            "  the machine was busy (load above the CPU count): OpenMP's spin-waiting makes "
            "both figures, and their ratio, unlike an idle machine's; measure when it is idle"
        )


if __name__ == "__main__":
    main()
