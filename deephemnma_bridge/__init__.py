"""deephemnma_bridge: DeepHEMNMA for RELION and cryoSPARC users.

Normal modes of an atomic model, batched HEMNMA alignment of particle images, a ResNet34 that
predicts the same parameters for every particle, and the conformational space, read from and
written back to RELION STAR and cryoSPARC ``.cs`` files.

Host formats live in `deephemnma_bridge.adapters`; the core modules here never import them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deephemnma-bridge")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
