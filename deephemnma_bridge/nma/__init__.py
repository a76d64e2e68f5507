"""Normal modes of elastic network models (ANM, with sparse and RTB solvers for large models).

See `modes` for the conventions (1-based numbering, modes 1-6 rigid, unit-norm vectors).
"""

from .deform import deform, deform_atoms
from .modes import (
    NormalModes,
    check_modes_match,
    collectivity,
    compute_normal_modes,
    rigid_body_basis,
)

__all__ = [
    "NormalModes",
    "check_modes_match",
    "collectivity",
    "compute_normal_modes",
    "deform",
    "deform_atoms",
    "rigid_body_basis",
]
