"""An orientation output that can say "one of these": scores over a discrete SO(3) grid.

Quaternion regression averages between look-alike views (a view and its near-mirror give the
network the same image and opposite targets, and the L1 optimum lies between them). Here the
network scores every rotation of a grid (`alignment.hemnma.rotation_grid`, the HEMNMA search grid:
4,416 rotations at 15°) and is trained by cross-entropy against a soft target, a Gaussian of the
angle to the true rotation (``sigma = step / 2``, cut at ``3 sigma``), which rewards neighbours
of the truth and so keeps the scores smooth over the grid. Decoding returns the top-k
orientations, each refined below the grid step as the probability-weighted mean quaternion of the
bins within ``1.5 step`` of it, with the probability mass around it; the mass around the first
is the particle's confidence.

Example
-------
>>> import torch
>>> grid = OrientationGrid.create(30.0)
>>> logits = torch.zeros(2, grid.size)
>>> out = grid.decode(logits, k=2)
>>> out["candidates"].shape, out["probabilities"].shape, out["confidence"].shape
(torch.Size([2, 2, 3, 3]), torch.Size([2, 2]), torch.Size([2]))
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["OrientationGrid", "quaternion_to_matrix_t"]


def quaternion_to_matrix_t(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) of unit quaternions (..., 4) ``(w, x, y, z)`` (the same
    convention as ``conventions.quaternion_to_matrix``)."""
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


@dataclass(frozen=True, eq=False)
class OrientationGrid:
    """The rotations scored by the grid head: ``quaternions`` (G, 4), ``step_degrees``;
    ``exact`` the same in float64 (`create`'s, before rounding: `decode` compares angles with
    them), None: ``quaternions``."""

    step_degrees: float
    quaternions: torch.Tensor
    exact: torch.Tensor | None = None

    @classmethod
    def create(cls, step_degrees: float, device: torch.device | str = "cpu") -> OrientationGrid:
        from ..alignment.hemnma import rotation_grid
        from ..conventions import matrix_to_quaternion

        if not 1.0 <= step_degrees <= 90.0:
            raise ValueError(f"grid step must be within 1-90°, got {step_degrees}")
        q = torch.tensor(matrix_to_quaternion(rotation_grid(step_degrees)), dtype=torch.float64)
        return cls(float(step_degrees), q.to(device, torch.float32), q)

    @property
    def size(self) -> int:
        return int(self.quaternions.shape[0])

    def to(self, device: torch.device | str) -> OrientationGrid:
        return OrientationGrid(self.step_degrees, self.quaternions.to(device), self.exact)

    def angles(self, q: torch.Tensor) -> torch.Tensor:
        """Angles (radians) (..., G) between rotations ``q`` (..., 4) and every grid rotation."""
        dot = (q.float() @ self.quaternions.T).abs().clamp(max=1.0)
        return 2 * torch.arccos(dot)

    def soft_targets(self, q: torch.Tensor) -> torch.Tensor:
        """(B, G) target distributions: a Gaussian of the angle to ``q`` (B, 4), sigma half a
        step, cut at three sigma (the nearest bin always kept)."""
        sigma = math.radians(self.step_degrees) / 2
        a = self.angles(q)
        w = torch.exp(-0.5 * (a / sigma) ** 2) * (a <= 3 * sigma)
        nearest = a.argmin(dim=-1, keepdim=True)
        w = w.scatter(-1, nearest, w.gather(-1, nearest).clamp_min(1e-6))
        return w / w.sum(dim=-1, keepdim=True)

    def loss(self, logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (mean over the batch) of ``logits`` (B, G) against `soft_targets`."""
        target = self.soft_targets(q)
        return -(target * torch.log_softmax(logits.float(), dim=-1)).sum(-1).mean()

    @torch.no_grad()
    def decode(
        self, logits: torch.Tensor, k: int = 4, separation_degrees: float | None = None
    ) -> dict[str, torch.Tensor]:
        """Top-``k`` orientations of ``logits`` (B, G), more than ``separation_degrees`` apart
        (default two steps): ``rotations`` (B, 3, 3) the first, ``candidates`` (B, k, 3, 3),
        ``probabilities`` (B, k) the mass within 1.5 steps of each (bins an earlier candidate
        took excluded), ``confidence`` (B,) that of the first.

        Which bins are within an angle of one another is decided in float64 from the grid's
        unrounded quaternions (`_dots`, `_within`), the same on every machine and in every
        batch: the grid has pairs exactly two steps apart, which float32 rounding put on
        either side of the default separation (they are within it). Each step reads only
        the bins near the chosen one, from a table of every bin's neighbours built once per
        grid (`prepare_decode`); larger grids and separations are decoded over every bin
        instead (`_tabled`), with the same result."""
        k = max(1, min(k, self.size))
        near, sep = self._radii(separation_degrees)
        p = torch.softmax(logits.float(), dim=-1)  # (B, G)
        if self._tabled(near, sep):
            q, mass = self._decode_table(p, k, near, sep)
        else:
            q, mass = self._decode_dense(p, k, near, sep)
        cand = quaternion_to_matrix_t(q)
        return {
            "rotations": cand[:, 0],
            "candidates": cand,
            "probabilities": mass,
            "confidence": mass[:, 0],
        }

    def prepare_decode(
        self, separation_degrees: float | None = None, device: torch.device | str = "cpu"
    ) -> None:
        """Build now what `decode` (with this separation, logits on ``device``) builds at its
        first call: the grid's neighbour table (about 0.2 s of CPU at 15°)."""
        near, sep = self._radii(separation_degrees)
        if self._tabled(near, sep):
            self._neighbours(near, sep, torch.device(device))

    def _radii(self, separation_degrees: float | None) -> tuple[float, float]:
        """(near, sep) radians of `decode`: the mass of a candidate is read within 1.5 steps,
        and candidates are more than ``separation_degrees`` (default two steps) apart."""
        sep_degrees = 2 * self.step_degrees if separation_degrees is None else separation_degrees
        return math.radians(1.5 * self.step_degrees), math.radians(sep_degrees)

    def _tabled(self, near: float, sep: float) -> bool:
        """Whether `decode` uses a neighbour table: a grid of at most `NEIGHBOUR_TABLE_MAX`
        rotations and a table of at most 4 million entries (the share of SO(3) within an
        angle r of a rotation is (r - sin r) / pi: 0.75 % at 30°, 33 entries a row at 15°)."""
        r = min(max(near, sep), math.pi)
        entries = (r - math.sin(r)) / math.pi * self.size**2
        return self.size <= NEIGHBOUR_TABLE_MAX and entries <= 4e6

    def _decode_dense(
        self, p: torch.Tensor, k: int, near: float, sep: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`decode` over every bin at each step: quaternions (B, k, 4), masses (B, k)."""
        free = torch.ones_like(p, dtype=torch.bool)  # bins a next candidate may sit on
        claimed = torch.zeros_like(p, dtype=torch.bool)  # bins an earlier candidate averaged
        quats, masses = [], []
        exact = self._exact(p.device)
        for _ in range(k):
            idx = _argmax_rows(torch.where(free, p, torch.full_like(p, -1.0)))  # (B,)
            dot = _dots(exact[idx, None], exact)  # (B, G) float64
            inside = _within(dot, near)
            w = p * (inside & ~claimed)
            sign = torch.where(dot < 0, -1.0, 1.0).to(p.dtype)  # same hemisphere as the centre
            mean = (w * sign) @ self.quaternions  # (B, 4)
            quats.append(mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            masses.append(w.sum(-1))
            free &= ~_within(dot, sep)
            claimed |= inside
        return torch.stack(quats, 1), torch.stack(masses, 1)

    def _decode_table(
        self, p: torch.Tensor, k: int, near: float, sep: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_decode_dense` reading only each chosen bin's neighbours (`_Neighbours`)."""
        table = self._neighbours(near, sep, p.device)
        rows = torch.arange(p.shape[0], device=p.device)[:, None]
        # p on the bins a next candidate may sit on, -1 elsewhere; a last column (-2, never
        # the maximum) takes the writes of bins with no bin within the separation
        masked = torch.cat([p, p.new_full((p.shape[0], 1), -2.0)], dim=1)
        claimed = torch.zeros_like(p, dtype=torch.bool)  # bins an earlier candidate averaged
        quats, masses = [], []
        for _ in range(k):
            idx = _argmax_rows(masked)  # (B,)
            nbr = table.near_index[idx]  # (B, K)
            w = p[rows, nbr] * (table.near_valid[idx] & ~claimed[rows, nbr])
            mean = torch.einsum("bk,bkc->bc", w * table.near_sign[idx], self.quaternions[nbr])
            quats.append(mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            masses.append(w.sum(-1))
            # rows are padded with a repeat of their first entry: repeated writes agree
            masked[rows, table.sep_index[idx]] = -1.0
            claimed[rows, nbr] = True
        return torch.stack(quats, 1), torch.stack(masses, 1)

    def _neighbours(self, near: float, sep: float, device: torch.device) -> _Neighbours:
        """The neighbour table for (near, sep) radians on ``device``, built once."""
        key = (near, sep, str(device))
        cache = self._tables
        if key not in cache:
            exact = self._exact(torch.device("cpu"))
            cache[key] = _Neighbours.build(exact, near, sep).to(device)
        return cache[key]

    def _exact(self, device: torch.device) -> torch.Tensor:
        """The float64 quaternions (`exact`, else ``quaternions``) on ``device``."""
        q = self.quaternions if self.exact is None else self.exact
        return q.to(device, torch.float64)

    @functools.cached_property
    def _tables(self) -> dict[tuple[float, float, str], _Neighbours]:
        return {}


#: Grids with more rotations than this are decoded without a neighbour table, whose set-up
#: compares every pair of rotations (4,416 at 15°: ~0.2 s; 14,868 at 10°: ~2 s).
NEIGHBOUR_TABLE_MAX = 20_000


def _argmax_rows(values: torch.Tensor) -> torch.Tensor:
    """``values.argmax(dim=-1)`` of a 2-D tensor: the position of each row's first maximum (a
    NaN counts as one). On the CPU through numpy, whose loop is vectorised: measured at 1
    thread on (128, 4417) float32 probabilities, 0.05 ms against torch's 0.84 ms (4 calls
    per `OrientationGrid.decode`, more than half of the decoding's time)."""
    if values.device.type != "cpu" or values.dtype not in (torch.float32, torch.float64):
        return values.argmax(dim=-1)
    rows = values.detach().numpy()
    return torch.from_numpy(np.argmax(rows, axis=-1).astype(np.int64, copy=False))


def _dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot products (float64) of quaternions ``a`` (..., 4) and ``b`` (..., 4) (broadcast),
    as written: each operation rounded on its own, so that a pair gives the same value on any
    machine and in any batch or layout (a matrix product need not)."""
    a, b = a.double(), b.double()
    return (
        a[..., 0] * b[..., 0]
        + a[..., 1] * b[..., 1]
        + a[..., 2] * b[..., 2]
        + a[..., 3] * b[..., 3]
    )


#: Pairs of rotations this close (radians) to an angle `decode` compares with are at it: the
#: grids hold pairs exactly two steps apart (in-plane angles), computed 1e-15 off either way.
TIE_RADIANS = 1e-9


def _within(dot: torch.Tensor, radius: float) -> torch.Tensor:
    """Whether rotations with quaternion dot products ``dot`` are at most ``radius`` radians
    apart (``2 arccos |dot| <= radius``, ties within `TIE_RADIANS` included)."""
    if radius < 0 or radius + TIE_RADIANS >= math.pi:  # none, or every rotation
        return torch.full_like(dot, radius >= 0, dtype=torch.bool)
    return dot.abs() >= math.cos((radius + TIE_RADIANS) / 2)


@dataclass(frozen=True)
class _Neighbours:
    """For each bin (row) of a grid of G, by `_within`: ``near_index`` the bins within
    ``near`` (itself included), ``near_valid`` which entries are real (rows are padded to
    one width with a repeat of their first entry), ``near_sign`` +-1 the sign of their dot
    product with the row's quaternion, and ``sep_index`` the bins within ``sep`` (G for none:
    the extra column of `OrientationGrid._decode_table`)."""

    near_index: torch.Tensor  # (G, Kn) int64
    near_valid: torch.Tensor  # (G, Kn) bool
    near_sign: torch.Tensor  # (G, Kn) float32
    sep_index: torch.Tensor  # (G, Ks) int64

    @classmethod
    def build(cls, quaternions: torch.Tensor, near: float, sep: float) -> _Neighbours:
        """From the grid's float64 quaternions (G, 4): the pairs whose float32 dot product is
        near enough (with a margin far above its rounding), then `_dots` and `_within`."""
        size = int(quaternions.shape[0])
        widest = max(near, sep)
        if widest < 0:
            raise ValueError(f"near radius {near} rad is negative")
        cut = math.cos(min(widest / 2, math.pi / 2)) - 1e-4 if widest < math.pi else -1.0
        single = quaternions.float()
        rows, near_cols, signs, sep_rows, sep_cols = [], [], [], [], []
        for start in range(0, size, 256):
            centre = single[start : start + 256]
            row, col = ((centre @ single.T).abs() >= cut).nonzero(as_tuple=True)
            row = row + start  # row-major: each row's bins in order
            dot = _dots(quaternions[row], quaternions[col])
            inside = _within(dot, near)
            rows.append(row[inside])
            near_cols.append(col[inside])
            signs.append(torch.where(dot[inside] < 0, -1.0, 1.0))
            within = _within(dot, sep)
            sep_rows.append(row[within])
            sep_cols.append(col[within])
        near_index, near_valid = _table(torch.cat(rows), torch.cat(near_cols), size, size)
        if not bool(near_valid[:, 0].all()):
            raise ValueError(f"near radius {near} rad holds no bin, not even the bin itself")
        near_sign, _ = _table(torch.cat(rows), torch.cat(signs), size, 1.0)
        sep_index, _ = _table(torch.cat(sep_rows), torch.cat(sep_cols), size, size)
        return cls(near_index, near_valid, near_sign, sep_index)

    def to(self, device: torch.device) -> _Neighbours:
        return _Neighbours(
            self.near_index.to(device),
            self.near_valid.to(device),
            self.near_sign.to(device),
            self.sep_index.to(device),
        )


def _table(
    row: torch.Tensor, value: torch.Tensor, n_rows: int, empty: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries ``value`` of rows ``row`` (sorted) as (n_rows, widest row), each row padded
    with a repeat of its first entry (``empty`` for a row with none), and which are real."""
    count = torch.bincount(row, minlength=n_rows)
    width = max(int(count.max()) if len(row) else 0, 1)
    first = torch.cumsum(count, 0) - count  # where each row starts
    out = torch.full((n_rows, width), empty, dtype=value.dtype)
    out[row, torch.arange(len(row)) - first[row]] = value
    valid = torch.arange(width)[None, :] < count[:, None]
    return torch.where(valid | (count[:, None] == 0), out, out[:, :1]), valid
