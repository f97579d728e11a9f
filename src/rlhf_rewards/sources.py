"""Where model files come from: a local directory or a hub repository, checked before anything loads.

Loading libraries report a missing source in their own terms ("Repo id must be in the form ...", "couldn't connect
to huggingface.co" after about a minute of retries, "install sentencepiece", a bare ``JSONDecodeError`` or
``SafetensorError`` that names no file). :func:`check_local` and :func:`locate` answer first, naming the path, file or
repository: an empty name, a path that does not exist, a file where a directory is expected, a directory holding no
weights, a damaged JSON, safetensors or torch file, a hub repository that is not cached while ``HF_HUB_OFFLINE=1``, or
a hub that cannot be reached (then a cached copy is used if there is one, else it fails at once rather than after the
retries).
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from typing import Any, Optional, Union

logger = logging.getLogger(__name__)

HUB_PROBE_SECONDS = 5.0
"""How long :func:`locate` waits for the hub to answer before treating it as unreachable."""

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")
"""File endings of model weights (single files, shards and shard indexes); a directory without any holds no model."""

JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "adapter_config.json")
"""The JSON files of a model directory that loading reads (shard indexes, ``*.index.json``, are checked too)."""


class ModelPathError(FileNotFoundError, ValueError):
    """A model, tokenizer or adapter path that cannot be what it should: empty, missing, a file, an empty directory
    or one without weights. Both a ``FileNotFoundError`` and a ``ValueError`` (a bad argument), as the standard
    library's ``io.UnsupportedOperation`` is both an ``OSError`` and a ``ValueError``."""


def read_json_file(path: str) -> Any:
    """The JSON value in ``path``; a ``ValueError`` naming the file when it is not valid JSON (the parser's error
    is its ``__cause__``)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({type(err).__name__}: {err}); the file is damaged or incomplete "
                         "(an interrupted download?): fetch it again") from err


def _check_safetensors(path: str) -> None:
    """Read the header of a safetensors file (no tensor data): a truncated or foreign file fails naming it."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except Exception as err:  # safetensors raises its own SafetensorError, or OSError
        raise ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); it is damaged "
                         "or incomplete (an interrupted download?): fetch it again") from err


def _check_torch_file(path: str) -> None:
    """A torch checkpoint is a zip archive (``torch.save`` since torch 1.6) or a legacy pickle; reading a zip's
    directory (at its end, without the tensor data) finds a truncated one."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic[:1] == b"\x80":  # a legacy (pre-zip) torch pickle: nothing to check without loading it
        return
    try:
        if magic != b"PK":
            raise zipfile.BadZipFile("neither a zip archive nor a pickle")
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{path} is not a readable torch checkpoint ({type(err).__name__}: {err}); it is damaged or "
                         "incomplete (an interrupted download?): fetch it again") from err


def _check_files(directory: str, names: list[str]) -> None:
    """The files loading will read in ``directory``, checked without loading weights."""
    for name in names:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        if name in JSON_FILES or name.endswith(".index.json"):
            data = read_json_file(path)
            if name.endswith(".index.json"):
                shards = sorted(set((data.get("weight_map") or {}).values())) if isinstance(data, dict) else []
                missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
                if missing:
                    raise ModelPathError(f"{path} names {len(missing)} weight shards that are missing, e.g. "
                                         f"{', '.join(missing[:3])}")
        elif name.endswith(".safetensors"):
            _check_safetensors(path)
        elif name.endswith((".bin", ".pt", ".pth")):
            _check_torch_file(path)


def check_local(name_or_path: Union[str, "os.PathLike[str]"], what: str = "model", weights: bool = True
                ) -> Optional[str]:
    """Check ``name_or_path`` as a local directory before anything loads, and return it (``~`` expanded); ``None``
    for a name that is no local path and can be a hub id (see :func:`locate`).

    A directory must not be empty, must hold weights when ``weights`` (:data:`WEIGHT_SUFFIXES`), and its JSON files
    (:data:`JSON_FILES`, shard indexes), safetensors headers and torch checkpoints' zip directories must read.

    Raises:
        TypeError: ``name_or_path`` is not a string or path.
        ModelPathError: an empty name, a path that does not exist, a file, an empty directory, no weights.
        ValueError: a damaged file, named (the library's error is its ``__cause__``).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"{what}: expected a local directory or a hub id (a str or os.PathLike), got "
                        f"{type(name_or_path).__name__}")
    path = os.path.expanduser(os.fspath(name_or_path))
    if not path.strip():
        raise ModelPathError(f"{what} path is empty ({path!r}): pass a local directory or a hub id")
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        if not names:
            raise ModelPathError(f"{what} directory {path!r} is empty: it holds no model files")
        if weights and not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
            listing = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ModelPathError(f"{what} directory {path!r} holds no weights (looked for *.safetensors, *.bin, *.pt, "
                                 f"*.pth and shard indexes; it holds {listing})")
        _check_files(path, names)
        return path
    if os.path.exists(path):
        raise ModelPathError(f"{what} {path!r} is a file; pass the directory that holds the {what}'s files")
    if not _HUB_ID.fullmatch(path) or path.startswith(("/", ".", "~")):
        raise ModelPathError(f"{what} directory {path!r} does not exist")
    return None


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "true", "yes", "on")


def _cached_snapshot(repo_id: str) -> str | None:
    """The newest cached snapshot directory of ``repo_id``, or ``None``; never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached: huggingface_hub raises several kinds depending on what is missing
        return None


def _hub_unreachable() -> str | None:
    """Why the hub endpoint cannot be reached (one short request), or ``None`` when it answers at all."""
    import httpx
    from huggingface_hub import constants

    try:
        httpx.head(constants.ENDPOINT, timeout=HUB_PROBE_SECONDS)
    except httpx.HTTPError as err:
        return f"{type(err).__name__}: {err}"
    return None


def locate(name_or_path: str, what: str = "model") -> str:
    """Check that ``name_or_path`` (a local directory or a hub id) can be loaded, and return what to load from.

    Returns the directory itself (``~`` expanded, checked by :func:`check_local` without requiring weights); the hub
    id when the hub can be used (online, or offline with the repository cached); or the cached snapshot's directory
    when the hub cannot be reached.

    Raises:
        ModelPathError: (a ``FileNotFoundError``) an empty name, a path that does not exist, a file, an empty
            directory.
        ValueError: a damaged file in the directory, named.
        OSError: a hub repository that is not in the local cache while offline (``HF_HUB_OFFLINE=1``) or while the
            hub cannot be reached; the message names the repository and the way out.
    """
    local = check_local(name_or_path, what, weights=False)
    if local is not None:
        return local
    path = os.fspath(name_or_path)
    elsewhere = f"(and there is no local directory {path!r})"
    if _offline():
        if _cached_snapshot(path) is None:
            raise OSError(f"{what} {path!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                          f"downloading it {elsewhere}. Download it once where the hub can be reached (e.g. "
                          f"`hf download {path}`), or pass a local directory.")
        return path
    reason = _hub_unreachable()
    if reason is None:
        return path
    cached = _cached_snapshot(path)
    if cached is None:
        raise OSError(f"cannot download {what} {path!r}: the hub does not answer ({reason}) and the repository is "
                      f"not in the local Hugging Face cache {elsewhere}. Check the network or HF_ENDPOINT, or pass a "
                      "local directory.")
    logger.warning("The hub does not answer (%s); loading %s %r from its cached copy %s.", reason, what, path, cached)
    return cached
