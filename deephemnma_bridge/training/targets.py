"""What the network predicts, how labels are scaled, and the loss.

A target layout is an ordered subset of three parts: ``amplitudes`` (M values, standardised
with the training set's mean and standard deviation), ``orientation`` (a unit quaternion
``(w, x, y, z)`` of the RELION matrix, canonical sign ``w >= 0``; the network's 4 outputs are
renormalised, and the loss ``min(|p - q|_1, |p + q|_1)`` does not care about the sign, since
q and -q are the same rotation) and ``shifts`` (RELION origins x, y in Å, standardised). The
loss is the mean absolute error (L1) of each part, weighted.

Example
-------
>>> import numpy as np
>>> spec = TargetSpec.create("all", n_modes=3)
>>> spec.n_outputs, spec.slices["orientation"]
(9, slice(3, 7, None))
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from ..conventions import canonical_quaternion, matrix_to_quaternion, quaternion_to_matrix
from ..errors import InputError

__all__ = ["PARTS", "TargetSpec", "decode", "encode", "target_loss"]

PARTS = ("amplitudes", "orientation", "shifts")


@dataclass(frozen=True)
class TargetSpec:
    """Parts predicted, their slices in the output vector, label scaling and loss weights."""

    parts: tuple[str, ...]
    n_modes: int
    amplitude_mean: tuple[float, ...] = ()
    amplitude_std: tuple[float, ...] = ()
    shift_mean: tuple[float, float] = (0.0, 0.0)
    shift_std: tuple[float, float] = (1.0, 1.0)
    weights: dict[str, float] = field(default_factory=dict)

    @classmethod
    def create(
        cls, target: str, *, n_modes: int, weights: dict[str, float] | None = None
    ) -> TargetSpec:
        """``target``: amplitudes, orientation, shifts or all."""
        if target == "all":
            parts: tuple[str, ...] = PARTS
        elif target in PARTS:
            parts = (target,)
        else:
            raise InputError(f"--target must be amplitudes, orientation, shifts or all: {target!r}")
        if "amplitudes" in parts and n_modes < 1:
            raise InputError("predicting amplitudes needs at least one mode")
        w = {p: 1.0 for p in parts}
        w.update(weights or {})
        return cls(parts=parts, n_modes=n_modes, weights=w)

    @property
    def sizes(self) -> dict[str, int]:
        size = {"amplitudes": self.n_modes, "orientation": 4, "shifts": 2}
        return {p: size[p] for p in self.parts}

    @property
    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for p, k in self.sizes.items():
            out[p] = slice(start, start + k)
            start += k
        return out

    @property
    def n_outputs(self) -> int:
        return sum(self.sizes.values())

    def fitted(
        self, amplitudes: NDArray[np.float64] | None, shifts: NDArray[np.float64] | None
    ) -> TargetSpec:
        """The same spec with the label scaling of a training set."""
        changes: dict[str, Any] = {}
        if "amplitudes" in self.parts and amplitudes is not None:
            std = np.where(amplitudes.std(0) > 0, amplitudes.std(0), 1.0)
            changes["amplitude_mean"] = tuple(float(v) for v in amplitudes.mean(0))
            changes["amplitude_std"] = tuple(float(v) for v in std)
        if "shifts" in self.parts and shifts is not None:
            std = np.where(shifts.std(0) > 0, shifts.std(0), 1.0)
            changes["shift_mean"] = (float(shifts[:, 0].mean()), float(shifts[:, 1].mean()))
            changes["shift_std"] = (float(std[0]), float(std[1]))
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetSpec:
        fields: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**fields)


def encode(
    spec: TargetSpec,
    amplitudes: NDArray[np.float64] | None,
    rotations: NDArray[np.float64] | None,
    shifts: NDArray[np.float64] | None,
) -> NDArray[np.float32]:
    """Label vectors (n, n_outputs) from amplitudes (n, M), matrices (n, 3, 3), origins (n, 2)."""
    cols = []
    for part in spec.parts:
        if part == "amplitudes":
            if amplitudes is None:
                raise InputError("the particles have no _dhnAmplitude columns to learn from")
            cols.append((amplitudes - np.asarray(spec.amplitude_mean)) / spec.amplitude_std)
        elif part == "orientation":
            if rotations is None:
                raise InputError("the particles have no poses (rlnAngleRot/Tilt/Psi) to learn")
            cols.append(matrix_to_quaternion(rotations))
        else:
            if shifts is None:
                raise InputError("the particles have no origins to learn")
            cols.append((shifts - np.asarray(spec.shift_mean)) / np.asarray(spec.shift_std))
    return np.concatenate(cols, axis=1).astype(np.float32)


def decode(spec: TargetSpec, outputs: torch.Tensor) -> dict[str, NDArray[np.float64]]:
    """Network outputs (n, n_outputs) -> ``amplitudes`` (n, M) Å, ``rotations`` (n, 3, 3),
    ``shifts`` (n, 2) Å, for the parts predicted."""
    y = outputs.detach().double().cpu().numpy()
    out: dict[str, NDArray[np.float64]] = {}
    for part, sl in spec.slices.items():
        v = y[:, sl]
        if part == "amplitudes":
            out["amplitudes"] = v * np.asarray(spec.amplitude_std) + np.asarray(spec.amplitude_mean)
        elif part == "orientation":
            q = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
            out["rotations"] = quaternion_to_matrix(canonical_quaternion(q))
        else:
            out["shifts"] = v * np.asarray(spec.shift_std) + np.asarray(spec.shift_mean)
    return out


def target_loss(
    spec: TargetSpec, outputs: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of per-part L1 losses, and the parts (detached)."""
    total = outputs.new_zeros(())
    parts: dict[str, torch.Tensor] = {}
    for part, sl in spec.slices.items():
        p, t = outputs[:, sl].float(), labels[:, sl].float()
        if part == "orientation":
            p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-6)
            loss = torch.minimum((p - t).abs().sum(1), (p + t).abs().sum(1)).mean() / 4
        else:
            loss = (p - t).abs().mean()
        parts[part] = loss.detach()
        total = total + spec.weights.get(part, 1.0) * loss
    return total, parts
