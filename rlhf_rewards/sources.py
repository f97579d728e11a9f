"""Where model files come from: a local directory or a hub repository, checked before anything loads.

Loading libraries report a missing source in their own terms ("Repo id must be in the form ...", "couldn't connect
to huggingface.co" after about a minute of retries, "install sentencepiece"). :func:`locate` answers first, naming
the path or repository: a path that does not exist, a file where a directory is expected, a hub repository that is
not cached while ``HF_HUB_OFFLINE=1``, or a hub that cannot be reached (then a cached copy is used if there is one,
else it fails at once rather than after the retries).
"""

from __future__ import annotations

import logging
import os
import re

logger = logging.getLogger(__name__)

HUB_PROBE_SECONDS = 5.0
"""How long :func:`locate` waits for the hub to answer before treating it as unreachable."""

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


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

    Returns the directory itself (``~`` expanded); the hub id when the hub can be used (online, or offline with
    the repository cached); or the cached snapshot's directory when the hub cannot be reached.

    Raises:
        FileNotFoundError: a path that does not exist, or that is a file rather than a directory.
        OSError: a hub repository that is not in the local cache while offline (``HF_HUB_OFFLINE=1``) or while the
            hub cannot be reached; the message names the repository and the way out.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"{what}: expected a local directory or a hub id, got {type(name_or_path).__name__}")
    path = os.path.expanduser(os.fspath(name_or_path))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} is a file; pass the directory that holds the model's files")
    if not _HUB_ID.fullmatch(path) or path.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"{what} directory {path!r} does not exist")
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
