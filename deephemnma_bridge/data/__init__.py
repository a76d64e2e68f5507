"""Data shipped inside the package: the bundled adenylate kinase model (see README.md here)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["default_model_path"]


def default_model_path() -> Path:
    """Path of the embedded default model: chain A of 4AKE (open adenylate kinase), 214 Cα."""
    return Path(__file__).with_name("4ake_A.pdb")
