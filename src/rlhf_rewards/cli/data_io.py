"""Dataset input of the dataset commands: files read with ``datasets``, every failure a
:class:`~rlhf_rewards.cli.common.UsageError` naming the file (and the line, for JSON and CSV), checked before any
model loads. Output files are :mod:`rlhf_rewards.cli.outputs`'."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from importlib import resources
from typing import Any, Optional

from .common import UsageError, positive_int, require

SAMPLE_PREFERENCES = "sample:preferences"
"""The name that stands for the preference file shipped with the package (RewardBench's layout, a few dozen rows
over several of its subsets), so ``rlhf-rewards eval sample:preferences --model ...`` runs from an install."""

SAMPLE_REWARD_BENCH_2 = "sample:reward-bench-2"
"""The name that stands for the RewardBench 2 sample shipped with the package (its layout, a few rows in each of its
six subsets, Ties rows paired by ``ref:``/``tied:`` ids)."""

SAMPLE_PROCESSBENCH = "sample:processbench"
"""The name that stands for the ProcessBench sample shipped with the package (its layout, erroneous and correct rows
in each of its four subsets, the subset named by each ``SUBSET-N`` id)."""

_SAMPLES = {SAMPLE_PREFERENCES: "preferences.jsonl", SAMPLE_REWARD_BENCH_2: "reward-bench-2.jsonl",
            SAMPLE_PROCESSBENCH: "processbench.jsonl"}

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def sample_path(name: str) -> str:
    """Path of the file shipped with the package that ``name`` (``sample:preferences``, ``sample:reward-bench-2``,
    ``sample:processbench``) stands for."""
    return str(resources.files("rlhf_rewards") / "data" / _SAMPLES[name])


def sample_preferences_path() -> str:
    """Path of the preference file shipped with the package."""
    return sample_path(SAMPLE_PREFERENCES)


_KINDS = ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "a list"), (dict, "an object"))


def _kind(value: Any) -> Optional[str]:
    return next((name for types, name in _KINDS if isinstance(value, types)), None)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


class _ColumnKinds:
    """The first JSON type seen in each column, to refuse a column that mixes types: ``datasets`` reads a column as
    one type and silently changes values to fit (the id ``"1"`` reads back as ``1``, and then equals the id 1)."""

    def __init__(self, path: str):
        self.path = path
        self.first: dict[str, tuple[str, str, Any]] = {}

    def add(self, row: dict, where: str) -> None:
        for name, value in row.items():
            kind = _kind(value)
            if kind is None:  # null fits any type
                continue
            seen = self.first.setdefault(name, (kind, where, value))
            if seen[0] != kind:
                raise UsageError(f"{self.path}: column {name!r} holds {kind} {_short(value)} at {where} and "
                                 f"{seen[0]} {_short(seen[2])} at {seen[1]}; give every row's {name!r} the same "
                                 "type (datasets would convert one to the other)")


def _check_json_lines(path: str) -> None:
    """Every non-blank line one JSON object, columns of one type each, at least one row: else name the line."""
    kinds = _ColumnKinds(path)
    rows = 0
    with open(path, encoding="utf-8", errors="strict") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                hint = "" if number > 1 or path.endswith(".jsonl") else \
                    " (a .json file holds one array of objects, or one object per line)"
                raise UsageError(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno}){hint}") from None
            if not isinstance(value, dict):
                raise UsageError(f"{path}:{number}: expected a JSON object per line, got {type(value).__name__}")
            kinds.add(value, f"line {number}")
            rows += 1
    if rows == 0:
        raise UsageError(f"{path}: has no rows (only blank lines)")


def _check_json_array(path: str) -> None:
    """A ``.json`` file holding one array: of objects, columns of one type each, not empty."""
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    kinds = _ColumnKinds(path)
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise UsageError(f"{path}: item {index} of the array is {type(item).__name__}, expected an object")
        kinds.add(item, f"item {index}")
    if not items:
        raise UsageError(f"{path}: has no rows (an empty array)")


def _check_json(path: str, ext: str) -> None:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if ext == ".json" and head.startswith(b"["):
        _check_json_array(path)
    else:
        _check_json_lines(path)


def _bad_csv_line(path: str) -> Optional[str]:
    """Why pandas could not read a CSV file, as ``"path:line: reason"`` for the first record it cannot read (more
    fields than the header, or a quote never closed), or ``"path: has no rows"``; ``None`` when the csv module
    finds nothing wrong."""
    import csv

    with open(path, encoding="utf-8", errors="strict", newline="") as f:
        reader = csv.reader(f, strict=True)
        start = 1
        try:
            header = next(reader, None)
            records = 0
            for record in reader:
                if len(record) > len(header):
                    return (f"{path}:{start + 1}: {len(record)} fields where the header (line 1) has "
                            f"{len(header)}")
                start = reader.line_num
                records += 1
        except csv.Error as err:
            return f"{path}:{start + 1}: {err} (the record starting on this line)"
    return f"{path}: has no rows (only a header line)" if records == 0 else None


def input_path(data: str) -> str:
    """The file or directory ``DATA`` stands for (``sample:preferences``, ``sample:reward-bench-2`` and
    ``sample:processbench`` are shipped files)."""
    return sample_path(data) if data in _SAMPLES else data


def read_rows(path: str, split: Optional[str] = None):
    """Read a dataset: a JSONL, JSON, CSV or Parquet file, or a ``save_to_disk`` directory (``split`` picks one
    split of a saved ``DatasetDict``). Returns a ``datasets.Dataset``."""
    datasets = require("datasets")
    require("tqdm")  # the progress bar's: checked here, before any work is done
    datasets.disable_progress_bars()  # stderr carries the command's own progress bar
    path = input_path(path)
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
        return _not_empty(data, path)
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file or directory")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{path}: not readable (permission denied)")
    ext = os.path.splitext(path)[1].lower()
    if ext not in _BUILDERS:
        raise UsageError(f"{path}: unknown file type {ext or '(none)'}; expected .jsonl, .json, .csv, .parquet "
                         "or a save_to_disk directory")
    if os.path.getsize(path) == 0:
        raise UsageError(f"{path}: is empty (no rows)")
    if _BUILDERS[ext] == "json":
        # datasets' own errors do not say where, and it changes values to fit mixed columns: check first
        try:
            _check_json(path, ext)
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"{path}: cannot read ({err})") from None
    try:
        data = _quietly(datasets, lambda: datasets.load_dataset(_BUILDERS[ext], data_files=path,
                                                                split=split or "train"))
    except Exception as err:  # arrow/pandas/json errors differ by format; all mean the same to the user
        try:
            where = _bad_csv_line(path) if ext == ".csv" else None
        except (OSError, UnicodeDecodeError):
            where = None
        cause = err.__cause__ or err
        raise UsageError(where or f"{path}: cannot read as {_BUILDERS[ext]} ({type(cause).__name__}: {cause})"
                         ) from None
    return _not_empty(data, path)


def _quietly(datasets, load):
    """Run ``load`` with datasets' own error log off: the command reports the failure itself, naming the line."""
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)
    try:
        return load()
    finally:
        datasets.logging.set_verbosity(level)


def _not_empty(data, path: str):
    if len(data) == 0:
        raise UsageError(f"{path}: has no rows")
    return data


def require_columns(data, path: str, columns: Iterable[Optional[str]]) -> None:
    """Fail naming the first missing column and listing the columns ``data`` has."""
    for name in columns:
        if name is not None and name not in data.column_names:
            raise UsageError(f"{path}: no column {name!r}; the columns are: {', '.join(data.column_names)}")


def check_output_dir(path: str) -> None:
    """Create ``path`` if needed; fail if it cannot hold the results, before any scoring starts."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{path}: cannot create the output directory ({err.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"{path}: the output directory is not writable")


def add_data_arguments(parser, *, prompt_column: bool = True, resumable: bool = True) -> None:
    """The dataset input options the commands share; ``resumable`` for the commands that write as they go and
    have ``--resume``."""
    parser.add_argument("data", metavar="DATA",
                        help="JSONL, JSON, CSV or Parquet file, a save_to_disk directory, or a shipped sample: "
                        + ", ".join(_SAMPLES))
    parser.add_argument("--split", help="the split to read from a saved DatasetDict")
    if prompt_column:
        parser.add_argument("--prompt-column", default="prompt",
                            help="column of prompts: text, or a list of messages (default: prompt)")
    parser.add_argument("--id-column", help="column of unique row ids, carried to the output"
                        + (" (and used by --resume)" if resumable else ""))
    parser.add_argument("--chunk-size", type=positive_int, default=64,
                        help="rows scored together (default: 64)" if not resumable else
                        "rows scored and written together; a crash loses at most one chunk (default: 64)")


def chunks(data, size: int) -> Iterable[tuple[int, list[dict]]]:
    """``(first row number, rows as dicts)`` for consecutive slices of ``data`` of ``size`` rows."""
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
