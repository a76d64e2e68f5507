"""deephemnma_bridge: DeepHEMNMA for RELION and cryoSPARC users.

Normal modes of an atomic model, batched HEMNMA alignment of particle images, a ResNet34 that
predicts the same parameters for every particle, and the conformational space, read from and
written back to RELION STAR and cryoSPARC ``.cs`` files.

Host formats live in `deephemnma_bridge.adapters`; the core modules here never import them.
The Python API, one function per stage (`deephemnma_bridge.api`), is importable from here too:
``from deephemnma_bridge import align, compute_modes, run_pipeline``; it is loaded on first use,
so ``import deephemnma_bridge`` alone loads no host-format library. (`api.simulate` is not
repeated here: ``deephemnma_bridge.simulate`` is the core module of the image simulator.)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names __getattr__ loads, for type checkers and editors
    from .api import (
        AnalysisResult,
        PipelineResult,
        SimulationResult,
        TrainedNetwork,
        align,
        analyze,
        compute_modes,
        fit_model,
        predict,
        run_pipeline,
        train,
    )

try:
    __version__ = version("deephemnma-bridge")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

#: The API's names, loaded from `deephemnma_bridge.api` on first use (PEP 562).
_API = (
    "AnalysisResult",
    "PipelineResult",
    "SimulationResult",
    "TrainedNetwork",
    "align",
    "analyze",
    "compute_modes",
    "fit_model",
    "predict",
    "run_pipeline",
    "train",
)

__all__ = [
    "AnalysisResult",
    "PipelineResult",
    "SimulationResult",
    "TrainedNetwork",
    "__version__",
    "align",
    "analyze",
    "compute_modes",
    "fit_model",
    "predict",
    "run_pipeline",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(".api", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
