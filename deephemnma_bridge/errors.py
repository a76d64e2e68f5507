"""Exceptions raised for bad user input; the CLI turns them into one clear line and exit code 2."""

from __future__ import annotations

__all__ = ["DeepHEMNMAError", "InputError", "ParticleFileError"]


class DeepHEMNMAError(Exception):
    """Base class of every error caused by the user's input or files (not by a bug)."""


class InputError(DeepHEMNMAError, ValueError):
    """A parameter or an input value is invalid; the message says which and what to do."""


class ParticleFileError(DeepHEMNMAError, ValueError):
    """A particle, stack, model or map file cannot be used; the message names the file."""
