"""Per-particle work that is checkpointed, resumable and sharded across torchrun ranks.

Used by ``align`` and ``predict``: each rank takes a contiguous slice of the particles
(``np.array_split``), keeps its results in ``OUT.partial/rank<r>_of_<w>.npz`` (saved
atomically every ``checkpoint_every`` particles), and rank 0 merges all slices in input order.
A rerun of the same command resumes; a rerun with other settings is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..fileutils import atomic_path

__all__ = ["ShardedRun"]


class ShardedRun:
    """Results of ``n`` particles, one array per field, for this rank's slice.

    Parameters
    ----------
    out : Path
        The final output folder; partial results live in ``out.partial``.
    n : int
        Number of particles.
    fields : dict
        Field name -> (shape of one particle's value, dtype).
    settings : dict
        Everything that changes results; a resume must match it.
    device : torch.device
        Chooses the process-group backend (nccl on CUDA, gloo otherwise).
    checkpoint_every : int
        `store` saves the state after at least this many new particles.
    """

    def __init__(
        self,
        out: Path,
        n: int,
        fields: dict[str, tuple[tuple[int, ...], Any]],
        settings: dict[str, Any],
        device: torch.device,
        checkpoint_every: int = 512,
    ) -> None:
        if checkpoint_every < 1:
            raise InputError(f"--checkpoint-every must be >= 1, got {checkpoint_every}")
        self.checkpoint_every = checkpoint_every
        self._unsaved = 0
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.n = n
        self.fields = fields
        self.mine = np.array_split(np.arange(n), self.world)[self.rank]
        self.partial = out.with_name(out.name + ".partial")
        self.partial.mkdir(parents=True, exist_ok=True)
        wanted = json.loads(json.dumps(settings, default=str))
        settings_file = self.partial / "settings.json"
        if self.rank == 0 and not settings_file.exists():
            with atomic_path(settings_file) as tmp:
                tmp.write_text(json.dumps(wanted, indent=2))
        self.barrier()
        if json.loads(settings_file.read_text()) != wanted:
            raise InputError(
                f"{self.partial} holds a run with other settings; rerun with the same options "
                f"to resume, or delete {self.partial}"
            )
        self.state_file = self.partial / f"rank{self.rank}_of_{self.world}.npz"
        k = len(self.mine)
        self.state: dict[str, np.ndarray] = {"done": np.zeros(k, dtype=bool)}
        for name, (shape, dtype) in fields.items():
            self.state[name] = np.zeros((k, *shape), dtype=dtype)
        if self.state_file.exists():
            with np.load(self.state_file) as saved:
                self.state = {name: saved[name] for name in self.state}

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    @property
    def todo(self) -> np.ndarray:
        """Positions (within this rank's slice) still to do."""
        return np.flatnonzero(~self.state["done"])

    def store(self, local: np.ndarray, **values: np.ndarray) -> None:
        """Record results for slice positions ``local``; checkpoint every ``checkpoint_every``."""
        for name, value in values.items():
            self.state[name][local] = value
        self.state["done"][local] = True
        self._unsaved += len(local)
        if self._unsaved >= self.checkpoint_every:
            self.checkpoint()

    def checkpoint(self) -> None:
        self._unsaved = 0
        with atomic_path(self.state_file) as tmp, open(tmp, "wb") as f:
            np.savez(f, **self.state)  # type: ignore[arg-type]

    def merge(self) -> dict[str, np.ndarray] | None:
        """All particles' results in input order on rank 0 (after every rank finished)."""
        self.checkpoint()
        self.barrier()
        if self.rank != 0:
            return None
        merged = {
            name: np.zeros((self.n, *shape), dtype=dtype)
            for name, (shape, dtype) in self.fields.items()
        }
        for r, part in enumerate(np.array_split(np.arange(self.n), self.world)):
            with np.load(self.partial / f"rank{r}_of_{self.world}.npz") as saved:
                if not saved["done"].all():
                    raise InputError(f"{self.partial}: rank {r} did not finish; rerun to resume")
                for name in self.fields:
                    merged[name][part] = saved[name]
        return merged

    def close(self, *, success: bool) -> None:
        """Remove the partial folder (rank 0, on success) and leave the process group."""
        if success and self.rank == 0:
            for f in self.partial.iterdir():
                f.unlink()
            self.partial.rmdir()
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
