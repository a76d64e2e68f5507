"""The Python API of DeepHEMNMA: one function per stage, objects in, objects out.

Each ``deephemnma`` command is a thin layer over one of these functions (``deephemnma align``
over `align`, ``deephemnma run`` over `run_pipeline` ...). They take the package's objects or
the files that hold them (`ParticleTable` or a ``.star`` / ``.cs``, `NormalModes` or a
``.npz``, `TrainedNetwork` or a training folder), keyword-only options with units in their
names (``working_size_px``, ``search_step_degrees``, ``cutoff_angstrom``), report progress
through ``progress=`` (the package's bar, none, or a callback ``f(done, total)``) and their
lines through ``log=`` (``print`` by default, None for silence), and raise `InputError` for a
bad option or input, with the option named as the command line spells it (``--batch-size``).
Folders they write follow the command line's safety rules: a folder that this package did not
write is replaced only with ``overwrite=True``; long stages resume when called again.

This module reads and writes host files, so it sits with the command line on top of
`deephemnma_bridge.adapters`, outside the format-free core.

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> from deephemnma_bridge import api
>>> tmp = Path(tempfile.mkdtemp())
>>> sim = api.simulate(out=tmp / "sim", n_particles=8, box_px=48, pixel_size_angstrom=3.0,
...                    seed=1, device="cpu", progress=False, log=None)
>>> aligned = api.align(sim.particles, sim.modes, out=tmp / "aligned", use_modes=[7, 8],
...                     working_size_px=32, search_step_degrees=30, n_candidates=1,
...                     elastic_range_angstrom=0, device="cpu", threads=1, progress=False,
...                     log=None)
>>> aligned.has_poses, len(aligned)
(True, 8)
"""

from __future__ import annotations

from ._align import align
from ._analyze import AnalysisResult, analyze
from ._common import InputError, Log, ModesLike, ParticlesLike, ProgressCallback
from ._fit import fit_model
from ._modes import compute_modes
from ._pipeline import PipelineResult, run_pipeline
from ._predict import predict
from ._simulate import SimulationResult, simulate
from ._train import TrainedNetwork, train

__all__ = [
    "AnalysisResult",
    "InputError",
    "Log",
    "ModesLike",
    "ParticlesLike",
    "PipelineResult",
    "ProgressCallback",
    "SimulationResult",
    "TrainedNetwork",
    "align",
    "analyze",
    "compute_modes",
    "fit_model",
    "predict",
    "run_pipeline",
    "simulate",
    "train",
]
