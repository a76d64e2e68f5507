"""Particles as training batches: images streamed from an `ImageSource`, labels, CTF.

Batches are read whole (one ``read`` call per batch, so memory-mapped stacks are read in
runs) by DataLoader workers; preprocessing (phase flip, Fourier crop, normalisation: the
shared `preprocess_images`) runs on the training device, identically in training and
inference, with the settings stored in the checkpoint.

Augmentation (off by default) is exact and transforms the labels with the image: an in-plane
rotation by k x 90° about the box centre maps pixel (x, y) to (-y, x) (x = column), which
is the projection of the model rotated by ``Rz(k 90°)`` after ``A`` and translated by the
rotated origin: ``A' = Rz A``, ``o' = R2 o``; amplitudes are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray

from ..alignment.ctf import CTF_PARAM_FIELDS, CTFParams
from ..imagesource import ImageSource

__all__ = [
    "CTF_FIELDS",
    "ParticleBatches",
    "augment_shift_labels",
    "ctf_from_rows",
    "rotate90",
    "split_particles",
]

CTF_FIELDS = CTF_PARAM_FIELDS  # the column order of the CTF arrays (B, 8)


def split_particles(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, NDArray[np.int64]]:
    """Disjoint train / val / test positions, drawn per particle (before any augmentation)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("validation and test fractions must be in [0, 1) and sum below 1")
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(val_fraction * n)
    n_test = round(test_fraction * n)
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    return {
        "val": np.sort(order[:n_val]),
        "test": np.sort(order[n_val : n_val + n_test]),
        "train": np.sort(order[n_val + n_test :]),
    }


def ctf_from_rows(ctf: NDArray[np.float64] | torch.Tensor, device: torch.device) -> CTFParams:
    """`CTFParams` from an array or tensor (B, 8) with the columns of `CTF_FIELDS`."""
    t = torch.as_tensor(ctf, dtype=torch.float32, device=device)
    return CTFParams(**{name: t[:, k] for k, name in enumerate(CTF_FIELDS)})


class ParticleBatches(torch.utils.data.Dataset[tuple[torch.Tensor, ...]]):
    """``dataset[list_of_positions]`` -> (raw images (b, N, N), labels (b, K), CTF (b, 8),
    positions (b,)); use with ``DataLoader(batch_size=None, sampler=BatchSampler(...))``."""

    def __init__(
        self,
        source: ImageSource,
        rows: NDArray[np.int64],
        ctf: NDArray[np.float64],
        labels: NDArray[np.float32] | None = None,
    ) -> None:
        self.source = source
        self.rows = np.asarray(rows, dtype=np.int64)
        self.ctf = np.asarray(ctf, dtype=np.float64)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, positions: Sequence[int]) -> tuple[torch.Tensor, ...]:
        pos = np.asarray(positions, dtype=np.int64)
        order = np.argsort(self.rows[pos], kind="stable")  # read the stacks in file order
        read = self.source.read(self.rows[pos][order])
        images = np.empty_like(read)
        images[order] = read
        labels = (
            torch.zeros(len(pos), 0) if self.labels is None else torch.as_tensor(self.labels[pos])
        )
        return (
            torch.from_numpy(images),
            labels,
            torch.as_tensor(self.ctf[pos]),
            torch.as_tensor(pos),
        )


def rotate90(
    images: torch.Tensor, labels: torch.Tensor, k: torch.Tensor, slices: dict[str, slice]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each image (B, N, N) by ``k`` (B,) x 90° about pixel (N//2, N//2), with its
    labels (quaternion and standardised-shift parts; see the module docstring)."""
    n = images.shape[-1]
    idx = (n - torch.arange(n, device=images.device)) % n
    out, lab = images.clone(), labels.clone()
    for turns in (1, 2, 3):
        sel = k == turns
        if not bool(sel.any()):
            continue
        x = images[sel]
        for _ in range(turns):
            x = x[:, idx, :].transpose(-1, -2)
        out[sel] = x
        angle = turns * np.pi / 2
        if "orientation" in slices:
            # quaternion of Rz(angle): (cos a/2, 0, 0, sin a/2); A' = Rz A -> q' = qz * q
            q = lab[sel][:, slices["orientation"]]
            c, s = float(np.cos(angle / 2)), float(np.sin(angle / 2))
            w, xq, yq, zq = q.unbind(dim=1)
            rotated = torch.stack(
                [c * w - s * zq, c * xq - s * yq, c * yq + s * xq, c * zq + s * w], dim=1
            )
            rotated = rotated * torch.where(rotated[:, :1] < 0, -1.0, 1.0)
            sub = lab[sel]
            sub[:, slices["orientation"]] = rotated
            lab[sel] = sub
    return out, lab


def augment_shift_labels(
    labels: torch.Tensor,
    k: torch.Tensor,
    slices: dict[str, slice],
    shift_mean: Sequence[float],
    shift_std: Sequence[float],
) -> torch.Tensor:
    """Rotate the (standardised) origin labels by ``k`` x 90°: ``o' = R2 o``."""
    if "shifts" not in slices:
        return labels
    lab = labels.clone()
    mean = torch.tensor(shift_mean, dtype=lab.dtype, device=lab.device)
    std = torch.tensor(shift_std, dtype=lab.dtype, device=lab.device)
    o = lab[:, slices["shifts"]] * std + mean
    for _ in range(3):
        turn = k > 0
        o = torch.where(turn[:, None], torch.stack([-o[:, 1], o[:, 0]], dim=1), o)
        k = k - turn.to(k.dtype)
    lab[:, slices["shifts"]] = (o - mean) / std
    return lab
