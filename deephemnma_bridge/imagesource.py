"""Where particle images come from, as the core sees it: anything with ``len`` and ``read``.

The core (alignment, training, inference) reads images through this protocol and never opens
files itself; `deephemnma_bridge.adapters.images` implements it over MRC stacks (lazy,
memory-mapped, picklable for DataLoader workers), and `ArrayImageSource` over an in-memory
array for tests and simulations.

Example
-------
>>> import numpy as np
>>> src = ArrayImageSource(np.zeros((4, 8, 8), dtype=np.float32))
>>> len(src), src.read([3, 1]).shape
(4, (2, 8, 8))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["ArrayImageSource", "ImageSource"]


@runtime_checkable
class ImageSource(Protocol):
    """Images of the particles of a `ParticleTable`, by 0-based row position."""

    def __len__(self) -> int:
        """Number of particles (rows of the table), not of images in any one stack."""
        ...

    def read(self, rows: Sequence[int] | NDArray[np.integer]) -> NDArray[np.float32]:
        """Images of the given table rows, shape (k, box, box), float32, in the given order."""
        ...


class ArrayImageSource:
    """An `ImageSource` over an in-memory array (n, box, box)."""

    def __init__(self, images: ArrayLike) -> None:
        arr = np.asarray(images, dtype=np.float32)
        if arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
            raise ValueError(f"images must have shape (n, box, box), got {arr.shape}")
        self.images = arr

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def read(self, rows: Sequence[int] | NDArray[np.integer]) -> NDArray[np.float32]:
        return self.images[np.asarray(rows, dtype=np.intp)]
