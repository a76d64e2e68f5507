"""Low-level STAR text I/O: read blocks with starfile, write them fast and exactly.

Reading goes through teamtomo's ``starfile`` (``{block name: DataFrame | dict}``). Writing is
done here because RELION wants things ``starfile.write`` does not give: a ``# version 30001``
line before each block (RELION 3.1+ assumes 30000 without it), LF line endings, and floats
written so that they read back *exactly* (shortest round-trip representation instead of a fixed
``%.6f``, which would round untouched values). Loop bodies are written by ``DataFrame.to_csv``
(vectorised), strings with blanks are quoted as RELION 3.1+ reads them.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import starfile

from deephemnma_bridge.errors import ParticleFileError
from deephemnma_bridge.fileutils import atomic_path

__all__ = ["read_star_blocks", "write_star_blocks"]


def read_star_blocks(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All blocks of a STAR file, ``{name: DataFrame | dict}``, in file order.

    Raises
    ------
    ParticleFileError
        When the file is missing, unreadable or not a STAR file.
    """
    p = Path(path)
    if not p.is_file():
        raise ParticleFileError(
            f"{p}: no such file (check the path; RELION paths are relative "
            "to the project directory)"
        )
    try:
        blocks = starfile.read(p, always_dict=True)
    except Exception as err:  # starfile raises many kinds of errors on garbage
        raise ParticleFileError(
            f"{p}: not a readable STAR file ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(blocks, dict) or not blocks:
        raise ParticleFileError(f"{p}: no data_ block found; is this a STAR file?")
    return dict(blocks)


def _format_column(series: pd.Series) -> pd.Series:
    """Text for one column: strings quoted when they hold blanks or are empty."""
    if pd.api.types.is_bool_dtype(series):
        return series.astype(np.int64).astype(str)
    if pd.api.types.is_numeric_dtype(series):
        return series
    text = series.astype(str)
    needs_quote = text.str.contains(r"\s", regex=True) | (text == "")
    if bool(needs_quote.any()):
        text = text.where(~needs_quote, '"' + text + '"')
    return text


def _loop_text(name: str, df: pd.DataFrame) -> str:
    header = [f"data_{name}", "", "loop_"]
    header += [f"_{col} #{i}" for i, col in enumerate(df.columns, 1)]
    if len(df) == 0:
        return "\n".join(header) + "\n\n"
    formatted = pd.DataFrame({col: _format_column(df[col]) for col in df.columns})
    body = formatted.to_csv(
        sep="\t",
        header=False,
        index=False,
        quoting=csv.QUOTE_NONE,
        quotechar="\x1f",
        lineterminator="\n",
    )
    return "\n".join(header) + "\n" + body + "\n"


def _pairs_text(name: str, block: Mapping[str, Any]) -> str:
    lines = [f"data_{name}", ""]
    for key, value in block.items():
        text = str(value)
        if not text or any(c.isspace() for c in text):
            text = f'"{text}"'
        lines.append(f"_{key}\t{text}")
    return "\n".join(lines) + "\n\n"


def write_star_blocks(
    path: str | os.PathLike[str],
    blocks: Mapping[str, pd.DataFrame | Mapping[str, Any]],
    *,
    version_tag: bool = True,
    comment: str | None = None,
) -> None:
    """Write ``blocks`` to ``path`` atomically (temporary file, then rename).

    Parameters
    ----------
    blocks : mapping of block name to DataFrame (loop) or mapping (key/value block)
    version_tag : bool
        Put ``# version 30001`` before each block (RELION 3.1+ files); False for RELION 3.0.
    comment : str, optional
        A ``#`` comment line written first (e.g. which program wrote the file).
    """
    parts = []
    if comment:
        parts.append(f"# {comment}\n")
    for name, block in blocks.items():
        parts.append("\n# version 30001\n\n" if version_tag else "\n")
        if isinstance(block, pd.DataFrame):
            parts.append(_loop_text(name, block))
        else:
            parts.append(_pairs_text(name, block))
    text = "".join(parts)
    with atomic_path(path) as tmp, open(tmp, "w", newline="\n") as fh:
        fh.write(text)
