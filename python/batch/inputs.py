"""What to classify: a folder tree, a list file, or a column of a Parquet or CSV table, as paths.

    list_inputs("data/photos")                      # every image file below, sorted
    list_inputs("photos.txt")                       # one path per line (train.txt's "path label" too)
    list_inputs("index.parquet", column="file")     # a column of paths (default column: "path")
    list_inputs("index.csv")

Relative paths in a list file or table are read from that file's folder (as trainer predict does).
A path listed twice is one input (the done-manifest is keyed by path): the repeats are counted and
logged. Listed files that do not exist are kept: they become error rows, never a silent drop. Empty
or null cells in a table are no paths at all: they are counted, logged with their row numbers and
left out.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import UserError
from trainer.predict import list_images

log = logging.getLogger("batch.inputs")

TABLE_SUFFIXES = (".parquet", ".pq", ".csv")


class InputError(UserError):
    """The inputs cannot be read (no such column, an empty listing, ...)."""


@dataclass
class Inputs:
    paths: list[str]                 # unique, in listing order
    repeated: int = 0                # paths listed more than once (kept once)
    blank_rows: list[int] = field(default_factory=list)  # table rows with no path (0-based)


def list_inputs(source: str | os.PathLike, column: str = "path") -> Inputs:
    """Paths to classify from a folder, a list file, a single image or a Parquet/CSV table column."""
    src = Path(source)
    if src.is_file() and src.suffix.lower() in TABLE_SUFFIXES:
        raw, blank = _table_column(src, column)
    else:
        raw, blank = list_images(src), []
    seen: dict[str, None] = dict.fromkeys(raw)
    out = Inputs(list(seen), len(raw) - len(seen), blank)
    if out.repeated:
        log.warning("%s: %d paths are listed more than once; each is classified once", src, out.repeated)
    if blank:
        shown = ", ".join(str(i) for i in blank[:10]) + (", ..." if len(blank) > 10 else "")
        log.warning("%s: %d rows of column %r hold no path (rows %s); they are left out", src, len(blank),
                    column, shown)
    if not out.paths:
        raise InputError(f"--images {src}: column {column!r} holds no paths")
    return out


def _table_column(src: Path, column: str) -> tuple[list[str], list[int]]:
    import pyarrow as pa

    try:
        if src.suffix.lower() == ".csv":
            import pyarrow.csv as pacsv

            names = _csv_header(src)
            if column not in names:
                raise InputError(_no_column(src, column, names))
            # the column as text: numeric file names stay paths
            # empty lines are rows too: counted and reported as blank, like null cells
            table = pacsv.read_csv(src, parse_options=pacsv.ParseOptions(ignore_empty_lines=False),
                                   convert_options=pacsv.ConvertOptions(
                include_columns=[column], column_types={column: pa.string()}, strings_can_be_null=True))
        else:
            import pyarrow.parquet as pq

            names = pq.read_schema(src).names
            if column not in names:
                raise InputError(_no_column(src, column, names))
            table = pq.read_table(src, columns=[column])
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"--images {src}: cannot read it as a {src.suffix[1:]} table ({exc})") from None
    values = table.column(column)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise InputError(f"--images {src}: column {column!r} holds {values.type}, not paths (strings); name the "
                         "column of file paths with --column")
    paths, blank = [], []
    base = src.parent
    for i, value in enumerate(values.to_pylist()):
        if value is None or not value.strip():
            blank.append(i)
            continue
        value = value.strip()
        paths.append(value if os.path.isabs(value) else str(base / value))
    return paths, blank


def _csv_header(src: Path) -> list[str]:
    import csv

    with open(src, newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), None)
    if not header:
        raise InputError(f"--images {src}: the CSV file is empty (a header row naming the columns is needed)")
    return header


def _no_column(src: Path, column: str, names: list[str]) -> str:
    return (f"--images {src}: no column {column!r} (it has: {', '.join(names) or 'none'}); name the column of file "
            "paths with --column")


__all__ = ["Inputs", "InputError", "list_inputs"]
