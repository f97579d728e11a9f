"""Dataset input and JSONL output for the dataset commands: files read with ``datasets``, every failure a
:class:`~rlhf_rewards.cli.common.UsageError` naming the file (and the line, for JSONL), outputs checked before any
scoring starts, and rows already written found again for ``--resume``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any, Optional, TextIO

from .common import UsageError, require

SAMPLE_PREFERENCES = "sample:preferences"
"""The name that stands for the preference file shipped with the package (RewardBench's layout, a few dozen rows
over several of its subsets), so ``rlhf-rewards eval sample:preferences --model ...`` runs from an install."""

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def sample_preferences_path() -> str:
    """Path of the preference file shipped with the package."""
    return str(resources.files("rlhf_rewards") / "data" / "preferences.jsonl")


def _first_bad_json_line(path: str) -> Optional[str]:
    """``"path:line: message"`` for the first line of a JSON Lines file that is not one JSON object."""
    with open(path, encoding="utf-8", errors="strict") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno})"
            if not isinstance(value, dict):
                return f"{path}:{number}: expected a JSON object per line, got {type(value).__name__}"
    return None


def read_rows(path: str, split: Optional[str] = None):
    """Read a dataset: a JSONL, JSON, CSV or Parquet file, or a ``save_to_disk`` directory (``split`` picks one
    split of a saved ``DatasetDict``). Returns a ``datasets.Dataset``."""
    datasets = require("datasets")
    require("tqdm")  # the progress bar's: checked here, before any work is done
    datasets.disable_progress_bars()  # stderr carries the command's own progress bar
    if path == SAMPLE_PREFERENCES:
        path = sample_preferences_path()
    if os.path.isdir(path):
        try:
            data = datasets.load_from_disk(path)
        except Exception as err:  # datasets raises several types for a directory it cannot read
            raise UsageError(f"{path}: not a dataset saved with save_to_disk ({err})") from None
        if isinstance(data, datasets.DatasetDict):
            if split is None and len(data) == 1:
                split = next(iter(data))
            if split not in data:
                raise UsageError(f"{path}: holds splits {', '.join(data)}; choose one with --split")
            data = data[split]
        return data
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file or directory")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{path}: not readable (permission denied)")
    ext = os.path.splitext(path)[1].lower()
    if ext not in _BUILDERS:
        raise UsageError(f"{path}: unknown file type {ext or '(none)'}; expected .jsonl, .json, .csv, .parquet "
                         "or a save_to_disk directory")
    if ext == ".jsonl":
        # datasets' own error does not say where: find the line first
        try:
            bad = _first_bad_json_line(path)
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"{path}: cannot read ({err})") from None
        if bad:
            raise UsageError(bad)
    try:
        return datasets.load_dataset(_BUILDERS[ext], data_files=path, split=split or "train")
    except Exception as err:  # arrow/pandas/json errors differ by format; all mean the same to the user
        raise UsageError(f"{path}: cannot read as {_BUILDERS[ext]} ({type(err).__name__}: {err})") from None


def require_columns(data, path: str, columns: Iterable[Optional[str]]) -> None:
    """Fail naming the first missing column and listing the columns ``data`` has."""
    for name in columns:
        if name is not None and name not in data.column_names:
            raise UsageError(f"{path}: no column {name!r}; the columns are: {', '.join(data.column_names)}")


def check_output(path: Optional[str], *, resume: bool = False) -> None:
    """Refuse an output that exists (unless resuming) or cannot be written, before any scoring starts."""
    if path is None:
        if resume:
            raise UsageError("--resume needs --output (the file to complete)")
        return
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory, not a file to write")
    if os.path.exists(path):
        if not resume:
            raise UsageError(f"{path}: already exists; pass --resume to complete it, or choose another --output")
        if not os.access(path, os.R_OK | os.W_OK):
            raise UsageError(f"{path}: cannot be read and written (permission denied)")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{path}: cannot be written: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{path}: cannot be written: directory {parent} is not writable")


def check_output_dir(path: str) -> None:
    """Create ``path`` if needed; fail if it cannot hold the results, before any scoring starts."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{path}: cannot create the output directory ({err.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"{path}: the output directory is not writable")


def read_written(path: str) -> list[dict]:
    """The complete rows of a JSONL output being resumed. A last line cut short (no newline, or not valid JSON,
    as a killed process leaves it) is removed from the file; a bad line before the last is an error."""
    rows: list[dict] = []
    keep = 0  # byte length of the file's complete lines
    with open(path, "rb") as f:
        lines = f.readlines()
    for number, raw in enumerate(lines, start=1):
        last = number == len(lines)
        try:
            row = json.loads(raw) if raw.endswith(b"\n") else None
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            if last:
                break
            raise UsageError(f"{path}:{number}: not a row this command wrote; cannot resume this file")
        rows.append(row)
        keep += len(raw)
    if keep < sum(len(raw) for raw in lines):
        with open(path, "r+b") as f:
            f.truncate(keep)
    return rows


@contextmanager
def open_output(path: Optional[str], *, append: bool = False) -> Iterator[TextIO]:
    """The output file, created (or with ``append``, appended to); stdout when ``path`` is ``None``."""
    if path is None:
        yield sys.stdout
        return
    with open(path, "a" if append else "x", encoding="utf-8") as f:
        yield f


def write_rows(out: TextIO, rows: Sequence[dict]) -> None:
    """Append ``rows`` as JSON lines and flush, so a crash loses none of them."""
    out.write("".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))
    out.flush()


def add_data_arguments(parser, *, prompt_column: bool = True) -> None:
    """The dataset input options the commands share."""
    parser.add_argument("data", metavar="DATA",
                        help=f"JSONL, JSON, CSV or Parquet file, a save_to_disk directory, or {SAMPLE_PREFERENCES}")
    parser.add_argument("--split", help="the split to read from a saved DatasetDict")
    if prompt_column:
        parser.add_argument("--prompt-column", default="prompt",
                            help="column of prompts: text, or a list of messages (default: prompt)")
    parser.add_argument("--id-column", help="column of unique row ids, carried to the output (and used by --resume)")
    parser.add_argument("--chunk-size", type=int, default=64,
                        help="rows scored and written together; a crash loses at most one chunk (default: 64)")


def chunks(data, size: int) -> Iterable[tuple[int, list[dict]]]:
    """``(first row number, rows as dicts)`` for consecutive slices of ``data`` of ``size`` rows."""
    if size < 1:
        raise UsageError(f"--chunk-size must be positive, got {size}")
    for start in range(0, len(data), size):
        columns = data[start:start + size]
        names = list(columns)
        yield start, [dict(zip(names, values)) for values in zip(*(columns[n] for n in names))]


def unique_ids(data, path: str, column: Optional[str]) -> None:
    """Fail naming the first repeated id: ``--id-column`` must identify rows."""
    if column is None:
        return
    seen: dict[str, int] = {}
    for number, value in enumerate(data[column]):
        if value is None:
            raise UsageError(f"{path}: row {number} has no {column!r} (ids must be present and unique)")
        key = id_key(value)
        if key in seen:
            raise UsageError(f"{path}: rows {seen[key]} and {number} share {column!r} {value!r} (ids must be unique)")
        seen[key] = number


def id_key(value: Any) -> str:
    """A row id as compared across the input and an output being resumed (both pass through JSON)."""
    return json.dumps(value, sort_keys=True, default=str)
