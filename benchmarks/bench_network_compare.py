"""Orientation heads and backbones compared at an equal training budget (prints one table).

On one simulated, HEMNMA-labelled set (the layout of ``bench_network.py``: ``--work`` reuses
its ``sim/``, ``hemnma_train/`` and ``hemnma_test/``), every variant is trained with the same
budget: ``--synthetic-epochs`` x ``--synthetic-batches`` x ``--batch-size`` simulated images,
then ``--finetune-epochs`` epochs on the training particles' HEMNMA labels, with the same
learning rate, seed and no early stopping. Each network then predicts the held-out particles,
scored against the ground truth by the network alone (no refinement): median / p90 angular
error, grid head only the share whose true orientation is within 15° of one of its top
``--top-k``, amplitude Pearson r per mode and shift error. Training cost is the CPU time (user
+ system) of the ``deephemnma train`` process; ``--threads`` (1) caps every child's threads
(OMP_NUM_THREADS, MKL_NUM_THREADS, ``align --threads``) so the figures are one core's.

A variant is ``HEAD-BACKBONE``: HEAD ``grid`` (scores over an SO(3) grid) or ``quat`` (the
paper's quaternion regression), BACKBONE any timm model name; ``--variants`` picks them
(comma-separated; default: the current design grid-resnet34, the paper's head on the same
backbone quat-resnet34, and the grid head on resnet18, efficientnet_b0 and
mobilenetv3_small_100).

    python benchmarks/bench_network_compare.py --n-train 400 --n-test 300 \
        --synthetic-epochs 4 --synthetic-batches 40 --batch-size 64 --finetune-epochs 3 \
        --work /tmp/cmp [--variants grid-resnet34,quat-resnet34] [--retrain]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import starfile
import torch
from bench_network import CPU, cli, errors, fresh, topk_report  # the script's folder

from deephemnma_bridge.training.trainer import load_checkpoint

DEFAULT_VARIANTS = (
    "grid-resnet34",
    "quat-resnet34",
    "grid-resnet18",
    "grid-efficientnet_b0",
    "grid-mobilenetv3_small_100",
)
HEADS = {"grid": "grid", "quat": "quaternion"}


@dataclass(frozen=True)
class Variant:
    name: str
    head: str  # train's --orientation-head
    backbone: str  # timm model name
    train_args: tuple[str, ...] = ()  # more train options (same budget)

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``HEAD-BACKBONE`` and, after spaces, more ``train`` options."""
        name, *extra = text.split()
        head, _, backbone = name.partition("-")
        if head not in HEADS or not backbone:
            raise SystemExit(f"variant {name!r}: expected HEAD-BACKBONE, HEAD one of {[*HEADS]}")
        return cls(" ".join([name, *extra]), HEADS[head], backbone, tuple(extra))

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.name.replace(" ", "_"))


def prepare(work: Path, n_train: int, n_test: int, threads: int) -> tuple[Path, Path]:
    """Simulated particles split into ``sim/train.star`` and ``sim/test.star``, HEMNMA on the
    training ones (``hemnma_train/``); an earlier run's results in ``work`` are reused.
    Returns (simulation folder, modes file)."""
    n = n_train + n_test
    sim = work / "sim"
    if not sim.exists():
        cli(["simulate", "--n", str(n), "--seed", "21", "--out", str(sim)])
    blocks = starfile.read(sim / "particles.star", always_dict=True)
    if len(blocks["particles"]) != n:
        raise SystemExit(f"{sim} holds {len(blocks['particles'])} particles, not {n}")
    for name, rows in (("train", slice(0, n_train)), ("test", slice(n_train, n))):
        starfile.write(
            {"optics": blocks["optics"], "particles": blocks["particles"].iloc[rows]},
            sim / f"{name}.star",
        )
    modes = sim / "modes.npz"
    if not (work / "hemnma_train").exists():
        argv = ["align", str(sim / "train.star"), "--modes", str(modes)]
        cli([*argv, "--threads", str(threads), "--out", str(work / "hemnma_train")])
    return sim, modes


def finished(net: Path, wanted: dict[str, object]) -> bool:
    """``net`` holds a finished training with the ``wanted`` settings (`TrainConfig` fields;
    ``lr_step_epochs`` None: the preset's)."""
    if not (net / "train.json").is_file() or not (net / "best.pt").is_file():
        return False
    _, meta = load_checkpoint(net)
    done = json.loads((net / "train.json").read_text())["epochs_run"] == wanted["epochs"]
    have = meta["train"]
    return done and all(v is None or have.get(k) == v for k, v in wanted.items())


def topk_share(net: Path, particles: Path, k: int) -> float | None:
    """Grid head: % of particles whose true orientation is within 15° of one of the top k
    (`bench_network.topk_report`'s figure, its line echoed); None for other heads."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        topk_report(net, particles, k)
    text = printed.getvalue()
    if not text:
        return None
    print(text, end="", flush=True)
    found = re.search(rf"one of the top {k}: ([\d.]+) %", text)
    if found is None:
        raise SystemExit(f"unexpected top-k report: {text!r}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--synthetic-epochs", type=int, default=4)
    parser.add_argument("--synthetic-batches", type=int, default=40, help="batches per epoch")
    parser.add_argument("--batch-size", type=int, default=64, help="synthetic and fine-tune")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="on the HEMNMA labels")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-step", type=int, default=None, help="lr / 10 every N epochs")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="HEAD-BACKBONE,..")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="'HEAD-BACKBONE [TRAIN OPTIONS]'",
        help="one more variant with train options of its own (repeatable), e.g. "
        "'grid-resnet34 --loss-weights amplitudes=4,orientation=1,shifts=1'",
    )
    parser.add_argument("--top-k", type=int, default=4, help="grid head: candidates scored")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of every command")
    parser.add_argument("--retrain", action="store_true", help="train afresh in an old --work")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    variants = [Variant.parse(v.strip()) for v in args.variants.split(",") if v.strip()]
    variants += [Variant.parse(v) for v in args.variant if v.strip()]
    if not variants:
        raise SystemExit("--variants: none given")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # the commands below are child processes
    torch.set_num_threads(args.threads)  # the top-k scoring runs here
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_network_compare_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir {work}; {args.threads} thread(s) per command", flush=True)
    sim, modes = prepare(work, args.n_train, args.n_test, args.threads)
    epochs = args.synthetic_epochs + args.finetune_epochs
    images = args.synthetic_epochs * args.synthetic_batches * args.batch_size
    rows = []
    for v in variants:
        print(f"{v.name}:", flush=True)
        net = work / f"net_{v.slug}"
        wanted = {
            "epochs": epochs,
            "synthetic_epochs": args.synthetic_epochs,
            "synthetic_batches": args.synthetic_batches,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "lr_step_epochs": args.lr_step,
            "orientation_head": v.head,
            "backbone": v.backbone,
        }
        extra = net / "bench_train_args.json"  # the variant's own options, not in train.json
        reuse = not args.retrain and finished(net, wanted)
        reuse = reuse and extra.is_file() and json.loads(extra.read_text()) == list(v.train_args)
        if not reuse:
            fresh(net)  # another budget's or an interrupted training: train afresh
        train = ["train", str(work / "hemnma_train" / "particles.star"), "--out", str(net)]
        train += ["--preset", args.preset, "--epochs", str(epochs), "--lr", str(args.lr)]
        train += ["--batch-size", str(args.batch_size), "--test-fraction", "0"]
        train += ["--early-stopping", "0", "--orientation-head", v.head, "--backbone", v.backbone]
        train += ["--modes", str(modes), "--synthetic-epochs", str(args.synthetic_epochs)]
        train += ["--synthetic-batches", str(args.synthetic_batches)]
        train += ["--lr-step", str(args.lr_step)] if args.lr_step else []
        train += list(v.train_args)
        if reuse:
            print("  train: an earlier run's, same budget (--retrain to measure)", flush=True)
            CPU["train"] = float("nan")
        else:
            cli(train)
            extra.write_text(json.dumps(list(v.train_args)))
        pred = work / f"predicted_{v.slug}"
        fresh(pred)
        argv = ["predict", str(sim / "test.star"), "--checkpoint", str(net), "--out", str(pred)]
        cli([*argv, "--device", "cpu"])
        e = errors(pred / "particles.star")
        rows.append((v, CPU["train"], e, topk_share(net, sim / "test.star", args.top_k)))
    n_val = round(0.1 * args.n_train)  # train's default validation fraction
    print(
        f"\nequal budget: {args.synthetic_epochs} synthetic epochs x {args.synthetic_batches} "
        f"batches x {args.batch_size} = {images} simulated images, then {args.finetune_epochs} "
        f"epochs on ~{args.n_train - n_val} HEMNMA-labelled particles (batch {args.batch_size}, "
        f"lr {args.lr:g}, {args.preset} preset, no early stopping; best validation epoch kept); "
        f"network alone on {args.n_test} held-out particles against the ground truth; "
        f"{args.threads} thread(s)"
    )
    modes_r = sorted(int(k[1:]) for k in rows[0][2] if re.fullmatch(r"r\d+", k))
    head = (
        f"{'variant':<40} {'train CPU-s':>11} {'median°':>8} {'p90°':>7} "
        f"{f'top-{args.top_k}≤15°':>10} " + " ".join(f"{f'r{m}':>6}" for m in modes_r)
    ) + f" {'shift px':>8}"
    print(head)
    print("-" * len(head))
    for v, cpu, e, topk in rows:
        cost = "reused" if math.isnan(cpu) else f"{cpu:.0f}"
        print(
            f"{v.name:<40} {cost:>11} {e['angle_median']:>8.2f} {e['angle_p90']:>7.2f} "
            f"{'-' if topk is None else f'{topk:.1f} %':>10} "
            + " ".join(f"{e[f'r{m}']:>6.3f}" for m in modes_r)
            + f" {e['shift_px']:>8.2f}"
        )
    print("load averages (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
