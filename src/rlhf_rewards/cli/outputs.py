"""Output files of the dataset commands: checked before any model loads, locked against a second writer for the
whole run, described by a sidecar record of what wrote them (so ``--resume`` refuses to mix runs), and read back
as a stream of rows for ``--resume``."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Optional, TextIO

from .common import UsageError, warn

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the other checks still apply
    fcntl = None

RECORD_SUFFIX = ".meta.json"
"""The sidecar next to an output, ``OUT.jsonl.meta.json``: the command, options and input that wrote it."""


def record_path(output: str) -> str:
    return output + RECORD_SUFFIX


def _same_file(a: str, b: str) -> bool:
    """The same file, through symlinks and hard links (paths that do not exist yet compare by their real path)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(outputs: dict[str, Optional[str]], data: str, *, resume: bool = False) -> None:
    """Refuse, before anything is read or loaded, output files (``{"--output": path, ...}``; ``None`` is stdout)
    that are the input or each other, exist on a fresh run, are not regular files on ``--resume``, or cannot be
    written."""
    given = {flag: path for flag, path in outputs.items() if path is not None}
    if resume and "--output" not in given:
        raise UsageError("--resume needs --output (the file to complete)")
    flags = list(given)
    for i, flag in enumerate(flags):
        for other in flags[:i]:
            if _same_file(given[flag], given[other]):
                raise UsageError(f"{other} and {flag} name the same file {given[flag]}; give each its own file")
    for flag, path in given.items():
        if os.path.exists(data) and _same_file(path, data):
            raise UsageError(f"{flag} {path} is the input file {data}; write the output to another file")
        if os.path.isdir(path):
            raise UsageError(f"{path}: is a directory, not a file to write")
        if os.path.lexists(path):
            if not resume:
                raise UsageError(f"{path}: already exists; pass --resume to complete it, or choose another {flag}")
            if not os.path.exists(path) or not stat.S_ISREG(os.stat(path).st_mode):
                raise UsageError(f"{path}: not a regular file (a device, pipe or dangling link); --resume completes "
                                 "a file this command wrote")
            if not os.access(path, os.R_OK | os.W_OK):
                raise UsageError(f"{path}: cannot be read and written (permission denied)")
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise UsageError(f"{path}: cannot be written: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise UsageError(f"{path}: cannot be written: directory {parent} is not writable")


def fingerprint(path: str) -> dict[str, Any]:
    """Size and BLAKE2b hash of an input file (streamed), or of every file of a ``save_to_disk`` directory."""
    digest = hashlib.blake2b(digest_size=16)
    files = [path] if not os.path.isdir(path) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    size = 0
    for name in files:
        if name != path:
            digest.update(os.path.relpath(name, path).encode() + b"\0")
        with open(name, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
                size += len(block)
    return {"bytes": size, "blake2b": digest.hexdigest()}


def model_id(model: str) -> str:
    """A local model directory by its real path (the same directory however it is spelt); a hub id as given."""
    return os.path.realpath(model) if os.path.exists(model) else model


def read_record(output: str) -> dict:
    path = record_path(output)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{output}: has no record of what wrote it ({path} is missing), so --resume cannot tell "
                         "whether this run would add the same rewards; write a new --output") from None
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: cannot read ({err}); write a new --output") from None


def write_record(output: str, record: dict) -> None:
    """Replace the sidecar atomically: a kill leaves the old record or the new one, never half of one."""
    tmp = record_path(output) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, record_path(output))


def check_record(output: str, record: dict, run: dict) -> None:
    """Refuse to resume ``output`` unless ``record`` (read from its sidecar) says the same command, options and
    input wrote it as ``run`` describes; the message names every field that differs."""
    old = record.get("run", {})
    if record.get("command") != run["command"]:
        raise UsageError(f"{output}: was written by `rlhf-rewards {record.get('command')}`, not "
                         f"`rlhf-rewards {run['command']}`; write a new --output")
    differ = [f"{key} {_show(old.get(key))} (this run: {_show(value)})"
              for key, value in run["run"].items() if old.get(key) != value]
    if differ:
        raise UsageError(f"--resume: {output} was written with " + "; ".join(differ) + ". Resuming would mix "
                         "results of different runs in one file: run with the options that wrote it, or write a "
                         "new --output")


def _show(value: Any) -> str:
    return "(none)" if value is None else json.dumps(value, ensure_ascii=False)


@contextmanager
def open_outputs(paths: Sequence[Optional[str]], *, append: bool = False) -> Iterator[list[TextIO]]:
    """Each path opened for writing (created; with ``append`` completed) and locked for the whole run, ``None``
    standing for stdout. A second process writing the same file is refused at once. When the run fails before it
    wrote anything (say the model does not load), the files it created are removed, with their sidecar, so the
    same command can simply run again."""
    created: list[str] = []
    with ExitStack() as stack:
        files: list[TextIO] = []
        try:
            for path in paths:
                if path is None:
                    files.append(sys.stdout)
                    continue
                exists = append and os.path.exists(path)
                try:
                    f = stack.enter_context(open(path, "a" if exists else "x", encoding="utf-8"))
                except FileExistsError:
                    raise UsageError(f"{path}: already exists; pass --resume to complete it, or choose another "
                                     "output") from None
                except OSError as err:
                    raise UsageError(f"{path}: cannot be written ({err.strerror})") from None
                if not exists:
                    created.append(path)
                _lock(f, path)
                files.append(f)
            yield files
        except BaseException:
            if all(os.path.getsize(path) == 0 for path in created):  # nothing written yet: as if never run
                for path in created:
                    os.remove(path)
                    if os.path.exists(record_path(path)):
                        os.remove(record_path(path))
            raise


def _lock(f: TextIO, path: str) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"{path}: another process is writing it (it holds the file's lock); wait for that run to "
                         "end, or write another output") from None


def write_rows(out: TextIO, rows: Sequence[dict]) -> None:
    """Append ``rows`` as JSON lines and flush, so a crash loses none of them."""
    out.write("".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))
    out.flush()


class WrittenRows:
    """The complete rows of a JSON Lines output being resumed, read one line at a time (the file is never held in
    memory). A last line without its newline, as a killed run leaves it, is cut from the file with a warning once the
    rows have been read (``torn`` counts it); any other line that is not a JSON object is an error."""

    def __init__(self, path: str, command: str):
        self.path = path
        self.command = command
        self.torn = 0

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        """``(line number, row)`` for each complete row."""
        keep = 0  # bytes of complete lines
        number = 0
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    break
                try:
                    row = json.loads(raw)
                except ValueError:
                    row = None
                if not isinstance(row, dict):
                    raise UsageError(f"{self.path}:{number}: not a row this command wrote; cannot resume this file")
                keep += len(raw)
                yield number, row
            size = f.seek(0, os.SEEK_END)
        if size > keep:
            self.torn = 1
            warn(self.command, f"{self.path}:{number}: dropped its last line, cut short by an interrupted run "
                               f"({size - keep} bytes without an end of line); that row is done again")
            os.truncate(self.path, keep)


def describe_run(command: str, args, preset, data_path: str, **options: Any) -> dict:
    """What the sidecar records: the command, the package version, the model and every option that changes the
    results (``options``, by flag), and the input's fingerprint. The weights' dtype is recorded as resolved, since
    the default differs between CPU and GPU."""
    from .. import __version__
    from ..backends.weights import resolve_device, resolve_dtype

    dtype = str(resolve_dtype(args.dtype, preset, resolve_device(args.device))).removeprefix("torch.")
    return {"command": command, "run": {
        "rlhf-rewards version": __version__, "--model": model_id(args.model), "--preset": preset.name,
        "--tokenizer": None if args.tokenizer is None else model_id(args.tokenizer), "--dtype": dtype,
        "--max-length": args.max_length, **options, "--split": args.split, "input": fingerprint(data_path)}}
