"""Particles as training batches: images streamed from an `ImageSource`, labels, CTF.

Batches are read whole (one ``read`` call per batch, so memory-mapped stacks are read in
runs) by DataLoader workers; preprocessing (phase flip, Fourier crop, normalisation: the
shared `preprocess_images`) runs on the training device, identically in training and
inference, with the settings stored in the checkpoint.

Augmentation (off by default) is exact and transforms the labels with the image: rotating
the image by an angle phi about the box centre (pixel (N//2, N//2); phi = 90° maps pixel
(x, y) to (-y, x), x = column) gives the projection of the model rotated by ``Rz(phi)`` after
``A`` and translated by the rotated origin: ``A' = Rz A``, ``o' = R2 o``; amplitudes are
unchanged. Angles are drawn uniformly in [0, 360°), so the training set covers every in-plane
angle of every view it holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray

from ..alignment.ctf import CTF_PARAM_FIELDS, CTFParams
from ..imagesource import ImageSource
from ..preprocess import rotate_images

__all__ = [
    "CTF_FIELDS",
    "ParticleBatches",
    "ctf_from_rows",
    "rotate_inplane",
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
        rows = self.rows[pos]
        if np.all(rows[1:] >= rows[:-1]):  # in file order already (inference): no reordering
            images = self.source.read(rows)
        else:
            order = np.argsort(rows, kind="stable")  # read the stacks in file order
            read = self.source.read(rows[order])
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


def rotate_inplane(
    images: torch.Tensor,
    labels: torch.Tensor,
    angles: torch.Tensor,
    slices: dict[str, slice],
    shift_mean: Sequence[float] = (0.0, 0.0),
    shift_std: Sequence[float] = (1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each image (B, N, N) by ``angles`` (B,) radians about pixel (N//2, N//2), with
    its labels (see the module docstring): the quaternion part becomes ``qz(angle) q`` (sign
    canonical), the (standardised) origin part ``R2(angle) o``; amplitudes are unchanged.

    Bicubic interpolation, zeros outside the box: train with a circular mask that is 0 from
    radius N/2 on (`PreprocessConfig.soft_mask`) so that rotated and unrotated images look
    alike. Multiples of 90° are pixel permutations inside that circle.
    """
    phi = angles.to(device=images.device, dtype=torch.float64)
    out = rotate_images(images, phi)
    cos, sin = torch.cos(phi), torch.sin(phi)
    lab = labels.clone()
    if "orientation" in slices:
        # A' = Rz(phi) A  ->  q' = (cos phi/2, 0, 0, sin phi/2) * q
        c, s = torch.cos(phi / 2).to(lab.dtype), torch.sin(phi / 2).to(lab.dtype)
        w, x, y, z = lab[:, slices["orientation"]].unbind(dim=1)
        q = torch.stack([c * w - s * z, c * x - s * y, c * y + s * x, c * z + s * w], dim=1)
        lab[:, slices["orientation"]] = q * torch.where(q[:, :1] < 0, -1.0, 1.0)
    if "shifts" in slices:
        mean = torch.tensor(shift_mean, dtype=lab.dtype, device=lab.device)
        std = torch.tensor(shift_std, dtype=lab.dtype, device=lab.device)
        o = lab[:, slices["shifts"]] * std + mean
        c, s = cos.to(lab.dtype), sin.to(lab.dtype)
        turned = torch.stack([c * o[:, 0] - s * o[:, 1], s * o[:, 0] + c * o[:, 1]], dim=1)
        lab[:, slices["shifts"]] = (turned - mean) / std
    return out, lab
