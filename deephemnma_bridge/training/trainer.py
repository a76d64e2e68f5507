"""Training loop: splits, DataLoader streaming, L1 losses, Adam + step decay, checkpoints,
curves, early stopping, mixed precision on GPU, DistributedDataParallel under torchrun.

Checkpoints are plain dictionaries of tensors and JSON text saved with ``torch.save`` and
read back with ``torch.load(weights_only=True)``: nothing is unpickled but tensors and basic
types. ``last.pt`` (weights, optimiser, scheduler, epoch, history: for resuming) and
``best.pt`` (weights of the lowest validation loss, for inference) both carry ``meta``: the
training settings, the target layout and label scaling, the mode numbers, box and pixel sizes
and the preprocessing settings, so that inference reproduces the input exactly.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from ..alignment.hemnma import ReferenceModel
from ..device import denormals_flushed, loader_workers
from ..errors import InputError
from ..fileutils import atomic_path
from ..imagesource import ImageSource
from ..preprocess import PreprocessConfig, preprocess_images
from .data import ParticleBatches, ctf_from_rows, rotate_inplane, split_particles
from .model import DeepHEMNMANet
from .targets import TargetSpec, encode, target_loss

__all__ = ["PRESETS", "TrainConfig", "checkpoint_file", "load_checkpoint", "train", "working_size"]


@dataclass(frozen=True)
class TrainConfig:
    """Training settings. Defaults are the paper's (METHOD.md section 4); see `PRESETS`."""

    target: str = "all"
    epochs: int = 400
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 1e-5
    lr_step_epochs: int = 80
    lr_gamma: float = 0.1
    # "step": lr x lr_gamma every lr_step_epochs; "cosine": from lr down to lr / 100 over the
    # epochs (per epoch, Loshchilov & Hutter 2017), no step to place
    lr_schedule: str = "step"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    early_stopping: int = 0  # epochs without validation improvement; 0: off
    amp: bool = False  # bfloat16 autocast on CUDA
    augment: bool = False  # exact in-plane rotations (any angle) with transformed labels
    workers: int = -1  # -1: auto (device.loader_workers)
    size_px: int = 128  # network input side; 0: from lowpass_angstrom (`working_size`)
    dropout: float = 0.5  # in the MLP head
    lowpass_angstrom: float | None = None  # input low-pass (Å); None: none
    soft_mask: bool = False  # circular mask, 0 from half the box on (needed by augment)
    loss_weights: tuple[tuple[str, float], ...] = ()
    max_train_batches: int = 0  # 0: all (for quick checks)
    backbone: str = "resnet34"  # any timm model name (the paper's ResNet34 by default)
    orientation_head: str = "quaternion"  # or "grid": SO(3) grid scores (so3.py)
    grid_step_degrees: float = 15.0
    # the first synthetic_epochs epochs learn from fresh forward-model images (synthetic.py),
    # synthetic_batches batches each; the rest fine-tune on the labelled particles
    synthetic_epochs: int = 0
    synthetic_batches: int = 100
    channels_last: bool = True
    # grid head only: amplitudes and shifts read in the light of the orientation (model.py)
    condition_on_orientation: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise InputError("--epochs and --batch-size must be >= 1 and --lr > 0")
        if self.size_px != 0 and self.size_px < 16:
            raise InputError(f"--size must be >= 16 px (or 0: automatic), got {self.size_px}")
        if self.size_px == 0 and self.lowpass_angstrom is None:
            raise InputError("--size 0 (automatic) needs --lowpass")
        if not 0 <= self.dropout < 1:
            raise InputError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.lowpass_angstrom is not None and self.lowpass_angstrom <= 0:
            raise InputError(f"--lowpass must be > 0 Å, got {self.lowpass_angstrom}")
        if self.lr_schedule not in ("step", "cosine"):
            raise InputError(f"--lr-schedule must be step or cosine, got {self.lr_schedule!r}")
        if self.orientation_head not in ("quaternion", "grid"):
            raise InputError(
                f"--orientation-head must be quaternion or grid, got {self.orientation_head!r}"
            )
        if not 1 <= self.grid_step_degrees <= 90:
            raise InputError(f"--grid-step must be within 1-90°, got {self.grid_step_degrees}")
        if self.synthetic_epochs < 0 or self.synthetic_batches < 1:
            raise InputError("--synthetic-epochs must be >= 0 and --synthetic-batches >= 1")
        if self.synthetic_epochs > self.epochs:
            raise InputError(
                f"--synthetic-epochs ({self.synthetic_epochs}) is more than --epochs "
                f"({self.epochs}): the synthetic epochs are counted in --epochs"
            )
        if self.condition_on_orientation and self.orientation_head != "grid":
            raise InputError(
                "--condition-on-orientation needs the grid head (--orientation-head grid): the "
                "amplitudes are read in the light of its top-scored rotation"
            )
        if self.augment and not self.soft_mask:
            raise InputError(
                "--augment rotates the images: train with the soft circular mask (--mask; the "
                "fast preset has it) so that rotated and unrotated images look alike"
            )


def working_size(config: TrainConfig, box_size_px: int, pixel_size_angstrom: float) -> int:
    """The network's input side: ``config.size_px`` (at most the box), or with ``size_px`` 0
    the smallest even size whose pixels are at most ``lowpass_angstrom / 2.5`` (at least 32).

    >>> working_size(TrainConfig(size_px=0, lowpass_angstrom=8.0), 128, 0.65)
    32
    >>> working_size(TrainConfig(size_px=0, lowpass_angstrom=8.0), 360, 1.3)
    148
    """
    if config.size_px:
        return min(config.size_px, box_size_px)
    assert config.lowpass_angstrom is not None
    n = math.ceil(2.5 * box_size_px * pixel_size_angstrom / config.lowpass_angstrom)
    return min(box_size_px, max(32, n + n % 2))


#: Documented presets. ``paper``: the published settings (128 px input, batch 2, lr 1e-4,
#: dropout 0.5). ``fast``: batches of 32, lr 3e-4 and no dropout (measured on 3,000 simulated
#: particles, ground-truth labels, 32 px: with lr 1e-3 the orientation did not learn at all,
#: 112° median error after 10 epochs with or without dropout; with lr 3e-4 it fell to 88°
#: in 6 epochs with dropout 0.5 and to 66° without),
#: input low-passed at 8 Å and sampled at lowpass / 2.5 (32 px for the 83 Å demo box; cheaper
#: and without the noise above 8 Å, where HEMNMA's own search does not look either), a soft
#: circular mask, the learning rate divided by 10 every 30 epochs, mixed precision on GPU and
#: early stopping on the validation loss.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "fast": {
        "batch_size": 32,
        "lr": 3e-4,
        "lr_step_epochs": 30,
        "epochs": 120,
        "early_stopping": 15,
        "amp": True,
        "dropout": 0.0,
        "lowpass_angstrom": 8.0,
        "size_px": 0,
        "soft_mask": True,
    },
}


def _resume_key(meta: dict[str, Any]) -> str:
    """What must match to resume: everything but the epoch budget and the loader workers."""
    train = {
        k: v
        for k, v in meta["train"].items()
        # a longer run (more epochs, more of them synthetic) resumes the same training
        if k not in ("epochs", "early_stopping", "workers", "synthetic_epochs")
    }
    return json.dumps({**meta, "train": train}, sort_keys=True, default=str)


def _save(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint a path names: the file itself, or ``best.pt`` of a training folder."""
    p = Path(path)
    return p / "best.pt" if p.is_dir() else p


def load_checkpoint(path: str | Path) -> tuple[DeepHEMNMANet, dict[str, Any]]:
    """The model (eval mode, CPU) and ``meta`` of a checkpoint file or folder (best.pt)."""
    p = checkpoint_file(path)
    if not p.is_file():
        raise InputError(f"{p}: no checkpoint (train with `deephemnma train` first)")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a foreign file
        raise InputError(f"{p}: not a deephemnma checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or "meta" not in payload or "model" not in payload:
        raise InputError(f"{p}: not a deephemnma checkpoint (no model/meta)")
    try:
        meta = json.loads(payload["meta"])
        spec = TargetSpec.from_dict(meta["target"])
        missing = [
            k
            for k in ("box_size_px", "pixel_size_angstrom", "preprocess", "train")
            if k not in meta
        ]
        if missing:
            raise KeyError(", ".join(missing))
        direct = "grid_head.weight" in payload["model"]  # grid scores through the MLP: older
        model = DeepHEMNMANet(
            spec.n_outputs,
            grid_slice=spec.grid_outputs if direct else None,
            backbone=str(meta["train"].get("backbone", "resnet34")),
            dropout=float(meta["train"].get("dropout", 0.5)),
            condition_quaternions=_condition(spec, meta["train"]),
        )
        model.load_state_dict(payload["model"])
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise InputError(
            f"{p}: damaged checkpoint metadata or weights ({type(exc).__name__}: {exc}); "
            "use another checkpoint (last.pt) or train again"
        ) from None
    model.eval()
    return model, meta


def _condition(spec: TargetSpec, train: dict[str, Any]) -> torch.Tensor | None:
    """The grid rotations that condition the MLP (`model.DeepHEMNMANet`), or None."""
    grid = spec.grid
    if not train.get("condition_on_orientation", False) or grid is None:
        return None
    if not {"amplitudes", "shifts"} & set(spec.parts):
        return None  # nothing but the grid to predict: nothing to condition
    return grid.quaternions


def _plot(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("L1 loss (standardised units)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _write_curves(history: list[dict[str, float]], out: Path) -> None:
    keys = list(history[0])
    with atomic_path(out / "training.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    _plot(history, out / "training.png")


def train(
    source: ImageSource,
    ctf: NDArray[np.float64],
    labels_raw: dict[str, NDArray[np.float64] | None],
    *,
    mode_numbers: list[int],
    box_size_px: int,
    pixel_size_angstrom: float,
    config: TrainConfig,
    out: Path,
    device: torch.device,
    extra_meta: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    reference: ReferenceModel | None = None,
) -> dict[str, Any]:
    """Train on every particle of ``source``; returns a summary.

    With ``config.synthetic_epochs`` the first epochs learn from images rendered on the fly
    from ``reference`` (the modes' reference model, required then; `synthetic.py`), with the
    particles' SNR measured on the labelled training particles; validation is always on the
    labelled particles.

    Parameters
    ----------
    source : ImageSource
        Raw particle images (n, box, box).
    ctf : array (n, 8)
        CTF per particle, columns `data.CTF_FIELDS`.
    labels_raw : dict
        ``amplitudes`` (n, M) Å, ``rotations`` (n, 3, 3), ``shifts`` (n, 2) Å (None if absent).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    n = len(source)
    splits = split_particles(n, config.val_fraction, config.test_fraction, config.seed)
    if len(splits["train"]) < 2 or len(splits["val"]) < 1:
        raise InputError(f"{n} particles are too few to train (need 2 to train, 1 to validate)")
    spec = TargetSpec.create(
        config.target,
        n_modes=len(mode_numbers),
        weights=dict(config.loss_weights),
        orientation_head=config.orientation_head,
        grid_step_degrees=config.grid_step_degrees,
    )
    amplitudes, shifts = labels_raw.get("amplitudes"), labels_raw.get("shifts")
    tr = splits["train"]
    spec = spec.fitted(
        None if amplitudes is None else amplitudes[tr], None if shifts is None else shifts[tr]
    )
    labels = encode(spec, amplitudes, labels_raw.get("rotations"), shifts)
    working = working_size(config, box_size_px, pixel_size_angstrom)
    prep = PreprocessConfig(
        output_size_px=working,
        phase_flip=True,
        normalise="background",
        lowpass_angstrom=config.lowpass_angstrom,
        soft_mask=config.soft_mask,
        # the mask reaches 0 at half the box, so in-plane rotations bring in no corners
        mask_radius_fraction=0.85,
        mask_edge_px=0.15 * working / 2,
    )
    synthetic = None
    if config.synthetic_epochs:
        if reference is None:
            raise InputError("synthetic training needs the modes' reference (--modes)")
        synthetic = _synthetic_source(
            reference, source, ctf, labels_raw, tr, box_size_px, pixel_size_angstrom, working
        )
        if rank == 0:
            log(
                f"synthetic training images: {working} px at "
                f"{synthetic.pixel_size_angstrom:.2f} Å, SNR {synthetic.snr:.4f} (median of the "
                "labelled particles against their fitted projections)"
            )
    meta = {
        "format": "deephemnma-network/1",
        "train": asdict(config),
        "target": spec.to_dict(),
        "mode_numbers": mode_numbers,
        "box_size_px": box_size_px,
        "pixel_size_angstrom": pixel_size_angstrom,
        "preprocess": prep.to_dict(),
        "synthetic_snr": None if synthetic is None else synthetic.snr,
        **(extra_meta or {}),
    }
    meta = json.loads(json.dumps(meta, default=str))
    meta_text = json.dumps(meta, sort_keys=True)
    torch.manual_seed(config.seed)
    model = DeepHEMNMANet(
        spec.n_outputs,
        backbone=config.backbone,
        dropout=config.dropout,
        grid_slice=spec.grid_outputs,
        condition_quaternions=_condition(spec, asdict(config)),
    )
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched: torch.optim.lr_scheduler.LRScheduler
    if config.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=config.epochs, eta_min=config.lr / 100
        )
    else:
        sched = torch.optim.lr_scheduler.StepLR(opt, config.lr_step_epochs, config.lr_gamma)
    history: list[dict[str, float]] = []
    start_epoch, best_val, stale = 0, math.inf, 0
    last = out / "last.pt"
    if last.exists():
        state = torch.load(last, map_location="cpu", weights_only=True)
        if _resume_key(json.loads(state["meta"])) != _resume_key(meta):
            raise InputError(
                f"{out} holds a training with other settings or data; use another --out or "
                "delete it"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        best_val, stale = float(state["best_val"]), int(state["stale"])
        history = json.loads(state["history"])
        if rank == 0:
            log(f"resuming after epoch {start_epoch} (best validation loss {best_val:.4f})")
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    amp = config.amp and device.type == "cuda"

    def loader(positions: NDArray[np.int64], shuffle: bool, epoch: int) -> Any:
        data = ParticleBatches(source, positions, ctf[positions], labels[positions])
        sampler: Any
        if shuffle and world > 1:
            sampler = torch.utils.data.DistributedSampler(
                data, world, rank, shuffle=True, seed=config.seed
            )
            sampler.set_epoch(epoch)
        elif shuffle:
            g = torch.Generator().manual_seed(config.seed + epoch)
            sampler = torch.utils.data.RandomSampler(data, generator=g)
        else:
            sampler = torch.utils.data.SequentialSampler(data)
        batches = torch.utils.data.BatchSampler(sampler, config.batch_size, drop_last=False)
        return torch.utils.data.DataLoader(
            data,
            batch_size=None,
            sampler=batches,
            num_workers=loader_workers(config.workers, device),
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )

    def prepare(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        images, y, c, _ = (t.to(device, non_blocking=True) for t in batch)
        x = preprocess_images(
            images,
            pixel_size_angstrom=pixel_size_angstrom,
            config=prep,
            ctf=ctf_from_rows(c, device),
        )
        return x, y.float()

    def synthetic_batches(epoch: int) -> Any:
        """Fresh synthetic batches of one epoch (the next one rendered while this one trains),
        as (preprocessed images, labels)."""
        from concurrent.futures import ThreadPoolExecutor

        assert synthetic is not None
        per_rank = config.batch_size

        def make(b: int) -> tuple[torch.Tensor, ...]:
            g = torch.Generator().manual_seed(
                (config.seed * 1_000_003 + epoch) * 100_003 + b * world + rank
            )
            return synthetic.batch(per_rank, g)

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(make, 0)
            for b in range(config.synthetic_batches):
                images, amps, rots, shifts, c = pending.result()
                if b + 1 < config.synthetic_batches:
                    pending = pool.submit(make, b + 1)
                y = encode(
                    spec, amps.double().numpy(), rots.double().numpy(), shifts.double().numpy()
                )
                x = preprocess_images(
                    images.to(device),
                    pixel_size_angstrom=synthetic.pixel_size_angstrom,
                    config=prep,
                    ctf=ctf_from_rows(c, device),
                )
                yield x, torch.as_tensor(y, device=device).float()

    from tqdm import tqdm

    t_start = time.perf_counter()
    # trained weights and gradients drift into denormals: 1.4x slower on a CPU without this
    with denormals_flushed(device):
        for epoch in range(start_epoch, config.epochs):
            augment_rng = torch.Generator().manual_seed(config.seed * 100_003 + epoch * 7 + rank)
            net.train()
            t0 = time.perf_counter()
            total, count = 0.0, 0
            simulated = synthetic is not None and epoch < config.synthetic_epochs
            batches = (
                synthetic_batches(epoch) if simulated else loader(splits["train"], True, epoch)
            )
            bar = tqdm(
                batches,
                desc=f"epoch {epoch + 1}/{config.epochs}" + (" (synthetic)" if simulated else ""),
                unit="batch",
                total=config.synthetic_batches if simulated else None,
                file=sys.stderr,
                disable=None if rank == 0 else True,
                leave=False,
            )
            for b, batch in enumerate(bar):
                if config.max_train_batches and b >= config.max_train_batches:
                    break
                x, y = batch if simulated else prepare(batch)
                if config.channels_last:
                    x = x[:, None].contiguous(memory_format=torch.channels_last)[:, 0]
                if config.augment and not simulated:
                    angles = torch.rand(len(x), generator=augment_rng) * (2 * math.pi)
                    x, y = rotate_inplane(
                        x, y, angles, spec.label_slices, spec.shift_mean, spec.shift_std
                    )
                # a conditioned network reads amplitudes in the light of the bin nearest the truth
                truth = y[:, spec.label_slices["orientation"]] if model.conditioned else None
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    pred = net(x[:, None], truth)
                loss, _ = target_loss(spec, pred.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(x)
                count += len(x)
                bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
            sched.step()
            # each rank scores its share of the validation set; the sums are all-reduced
            val_mine = splits["val"][rank::world]
            val, parts = evaluate(
                model, loader(val_mine, False, 0), prepare, spec, device, amp, world
            )
            train_loss = total / max(count, 1)
            record = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "val_loss": val,
                **{f"val_{k}": v for k, v in parts.items()},
                "lr": opt.param_groups[0]["lr"],
                "seconds": time.perf_counter() - t0,
                "synthetic": float(simulated),
            }
            history.append(record)
            improved = val < best_val
            best_val, stale = (val, 0) if improved else (best_val, stale + 1)
            if rank == 0:
                weights = model.state_dict()
                if improved:
                    _save(out / "best.pt", {"model": weights, "meta": meta_text})
                _save(
                    last,
                    {
                        "model": weights,
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "epoch": epoch,
                        "best_val": best_val,
                        "stale": stale,
                        "history": json.dumps(history),
                        "meta": meta_text,
                    },
                )
                _write_curves(history, out)
                done = epoch + 1 - start_epoch
                left = (time.perf_counter() - t_start) / done * (config.epochs - epoch - 1)
                log(
                    f"epoch {epoch + 1}: train {train_loss:.4f}, validation {val:.4f}"
                    + (" (best)" if improved else "")
                    + f", {record['seconds']:.1f} s"
                    + (f", at most {left / 60:.1f} min left" if epoch + 1 < config.epochs else "")
                )
            if config.early_stopping and stale >= config.early_stopping:
                if rank == 0:
                    log(f"early stop: no validation improvement for {stale} epochs")
                break
    if rank == 0:
        with atomic_path(out / "splits.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **splits)  # type: ignore[arg-type]
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return {
        "best_val": best_val,
        "epochs_run": len(history),
        "splits": {k: len(v) for k, v in splits.items()},
        "seconds": sum(h["seconds"] for h in history),  # every epoch, resumed runs too
    }


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Any,
    prepare: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, torch.Tensor]],
    spec: TargetSpec,
    device: torch.device,
    amp: bool,
    world: int = 1,
) -> tuple[float, dict[str, float]]:
    """Mean validation loss and its parts; with ``world`` > 1 each rank passes its share of
    the particles and the sums are all-reduced, so every rank returns the same figures."""
    model.eval()
    # [total loss, count, one sum per part], weighted by batch size
    sums = torch.zeros(2 + len(spec.parts), dtype=torch.float64)
    for batch in batches:
        x, y = prepare(batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(x[:, None])
        loss, parts = target_loss(spec, pred.float(), y)
        sums += torch.tensor([float(loss), 1.0, *(float(parts[p]) for p in spec.parts)]) * len(x)
    if world > 1:
        reduced = sums.to(device)
        torch.distributed.all_reduce(reduced)
        sums = reduced.cpu()
    mean = (sums / max(float(sums[1]), 1.0)).tolist()
    return mean[0], {p: mean[2 + k] for k, p in enumerate(spec.parts)}


def config_from_preset(preset: str, **overrides: Any) -> TrainConfig:
    """`TrainConfig` of a preset with explicit overrides (None values ignored)."""
    if preset not in PRESETS:
        raise InputError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    base = replace(TrainConfig(), **PRESETS[preset])
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _synthetic_source(
    reference: ReferenceModel,
    source: ImageSource,
    ctf: NDArray[np.float64],
    labels_raw: dict[str, NDArray[np.float64] | None],
    train_rows: NDArray[np.int64],
    box_size_px: int,
    pixel_size_angstrom: float,
    working: int,
    max_snr_particles: int = 256,
) -> Any:
    """`synthetic.SyntheticBatches` matched to the labelled training particles: their
    amplitudes and shifts, every particle's CTF, their SNR at the working size."""
    from .synthetic import SyntheticBatches, estimate_snr

    amplitudes, rotations, shifts = (
        labels_raw.get("amplitudes"),
        labels_raw.get("rotations"),
        labels_raw.get("shifts"),
    )
    if amplitudes is None or rotations is None or shifts is None:
        raise InputError(
            "synthetic training measures the noise against the fitted projections: the labelled "
            "particles need amplitudes, poses and origins (train on `deephemnma align` output)"
        )
    picked = np.sort(
        np.random.default_rng(0).permutation(train_rows)[: min(max_snr_particles, len(train_rows))]
    )
    dev = reference.coordinates.device
    snr, _ = estimate_snr(
        torch.as_tensor(source.read(picked), dtype=torch.float32, device=dev),
        torch.as_tensor(ctf[picked], dtype=torch.float32, device=dev),
        reference,
        torch.as_tensor(amplitudes[picked], dtype=torch.float32, device=dev),
        torch.as_tensor(rotations[picked], dtype=torch.float32, device=dev),
        torch.as_tensor(shifts[picked], dtype=torch.float32, device=dev),
        pixel_size_angstrom=pixel_size_angstrom,
        size_px=working,
    )
    return SyntheticBatches(
        reference=reference,
        ctf_rows=np.asarray(ctf, dtype=np.float64),
        snr=snr,
        size_px=working,
        pixel_size_angstrom=box_size_px * pixel_size_angstrom / working,
        amplitude_rows=np.asarray(amplitudes[train_rows], dtype=np.float64),
        shift_rows=np.asarray(shifts[train_rows], dtype=np.float64),
    )
