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
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import starfile

from deephemnma_bridge.errors import ParticleFileError
from deephemnma_bridge.fileutils import atomic_path

__all__ = ["check_star_text", "read_generated_labels", "read_star_blocks", "write_star_blocks"]


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
    samples = check_star_text(p)
    try:
        blocks = starfile.read(p, always_dict=True)
    except Exception as err:  # starfile raises many kinds of errors on garbage
        raise ParticleFileError(
            f"{p}: not a readable STAR file ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(blocks, dict) or not blocks:
        raise ParticleFileError(f"{p}: no data_ block found; is this a STAR file?")
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame) and name in samples:
            block.attrs[FORMATS] = _fixed_formats(block, *samples[name])
    return dict(blocks)


GENERATED_TAG = "# deephemnma generated:"
#: ``DataFrame.attrs`` key: ``{column: printf format}`` of the columns as the source wrote them
FORMATS = "star_formats"


def _tokens(line: str) -> int:
    """Number of values on a STAR row (quoted strings count as one, as in RELION 3.1+)."""
    if '"' not in line and "'" not in line:
        return len(line.split())
    return len(_TOKEN.findall(line))


_TOKEN = re.compile(r"\"[^\"]*\"|'[^']*'|\S+")


_SAMPLE_ROWS = 200
_FIXED = re.compile(r"[+-]?\d+\.(\d+)")


def check_star_text(path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Reject what starfile would read into wrong values, naming the table, row and label.

    Returns the labels and the first rows (as text) of every loop, ``{block: (labels, rows)}``,
    from which `read_star_blocks` learns how each number column was written.

    * a label twice in one loop (starfile keeps one of the two columns);
    * a row with more or fewer values than the loop has labels (starfile pads with NaN);
    * a file that ends inside its last row (no final newline: a truncated copy whose last value
      is cut short would otherwise be read as a valid, wrong number).
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise ParticleFileError(f"{path}: cannot read ({err})") from err
    labels: list[str] = []
    samples: dict[str, tuple[list[str], list[str]]] = {}
    block, in_loop, row, last_is_row = "", False, 0, False
    prev_line, last_line = "", ""
    for raw in text.split("\n"):
        line = raw.strip()
        if not line or line.startswith("#"):
            if not line and in_loop and row:
                in_loop = False
            last_is_row = False
            continue
        if line.startswith("data_"):
            block, in_loop, last_is_row = line[5:].split()[0] if line[5:] else "", False, False
            continue
        if line.startswith("loop_"):
            labels, in_loop, row, last_is_row = [], True, 0, False
            continue
        if line.startswith("_"):
            last_is_row = False
            if not in_loop or row:
                in_loop = False
                continue
            label = line.split()[0][1:]
            if label in labels:
                raise ParticleFileError(
                    f"{path}: table {block!r} has the column _{label} twice (labels "
                    f"#{labels.index(label) + 1} and #{len(labels) + 1}); remove one of them"
                )
            labels.append(label)
            continue
        if in_loop and labels:
            row += 1
            last_is_row = True
            if row <= _SAMPLE_ROWS:
                samples.setdefault(block, (labels, []))[1].append(line)
            prev_line, last_line = (last_line if row > 1 else ""), line
            count = _tokens(line)
            if count != len(labels) and len(labels) > 2:
                what = (
                    f"has no value for column {labels[count]}"
                    if count < len(labels)
                    else "has values beyond its last column"
                )
                raise ParticleFileError(
                    f"{path}: table {block!r} row {row} {what} ({count} values for "
                    f"{len(labels)} columns: truncated or damaged row); fix or remove that row"
                )
    if last_is_row and not text.endswith("\n") and _looks_cut(last_line, prev_line):
        raise ParticleFileError(
            f"{path}: the file ends inside row {row} of table {block!r} (no final newline): it "
            "looks truncated, so the last value may be cut short; copy the file again"
        )
    return samples


def _fixed_formats(df: pd.DataFrame, labels: list[str], rows: list[str]) -> dict[str, str]:
    """``{column: "%.Nf"}`` for the number columns written with N decimals on every sampled row
    (RELION writes ``%12.6f``): `write_star_blocks` writes them back the same way when that
    gives every value exactly (it does for values read from such text)."""
    split = [_TOKEN.findall(r) for r in rows]
    out: dict[str, str] = {}
    for j, label in enumerate(labels):
        if label not in df.columns or not pd.api.types.is_float_dtype(df[label]):
            continue
        decimals = set()
        for tokens in split:
            m = _FIXED.fullmatch(tokens[j]) if j < len(tokens) else None
            decimals.add(len(m.group(1)) if m else -1)
        if len(decimals) == 1 and (d := decimals.pop()) > 0:
            out[label] = f"%.{d}f"
    return out


def _shape(token: str) -> tuple[str, int]:
    """How a value looks: ("num", decimals) for a number, else its text with digit runs as 9."""
    if re.fullmatch(r"[+-]?\d*\.?\d+(?:[eE][+-]?\d+)?|[+-]?\d+\.", token):
        mantissa = re.split("[eE]", token)[0]
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else -1
        return ("num" + ("e" if "e" in token.lower() else ""), decimals)
    return (re.sub(r"\d+", "9", token), 0)


def _looks_cut(last: str, prev: str) -> bool:
    """Whether the last value of a file without a final newline looks cut short.

    Writers format a column the same way on every row, so the last value is compared with the
    same column of the row before; in a one-row table, a number is compared with the other
    fixed-decimal numbers of its row (``0.1`` among ``300.000000 2.700000`` is cut short).
    """
    tokens = _TOKEN.findall(last)
    if not tokens:
        return False
    shape = _shape(tokens[-1])
    before = _TOKEN.findall(prev)
    if len(before) == len(tokens):
        return _shape(before[-1]) != shape
    if not shape[0].startswith("num"):
        return False
    others = {_shape(t) for t in tokens[:-1]}
    fixed = {s for s in others if s[0] == "num" and s[1] > 0}
    return len(fixed) == 1 and shape not in fixed


def read_generated_labels(path: str | os.PathLike[str]) -> frozenset[str]:
    """Labels our writer added to ``path`` (``# deephemnma generated:`` comment), if any."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for _, line in zip(range(50), fh):
            if line.startswith(GENERATED_TAG):
                return frozenset(line[len(GENERATED_TAG) :].split())
            if line.startswith("data_"):
                break
    return frozenset()


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


def _as_written(series: pd.Series, fmt: str | None) -> pd.Series:
    """The column in the source's number format when that gives back every value exactly (an
    untouched column read from such text), else as `_format_column` writes it."""
    if fmt is not None and pd.api.types.is_float_dtype(series) and len(series):
        values = series.to_numpy(dtype=np.float64)
        decimals = int(fmt[2:-1])
        # v == rint(v * 10^d) / 10^d (a correctly rounded division) means v is the double
        # nearest to a d-decimal number, so its d-decimal text reads back as exactly v
        if np.isfinite(values).all() and np.array_equal(np.round(values, decimals), values):
            return pd.Series(np.char.mod(fmt, values), index=series.index, dtype=object)
    return _format_column(series)


def _loop_text(name: str, df: pd.DataFrame) -> str:
    header = [f"data_{name}", "", "loop_"]
    header += [f"_{col} #{i}" for i, col in enumerate(df.columns, 1)]
    if len(df) == 0:
        return "\n".join(header) + "\n\n"
    formats = df.attrs.get(FORMATS, {})
    formatted = pd.DataFrame({col: _as_written(df[col], formats.get(col)) for col in df.columns})
    body = formatted.to_csv(
        sep="\t",
        header=False,
        index=False,
        quoting=csv.QUOTE_NONE,
        quotechar="\x1f",
        lineterminator="\n",
        na_rep="nan",  # a missing number (a failed particle's cost): never an empty token
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
