"""Read an image-caption table (CSV / TSV, or parquet when pyarrow or pandas is installed) as :class:`Record` s.

The release's format (open_clip ``CsvDataset``): tab-separated, a header row, image paths in column
``filepath`` and captions in column ``title``; these are the defaults here. Relative image paths are taken
from the table's folder or ``image_root``. Image URLs are not downloaded: such rows are counted as skipped,
and a table of URLs only is an error that points to img2dataset (see docs/datasets.md).
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from simzss.data.convert.writer import Record, is_url

DEFAULT_IMAGE_COLUMN = "filepath"
DEFAULT_CAPTION_COLUMN = "title"
IMG2DATASET_HINT = (
    "download the images with img2dataset (--output_format webdataset, --input_format csv|tsv|parquet, "
    "--url_col and --caption_col naming your columns; see docs/datasets.md); `simzss prepare` reads its output as is"
)


class TableError(ValueError):
    """A table that cannot be read or lacks the named columns."""


def _separator(path: Path, sep: str) -> str:
    if sep != "auto":
        return "\t" if sep in ("\\t", "tab") else sep
    with path.open(encoding="utf-8", newline="") as f:
        header = f.readline()
    return "\t" if "\t" in header else ","


def _read_delimited(path: Path, sep: str) -> Tuple[List[str], Iterator[Sequence[str]]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    f = path.open(encoding="utf-8", newline="")
    reader = csv.reader(f, delimiter=_separator(path, sep))
    try:
        header = next(reader)
    except StopIteration:
        f.close()
        raise TableError(f"{path}: empty table (expected a header row)") from None

    def rows() -> Iterator[Sequence[str]]:
        with f:
            yield from reader

    return [h.strip() for h in header], rows()


def _read_parquet(path: Path, columns: Sequence[str]) -> Tuple[List[str], Iterator[Sequence[str]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        table = pq.read_table(path)
        names = list(table.column_names)
        cols = {c: table.column(c).to_pylist() for c in columns if c in names}
    else:
        try:
            import pandas as pd
        except ImportError:
            raise TableError(f"{path}: reading parquet needs pyarrow (pip install pyarrow); or convert the table "
                             "to CSV/TSV") from None
        try:
            df = pd.read_parquet(path)
        except ImportError as e:
            raise TableError(f"{path}: reading parquet needs pyarrow (pip install pyarrow): {e}") from None
        names = [str(c) for c in df.columns]
        cols = {c: df[c].tolist() for c in columns if c in names}
    if len(cols) < len(columns):
        return names, iter(())  # the caller reports the missing column
    n = len(next(iter(cols.values())))
    # rows aligned with the header; only the wanted columns are filled in
    return names, (tuple("" if c not in cols or cols[c][i] is None else str(cols[c][i]) for c in names)
                   for i in range(n))


def read_table(path: str | os.PathLike, *, image_column: str = DEFAULT_IMAGE_COLUMN,
               caption_column: str = DEFAULT_CAPTION_COLUMN, sep: str = "auto",
               image_root: Optional[str | os.PathLike] = None) -> List[Record]:
    """One record per data row: key = the row's index (``000000042``), image = the path column resolved against
    ``image_root`` (default: the table's folder), caption = the caption column. ``sep``: ``auto`` (tab if the
    header has one, else comma), ``\\t`` or any one character. ``.parquet`` files are read with pyarrow/pandas.
    Raises :class:`TableError` naming the file and the fix; ``FileNotFoundError`` if it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    wanted = [image_column, caption_column]
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            header, rows = _read_parquet(path, wanted)
        else:
            header, rows = _read_delimited(path, sep)
    except UnicodeDecodeError as e:
        raise TableError(f"{path}: not UTF-8 text ({e}); CSV/TSV tables must be UTF-8") from None
    missing = [c for c in wanted if c not in header]
    if missing:
        raise TableError(f"{path}: no column {missing[0]!r} (columns: {', '.join(header) or 'none'}); name the "
                         "columns with --image-column and --caption-column (and check --sep)")
    i_img, i_cap = header.index(image_column), header.index(caption_column)
    records: List[Record] = []
    urls = 0
    try:
        for row_index, row in enumerate(rows):
            if len(row) <= max(i_img, i_cap):
                raise TableError(f"{path}: data row {row_index + 1} has {len(row)} field(s), expected "
                                 f"{len(header)}; check --sep")
            image = row[i_img].strip()
            urls += is_url(image)
            resolved = image if is_url(image) or not image else os.fspath(root / image)
            records.append(Record(key=f"{row_index:09d}", image=resolved, caption=row[i_cap],
                                  meta={"row": row_index, image_column: image}))
    except (csv.Error, UnicodeDecodeError) as e:
        raise TableError(f"{path}: cannot parse the table ({e})") from None
    if records and urls == len(records):
        raise TableError(f"{path}: the {image_column!r} column holds image URLs; {IMG2DATASET_HINT}")
    return records


__all__ = ["DEFAULT_CAPTION_COLUMN", "DEFAULT_IMAGE_COLUMN", "IMG2DATASET_HINT", "TableError", "read_table"]
