"""Choose the torch device: the GPU when one is present, the CPU otherwise."""

from __future__ import annotations

import torch

from .errors import InputError

__all__ = ["available_devices", "resolve_device"]


def resolve_device(name: str | None = "auto") -> torch.device:
    """``"auto"`` (or None) gives ``cuda`` when available, else ``cpu``; other names are checked.

    Raises
    ------
    InputError
        When a CUDA device is asked for and none is present.
    """
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return device


def available_devices() -> list[str]:
    """``["cpu"]`` plus ``"cuda"`` when a GPU is present (for parametrised tests)."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
